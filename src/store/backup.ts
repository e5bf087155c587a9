// Online backup of the live database. `VACUUM INTO` copies one read snapshot (a WAL reader never
// blocks the server's writers), so the copy holds exactly the transactions committed before it
// started. The copy is written next to the target, fsynced, checked with integrity_check and
// only then renamed into place, so a crash or a bad copy never leaves a half file under FILE.
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import type { Sqlite } from './db.js';

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
 * Refuses to replace an existing file unless `overwrite`.
 */
export function backupDatabase(sqlite: Sqlite, target: string, options: { overwrite?: boolean; now?: () => number } = {}): BackupResult {
  const now = options.now ?? Date.now;
  const started = now();
  const file = path.resolve(target);
  const dir = path.dirname(file);
  if (!fs.existsSync(dir)) throw new BackupError(`directory ${dir} does not exist`);
  if (fs.existsSync(file)) {
    if (!options.overwrite) throw new BackupError(`${target} already exists (use --force to replace it)`);
    if (!fs.statSync(file).isFile()) throw new BackupError(`${target} is not a regular file`);
  }
  if (path.resolve(sqlite.name) === file) throw new BackupError('the backup file must not be the database itself');

  const partial = `${file}.partial-${process.pid}`;
  fs.rmSync(partial, { force: true });
  try {
    sqlite.prepare('VACUUM INTO ?').run(partial);
    fsyncFile(partial);
    const checked = verifyBackup(partial);
    fs.renameSync(partial, file);
    fsyncFile(dir);
    return { file, bytes: fs.statSync(file).size, ...checked, durationMs: now() - started };
  } catch (err) {
    fs.rmSync(partial, { force: true });
    throw err;
  }
}

/** Opens a backup read-only and proves it is a usable relayq database. */
export function verifyBackup(file: string): { messages: number; migrations: string[]; integrity: 'ok' } {
  const copy = new Database(file, { readonly: true, fileMustExist: true });
  try {
    const problems = (copy.pragma('integrity_check') as Array<{ integrity_check: string }>).map((r) => r.integrity_check);
    if (problems.length !== 1 || problems[0] !== 'ok') {
      throw new BackupError(`integrity_check failed on the copy: ${problems.slice(0, 3).join('; ')}`);
    }
    const messages = (copy.prepare('SELECT COUNT(*) AS n FROM messages').get() as { n: number }).n;
    const migrations = (copy.prepare('SELECT name FROM schema_migrations ORDER BY name').all() as Array<{ name: string }>).map((r) => r.name);
    return { messages, migrations, integrity: 'ok' };
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
