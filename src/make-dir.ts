// `mkdir -p` for the directories relayq makes. Not Node's recursive mkdir: for a path under /proc
// (procfs answers ENOENT for a child it cannot make) that makes the parent, finds it there, and
// tries the child again, forever, at full CPU, so a start with such a path would never end.
import fs from 'node:fs';
import path from 'node:path';

/**
 * Makes `dir` and its missing parents with `mode`; a directory that is there already is fine.
 * Returns the directories it made, outermost first (see removeMade). Fails with ENOTDIR for a file
 * in its place or on its path (Node's mkdir says EEXIST, "file already exists", for the first),
 * ENOENT for a link that points nowhere, and ENOENT, at once, under /proc.
 */
export function makeDirectory(dir: string, mode: number): string[] {
  let failure = mkdirFailure(dir, mode);
  const parent = path.dirname(dir);
  const made: string[] = [];
  if (failure?.code === 'ENOENT' && parent !== dir) {
    try {
      made.push(...makeDirectory(parent, mode));
    } catch (err) {
      // a parent that is there but no directory (a link that points nowhere): the child's error says it
      if ((err as NodeJS.ErrnoException).syscall === 'mkdir' && (err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    // once only: a child that is still not found with its parent there never will be
    failure = mkdirFailure(dir, mode);
  }
  // statSync throws ENOENT for a link that points nowhere
  if (failure?.code === 'EEXIST') {
    if (fs.statSync(dir).isDirectory()) return made;
    throw Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${dir}'`), { code: 'ENOTDIR', errno: -20, syscall: 'mkdir', path: dir });
  }
  if (failure) throw failure;
  return [...made, dir];
}

/**
 * Takes back what makeDirectory made, innermost first, as far as it is still empty: a start that
 * is refused after it made emailsDir leaves nothing behind. A directory something was put in since
 * stays, with its parents.
 */
export function removeMade(made: readonly string[]): void {
  for (const dir of [...made].reverse()) {
    try {
      fs.rmdirSync(dir);
    } catch {
      return;
    }
  }
}

function mkdirFailure(dir: string, mode: number): NodeJS.ErrnoException | undefined {
  try {
    fs.mkdirSync(dir, { mode });
    return undefined;
  } catch (err) {
    return err as NodeJS.ErrnoException;
  }
}
