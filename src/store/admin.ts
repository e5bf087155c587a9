// Operator commands on the queue, shared by the HTTP API and the CLI: requeue failed mail, make
// queued mail due now, retry one message now, delete one message. Each runs inside one write
// transaction (the server passes them to writer.write). Delivered recipients are never
// touched, so a requeue can only re-send to recipients that did not get the message.
import type { Sqlite } from './db.js';
import { type FailedScanCursor, failedPage, nextBatchAt } from './delivery.js';
import { senderFilterKey } from './intake.js';
import { listMessages } from './queries.js';
import { prepared } from './statements.js';
import { count } from '../count.js';

export interface RequeueFilter {
  /** Only these messages (those among them that are failed). */
  ids?: string[];
  /** Only mail from this envelope sender (case-insensitive; '' = the null sender). */
  sender?: string;
  /** Only messages that failed at or after this time (ms). */
  since?: number;
}

/** Messages changed per write by requeueFailedInSteps and flushQueuedInSteps, and per step of idSlices (the CLI's delete and retry ID). */
export const ADMIN_STEP = 500;

/**
 * Requeues the failed mail that matches `filter` in writes of at most ADMIN_STEP messages,
 * so that a requeue of everything never holds the writer (and the `250`s waiting behind it)
 * for long. Failed messages are read in (finish time, id) order on `reader`, or, when the filter
 * names ids, taken in the order given; `write` runs requeueFailed for one step (at most
 * ADMIN_STEP distinct ids) and resolves with how many it requeued.
 */
export function requeueFailedInSteps(reader: Sqlite, filter: RequeueFilter, now: number, write: (step: RequeueStep) => Promise<number>): Promise<number> {
  const pages = filter.ids === undefined ? failedIdPages(reader, filter, now) : idSlices([...new Set(filter.ids)]);
  const done = (n: number) => `${count(n, 'failed message')} ${n === 1 ? 'was' : 'were'} requeued before that and stay requeued`;
  return writeInSteps(pages, (ids) => write({ ...filter, ids }), done);
}

/**
 * Makes the queued mail (from `sender`, when given) due now, as Postfix's `postqueue -f` does:
 * after an outage, mail waiting for its next retry need not wait out its backoff. In writes of at
 * most ADMIN_STEP messages, newest first; `write` runs flushQueued on one step's ids (those
 * still queued: one may have been claimed or failed since the page was read) and resolves with
 * how many it made due. Mail that arrives meanwhile is due at once anyway.
 */
export function flushQueuedInSteps(reader: Sqlite, sender: string | undefined, write: (ids: string[]) => Promise<number>): Promise<number> {
  return writeInSteps(queuedIdPages(reader, sender), write, (n) => `${count(n, 'queued message')} ${n === 1 ? 'was' : 'were'} made due before that`);
}

/** Writes each page of ids in a step of its own; a failure after a step committed says what stays done. */
async function writeInSteps(pages: Iterable<string[]>, write: (ids: string[]) => Promise<number>, done: (changed: number) => string): Promise<number> {
  let changed = 0;
  try {
    for (const ids of pages) if (ids.length > 0) changed += await write(ids);
    return changed;
  } catch (err) {
    throw changed > 0 ? new StoppedPartWay(changed, err as Error, done(changed)) : err;
  }
}

/** `ids` in pieces of at most ADMIN_STEP, each a write of its own. */
export function* idSlices(ids: string[]): Generator<string[]> {
  for (let i = 0; i < ids.length; i += ADMIN_STEP) yield ids.slice(i, i + ADMIN_STEP);
}

/**
 * The failed messages finished at or after `since` (from `sender`, when given), each once, a page
 * read as the previous one is written. `now`: the time the requeue writes.
 */
