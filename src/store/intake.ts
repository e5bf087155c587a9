// The intake side of the queue: the policy checks that must hold at the moment a message is
// stored (rate limits, queue size) and the insert of a message with its recipients. The insert and
// its checks run inside the writer's group-commit transaction, so a check and the insert it guards
// cannot be split by another session; intake also reads the checks early, at MAIL FROM.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { addressKey, withoutAngleBrackets } from '../address.js';
import { count } from '../count.js';
import { escapeTerminalUnsafe } from '../terminal-unsafe.js';
import type { Sqlite } from './db.js';
import { prepared } from './statements.js';

export interface RateLimitPolicy {
  enabled: boolean;
  maxPerHour: number;
  maxPerDay: number;
  globalMaxPerHour: number;
  globalMaxPerDay: number;
}

export interface IntakePolicy {
  rateLimits: RateLimitPolicy;
  /** 0 = unlimited. */
  queueSize: number;
}

export interface NewMessage {
  id: string;
  mailFrom: string;
  recipients: string[];
  authUser: string | null;
  clientIp: string;
  helo: string | null;
  /** The client's MAIL FROM carried SMTPUTF8. */
  smtpUtf8: boolean;
  /** The message's bytes; with `spooled`, its first part, and the rest is in that file. */
  raw: Buffer;
  spooled?: { file: string; bytes: number };
  receivedAt: number;
}

export type LimitName = 'maxPerHour' | 'maxPerDay' | 'globalMaxPerHour' | 'globalMaxPerDay';

export interface LimitHit {
  limit: LimitName;
  max: number;
  count: number;
}

/** Raised inside the insert transaction; intake maps it to its SMTP reply. */
export class PolicyRefusal extends Error {
  constructor(
    readonly kind: 'rate-limit' | 'queue-full',
    message: string,
    readonly hit?: LimitHit,
  ) {
    super(message);
  }
}

const HOUR_MINUTES = 60;
/** The longest rate-limit window, a rolling day: retention prunes the buckets no window reaches. */
export const DAY_MINUTES = 1440;
/** The rate-limit bucket (minute since the epoch) of a time in ms. */
export const minuteOf = (ms: number): number => Math.floor(ms / 60_000);
export const GLOBAL_SENDER_KEY = '*';

/** Random bytes drawn in blocks: one call into the system's generator per 800 queue ids. */
const RANDOM_BLOCK_BYTES = 4000;
let randomBlock = Buffer.alloc(0);
let randomOffset = 0;

function randomHex(bytes: number): string {
  if (randomOffset + bytes > randomBlock.length) {
    randomBlock = crypto.randomBytes(RANDOM_BLOCK_BYTES);
    randomOffset = 0;
  }
  randomOffset += bytes;
  return randomBlock.toString('hex', randomOffset - bytes, randomOffset);
}

/** Queue ids sort by arrival: 11 hex digits of milliseconds, then 9 random hex digits. */
export function newQueueId(now: number): string {
  return now.toString(16).toUpperCase().padStart(11, '0') + randomHex(5).toUpperCase().slice(0, 9);
}

/**
 * A queue id as someone typed it: ids are hex digits written in upper case, so `1a2b…` names the
 * same message as `1A2B…` (an id is matched exactly in the database). Anything else is kept as
 * given, to be reported as not found.
 */
export function canonicalQueueId(input: string): string {
  return /^[0-9a-f]+$/i.test(input) ? input.toUpperCase() : input;
}

/**
 * An id as someone typed it, for a reason given on one line: as it is when it is letters, digits
 * and `_.@+-`, else as a JSON string, so that a newline or an escape sequence in it is written
 * `\n`, `\u001b` instead of acting on the terminal; at most 64 characters of it.
 */
export function typedId(input: string): string {
  const cut = input.length <= 64 ? input : `${input.slice(0, 64)}…`;
  return /^[\w.@+-]+$/.test(input) ? cut : escapeTerminalUnsafe(JSON.stringify(cut));
}

/**
 * Rate limits apply per envelope sender, by its addressKey: the check at MAIL FROM, which gets
 * the address as the client wrote it, finds the key the stored message counts under. The null
 * sender `<>` is the key ''. The sender filters compare this key too.
 */
