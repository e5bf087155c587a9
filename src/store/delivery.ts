// The delivery side of the queue: claiming due batches under a lease, applying a batch's outcome,
// releasing claims, and requeueing temporarily failed mail. Invariants: a claim and its attempt
// count are one write; every later change to a claimed message is fenced by its lease token
// (`WHERE id = ? AND lease_token = ?`), so a worker that lost its lease can never overwrite the
// work of the one that holds it now; a delivered recipient is never made pending again.
import { count } from '../count.js';
import type { Sqlite } from './db.js';
import type { AttemptOutcome, MessageState, RecipientStatus } from './schema.js';
import { prepared } from './statements.js';

// INDEXED BY: without it SQLite's planner (no ANALYZE statistics) prefers the (state, ...)
// indexes, which walk every queued row and sort them: a claim would cost O(backlog).
/** Queued messages due at `?`, read through the partial index `messages_due`. */
const DUE = `FROM messages INDEXED BY messages_due WHERE state = 'queued' AND next_attempt_at <= ?`;
/** Due mail never claimed yet, through the partial index `messages_new`. */
const NEW = `FROM messages INDEXED BY messages_new WHERE state = 'queued' AND claims = 0 AND next_attempt_at <= ?`;
/** Claims of a crashed or stuck worker whose lease ran out by `?`, through `messages_lease`. */
const EXPIRED = `FROM messages INDEXED BY messages_lease WHERE state = 'sending' AND lease_expires_at <= ?`;
/** Due work: in index order, so the first rows are the due ones. */
export const SELECT_DUE_SQL = `SELECT id ${DUE} ORDER BY next_attempt_at LIMIT CAST(? AS INTEGER)`;
/** New mail, in the order it came. */
export const SELECT_NEW_SQL = `SELECT id ${NEW} ORDER BY next_attempt_at LIMIT CAST(? AS INTEGER)`;
export const SELECT_EXPIRED_SQL = `SELECT id ${EXPIRED} ORDER BY lease_expires_at LIMIT CAST(? AS INTEGER)`;

export interface ClaimedRecipient {
  seq: number;
  address: string;
  /** Attempts including this one (counted when the batch was claimed). */
  attempts: number;
}

export interface ClaimedBatch {
  messageId: string;
  token: string;
  /** Index of the batch within the message: floor(seq / batchSize) of each of its recipients. */
  batch: number;
  /** This is a retry, and an earlier attempt of this batch delivered to some of its recipients. */
  deliveredBefore: boolean;
  mailFrom: string;
  /** The client asked for SMTPUTF8 (RFC 6531). */
  smtpUtf8: boolean;
  /**
   * The stored bytes; null only if the content was erased, which never happens to pending mail.
   * A Uint8Array, not a Buffer: it comes from the writer thread, and a structured clone does not
   * keep Buffer's methods.
   */
  raw: Uint8Array | null;
  receivedAt: number;
  /** Claims of this message so far, this one included. */
  claims: number;
  leaseExpiresAt: number;
  recipients: ClaimedRecipient[];
}

/** A message that reached a final state inside a claim (every recipient given up or done). */
export interface FinalizedMessage {
  id: string;
  state: 'delivered' | 'failed';
}

export interface ClaimOptions {
  now: number;
  leaseMs: number;
  /** Max recipients in the batch; Infinity takes every due recipient (local delivery). */
  batchSize: number;
  /** Max messages to claim in this write. */
  limit: number;
  /** Of them, how many are taken from the mail never claimed yet (the rest, and what it lacks, from all due mail). */
  fresh?: number;
  /** Recipients that already used this many attempts are failed, not sent (usedUpAttemptsReason says why). */
  maxAttempts: number;
  /** A message found with every recipient delivered loses its content (security.logAllEmails=false). */
  eraseRawOnDelivered: boolean;
  newToken: () => string;
  /** Messages this process is sending now: never claimed again, even when their lease looks expired. */
  held?: readonly string[];
}

export interface ClaimResult {
  batches: ClaimedBatch[];
  finalized: FinalizedMessage[];
}

/** True when something is due now: a cheap read that spares the poller an empty write. */
export function hasDueWork(sqlite: Sqlite, now: number, held: readonly string[] = []): boolean {
  const row = prepared(sqlite, `SELECT EXISTS (SELECT 1 ${DUE}) AS due, EXISTS (SELECT 1 ${EXPIRED}) AS expired`).get(now, now) as {
    due: number;
    expired: number;
  };
  if (row.due === 1) return true;
  // an expired claim counts unless it is one of ours (read again only then)
  return row.expired === 1 && (held.length === 0 || expiredClaims(sqlite, now, 1, held).length > 0);
}

