// Group commit, run by the writer thread (writer-thread.ts): operations queued during one turn of
// that thread's event loop — everything that arrived while the previous commit was in progress —
// run in a single IMMEDIATE transaction, each inside its own savepoint, and share one fsync
// (synchronous=FULL). A promise resolves only after COMMIT has returned, so a caller that answers
// `250` from `.then()` answers after the data is durable.
//
// A heavy operation (the insert of a message spooled to a file: a quarter of a megabyte up to
// maxMessageSize) gets a transaction of its own, after the turn's other operations have committed,
// and one per turn: the small writes queued behind it — a delivery's outcome, whose commit is all
// that stands between the upstream's `250` and a batch that a crash would send twice — wait for
// at most one large write, not for every one that arrived with them.
import type { Sqlite } from './db.js';

type Op<T> = (sqlite: Sqlite) => T;

interface Pending {
  op: Op<unknown>;
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

  write<T>(op: Op<T>, options: { heavy?: boolean } = {}): Promise<T> {
    if (this.closed) return Promise.reject(new Error('store is closed'));
    return new Promise<T>((resolve, reject) => {
      (options.heavy ? this.heavy : this.pending).push({ op, resolve: resolve as (v: unknown) => void, reject });
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
   * One turn: what is queued, in one transaction. A heavy operation waiting goes in a turn of its
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

  /** One heavy operation in its own transaction; the next waits for a turn in which the others may go first. */
  private flushHeavy(): void {
    this.heavyScheduled = false;
    const next = this.heavy.shift();
    if (next) this.commit([next]);
    if (this.heavy.length > 0) this.schedule();
  }

  private commitQueued(): void {
    const batch = this.pending;
    this.pending = [];
    this.commit(batch);
  }

  /** Commits everything queued, heavy operations too (before a pragma, and at close). */
  drain(): void {
    this.commitQueued();
    for (let next = this.heavy.shift(); next; next = this.heavy.shift()) this.commit([next]);
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
