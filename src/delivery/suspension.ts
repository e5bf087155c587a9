// Postfix's dead host: an upstream that could not be reached, or refused the session (its
// greeting, relayq's login), suspends delivery to it for a while, and the batches that come due
// meanwhile are deferred without a connection attempt. With an upstream that lets connections
// hang, each attempt would otherwise cost its whole connection timeout, and the queue would fall
// behind its retry schedule; one that refuses the login would get a failed login from each.
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';
import type { Clock } from '../clock.js';
import { type BatchResult, uniformResult } from './outcomes.js';
import { backoffDelayMs, type RetrySettings } from './retry-policy.js';
import { whenAborted } from './settle.js';

/** The longest suspension. */
const MAX_MS = 60_000;

const SUSPENDED_REPLY = 'delivery temporarily suspended: ';

const RESUMED = {
  reached: 'the upstream was reached again: delivery resumes',
  operator: 'delivery resumes: an operator made mail due (the admin API, or relayq retry)',
};

/**
 * How long a suspension lasts: the shortest time after which a deferred batch is tried again (90 %
 * of retry.initialDelay), so that the batch that found the upstream down is never kept from its own
 * retry; at most a minute, so that with a long initialDelay mail that comes after a short outage
 * is not deferred for long.
 */
export function suspensionMs(retry: Pick<RetrySettings, 'initialDelay' | 'maxDelay'>): number {
  return Math.min(backoffDelayMs(1, retry, () => 0), MAX_MS);
}

/** What the upstream's connections say of whether it can be reached (SmtpUpstream). */
export interface Reachability {
  readonly label: string;
  reachedSince(since: number): boolean;
  setupsSettled(): Promise<void> | undefined;
}

export class UpstreamSuspension {
  /**
   * Until `until` (the clock's ms) or `perfUntil` (performance.now(), so that a clock stepped back
   * does not lengthen it), whichever comes first; `since`: when it began; `renewedAt`: when it was
   * last begun or renewed (an attempt after its end found the upstream unreachable again); `reply`:
   * the reply of the attempt that found the upstream unreachable.
   */
  private state: { since: number; renewedAt: number; until: number; perfUntil: number; reply: string } | null = null;
  /** performance.now() when an attempt last reached the upstream. */
  private lastReachedAt = Number.NEGATIVE_INFINITY;
  /** A failure to reach the upstream waits to be judged until the connections being set up with it are. */
  private verdict: Promise<void> | undefined;
  /** An attempt found the upstream unreachable, and none has reached it since (an operator's request may have ended the suspension meanwhile). */
  private outage = false;
  /** When the earliest attempt found failing in the outage began (the clock's ms, as its attempt row records it). */
  private outageSince = 0;
  /** A probe (see probe) is under way. */
  private probing = false;
  /** The outage's last failure was no login the upstream refused (see probe). */
  private probeable = false;
  private stopped = false;
  private readonly upstream: string;

  constructor(
    private readonly reach: Reachability,
    private readonly durationMs: number,
    private readonly clock: Clock,
    private readonly log: Logger,
    /** When an operator last made mail due, the clock's ms (lastDeliveryRequest: the admin API, `relayq retry`). */
    private readonly requested: () => number,
    private readonly hooks: {
      /** An attempt reached the upstream after an outage (see `outage`) that began at `since` (outageSince). */
      reachedAgain?: (since: number) => void;
      /** An outage began, or was found to have begun earlier, at `since`. */
      outageFrom?: (since: number) => void;
    } = {},
  ) {
    this.upstream = reach.label;
  }

  /**
   * Resolves once no failure waits to be judged (at once when none does), or when `signal` aborts.
   * An attempt waits for that before it sends, rather than open one more connection that may
   * hang as the others did.
   */
  async judged(signal: AbortSignal): Promise<void> {
    let aborted: Promise<void> | undefined;
    while (this.verdict && !signal.aborted) {
      aborted ??= whenAborted(signal);
      await Promise.race([this.verdict, aborted]);
    }
  }

  /** A failure waits to be judged (see judged). */
  judging(): boolean {
    return this.verdict !== undefined;
  }

  /**
   * While delivery is suspended, when that ends (the clock's ms); else null. An operator's request
   * that made mail due since it began ends it at this look, as `postqueue -f` makes Postfix forget
   * its dead hosts: each request at most one suspension, since the next begins (or the same is
   * renewed) after it.
   */
  until(): number | null {
    const s = this.state;
    if (!s || this.clock.now() >= s.until || performance.now() >= s.perfUntil) return null;
    if (this.lastRequest() >= s.renewedAt) {
      this.end('operator');
      return null;
    }
    return s.until;
  }

  /**
   * Since when the upstream could not be reached: from `upstream.suspended` to `upstream.resumed`,
   * through the suspensions renewed meanwhile and the gaps between them (when until() is null
   * until the next attempt finds the upstream still down); else null.
   */
  unreachableSince(): number | null {
    this.until(); // an operator's request ends it
    return this.state?.since ?? null;
  }

