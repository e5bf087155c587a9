// Online backup of the live database. `VACUUM INTO` copies one read snapshot (a WAL reader never
// blocks the server's writers), so the copy holds exactly the transactions committed before it
// started. The copy is written next to the target, fsynced, checked with integrity_check and
// only then renamed into place, so a crash or a bad copy never leaves a half file under FILE.
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { followedPath, physicalPath, refuseOthersPathsAsRoot } from '../root-guard.js';
import type { Sqlite } from './db.js';
import { appliedMigrations } from './maintenance.js';

export interface BackupResult {
  file: string;
  bytes: number;
  messages: number;
  /** Applied migrations, so a restore can be matched to a relayq version. */
  migrations: string[];
  integrity: 'ok';
  durationMs: number;
}

export class BackupError extends Error {}

/**
 * Copies the database behind `sqlite` (any connection, read-only is enough) to `target`.
 * Refuses to replace an existing file unless `overwrite`, and never replaces the database or one
 * of its own files, whatever name (a link, another path) the target gives it.
 */
export function backupDatabase(sqlite: Sqlite, target: string, options: { overwrite?: boolean } = {}): BackupResult {
  const started = Date.now();
  const file = checkTarget(target, sqlite.name, options.overwrite ?? false);
  const dir = path.dirname(file);

  const partial = `${file}.partial-${process.pid}`;
  removeLeftCopies(file);
  try {
    // the copy holds every message: readable by this user alone, as the database is (VACUUM INTO
    // takes an empty file)
    fs.writeFileSync(partial, '', { flag: 'wx', mode: 0o600 });
    // Building the copy's b-trees moves cells from page to page; without secure_delete the bytes
    // they leave behind stay in the copy's free space, a second copy of some messages that no
    // erasure reaches once the copy is restored (logAllEmails=false erases only what it frees).
    const secureDelete = sqlite.pragma('secure_delete', { simple: true });
    sqlite.pragma('secure_delete = ON');
    try {
      sqlite.prepare('VACUUM INTO ?').run(partial);
    } finally {
      sqlite.pragma(`secure_delete = ${secureDelete === 2 ? 'FAST' : Number(secureDelete)}`);
    }
    fsyncFile(partial);
    const checked = verifyBackup(partial);
    if (options.overwrite) {
      fs.renameSync(partial, file);
    } else {
      placeWithoutReplacing(partial, file, target);
    }
    fsyncFile(dir);
    return { file, bytes: fs.statSync(file).size, ...checked, durationMs: Date.now() - started };
  } catch (err) {
    fs.rmSync(partial, { force: true });
    fs.rmSync(`${partial}-journal`, { force: true });
    if (err instanceof BackupError) throw err;
    // a full disk says only "database or disk is full": name the copy, not the live database;
    // what else VACUUM INTO reports may be the live database's (a damaged page)
    const code = (err as NodeJS.ErrnoException).code;
    const writing = (err as NodeJS.ErrnoException).syscall !== undefined || code === 'SQLITE_FULL' || code === 'SQLITE_CANTOPEN';
    const what = writing ? `cannot write ${target}` : `copying ${sqlite.name} to ${target} failed`;
    throw new BackupError(`${what}: ${(err as Error).message}`, { cause: err });
  }
}

/** A copy left this long unchanged, by a process that does not run here, is no backup under way. */
const LEFT_COPY_AGE_MS = 60 * 60_000;

/**
 * The unfinished copies to `file` that backups killed before their end left beside it
 * (`<file>.partial-<pid>`, with the rollback journal of VACUUM INTO): up to the size of the
 * database each, on the disk that minFreeDiskMb may watch. One is another backup's, under way,
 * while its process runs or it changed in the last hour (its process may run where this one does
 * not see it: another container on the same volume). Removing them is a courtesy: what cannot be
 * removed stays, and the backup goes on.
 */
function removeLeftCopies(file: string): void {
  const dir = path.dirname(file);
  const prefix = `${path.basename(file)}.partial-`;
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return; // the copy itself reports the directory
  }
  for (const name of names) {
    const pid = name.startsWith(prefix) ? /^(\d+)(-journal)?$/.exec(name.slice(prefix.length))?.[1] : undefined;
    if (pid === undefined) continue;
    const left = path.join(dir, name);
    try {
      const own = Number(pid) === process.pid;
      if (own || (!processRuns(Number(pid)) && Date.now() - fs.lstatSync(left).mtimeMs >= LEFT_COPY_AGE_MS)) fs.rmSync(left, { force: true });
    } catch {
      // not ours to remove (another user's, a directory): it stays
    }
  }
}