function* failedIdPages(reader: Sqlite, { since = Number.NEGATIVE_INFINITY, sender }: RequeueFilter, now: number): Generator<string[]> {
  const senderKey = sender === undefined ? undefined : senderFilterKey(sender);
  // A message requeued by an early step that fails again before the walk ends finishes at `now`
  // or later, after the last failure there was when the walk began, where the walk ends: no
  // later page meets it again. Only a failure recorded at a time still to come (the clock was set
  // back since) puts that end after `now`: then the ids met are remembered instead, which costs
  // about 150 bytes per failed message for the whole walk.
  const { last } = prepared(reader, `SELECT MAX(finished_at) AS last FROM messages WHERE state = 'failed'`).get() as { last: number | null };
  if (last === null) return;
  const seen = last >= now ? new Set<string>() : undefined;
  let cursor: FailedScanCursor | null = { finishedAt: since, id: '' };
  while (cursor) {
    const page = failedPage(reader, { cursor, finishedBefore: last, limit: ADMIN_STEP, senderKey });
    const ids = page.messages.map((m) => m.id).filter((id) => !seen?.has(id));
    if (seen) for (const id of ids) seen.add(id);
    yield ids;
    cursor = page.next;
  }
}

function* queuedIdPages(reader: Sqlite, sender: string | undefined): Generator<string[]> {
  let before: string | undefined;
  do {
    const page = listMessages(reader, { state: 'queued', sender, limit: ADMIN_STEP, before });
    yield page.messages.map((m) => m.id);
    before = page.nextBefore ?? undefined;
  } while (before);
}

/**
 * A requeue or flush whose step failed after earlier steps had committed: those stay changed, and
 * saying only "database is locked" would tell the operator that nothing changed. Carries the
 * failed step's error code, so that a database error is still answered as one.
 */
export class StoppedPartWay extends Error {
  readonly code: unknown;

  constructor(readonly changed: number, cause: Error, done: string) {
    super(`${cause.message}; ${done} (run it again for the rest)`, { cause });
    this.code = (cause as { code?: unknown }).code;
  }
}

/** One step of requeueFailedInSteps: the filter with the step's ids, each once. */
export type RequeueStep = RequeueFilter & { ids: string[] };

/**
 * The step's failed messages matching every given filter go back to the queue, due now (or
 * batchDelay after their last batch, if that is later): their failed recipients become pending
 * with a fresh attempt count. Returns the ids of those requeued.
 */
export function requeueFailed(sqlite: Sqlite, filter: RequeueStep, now: number, batchDelayMs: number): string[] {
  const where = ["state = 'failed'"];
  const params: unknown[] = [];
  if (filter.sender !== undefined) {
    where.push('sender_key = ?');
    params.push(senderFilterKey(filter.sender));
  }
  if (filter.since !== undefined) {
    where.push('finished_at >= ?');
    params.push(filter.since);
  }
  const matches = prepared(sqlite, `SELECT id FROM messages WHERE id = ? AND ${where.join(' AND ')}`);
  const requeued = filter.ids.filter((id) => matches.get(id, ...params) !== undefined && requeueOne(sqlite, id, now, batchDelayMs));
  if (requeued.length > 0) noteDeliveryRequest(sqlite, now);
  return requeued;
}

function requeueOne(sqlite: Sqlite, id: string, now: number, batchDelayMs: number): boolean {
  const changed = prepared(
    sqlite,
    `UPDATE messages SET state = 'queued', next_attempt_at = ?, finished_at = NULL, last_error = NULL,
       lease_token = NULL, lease_expires_at = NULL, updated_at = ?
     WHERE id = ? AND state = 'failed'`,
  ).run(nextBatchAt(sqlite, id, now, batchDelayMs), now, id).changes;
  if (changed === 0) return false;
  prepared(
    sqlite,
    `UPDATE recipients SET status = 'pending', attempts = 0, temporary = 0, next_attempt_at = ?, updated_at = ?
     WHERE message_id = ? AND status = 'failed'`,
  ).run(now, now, id);
  return true;
}

/**
 * "Now" below is at the earliest batchDelay after the message's last batch ended.
 * - requeued: it was failed; its failed recipients are pending again, due now.
 * - due-now: it was waiting for a retry (or its worker's lease ran out); it is due now.
 * - held: a worker holds it right now (HELD).
 * - delivered: every recipient has it; nothing to retry.
 * - not-found: no message has this id.
 */
export type RetryResult = 'requeued' | 'due-now' | 'held' | 'delivered' | 'not-found';

export function retryMessage(sqlite: Sqlite, id: string, now: number, batchDelayMs: number): RetryResult {
  const result = retryOne(sqlite, id, now, batchDelayMs);
  if (result === 'requeued' || result === 'due-now') noteDeliveryRequest(sqlite, now);
  return result;
}

