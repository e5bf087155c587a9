// Housekeeping of the SQLite files, below the queue's own tables: keeping the WAL bounded, the
// files' sizes, refusing another program's database, the schema version, a light read-only
// connection for tools, and overwriting freed pages for logAllEmails=false. SQLite checkpoints
// the WAL by itself after a commit once it holds 1000 pages (about 4 MB), and new commits then
// reuse the file from its start; the file only grows past that while another connection (the
// CLI, a backup, a sqlite3 shell) pins an old snapshot. journal_size_limit truncates it back
// once such a reader is gone.
import fs from 'node:fs';
import Database from 'better-sqlite3';
import { MIGRATION_NAMES } from '../../migrations/names.js';
import { refuseOthersPathsAsRoot } from '../root-guard.js';
import { BUSY_TIMEOUT_MS, cannotWrite, createPrivateFile, databaseHead, LOCK_HELD_TOO_LONG, realDatabasePath, refuseForeignWal, refuseHardLinks, type Sqlite } from './db.js';

/** Size the -wal file is cut back to after a checkpoint that emptied it. */
const WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024;

export function limitWalSize(sqlite: Sqlite): void {
  sqlite.pragma(`journal_size_limit = ${WAL_SIZE_LIMIT_BYTES}`);
}

/**
 * One relay per database, as one Postfix master per queue: a relay holds an exclusive SQLite lock
 * on `<database>-lock`, beside the database's real file (two paths to it, a symbolic link, share
 * one lock), for as long as it runs; the kernel lets go of it when the process dies, kill -9
 * included. A second relay on the database would empty the first one's spool directory under its
 * sessions; it is refused before it opens the database. `relayq migrate` takes the lock too (a
 * schema changed under a running relay); the other CLI commands work beside a running relay.
 */
export function lockDatabase(databasePath: string): DatabaseLock {
  const real = realDatabasePath(databasePath);
  // not a lock file beside a directory: the open of the database would fail anyway (a FIFO with
  // SQLite's "disk I/O error")
  const stat = fs.statSync(real, { throwIfNoEntry: false });
  if (stat?.isDirectory()) throw new Error(`${databasePath} is a directory`);
  if (stat && !stat.isFile()) throw new Error(`${databasePath} is not a regular file`);
  refuseHardLinks(real);
  const file = `${real}-lock`;
  // the spool too, which a start empties: its own checks (spool.ts) look at the entry alone
  refuseOthersPathsAsRoot([databasePath, file, `${real}-spool`]);
  // a file that is no SQLite database (a mistyped path) gets no lock file beside it: the open
  // would refuse it, in SQLite's words, anyway
  const head = stat && stat.size > 0 ? databaseHead(real, SQLITE_HEADER.length) : undefined;
  if (head && !head.equals(SQLITE_HEADER)) throw new Error('file is not a database');
  let lock: Sqlite | undefined;
  let made = false;
  try {
    made = createPrivateFile(file);
    // SQLite opens a file it may not write read-only, without a word, and a read-only connection's
    // BEGIN EXCLUSIVE on the empty lock file locks nothing: a second relay would run beside this one
    fs.closeSync(fs.openSync(file, 'r+'));
    lock = new Database(file);
    // a moment: a CLI command's look at the lock (isLockHeld) holds it as long as that
    lock.pragma('busy_timeout = 250');
    lock.pragma('journal_mode = MEMORY'); // no -lock-journal file beside it
    lock.exec('BEGIN EXCLUSIVE');
  } catch (err) {
    lock?.close();
    const code = String((err as { code?: unknown }).code);
    if (code === 'SQLITE_BUSY') {
      const running = `another relayq is running on this database: ${file} is locked (on a network file system without locks it always is)`;
      throw Object.assign(new Error(running), { code: 'SQLITE_BUSY' });
    }
    // a read-only file system, a directory or a lock file of another user (an older build run as root)
    const hint = /^(EACCES|EPERM|EROFS|SQLITE_CANTOPEN|SQLITE_READONLY)/.test(code) ? ": the relay's user must be able to write it and the database's directory" : '';
    throw new Error(`${file}: ${(err as Error).message}${hint}`, { cause: err });
  }
  const held = lock;
  try {
    refuseForeignWal(real);
  } catch (err) {
    held.close();
    throw err;
  }
  return {
    release: () => held.close(),
    releaseAfter: (err) => {
      held.close();
      // no relayq runs on it: nothing to keep a lock file for, nor a race to lose with one
      const foreign = err instanceof ForeignDatabase || (err instanceof Error && err.cause instanceof ForeignDatabase);
      if (made && foreign) fs.rmSync(file, { force: true });
    },
  };
}

/** The lock a relay (or `relayq migrate`) holds on its database from before its open to its stop. */
export interface DatabaseLock {
  release(): void;
  /** Releases it after the open failed with `err` (or with what caused it): another program's file is left with no lock file beside it. */
  releaseAfter(err: unknown): void;
}

/** A file of another program's tables (refuseForeignDatabase). */
export class ForeignDatabase extends Error {}