function processRuns(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Gives the finished copy its name unless something took the name meanwhile (another backup),
 * where a rename would replace it: a hard link. On a file system without them (vfat, some network
 * shares) the name is looked at just before a rename: a backup to the same name starting in that
 * instant could be replaced, but `FILE` is never a copy cut short, as one written under that name
 * would be by a kill or a full disk.
 */
function placeWithoutReplacing(partial: string, file: string, target: string): void {
  const taken = () => new BackupError(`${target} already exists (use --force to replace it)`);
  try {
    fs.linkSync(partial, file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') throw taken();
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw err;
    if (fs.lstatSync(file, { throwIfNoEntry: false })) throw taken();
    fs.renameSync(partial, file);
    return;
  }
  fs.rmSync(partial);
}

/** The target as an absolute path, once it is known to be a place a backup may be written. */
function checkTarget(target: string, databaseFile: string, overwrite: boolean): string {
  if (target.endsWith('/') || target.endsWith(path.sep)) throw new BackupError(`${target} names a directory, not a file`);
  // where the kernel writes it: a `..` after a link is its target's parent (and nowhere, for a path
  // it would not follow: its text alone names another place). Followed once, and that is where
  // root's check looks and where the copy goes.
  let file: string;
  try {
    file = followedPath(target, 'to-missing-too');
  } catch (err) {
    throw new BackupError(`cannot follow ${target}: ${(err as Error).message}`);
  }
  try {
    refuseOthersPathsAsRoot([target, file]);
  } catch (err) {
    throw new BackupError((err as Error).message);
  }
  const dir = path.dirname(file);
  const dirStat = fs.statSync(dir, { throwIfNoEntry: false });
  if (!dirStat) throw new BackupError(`directory ${dir} does not exist`);
  if (!dirStat.isDirectory()) throw new BackupError(`${dir} is not a directory`);
  const existing = fs.statSync(file, { throwIfNoEntry: false });
  if (existing && !existing.isFile()) throw new BackupError(`${target} is not a regular file`);

  // the database, its WAL, shared memory, rollback journal, the relay's lock (lockDatabase) and
  // spool directory (beside the real path; an older relayq made it beside the path as configured),
  // by the path it was opened with and by its real path
  const bases = [...new Set([path.resolve(databaseFile), physicalPath(databaseFile)])];
  const own = bases.flatMap((db) => [db, ...['-wal', '-shm', '-journal', '-lock', '-spool'].map((suffix) => db + suffix)]);
  // `file` is physical already: its directory and itself past every link
  const names = [file];
  const sameFile = (other: string) => {
    const st = existing && fs.statSync(other, { throwIfNoEntry: false });
    return st !== undefined && st.dev === existing?.dev && st.ino === existing.ino;
  };
  const inSpool = (name: string) => bases.some((db) => name.startsWith(`${db}-spool${path.sep}`));
  if (own.some((f) => names.includes(f) || sameFile(f)) || names.some(inSpool)) {
    throw new BackupError(`${target} is the database or one of its files (${path.basename(databaseFile)}, -wal, -shm, -journal, -lock, or in -spool)`);
  }
  if (existing && !overwrite) throw new BackupError(`${target} already exists (use --force to replace it)`);
  return file;
}

/** Opens a backup read-only and proves it is a usable relayq database. */
function verifyBackup(file: string): { messages: number; migrations: string[]; integrity: 'ok' } {
  const copy = new Database(file, { readonly: true, fileMustExist: true });
  try {
    const problems = (copy.pragma('integrity_check') as Array<{ integrity_check: string }>).map((r) => r.integrity_check);
    if (problems.length !== 1 || problems[0] !== 'ok') {
      throw new BackupError(`integrity_check failed on the copy: ${problems.slice(0, 3).join('; ')}`);
    }
    const messages = (copy.prepare('SELECT COUNT(*) AS n FROM messages').get() as { n: number }).n;
    return { messages, migrations: appliedMigrations(copy), integrity: 'ok' };
  } finally {
    copy.close();
  }
}

function fsyncFile(file: string): void {
  const fd = fs.openSync(file, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
