// Run as root, relayq works only with files and directories that no other user may change, nor
// any directory above them. In one that another user may write (the relay's user owns its data
// directory), or whose parent it may write (it could put a link in the directory's place), that
// user could lead relayq where it makes, opens or removes files (the lock file, the spool, the
// database itself and its -wal, -shm and -journal files, the exports), and root would follow to
// any file of the machine; a config file of theirs could choose those paths. As nobody else may
// change what was checked, it is checked once, before relayq opens anything there.
import fs from 'node:fs';
import path from 'node:path';

/**
 * As root, refuses each path unless every directory and link the kernel passes on the way to it
 * (every link's target in its turn) is root's alone, and the directory relayq makes its files in
 * is not shared: the directory that holds the path (the nearest one that exists) or the path
 * itself when it is a directory. A sticky directory (/tmp) keeps others from renaming or removing
 * root's entries, so it may be on the way; but where relayq makes its files, others could have made
 * a name first (one SQLite opens by name, a link). What is not made yet is made by relayq, as root's.
 */
export function refuseOthersPathsAsRoot(paths: readonly string[]): void {
  if (process.getuid?.() !== 0) return;
  for (const given of paths) refuseShared(holder(refuseOthersOnTheWay(given)));
}

/**
 * As root, for a path this process is about to use: follows it once (followedPath) and refuses
 * both the path and where it leads (`inside` it, when files are made in a directory of it) unless
 * they are root's alone. What is then used is the path returned, the one that was checked: the
 * path's text, or a second walk along it, could be led elsewhere by another user in between.
 */
export function followedForUse(given: string, options: { links?: 'to-existing' | 'to-missing-too'; inside?: string } = {}): string {
  const reached = followedPath(given, options.links);
  refuseOthersPathsAsRoot([given, options.inside === undefined ? reached : path.join(reached, options.inside)]);
  return reached;
}

/** Every directory and link on the way to `given` judged (refuseOthersPlace); the real path it reaches. */
function refuseOthersOnTheWay(given: string): string {
  const places = new Set<string>();
  const real = walk(absolute(given), places, { followed: 0 });
  for (const place of places) refuseOthersPlace(place);
  return real;
}

/**
 * Reads a file of settings (the config file, the TLS certificate and key). As root, only one that
 * is root's alone, as is every directory and link on the way to it: its owner could choose the
 * paths root writes, or the identity it serves, or put a FIFO there that holds the start. The owner
 * is that of what was opened, so a file made between the look and the open is seen too; a pipe
 * (`--config <(…)`) is its writer's, root's shell's. Returns the bytes and the stat of what was read
 * (whoever runs it), for any later judgement of the file to be of the same one.
 */
