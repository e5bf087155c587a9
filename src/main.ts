// Wires relayq together: the store opens, the HTTP API binds, SMTP listens, then delivery and
// retention start. A stop closes the API and drains intake and delivery together within the grace
// period (in-flight deliveries finish or are released), then the last commits are made and the
// database is checkpointed and closed.
import fs from 'node:fs';
import path from 'node:path';
import type { Context } from 'hono';
import type { Logger } from 'pino';
import { hostPort } from './access-control.js';
import { createApp } from './api/app.js';
import { type ApiServer, startApiServer } from './api/server.js';
import { type Clock, isoTime, systemClock } from './clock.js';
import { asGiven, redactConfig } from './config/load.js';
import type { Config } from './config/schema.js';
import { EMAILS_DIR_MODE } from './delivery/atomic-file.js';
import { DeliveryEngine } from './delivery/engine.js';
import { failedExportDir } from './delivery/failed-export.js';
import { createLogger } from './logger.js';
import { makeDirectory, removeMade } from './make-dir.js';
import { followedForUse } from './root-guard.js';
import { SmtpIntake } from './smtp/intake.js';
import { Spool, SpoolError } from './smtp/spool.js';
import { certificateWarning, exposedKeyWarning, readTlsFiles } from './smtp/tls-files.js';
import { openStore, realDatabasePath, type Store, type WalKept } from './store/db.js';
import { DiskSpace, freePageBytes } from './store/disk.js';
import { type DatabaseLock, lockDatabase } from './store/maintenance.js';
import { newestRecordedTime } from './store/queries.js';
import { RetentionSweeper } from './store/retention.js';
import { StoreWriter } from './store/writer.js';
import { VERSION } from './version.js';

/** A clock this far behind the newest time in the database at the start is taken for one stepped back. */
const CLOCK_BEHIND_WARNING_MS = 60_000;

export interface RelayOptions {
  clock?: Clock;
  logger?: Logger;
  /** Warnings for /health: loadConfig's, logged once the logger exists, and any added later (a log that stopped). */
  warnings?: string[];
  /** The config file the config was read from (null: none), as relay.started says. */
  configFile?: string | null;
  /** How long shutdown waits for open DATA transfers and in-flight deliveries. */
  shutdownGraceMs?: number;
  /** false: delivery does not poll; tests drive it with `relay.delivery.runOnce()`. */
  startDelivery?: boolean;
  /** false: no retention timer; tests call `relay.retention.runOnce()` with their clock. */
  startRetention?: boolean;
  /** Jitter source of the retry backoff, [0, 1) like Math.random. */
  random?: () => number;
  /** How often delivery looks for due work besides being woken by commits (default 100 ms). */
  deliveryPollMs?: number;
  /** Test hook: the client address SMTP intake sees (default: the socket's peer). */
  smtpPeerAddress?: (session: import('smtp-server').SMTPServerSession) => string;
  /** Test hook: the client address the HTTP API sees (default: the socket's peer). */
  apiClientIp?: (c: Context) => string | undefined;
  /**
   * The relay can no longer store mail (its writer thread died). `relayq serve` stops and exits
   * non-zero, so that a supervisor (systemd, Docker's restart policy) starts it again.
   */
  onFatal?: (err: Error) => void;
}

export interface Relay {
  config: Config;
  store: Store;
  /** Every write of the server goes through here (the writer thread's group commit). */
  writer: StoreWriter;
  intake: SmtpIntake;
  delivery: DeliveryEngine;
  retention: RetentionSweeper;
  disk: DiskSpace;
  clock: Clock;
  logger: Logger;
  smtpPort: number;
  /** Port of the HTTP API; undefined when enableHealthCheck is false. */
  httpPort: number | undefined;
  /** Warnings that also appear in /health (e.g. loopback clients accepted without AUTH). */
  warnings: string[];
  stop(): Promise<void>;
}

/**
 * emailsDir holds local deliveries and the exports of failed mail (emailsDir/failed, also when
 * forwarding): a path that cannot be such a directory stops the start, instead of the first
 * delivery or failure. Returns it as the kernel reaches it, which the root check looked at, for
 * files to be named in from then on: the text of a path with `..` after a link names another one.
 */
