// The delivery engine: claims due batches under a lease (group-committed writes), sends each
// batch upstream (or writes it locally), and applies the outcome fenced by the claim token.
// Invariants: at most workerCount attempts in flight; no worker sleeps through batchDelay or a
// backoff (the message's next_attempt_at says when it is due); a crash leaves claims, which the
// next start takes back (and which expire with their lease); a shutdown releases them itself.
import { performance } from 'node:perf_hooks';
import type tls from 'node:tls';
import type { Logger } from 'pino';
import { type Clock, isoTime } from '../clock.js';
import type { Config } from '../config/schema.js';
import { dueAfterOutageInSteps, lastDeliveryRequest, rememberedOutage } from '../store/admin.js';
import type { Sqlite } from '../store/db.js';
import type { UpstreamRecord } from '../store/queries.js';
import type { AttemptOutcome, RecipientStatus } from '../store/schema.js';
import {
  type BatchCompletion,
  type ClaimedBatch,
  type ClaimResult,
  type CompletionResult,
  countDueQueued,
  type DeliveredSoFar,
  hasDueWork,
  lastError,
} from '../store/delivery.js';
import type { StoreWriter } from '../store/writer.js';
import { exportFailedMessage, failedExportDir, removeFailedExport } from './failed-export.js';
import { FailedRetry } from './failed-retry.js';
import { InFlowGate, inFlowBacklogLimit } from './in-flow.js';
import { exportMissingFailures, type LeftoversContext, removeDeliveredExports, sweepCrashTempFiles } from './leftovers.js';
import { deliverLocally, LOCAL_UPSTREAM } from './local.js';
import { attemptRecord, type BatchResult, planCompletion, upstreamVerdict } from './outcomes.js';
import { giveUpReason } from './retry-policy.js';
import { settleWithin } from './settle.js';
import { suspensionMs, UpstreamSuspension } from './suspension.js';
import { SmtpUpstream } from './upstream.js';

export interface DeliveryDeps {
  config: Config;
  sqlite: Sqlite;
  writer: StoreWriter;
  clock: Clock;
  logger: Logger;
  /** Jitter source for the retry backoff, [0, 1) like Math.random. */
  random?: () => number;
  /** How often the engine looks for due work when nothing woke it. */
  pollIntervalMs?: number;
  /** Extra TLS options for the upstream connection (e.g. a private CA). */
  upstreamTls?: tls.ConnectionOptions;
  /** Test hook: the upstream's address as the AUTH policy sees it (default: the socket's peer). */
  upstreamAddress?: (socketAddress: string) => string;
  /** Deadline of one attempt; default: the lease minus 10 % (at least 1 s before it ends). */
  attemptTimeoutMs?: number;
  /** Test hook: the age from which a temp file counts as a crash's (default TEMP_FILE_MIN_AGE_MS). */
  tempFileMinAgeMs?: number;
}

/** The engine's live state, for /health and the tests; times are the clock's milliseconds. */
export interface DeliveryHealth extends UpstreamRecord {
  /** "host:port" of the smart host, or "local". */
  upstream: string;
  /** Attempts between claim and commit of their outcome (read by the tests; /health does not show it). */
  inFlight: number;
}

export interface RunReport {
  /** Batches attempted. */
  attempts: number;
  /** Failed messages put back in the queue by failedRetryInterval. */
  requeued: number;
}

/** An attempt the upstream answered, its outcome planned and being committed. */
interface SentAttempt {
  result: BatchResult;
  completion: BatchCompletion;
  durationMs: number;
  committed: Promise<CompletionResult>;
}

interface ActiveAttempt {
  claim: ClaimedBatch;
  /**
   * When the claim's lease ends, on the monotonic clock (performance.now()): the lease in the
   * database is wall-clock time, and a stepped clock must neither cut an attempt short (a forward
   * step would leave it no time to record its outcome, and the batch would go out again) nor
   * lengthen it.
   */
  leaseEndsAt: number;
  abort: AbortController;
  /** The upstream has answered; only the commit of the outcome is left. */
  answered: boolean;
  /** Still waiting for a failure to reach the upstream to be judged: nothing was sent yet. */
  waiting: boolean;
}

const DEFAULT_POLL_MS = 100;
/** After the grace period, how long released attempts get to notice their abort. */
const ABORT_SETTLE_MS = 1000;
/** A temp file this old was left by a crash (younger ones may be another process's). */
const TEMP_FILE_MIN_AGE_MS = 60_000;
/** A failed claim or outcome commit is tried again after this long, doubling up to the maximum. */
const FAULT_RETRY_FIRST_MS = 100;
const FAULT_RETRY_MAX_MS = 5000;
/** Once its tries are FAULT_RETRY_MAX_MS apart, a write still failing says so this often. */
const FAULT_RETRY_LOG_MS = 60_000;
/** Pacing is logged at most this often. */
const PACING_LOG_MS = 60_000;

/**
 * The waits between tries of a write that keeps failing (a claim, an outcome's commit): each twice
 * the one before, up to FAULT_RETRY_MAX_MS. Each failure is logged while the waits grow, then once
 * a minute (a write lock held for hours would otherwise log 720 lines an hour).
 */
class FaultPause {
  private waitMs = 0;
  private loggedAt = Number.NEGATIVE_INFINITY;

