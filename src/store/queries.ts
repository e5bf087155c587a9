// The read side of the queue for the HTTP API and the CLI: lifetime counters, queue depth,
// the oldest waiting message, pages of messages, one message with its recipients and attempts,
// and its raw bytes. The counters and the unfiltered pages read a few counter rows or walk an
// index for as many rows as they return, so they do not slow down as the database grows; a
// filtered page costs as many rows as the filter matches (listMessages).
import { decodeIdnDomain, withoutAngleBrackets } from '../address.js';
import { isoTime } from '../clock.js';
import type { Sqlite } from './db.js';
import { replyWithCodeSql } from './delivery.js';
import { canonicalQueueId, senderFilterKey, typedId } from './intake.js';
import {
  ATTEMPT_OUTCOMES,
  type AttemptOutcome,
  type AttemptsTable,
  MESSAGE_STATES,
  type MessageState,
  type MessagesTable,
  type RecipientsTable,
} from './schema.js';
import { prepared } from './statements.js';

export interface DurationBucket {
  /** Upper bound in ms; Infinity for the last bucket. */
  leMs: number;
  /** Attempts in this bucket alone (not cumulative). */
  count: number;
}

export interface UpstreamRecord {
  /** When the last attempt that the upstream accepted (at least in part) ended; null = never. */
  lastSuccessAt: number | null;
  /** When the last attempt that did not deliver anything ended; null = never. */
  lastFailureAt: number | null;
  /** Attempts in a row that failed (upstreamVerdict): a delivery or a refusal of the mail ends the run. */
  consecutiveFailures: number;
}

export interface StoreMetrics {
  messagesAccepted: number;
  recipientsAccepted: number;
  bytesAccepted: number;
  /** Transitions to delivered / to failed (monotonic). */
  messagesDelivered: number;
  messagesFailed: number;
  /** Failed messages put back in the queue, by hand or by failedRetryInterval (monotonic). */
  messagesRequeued: number;
  /** Sum over transitions to a final state of (finished - received). */
  processingMsTotal: number;
  /** Each final message's receipt-to-final time, once, by its last outcome (a requeue takes it back). */
  processingMsByMessage: number;
  rateLimitRefusals: number;
  queueFullRefusals: number;
  /** MAIL FROM refused 452 for free disk below minFreeDiskMb (or a declared SIZE that would take it there). */
  diskLowRefusals: number;
  queue: Record<MessageState, number>;
  /** Queued messages that were claimed before: waiting for a retry, or for their next recipient batch. */
  deferred: number;
  attempts: Record<AttemptOutcome, number>;
  attemptDuration: { buckets: DurationBucket[]; sumMs: number; count: number };
  upstream: UpstreamRecord;
  /** Arrival time of the oldest message not yet final (queued or sending); null when none. */
  oldestActiveReceivedAt: number | null;
}

const BUCKET_PREFIX = 'attempt_duration_le_';

/** Every counter row; the table holds a few dozen rows whatever the queue holds. */
function readCounters(sqlite: Sqlite): Map<string, number> {
  const rows = prepared(sqlite, 'SELECT name, value FROM counters').all() as Array<{ name: string; value: number }>;
  return new Map(rows.map((r) => [r.name, r.value]));
}

/** Messages failed for good: a failed message that was requeued no longer counts as failed. */
function failedForGood(m: StoreMetrics): number {
  return Math.max(0, m.messagesFailed - m.messagesRequeued);
}

/** Delivered / (delivered + failed for good), in percent; 100 before anything finished. */
export function successRate(m: StoreMetrics): { processed: number; rate: number } {
  const processed = m.messagesDelivered + failedForGood(m);
  const rate = processed === 0 ? 100 : Math.round((m.messagesDelivered / processed) * 10000) / 100;
  return { processed, rate };
}

/** Receipt to final state, in ms, per message by its last outcome: one failed again and again counts once. */
export function averageProcessingMs(m: StoreMetrics): number {
  const { processed } = successRate(m);
  return processed === 0 ? 0 : m.processingMsByMessage / processed;
}

/**
 * The lifetime totals, queue figures and upstream record that GET /metrics and `relayq status
 * --json` both report, under the same names. A failed message that was requeued no longer counts
 * as failed. `upstream`: the store's record, or (the server) that merged with delivery's live view.
 */