  /** When an operator last made mail due (see `requested`); never when a database fault keeps it from being read. */
  private lastRequest(): number {
    try {
      return this.requested();
    } catch {
      return Number.NEGATIVE_INFINITY;
    }
  }

  /** While delivery is suspended, a batch's result without an attempt: every recipient deferred. */
  deferral(recipients: number): BatchResult | undefined {
    if (!this.state || this.until() === null) return undefined;
    return uniformResult(this.upstream, recipients, 'deferred', SUSPENDED_REPLY + this.state.reply);
  }

  /**
   * After an attempt that tried the upstream (begun at `started`, performance.now(), and at
   * `startedAt` on the clock, as its attempt row records it): one that reached it ends a
   * suspension; one that could not suspends delivery, unless the upstream was
   * reached meanwhile (another attempt, a new connection) or another attempt is in a transaction
   * with it now: one failed connection among working ones is not the upstream down. Connections
   * still being set up are waited for before that is judged (as Postfix judges a cohort of
   * connections), and other attempts wait meanwhile (see judged).
   * Once a suspension is over, attempts try the upstream again: the first that fails to reach it
   * suspends delivery again (said once, not at each renewal).
   */
  note(result: BatchResult, started: number, startedAt = this.clock.now()): void {
    if (!result.unreachable) {
      this.lastReachedAt = performance.now();
      this.end('reached');
      if (this.outage && !this.stopped) {
        this.outage = false;
        this.hooks.reachedAgain?.(this.outageSince);
      }
      return;
    }
    const settled = this.reach.setupsSettled();
    if (!settled) {
      this.judge(result, started, startedAt);
      return;
    }
    const verdict = settled.then(() => {
      if (this.verdict === verdict) this.verdict = undefined;
      this.judge(result, started, startedAt);
    });
    this.verdict = verdict;
  }

  /**
   * After a suspension in an outage, with no batch due to find out whether the upstream is back
   * (the caller looks): `connect` sets up a connection without a transaction, judged as an attempt
   * would be. One that reaches the upstream ends the outage (and the mail the outage deferred is
   * made due: reachedAgain); one that fails begins the next suspension, so there is one probe per
   * suspension at most. None after a login the upstream refused: relayq's settings need fixing,
   * and a failed login a minute may look like password guessing to the upstream (the mail's own
   * retries still try it). Undefined when none is due.
   */
  probe(connect: () => Promise<BatchResult | undefined>): Promise<void> | undefined {
    if (!this.outage || !this.probeable || this.stopped || this.probing || this.verdict || this.until() !== null) return undefined;
    this.probing = true;
    const startedAt = this.clock.now();
    const started = performance.now();
    return connect()
      .then((result) => {
        // undefined: cut off by the stop, which says nothing of the upstream
        if (result && !this.stopped) this.note(result, started, startedAt);
      })
      .finally(() => {
        this.probing = false;
      });
  }

  /**
   * An outage an earlier run of the relay found, whose mail was not yet made due (noteOutage): the
   * first attempt or probe that reaches the upstream makes it due, as if found by this run.
   */
  remember(since: number): void {
    this.outage = true;
    this.outageSince = since;
    this.probeable = true;
  }

  /** At shutdown: the connections a judgement waits for end by their abort, which says nothing of the upstream. */
  stop(): void {
    this.stopped = true;
  }

  private judge(result: BatchResult, started: number, startedAt: number): void {
    if (this.stopped || this.lastReachedAt > started || this.reach.reachedSince(started)) return;
    const now = this.clock.now();
    const since = this.state?.since;
    this.state = { since: since ?? now, renewedAt: now, until: now + this.durationMs, perfUntil: performance.now() + this.durationMs, reply: result.reply };
    // from the start of the earliest attempt found failing in it: those of one cohort fail together
    const outageSince = this.outage ? Math.min(this.outageSince, startedAt) : startedAt;
    if (!this.outage || outageSince < this.outageSince) this.hooks.outageFrom?.(outageSince);
    this.outageSince = outageSince;
    this.outage = true;
    this.probeable = result.settingFault !== true;
    if (since !== undefined) return;
    this.log.warn(
      { event: 'upstream.suspended', upstream: this.upstream, reply: result.reply, forMs: this.durationMs },
      'the upstream could not be reached, or refused the session: delivery is suspended, and batches that come due meanwhile are deferred without a connection attempt',
    );
  }

  /** Ends a suspension: an attempt reached the upstream, or an operator made mail due. */
  private end(why: keyof typeof RESUMED): void {
    const s = this.state;
    if (!s) return;
    this.state = null;
    this.log.info(
      { event: 'upstream.resumed', upstream: this.upstream, by: why, suspendedMs: Math.max(0, this.clock.now() - s.since) },
      RESUMED[why],
    );
  }
}