/**
 * Messages whose lease ran out by `now`, up to `limit`, except those this process holds: the lease
 * is a wall-clock time, so a clock stepped forward by more than it during an attempt makes the
 * attempt's own message look abandoned (its attempt still ends on time, on a timer).
 */
function expiredClaims(sqlite: Sqlite, now: number, limit: number, held: readonly string[]): Array<{ id: string }> {
  const rows = prepared(sqlite, SELECT_EXPIRED_SQL).all(now, limit + held.length) as Array<{ id: string }>;
  return rows.filter((r) => !held.includes(r.id)).slice(0, limit);
}

/** Why a message last failed or waits (messages.last_error), for the log; null if it is gone. */
export function lastError(sqlite: Sqlite, id: string): string | null {
  const row = prepared(sqlite, 'SELECT last_error FROM messages WHERE id = ?').get(id) as { last_error: string | null } | undefined;
  return row?.last_error ?? null;
}

/**
 * Queued messages that are due now, counted up to `limit` (the in-flow backlog). The rows of
 * SELECT_DUE_SQL, but `SELECT 1`: the index alone answers, without a lookup of each row for its
 * id (counting 1,600 that way took twice as long).
 */
export function countDueQueued(sqlite: Sqlite, now: number, limit: number): number {
  const row = prepared(
    sqlite,
    `SELECT count(*) AS n FROM (SELECT 1 ${DUE} LIMIT CAST(? AS INTEGER))`,
  ).get(now, limit) as { n: number };
  return row.n;
}

/**
 * Claims up to `limit` messages that are due (or whose lease expired: those first; then up to
 * `fresh` never claimed yet, and the rest the oldest due) and, for each, the due
 * pending recipients of one of its batches (claimMessage says which), in RCPT order. Sets the
 * lease and a fresh token, counts the claim and the batch recipients' attempts. Run inside
 * `writer.write`.
 */
export function claimDueBatches(sqlite: Sqlite, options: ClaimOptions): ClaimResult {
  const { now, limit } = options;
  const expired = expiredClaims(sqlite, now, limit, options.held ?? []);
  const room = limit - expired.length;
  const wanted = Math.min(options.fresh ?? 0, room);
  const fresh = wanted > 0 ? (prepared(sqlite, SELECT_NEW_SQL).all(now, wanted) as Array<{ id: string }>) : [];
  // the oldest due, past the new mail just taken if they hold it too
  const taken = new Set(fresh.map((r) => r.id));
  const oldest = room > fresh.length ? (prepared(sqlite, SELECT_DUE_SQL).all(now, room) as Array<{ id: string }>) : [];
  const due = [...fresh, ...oldest.filter((r) => !taken.has(r.id)).slice(0, room - fresh.length)];
  const result: ClaimResult = { batches: [], finalized: [] };
  for (const { id } of [...expired, ...due]) {
    const batch = claimMessage(sqlite, id, options, result);
    if (batch) result.batches.push(batch);
  }
  return result;
}

const GAVE_UP_UNFINISHED = 'gave up: the maximum number of attempts was used without a result';

/**
 * Why a recipient whose attempts are used up when its batch is claimed is given up. Attempts are
 * counted at the claim: with one of them not recorded, a batch never finished (the process died
 * while it was out; a stop's release undoes the count of what it cut off); with every one
 * recorded, retry.maxAttempts was lowered below them since.
 */
function usedUpAttemptsReason(sqlite: Sqlite, id: string, recipient: { address: string; attempts: number }, maxAttempts: number): string {
  const { recorded } = prepared(
    sqlite,
    'SELECT count(*) AS recorded FROM attempts WHERE message_id = ? AND EXISTS (SELECT 1 FROM json_each(recipients) WHERE value = ?)',
  ).get(id, recipient.address) as { recorded: number };
  if (recorded < recipient.attempts) return GAVE_UP_UNFINISHED;
  return `gave up: retry.maxAttempts is ${maxAttempts}, and it has had ${count(recipient.attempts, 'attempt')}`;
}

/** The batch a recipient belongs to: its place in RCPT order divided by batchSize. */
function batchOf(seq: number, batchSize: number): number {
  return Number.isFinite(batchSize) ? Math.floor(seq / batchSize) : 0;
}

