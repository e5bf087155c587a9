// The clock every component reads. Production uses the system clock; tests inject one they
// can move (test/manual-clock.ts), so that backoff, leases, rate windows and retention run
// without sleeping. And a failure remembered for a while on the monotonic clock, for /health.
export interface Clock {
  now(): number;
}

export const systemClock: Clock = { now: () => Date.now() };

/** Milliseconds since the epoch → ISO 8601, keeping null for "never". */
export function isoTime(ms: number | null | undefined): string | null {
  return ms === null || ms === undefined ? null : new Date(ms).toISOString();
}

/**
 * The last failure of something (a write refused for lack of room, a spool file), remembered for
 * /health until something shows it is over. Timed on the monotonic clock (performance.now()),
 * which a stepped wall clock does not move.
 */
export class RecentFailure {
  private last: { at: number; message: string } | undefined;

  note(message: string): void {
    this.last = { at: performance.now(), message };
  }

  /** It is over, unless it happened after `startedAt` (performance.now()): what began before it says nothing of it. */
  clear(startedAt = Number.POSITIVE_INFINITY): void {
    if (this.last && this.last.at < startedAt) this.last = undefined;
  }

  /** Its message, if it happened less than `ms` ago. */
  within(ms: number): string | undefined {
    return this.last && performance.now() - this.last.at < ms ? this.last.message : undefined;
  }
}