export function metricsSummary(m: StoreMetrics, now: number, upstream: UpstreamRecord = m.upstream) {
  const { rate } = successRate(m);
  return {
    total_emails: m.messagesAccepted,
    successful_emails: m.messagesDelivered,
    failed_emails: failedForGood(m),
    requeued_emails: m.messagesRequeued,
    total_recipients: m.recipientsAccepted,
    total_bytes: m.bytesAccepted,
    avg_processing_time_ms: Math.round(averageProcessingMs(m)),
    queue: m.queue,
    deferred_emails: m.deferred,
    oldest_queued_age_seconds: oldestAgeSeconds(m, now),
    rate_limit_refusals: m.rateLimitRefusals,
    queue_full_refusals: m.queueFullRefusals,
    disk_low_refusals: m.diskLowRefusals,
    attempts: { ...m.attempts, total: Object.values(m.attempts).reduce((sum, n) => sum + n, 0) },
    success_rate: rate,
    attempt_duration_ms: {
      count: m.attemptDuration.count,
      sum: m.attemptDuration.sumMs,
      avg: m.attemptDuration.count === 0 ? 0 : Math.round(m.attemptDuration.sumMs / m.attemptDuration.count),
      buckets: cumulativeBuckets(m.attemptDuration.buckets),
    },
    upstream: {
      last_success: isoTime(upstream.lastSuccessAt),
      last_failure: isoTime(upstream.lastFailureAt),
      consecutive_failures: upstream.consecutiveFailures,
    },
  };
}

/**
 * The reply of the attempt recorded last, with its code in front: while the upstream fails every
 * attempt, why it does (the counter of failures in a row is written with each attempt's row).
 */
export function lastAttemptReply(sqlite: Sqlite): string | undefined {
  const row = prepared(sqlite, `SELECT ${replyWithCodeSql('code', 'reply')} AS reply FROM attempts ORDER BY id DESC LIMIT 1`).get() as
    | { reply: string | null }
    | undefined;
  return row?.reply ?? undefined;
}

/** Whole seconds since the oldest message not yet final arrived; null when there is none. */
export function oldestAgeSeconds(m: StoreMetrics, now: number): number | null {
  return m.oldestActiveReceivedAt === null ? null : Math.max(0, Math.floor((now - m.oldestActiveReceivedAt) / 1000));
}

/** Histogram buckets as Prometheus counts them: each includes those below it. */
function cumulativeBuckets(buckets: readonly DurationBucket[]): Array<{ le: number | '+Inf'; count: number }> {
  let cumulative = 0;
  return buckets.map((b) => ({ le: Number.isFinite(b.leMs) ? b.leMs : '+Inf', count: (cumulative += b.count) }));
}

/** The counters and the oldest active message, read in one snapshot so that they agree. */
export function storeMetrics(sqlite: Sqlite): StoreMetrics {
  const [c, oldest] = sqlite.transaction(() => [readCounters(sqlite), oldestActiveReceivedAt(sqlite)] as const)();
  const n = (name: string) => c.get(name) ?? 0;
  const buckets: DurationBucket[] = [];
  for (const [name, count] of c) {
    if (!name.startsWith(BUCKET_PREFIX)) continue;
    const bound = name.slice(BUCKET_PREFIX.length);
    buckets.push({ leMs: bound === 'inf' ? Number.POSITIVE_INFINITY : Number(bound), count });
  }
  buckets.sort((a, b) => a.leMs - b.leMs);
  const queue = Object.fromEntries(MESSAGE_STATES.map((s) => [s, n(`state_${s}`)])) as Record<MessageState, number>;
  const attempts = Object.fromEntries(ATTEMPT_OUTCOMES.map((o) => [o, n(`attempts_${o}`)])) as Record<AttemptOutcome, number>;
  return {
    messagesAccepted: n('messages_accepted'),
    recipientsAccepted: n('recipients_accepted'),
    bytesAccepted: n('bytes_accepted'),
    messagesDelivered: n('messages_delivered'),
    messagesFailed: n('messages_failed'),
    messagesRequeued: n('messages_requeued'),
    processingMsTotal: n('processing_ms_total'),
    processingMsByMessage: n('processing_ms_by_message'),
    rateLimitRefusals: n('rate_limit_refusals'),
    queueFullRefusals: n('queue_full_refusals'),
    diskLowRefusals: n('disk_low_refusals'),
    queue,
    deferred: n('queued_deferred'),
    attempts,
    attemptDuration: {
      buckets,
      sumMs: n('attempt_duration_ms_total'),
      count: buckets.reduce((sum, b) => sum + b.count, 0),
    },
    // the times kept by the attempts table's insert trigger (migrations 002 and 007), the run of
    // failures by completeBatch, which alone knows whether an attempt counts as failed
    upstream: {
      lastSuccessAt: n('upstream_last_success_at') || null,
      lastFailureAt: n('upstream_last_failure_at') || null,
      consecutiveFailures: n('upstream_consecutive_failures'),
    },
    oldestActiveReceivedAt: oldest,
  };
}