/** The range of seq, [first, end), of a batch's recipients. */
function seqRange(batch: number, batchSize: number): [number, number] {
  return Number.isFinite(batchSize) ? [batch * batchSize, (batch + 1) * batchSize] : [0, Number.MAX_SAFE_INTEGER];
}

type PendingRecipient = { seq: number; address: string; attempts: number; last_reply: string | null };

/** A message's pending recipients due now (binds the message's id and now). */
const DUE_RECIPIENTS = "FROM recipients WHERE message_id = ? AND status = 'pending' AND next_attempt_at <= ?";
/** Of those with attempts left (binds maxAttempts), the one that has waited longest. */
const LONGEST_WAITING_SQL = `SELECT seq ${DUE_RECIPIENTS} AND attempts < ? ORDER BY next_attempt_at, seq LIMIT 1`;
/** Those in a range of seq, [?, ?). */
const DUE_IN_RANGE_SQL = `SELECT seq, address, attempts, last_reply ${DUE_RECIPIENTS} AND seq >= ? AND seq < ? ORDER BY seq`;

/**
 * Claims one batch of a due message: its due pending recipients, or those of the batch whose
 * recipient has waited longest; recipients with their attempts used up are failed instead.
 * Undefined when none is left to send (the message is settled where its recipients say).
 */
function claimMessage(sqlite: Sqlite, id: string, options: ClaimOptions, result: ClaimResult): ClaimedBatch | undefined {
  const { now, batchSize, maxAttempts } = options;
  // A transaction holds the due recipients of one batch: the batch of the recipient that has
  // waited longest (the first in RCPT order among equals), so a batch not tried yet goes before
  // the retry of an earlier one, which would otherwise take every turn while its retries come due
  // within batchDelay. Only that batch's rows are read: a message may have 100,000 recipients.
  const first = prepared(sqlite, LONGEST_WAITING_SQL).get(id, now, maxAttempts) as { seq: number } | undefined;
  const batch = first && batchOf(first.seq, batchSize);
  // with none to send, every due recipient has used up its attempts
  const [from, end] = batch === undefined ? [0, Number.MAX_SAFE_INTEGER] : seqRange(batch, batchSize);
  const pending = prepared(sqlite, DUE_IN_RANGE_SQL).all(id, now, from, end) as PendingRecipient[];
  const chosen: ClaimedRecipient[] = [];
  let gaveUp: string | null = null;
  let retry = false;
  for (const r of pending) {
    // Attempts are counted at claim time, so a batch whose delivery kills the process every
    // time still runs out of attempts instead of looping forever.
    if (r.attempts >= maxAttempts) {
      gaveUp = giveUp(sqlite, id, r, maxAttempts, now);
      continue;
    }
    if (r.last_reply !== null) retry = true;
    chosen.push({ seq: r.seq, address: r.address, attempts: r.attempts + 1 });
  }
  if (batch === undefined) {
    // Nothing to send now: put the message back where its recipients say it belongs.
    const settled = settleMessage(sqlite, id, now, {
      nextAttemptFloor: now,
      lastFailure: gaveUp,
      eraseRawOnDelivered: options.eraseRawOnDelivered,
    });
    if (settled.state === 'delivered' || settled.state === 'failed') result.finalized.push({ id, state: settled.state });
    return undefined;
  }
  return leaseBatch(sqlite, id, batch, chosen, retry, options);
}

/**
 * Fails a recipient whose attempts are used up, with its last reply and why; returns the
 * message's last error naming it. Both as an attempt's give-up writes them (planCompletion): the
 * reply first, so that its codes lead.
 */
function giveUp(sqlite: Sqlite, id: string, r: PendingRecipient, maxAttempts: number, now: number): string {
  const reason = usedUpAttemptsReason(sqlite, id, r, maxAttempts);
  const reply = r.last_reply ? `${r.last_reply} (${reason})` : reason;
  prepared(
    sqlite,
    `UPDATE recipients SET status = 'failed', temporary = 1, last_reply = ?, updated_at = ?
     WHERE message_id = ? AND seq = ? AND status = 'pending'`,
  ).run(reply, now, id, r.seq);
  return r.last_reply ? `${r.address}: ${reason}; last reply: ${r.last_reply}` : `${r.address}: ${reason}`;
}