  /** The wait after one more failure, and whether to log that failure. */
  next(): { waitMs: number; log: boolean } {
    const growing = this.waitMs < FAULT_RETRY_MAX_MS;
    this.waitMs = Math.min(Math.max(2 * this.waitMs, FAULT_RETRY_FIRST_MS), FAULT_RETRY_MAX_MS);
    const log = growing || performance.now() - this.loggedAt >= FAULT_RETRY_LOG_MS;
    if (log) this.loggedAt = performance.now();
    return { waitMs: this.waitMs, log };
  }
}

export class DeliveryEngine {
  private readonly config: Config;
  private readonly log: Logger;
  private readonly random: () => number;
  private readonly upstream: SmtpUpstream | undefined;
  private readonly leaseMs: number;
  /** Paces intake while due mail waits for workers (inFlowDelay); intake asks it at each MAIL. */
  readonly inFlow: InFlowGate;
  /** An attempt takes at most this long, and must end (or be aborted) leaseMarginMs before its lease runs out. */
  readonly attemptTimeoutMs: number;
  private readonly leaseMarginMs: number;
  private readonly active = new Map<string, ActiveAttempt>();
  private readonly tasks = new Set<Promise<unknown>>();
  private readonly released = new Set<string>();
  /** Attempt slots taken: claims in progress plus attempts still talking to the upstream. */
  private busySlots = 0;
  private pumpScheduled = false;
  private running = false;
  private stopping = false;
  /** Shutdown's grace period is over: a failed outcome commit gets no further try. */
  private graceOver = false;
  /** Outcome commits waiting to be tried again; shutdown wakes them. */
  private readonly waitingRetries = new Set<() => void>();
  /** Claims sent to the writer and not yet settled; shutdown waits for them to hand them back. */
  private readonly claiming = new Set<Promise<unknown>>();
  private poll: NodeJS.Timeout | undefined;
  /** The second look for temp files a crash left (see start). */
  private tempSweep: NodeJS.Timeout | undefined;
  /** failedRetryInterval's scans of failed mail. */
  private readonly failedRetry: FailedRetry;
  private pacingLogged = { at: Number.NEGATIVE_INFINITY, ended: 0, timedOut: 0 };
  /** After a failed claim: no claim before this (performance.now()); the wait after the next failure doubles. */
  private claimsPausedUntil = 0;
  private claimPause = new FaultPause();
  /** An odd claim's extra message is new mail every other time. */
  private freshTurn = false;
  /**
   * Since when (the clock's ms) claiming due work has failed, the last error and how many claims
   * failed; null while it works.
   */
  private claimFault: { since: number; err: string; tries: number } | null = null;
  /** Delivery to the upstream suspended while it cannot be reached; none for local delivery. */
  private readonly suspension: UpstreamSuspension | undefined;
  /** Aborted when the stop begins: a probe of the upstream (probeUpstream) ends with it. */
  private readonly stopAbort = new AbortController();
  private readonly stats = {
    lastSuccessAt: null as number | null,
    lastFailureAt: null as number | null,
    consecutiveFailures: 0,
  };

  constructor(private readonly deps: DeliveryDeps) {
    this.config = deps.config;
    this.log = deps.logger;
    this.random = deps.random ?? Math.random;
    this.leaseMs = this.config.processingTimeout * 1000;
    this.inFlow = new InFlowGate(inFlowBacklogLimit(this.config.workerCount, this.config.queueSize), this.config.inFlowDelay);
    this.failedRetry = new FailedRetry({ ...deps, pacingLimit: this.inFlow.limit, requeued: () => this.wake() });
    this.leaseMarginMs = Math.max(1000, Math.floor(this.leaseMs / 10));
    this.attemptTimeoutMs = Math.min(deps.attemptTimeoutMs ?? Number.POSITIVE_INFINITY, this.leaseMs - this.leaseMarginMs);
    // Without time to send, every claim would be handed back as too late, and claimed again at once.
    if (!(this.attemptTimeoutMs > 0)) {
      const given = deps.attemptTimeoutMs === undefined ? '' : ` and attemptTimeoutMs ${deps.attemptTimeoutMs}`;
      throw new Error(`no time for an attempt: processingTimeout ${this.config.processingTimeout} s less the lease's ${this.leaseMarginMs} ms margin${given}`);
    }
    this.upstream = this.config.forwardSMTP
      ? new SmtpUpstream({
          host: this.config.forwardHost,
          port: this.config.forwardPort,
          secure: this.config.forwardSSL,
          requireTls: this.config.forwardRequireTLS,
          username: this.config.forwardUsername,
          password: this.config.forwardPassword,
          clientName: this.config.serverName,
          attemptTimeoutMs: this.attemptTimeoutMs,
          logger: this.log,
          tls: deps.upstreamTls,
          peerAddress: deps.upstreamAddress,
          now: () => deps.clock.now(),
          maxMessageSize: this.config.maxMessageSize,
          maxConnections: this.config.workerCount,
        })
      : undefined;
    this.suspension =
      this.upstream &&
      new UpstreamSuspension(
        this.upstream,
        suspensionMs(this.config.retry),
        deps.clock,
        this.log,
        () => lastDeliveryRequest(deps.sqlite),
        {
          reachedAgain: (since) => this.track(this.dueAfterOutage(since)),
          outageFrom: (since) => this.track(deps.writer.write('noteOutage', since)),
        },
      );
    const outage = this.suspension ? rememberedOutage(deps.sqlite) : null;
    if (outage !== null) this.suspension?.remember(outage);
  }

