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
const port = parentPort;
if (!port) throw new Error('writer-thread must run as a worker thread');

const sqlite = openConnection(options.file);
limitWalSize(sqlite);
if (options.secureDelete) overwriteFreedPages(sqlite);
const commits = new CommitQueue(sqlite);

function serialize(err: unknown): SerializedError {
  const e = err as Error & { code?: string; kind?: string; hit?: unknown };
  return { name: e?.name ?? 'Error', message: e?.message ?? String(err), code: e?.code, kind: e?.kind, hit: e?.hit };
}

port.on('message', (request: WriterRequest) => {
  if (request.type === 'close') {
    commits.close();
    sqlite.close();
    port.postMessage({ type: 'closed' } satisfies WriterReply);
    port.close();
    return;
  }
  if (request.type === 'pragma') {
    // outside any transaction (some pragmas refuse to run in one), after what is queued
    commits.flush();
    const { id, text } = request;
    try {
      port.postMessage({ type: 'result', id, commits: commits.stats.commits, ok: true, value: sqlite.pragma(text, { simple: true }) } satisfies WriterReply);
    } catch (err) {
      port.postMessage({ type: 'result', id, commits: commits.stats.commits, ok: false, error: serialize(err) } satisfies WriterReply);
    }
    return;
  }
  const { id, op, args } = request;
  const fn = WRITE_OPS[op] as (db: typeof sqlite, ...a: unknown[]) => unknown;
  commits.write((db) => fn(db, ...args)).then(
    (value) => port.postMessage({ type: 'result', id, commits: commits.stats.commits, ok: true, value } satisfies WriterReply),
    (err) => port.postMessage({ type: 'result', id, commits: commits.stats.commits, ok: false, error: serialize(err) } satisfies WriterReply),
  );
});