export function senderKey(mailFrom: string): string {
  return addressKey(mailFrom);
}

/**
 * The key a sender filter (`relayq queue --sender`, `?sender=`, a bulk retry's `sender`) asks for:
 * also the sender as listings show it and MAIL FROM writes it, `<>` for the null sender and
 * `<app@example.com>` for an address, since no stored sender starts with `<`.
 */
export function senderFilterKey(sender: string): string {
  return senderKey(withoutAngleBrackets(sender));
}

/** The limits in the order they are checked: the first one reached is the one reported. */
const LIMIT_NAMES: readonly LimitName[] = ['maxPerHour', 'maxPerDay', 'globalMaxPerHour', 'globalMaxPerDay'];

const minutes = (key: string, from: string, to: string) =>
  `(SELECT COALESCE(SUM(count), 0) FROM rate_buckets WHERE sender_key = ${key} AND minute >= @${from} AND minute < @${to})`;
const wholeHours = (key: string) =>
  `(SELECT COALESCE(SUM(count), 0) FROM rate_hours WHERE sender_key = ${key} AND hour > @dayFirstHour AND hour < @currentHour)`;
const windowTerms = (key: string, as: string) =>
  `${minutes(key, 'currentHourStart', 'end')} AS ${as}Tail, ${minutes(key, 'hourStart', 'currentHourStart')} AS ${as}HourHead,
   ${minutes(key, 'dayStart', 'dayHeadEnd')} AS ${as}DayHead, ${wholeHours(key)} AS ${as}DayHours`;
const RATE_WINDOWS_SQL = `SELECT ${windowTerms('@key', 'sender')}, ${windowTerms(`'${GLOBAL_SENDER_KEY}'`, 'all')}`;

/**
 * Messages accepted in the four rolling windows the limits count: `key`'s and everyone's, in the
 * last 60 and the last 1,440 minutes (the current minute included). One statement; each window
 * is a few range sums, so the cost does not grow with the messages it holds:
 *   - the minutes of the current hour (rate_buckets), which both windows end with;
 *   - the hour window's minutes before them, in the previous hour (rate_buckets);
 *   - the day window's minutes in its first hour (rate_buckets), and the whole hours between
 *     that one and the current one (rate_hours).
 */
export function rateWindows(sqlite: Sqlite, key: string, now: number): Record<LimitName, number> {
  const current = minuteOf(now);
  const currentHour = Math.floor(current / 60);
  const dayStart = current - DAY_MINUTES + 1;
  const dayFirstHour = Math.floor(dayStart / 60);
  const r = prepared(sqlite, RATE_WINDOWS_SQL).get({
    key,
    end: current + 1,
    currentHourStart: currentHour * 60,
    currentHour,
    hourStart: current - HOUR_MINUTES + 1,
    dayStart,
    dayHeadEnd: (dayFirstHour + 1) * 60,
    dayFirstHour,
  }) as Record<string, number>;
  return {
    maxPerHour: r.senderTail + r.senderHourHead,
    maxPerDay: r.senderTail + r.senderDayHead + r.senderDayHours,
    globalMaxPerHour: r.allTail + r.allHourHead,
    globalMaxPerDay: r.allTail + r.allDayHead + r.allDayHours,
  };
}

/** The first limit that one more message from `mailFrom` would exceed, if any. */
export function checkRateLimits(sqlite: Sqlite, mailFrom: string, now: number, limits: RateLimitPolicy): LimitHit | undefined {
  if (!limits.enabled) return undefined;
  const counts = rateWindows(sqlite, senderKey(mailFrom), now);
  const limit = LIMIT_NAMES.find((name) => counts[name] >= limits[name]);
  return limit ? { limit, max: limits[limit], count: counts[limit] } : undefined;
}

/** Messages not yet final (queued + sending), from trigger-maintained counters: no scan. */
export function activeCount(sqlite: Sqlite): number {
  const row = prepared(sqlite, "SELECT SUM(value) AS n FROM counters WHERE name IN ('state_queued', 'state_sending')").get() as { n: number | null };
  return row.n ?? 0;
}

export function isQueueFull(sqlite: Sqlite, queueSize: number): boolean {
  return queueSize > 0 && activeCount(sqlite) >= queueSize;
}