function prepareEmailsDir(given: string): { emailsDir: string; made: string[] } {
  let emailsDir = given;
  let made: string[] = [];
  try {
    emailsDir = followedForUse(given, { inside: 'failed' });
    const failedDir = failedExportDir(emailsDir);
    // not writable by others, whatever the umask: the files hold messages, and a directory others
    // may write to would let them swap in a link to another place
    made = makeDirectory(failedDir, EMAILS_DIR_MODE);
    // writing a file into a directory takes write and search (execute) permission on it
    fs.accessSync(emailsDir, fs.constants.W_OK | fs.constants.X_OK);
    fs.accessSync(failedDir, fs.constants.W_OK | fs.constants.X_OK);
  } catch (err) {
    removeMade(made);
    throw new Error(`config error: emailsDir: ${asGiven('emailsDir', given)} cannot hold deliveries and failed-mail exports: ${(err as Error).message}`, { cause: err });
  }
  return { emailsDir, made };
}

/** A start's warning about what other users may do to relayq's files, with the path and its mode. */
export interface PermissionWarning {
  path: string;
  mode: string;
  message: string;
}

/**
 * What other users could do to relayq's files, said at start (in the log and in /health): read
 * every message, in a database made readable (by hand, by a restore: relayq makes it for its user
 * alone); remove or replace files in a directory they may write that is not sticky, the
 * database's (its -wal holds acknowledged mail until a checkpoint) or emailsDir's (deliveries,
 * exports). Postfix warns so of a queue directory others may write. A directory a group may write
 * is taken as meant (a shared group, a container's group 0). Run as root, relayq refuses all such
 * places before this (root-guard.ts).
 */
export function permissionWarnings(databasePath: string, emailsDir: string): PermissionWarning[] {
  const warnings: PermissionWarning[] = [];
  const modeOf = (file: string) => fs.statSync(file, { throwIfNoEntry: false })?.mode;
  const octal = (mode: number) => `0${(mode & 0o7777).toString(8)}`;
  const databaseMode = modeOf(databasePath);
  if (databaseMode !== undefined && (databaseMode & 0o077) !== 0) {
    warnings.push({
      path: databasePath,
      mode: octal(databaseMode),
      message: `other users may read the database ${databasePath} (mode ${octal(databaseMode)}), which holds every message: chmod 600 it and its -wal and -shm files`,
    });
  }
  const directories: Array<[string, string]> = [
    [path.dirname(realDatabasePath(databasePath)), "the database's -wal, with mail acknowledged and not yet in the database file"],
    [emailsDir, 'local deliveries'],
    [failedExportDir(emailsDir), 'the exports of failed mail'],
  ];
  for (const [dir, holds] of directories) {
    const mode = modeOf(dir);
    if (mode === undefined || (mode & 0o002) === 0 || (mode & 0o1000) !== 0) continue;
    warnings.push({
      path: dir,
      mode: octal(mode),
      message: `other users may remove or replace the files in ${dir} (mode ${octal(mode)}), ${holds} among them: chmod o-w it`,
    });
  }
  return warnings;
}

/**
 * The lock says no other relay runs on this database: a claim still held was left by one that
 * ended without handing it back. It is due again now, as Postfix's queue manager moves its active
 * queue back at its start, rather than once its lease (processingTimeout) has run out.
 */
async function releaseOrphanedAtStart(writer: StoreWriter, clock: Clock, logger: Logger): Promise<void> {
  const orphaned = await writer.write('releaseOrphanedClaims', clock.now());
  if (orphaned.length > 0) {
    logger.warn(
      { event: 'delivery.claims_recovered', count: orphaned.length, ids: orphaned.slice(0, 10) },
      'messages were being delivered when relayq last stopped without handing them back: due again now',
    );
  }
}

/**
 * Times in the database are wall-clock times: after a step back, mail waiting now waits the
 * length of the step longer (README, "When the clock steps"); said, not silently waited out.
 */
function warnIfClockBehind(store: Store, clock: Clock, logger: Logger): void {
  const newest = newestRecordedTime(store.sqlite);
  const behindMs = newest === null ? 0 : newest - clock.now();
  if (behindMs > CLOCK_BEHIND_WARNING_MS) {
    logger.warn(
      { event: 'relay.clock_behind', behindSeconds: Math.round(behindMs / 1000), newest: isoTime(newest) },
      'the clock is behind the newest time in the database, as if it was stepped back: any mail waiting now waits that much longer ' +
        '(relayq retry --queued, or POST /admin/retry-queued, makes it due now)',
    );
  }
}