function retryOne(sqlite: Sqlite, id: string, now: number, batchDelayMs: number): RetryResult {
  const row = leaseOf(sqlite, id);
  if (!row) return 'not-found';
  switch (row.state) {
    case 'failed':
      requeueOne(sqlite, id, now, batchDelayMs);
      return 'requeued';
    case 'delivered':
      return 'delivered';
    case 'sending':
      // An expired lease is claimable again already; the delivery engine takes it back.
      return heldAt(row, now) ? 'held' : 'due-now';
    default:
      queuedDueNow(sqlite, id, now, batchDelayMs);
      return 'due-now';
  }
}

/** A queued message due now (at the earliest batchDelay after its last batch); false when it is not queued (any more). */
export function queuedDueNow(sqlite: Sqlite, id: string, now: number, batchDelayMs: number): boolean {
  // never later than it was: between two batches it stays due batchDelay after the last one
  const changed = prepared(
    sqlite,
    "UPDATE messages SET next_attempt_at = MIN(next_attempt_at, ?), updated_at = ? WHERE id = ? AND state = 'queued'",
  ).run(nextBatchAt(sqlite, id, now, batchDelayMs), now, id).changes;
  if (changed === 0) return false;
  prepared(sqlite, "UPDATE recipients SET next_attempt_at = ?, updated_at = ? WHERE message_id = ? AND status = 'pending'").run(now, now, id);
  return true;
}

/** One step of flushQueuedInSteps: those of `ids` still queued become due now. Returns how many. */
export function flushQueued(sqlite: Sqlite, ids: string[], now: number, batchDelayMs: number): number {
  const dueNow = ids.filter((id) => queuedDueNow(sqlite, id, now, batchDelayMs)).length;
  if (dueNow > 0) noteDeliveryRequest(sqlite, now);
  return dueNow;
}

/** The attempts of an outage (dueAfterOutageInSteps): begun at `since` or later, `lastAttemptId` or earlier. */
export interface OutageAttempts {
  since: number;
  lastAttemptId: number;
}

/**
 * One step of dueAfterOutageInSteps: those of `ids` still queued whose last attempt is one of the
 * outage's become due now, with no operator's request noted. Returns how many.
 */
export function makeDue(sqlite: Sqlite, ids: string[], now: number, batchDelayMs: number, outage: OutageAttempts): number {
  const last = prepared(sqlite, 'SELECT id, started_at AS startedAt FROM attempts WHERE message_id = ? ORDER BY id DESC LIMIT 1');
  const deferredByOutage = (id: string) => {
    const attempt = last.get(id) as { id: number; startedAt: number } | undefined;
    return attempt !== undefined && attempt.startedAt >= outage.since && attempt.id <= outage.lastAttemptId;
  };
  return ids.filter((id) => deferredByOutage(id) && queuedDueNow(sqlite, id, now, batchDelayMs)).length;
}

/**
 * Makes due now, in writes of at most ADMIN_STEP messages, the queued mail that waits for a time
 * after `now` (a retry's backoff, or batchDelay after its last batch, which stays) and whose last
 * attempt came in the outage that began at `since`: the one that found the upstream down, or a
 * deferral while delivery was suspended. Mail a reachable upstream deferred with a 4xx before it
 * keeps its backoff; so does mail tried since this walk began (made due by an earlier step, or due
 * anyway), which has had its early attempt. Read in (next_attempt_at, rowid) order through the
 * messages_due index, past each page as it is written. `write` runs makeDue for one step;
 * resolves with how many were made due (before `stopped`).
 */
export async function dueAfterOutageInSteps(
  reader: Sqlite,
  now: number,
  since: number,
  write: (ids: string[], outage: OutageAttempts) => Promise<number>,
  stopped: () => boolean,
): Promise<number> {
  const outage = { since, lastAttemptId: prepared(reader, 'SELECT COALESCE(MAX(id), 0) FROM attempts').pluck().get() as number };
  const page = prepared(
    reader,
    `SELECT id, next_attempt_at AS at, rowid FROM messages INDEXED BY messages_due
     WHERE state = 'queued' AND next_attempt_at >= @at AND (next_attempt_at > @at OR rowid > @rowid)
     ORDER BY next_attempt_at, rowid LIMIT ${ADMIN_STEP}`,
  );
  // first those due after now, then those after the last row of each page
  let cursor = { at: now, rowid: Number.MAX_SAFE_INTEGER };
  let changed = 0;
  while (!stopped()) {
    const rows = page.all(cursor) as Array<{ id: string; at: number; rowid: number }>;
    if (rows.length === 0) break;
    changed += await write(rows.map((r) => r.id), outage);
    const last = rows[rows.length - 1];
    cursor = { at: last.at, rowid: last.rowid };
  }
  return changed;
}

