// The writer thread: owns the one connection that writes, and runs every write of the server in
// its group commit. Keeping the commit (and its fsync) off the main thread means SMTP sessions
// keep being served while the disk works; messages that arrive meanwhile share the next commit.
import { parentPort, workerData } from 'node:worker_threads';
import { CommitQueue } from './commit-queue.js';
import { openConnection } from './db.js';
import { limitWalSize, overwriteFreedPages } from './maintenance.js';
import { WRITE_OPS, type WriteOpName } from './write-ops.js';

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
// Every operation of a group commit runs in a savepoint, whose undo journal SQLite keeps in a
// temporary file by default: a write syscall per page an operation touches again. In memory it is
// a copy (the pages are small, and the journal lives only until the operation's RELEASE).
sqlite.pragma('temp_store = MEMORY');
if (options.secureDelete) overwriteFreedPages(sqlite);
const commits = new CommitQueue(sqlite);

function serialize(err: unknown): SerializedError {
  const e = err as Error & { code?: string; kind?: string; hit?: unknown };
  return { name: e?.name ?? 'Error', message: e?.message ?? String(err), code: e?.code, kind: e?.kind, hit: e?.hit };
}

/** Replies of one turn of this thread's event loop (one commit's results) go back as one message. */
let outbox: WriterReply[] = [];

function reply(message: WriterReply): void {
  outbox.push(message);
  if (outbox.length === 1) {
    queueMicrotask(() => {
      const replies = outbox;
      outbox = [];
      port.postMessage(replies);
    });
  }
}

function handle(request: WriterRequest): void {
  if (request.type === 'close') {
    commits.close();
    sqlite.close();
    reply({ type: 'closed' });
    queueMicrotask(() => port.close());
    return;
  }
  if (request.type === 'pragma') {
    // outside any transaction (some pragmas refuse to run in one), after what is queued
    commits.flush();
    const { id, text } = request;
    try {
      reply({ type: 'result', id, commits: commits.stats.commits, ok: true, value: sqlite.pragma(text, { simple: true }) });
    } catch (err) {
      reply({ type: 'result', id, commits: commits.stats.commits, ok: false, error: serialize(err) });
    }
    return;
  }
  const { id, op, args } = request;
  const fn = WRITE_OPS[op] as (db: typeof sqlite, ...a: unknown[]) => unknown;
  commits.write((db) => fn(db, ...args)).then(
    (value) => reply({ type: 'result', id, commits: commits.stats.commits, ok: true, value }),
    (err) => reply({ type: 'result', id, commits: commits.stats.commits, ok: false, error: serialize(err) }),
  );
}

port.on('message', (requests: WriterRequest[]) => {
  for (const request of requests) handle(request);
});