/**
 * Leases the message to the batch of `chosen` recipients: a fresh token and lease, the claim and
 * the recipients' attempts counted; the message's bytes read for sending. `retry`: one of them
 * was tried before.
 */
function leaseBatch(sqlite: Sqlite, id: string, batch: number, chosen: ClaimedRecipient[], retry: boolean, options: ClaimOptions): ClaimedBatch {
  const { now, batchSize } = options;
  const token = options.newToken();
  const leaseExpiresAt = now + options.leaseMs;
  prepared(
    sqlite,
    `UPDATE messages SET state = 'sending', lease_token = ?, lease_expires_at = ?, claims = claims + 1, updated_at = ?
     WHERE id = ?`,
  ).run(token, leaseExpiresAt, now, id);
  const countAttempt = prepared(
    sqlite,
    'UPDATE recipients SET attempts = attempts + 1, updated_at = ? WHERE message_id = ? AND seq = ?',
  );
  for (const r of chosen) countAttempt.run(now, id, r.seq);
  const message = prepared(
    sqlite,
    `SELECT mail_from, smtputf8, (SELECT raw FROM message_bodies WHERE id = body_id) AS raw, received_at, claims
     FROM messages WHERE id = ?`,
  ).get(id) as {
    mail_from: string;
    smtputf8: number;
    raw: Buffer | null;
    received_at: number;
    claims: number;
  };
  // a retry (a recipient of it was tried before) of a batch that delivered to others; a first try
  // is never one, also where a batchSize changed since has put delivered recipients in its batch
  const deliveredBefore =
    retry &&
    (
      prepared(
        sqlite,
        `SELECT EXISTS (SELECT 1 FROM recipients WHERE message_id = ? AND seq >= ? AND seq < ? AND status = 'delivered') AS d`,
      ).get(id, ...seqRange(batch, batchSize)) as { d: number }
    ).d === 1;
  return {
    messageId: id,
    token,
    batch,
    deliveredBefore,
    mailFrom: message.mail_from,
    smtpUtf8: message.smtputf8 === 1,
    raw: message.raw,
    receivedAt: message.received_at,
    claims: message.claims,
    leaseExpiresAt,
    recipients: chosen,
  };
}

export interface RecipientOutcome {
  seq: number;
  /** The recipient's attempts with this one, as its claim counted them. */
  attempts: number;
  status: RecipientStatus;
  code: number | null;
  reply: string;
  /** The failure (or deferral) was temporary: 4xx, network, TLS, timeout. */
  temporary: boolean;
  /** When a still pending recipient is due again. */
  nextAttemptAt: number;
}

/** A row of `attempts`. */
export interface AttemptRecord {
  batch: number;
  recipients: string[];
  upstream: string;
  startedAt: number;
  durationMs: number;
  outcome: AttemptOutcome;
  code: number | null;
  reply: string;
}

export interface BatchCompletion {
  messageId: string;
  token: string;
  now: number;
  attempt: AttemptRecord;
  recipients: RecipientOutcome[];
  /**
   * continueOnError=false after a permanent failure: every other pending recipient fails for this
   * reason ("not attempted: …", or "not attempted again: …" before the last reply of one that
   * was deferred earlier, whose last code is kept).
   */
  failRemaining?: string;
  /** failRemaining failed recipients of this batch that had been deferred. */
  stoppedInBatch?: boolean;
  /**
   * The attempt failed for the upstream's or the network's sake, not because of this mail
   * (outcomes.ts, upstreamVerdict): the run of failures `/health` reads grows; otherwise it ends.
   */
  upstreamFailed: boolean;
  /** The message's next batch is not due before now + batchDelay. */
  batchDelayMs: number;
  eraseRawOnDelivered: boolean;
  /** This batch's last failure, as the message reports it (`address: reply`); null when none failed. */
  lastFailure: string | null;
}

export type CompletionResult =
  | { leaseLost: true }
  /** `notAttempted`: the recipients of the message's other batches that failRemaining failed. */
  | { leaseLost: false; state: MessageState; nextAttemptAt: number; notAttempted: number };

const LEASE_LOST_REPLY = 'lease lost before this outcome was recorded, so it was not applied: ';

/**
 * Records the attempt and applies a batch's outcome, fenced by the claim token: zero rows means
 * the lease was lost, and only the attempt (its reply says so; another claim owns the recipients
 * now) and the upstream's run of failures are recorded. Otherwise updates the batch recipients
 * and moves the message to its next state (back to 'queued' with the lease released, or to a
 * final state).
 */
