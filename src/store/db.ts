// Opens the one SQLite file: WAL journal, synchronous=FULL (a commit is fsynced before it
// returns), a busy timeout so the CLI and the server can share the file, and the pending
// migrations applied before anything else touches the schema. Nothing in the server's process
// may open and close the database, -wal or -shm file outside SQLite (fs.copyFile, a stat through
// open): closing any descriptor of a file drops every POSIX lock the process holds on it, and
// another process could then take the WAL for its own and delete it under the relay.
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { MIGRATION_NAMES } from '../../migrations/names.js';
import { makeDirectory } from '../make-dir.js';
import { physicalPath } from '../root-guard.js';
import { appliedMigrations, lockedTooLong, overwriteFreedPages, pendingMigrations, refuseForeignDatabase, refuseNewerSchema, requireWritable } from './maintenance.js';

export type Sqlite = Database.Database;

export interface Store {
  sqlite: Sqlite;
  /** The migrations this open applied, and how long they took (ms). */
  migrated: { names: string[]; durationMs: number };
  /**
   * Checkpoints the WAL into the database file, without waiting for a reader, and closes. Resolves
   * with why frames stayed out of the database file, if some did: a reader (sqlite3, the CLI, a
   * backup) still reading older frames keeps those, as does a checkpoint that failed (a full disk,
   * an I/O error); the next open checkpoints them. (A reader of the newest frames keeps only the
   * WAL file from being truncated.)
   */
  close(): Promise<WalKept | undefined>;
}

/** Why a close left frames in the WAL: a reader of older frames, or a checkpoint that failed. */
export type WalKept = { cause: 'reader' } | { cause: 'error'; err: string };

export interface OpenOptions {
  /**
   * Overwrite the pages this connection frees with zeros (logAllEmails=false: erased content must
   * not linger in the file), from the migrations on: they rewrite rows that hold message content.
   */
  secureDelete?: boolean;
  /** Called with the pending migrations' names before they run (they may take long on a large store). */
  onMigrating?: (names: string[]) => void;
}

/** How long a connection waits for another one's write lock before SQLITE_BUSY. */
export const BUSY_TIMEOUT_MS = 5000;

/** What SQLITE_BUSY ("database is locked") means on a relay's database, for its errors and log lines. */
export const LOCK_HELD_TOO_LONG = `another process (a sqlite3 shell inside a transaction, a relayq command) held its write lock for more than ${BUSY_TIMEOUT_MS / 1000} s`;

/**
 * A better-sqlite3 connection with relayq's pragmas; every connection to the file uses this. A
 * database it creates is readable by the relay's user alone (0600, in a directory made 0700 if it
 * makes one), like Postfix's queue: it holds every message. SQLite gives its -wal and -shm files
 * the database file's mode.
 */
export function openConnection(file: string): Sqlite {
  // through a symbolic link to a file not made yet (a first start on a mounted volume): made there
  createPrivateFile(realDatabasePath(file));
  refuseHardLinks(file);
  let sqlite: Sqlite | undefined;
  try {
    sqlite = new Database(file);
    refuseForeignDatabase(sqlite);
    sqlite.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    enterWalMode(sqlite);
    sqlite.pragma('synchronous = FULL');
    sqlite.pragma('foreign_keys = ON');
  } catch (err) {
    sqlite?.close();
    // a directory where the -wal and -shm files cannot be made (a read-only file system): SQLite
    // says only "unable to open database file"
    throw /^SQLITE_(CANTOPEN|READONLY)/.test(String((err as { code?: unknown }).code)) ? cannotWrite(err as Error, file) : err;
  }
  return sqlite;
}

/**
 * Into WAL mode (a no-op once the file is in it). Switching takes the database's exclusive lock,
 * and while another connection holds the write lock of a file still in rollback-journal mode (a
 * new file, a restored backup) SQLite refuses at once instead of waiting out busy_timeout: the
 * switch is tried again until then, as any write would wait. Synchronous, as the open is.
 */
function enterWalMode(sqlite: Sqlite): void {
  const deadline = performance.now() + BUSY_TIMEOUT_MS;
  for (;;) {
    try {
      sqlite.pragma('journal_mode = WAL');
      return;
    } catch (err) {
      if ((err as { code?: unknown }).code !== 'SQLITE_BUSY' || performance.now() >= deadline) throw err;
      Atomics.wait(PAUSE, 0, 0, WAL_SWITCH_RETRY_MS);
    }
  }
}

const WAL_SWITCH_RETRY_MS = 50;
const PAUSE = new Int32Array(new SharedArrayBuffer(4));

/** A database file, or its -wal and -shm files, that this process may not write. */
export function cannotWrite(err: Error, file: string): Error {
  const readOnly = readOnlyDirectory(file);
  const why = readOnly ? `${readOnly} is on a read-only file system` : "the relay's user must be able to write the file, its -wal and -shm files and its directory";
  return new Error(`cannot write to it (${err.message}): ${why}`, { cause: err });
}

/**
 * The database's directory when its file system is mounted read-only (as after an ext4
 * errors=remount-ro), which SQLite does not tell from a lack of permission; else undefined.
 */
export function readOnlyDirectory(file: string): string | undefined {
  const dir = path.dirname(path.resolve(realDatabasePath(file)));
  try {
    fs.accessSync(dir, fs.constants.W_OK);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EROFS') return dir;
  }
  return undefined;
}

/**
 * SQLite keeps a database's WAL and shared memory beside the name it was opened by: through a
 * second name (a hard link) the same file would have a second WAL, and writes through either
 * name would overwrite the other's, acknowledged mail included. The relay's lock is kept beside
 * the name too (lockDatabase), so it would not refuse a second relay either.
 */
