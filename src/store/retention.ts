// Retention: delivered messages older than retention.deliveredDays and rate-limit buckets older
// than the longest window (one day) are deleted a small batch at a time. Each batch is one
// operation of the group commit, so intake keeps committing between batches and never waits
// for a long delete. Failed messages are kept until an operator retries or deletes them. With
// logAllEmails=false the sweeps of a start first erase, the same way, the content that mail
// delivered while it was true still has.
import type { Logger } from 'pino';
import type { Clock } from '../clock.js';
import type { StoreWriter } from './writer.js';
import type { Sqlite } from './db.js';
import { DAY_MINUTES, minuteOf } from './intake.js';
import { prepared } from './statements.js';

const DAY_MS = 86_400_000;

/**
 * The stored bytes one batch deletes at most (and at least one message): freeing a message's
 * pages costs the writer in proportion to its size, and 200 messages of 100 KB held it for about
 * 300 ms, which every commit of intake and delivery waited behind.
 */
const RETENTION_BATCH_BYTES = 8 * 1024 * 1024;

/**
 * Deletes up to `limit` delivered messages that finished before `cutoff` (oldest first), with
 * their recipients and attempts (ON DELETE CASCADE), and no more stored bytes than `maxBytes`
 * unless the first alone has more (a message whose content was erased has none). Returns how many messages went.
 */
export function deleteDeliveredBefore(sqlite: Sqlite, cutoff: number, limit: number, maxBytes = RETENTION_BATCH_BYTES): number {
  return prepared(
    sqlite,
    `DELETE FROM messages WHERE id IN (
       SELECT id FROM (
         SELECT id, ROW_NUMBER() OVER oldest AS n, SUM(stored) OVER oldest AS total
         FROM (
           SELECT id, finished_at, CASE WHEN body_id IS NULL THEN 0 ELSE size END AS stored FROM messages
           WHERE state = 'delivered' AND finished_at < ? ORDER BY finished_at LIMIT CAST(? AS INTEGER)
         )
         WINDOW oldest AS (ORDER BY finished_at, id ROWS UNBOUNDED PRECEDING)
       ) WHERE n = 1 OR total <= ?
     )`,
  ).run(cutoff, limit, maxBytes).changes;
}

/** Read through the rate_buckets_minute index (migration 003): never a scan of the table. */
export const PRUNE_RATE_BUCKETS_SQL = `DELETE FROM rate_buckets WHERE (sender_key, minute) IN (
  SELECT sender_key, minute FROM rate_buckets WHERE minute <= ? LIMIT CAST(? AS INTEGER)
)`;

/** The same for the hourly buckets, through rate_hours_hour (migration 004). */
export const PRUNE_RATE_HOURS_SQL = `DELETE FROM rate_hours WHERE (sender_key, hour) IN (
  SELECT sender_key, hour FROM rate_hours WHERE hour < ? LIMIT CAST(? AS INTEGER)
)`;

/**
 * Deletes up to `limit` rate-limit buckets (per-minute, then hourly) that no rolling window can
 * reach any more.
 */
export function pruneRateBuckets(sqlite: Sqlite, now: number, limit: number): number {
  const oldestLiveMinute = minuteOf(now) - DAY_MINUTES;
  const minutes = prepared(sqlite, PRUNE_RATE_BUCKETS_SQL).run(oldestLiveMinute, limit).changes;
  if (minutes >= limit) return minutes;
  const oldestLiveHour = Math.floor(oldestLiveMinute / 60);
  return minutes + prepared(sqlite, PRUNE_RATE_HOURS_SQL).run(oldestLiveHour, limit - minutes).changes;
}

function retentionCutoff(now: number, deliveredDays: number): number {
  return now - deliveredDays * DAY_MS;
}

/**
 * One step of the sweep (a write op) of `limit` rows at most: delivered messages first, then
 * buckets with what is left of the limit. So a steady flow of mail coming due, a little at
 * every sweep, does not keep the buckets from being pruned.
 */
export function retentionSweep(sqlite: Sqlite, options: { now: number; deliveredDays: number; limit: number; maxBytes?: number }): SweepResult {
  const { now, deliveredDays, limit } = options;
  const cutoff = retentionCutoff(now, deliveredDays);
  const messages = deliveredDays > 0 ? deleteDeliveredBefore(sqlite, cutoff, limit, options.maxBytes) : 0;
  const buckets = messages < limit ? pruneRateBuckets(sqlite, now, limit - messages) : 0;
  // a batch cut short by its bytes leaves mail that is due: the next one comes soon, not at the idle interval
  const more =
    deliveredDays > 0 &&
    (prepared(sqlite, "SELECT EXISTS (SELECT 1 FROM messages WHERE state = 'delivered' AND finished_at < ?) AS more").get(cutoff) as { more: number }).more === 1;
  return { messages, buckets, more };
}

/** Where a pass of eraseDeliveredContent goes on: after this delivered message (by messages_finished). */
export type EraseCursor = { finishedAt: number; rowid: number };

/** Delivered messages after a cursor, in the order of messages_finished. */
export const ERASE_SCAN_SQL = `SELECT rowid, finished_at AS finishedAt, body_id AS bodyId, size FROM messages INDEXED BY messages_finished
  WHERE state = 'delivered' AND (finished_at, rowid) > (?, ?) ORDER BY finished_at, rowid LIMIT CAST(? AS INTEGER)`;

