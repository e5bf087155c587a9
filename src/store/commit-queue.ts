// Group commit, run by the writer thread (writer-thread.ts): operations queued during one turn of
// that thread's event loop — everything that arrived while the previous commit was in progress —
// run in a single IMMEDIATE transaction, each inside its own savepoint, and share one fsync
// (synchronous=FULL). A promise resolves only after COMMIT has returned, so a caller that answers
// `250` from `.then()` answers after the data is durable.
//
// A large write (the insert of a message spooled to a file: over spoolAfter, up to
// maxMessageSize) goes in a transaction apart, after the turn's small writes have committed, with
// other large ones up to HEAVY_GROUP_BYTES: the small writes queued behind it — a delivery's
// outcome, whose commit is all that stands between the upstream's `250` and a batch that a crash
// would send twice — wait for one such group at most, not for every large message that came with
// them.
import type { Sqlite } from './db.js';

type Op<T> = (sqlite: Sqlite) => T;

/** The large writes of one transaction add up to this, or it holds one. */
export const HEAVY_GROUP_BYTES = 4 * 1024 * 1024;

interface Pending {
  op: Op<unknown>;
  bytes: number;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

export class CommitQueue {
  private pending: Pending[] = [];
  private heavy: Pending[] = [];
  private scheduled = false;
  private heavyScheduled = false;
  private closed = false;
  /** Transactions committed so far (each result reports it, so that the writer knows). */
  readonly stats = { commits: 0 };
  /** Called after each COMMIT, before the batch's promises settle. */
  onCommitted: () => void = () => {};

  constructor(private readonly sqlite: Sqlite) {}

  /** `largeBytes`: the size of a large write (see above); a small one has none. */
  write<T>(op: Op<T>, largeBytes = 0): Promise<T> {
    if (this.closed) return Promise.reject(new Error('store is closed'));
    return new Promise<T>((resolve, reject) => {
      (largeBytes > 0 ? this.heavy : this.pending).push({ op, bytes: largeBytes, resolve: resolve as (v: unknown) => void, reject });
      this.schedule();
    });
  }

  private schedule(): void {
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /**
   * One turn: what is queued, in one transaction. Large writes waiting go in a turn of their
   * own, the next one: the results of this commit are sent when this turn ends, not after it.
   */
  private flush(): void {
    this.scheduled = false;
    this.commitQueued();
    if (this.heavy.length > 0 && !this.heavyScheduled) {
      this.heavyScheduled = true;
      setImmediate(() => this.flushHeavy());
    }
  }

  /** One group of large writes in a transaction; the next waits for a turn in which small ones may go first. */
  private flushHeavy(): void {
    this.heavyScheduled = false;
    this.commit(this.heavyGroup());
    if (this.heavy.length > 0) this.schedule();
  }

  private heavyGroup(): Pending[] {
    let bytes = 0;
    let n = 0;
    while (n < this.heavy.length && (n === 0 || bytes + this.heavy[n].bytes <= HEAVY_GROUP_BYTES)) bytes += this.heavy[n++].bytes;
    return this.heavy.splice(0, n);
  }

  private commitQueued(): void {
    const batch = this.pending;
    this.pending = [];
    this.commit(batch);
  }

  /** Commits everything queued, large writes too (before a pragma, and at close). */
  drain(): void {
    this.commitQueued();
    while (this.heavy.length > 0) this.commit(this.heavyGroup());
  }

  private commit(batch: Pending[]): void {
    if (batch.length === 0) return;
    const results: Array<{ ok: true; value: unknown } | { ok: false; error: unknown }> = [];
    try {
      this.sqlite.exec('BEGIN IMMEDIATE');
    } catch (err) {
      for (const p of batch) p.reject(err);
      return;
    }
    try {
      for (const p of batch) {
        this.sqlite.exec('SAVEPOINT op');
        try {
          const value = p.op(this.sqlite);
          this.sqlite.exec('RELEASE op');
          // only now: an operation whose RELEASE failed was rolled back, and has one result
          results.push({ ok: true, value });
        } catch (error) {
          // SQLITE_FULL or an I/O error may roll the whole transaction back: then the batch
          // fails, with this cause rather than the missing savepoint's
          if (!this.sqlite.inTransaction) throw error;
          this.sqlite.exec('ROLLBACK TO op');
          this.sqlite.exec('RELEASE op');
          results.push({ ok: false, error });
        }
      }
      this.sqlite.exec('COMMIT');
    } catch (err) {
      // COMMIT (or a savepoint statement) failed: nothing of this batch is durable.
      try {
        if (this.sqlite.inTransaction) this.sqlite.exec('ROLLBACK');
      } catch {
        // the connection rolled back on its own
      }
      for (const p of batch) p.reject(err);
      return;
    }
    this.stats.commits++;
    this.onCommitted();
    batch.forEach((p, i) => {
      const r = results[i];
      if (r.ok) p.resolve(r.value);
      else p.reject(r.error);
    });
  }

  /** Flushes what is queued and refuses further writes. */
  close(): void {
    this.drain();
    this.closed = true;
  }
}