  get upstreamLabel(): string {
    return this.upstream?.label ?? LOCAL_UPSTREAM;
  }

  /** Live upstream status for /health (the API merges it with the persisted counters). */
  status(): DeliveryHealth {
    return { upstream: this.upstreamLabel, inFlight: this.active.size, ...this.stats };
  }

  /**
   * Claiming due work fails, since when and why (null while it works): a damaged page, a schema
   * changed under the relay. Mail is still taken then, but none leaves.
   */
  claimFailure(): { since: number; err: string } | null {
    return this.claimFault;
  }

  /** Starts polling for due work (and reacting to wake()). */
  start(): void {
    if (this.running || this.stopping) return;
    this.running = true;
    this.poll = setInterval(() => this.tick(), this.deps.pollIntervalMs ?? DEFAULT_POLL_MS);
    this.poll.unref();
    this.inFlow.setEnabled(true);
    this.log.info({ event: 'delivery.started', upstream: this.upstreamLabel, workers: this.config.workerCount }, 'delivery started');
    // A restart right after a crash (a supervisor's) finds that crash's temp files too young
    // to be told from another process's; once they have aged, what was older than this start goes.
    const startedAt = Date.now();
    const minAge = this.deps.tempFileMinAgeMs ?? TEMP_FILE_MIN_AGE_MS;
    const leftovers: LeftoversContext = {
      sqlite: this.deps.sqlite,
      emailsDir: this.config.emailsDir,
      log: this.log,
      stopping: () => this.stopping,
      exportFailed: (id) => this.exportFailed(id),
    };
    this.track(sweepCrashTempFiles(leftovers, startedAt - minAge));
    this.tempSweep = setTimeout(() => this.track(sweepCrashTempFiles(leftovers, startedAt)), minAge);
    this.tempSweep.unref();
    this.tick();
    this.track(exportMissingFailures(leftovers));
    this.track(removeDeliveredExports(leftovers));
  }