/**
 * logAllEmails=false erases content as each message is delivered; mail delivered while it was
 * true keeps its content. This erases it: it reads up to `scan` delivered messages (through
 * messages_finished, from `after` on) and erases the content of up to `limit` of them, no more
 * than `maxBytes` of it unless the first alone has more. `next` is null once every delivered
 * message has been read.
 */
export function eraseDeliveredContent(
  sqlite: Sqlite,
  options: { after: EraseCursor; limit: number; maxBytes?: number; scan?: number },
): { erased: number; next: EraseCursor | null } {
  const { after, limit, maxBytes = RETENTION_BATCH_BYTES, scan = limit * 25 } = options;
  const rows = prepared(sqlite, ERASE_SCAN_SQL).all(after.finishedAt, after.rowid, scan) as Array<{ rowid: number; finishedAt: number; bodyId: number | null; size: number }>;
  let erased = 0;
  let bytes = 0;
  let read: EraseCursor = after;
  for (const row of rows) {
    if (row.bodyId !== null) {
      if (erased === limit || (erased > 0 && bytes + row.size > maxBytes)) return { erased, next: read };
      prepared(sqlite, 'DELETE FROM message_bodies WHERE id = ?').run(row.bodyId);
      prepared(sqlite, 'UPDATE messages SET body_id = NULL WHERE rowid = ?').run(row.rowid);
      erased++;
      bytes += row.size;
    }
    read = { finishedAt: row.finishedAt, rowid: row.rowid };
  }
  return { erased, next: rows.length === scan ? read : null };
}

export interface RetentionOptions {
  writer: StoreWriter;
  clock: Clock;
  logger: Logger;
  /** retention.deliveredDays; 0 keeps delivered mail forever (buckets are still pruned). */
  deliveredDays: number;
  /** Rows per write operation; small so one batch adds little to a shared commit. */
  batchSize?: number;
  /** Stored bytes per write operation (RETENTION_BATCH_BYTES; at least one message). */
  batchBytes?: number;
  /** Pause between sweeps once nothing is left to delete. */
  idleIntervalMs?: number;
  /** Pause between two batches while there is a backlog, so intake commits in between. */
  busyIntervalMs?: number;
  /** logAllEmails=false: first erase the content that mail delivered before it was set kept (eraseDeliveredContent). */
  eraseDeliveredContent?: boolean;
}

export interface SweepResult {
  messages: number;
  buckets: number;
  /** Delivered mail past its age is left (the batch was full, or cut short by its bytes). */
  more: boolean;
}

/**
 * Runs retention in the server process. `runOnce()` does one write operation (a batch of
 * messages and buckets, see retentionSweep) and is what tests call with a manual clock; `start()`
 * repeats it on a timer that backs off to `idleIntervalMs` when there is nothing to delete.
 */
export class RetentionSweeper {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<unknown> | undefined;
  private stopped = true;
  readonly totals = { messages: 0, buckets: 0 };
  /** The erasure pass's place among delivered mail; null when there is none to make or it is done. */
  private erasing: EraseCursor | null;
  private erasedContent = 0;
  private readonly batchSize: number;
  private readonly idleIntervalMs: number;
  private readonly busyIntervalMs: number;

  constructor(private readonly options: RetentionOptions) {
    this.batchSize = options.batchSize ?? 200;
    this.idleIntervalMs = options.idleIntervalMs ?? 60_000;
    this.busyIntervalMs = options.busyIntervalMs ?? 50;
    this.erasing = options.eraseDeliveredContent ? { finishedAt: Number.MIN_SAFE_INTEGER, rowid: 0 } : null;
  }

  /** One batch (see retentionSweep), after one of erasure while that pass lasts. */
  async runOnce(): Promise<SweepResult> {
    const { writer, clock, deliveredDays } = this.options;
    const limit = this.batchSize;
    if (this.erasing) await this.eraseStep(this.erasing);
    const now = clock.now();
    const result = await writer.write('retentionSweep', { now, deliveredDays, limit, maxBytes: this.options.batchBytes });
    this.totals.messages += result.messages;
    this.totals.buckets += result.buckets;
    if (result.messages || result.buckets) {
      this.options.logger.info({ event: 'retention.deleted', messages: result.messages, buckets: result.buckets }, 'retention deleted old rows');
    }
    return { ...result, more: result.more || this.erasing !== null };
  }

  private async eraseStep(after: EraseCursor): Promise<void> {
    const step = await this.options.writer.write('eraseDeliveredContent', { after, limit: this.batchSize, maxBytes: this.options.batchBytes });
    this.erasing = step.next;
    this.erasedContent += step.erased;
    if (step.next === null && this.erasedContent > 0) {
      this.options.logger.info(
        { event: 'retention.content_erased', messages: this.erasedContent },
        'content of mail delivered while security.logAllEmails was true erased; copies SQLite left in the unused space of its pages ' +
          'stay until written over: VACUUM the database file while relayq is stopped to remove them',
      );
    }
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.schedule(this.busyIntervalMs);
  }

  /** Stops the timer and waits for a batch in progress to commit. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    await this.running?.catch(() => {});
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => this.tick(), ms);
    this.timer.unref();
  }

  private tick(): void {
    this.timer = undefined;
    const run = this.runOnce();
    this.running = run;
    run.then(
      (r) => this.schedule(r.more || r.messages + r.buckets >= this.batchSize ? this.busyIntervalMs : this.idleIntervalMs),
      (err: Error) => {
        // The store may be closing, or the disk full: try again later rather than spin.
        if (!this.stopped) this.options.logger.warn({ event: 'retention.failed', err: err.message }, 'retention batch failed');
        this.schedule(this.idleIntervalMs);
      },
    );
  }
}
