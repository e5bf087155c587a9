// In-flow pacing, modelled on Postfix's in_flow_delay: while at least `limit` due messages wait
// for a worker, each new MAIL FROM waits until delivery has taken some (or at most `delayMs`), so
// that intake cannot outrun delivery for long and the queue does not grow without bound. Nothing
// is refused: a client that waits the whole delay goes ahead anyway.
//
// The backlog (due mail not yet claimed) is measured by the delivery engine at each poll and kept
// current in between: +1 per admitted MAIL, minus each claim. The estimate drifts (a refused or
// abandoned message, a retry that came due) only until the next measurement.

export interface InFlowStats {
  /** Due messages waiting for a worker, as last measured or estimated. */
  backlog: number;
  /** MAIL waits while the backlog is at least this. */
  limit: number;
  /** MAIL commands that had to wait, and those of them that waited the whole delay. */
  delayed: number;
  timedOut: number;
  /** Sessions waiting now. */
  waiting: number;
}

/**
 * inFlowDelay: intake waits while this many due messages wait for a worker: 100 per worker, at
 * most 10,000 (the poll counts up to that many index entries) and at most half of queueSize (so
 * that pacing starts well before the queue is full and refuses mail).
 */
export function inFlowBacklogLimit(workerCount: number, queueSize: number): number {
  return Math.min(workerCount * 100, 10_000, queueSize > 0 ? Math.max(1, Math.floor(queueSize / 2)) : Number.POSITIVE_INFINITY);
}

interface Waiter {
  admit: () => void;
  timer: NodeJS.Timeout;
}

/** A MAIL's wait. `cancel()` when its session closes: it gives up its place and never settles. */
type InFlowWait = Promise<void> & { cancel(): void };

export class InFlowGate {
  private backlog = 0;
  private enabled = false;
  private readonly waiters: Waiter[] = [];
  private delayed = 0;
  private timedOut = 0;

  constructor(
    /** MAIL waits while the backlog is at least this. */
    readonly limit: number,
    /** Longest wait of one MAIL; 0 = never wait. */
    readonly delayMs: number,
  ) {}

  /** Undefined when the MAIL may go ahead at once; otherwise resolves when it may. */
  admit(): InFlowWait | undefined {
    if (!this.enabled || (this.backlog < this.limit && this.waiters.length === 0)) {
      this.backlog++;
      return undefined;
    }
    this.delayed++;
    let resolve!: () => void;
    const wait = new Promise<void>((r) => {
      resolve = r;
    });
    const waiter: Waiter = {
      admit: () => {
        clearTimeout(waiter.timer);
        this.backlog++;
        resolve();
      },
      timer: setTimeout(() => {
        if (!this.remove(waiter)) return;
        this.timedOut++;
        waiter.admit();
      }, this.delayMs),
    };
    this.waiters.push(waiter);
    const cancel = () => {
      if (this.remove(waiter)) clearTimeout(waiter.timer);
    };
    return Object.assign(wait, { cancel });
  }

  /** Pacing on (the engine runs) or off (it stopped: everyone waiting goes ahead). */
  setEnabled(enabled: boolean): void {
    this.enabled = enabled && this.delayMs > 0;
    if (!this.enabled) this.release(Number.POSITIVE_INFINITY);
  }

  /** The backlog as counted in the store (at most `limit`: beyond it the count does not matter). */
  measured(backlog: number): void {
    this.backlog = backlog;
    this.release(this.limit);
  }

  /** Workers claimed `count` messages. */
  taken(count: number): void {
    this.backlog = Math.max(0, this.backlog - count);
    this.release(this.limit);
  }

  stats(): InFlowStats {
    return { backlog: this.backlog, limit: this.limit, delayed: this.delayed, timedOut: this.timedOut, waiting: this.waiters.length };
  }

  private remove(waiter: Waiter): boolean {
    const i = this.waiters.indexOf(waiter);
    if (i >= 0) this.waiters.splice(i, 1);
    return i >= 0;
  }

  /** Lets waiting sessions go, oldest first, while the backlog is under `limit`. */
  private release(limit: number): void {
    while (this.waiters.length > 0 && this.backlog < limit) this.waiters.shift()?.admit();
  }
}
