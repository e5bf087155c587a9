// Crash-safe file writes for local delivery and the failed-mail export: write a temp file in the
// target directory, fsync it, rename it over the target, fsync the directory. A reader sees the
// old file or the complete new one, never a torn one, and the rename survives a power cut.
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { makeDirectory } from '../make-dir.js';

/**
 * The mode of the directories relayq makes for message files (emailsDir, emailsDir/failed, an
 * export target): only relayq's user writes there, under any umask (mkdir applies the umask on
 * top, which can only take permissions away).
 */
export const EMAILS_DIR_MODE = 0o750;

/** The temp files writeFileAtomic makes: `.<target name>.<12 hex digits>.tmp`. */
const TEMP_FILE = /^\..+\.[0-9a-f]{12}\.tmp$/;

/** `data` may come in pieces (an iterable), written one after the other. */
export async function writeFileAtomic(target: string, data: Uint8Array | string | Iterable<string>): Promise<void> {
  const dir = path.dirname(target);
  // Dot-prefixed and unique, so a concurrent writer or a directory listing never takes it for
  // a finished file; a crash leaves at most a stray temp file behind.
  const temp = path.join(dir, `.${path.basename(target)}.${crypto.randomBytes(6).toString('hex')}.tmp`);
  const handle = await fs.open(temp, 'wx', 0o640).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw err;
    // the directory is gone (made at the start; an operator may have removed it since)
    makeDirectory(dir, EMAILS_DIR_MODE);
    return fs.open(temp, 'wx', 0o640);
  });
  try {
    // each writeFile writes on from where the last one ended
    if (typeof data === 'string' || data instanceof Uint8Array) await handle.writeFile(data);
    else for (const piece of data) await handle.writeFile(piece);
    await handle.sync();
  } catch (err) {
    await handle.close().catch(() => {});
    await fs.rm(temp, { force: true });
    throw err;
  }
  await handle.close();
  try {
    await fs.rename(temp, target);
  } catch (err) {
    await fs.rm(temp, { force: true });
    throw err;
  }
  await syncDirectory(dir);
}

/** What a file system or platform that cannot fsync a directory says; the rename is still atomic there. */
const CANNOT_SYNC_DIRECTORY = new Set(['EINVAL', 'ENOTSUP', 'EISDIR', 'EPERM']);

/**
 * Makes a rename in `dir` durable. Any other error (no file descriptor left, EMFILE) is thrown:
 * a local delivery is then deferred, not recorded as delivered (and its database copy erased)
 * while a power cut could still undo the rename.
 */
export async function syncDirectory(dir: string): Promise<void> {
  let handle: fs.FileHandle | undefined;
  try {
    handle = await fs.open(dir, 'r');
    await handle.sync();
  } catch (err) {
    if (!CANNOT_SYNC_DIRECTORY.has((err as NodeJS.ErrnoException).code ?? '')) throw err;
  } finally {
    await handle?.close().catch(() => {});
  }
}

/**
 * Removes the temp files in `dir` last written before `before` (ms since the epoch), i.e. those
 * a crash left, not those of a write in progress elsewhere or in this process (written later).
 * Asynchronous: emailsDir holds every local delivery, and the server is serving meanwhile.
 * Returns their names; a missing directory has none.
 */
export async function removeStrayTempFiles(dir: string, before: number): Promise<string[]> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const removed: string[] = [];
  for (const name of names.filter((n) => TEMP_FILE.test(n))) {
    const file = path.join(dir, name);
    const stat = await fs.stat(file).catch(() => undefined);
    if (!stat || stat.mtimeMs >= before) continue;
    await fs.rm(file, { force: true });
    removed.push(name);
  }
  return removed;
}