/** MIN or MAX of received_at in each of these states that holds a message: one step into messages_state_received each. */
function receivedAtByState(sqlite: Sqlite, fn: 'MIN' | 'MAX', states: readonly MessageState[]): number[] {
  const bound = prepared(sqlite, `SELECT ${fn}(received_at) AS t FROM messages WHERE state = ?`);
  return states.map((state) => (bound.get(state) as { t: number | null }).t).filter((t): t is number => t !== null);
}

function oldestActiveReceivedAt(sqlite: Sqlite): number | null {
  const times = receivedAtByState(sqlite, 'MIN', ['queued', 'sending']);
  return times.length ? Math.min(...times) : null;
}

/**
 * The newest time the database holds: the last message received, the last attempt started. A
 * start whose clock is well behind it had its clock stepped back (main.ts says so). Each MAX is
 * one step into an index (messages_state_received, attempts_started).
 */
export function newestRecordedTime(sqlite: Sqlite): number | null {
  const { t } = prepared(sqlite, 'SELECT MAX(started_at) AS t FROM attempts').get() as { t: number | null };
  const times = [...receivedAtByState(sqlite, 'MAX', MESSAGE_STATES), ...(t === null ? [] : [t])];
  return times.length ? Math.max(...times) : null;
}

export interface MessageFilter {
  state?: MessageState;
  /** Envelope sender, compared case-insensitively ('' = the null sender). */
  sender?: string;
  /** A recipient address, in any case. */
  recipient?: string;
  limit: number;
  /** Only messages listed after this cursor (newest first): the previous page's nextBefore, or a message id. */
  before?: string;
}

/**
 * The columns of a message that a page lists. `next_attempt_at` is when a queued message is due,
 * null in the other states (the column keeps its last value there, which says nothing).
 */
export type MessageSummary = Pick<
  MessagesTable,
  'id' | 'state' | 'mail_from' | 'auth_user' | 'client_ip' | 'size' | 'recipient_count' | 'received_at' | 'claims' | 'last_error' | 'finished_at'
> & { next_attempt_at: number | null };

export interface MessagePage {
  messages: MessageSummary[];
  /**
   * Pass as `before` for the next page; null when this page is the last. It is the arrival time
   * and id of the page's last message (`<received_at>-<id>`), so it stays valid when that message
   * is deleted before the next page is read.
   */
  nextBefore: string | null;
}

/** A filter that can name no message: its message starts with the filter's name (`before: …`). */
export class BadFilter extends Error {}

const SUMMARY_COLUMNS = `id, state, mail_from, auth_user, client_ip, size, recipient_count, received_at,
  CASE WHEN state = 'queued' THEN next_attempt_at END AS next_attempt_at, claims, last_error, finished_at`;

/**
 * Newest first (arrival time, then id). Each filter leads with the index that answers it: the
 * recipient through recipients_address_lower, the sender through messages_sender, the state through
 * messages_state_received (also with a sender, unless the state is delivered: see pageSql). With
 * no filter at all the four states are read separately from that index and merged, so a page
 * costs `limit` rows per state, never a sort of the whole table. A recipient filter reads every
 * message of that address (sorted), so its cost grows with that address's share of the store,
 * not with the page. A sender filter with a state reads rows of the index it goes through until
 * it has a page: with delivered, up to all of the sender's messages; otherwise, up to all of
 * those in the state.
 */
export function listMessages(sqlite: Sqlite, filter: MessageFilter): MessagePage {
  // one snapshot for the cursor and the per-state reads: a message that changes state between
  // two of them (delivery runs meanwhile) would show up twice, or not at all
  return sqlite.transaction(() => listMessagesNow(sqlite, filter))();
}

type Cursor = { receivedAt: number; id: string };

