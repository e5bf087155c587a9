// Every write the server makes, by name. They run on the writer thread's connection inside its
// group commit (see writer.ts); arguments and results cross the thread boundary by structured
// clone, so they are plain data: no functions, no class instances.
import crypto from 'node:crypto';
import { deleteMessage, flushQueued, makeDue, noteOutage, outageOver, requeueFailed, retryMessage } from './admin.js';
import type { Sqlite } from './db.js';
import { type ClaimOptions, type ClaimResult, claimDueBatches, completeBatch, recordCutOffAttempt, recordDelivered, releaseClaims, releaseOrphanedClaims, requeueTemporaryFailures } from './delivery.js';
import { countRefusal, insertMessage } from './intake.js';
import { eraseDeliveredContent, retentionSweep } from './retention.js';
import { prepared } from './statements.js';

export const WRITE_OPS = {
  insertMessage,
  countRefusal,
  claimDueBatches: (sqlite: Sqlite, options: Omit<ClaimOptions, 'newToken'>) =>
    claimDueBatches(sqlite, { ...options, newToken: () => crypto.randomUUID() }),
  completeBatch,
  recordDelivered,
  recordCutOffAttempt,
  releaseClaims,
  releaseOrphanedClaims,
  requeueTemporaryFailures,
  requeueFailed,
  flushQueued,
  makeDue,
  noteOutage,
  outageOver,
  retryMessage,
  deleteMessage,
  /**
   * The health check's write: run inside the group commit it proves that the database takes a
   * transaction and a commit right now. It counts the checks in `health_checks`, because a write
   * that changes nothing leaves the page clean, and the commit then writes nothing to the disk.
   */
  probeWrite(sqlite: Sqlite) {
    prepared(sqlite, "INSERT INTO counters (name, value) VALUES ('health_checks', 1) ON CONFLICT (name) DO UPDATE SET value = value + 1").run();
  },
  retentionSweep,
  eraseDeliveredContent,
};

export type WriteOps = typeof WRITE_OPS;
export type WriteOpName = keyof WriteOps;
// biome-ignore lint/suspicious/noExplicitAny: extracting the parameters after the connection
export type WriteOpArgs<K extends WriteOpName> = WriteOps[K] extends (sqlite: Sqlite, ...args: infer A) => any ? A : never;
export type WriteOpResult<K extends WriteOpName> = ReturnType<WriteOps[K]>;

/**
 * The memory of these views that is theirs alone, to move across the thread boundary instead of
 * being copied (a large message is then held once, not twice). A view into Node's shared buffer
 * pool is copied as usual. Each memory is listed once: postMessage refuses a transfer list that
 * names one twice. Both threads take it over all the views of one message they post.
 */
export function ownMemory(views: ReadonlyArray<Uint8Array | null>): ArrayBuffer[] {
  const own = new Set<ArrayBuffer>();
  for (const v of views) if (v && v.byteOffset === 0 && v.byteLength === v.buffer.byteLength) own.add(v.buffer as ArrayBuffer);
  return [...own];
}

/** What of a write's result moves to the main thread rather than being copied: the claimed messages' bytes. */
export function movableResult(op: WriteOpName, value: unknown): Array<Uint8Array | null> {
  return op === 'claimDueBatches' ? (value as ClaimResult).batches.map((b) => b.raw) : [];
}
