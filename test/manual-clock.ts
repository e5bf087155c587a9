import type { Clock } from '../src/clock.js';

/** A clock a test moves by hand: backoff, leases, rate windows and retention run without sleeping. */
export class ManualClock implements Clock {
  constructor(private t = Date.UTC(2026, 0, 1)) {}
  now(): number {
    return this.t;
  }
  advance(ms: number): void {
    this.t += ms;
  }
  set(ms: number): void {
    this.t = ms;
  }
}
