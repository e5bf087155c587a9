// failedRetryInterval: failed mail whose last error was temporary goes back in the queue once it
// has been failed this long, as Postfix's deferred mail is looked at again. Only spare room is
// used, oldest failure first, and the failed mail is read in bounded steps so that a large store
// does not hold the main thread.
import { performance } from 'node:perf_hooks';
import { setImmediate as nextTurn } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { Clock } from '../clock.js';
import type { Config } from '../config/schema.js';
import type { Sqlite } from '../store/db.js';
import { countDueQueued, type FailedScanCursor, findTemporaryFailures } from '../store/delivery.js';
import { activeCount } from '../store/intake.js';
import type { StoreWriter } from '../store/writer.js';

/** The scan runs at most this often (a tick of the engine asks). */
const CHECK_MS = 1000;
/** Failed messages looked at per step of a scan. */
const SCAN_STEP = 500;

export interface FailedRetryDeps {
  config: Config;
  sqlite: Sqlite;
  writer: StoreWriter;
  clock: Clock;
  logger: Logger;
  /** The backlog of due mail at which in-flow pacing starts (the gate's limit). */
  pacingLimit: number;
  /** Called after a scan put mail back: it is due now. */
  requeued: () => void;
}

export class FailedRetry {
  /** performance.now() of the last scan started by a tick. */
  private checkedAt = Number.NEGATIVE_INFINITY;
  /**
   * Failed messages finished at or before this were looked at already. After a clock stepped
   * back it moves back too: mail that fails then is finished "before" it.
   */
  private watermark = Number.NEGATIVE_INFINITY;
  /** The earliest finish of the failures committed while a scan runs (it may have passed them). */
  private failedDuringScan = Number.POSITIVE_INFINITY;
  private scanning = false;
  /**
   * Messages put back in the queue since this process started. One that fails again logs
   * delivery.failed_again (info), not delivery.failed: that warning, and the alerts on it, came
   * when it first failed; left failing, it would repeat every interval.
   */
  private readonly retried = new Set<string>();

  constructor(private readonly deps: FailedRetryDeps) {}

  /** True when a tick should scan now: the interval is set and the last scan began CHECK_MS ago. */
  due(): boolean {
    if (this.deps.config.failedRetryInterval <= 0 || performance.now() - this.checkedAt < CHECK_MS) return false;
    this.checkedAt = performance.now();
    return true;
  }

  /**
   * A message failed at `finishedAt`. A failure whose commit waited (a lock, a full disk) is
   * finished before the point the scans have passed meanwhile, or the one running now will pass:
   * they must come back for it.
   */
  failedAt(finishedAt: number): void {
    this.watermark = Math.min(this.watermark, finishedAt);
    this.failedDuringScan = Math.min(this.failedDuringScan, finishedAt);
  }

  /** Whether `id` was put back by a scan (and is final again now: it is forgotten). */
  takeRetried(id: string): boolean {
    return this.retried.delete(id);
  }

  /**
   * Puts failed mail whose last error was temporary back in the queue, oldest first, while there
   * is room for it (room()); the rest waits for the next scans. `everything` starts from the
   * oldest failure, not where the scans got to, and runs even while another scan does.
   */
  async scan(everything: boolean): Promise<number> {
    const { config, sqlite, clock, writer, logger } = this.deps;
    const interval = config.failedRetryInterval;
    if (interval <= 0 || (this.scanning && !everything)) return 0;
    this.scanning = true;
    try {
      const now = clock.now();
      const finishedBefore = now - interval * 1000;
      this.failedDuringScan = Number.POSITIVE_INFINITY;
      let cursor: FailedScanCursor | null = { finishedAt: everything ? Number.NEGATIVE_INFINITY : this.watermark, id: '' };
      let requeued = 0;
      // where a scan stopped for want of room: the next one starts there
      let stoppedAt = Number.POSITIVE_INFINITY;
      while (cursor) {
        const step = findTemporaryFailures(sqlite, { cursor, finishedBefore, limit: SCAN_STEP });
        const taken = step.messages.length > 0 ? step.messages.slice(0, this.room(now)) : [];
        if (taken.length > 0) {
          const done = await writer.write('requeueTemporaryFailures', taken.map((m) => m.id), {
            now,
            maxAttempts: config.retry.maxAttempts,
            batchDelayMs: config.batchDelay,
          });
          requeued += done.length;
          for (const id of done) this.retried.add(id);
          if (done.length > 0) logger.info({ event: 'delivery.requeued', ids: done, count: done.length }, 'failed mail requeued (failedRetryInterval)');
        } else if (step.next) {
          await nextTurn();
        }
        if (taken.length < step.messages.length) {
          stoppedAt = step.messages[taken.length].finishedAt;
          break;
        }
        cursor = step.next;
      }
      this.watermark = Math.min(finishedBefore, this.failedDuringScan, stoppedAt);
      if (requeued > 0) this.deps.requeued();
      return requeued;
    } finally {
      this.scanning = false;
    }
  }

  /**
   * How many failed messages may go back now: only spare room, so that mail that already failed
   * never holds new mail back, by a 452 or by pacing (Postfix's deferred mail does not count
   * against new mail either). Messages not yet final stay under half of queueSize, and due ones
   * waiting for a worker under half of the backlog at which in-flow pacing starts.
   */
  private room(now: number): number {
    const { sqlite, config, pacingLimit } = this.deps;
    const belowPacing = Math.floor(pacingLimit / 2) - countDueQueued(sqlite, now, pacingLimit);
    const belowQueueSize = config.queueSize > 0 ? Math.floor(config.queueSize / 2) - activeCount(sqlite) : Number.POSITIVE_INFINITY;
    return Math.max(0, Math.min(belowPacing, belowQueueSize));
  }
}
