// When a temporarily failing recipient is tried again, and when relayq gives up on it. Pure
// functions of the attempt count, the message's age, the config and an injected random source,
// so tests can pin every delay.
import { count } from '../count.js';

export interface RetrySettings {
  maxAttempts: number;
  /** Seconds. */
  initialDelay: number;
  /** Seconds. */
  maxDelay: number;
  /** Seconds. */
  maxAge: number;
}

/** ± this fraction of the delay, so that mail deferred together does not return together. */
const JITTER = 0.1;

/**
 * Delay before attempt n+1 after the n-th attempt failed temporarily:
 * min(maxDelay, min(maxDelay, initialDelay × 2^(n-1)) × (1 ± 10 %)), in milliseconds.
 * `random` returns a number in [0, 1), like Math.random.
 */
export function backoffDelayMs(attempt: number, retry: Pick<RetrySettings, 'initialDelay' | 'maxDelay'>, random: () => number): number {
  const n = Math.max(1, attempt);
  // 2^(n-1) overflows to Infinity for large n; the cap makes that harmless.
  const base = Math.min(retry.maxDelay, retry.initialDelay * 2 ** (n - 1)) * 1000;
  const jittered = base * (1 + (2 * random() - 1) * JITTER);
  return Math.round(Math.min(retry.maxDelay * 1000, jittered));
}

export type GiveUpReason = 'max-attempts' | 'max-age';

/** Why a recipient that just failed temporarily is not tried again, if it is not. */
export function giveUpReason(attempts: number, receivedAt: number, now: number, retry: Pick<RetrySettings, 'maxAttempts' | 'maxAge'>): GiveUpReason | undefined {
  if (attempts >= retry.maxAttempts) return 'max-attempts';
  if (now - receivedAt >= retry.maxAge * 1000) return 'max-age';
  return undefined;
}

export function describeGiveUp(reason: GiveUpReason, attempts: number, retry: Pick<RetrySettings, 'maxAttempts' | 'maxAge'>): string {
  return reason === 'max-attempts'
    ? `gave up after ${count(attempts, 'attempt')} (retry.maxAttempts=${retry.maxAttempts})`
    : `gave up: message older than retry.maxAge (${retry.maxAge} s)`;
}