/**
 * An outage of the upstream is remembered in the database (the `counters` row
 * `upstream_outage_since`: when its earliest failing attempt began) until the mail it deferred has
 * been made due (dueAfterOutageInSteps), so that a relay started meanwhile takes it up. A second
 * outage before that keeps the earlier time.
 */
export function noteOutage(sqlite: Sqlite, since: number): void {
  prepared(sqlite, "INSERT INTO counters (name, value) VALUES ('upstream_outage_since', ?) ON CONFLICT (name) DO UPDATE SET value = MIN(value, excluded.value)").run(since);
}

/** The mail of the outage that began at `since` was made due (see noteOutage). */
export function outageOver(sqlite: Sqlite, since: number): void {
  prepared(sqlite, "DELETE FROM counters WHERE name = 'upstream_outage_since' AND value = ?").run(since);
}

/** When the outage remembered began (see noteOutage); null when none is. */
export function rememberedOutage(sqlite: Sqlite): number | null {
  return (prepared(sqlite, "SELECT value FROM counters WHERE name = 'upstream_outage_since'").pluck().get() as number | undefined) ?? null;
}

/**
 * An operator's request that made mail due (retryMessage, requeueFailed, flushQueued: the admin
 * API's or `relayq retry`'s, another process) writes its time (`now`, one for all the steps of a
 * request) in the write that carries it out; a relay whose delivery to an upstream found
 * unreachable is suspended ends the suspension when a request came since it began (see
 * UpstreamSuspension), so that the mail is tried at once rather than deferred without an attempt.
 * The row is made by the first request.
 */
function noteDeliveryRequest(sqlite: Sqlite, now: number): void {
  prepared(sqlite, "INSERT INTO counters (name, value) VALUES ('delivery_requested_at', ?) ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)").run(now);
}

/** The time of the latest request noteDeliveryRequest wrote (ms); 0 before any. */
export function lastDeliveryRequest(sqlite: Sqlite): number {
  const row = prepared(sqlite, "SELECT value FROM counters WHERE name = 'delivery_requested_at'").get() as { value: number } | undefined;
  return row?.value ?? 0;
}

/** What a `held` result means, in the words of the CLI and the API. */
export const HELD =
  'a delivery worker holds it: it is being delivered, or was when its relay stopped without handing it back (then until the relay starts again, or its processingTimeout lease runs out)';

export type DeleteResult = 'deleted' | 'held' | 'not-found';

/** Deletes a message with its recipients and attempts, unless a worker holds a live lease on it. */
export function deleteMessage(sqlite: Sqlite, id: string, now: number): DeleteResult {
  const hold = holdOf(sqlite, id, now);
  if (hold !== 'free') return hold;
  prepared(sqlite, 'DELETE FROM messages WHERE id = ?').run(id);
  return 'deleted';
}

/** Whether `id` is a message, and whether a delivery worker holds it now (its lease has not run out). */
export function holdOf(sqlite: Sqlite, id: string, now: number): 'not-found' | 'held' | 'free' {
  const row = leaseOf(sqlite, id);
  if (!row) return 'not-found';
  return heldAt(row, now) ? 'held' : 'free';
}

interface LeaseRow {
  state: string;
  lease_expires_at: number | null;
}

function leaseOf(sqlite: Sqlite, id: string): LeaseRow | undefined {
  return prepared(sqlite, 'SELECT state, lease_expires_at FROM messages WHERE id = ?').get(id) as LeaseRow | undefined;
}

/** A delivery worker holds the message now: it is being sent, and its lease has not run out. */
function heldAt(row: LeaseRow, now: number): boolean {
  return row.state === 'sending' && row.lease_expires_at !== null && row.lease_expires_at > now;
}