export function completeBatch(sqlite: Sqlite, c: BatchCompletion): CompletionResult {
  const fenced = prepared(sqlite, 'UPDATE messages SET updated_at = ? WHERE id = ? AND lease_token = ?').run(
    c.now,
    c.messageId,
    c.token,
  );
  const leaseLost = fenced.changes === 0;
  // with the lease lost, the message may be gone too: deleted once its lease had run out
  if (!leaseLost || prepared(sqlite, 'SELECT 1 FROM messages WHERE id = ?').get(c.messageId)) {
    insertAttempt(sqlite, c.messageId, leaseLost ? { ...c.attempt, reply: LEASE_LOST_REPLY + c.attempt.reply } : c.attempt);
  }
  // (the insert's trigger, attempts_counted, keeps the attempt counters and the upstream's last success or failure time)
  prepared(
    sqlite,
    `UPDATE counters SET value = CASE WHEN ? THEN value + 1 ELSE 0 END WHERE name = 'upstream_consecutive_failures'`,
  ).run(c.upstreamFailed ? 1 : 0);
  if (leaseLost) return { leaseLost: true };
  // an answered attempt counts as its claim counted it, also when a stop's release took that back as it came (releaseClaims)
  const update = prepared(
    sqlite,
    `UPDATE recipients SET status = ?, last_code = ?, last_reply = ?, temporary = ?, next_attempt_at = ?, attempts = ?, updated_at = ?
     WHERE message_id = ? AND seq = ? AND status = 'pending'`,
  );
  for (const r of c.recipients) {
    update.run(r.status, r.code, r.reply, r.temporary ? 1 : 0, r.nextAttemptAt, r.attempts, c.now, c.messageId, r.seq);
  }
  let notAttempted = 0;
  if (c.failRemaining !== undefined) {
    notAttempted = prepared(
      sqlite,
      `UPDATE recipients SET status = 'failed', temporary = 0, updated_at = ?,
         last_reply = CASE WHEN attempts = 0 OR last_reply IS NULL THEN 'not attempted: ' || ?
                      ELSE 'not attempted again: ' || ? || '; last reply: ' || last_reply END
       WHERE message_id = ? AND status = 'pending'`,
    ).run(c.now, c.failRemaining, c.failRemaining, c.messageId).changes;
  }
  const settled = settleMessage(sqlite, c.messageId, c.now, {
    nextAttemptFloor: c.now + c.batchDelayMs,
    // a message that continueOnError=false stopped names the refusal that stopped it
    lastFailure: notAttempted > 0 || c.stoppedInBatch ? (c.failRemaining ?? c.lastFailure) : c.lastFailure,
    eraseRawOnDelivered: c.eraseRawOnDelivered,
  });
  return { leaseLost: false, ...settled, notAttempted };
}

