// Wires relayq together: store → SMTP intake → delivery workers → HTTP API, and takes them down
// in the reverse order on shutdown (stop intake, stop claiming, let in-flight deliveries
// finish within a bound, release claims, checkpoint and close the database).
import type { Logger } from 'pino';
import { type Clock, systemClock } from './clock.js';
import { redactConfig } from './config/load.js';
import type { Config } from './config/schema.js';
import { createLogger } from './logger.js';
import { SmtpIntake } from './smtp/intake.js';
import { CommitQueue } from './store/commit-queue.js';
import { openStore, type Store } from './store/db.js';
import { DiskSpace } from './store/disk.js';

export interface RelayOptions {
  clock?: Clock;
  logger?: Logger;
  /** Startup warnings from loadConfig, logged once the logger exists. */
  warnings?: string[];
  /** How long shutdown waits for open DATA transfers and in-flight deliveries. */
  shutdownGraceMs?: number;
  /** Test hook: the client address SMTP intake sees (default: the socket's peer). */
  smtpPeerAddress?: (session: import('smtp-server').SMTPServerSession) => string;
}

export interface Relay {
  config: Config;
  store: Store;
  commits: CommitQueue;
  intake: SmtpIntake;
  disk: DiskSpace;
  clock: Clock;
  logger: Logger;
  smtpPort: number;
  /** Warnings that also appear in /health (e.g. loopback clients accepted without AUTH). */
  warnings: string[];
  stop(): Promise<void>;
}

export async function startRelay(config: Config, options: RelayOptions = {}): Promise<Relay> {
  const clock = options.clock ?? systemClock;
  const logger = options.logger ?? createLogger(config.logLevel);
  const warnings = options.warnings ?? [];
  for (const w of warnings) logger.warn({ event: 'config.warning' }, w);

  const store = await openStore(config.databasePath);
  const commits = new CommitQueue(store.sqlite);
  const disk = new DiskSpace(config.databasePath, config.minFreeDiskMb);
  const intake = new SmtpIntake({ config, sqlite: store.sqlite, commits, disk, clock, logger: logger.child({ component: 'smtp' }), peerAddress: options.smtpPeerAddress });

  let smtpPort: number;
  try {
    smtpPort = await intake.listen(config.smtpPort, config.smtpHost);
  } catch (err) {
    await store.close();
    throw err;
  }
  logger.info({ event: 'relay.started', smtp: `${config.smtpHost}:${smtpPort}`, config: redactConfig(config) }, 'relayq started');

  const graceMs = options.shutdownGraceMs ?? 10_000;
  let stopping: Promise<void> | undefined;
  const relay: Relay = {
    config,
    store,
    commits,
    intake,
    disk,
    clock,
    logger,
    smtpPort,
    warnings,
    stop() {
      stopping ??= (async () => {
        logger.info({ event: 'relay.stopping' }, 'shutting down');
        await intake.shutdown(graceMs);
        commits.close();
        await store.close();
        logger.info({ event: 'relay.stopped' }, 'relayq stopped');
      })();
      return stopping;
    },
  };
  return relay;
}