/**
 * `<received_at>-<id>` as nextBefore writes it, the id a queue id's 20 characters (a cursor cut
 * short in a copy would start the page at another message); a bare message id (queue ids have no
 * `-`) is looked up.
 */
function parseCursor(sqlite: Sqlite, before: string): Cursor {
  const written = /^(\d{1,15})-([0-9A-Za-z]{20})$/.exec(before);
  if (written) return { receivedAt: Number(written[1]), id: canonicalQueueId(written[2]) };
  if (before.includes('-')) throw new BadFilter(`before: ${typedId(before)} is not a cursor (<received_at>-<id>, as next_before gives it)`);
  const id = canonicalQueueId(before);
  const row = prepared(sqlite, 'SELECT received_at FROM messages WHERE id = ?').get(id) as { received_at: number } | undefined;
  if (!row) throw new BadFilter(`before: no message with id ${typedId(before)}`);
  return { receivedAt: row.received_at, id };
}

/**
 * Why an address filter can match no message (`sender: an address has no space`), or undefined:
 * relayq takes no quoted local part, so no stored address has a space, and a filter with one
 * (`App Team <app@example.com>`, pasted from a From: line) is a mistake to point out, not a
 * search that finds nothing. The listings, retry-failed and retry-queued all refuse it.
 */
export function addressFilterProblem(name: 'sender' | 'recipient', value: string | undefined): string | undefined {
  return value?.includes(' ') ? `${name}: an address has no space` : undefined;
}

function listMessagesNow(sqlite: Sqlite, filter: MessageFilter): MessagePage {
  if (filter.recipient !== undefined && withoutAngleBrackets(filter.recipient) === '') {
    throw new BadFilter('recipient: must be an address (a recipient is never empty; the null sender is a sender)');
  }
  for (const name of ['sender', 'recipient'] as const) {
    const problem = addressFilterProblem(name, filter[name]);
    if (problem) throw new BadFilter(problem);
  }
  const cursor = filter.before === undefined ? undefined : parseCursor(sqlite, filter.before);
  const fetch = filter.limit + 1;
  let rows: MessageSummary[];
  if (filter.recipient === undefined && filter.sender === undefined && filter.state === undefined) {
    rows = MESSAGE_STATES.flatMap((state) => pageQuery(sqlite, { ...filter, state }, cursor, fetch));
    rows.sort(newestFirst);
  } else {
    rows = pageQuery(sqlite, filter, cursor, fetch);
  }
  const more = rows.length > filter.limit;
  const messages = rows.slice(0, filter.limit);
  const last = messages[messages.length - 1];
  return { messages, nextBefore: more ? `${last.received_at}-${last.id}` : null };
}

function newestFirst(a: MessageSummary, b: MessageSummary): number {
  if (a.received_at !== b.received_at) return b.received_at - a.received_at;
  return a.id < b.id ? 1 : a.id > b.id ? -1 : 0;
}

function pageQuery(sqlite: Sqlite, filter: MessageFilter, cursor: Cursor | undefined, limit: number): MessageSummary[] {
  const { sql, params } = pageSql(filter, cursor);
  return prepared(sqlite, sql).all(...params, limit) as MessageSummary[];
}

/** The statement of one page of listMessages, and its parameters but the last, the page's LIMIT. */
export function pageSql(filter: Omit<MessageFilter, 'limit' | 'before'>, cursor?: Cursor): { sql: string; params: unknown[] } {
  const where: string[] = [];
  const params: unknown[] = [];
  const byRecipient = filter.recipient !== undefined;
  if (filter.recipient !== undefined) {
    // in the decoded form, as recipients are stored (mail stored before that, by migration 011)
    where.push('id IN (SELECT message_id FROM recipients WHERE lower(address) = lower(?))');
    // as RCPT TO writes it, `<bob@example.com>`, as the sender filter takes it too
    params.push(decodeIdnDomain(withoutAngleBrackets(filter.recipient)));
  }
  // A leading `+` keeps SQLite from using that column's index when the recipient leads.
  const column = (name: string) => (byRecipient ? `+${name}` : name);
  if (filter.state !== undefined) {
    where.push(`${column('state')} = ?`);
    params.push(filter.state);
  }
  if (filter.sender !== undefined) {
    // With a state other than delivered, that state's index, newest first: the messages in such a
    // state are few next to a busy sender's history, all of which the sender's index would read
    // to find those in the state (an index on both would cost every insert one more b-tree).
    const byState = filter.state !== undefined && filter.state !== 'delivered';
    where.push(`${byState ? '+sender_key' : column('sender_key')} = ?`);
    params.push(senderFilterKey(filter.sender));
  }
  if (cursor) {
    where.push('(received_at, id) < (?, ?)');
    params.push(cursor.receivedAt, cursor.id);
  }
  const sql = `SELECT ${SUMMARY_COLUMNS} FROM messages
    ${where.length ? `WHERE ${where.join(' AND ')}` : ''}
    ORDER BY received_at DESC, id DESC LIMIT CAST(? AS INTEGER)`;
  return { sql, params };
}

