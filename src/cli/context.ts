// What every operator command shares: the configuration loaded exactly as `serve` loads it
// (--config, RELAYQ_CONFIG, ./config.json, environment), a connection to the same database
// file the server may be writing, and output as a table or as JSON. Failures are CliErrors:
// the entry point prints their one-line message and exits non-zero.
import fs from 'node:fs';
import path from 'node:path';
import { MIGRATION_NAMES } from '../../migrations/names.js';
import { asGiven, loadConfigFromSources, mistypedEnvNames } from '../config/load.js';
import { CONFIG_KEYS, type Config } from '../config/schema.js';
import { followedForUse, followedPath, refuseOthersPathsAsRoot } from '../root-guard.js';
import { idSlices, StoppedPartWay } from '../store/admin.js';
import { BUSY_TIMEOUT_MS, cannotWrite, openConnection, readOnlyDirectory, refuseForeignWal, type Sqlite } from '../store/db.js';
import { appliedMigrations, isLockHeld, openReadOnly, overwriteFreedPages, pendingMigrations, refuseForeignDatabase, refuseNewerSchema } from '../store/maintenance.js';
import { escapeTerminalUnsafe } from '../terminal-unsafe.js';

export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

export interface GlobalOptions {
  config?: string;
  json?: boolean;
  /** Config keys given as flags (`--databasePath`, `--security.logAllEmails`, …), as `serve` takes them. */
  [key: string]: string | boolean | undefined;
}

/** The global options as the config loader's command-line flags (what `serve` passes on too). */
export function configFlags(options: GlobalOptions): string[] {
  const flags = options.config !== undefined ? ['--config', options.config] : [];
  for (const { path } of CONFIG_KEYS) {
    const value = options[path];
    if (typeof value === 'string') flags.push(`--${path}`, value);
    else if (value === true) flags.push(`--${path}`); // a boolean key given alone
  }
  return flags;
}

/** The keys the CLI's commands read; an error in another one is a warning to them (serve refuses it). */
export const CLI_READS: ReadonlySet<string> = new Set(['databasePath', 'emailsDir', 'batchDelay', 'retention.deliveredDays', 'security.logAllEmails']);

export function loadCliConfig(options: GlobalOptions, env: NodeJS.ProcessEnv): Config {
  const loaded = loadConfigFromSources(configFlags(options), env, CLI_READS);
  if (!loaded.ok) throw new CliError(loaded.message, 2);
  // Of the start's warnings, only these can change what a command reads (DATABASE_PAHT): as
  // Postfix's commands warn of an unused parameter in main.cf, on stderr.
  for (const warning of mistypedEnvNames(env)) process.stderr.write(`relayq: warning: ${warning}\n`);
  for (const error of loaded.unread) process.stderr.write(`relayq: warning: ${error} (this command does not read it; serve refuses it)\n`);
  return loaded.config;
}

/**
 * emailsDir for a command that writes or removes files there (`delete` removes a message's
 * export), as the server names its files there: the directory the kernel reaches, not the one the
 * path's text names, followed once; one it would not reach is an error, as at the server's start.
 * As root, that directory and its failed/ are checked before anything is opened.
 */
export function emailsDirOf(config: Config): string {
  try {
    return followedForUse(config.emailsDir, { inside: 'failed' });
  } catch (err) {
    throw new CliError(`cannot use emailsDir ${config.emailsDir}: ${(err as Error).message}`);
  }
}

/** Why the kernel would not follow `file`, in words. */
function notFollowed(file: string): string {
  try {
    followedPath(file, 'to-missing-too');
    return 'a name on its path is not a directory';
  } catch (err) {
    return (err as Error).message;
  }
}