  /** Something may have become due (a commit of new mail): look now instead of at the next poll. */
  wake(): void {
    if (!this.running || this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  /**
   * Claims and delivers whatever is due now, until nothing is, and resolves when every outcome
   * is committed (and failed mail exported). For tests and tools that drive the clock.
   */
  async runOnce(): Promise<RunReport> {
    const requeued = await this.failedRetry.scan(true);
    let attempts = 0;
    // a stop ends the run: what it released is the next start's
    while (!this.stopping) {
      const claimed = await this.claim(this.config.workerCount);
      await Promise.all(claimed.finalized.map((f) => this.afterFinal(f.id, f.state, 0)));
      if (claimed.batches.length === 0) break;
      const made = await Promise.all(claimed.batches.map((b) => this.attempt(b)));
      attempts += made.filter(Boolean).length;
    }
    return { attempts, requeued };
  }

  /**
   * Stops claiming, lets in-flight attempts finish within `graceMs`, then releases the claims of
   * those that did not (due again at once) and aborts them. An outcome waiting to be committed
   * again is tried at once when shutdown begins, and once more when the grace period ends: the
   * upstream has it, and released it would go out again. A claim still being committed when the
   * grace period ends is waited for and handed back: left to the closing store, it would commit
   * and stay claimed until its lease ran out. Resolves before the store may close.
   */
  async stop(graceMs: number): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.running = false;
    this.stopAbort.abort(new Error('aborted: relayq is shutting down'));
    if (this.poll) clearInterval(this.poll);
    clearTimeout(this.tempSweep);
    this.inFlow.setEnabled(false);
    this.wakeWaitingRetries();
    await settleWithin(this.tasks, graceMs);
    this.graceOver = true;
    this.wakeWaitingRetries();
    if (this.claiming.size > 0) {
      this.log.info({ event: 'delivery.shutdown_claims', claims: this.claiming.size }, 'shutdown: waiting for claims being committed, to hand them back');
      await Promise.allSettled(this.claiming);
    }
    this.suspension?.stop();
    const unfinished = [...this.active.values()].filter((a) => !a.answered);
    if (unfinished.length > 0) {
      for (const a of unfinished) this.released.add(a.claim.token);
      // an attempt cut off has no result: it does not count towards retry.maxAttempts (a restart
      // during a slow upstream's last allowed attempt would fail the mail); one still waiting for
      // a judgement (see UpstreamSuspension) sent nothing, and its claim does not count either.
      // They are told apart once, before the first write: a judgement that came while it commits
      // would otherwise put an attempt in neither. The waiting ones are aborted first, so that none
      // goes out (sendBatch sees the abort as its wait ends) once released as never sent.
      const waiting = unfinished.filter((a) => a.waiting);
      const sending = unfinished.filter((a) => !a.waiting);
      for (const a of waiting) a.abort.abort(new Error('aborted: relayq is shutting down'));
      const releaseThose = (those: ActiveAttempt[], uncount: 'claim' | 'attempts') =>
        those.length > 0 ? this.release(those.map((a) => a.claim), { uncount }) : 0;
      const released = (await releaseThose(sending, 'attempts')) + (await releaseThose(waiting, 'claim'));
      this.log.warn(
        { event: 'delivery.released', released, ids: unfinished.map((a) => a.claim.messageId) },
        released === unfinished.length
          ? 'shutdown: unfinished deliveries stopped and released for the next start'
          : 'shutdown: unfinished deliveries stopped; those not released (no longer theirs, or their release failed) are taken back by the next start',
      );
      for (const a of unfinished) a.abort.abort(new Error('aborted: relayq is shutting down'));
    }
    if (this.active.size > 0) await settleWithin(this.tasks, ABORT_SETTLE_MS);
    await this.upstream?.close();
    this.notePacing(this.deps.clock.now(), true);
    this.log.info({ event: 'delivery.stopped' }, 'delivery stopped');
  }

  private tick(): void {
    if (!this.running) return;
    const now = this.deps.clock.now();
    if (this.failedRetry.due()) this.track(this.failedRetry.scan(false));
    if (this.inFlow.delayMs > 0 && performance.now() >= this.claimsPausedUntil) {
      try {
        this.inFlow.measured(countDueQueued(this.deps.sqlite, now, this.inFlow.limit));
      } catch (err) {
        this.pauseClaims(err as Error);
        return;
      }
      this.notePacing(now);
    }
    this.pump();
    // nothing claimed or in flight: after a suspension, a probe finds out whether the upstream is back
    if (this.busySlots === 0) this.probeUpstream();
  }

  /** A dead host probe when one is due (UpstreamSuspension.probe): a connection without a transaction. */
  private probeUpstream(): void {
    const { upstream, suspension } = this;
    if (!upstream || !suspension) return;
    const { signal } = this.stopAbort;
    const probing = suspension.probe(async () => {
      const result = await upstream.probe(signal);
      return signal.aborted ? undefined : result;
    });
    if (probing) this.track(probing);
  }

  /**
   * Looking for work or claiming it failed: a read on this thread (an I/O error, a schema changed
   * by another process) or the claim write (a full disk, a read-only file). Each would fail again
   * at every wake-up and poll: claims wait, longer each time, as outcome commits do.
   */
  private pauseClaims(err: Error): void {
    const { waitMs, log } = this.claimPause.next();
    this.claimsPausedUntil = performance.now() + waitMs;
    const fault = (this.claimFault ??= { since: this.deps.clock.now(), err: '', tries: 0 });
    fault.err = err.message;
    fault.tries++;
    if (log) this.log.error({ event: 'delivery.claim_failed', err: err.message, retryInMs: waitMs, tries: fault.tries }, 'claiming due work failed');
  }

  /** Looking for work, or claiming it, worked: after failures, said once. */
  private claimsWork(): void {
    if (!this.claimFault) return;
    this.claimPause = new FaultPause();
    const failedForMs = this.deps.clock.now() - this.claimFault.since;
    this.log.info({ event: 'delivery.claims_resumed', tries: this.claimFault.tries, failedForMs }, 'claiming due work works again');
    this.claimFault = null;
  }

  /**
   * Fills free attempt slots with due work: one claim write for all slots free now. A slot freed
   * while an earlier claim is still committing claims at once too (the writer runs claims one
   * after the other, so two never take the same message), and shares the commit of the outcome
   * that freed it instead of waiting for that claim to finish first.
   */
  private pump(): void {
    if (!this.running) return;
    const free = this.config.workerCount - this.busySlots;
    if (free <= 0 || performance.now() < this.claimsPausedUntil) return;
    const held = this.held();
    let due: boolean;
    try {
      due = hasDueWork(this.deps.sqlite, this.deps.clock.now(), held);
    } catch (err) {
      // also called when an attempt has its answer: a throw here would leave that attempt unsettled
      this.pauseClaims(err as Error);
      return;
    }
    if (!due) {
      this.claimsWork();
      return;
    }
    this.busySlots += free;
    const task = this.claim(free, held).then(
      (claimed) => {
        this.claimsWork();
        this.busySlots -= free - claimed.batches.length;
        this.inFlow.taken(claimed.batches.length);
        for (const f of claimed.finalized) this.track(this.afterFinal(f.id, f.state, 0));
        if (this.stopping) {
          // Claimed while shutdown began: hand them straight back, as if never claimed.
          this.busySlots -= claimed.batches.length;
          return this.release(claimed.batches, { uncount: 'claim' }).then(() => 0);
        }
        for (const batch of claimed.batches) {
          this.track(
            this.attempt(batch, () => {
              this.busySlots--;
              this.pump();
            }),
          );
        }
        return claimed.batches.length;
      },
      (err: Error) => {
        this.busySlots -= free;
        this.pauseClaims(err);
        return -1;
      },
    );
    this.claiming.add(task);
    const settled = () => this.claiming.delete(task);
    task.then(settled, settled);
    // Every free slot was filled: there may be more due work than slots.
    this.track(task.then((count) => count === free && this.wake()));
  }

  private async claim(limit: number, held = this.held()): Promise<ClaimResult> {
    const { clock, config } = this.deps;
    const now = clock.now();
    // Half the claims take new mail (never claimed yet), as Postfix's queue manager alternates
    // between its incoming and deferred queues: new mail is not held back while a backlog (an
    // outage's retries coming due, a retry of thousands of failed messages) drains.
    const fresh = (limit + (this.freshTurn ? 1 : 0)) >> 1;
    if (limit % 2 === 1) this.freshTurn = !this.freshTurn;
    const claimed = await this.deps.writer.write('claimDueBatches', {
      now,
      leaseMs: this.leaseMs,
      // Local delivery writes the message once for all of its recipients.
      batchSize: this.upstream ? config.batchSize : Number.POSITIVE_INFINITY,
      limit,
      fresh,
      maxAttempts: config.retry.maxAttempts,
      eraseRawOnDelivered: !config.security.logAllEmails,
      held,
    });
    // messages the claim found finished (their attempts used up) failed at `now`
    if (claimed.finalized.some((f) => f.state === 'failed')) this.failedRetry.failedAt(now);
    return claimed;
  }

  /** An attempt in progress is delivering this message (see DeliveryView). */
  holds(messageId: string): boolean {
    return this.held().includes(messageId);
  }

  /** The messages of the attempts in progress. */
  private held(): string[] {
    return Array.from(this.active.values(), (a) => a.claim.messageId);
  }

  /**
   * One attempt: send (bounded by the attempt deadline), then commit the outcome fenced by the
   * claim token. `onSent` frees the worker slot as soon as the upstream has answered, so the
   * next claim can share the transaction that commits this outcome. False: the claim came too
   * late to be used and was handed back.
   */
  private async attempt(claim: ClaimedBatch, onSent?: () => void): Promise<boolean> {
    const leaseEndsAt = performance.now() + (claim.leaseExpiresAt - this.deps.clock.now());
    const active: ActiveAttempt = { claim, leaseEndsAt, abort: new AbortController(), answered: false, waiting: false };
    this.active.set(claim.token, active);
    let sent: SentAttempt | 'late' | undefined;
    try {
      sent = await this.sendBatch(active);
    } catch (err) {
      this.log.error({ queueId: claim.messageId, event: 'delivery.attempt_error', err: (err as Error).message }, 'delivery attempt failed unexpectedly');
    } finally {
      onSent?.();
    }
    if (sent === 'late') return false;
    if (sent) await this.settle(claim, sent);
    else this.active.delete(claim.token);
    return true;
  }

  /**
   * Sends the batch and starts the commit of its outcome. 'late': nothing was tried (the claim
   * was handed back); undefined: cut off at shutdown after its claim was released.
   */
  private async sendBatch(active: ActiveAttempt): Promise<SentAttempt | 'late' | undefined> {
    const { clock, config } = this.deps;
    const { claim, abort } = active;
    const queueId = claim.messageId;
    if (this.suspension?.judging()) {
      active.waiting = true;
      await this.suspension.judged(abort.signal);
      active.waiting = false;
      if (abort.signal.aborted && this.released.delete(claim.token)) {
        // released at shutdown meanwhile, uncounted: the release made the message due again for the next start
        this.log.info({ queueId, event: 'delivery.attempt_released', batch: claim.batch }, 'attempt released at shutdown before it was sent');
        return undefined;
      }
    }
    const startedAt = clock.now();
    const started = performance.now();
    // The lease counts from the claim, not from now: a claim that took long to commit (a busy
    // writer) leaves the attempt less time, or the lease could run out while it still sends and
    // another worker would claim the message and send it a second time.
    const budgetMs = Math.floor(Math.min(this.attemptTimeoutMs, this.usableLeaseMs(active)));
    if (budgetMs <= 0) {
      // Nothing was tried: hand the claim back uncounted, due at once (the next claim gets a whole lease).
      this.log.warn({ queueId, event: 'delivery.claim_late', batch: claim.batch }, 'the claim committed too late to send before its lease ends; handed back');
      this.active.delete(claim.token);
      await this.release([claim], { uncount: 'claim' });
      return 'late';
    }
    // a batch whose deferral would end its retries is tried all the same: mail does not fail unoffered
    const suspended = this.lastChance(claim, startedAt) ? undefined : this.suspension?.deferral(claim.recipients.length);
    const result = suspended ?? (await this.send(claim, budgetMs, abort));
    const durationMs = performance.now() - started;
    if (abort.signal.aborted && this.released.delete(claim.token)) {
      // Cut off at shutdown after its claim was released: the release already made the
      // message due again for the next start, and the abort is no outcome to record. (An
      // answer that came before the abort is recorded: the release keeps the claim token.)
      this.log.info({ queueId, event: 'delivery.attempt_released', batch: claim.batch }, 'attempt aborted after its claim was released at shutdown');
      await this.recordCutOff(claim, result, startedAt, durationMs);
      return undefined;
    }
    // the attempt's end as the store records it (started_at + duration_ms), so that /health and
    // /metrics, which merge this with the store's record, agree with `relayq status` to the ms
    this.noteUpstreamVerdict(result, startedAt + Math.round(durationMs));
    // an attempt cut off by its deadline says nothing of whether the upstream can be reached
    if (!suspended && !abort.signal.aborted) this.suspension?.note(result, started, startedAt);
    const completion = planCompletion(claim, result, {
      now: clock.now(),
      startedAt,
      durationMs,
      retry: config.retry,
      batchDelayMs: config.batchDelay,
      continueOnError: config.continueOnError,
      eraseRawOnDelivered: !config.security.logAllEmails,
      random: this.random,
    });
    active.answered = true;
    return { result, completion, durationMs, committed: this.recordOutcome(completion, active) };
  }

  /** A deferral now would fail one of the batch's recipients (retry.maxAttempts or retry.maxAge). */
  private lastChance(claim: ClaimedBatch, now: number): boolean {
    return claim.recipients.some((r) => giveUpReason(r.attempts, claim.receivedAt, now, this.config.retry) !== undefined);
  }

  /** While delivery to the upstream is suspended, when the suspension ends (the clock's ms); else null. */
  suspendedUntil(): number | null {
    return this.suspension?.until() ?? null;
  }

  /** Since when the upstream could not be reached (the clock's ms; see UpstreamSuspension.unreachableSince); else null. */
  unreachableSince(): number | null {
    return this.suspension?.unreachableSince() ?? null;
  }

  /** Waits for the outcome's commit, logs the attempt, and acts on a final state. */
  private async settle(claim: ClaimedBatch, sent: SentAttempt): Promise<void> {
    const { result, completion, durationMs } = sent;
    const queueId = claim.messageId;
    let outcome: CompletionResult;
    try {
      outcome = await sent.committed;
    } catch (err) {
      this.log.error(
        { queueId, event: 'delivery.commit_failed', batch: claim.batch, err: (err as Error).message },
        'recording the delivery outcome failed at shutdown; the next start sends the batch again',
      );
      return;
    } finally {
      this.active.delete(claim.token);
    }
    const counts = { delivered: 0, failed: 0, deferred: 0 };
    for (const r of completion.recipients) counts[loggedStatus(r.status)]++;
    const line = {
      ...attemptLine(claim, result, completion.attempt.outcome, durationMs),
      ...counts,
      // `reply` is the transaction's: the recipients with a reply of their own say why they were not delivered
      ...notDelivered(claim, completion, result.reply),
    };
    this.released.delete(claim.token);
    if (outcome.leaseLost) {
      this.log.warn({ ...line, event: 'delivery.lease_lost' }, 'lease lost before the outcome was recorded; outcome not applied');
      return;
    }
    // a setting to fix (a wrong forwardPassword, an upstream without the TLS it needs), as Postfix warns of a SASL failure
    this.log[result.settingFault ? 'warn' : 'info'](
      {
        ...line,
        // continueOnError=false: the recipients of the message's other batches, failed with it
        ...(outcome.notAttempted > 0 ? { notAttempted: outcome.notAttempted } : {}),
        state: outcome.state,
        ...(outcome.state === 'queued' ? { nextAttemptAt: isoTime(outcome.nextAttemptAt) } : {}),
      },
      'delivery attempt',
    );
    if (outcome.state === 'failed') this.failedRetry.failedAt(completion.now);
    await this.afterFinal(claim.messageId, outcome.state, claim.claims);
  }

  /**
   * Gives claims back, due at once, their recipients' attempts not counted; with `uncount: 'claim'`,
   * as if never made (nothing was sent): the claim is not counted either. Resolves with how many
   * were released.
   */
  private release(batches: ClaimedBatch[], options: { uncount: 'claim' | 'attempts' }): Promise<number> {
    const claims = batches.map((b) => {
      const seqs = b.recipients.map((r) => r.seq);
      return { messageId: b.messageId, token: b.token, ...(options.uncount === 'claim' ? { unsent: seqs } : { unanswered: seqs }) };
    });
    return this.deps.writer.write('releaseClaims', claims, this.deps.clock.now()).catch((err: Error) => {
      this.log.error({ event: 'delivery.release_failed', err: err.message }, 'releasing claims failed: the next start takes them back');
      return 0;
    });
  }

  /**
   * An attempt reached the upstream after an outage that began at `since`: the mail the outage
   * deferred is made due at once, as `relayq retry --queued` would, instead of each message
   * waiting out its backoff (up to retry.maxDelay) while it, and with a full queue the new mail
   * refused with 452, could go.
   */
  private async dueAfterOutage(since: number): Promise<void> {
    const now = this.deps.clock.now();
    const count = await dueAfterOutageInSteps(
      this.deps.sqlite,
      now,
      since,
      (ids, outage) => this.deps.writer.write('makeDue', ids, now, this.config.batchDelay, outage),
      () => this.stopping,
    );
    // all of it made due: a start from now on has nothing to take up
    if (!this.stopping) await this.deps.writer.write('outageOver', since);
    if (count === 0) return;
    this.log.info({ event: 'delivery.due_after_outage', count }, 'the upstream was reached again: the mail the outage deferred is due now');
    this.wake();
  }

  /** Sends the batch upstream (or writes it locally), aborted after `budgetMs`. */
  private async send(claim: ClaimedBatch, budgetMs: number, abort: AbortController): Promise<BatchResult> {
    const deadline = setTimeout(() => {
      abort.abort(Object.assign(new Error(`timed out: the attempt exceeded ${budgetMs} ms (processingTimeout)`), { code: 'ETIMEDOUT' }));
    }, budgetMs);
    deadline.unref();
    try {
      return this.upstream
        ? await this.upstream.send(claim, abort.signal, (sofar) => this.recordDelivered(claim, sofar, abort))
        : await deliverLocally(this.config.emailsDir, claim);
    } finally {
      clearTimeout(deadline);
    }
  }

  /**
   * Before a batch goes on in another transaction: commits the recipients delivered so far, so
   * that only a crash in the moment after an upstream's `250` can send to them again, not one
   * during the transactions that follow (see recordDelivered). A failure is logged; the batch's
   * outcome records them anyway. A lease found lost ends the batch: another worker sends the rest.
   * The write looks at the lease also when none were delivered (every RCPT refused).
   */
  private async recordDelivered(claim: ClaimedBatch, sofar: BatchResult, abort: AbortController): Promise<void> {
    const recipients = deliveredIn(claim, sofar);
    const { messageId, token } = claim;
    const held = await this.deps.writer.write('recordDelivered', { messageId, token, now: this.deps.clock.now(), recipients }).catch((err: Error) => {
      this.log.warn(
        { queueId: messageId, event: 'delivery.progress_failed', batch: claim.batch, err: err.message },
        "recording the recipients delivered so far failed; the batch's outcome records them",
      );
      return true;
    });
    if (!held) abort.abort(new Error('lease lost: another worker holds the message now'));
  }

  /**
   * An attempt cut off at shutdown after an earlier transaction of its batch delivered: its row of
   * `attempts`, with that transaction's reply, and those recipients recorded delivered (again:
   * see recordDelivered, whose write may have failed). One cut off before anything was delivered
   * records nothing.
   */
  private async recordCutOff(claim: ClaimedBatch, result: BatchResult, startedAt: number, durationMs: number): Promise<void> {
    const recipients = deliveredIn(claim, result);
    if (recipients.length === 0) return;
    const { messageId, token } = claim;
    const attempt = attemptRecord(claim, result, recipients.length === claim.recipients.length ? 'delivered' : 'partial', startedAt, durationMs);
    const now = this.deps.clock.now();
    const recorded = await this.deps.writer.write('recordCutOffAttempt', { messageId, token, now, recipients, attempt }).catch((err: Error) => {
      this.log.warn(
        { queueId: messageId, event: 'delivery.progress_failed', batch: claim.batch, err: err.message },
        'recording the attempt cut off at shutdown failed; the next start sends the batch again to the recipients not recorded as delivered',
      );
      return false;
    });
    if (!recorded) return;
    this.log.info(
      {
        ...attemptLine(claim, result, attempt.outcome, durationMs),
        delivered: recipients.length,
        failed: 0,
        deferred: claim.recipients.length - recipients.length,
        state: 'queued',
        nextAttemptAt: isoTime(now),
      },
      'delivery attempt cut off at shutdown; the recipients not delivered are due at the next start',
    );
  }

  /** What is left of the claim's lease now, less the margin an attempt must keep to its end. */
  private usableLeaseMs(active: ActiveAttempt): number {
    return active.leaseEndsAt - performance.now() - this.leaseMarginMs;
  }

  /**
   * Commits an attempt's outcome. The upstream has answered, so a commit that fails (the writer
   * waited past its busy timeout behind another process, a full disk) is tried again, past the
   * end of the claim's lease too, until it lands or the shutdown's grace period ends: given up,
   * the batch would be claimed again and go out a second time. Meanwhile the message stays held,
   * and no other process claims it (this one holds the database's lock). Trying again is safe: the
   * failed transaction wrote nothing, and the write is fenced by the claim token. The first write
   * is sent at once, so that the next claim can share its commit. Shutdown cuts a wait short
   * (see stop()).
   */
  private async recordOutcome(completion: BatchCompletion, active: ActiveAttempt): Promise<CompletionResult> {
    const { claim } = active;
    const since = performance.now();
    const pause = new FaultPause();
    for (let tries = 1; ; tries++) {
      try {
        return await this.deps.writer.write('completeBatch', completion);
      } catch (err) {
        if (this.graceOver) throw err;
        const { waitMs, log } = pause.next();
        if (log) {
          this.log.warn(
            {
              queueId: claim.messageId,
              event: 'delivery.commit_retry',
              batch: claim.batch,
              err: (err as Error).message,
              retryInMs: waitMs,
              tries,
              waitingMs: Math.round(performance.now() - since),
            },
            'recording the delivery outcome failed; trying again',
          );
        }
        await this.retryPause(waitMs);
      }
    }
  }

  /** Waits `ms`, or less if shutdown wakes it. */
  private retryPause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.waitingRetries.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.waitingRetries.add(done);
    });
  }

  private wakeWaitingRetries(): void {
    for (const wake of [...this.waitingRetries]) wake();
  }

  /**
   * After the commit of an outcome: once it made the message final, export failed mail and drop a
   * stale export. A batch that leaves the message queued (its other batches not done) ends nothing.
   */
  private async afterFinal(id: string, state: string, claims: number): Promise<void> {
    if (state !== 'failed' && state !== 'delivered') return;
    const { config } = this.deps;
    const again = this.failedRetry.takeRetried(id);
    if (state === 'failed') {
      // logged whether or not the export was written: an alert on this event must not miss any
      const reason = lastError(this.deps.sqlite, id);
      const file = await this.exportFailed(id);
      const line = { event: again ? 'delivery.failed_again' : 'delivery.failed', queueId: id, reason, export: file ?? null };
      if (again) this.log.info(line, `message failed again after failedRetryInterval; ${file ? 'exported' : 'not exported'}`);
      else this.log.warn(line, file ? 'message failed; exported' : 'message failed; not exported');
    } else if (claims > 1) {
      // Only a message that needed more than one claim can have failed before (and been retried).
      try {
        if (await removeFailedExport(config.emailsDir, id)) {
          this.log.info({ event: 'delivery.export_removed', queueId: id }, 'delivered after a retry; failed export removed');
        }
      } catch (err) {
        this.log.warn(
          { event: 'delivery.export_not_removed', queueId: id, err: (err as Error).message },
          'delivered after a retry; its failed export could not be removed',
        );
      }
    }
  }

  /** Writes a failed message's JSON export; the file, or undefined if it was not written (logged). */
  private async exportFailed(id: string): Promise<string | undefined> {
    const { config, sqlite, clock } = this.deps;
    try {
      return await exportFailedMessage(sqlite, failedExportDir(config.emailsDir), id, clock.now());
    } catch (err) {
      this.log.error(
        { event: 'delivery.export_failed', queueId: id, err: (err as Error).message },
        'exporting the failed message failed; `relayq export-failed` can redo it',
      );
      return undefined;
    }
  }

  /**
   * At most once a minute: how many MAIL commands waited for delivery to catch up, and of those
   * how many waited the whole delay; `final` (the stop) logs what was counted since the last line
   * at once. A wait is counted once it has ended, when it is known whether it timed out: those
   * still waiting are only named (`waiting`), and counted in a later line.
   */
  private notePacing(now: number, final = false): void {
    const { delayed, timedOut, waiting, backlog, limit } = this.inFlow.stats();
    const ended = delayed - waiting;
    if (ended === this.pacingLogged.ended || (!final && now - this.pacingLogged.at < PACING_LOG_MS)) return;
    this.log.warn(
      { event: 'intake.paced', delayed: ended - this.pacingLogged.ended, timedOut: timedOut - this.pacingLogged.timedOut, waiting, backlog, limit },
      'delivery is behind: new mail waits at MAIL FROM (inFlowDelay)',
    );
    this.pacingLogged = { at: now, ended, timedOut };
  }

  /** What /health says of the upstream: the last success, the last failure, the failures in a row. */
  private noteUpstreamVerdict(result: BatchResult, endedAt: number): void {
    const verdict = upstreamVerdict(result);
    if (verdict === 'delivered') this.stats.lastSuccessAt = endedAt;
    else this.stats.lastFailureAt = endedAt;
    this.stats.consecutiveFailures = verdict === 'failed' ? this.stats.consecutiveFailures + 1 : 0;
  }

  private track<T>(task: Promise<T>): void {
    const tracked = task.catch((err: Error) => {
      this.log.error({ event: 'delivery.task_failed', err: err.message }, 'delivery task failed');
    });
    this.tasks.add(tracked);
    tracked.finally(() => this.tasks.delete(tracked));
  }
}