export function rateLimitMessage(hit: LimitHit): string {
  const scope = hit.limit.startsWith('global') ? 'all senders' : 'sender';
  const window = hit.limit.endsWith('Hour') ? 'hour' : 'day';
  return `rate limit ${hit.limit} reached: ${scope} sent ${count(hit.count, 'message')} in the last ${window} (max ${hit.max})`;
}

/**
 * Inserts a message and its recipients after re-checking the policy in this transaction, in the
 * order MAIL FROM checks it: a full queue, then the rate limits.
 */
export function insertMessage(sqlite: Sqlite, msg: NewMessage, policy: IntakePolicy): string {
  if (isQueueFull(sqlite, policy.queueSize)) throw new PolicyRefusal('queue-full', 'queue full, try again later');
  const hit = checkRateLimits(sqlite, msg.mailFrom, msg.receivedAt, policy.rateLimits);
  if (hit) throw new PolicyRefusal('rate-limit', rateLimitMessage(hit), hit);
  const raw = messageBytes(msg);
  const body = prepared(sqlite, 'INSERT INTO message_bodies (raw) VALUES (?)').run(raw);
  prepared(
    sqlite,
    `INSERT INTO messages (id, state, mail_from, sender_key, auth_user, client_ip, helo, smtputf8,
       size, recipient_count, body_id, received_at, next_attempt_at, updated_at)
     VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
  ).run(
    msg.id,
    msg.mailFrom,
    senderKey(msg.mailFrom),
    msg.authUser,
    msg.clientIp,
    msg.helo,
    msg.smtpUtf8 ? 1 : 0,
    raw.length,
    msg.recipients.length,
    body.lastInsertRowid,
    msg.receivedAt,
    msg.receivedAt,
    msg.receivedAt,
  );
  const addRecipient = prepared(
    sqlite,
    `INSERT INTO recipients (message_id, seq, address, status, next_attempt_at, updated_at)
     VALUES (?, ?, ?, 'pending', ?, ?)`,
  );
  for (const [seq, address] of msg.recipients.entries()) {
    addRecipient.run(msg.id, seq, address, msg.receivedAt, msg.receivedAt);
  }
  return msg.id;
}

/**
 * Where the writer assembles a spooled message before its insert: one buffer, reused, as SQLite
 * copies a bound blob (better-sqlite3 binds it SQLITE_TRANSIENT). A fresh buffer per message
 * lives until V8 collects it, and 200 clients sending 1 MB at once left the writer thread holding
 * about 30 MB more at its peak. It grows to the largest spooled message up to SCRATCH_MAX_BYTES;
 * a larger one gets a buffer of its own.
 */
const SCRATCH_MAX_BYTES = 4 * 1024 * 1024;
let scratch = Buffer.alloc(0);

/** The whole message: `raw`, followed by the spool file's bytes (read into one allocation). */
function messageBytes(msg: Pick<NewMessage, 'raw' | 'spooled'>): Buffer {
  if (!msg.spooled) return msg.raw;
  const { file, bytes } = msg.spooled;
  const size = msg.raw.length + bytes;
  const reuse = size <= SCRATCH_MAX_BYTES;
  if (reuse && scratch.length < size) scratch = Buffer.allocUnsafe(size);
  const whole = reuse ? scratch.subarray(0, size) : Buffer.allocUnsafe(size);
  whole.set(msg.raw); // after the thread boundary `raw` is a Uint8Array
  const fd = fs.openSync(file, 'r');
  try {
    for (let at = msg.raw.length; at < whole.length; ) {
      const n = fs.readSync(fd, whole, at, whole.length - at, null);
      if (n === 0) throw new Error(`spool file ${file} holds ${at - msg.raw.length} bytes, not ${bytes}`);
      at += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return whole;
}

const REFUSAL_COUNTERS = { 'rate-limit': 'rate_limit_refusals', 'queue-full': 'queue_full_refusals', 'disk-low': 'disk_low_refusals' } as const;

/** Persisted count of refusals by reason, exposed by the metrics (the row of disk_low_refusals is made by the first). */
export function countRefusal(sqlite: Sqlite, kind: keyof typeof REFUSAL_COUNTERS): void {
  prepared(sqlite, 'INSERT INTO counters (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1').run(REFUSAL_COUNTERS[kind]);
}