/** The database file's stat: it must be there, and be a file. */
export function requireDatabaseFile(file: string): fs.Stats {
  const where = asGiven('databasePath', file);
  let stat: fs.Stats | undefined;
  try {
    stat = fs.statSync(file, { throwIfNoEntry: false });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // which name is a file: the walk along the path says
    if (code === 'ENOTDIR') throw new CliError(`cannot open database ${where}: ${notFollowed(file)}`);
    if (code !== 'EACCES') throw err;
    throw new CliError(`cannot open database ${where}: permission denied (this user may not look into a directory on its path); run the command as the relay's user`);
  }
  if (!stat) {
    // ls shows a link whose target is missing: say which is missing
    if (fs.lstatSync(file, { throwIfNoEntry: false })?.isSymbolicLink()) {
      throw new CliError(`no database at ${file}: it is a symbolic link to ${fs.readlinkSync(file)}, which does not exist`);
    }
    throw new CliError(`no database at ${where}; set databasePath in the config file, DATABASE_PATH, --databasePath or --config`);
  }
  // else SQLite says "disk I/O error", and sends the operator looking at the disk
  if (stat.isDirectory()) throw new CliError(`cannot open database ${file}: it is a directory (databasePath names the database file)`);
  // a FIFO would keep SQLite's open waiting for a writer
  if (!stat.isFile()) throw new CliError(`cannot open database ${file}: it is not a regular file`);
  // else SQLite says "unable to open database file"
  try {
    fs.closeSync(fs.openSync(file, 'r'));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EACCES') throw err;
    throw new CliError(`cannot open database ${file}: permission denied (owner uid ${stat.uid}, mode ${(stat.mode & 0o777).toString(8).padStart(4, '0')}); run the command as the relay's user`);
  }
  openingDatabase(file, () => refuseForeignWal(file));
  return stat;
}

/** `fn`, whose failure is one CLI line naming the database file. */
function openingDatabase<T>(file: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (err instanceof CliError) throw err;
    throw new CliError(`cannot open database ${file}: ${(err as Error).message}`, 1, { cause: err });
  }
}

const NO_SCHEMA = 'no schema: an empty database (start the server on it, or run `relayq migrate`)';

/**
 * Runs `fn` on a read-only connection: it never takes a lock the server's writers wait for.
 * The schema is not migrated; a file that is not a relayq database fails here with one line, and
 * so does one whose schema is older than this relayq (a table or column it reads is missing).
 * The applied migrations are not compared with this relayq's list: a read command still reads a
 * database one migration behind, or one a newer relayq migrated, as long as what it reads is there
 * (export-failed, which reads the newest tables, asks for the current schema).
 */
export async function withReader<T>(config: Config, fn: (sqlite: Sqlite) => T | Promise<T>): Promise<T> {
  const file = config.databasePath;
  refuseOthersPathsForCli(file);
  requireDatabaseFile(file);
  const sqlite = openingDatabase(file, () => openReadOnly(file));
  try {
    try {
      if (refuseForeignDatabase(sqlite).length === 0 || appliedMigrations(sqlite).length === 0) {
        throw new Error(NO_SCHEMA);
      }
    } catch (err) {
      throw new CliError(`cannot read database ${file}: ${(err as Error).message}${sideFileHint(err, file)}`);
    }
    try {
      return await fn(sqlite);
    } catch (err) {
      const message = (err as Error).message;
      if (/^no such (table|column)/.test(message)) {
        throw new CliError(`database ${file} needs migrations (${message}): ${migrationAdvice(file)}`);
      }
      throw err;
    }
  } finally {
    sqlite.close();
  }
}

/**
 * A reader of a database in WAL mode reads its -wal file and needs its -shm file, which it makes
 * when it is not there (a relay that stopped removed it): in a directory this user may not write,
 * SQLite says only "attempt to write a readonly database" (or, where no one may, "unable to open
 * database file"), and of a -wal it may not read "unable to open database file".
 */