/** The 16 bytes every SQLite database file starts with. */
const SQLITE_HEADER = Buffer.from('SQLite format 3\0', 'latin1');

/** Whether a relay (or `relayq migrate`) holds the database's lock now; nothing is created to find out. */
export function isLockHeld(databasePath: string): boolean {
  const file = `${realDatabasePath(databasePath)}-lock`;
  let lock: Sqlite | undefined;
  try {
    lock = new Database(file, { fileMustExist: true });
    lock.pragma('busy_timeout = 0');
    lock.exec('BEGIN EXCLUSIVE');
    lock.exec('ROLLBACK');
    return false;
  } catch (err) {
    return (err as { code?: unknown }).code === 'SQLITE_BUSY';
  } finally {
    lock?.close();
  }
}

/** Bytes of the database file and of its -wal file (0 when absent), beside the real file when databasePath is a link. */
export function databaseFileSizes(databasePath: string): { database: number; wal: number } {
  const file = realDatabasePath(databasePath);
  const size = (file: string) => {
    try {
      return fs.statSync(file).size;
    } catch {
      return 0;
    }
  };
  return { database: size(file), wal: size(`${file}-wal`) };
}

/**
 * relayq creates its tables in an empty file only: a file of another program's tables (a wrong
 * databasePath) is refused before anything, even the journal mode, is changed in it. Returns the
 * file's tables (none: an empty database).
 */
export function refuseForeignDatabase(sqlite: Sqlite): string[] {
  const names = (
    sqlite.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 7) <> 'sqlite_' ORDER BY name").all() as Array<{
      name: string;
    }>
  ).map((r) => r.name);
  if (names.length > 0 && !names.includes('schema_migrations')) {
    const shown = names.slice(0, 5).join(', ') + (names.length > 5 ? ', …' : '');
    throw new ForeignDatabase(`not a relayq database: it holds tables relayq did not create (${shown}) and no schema_migrations`);
  }
  return names;
}

/**
 * Migrations that a database may have recorded under an earlier name: the first relayq numbered
 * the metrics migration 003, with the same statements as 002_metrics now.
 */
const RENAMED_MIGRATIONS: ReadonlyMap<string, string> = new Map([['003_metrics', '002_metrics']]);

/** A recorded migration's name now. */
export function currentMigrationName(recorded: string): string {
  return RENAMED_MIGRATIONS.get(recorded) ?? recorded;
}

/**
 * Names of the migrations applied to this database (an earlier name as it is now: migrating
 * records it so); throws on a file that is not relayq's.
 */
export function appliedMigrations(sqlite: Sqlite): string[] {
  const recorded = sqlite.prepare('SELECT name FROM schema_migrations ORDER BY name').all() as Array<{ name: string }>;
  return recorded.map((r) => currentMigrationName(r.name)).sort();
}

/** This relayq's migrations that `applied` lacks, in order. */
export function pendingMigrations(applied: readonly string[]): string[] {
  return MIGRATION_NAMES.filter((name) => !applied.includes(name));
}

/**
 * SQLite opens a database file it may not write read-only, without a word: a relay on it would
 * answer every message 451. A write transaction that changes nothing finds it at the start.
 */
export function requireWritable(sqlite: Sqlite): void {
  try {
    sqlite.transaction(() => sqlite.prepare('DELETE FROM schema_migrations WHERE 0').run()).immediate();
  } catch (err) {
    throw lockedTooLong(err as Error) ?? cannotWrite(err as Error, sqlite.name);
  }
}

/** The file can be written, but another connection kept its write lock past the busy timeout: said so. */
export function lockedTooLong(err: Error): Error | undefined {
  if ((err as { code?: unknown }).code !== 'SQLITE_BUSY') return undefined;
  return new Error(`it is locked: ${LOCK_HELD_TOO_LONG}; start again once it is done`, { cause: err });
}

/** Refuses a database a newer relayq migrated: this version would write to a schema it does not know. */
export function refuseNewerSchema(applied: readonly string[], known: readonly string[]): void {
  const unknown = applied.filter((name) => !known.includes(name));
  if (unknown.length > 0) {
    throw new Error(`it was migrated by a newer relayq (${unknown.join(', ')}): run that version, or restore the backup taken before the upgrade`);
  }
}

/**
 * A read-only connection for tools (the CLI's read commands, backups). It never takes a lock
 * the server's writers wait for, never creates the file, and loads no query builder or
 * migrations, so a command starts quickly.
 */
export function openReadOnly(file: string): Sqlite {
  refuseHardLinks(file);
  const sqlite = new Database(file, { readonly: true, fileMustExist: true });
  sqlite.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  return sqlite;
}

/**
 * With security.logAllEmails=false the content of delivered mail is erased (its message_bodies row
 * is deleted). Without secure_delete the freed pages would keep the old bytes in the file until
 * reused; with it, SQLite overwrites them with zeros as it frees them.
 */
export function overwriteFreedPages(sqlite: Sqlite): void {
  sqlite.pragma('secure_delete = ON');
}
