// Group commit, run by the writer thread (writer-thread.ts): operations queued during one turn of
// that thread's event loop — everything that arrived while the previous commit was in progress —
// run in a single IMMEDIATE transaction, each inside its own savepoint, and share one fsync
// (synchronous=FULL). A promise resolves only after COMMIT has returned, so a caller that answers
// `250` from `.then()` answers after the data is durable.
import type { Sqlite } from './db.js';

type Op<T> = (sqlite: Sqlite) => T;

interface Pending {
  op: Op<unknown>;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

export class CommitQueue {
  private pending: Pending[] = [];
  private scheduled = false;
  private closed = false;
  /** Transactions committed so far (each result reports it, so that the writer knows). */
  readonly stats = { commits: 0 };
  /** Called after each COMMIT, before the batch's promises settle. */
  onCommitted: () => void = () => {};

  constructor(private readonly sqlite: Sqlite) {}

  write<T>(op: Op<T>): Promise<T> {
    if (this.closed) return Promise.reject(new Error('store is closed'));
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ op, resolve: resolve as (v: unknown) => void, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  /** Runs everything queued now; normally called from setImmediate. */
  flush(): void {
    this.scheduled = false;
    const batch = this.pending;
    this.pending = [];
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
    if (this.pending.length) this.flush();
    this.closed = true;
  }
}