function sideFileHint(err: unknown, file: string): string {
  const code = (err as { code?: unknown }).code;
  if (code !== 'SQLITE_READONLY_DIRECTORY' && code !== 'SQLITE_READONLY_CANTINIT' && code !== 'SQLITE_CANTOPEN') return '';
  const readOnly = readOnlyDirectory(file);
  if (readOnly) {
    const name = path.basename(file);
    return ` (to read a database in WAL mode SQLite needs ${name}-shm beside it, and ${readOnly} is on a read-only file system); copy ${name}, and its -wal if there is one, to another directory and read the copy`;
  }
  try {
    fs.closeSync(fs.openSync(`${file}-wal`, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK));
  } catch (walErr) {
    if ((walErr as NodeJS.ErrnoException).code === 'EACCES') return ` (this user may not read ${path.basename(file)}-wal); run the command as the relay's user`;
  }
  return ` (to read a database in WAL mode SQLite needs ${path.basename(file)}-shm beside it, and this user may not make it in ${path.dirname(path.resolve(file))}, or not write it); run the command as a user who may, such as the relay's`;
}

/**
 * Run as root, a command refuses its database where another user could lead it to other files
 * (refuseOthersPathsAsRoot), before anything there is opened (emailsDir: emailsDirOf). Also a
 * command that only reads: a reader makes the -shm file beside the database and SQLite gives it
 * the database's owner, and root would do that to a file of root's linked there by another name.
 * (Reading as that user instead would not do: a process that drops to a user is that user's to
 * signal, and SIGUSR1 opens Node's inspector on what root loaded.)
 */
export function refuseOthersPathsForCli(file: string): void {
  openingDatabase(file, () => refuseOthersPathsAsRoot([file]));
}

/**
 * Opens a read-write connection without migrating; a failure is one CLI line naming the file. It is
 * closed with `close()` alone, without the full (TRUNCATE) checkpoint the server makes when it
 * stops: that checkpoint blocks the server's writers while it runs, and checkpointing is its job.
 */
export function openWriterForCli(config: Config): Sqlite {
  const file = config.databasePath;
  return openingDatabase(file, () => {
    let sqlite: Sqlite;
    try {
      sqlite = openConnection(file);
    } catch (err) {
      // a database in rollback-journal mode (a restored backup) is switched to WAL at its open
      throw (err as { code?: unknown }).code === 'SQLITE_BUSY' ? lockedForCli(file) : err;
    }
    // as on the server's writer: content a command frees must not linger in the file
    if (!config.security.logAllEmails) overwriteFreedPages(sqlite);
    return sqlite;
  });
}

function lockedForCli(file: string): CliError {
  return new CliError(
    `database ${file} is locked: another process (the relay, a sqlite3 shell inside a transaction) held its write lock for more than ${BUSY_TIMEOUT_MS / 1000} s; nothing was changed, run the command again`,
  );
}

/**
 * Runs `fn` on a read-write connection of the store (synchronous=FULL, foreign keys on). Only
 * `serve` and `migrate` change the schema, so an older server never meets a newer schema
 * behind its back; a database that needs migrations is refused. Callers keep transactions
 * short: the server's commits wait for them.
 */
export async function withWriter<T>(config: Config, fn: (sqlite: Sqlite) => T | Promise<T>): Promise<T> {
  const file = config.databasePath;
  refuseOthersPathsForCli(file);
  // refused before the open, which would turn the empty file into a database (WAL mode, -wal, -shm)
  if (requireDatabaseFile(file).size === 0) throw new CliError(`cannot read database ${file}: ${NO_SCHEMA}`);
  const sqlite = openWriterForCli(config);
  try {
    requireCurrentSchema(sqlite, file);
    return await fn(sqlite);
  } catch (err) {
    // every write of these commands is one transaction: refused, it changed nothing (a retry
    // --failed stopped after a step says what it requeued before)
    if (err instanceof StoppedPartWay) throw err;
    const code = String((err as { code?: unknown }).code);
    if (code === 'SQLITE_BUSY') throw lockedForCli(file);
    // a file, -wal or -shm this user may not write (the open succeeds; the first write fails)
    if (code.startsWith('SQLITE_READONLY')) throw new CliError(`cannot write database ${file}: ${cannotWrite(err as Error, file).message}`);
    throw err;
  } finally {
    sqlite.close();
  }
}

