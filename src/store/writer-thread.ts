// The writer thread: owns the one connection that writes, and runs every write of the server in
// its group commit. Keeping the commit (and its fsync) off the main thread means SMTP sessions
// keep being served while the disk works; messages that arrive meanwhile share the next commit.
import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { CommitQueue } from './commit-queue.js';
import { openConnection, realDatabasePath } from './db.js';
import type { NewMessage } from './intake.js';
import { limitWalSize, overwriteFreedPages } from './maintenance.js';
import { movableResult, ownMemory, WRITE_OPS, type WriteOpName } from './write-ops.js';

export interface WriterThreadOptions {
  file: string;
  /** Overwrite freed pages (logAllEmails=false: erased content must not linger in the file). */
  secureDelete: boolean;
}

export type WriterRequest =
  | { type: 'write'; id: number; op: WriteOpName; args: unknown[] }
  | { type: 'pragma'; id: number; text: string }
  | { type: 'close' };

export type WriterReply =
  | { type: 'result'; id: number; commits: number; ok: true; value: unknown }
  | { type: 'result'; id: number; commits: number; ok: false; error: SerializedError }
  | { type: 'closed' };

export interface SerializedError {
  name: string;
  message: string;
  code?: string;
  /** PolicyRefusal fields. */
  kind?: string;
  hit?: unknown;
}

const options = workerData as WriterThreadOptions;
if (!parentPort) throw new Error('writer-thread must run as a worker thread');
const port = parentPort;

const sqlite = openConnection(options.file);
limitWalSize(sqlite);
/**
 * The database file this connection has open, and its WAL. Removed or replaced at its path while
 * the relay runs (an `rm`, a backup moved over it, the WAL removed as a restore does), it still
 * takes every write, but the next start would not find what they stored: new mail, and the health
 * check's write, are refused then (see moved). A copy written into the file itself (`cp` over it)
 * cannot be told: the README says to stop relayq first.
 */
const opened = fs.statSync(options.file);
const walPath = `${realDatabasePath(options.file)}-wal`;
/** The WAL's inode, once it is there (SQLite makes it at the first write); this relay's connections keep it. */
let walIno: number | undefined;
// Every operation of a group commit runs in a savepoint, whose undo journal SQLite keeps in a
// temporary file by default: a write syscall per page an operation touches again. In memory it is
// a copy (the pages are small, and the journal lives only until the operation's RELEASE).
sqlite.pragma('temp_store = MEMORY');
/**
 * logAllEmails=false: secure_delete zeroes the pages that erased content frees, but it does so in
 * the WAL. Until a checkpoint copies those pages over, the database file keeps the old bytes (of a
 * message that waited long enough to be checkpointed), and the WAL's earlier frames keep them until
 * later commits happen to write over them. So the WAL is checkpointed and truncated this long
 * after a commit, and again after the commits that follow, at most once per period.
 */
const WAL_TRUNCATION_DELAY_MS = 1000;
let walTruncation: NodeJS.Timeout | undefined;

function scheduleWalTruncation(): void {
  walTruncation ??= setTimeout(truncateWal, WAL_TRUNCATION_DELAY_MS).unref();
}

/**
 * Between two commits (timers never run inside one). It does not wait for a reader that still
 * reads older frames (a backup, the CLI): the writer would wait with it. It copies what it can,
 * and tries again a period later.
 */
function truncateWal(): void {
  walTruncation = undefined;
  const busyTimeout = sqlite.pragma('busy_timeout', { simple: true }) as number;
  sqlite.pragma('busy_timeout = 0');
  try {
    const [result] = sqlite.pragma('wal_checkpoint(TRUNCATE)') as Array<{ busy: number }>;
    if (result?.busy) scheduleWalTruncation();
  } catch {
    scheduleWalTruncation();
  } finally {
    sqlite.pragma(`busy_timeout = ${busyTimeout}`);
  }
}

const commits = new CommitQueue(sqlite);
if (options.secureDelete) {
  overwriteFreedPages(sqlite);
  commits.onCommitted = scheduleWalTruncation;
  scheduleWalTruncation(); // what a kill -9 left in the WAL
}