function insertAttempt(sqlite: Sqlite, messageId: string, a: AttemptRecord): void {
  prepared(
    sqlite,
    `INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome, code, reply)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
  ).run(messageId, a.batch, JSON.stringify(a.recipients), a.upstream, a.startedAt, Math.round(a.durationMs), a.outcome, a.code, a.reply);
}

/**
 * The attempt of a batch that a shutdown cut off after an earlier transaction of it delivered:
 * the release left the message to the next start; its row is added, and the recipients delivered
 * (recorded before the next transaction began, unless that write failed) as recordDelivered
 * records them, fenced by the claim token, which the release keeps. False: the message is gone.
 */
export function recordCutOffAttempt(sqlite: Sqlite, c: DeliveredSoFar & { attempt: AttemptRecord }): boolean {
  if (!prepared(sqlite, 'SELECT 1 FROM messages WHERE id = ?').get(c.messageId)) return false;
  recordDelivered(sqlite, c);
  insertAttempt(sqlite, c.messageId, c.attempt);
  return true;
}

/** Recipients an earlier transaction of a batch delivered to, with the reply that did (recordDelivered). */
export interface DeliveredSoFar {
  messageId: string;
  token: string;
  now: number;
  /** `attempts`: the recipient's attempts with this one, as its claim counted them (see completeBatch). */
  recipients: Array<{ seq: number; attempts: number; code: number | null; reply: string }>;
}

/**
 * Records the recipients an earlier transaction of a batch delivered to while the batch goes on
 * in another (recipients over the upstream's limit per transaction): a crash before the batch's
 * outcome is committed then sends the message again to the others only. Fenced by the claim
 * token; the claim stays, and completeBatch records the attempt. False: the lease was lost.
 */
export function recordDelivered(sqlite: Sqlite, d: DeliveredSoFar): boolean {
  if (!prepared(sqlite, 'SELECT 1 FROM messages WHERE id = ? AND lease_token = ?').get(d.messageId, d.token)) return false;
  const update = prepared(
    sqlite,
    `UPDATE recipients SET status = 'delivered', last_code = ?, last_reply = ?, temporary = 0, attempts = ?, updated_at = ?
     WHERE message_id = ? AND seq = ? AND status = 'pending'`,
  );
  for (const r of d.recipients) update.run(r.code, r.reply, r.attempts, d.now, d.messageId, r.seq);
  return true;
}

interface Settled {
  state: MessageState;
  nextAttemptAt: number;
}

/** SQL: the reply in column `reply` with the code in column `code` in front, unless it starts with it already (as withCode in delivery/outcomes.ts). */
export function replyWithCodeSql(code: string, reply: string): string {
  return `CASE WHEN ${code} IS NOT NULL AND substr(${reply}, 1, 3) <> CAST(${code} AS TEXT) THEN ${code} || ' ' || ${reply} ELSE ${reply} END`;
}

/** A recipient's last reply with its code in front. */
const REPLY_WITH_CODE = replyWithCodeSql('last_code', 'last_reply');

/**
 * "address: code reply" of the message's recipient that failed last, one the upstream refused
 * rather than one failed unattempted (continueOnError=false).
 */
const LAST_FAILURE_SQL = `SELECT address || ': ' || ${REPLY_WITH_CODE} FROM recipients WHERE message_id = ? AND status = 'failed'
  ORDER BY last_reply LIKE 'not attempted%', updated_at DESC, seq DESC LIMIT 1`;

/** "deferred address: code reply" of the message's pending recipient deferred last; none when no pending recipient was deferred. */
const LAST_DEFERRAL_SQL = `SELECT 'deferred ' || address || ': ' || ${REPLY_WITH_CODE}
  FROM recipients WHERE message_id = ? AND status = 'pending' AND temporary = 1 AND last_reply IS NOT NULL
  ORDER BY updated_at DESC, seq DESC LIMIT 1`;

/**
 * Derives the message's state from its recipients and releases any lease: pending recipients →
 * 'queued', due at max(floor, earliest pending recipient); none pending → 'delivered' when all
 * were delivered, else 'failed', with finished_at set. The last error of a queued message says
 * why it waits: its pending recipient deferred last, else a recipient that failed (none: it only
 * waits for its next batch). A failed message's names a failure: `lastFailure` (this attempt's),
 * else the recipient that failed last.
 */
function settleMessage(
  sqlite: Sqlite,
  id: string,
  now: number,
  options: { nextAttemptFloor: number; lastFailure: string | null; eraseRawOnDelivered: boolean },
): Settled {
  const counts = prepared(
    sqlite,
    `SELECT COALESCE(SUM(status = 'pending'), 0) AS pending, COALESCE(SUM(status = 'failed'), 0) AS failed,
            MIN(CASE WHEN status = 'pending' THEN next_attempt_at END) AS next_due
     FROM recipients WHERE message_id = ?`,
  ).get(id) as { pending: number; failed: number; next_due: number | null };
  if (counts.pending > 0) {
    const nextAttemptAt = Math.max(options.nextAttemptFloor, counts.next_due ?? now);
    prepared(
      sqlite,
      `UPDATE messages SET state = 'queued', lease_token = NULL, lease_expires_at = NULL, next_attempt_at = ?,
         last_error = COALESCE((${LAST_DEFERRAL_SQL}), ?, (${LAST_FAILURE_SQL})), updated_at = ?
       WHERE id = ?`,
    ).run(nextAttemptAt, id, options.lastFailure, id, now, id);
    return { state: 'queued', nextAttemptAt };
  }
  const state: 'delivered' | 'failed' = counts.failed === 0 ? 'delivered' : 'failed';
  if (state === 'delivered') {
    // logAllEmails=false: the content goes in the same transaction that records the delivery.
    if (options.eraseRawOnDelivered) {
      prepared(sqlite, 'DELETE FROM message_bodies WHERE id = (SELECT body_id FROM messages WHERE id = ?)').run(id);
    }
    prepared(
      sqlite,
      `UPDATE messages SET state = 'delivered', lease_token = NULL, lease_expires_at = NULL, finished_at = ?,
         last_error = NULL, body_id = CASE WHEN ? THEN NULL ELSE body_id END, updated_at = ?
       WHERE id = ?`,
    ).run(now, options.eraseRawOnDelivered ? 1 : 0, now, id);
  } else {
    prepared(
      sqlite,
      `UPDATE messages SET state = 'failed', lease_token = NULL, lease_expires_at = NULL, finished_at = ?,
         last_error = COALESCE(?, (${LAST_FAILURE_SQL}), last_error), updated_at = ?
       WHERE id = ?`,
    ).run(now, options.lastFailure, id, now, id);
  }
  return { state, nextAttemptAt: now };
}

/** A claimed message given back: due at once (binds now twice), in its place in the queue. */
const GIVE_BACK = "UPDATE messages SET state = 'queued', lease_expires_at = NULL, next_attempt_at = MIN(next_attempt_at, ?), updated_at = ?";

/**
 * Gives claims back, at shutdown and for claims the engine cannot use (committed too late, or after
 * a stop began): the message is due again at once, so a worker or a restart picks it up without
 * waiting for the lease to expire, and in its place in the queue (the time it was due when it was
 * claimed), not behind the mail that came in meanwhile. Fenced by token; returns how many were
 * released. The token stays until the message is claimed again, so an outcome that arrives while the
 * release commits (the upstream answered just then) is still recorded instead of being lost.
 * A stop's release undoes the count of the attempts it cut off: `unanswered` lists the recipients
 * (seqs) of a batch that went out and was cut off before its outcome, whose attempt does not count
 * unless an earlier transaction of the batch delivered to them (an outcome recorded after the
 * release counts it again: completeBatch); `unsent` those of a batch that never went out, whose
 * claim does not count either. A claim given back with neither keeps its counts.
 */
export function releaseClaims(
  sqlite: Sqlite,
  claims: ReadonlyArray<{ messageId: string; token: string; unsent?: readonly number[]; unanswered?: readonly number[] }>,
  now: number,
): number {
  const release = prepared(sqlite, `${GIVE_BACK} WHERE id = ? AND lease_token = ? AND state = 'sending'`);
  const uncountClaim = prepared(sqlite, 'UPDATE messages SET claims = claims - 1 WHERE id = ? AND claims > 0');
  // a recipient an earlier transaction of the batch delivered to had its answer
  const uncountAttempt = prepared(
    sqlite,
    "UPDATE recipients SET attempts = attempts - 1 WHERE message_id = ? AND seq = ? AND attempts > 0 AND status = 'pending'",
  );
  let released = 0;
  for (const c of claims) {
    const changes = release.run(now, now, c.messageId, c.token).changes;
    released += changes;
    if (changes === 0) continue;
    if (c.unsent) uncountClaim.run(c.messageId);
    for (const seq of c.unsent ?? c.unanswered ?? []) uncountAttempt.run(c.messageId, seq);
  }
  return released;
}

/**
 * At the start, under the database lock (no other relay runs on this file): every claim still
 * held was left by a relay that ended without handing it back (`kill -9`, a crash, power loss).
 * They are given back, due at once and in their place in the queue, instead of waiting out their
 * leases; unlike a stop's release, it keeps the attempts counted at their claim (the process may
 * have ended on the message itself). Returns the messages' ids.
 */
export function releaseOrphanedClaims(sqlite: Sqlite, now: number): string[] {
  const released = prepared(
    sqlite,
    `${GIVE_BACK} WHERE id IN (SELECT id FROM messages INDEXED BY messages_lease WHERE state = 'sending') RETURNING id`,
  ).all(now, now) as Array<{ id: string }>;
  return released.map((row) => row.id);
}

export interface RequeueOptions {
  now: number;
  maxAttempts: number;
  /** Batches of one message stay at least this far apart, requeued or not. */
  batchDelayMs: number;
}

/**
 * When a message put back in the queue by hand or by a periodic requeue may send its next
 * batch: now, unless its last batch ended less than batchDelay ago (the spec allows no
 * exception to that spacing, a retry included). An end after `now` (a clock set back since)
 * counts as now, so the wait is never longer than batchDelay.
 */
export function nextBatchAt(sqlite: Sqlite, id: string, now: number, batchDelayMs: number): number {
  const row = prepared(sqlite, 'SELECT MAX(started_at + duration_ms) AS ended FROM attempts WHERE message_id = ?').get(id) as {
    ended: number | null;
  };
  return row.ended === null ? now : Math.max(now, Math.min(row.ended, now) + batchDelayMs);
}

/** Where a walk over failed mail goes on from: after this finish time, and this id at that time. */
export interface FailedScanCursor {
  finishedAt: number;
  id: string;
}

/** Read through the messages_finished index (state, finished_at): a range, never the whole table. */
export const FAILED_SCAN_SQL = `SELECT id, finishedAt,
  EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND r.status = 'failed' AND r.temporary = 1) AS temporary
FROM (SELECT id, finished_at AS finishedAt FROM messages
      WHERE state = 'failed' AND finished_at >= @after AND finished_at <= @before AND (finished_at > @after OR id > @id)
        AND (@senderKey IS NULL OR sender_key = @senderKey)
      ORDER BY finished_at, id LIMIT CAST(@limit AS INTEGER)) AS m`;

/**
 * One bounded step of a walk over failed mail: the next `limit` failed messages after `cursor`
 * in (finish time, id) order, finished at or before `finishedBefore`, through the
 * messages_finished index, each with whether a recipient's last failure was temporary. A step
 * costs the same however much failed mail the store holds; `next` is where the following step
 * starts (null: done). failedRetryInterval, the requeue of failed mail and the export check
 * after a start all walk this way. With `senderKey`, a page holds only that sender's mail (the
 * walk still reads all failed mail, through the same index, but writes only theirs).
 */
export function failedPage(
  sqlite: Sqlite,
  options: { cursor: FailedScanCursor; finishedBefore?: number; limit: number; senderKey?: string },
): { messages: Array<{ id: string; finishedAt: number; temporary: boolean }>; next: FailedScanCursor | null } {
  const { cursor, finishedBefore = Number.POSITIVE_INFINITY, limit, senderKey = null } = options;
  const rows = prepared(sqlite, FAILED_SCAN_SQL).all({ after: cursor.finishedAt, id: cursor.id, before: finishedBefore, limit, senderKey }) as Array<{ id: string; finishedAt: number; temporary: number }>;
  const last = rows[rows.length - 1];
  return {
    messages: rows.map((r) => ({ id: r.id, finishedAt: r.finishedAt, temporary: r.temporary === 1 })),
    next: rows.length === limit ? { finishedAt: last.finishedAt, id: last.id } : null,
  };
}

/** One step of failedRetryInterval's look for failed mail: the messages, of that step, with a temporarily failed recipient. */
export function findTemporaryFailures(
  sqlite: Sqlite,
  options: { cursor: FailedScanCursor; finishedBefore: number; limit: number },
): { messages: Array<{ id: string; finishedAt: number }>; next: FailedScanCursor | null } {
  const page = failedPage(sqlite, options);
  return { messages: page.messages.filter((m) => m.temporary), next: page.next };
}

/**
 * failedRetryInterval: recipients whose last failure was temporary become pending again with
 * room for exactly one more attempt (so a new temporary failure fails them again); permanently
 * failed and delivered recipients are untouched. Returns the ids requeued.
 */
export function requeueTemporaryFailures(sqlite: Sqlite, ids: readonly string[], options: RequeueOptions): string[] {
  const { now } = options;
  const requeued: string[] = [];
  const stillFailed = prepared(sqlite, `SELECT 1 FROM messages WHERE id = ? AND state = 'failed'`);
  for (const id of ids) {
    // The scan ran on another connection: a message retried by hand since then is not failed
    // any more, and its recipients that gave up meanwhile are not this scan's to revive.
    if (!stillFailed.get(id)) continue;
    const recipients = prepared(
      sqlite,
      `UPDATE recipients SET status = 'pending', attempts = MIN(attempts, ?), next_attempt_at = ?, updated_at = ?
       WHERE message_id = ? AND status = 'failed' AND temporary = 1`,
    ).run(Math.max(0, options.maxAttempts - 1), now, now, id);
    if (recipients.changes === 0) continue;
    prepared(
      sqlite,
      `UPDATE messages SET state = 'queued', next_attempt_at = ?, finished_at = NULL, updated_at = ?
       WHERE id = ? AND state = 'failed'`,
    ).run(nextBatchAt(sqlite, id, now, options.batchDelayMs), now, id);
    requeued.push(id);
  }
  return requeued;
}