export function refuseHardLinks(file: string): void {
  const names = fs.statSync(file, { throwIfNoEntry: false })?.nlink ?? 0;
  if (names > 1) {
    throw new Error(
      `${file} has ${names} hard links: SQLite keeps a WAL beside each name, so writes through one name would overwrite those through another; remove the other names (find "$(stat -c %m ${shellWord(file)})" -xdev -samefile ${shellWord(file)} lists them)`,
    );
  }
}

/**
 * The first `length` bytes of a database file (fewer in a shorter file), or undefined when it is
 * not there or not readable: opening it says why. Only before this process opens the database:
 * closing a descriptor of the file would drop SQLite's locks on it.
 */
export function databaseHead(file: string, length: number): Buffer | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return undefined;
  }
  try {
    const head = Buffer.alloc(length);
    return head.subarray(0, fs.readSync(fd, head, 0, length, 0));
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A -wal file beside a database in rollback-journal mode is another database's: a backup
 * (`relayq backup` writes one in that mode) copied over a database whose -wal a crash left behind.
 * SQLite would read that WAL's pages into the file, and on the first checkpoint write them there
 * for good. Reads the database file's header, so it runs before this process opens the database.
 */
export function refuseForeignWal(file: string): void {
  const real = realDatabasePath(file);
  if (!fs.statSync(`${real}-wal`, { throwIfNoEntry: false })?.size) return;
  const header = databaseHead(real, 20);
  if (!header || header.length < 20) return;
  // bytes 18 and 19: the file format versions to write and to read, 1 for rollback, 2 for WAL
  if (header[18] !== 1 || header[19] !== 1) return;
  throw new Error(
    `${real}-wal does not belong to ${file}: the database is in rollback-journal mode, as a backup is, and SQLite would read another database's pages from that WAL into it. If a backup was restored here, remove ${shellWord(`${real}-wal`)} and ${shellWord(`${real}-shm`)} (see Backup and restore in the README)`,
  );
}

/** `text` as one word of a POSIX shell command line: single-quoted unless it needs no quotes. */
export function shellWord(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", `'\\''`)}'`;
}

/**
 * The file a database path names, through symbolic links (a `..` after one taken as the kernel
 * takes it), also to a file not made yet. Its -wal, -shm, -lock and -spool are beside this file.
 */
export function realDatabasePath(file: string): string {
  return physicalPath(file);
}

/** Creates `file` empty, readable by the relay's user alone, unless it is there already; whether it made it. */
export function createPrivateFile(file: string): boolean {
  makeDirectory(path.dirname(path.resolve(file)), 0o700);
  try {
    fs.writeFileSync(file, '', { flag: 'wx', mode: 0o600 });
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    // else SQLite says only "unable to open database file" (a FIFO: "disk I/O error")
    const stat = fs.statSync(file);
    if (stat.isDirectory()) throw new Error(`${file} is a directory`);
    if (!stat.isFile()) throw new Error(`${file} is not a regular file`);
    return false;
  }
}

/** The server's connection: pending migrations applied, and the file checked to be writable. */
export async function openStore(file: string, options: OpenOptions = {}): Promise<Store> {
  let sqlite: Sqlite;
  try {
    sqlite = openConnection(file);
  } catch (err) {
    throw lockedTooLong(err as Error) ?? err;
  }
  if (options.secureDelete) overwriteFreedPages(sqlite);
  const migrated = { names: [] as string[], durationMs: 0 };
  const started = performance.now();
  try {
    migrated.names = await migratePending(sqlite, options.onMigrating);
    migrated.durationMs = Math.round(performance.now() - started);
    // Into the database file at once: a new database's schema would otherwise stay in the WAL
    // until a thousand pages had been written, and a -wal file removed after a crash (against
    // advice) would leave a file that looks new and is silently migrated again, empty.
    if (migrated.names.length > 0) sqlite.pragma('wal_checkpoint(PASSIVE)');
    requireWritable(sqlite);
  } catch (err) {
    sqlite.close();
    throw err;
  }
  let closed = false;
  return {
    sqlite,
    migrated,
    async close() {
      if (closed) return undefined;
      closed = true;
      let kept: WalKept | undefined;
      try {
        // a reader may read for as long as it likes: a stop does not wait for it (busy_timeout 0)
        sqlite.pragma('busy_timeout = 0');
        const [result] = sqlite.pragma('wal_checkpoint(TRUNCATE)') as Array<{ busy: number; log: number; checkpointed: number }>;
        if (result !== undefined && result.busy !== 0 && result.checkpointed !== result.log) {
          kept = { cause: 'reader' };
        }
      } catch (err) {
        kept = { cause: 'error', err: (err as Error).message };
      }
      sqlite.close();
      return kept;
    },
  };
}

/**
 * Applies the pending migrations and names them. The migrator, and the query builder it runs on,
 * load only when one is pending: most starts have none.
 */
async function migratePending(sqlite: Sqlite, onMigrating?: (names: string[]) => void): Promise<string[]> {
  let applied: string[];
  try {
    applied = appliedMigrations(sqlite);
  } catch (err) {
    if (!/^no such table/.test((err as Error).message)) throw err;
    applied = []; // a new database
  }
  refuseNewerSchema(applied, MIGRATION_NAMES);
  const pending = pendingMigrations(applied);
  if (pending.length === 0) return [];
  onMigrating?.(pending);
  const { kyselyFor, migrateToLatest } = await import('./migrate.js');
  try {
    return await migrateToLatest(kyselyFor(sqlite));
  } catch (err) {
    throw lockedTooLong(err as Error) ?? err;
  }
}