export function readRootsFile(file: string, uses = 'would take paths and settings from it'): { bytes: Buffer; stat: fs.Stats } {
  const asRoot = process.getuid?.() === 0;
  const refuse = (stat: fs.Stats) => {
    if (!asRoot) return;
    refuseOthersOwner(file, stat, uses);
    // another name of a file of root's whose content another user chose (a spool file)
    if (stat.isFile() && stat.nlink > 1) throw new Error(`${file} has ${stat.nlink} hard links: as root, relayq reads a file it takes settings from by one name only`);
  };
  if (asRoot) {
    refuseOthersOnTheWay(file);
    // before the open too: a FIFO of another user's nobody writes to would hold the open for ever
    const seen = fs.statSync(file, { throwIfNoEntry: false });
    if (seen) refuse(seen);
  }
  const fd = fs.openSync(file, 'r');
  try {
    const stat = fs.fstatSync(fd);
    refuse(stat);
    return { bytes: fs.readFileSync(fd), stat };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * The path the kernel reaches for `given`: absolute, through every link, with a `..` after a link
 * taken as the parent of the link's target (path.resolve takes it by its text); its last names
 * may not exist yet. `given`, absolute, where it cannot be followed (a loop, a directory this user
 * may not look into): opening it says why.
 */
export function physicalPath(given: string): string {
  try {
    return walk(absolute(given), new Set(), { followed: 0 });
  } catch {
    return path.resolve(given);
  }
}

/**
 * As physicalPath, but a path the kernel would not follow either (a loop of links, a directory
 * this user may not look into) throws: for a place relayq is about to write to, where the text of
 * the path (path.resolve) would put the file somewhere else. So does a link to a place that does
 * not exist (a volume not mounted), where relayq would make the directories, and its files would
 * be hidden once the volume is there; `links: 'to-missing-too'` follows such a link (a file to
 * make, in a directory that must exist).
 */
export function followedPath(given: string, links: 'to-existing' | 'to-missing-too' = 'to-existing'): string {
  return walk(absolute(given), new Set(), { followed: 0, strict: links === 'to-existing' });
}

/** `given` made absolute without resolving `..` by its text: after a link, `..` is the parent of the link's target. */
function absolute(given: string): string {
  return path.isAbsolute(given) ? given : `${process.cwd()}/${given}`;
}

/**
 * Follows `target` as the kernel does, one name at a time from `/`, adding to `places` every
 * directory and link it passes (a link's target followed in turn), and returns the real path it
 * reaches; its last names may not exist yet (but a `..` after one throws, as the kernel fails there).
 */
function walk(target: string, places: Set<string>, links: { followed: number; strict?: boolean }, via?: string): string {
  let at = '/';
  places.add(at);
  /** What `at` is (the parent of a directory is one). */
  let kind: 'directory' | 'file' | 'missing' = 'directory';
  for (const name of target.split('/')) {
    // as the kernel: nothing comes after a file, and a name that is not there has no parent to go
    // back to (what the check looked at would not be what is opened: another user could make
    // either a link between the look and the use)
    if (kind === 'file') throw new Error(`${at} is not a directory`);
    if (name === '' || name === '.') continue;
    if (name === '..') {
      if (kind === 'missing') throw new Error(`${at} does not exist (a \`..\` after it leads nowhere)`);
      at = path.dirname(at);
      continue;
    }
    const next = path.join(at, name);
    places.add(next);
    const stat = fs.lstatSync(next, { throwIfNoEntry: false });
    if (!stat && via !== undefined && links.strict) throw new Error(`${via} is a symbolic link to ${fs.readlinkSync(via)}, which does not exist`);
    if (!stat?.isSymbolicLink()) {
      at = next;
      kind = kindOf(stat);
      continue;
    }
    // as the kernel, which follows 40 links at most on the way to one path
    if (++links.followed > 40) throw new Error(`${target}: too many levels of symbolic links`);
    const destination = fs.readlinkSync(next);
    at = walk(path.isAbsolute(destination) ? destination : `${at}/${destination}`, places, links, next);
    kind = kindOf(fs.statSync(at, { throwIfNoEntry: false }));
  }
  return at;
}

function kindOf(stat: fs.Stats | undefined): 'directory' | 'file' | 'missing' {
  return stat === undefined ? 'missing' : stat.isDirectory() ? 'directory' : 'file';
}

/** Where relayq makes its files for a path: the path itself when it is a directory, else the nearest directory above it that exists. */
function holder(real: string): string {
  if (fs.statSync(real, { throwIfNoEntry: false })?.isDirectory()) return real;
  let above = path.dirname(real);
  while (!fs.existsSync(above)) above = path.dirname(above);
  return above;
}

function refuseOthersPlace(place: string): void {
  const stat = fs.lstatSync(place, { throwIfNoEntry: false });
  if (!stat || !(stat.isSymbolicLink() || stat.isDirectory())) return;
  refuseOthersOwner(place, stat, 'would follow the links put there to other files');
}

function refuseOthersOwner(place: string, stat: fs.Stats, risk: string): void {
  const refusal = (who: string, as: string) => new Error(`${place} may be changed by ${who}: as root, relayq ${risk}; run it as ${as}`);
  const link = stat.isSymbolicLink() ? ' (a symbolic link)' : '';
  if (stat.uid !== 0) throw refusal(`its owner, uid ${stat.uid}${link}`, `that user (sudo -u '#${stat.uid}' relayq …)`);
  // a link's own mode says nothing: what it points to is checked in its turn; sticky (as /tmp)
  // keeps others from renaming a directory's entries, and does nothing for a file
  const sticky = stat.isDirectory() && (stat.mode & 0o1000) !== 0;
  if (!link && (stat.mode & 0o022) !== 0 && !sticky) throw refusal('users other than root', "the relay's user");
}

/** A directory others may write in that is root's (refuseOthersPlace let it pass): a sticky one. */
function refuseShared(place: string): void {
  if ((fs.statSync(place).mode & 0o022) === 0) return;
  throw new Error(
    `${place} is shared (sticky, as /tmp is): as root, relayq does not make its files where other users may have made theirs first (files SQLite opens by name, links); use a directory of root's in it, or run it as the relay's user`,
  );
}
