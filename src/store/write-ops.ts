// Every write the server makes, by name. They run on the writer thread's connection inside its
// group commit (see writer.ts); arguments and results cross the thread boundary by structured
// clone, so they are plain data: no functions, no class instances.
import crypto from 'node:crypto';
import { deleteMessage, requeueFailed, retryMessage } from './admin.js';
import type { Sqlite } from './db.js';
import { type ClaimOptions, claimDueBatches, completeBatch, releaseClaims, requeueTemporaryFailures } from './delivery.js';
import { countRefusal, insertMessage } from './intake.js';
import { probeWrite } from './queries.js';
import { deleteDeliveredBefore, pruneRateBuckets, retentionCutoff } from './retention.js';

export const WRITE_OPS = {
  insertMessage,
  countRefusal,
  claimDueBatches: (sqlite: Sqlite, options: Omit<ClaimOptions, 'newToken'>) =>
    claimDueBatches(sqlite, { ...options, newToken: () => crypto.randomUUID() }),
  completeBatch,
  releaseClaims,
  requeueTemporaryFailures,
  requeueFailed,
  retryMessage,
  deleteMessage,
  probeWrite,
  /** One retention step: delivered messages first; rate buckets only when none is due. */
  retentionSweep(sqlite: Sqlite, options: { now: number; deliveredDays: number; limit: number }) {
    const { now, deliveredDays, limit } = options;
    const messages = deliveredDays > 0 ? deleteDeliveredBefore(sqlite, retentionCutoff(now, deliveredDays), limit) : 0;
    const buckets = messages === 0 ? pruneRateBuckets(sqlite, now, limit) : 0;
    return { messages, buckets };
  },
  /** One statement on the writer's connection (tests and maintenance). */
  run(sqlite: Sqlite, sql: string, params: unknown[] = []) {
    return sqlite.prepare(sql).run(...params).changes;
  },
};

export type WriteOps = typeof WRITE_OPS;
export type WriteOpName = keyof WriteOps;
// biome-ignore lint/suspicious/noExplicitAny: extracting the parameters after the connection
export type WriteOpArgs<K extends WriteOpName> = WriteOps[K] extends (sqlite: Sqlite, ...args: infer A) => any ? A : never;
export type WriteOpResult<K extends WriteOpName> = ReturnType<WriteOps[K]>;