/** The recipients of a batch that `result` says were delivered, with the replies that did. */
function deliveredIn(claim: ClaimedBatch, result: BatchResult): DeliveredSoFar['recipients'] {
  return claim.recipients.flatMap((r, i) => {
    const res = result.recipients[i];
    return res.verdict === 'delivered' ? [{ seq: r.seq, attempts: r.attempts, code: res.code, reply: res.reply }] : [];
  });
}

/** A recipient still pending after an attempt was deferred by it: the log says so. */
function loggedStatus(status: RecipientStatus): 'deferred' | 'delivered' | 'failed' {
  return status === 'pending' ? 'deferred' : status;
}

/** Recipients the log lists at most per attempt line (its counts give them all). */
const MAX_LOGGED_RECIPIENTS = 10;
/** How many of a batch's addresses its attempt's log line names (batchSize is 20 by default). */
const MAX_TO_LOGGED = 100;

/** The fields of an attempt's `delivery.attempt` line that say what was sent where, and the answer. */
function attemptLine(claim: ClaimedBatch, result: BatchResult, outcome: AttemptOutcome, durationMs: number) {
  return {
    queueId: claim.messageId,
    event: 'delivery.attempt',
    batch: claim.batch,
    outcome,
    code: result.code,
    reply: result.reply,
    durationMs: Math.round(durationMs),
    upstream: result.upstream,
    ...(result.tls === undefined ? {} : { tls: result.tls }),
    // the batch's addresses, as Postfix's to=: a grep for an address finds each attempt for it
    // (up to MAX_TO_LOGGED: a batchSize of thousands would make lines that log shippers split)
    to: claim.recipients.slice(0, MAX_TO_LOGGED).map((r) => r.address),
    rcpts: claim.recipients.length,
  };
}

/** The recipients of a batch that were not delivered with a reply other than `reply`, each with its own. */
function notDelivered(claim: ClaimedBatch, completion: BatchCompletion, reply: string) {
  const addresses = new Map(claim.recipients.map((r) => [r.seq, r.address]));
  const own = completion.recipients
    .filter((r) => r.status !== 'delivered' && r.reply !== reply)
    .slice(0, MAX_LOGGED_RECIPIENTS)
    .map((r) => ({ to: addresses.get(r.seq), status: loggedStatus(r.status), reply: r.reply }));
  return own.length ? { notDelivered: own } : {};
}