/** What a stop says of WAL frames left uncheckpointed: safe there, and checkpointed at the next start. */
function reportWalKept(kept: WalKept | undefined, databasePath: string, logger: Logger): void {
  if (!kept) return;
  const walPath = `${realDatabasePath(databasePath)}-wal`;
  if (kept.cause === 'reader') {
    logger.info(
      { event: 'store.wal_kept', walPath },
      'not all of the WAL was checkpointed into the database file: a reader (sqlite3, the CLI, a backup) still reads older frames of it; the next start checkpoints them',
    );
  } else {
    // the frames are safe in the WAL; a checkpoint that fails may be a failing disk
    logger.warn(
      { event: 'store.wal_kept', walPath, err: kept.err },
      'the WAL could not be checkpointed into the database file: the next start checkpoints it; keep the -wal file with the database',
    );
  }
}

export async function startRelay(configured: Config, options: RelayOptions = {}): Promise<Relay> {
  let config = configured;
  const clock = options.clock ?? systemClock;
  const logger = options.logger ?? createLogger(config.logLevel);
  const warnings = options.warnings ?? [];
  for (const w of warnings) logger.warn({ event: 'config.warning' }, w);

  // before anything is created: a key that cannot be used stops the start as a config error does
  const tlsFiles = config.tls.cert && config.tls.key ? readTlsFiles(config.tls.cert, config.tls.key) : undefined;
  const tls = tlsFiles && { cert: tlsFiles.cert, key: tlsFiles.key };
  const tlsWarnings = tlsFiles ? [certificateWarning(config.tls.cert, tlsFiles.cert, clock.now()), exposedKeyWarning(config.tls.key, tlsFiles.keyMode)] : [];
  for (const w of tlsWarnings) {
    if (!w) continue;
    warnings.push(w);
    logger.warn({ event: 'config.warning' }, w);
  }
  const emails = prepareEmailsDir(config.emailsDir);
  config = { ...config, emailsDir: emails.emailsDir };
  // a database refused (a mistyped path, another relay running on it) leaves no emailsDir made for it
  const refused = (err: Error) => {
    removeMade(emails.made);
    return new Error(`databasePath ${asGiven('databasePath', config.databasePath)}: ${err.message}`, { cause: err });
  };
  let lock: DatabaseLock;
  try {
    lock = lockDatabase(config.databasePath);
  } catch (err) {
    throw refused(err as Error);
  }
  const store = await openStore(config.databasePath, {
    secureDelete: !config.security.logAllEmails,
    // a migration of a large store may take minutes, with nothing listening meanwhile
    onMigrating: (names) => logger.info({ event: 'store.migrating', migrations: names }, 'applying schema migrations'),
  }).catch((err: Error) => {
    lock.releaseAfter(err);
    throw refused(err);
  });
  if (store.migrated.names.length > 0) {
    logger.info({ event: 'store.migrated', migrations: store.migrated.names, durationMs: store.migrated.durationMs }, 'schema migrations applied');
  }
  for (const w of permissionWarnings(config.databasePath, config.emailsDir)) {
    warnings.push(w.message);
    logger.warn({ event: 'store.permissions', path: w.path, mode: w.mode }, w.message);
  }
  // The main thread's connection only reads; the writer thread owns every write.
  const writer = new StoreWriter({ file: config.databasePath, secureDelete: !config.security.logAllEmails });
  // The writer thread opens its connection while the rest starts (writes made meanwhile wait for
  // it). If it cannot, or dies later, every write is refused from then on: say so, and let the
  // caller stop the relay (`relayq serve` exits 1 for its supervisor to restart it).
  writer.onFailed = (err) => {
    logger.fatal({ event: 'relay.writer_failed', err: err.message }, 'the writer thread failed: nothing can be stored any more');
    options.onFatal?.(err);
  };
  /** The last step of a stop, and of a start that failed: queued writes commit, then both close. */
  const closeStorage = async (): Promise<WalKept | undefined> => {
    try {
      await writer.close();
      return await store.close();
    } finally {
      lock.release();
    }
  };
  try {
    warnIfClockBehind(store, clock, logger);
    await releaseOrphanedAtStart(writer, clock, logger);
  } catch (err) {
    // A full disk need not stop the start: those claims are taken again when their lease ends,
    // and meanwhile the relay answers 4xx and /health says why, where a refused start would not.
    if ((err as { code?: unknown }).code !== 'SQLITE_FULL') {
      await closeStorage();
      throw refused(err as Error);
    }
    logger.error(
      { event: 'delivery.claims_not_recovered', err: (err as Error).message, leaseSeconds: config.processingTimeout },
      'messages being delivered when relayq last stopped could not be handed back now: they are due again when their lease ends',
    );
  }
  const disk = new DiskSpace({
    databasePath: config.databasePath,
    minFreeMb: config.minFreeDiskMb,
    spoolDir: Spool.dirFor(realDatabasePath(config.databasePath)),
    spoolAfter: config.spoolAfter,
    reusableBytes: () => freePageBytes(store.sqlite),
  });
  const delivery = new DeliveryEngine({
    config,
    sqlite: store.sqlite,
    writer,
    clock,
    logger: logger.child({ component: 'delivery' }),
    random: options.random,
    pollIntervalMs: options.deliveryPollMs,
  });
  const intake = new SmtpIntake({
    config,
    sqlite: store.sqlite,
    writer,
    disk,
    clock,
    logger: logger.child({ component: 'smtp' }),
    peerAddress: options.smtpPeerAddress,
    inFlow: delivery.inFlow,
    tls,
  });

  // The API binds first: a port in use stops the start before SMTP has taken any mail or
  // delivery has claimed any (its /health says the SMTP listener is down until it listens).
  let api: ApiServer | undefined;
  if (config.enableHealthCheck) {
    const app = createApp({ config, store, writer, disk, intake, clock, logger, warnings, delivery, getClientIp: options.apiClientIp });
    try {
      api = await startApiServer(app, config.healthCheckHost, config.healthCheckPort);
    } catch (err) {
      await closeStorage();
      throw new Error(`healthCheckHost, healthCheckPort: cannot listen on ${hostPort(config.healthCheckHost, config.healthCheckPort)}: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }

  let smtp: { address: string; port: number };
  try {
    smtp = await intake.listen(config.smtpPort, config.smtpHost);
  } catch (err) {
    await api?.close();
    await closeStorage();
    if (err instanceof SpoolError) throw new Error(`databasePath: ${err.message}`, { cause: err });
    throw new Error(`smtpHost, smtpPort: cannot listen on ${hostPort(config.smtpHost, config.smtpPort)}: ${(err as Error).message}`, { cause: err });
  }
  // the addresses listened on: a host name listens on the first address it resolves to; and where
  // relative paths led (a service started in another working directory makes a new, empty queue)
  logger.info(
    {
      event: 'relay.started',
      version: VERSION,
      smtp: hostPort(smtp.address, smtp.port),
      configFile: options.configFile,
      paths: { databasePath: path.resolve(config.databasePath), emailsDir: path.resolve(config.emailsDir) },
      config: redactConfig(configured),
    },
    'relayq started',
  );
  if (api) logger.info({ event: 'api.listening', http: hostPort(api.address, api.port) }, 'HTTP API listening');
  // said now, not first at the next MAIL FROM (452) or health check
  if (disk.isLow()) {
    logger.warn(
      { event: 'relay.disk_low', freeMb: disk.freeMb(), minFreeDiskMb: config.minFreeDiskMb },
      'free disk space is below minFreeDiskMb: new mail is refused with 452 until there is more',
    );
  }

  if (options.startDelivery ?? true) {
    writer.onCommitted = () => delivery.wake();
    delivery.start();
  }

  const retention = new RetentionSweeper({
    writer,
    clock,
    logger: logger.child({ component: 'retention' }),
    deliveredDays: config.retention.deliveredDays,
    eraseDeliveredContent: !config.security.logAllEmails,
  });
  if (options.startRetention ?? true) retention.start();

  const graceMs = options.shutdownGraceMs ?? 10_000;
  let stopping: Promise<void> | undefined;
  const relay: Relay = {
    config,
    store,
    writer,
    intake,
    delivery,
    retention,
    disk,
    clock,
    logger,
    smtpPort: smtp.port,
    httpPort: api?.port,
    warnings,
    stop() {
      stopping ??= (async () => {
        logger.info({ event: 'relay.stopping' }, 'shutting down');
        // Intake drains and delivery stops claiming, finishes or releases its attempts, both
        // within the grace period, before the last commit. The API closes meanwhile: waiting for
        // its requests first would let SMTP accept and delivery claim for up to its close grace.
        await Promise.all([api?.close(), intake.shutdown(graceMs), delivery.stop(graceMs), retention.stop()]);
        // until now a client that connects is told `421`, not refused
        await intake.close();
        reportWalKept(await closeStorage(), config.databasePath, logger);
        logger.info({ event: 'relay.stopped', writes: writer.stats.writes, commits: writer.stats.commits }, 'relayq stopped');
      })();
      return stopping;
    },
  };
  return relay;
}
