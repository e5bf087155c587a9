// Slows the answers to logins from an address that failed lately, never locking it out. The
// bookkeeping of one client (authClientKey): its recent failures, the answers held back for it,
// and the logins waiting their turn while MAX_AUTH_WAITING answers are held back.
import { ipv6Groups, isLoopback } from '../access-control.js';

const AUTH_FAILURE_DELAY_MS = 250;
const AUTH_FAILURE_MAX_DELAY_MS = 5000;
/** Failures older than this are forgotten. */
const FAILURE_MEMORY_MS = 15 * 60_000;
/** Clients whose failed logins are remembered (for the slow-down); the oldest go first. */
const MAX_AUTH_CLIENTS = 10_000;
/** Slowed answers held back at once for one client: at most 2 verdicts a second at the 5 s delay. */
const MAX_AUTH_WAITING = 10;

/**
 * Whose failed logins count together: every loopback address is one client (any local user can
 * send from any of 127/8's 16 million addresses), an IPv6 client is its /64 (what one host or
 * site is given), an IPv4 client its address.
 */
export function authClientKey(ip: string): string {
  if (isLoopback(ip)) return 'loopback';
  if (!ip.includes(':')) return ip;
  return `${ipv6Groups(ip).slice(0, 4).map((g) => g.toString(16)).join(':')}::/64`;
}

/** Logins of one client: the answers held back now, and those waiting their turn (first come, first served). */
interface Turns {
  held: number;
  queue: Array<{ gone: () => boolean; take: () => void }>;
}

export class LoginThrottle {
  /** Recent failures per client, in the order of their last failure (the oldest is forgotten first). */
  private readonly failures = new Map<string, { count: number; at: number }>();
  private readonly turns = new Map<string, Turns>();

  /** Failures from `client` that still count at `now` (0: answer at once). */
  recentFailures(client: string, now: number): number {
    const f = this.failures.get(client);
    return f && now - f.at < FAILURE_MEMORY_MS ? f.count : 0;
  }

  /** How long an answer waits after `failures` recent failures. */
  delayMs(failures: number): number {
    return failures > 0 ? Math.min(AUTH_FAILURE_DELAY_MS * 2 ** failures, AUTH_FAILURE_MAX_DELAY_MS) : 0;
  }

  /**
   * Takes a place for a held-back answer; with MAX_AUTH_WAITING held back already, queues `retry`
   * to run when one is answered instead (unless `gone` says its session closed meanwhile), and
   * returns false.
   */
  hold(client: string, gone: () => boolean, retry: () => void): boolean {
    const t = this.turns.get(client) ?? { held: 0, queue: [] };
    this.turns.set(client, t);
    if (t.held < MAX_AUTH_WAITING) {
      t.held++;
      return true;
    }
    t.queue = t.queue.filter((turn) => !turn.gone());
    t.queue.push({ gone, take: retry });
    return false;
  }

  /** A held-back answer was given: the next logins waiting their turn are looked at. */
  answered(client: string): void {
    const t = this.turns.get(client);
    if (!t) return;
    t.held--;
    while (t.held < MAX_AUTH_WAITING && t.queue.length > 0) {
      const turn = t.queue.shift();
      if (turn && !turn.gone()) turn.take();
    }
    if (t.held <= 0 && t.queue.length === 0 && this.turns.get(client) === t) this.turns.delete(client);
  }

  /**
   * Counted as a failure until its answer is given: a guesser that hung up must not learn from how
   * fast its next guess is answered that this one was right. Re-inserted, so that the Map's order
   * is the order of the last failures: at the limit the client that failed longest ago is
   * forgotten, never the one being slowed down now.
   */
  failed(client: string, count: number, now: number): void {
    this.failures.delete(client);
    this.failures.set(client, { count, at: now });
    if (this.failures.size > MAX_AUTH_CLIENTS) this.failures.delete(this.failures.keys().next().value as string);
  }

  /** A right login whose slowed answer its client read: its failures are forgotten. */
  succeeded(client: string): void {
    this.failures.delete(client);
  }
}