/** The commit count when the file was last found where it was opened: looked at once per commit. */
let foundAt = -1;

/** The error that refuses new mail while `databasePath` no longer names the file this connection has open. */
function moved(): Error | undefined {
  if (foundAt === commits.stats.commits) return undefined;
  let now: fs.Stats | undefined;
  let wal: fs.Stats | undefined;
  try {
    now = fs.statSync(options.file, { throwIfNoEntry: false });
    wal = fs.statSync(walPath, { throwIfNoEntry: false });
  } catch (err) {
    // a directory that cannot be searched says nothing of the file; a path that no longer leads to
    // one (a directory where a file was, a loop of links) does
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EACCES' || code === 'EPERM') return undefined;
  }
  if (wal && walIno === undefined) walIno = wal.ino;
  const walKept = walIno === undefined || wal?.ino === walIno;
  if (now?.ino === opened.ino && now.dev === opened.dev && walKept) {
    foundAt = commits.stats.commits;
    return undefined;
  }
  return Object.assign(
    new Error(
      `the database file ${options.file} was removed or replaced while relayq runs: new mail is refused, since the next start would not find it; the mail queued before is still delivered from the file relayq has open (/health counts it). Put the file back, or stop relayq once that queue is empty`,
    ),
    { code: 'RELAYQ_DATABASE_MOVED' },
  );
}

function serialize(err: unknown): SerializedError {
  const e = err as Error & { code?: string; kind?: string; hit?: unknown };
  return { name: e?.name ?? 'Error', message: e?.message ?? String(err), code: e?.code, kind: e?.kind, hit: e?.hit };
}

/** Replies of one turn of this thread's event loop (one commit's results) go back as one message. */
let outbox: WriterReply[] = [];
let outboxMoving: Array<Uint8Array | null> = [];

/** `moving`: bytes of the reply whose memory moves to the main thread instead of being copied. */
function reply(message: WriterReply, moving: Array<Uint8Array | null> = []): void {
  outbox.push(message);
  outboxMoving.push(...moving);
  if (outbox.length === 1) {
    queueMicrotask(() => {
      const replies = outbox;
      const moving = outboxMoving;
      outbox = [];
      outboxMoving = [];
      port.postMessage(replies, ownMemory(moving));
    });
  }
}

function runRequest(request: WriterRequest): void {
  if (request.type === 'close') {
    commits.onCommitted = () => {};
    clearTimeout(walTruncation);
    commits.close();
    sqlite.close();
    reply({ type: 'closed' });
    queueMicrotask(() => port.close());
    return;
  }
  if (request.type === 'pragma') {
    // outside any transaction (some pragmas refuse to run in one), after what is queued
    commits.drain();
    const { id, text } = request;
    try {
      reply({ type: 'result', id, commits: commits.stats.commits, ok: true, value: sqlite.pragma(text, { simple: true }) });
    } catch (err) {
      reply({ type: 'result', id, commits: commits.stats.commits, ok: false, error: serialize(err) });
    }
    return;
  }
  const { id, op, args } = request;
  const gone = op === 'insertMessage' || op === 'probeWrite' ? moved() : undefined;
  if (gone) {
    reply({ type: 'result', id, commits: commits.stats.commits, ok: false, error: serialize(gone) });
    return;
  }
  const fn = WRITE_OPS[op] as (db: typeof sqlite, ...a: unknown[]) => unknown;
  commits.write((db) => fn(db, ...args), largeBytes(request)).then(
    (value) => reply({ type: 'result', id, commits: commits.stats.commits, ok: true, value }, movableResult(op, value)),
    (err) => reply({ type: 'result', id, commits: commits.stats.commits, ok: false, error: serialize(err) }),
  );
}

/** The size of the insert of a message that was spooled to a file (over spoolAfter), a large write (see commit-queue.ts); 0 for any other. */
function largeBytes(request: Extract<WriterRequest, { type: 'write' }>): number {
  if (request.op !== 'insertMessage') return 0;
  const { raw, spooled } = request.args[0] as NewMessage;
  return spooled ? raw.length + spooled.bytes : 0;
}

port.on('message', (requests: WriterRequest[]) => {
  for (const request of requests) runRequest(request);
});