export type MessageRow = Omit<MessagesTable, 'body_id' | 'lease_token' | 'next_attempt_at'> & {
  /** When it is due while queued, else null (as in MessageSummary). */
  next_attempt_at: number | null;
  /** 1 when the raw bytes were erased (logAllEmails=false after delivery). */
  raw_erased: number;
};

/** `next_attempt_at`: when a pending recipient is due, null once it is delivered or failed. */
export type RecipientRow = Omit<RecipientsTable, 'message_id' | 'next_attempt_at'> & { next_attempt_at: number | null };

export type AttemptRow = Omit<AttemptsTable, 'message_id' | 'recipients'> & { recipients: string[] };

export interface MessageDetail {
  message: MessageRow;
  recipients: RecipientRow[];
  attempts: AttemptRow[];
}

export function messageDetail(sqlite: Sqlite, id: string): MessageDetail | undefined {
  // one snapshot: the recipients and the attempts agree with each other and with the state
  return sqlite.transaction(() => messageDetailNow(sqlite, id))();
}

function messageDetailNow(sqlite: Sqlite, id: string): MessageDetail | undefined {
  const message = prepared(
    sqlite,
    `SELECT ${SUMMARY_COLUMNS}, sender_key, client_hostname, helo, smtputf8, lease_expires_at, updated_at, body_id IS NULL AS raw_erased
     FROM messages WHERE id = ?`,
  ).get(id) as MessageRow | undefined;
  if (!message) return undefined;
  const recipients = prepared(
    sqlite,
    `SELECT seq, address, status, attempts, CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at,
       last_code, last_reply, temporary, updated_at
     FROM recipients WHERE message_id = ? ORDER BY seq`,
  ).all(id) as RecipientRow[];
  const attempts = (
    prepared(
      sqlite,
      `SELECT id, batch, recipients, upstream, started_at, duration_ms, outcome, code, reply
       FROM attempts WHERE message_id = ? ORDER BY id`,
    ).all(id) as Array<Omit<AttemptRow, 'recipients'> & { recipients: string }>
  ).map((a) => ({ ...a, recipients: parseRecipientList(a.recipients) }));
  return { message, recipients, attempts };
}

function parseRecipientList(text: string): string[] {
  try {
    const value: unknown = JSON.parse(text);
    return Array.isArray(value) ? value.map(String) : [text];
  } catch {
    return [text];
  }
}

/** A failed message with its content, from one snapshot; undefined unless it is failed. */
export function failedMessage(sqlite: Sqlite, id: string): { detail: MessageDetail; raw: Buffer | null } | undefined {
  return sqlite.transaction(() => {
    const detail = messageDetailNow(sqlite, id);
    return detail?.message.state === 'failed' ? { detail, raw: messageRaw(sqlite, id)?.raw ?? null } : undefined;
  })();
}

/** The state of message `id`; undefined when there is no such message. */
export function messageState(sqlite: Sqlite, id: string): MessageState | undefined {
  return (prepared(sqlite, 'SELECT state FROM messages WHERE id = ?').get(id) as { state: MessageState } | undefined)?.state;
}

/** When a failed message failed (finished_at); undefined when it is not failed (any more). */
export function failedAt(sqlite: Sqlite, id: string): number | undefined {
  return (prepared(sqlite, "SELECT finished_at FROM messages WHERE id = ? AND state = 'failed'").get(id) as { finished_at: number } | undefined)?.finished_at;
}

/** undefined = no such message; raw null = erased after delivery (logAllEmails=false). */
export function messageRaw(sqlite: Sqlite, id: string): { raw: Buffer | null } | undefined {
  return prepared(sqlite, 'SELECT (SELECT raw FROM message_bodies WHERE id = body_id) AS raw FROM messages WHERE id = ?').get(id) as
    | { raw: Buffer | null }
    | undefined;
}