/**
 * Runs `fn` in a write transaction of its own, one step of a command that changes many messages,
 * then waits as long as the step took (1-100 ms) before the next can begin. The relay's commits
 * that wait for the lock meanwhile try again after sleeps of up to 100 ms (SQLite's busy
 * handler): without the pause they would find the next step's transaction begun at nearly every
 * try, and a `250` or a delivery's outcome could wait past the busy timeout.
 */
export async function writeStep<T>(sqlite: Sqlite, fn: () => T): Promise<T> {
  const started = performance.now();
  const result = sqlite.transaction(fn).immediate();
  await new Promise((resolve) => setTimeout(resolve, Math.min(100, Math.max(1, performance.now() - started))));
  return result;
}

/**
 * Runs `each` on every id, in the order given, in writes of at most ADMIN_STEP ids (writeStep).
 * `results` are what the committed writes returned, one per id from the first. A write that fails
 * after earlier ones committed ends the walk, and `stopped` says where: the command says what
 * those did, as it would have at its end, then fails with it, so that it can be run again on the
 * rest. A first write that fails throws (nothing changed).
 */
export async function writeEachInSteps<R>(
  sqlite: Sqlite,
  ids: string[],
  each: (id: string) => R,
  notDone: string,
): Promise<{ results: R[]; stopped?: CliError }> {
  const results: R[] = [];
  for (const step of idSlices(ids)) {
    try {
      results.push(...(await writeStep(sqlite, () => step.map(each))));
    } catch (err) {
      if (results.length === 0) throw err;
      const message = `${(err as Error).message}; stopped at ${step[0]}: it and the ids after it were not ${notDone} (what was done before it is listed above)`;
      return { results, stopped: new CliError(message) };
    }
  }
  return { results };
}

/**
 * Refuses a database that needs migrations, or that a newer relayq migrated: the commands that
 * write, and export-failed, which reads the newest tables.
 */
export function requireCurrentSchema(sqlite: Sqlite, file: string): void {
  let applied: string[];
  try {
    applied = appliedMigrations(sqlite);
  } catch (err) {
    throw new CliError(`cannot read database ${file}: ${(err as Error).message}`);
  }
  try {
    refuseNewerSchema(applied, MIGRATION_NAMES);
  } catch (err) {
    throw new CliError(`database ${file}: ${(err as Error).message}`);
  }
  requireMigrated(applied, file);
}

/**
 * Every migration of this relayq applied (a newer relayq's may be there too): `relayq status`
 * reads counters that a pending migration would add, and would report them as 0.
 */
export function requireMigrated(applied: string[], file: string): void {
  const missing = pendingMigrations(applied);
  if (missing.length) throw new CliError(`database ${file} needs migrations ${missing.join(', ')}: ${migrationAdvice(file)}`);
}

/**
 * What brings a database's schema up to date: a relay that runs on it may be doing so right now.
 * A relayq older than the lock may run on it unseen, and could not store mail on the new schema.
 */
function migrationAdvice(file: string): string {
  return isLockHeld(file)
    ? 'a relayq runs on it: this version applies them as it starts (its store.migrated log line says when they are done), an older one does not (stop it, and start this version)'
    : 'stop any relayq running on it, then run `relayq migrate` or start the server';
}

/** A reason for stderr: each of its lines marked as relayq's. */
export function ourLines(text: string): string {
  return text
    .split('\n')
    .map((line) => `relayq: ${line}\n`)
    .join('');
}

/** JSON for scripts, with what a terminal would act on written as `\uXXXX`, as in the log. */
export function printJson(value: unknown): void {
  process.stdout.write(`${escapeTerminalUnsafe(JSON.stringify(value, null, 2))}\n`);
}

export function printText(text: string): void {
  process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
}
