// The rolling windows that rate limits count: per-minute and hourly buckets kept by the insert
// trigger, summed at the two ends and in the middle of a window. Checked against a plain count of
// the stored messages at every few minutes of two days, and across the upgrade that added the
// hourly buckets.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import * as initial from '../../migrations/001_initial.js';
import * as metrics from '../../migrations/002_metrics.js';
import * as rateBucketMinute from '../../migrations/003_rate_bucket_minute.js';
import { openStore, type Sqlite } from '../../src/store/db.js';
import { kyselyFor, migrateToLatest } from '../../src/store/migrate.js';
import { checkRateLimits, GLOBAL_SENDER_KEY, insertMessage, newQueueId, rateWindows } from '../../src/store/intake.js';
import { pruneRateBuckets } from '../../src/store/retention.js';
import { NO_LIMITS, newMessage, tempDir } from '../helpers.js';

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;
const T0 = Date.UTC(2026, 0, 5, 7, 0, 0);
/** Deterministic pseudo-random numbers in [0, 1). */
function lcg(seed: number): () => number {
  let x = seed;
  return () => {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    return x / 2 ** 31;
  };
}

function store(sqlite: Sqlite, sender: string, at: number) {
  insertMessage(sqlite, newMessage({ id: newQueueId(at), mailFrom: sender, raw: Buffer.from('x'), receivedAt: at }), NO_LIMITS);
}

/** A message as the schema before migration 004 stores it (insertMessage writes today's schema). */
function storeBefore004(sqlite: Sqlite, sender: string, at: number) {
  sqlite
    .prepare(
      `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, raw, received_at, next_attempt_at, updated_at)
       VALUES (?, 'queued', ?, ?, '127.0.0.1', 1, 1, x'78', ?, ?, ?)`,
    )
    .run(newQueueId(at), sender, sender, at, at, at);
}

/** The four windows as rateWindows counts them, from the messages themselves. */
function plainWindows(sqlite: Sqlite, key: string, now: number) {
  return {
    maxPerHour: plainCount(sqlite, key, now, 60),
    maxPerDay: plainCount(sqlite, key, now, 1440),
    globalMaxPerHour: plainCount(sqlite, GLOBAL_SENDER_KEY, now, 60),
    globalMaxPerDay: plainCount(sqlite, GLOBAL_SENDER_KEY, now, 1440),
  };
}

/** A window counted from the messages themselves. */
function plainCount(sqlite: Sqlite, key: string, now: number, minutes: number): number {
  const current = Math.floor(now / MINUTE);
  const where = key === GLOBAL_SENDER_KEY ? '' : 'sender_key = ? AND';
  const params = key === GLOBAL_SENDER_KEY ? [] : [key];
  return (
    sqlite.prepare(`SELECT COUNT(*) AS n FROM messages WHERE ${where} received_at / 60000 > ? AND received_at / 60000 <= ?`).get(...params, current - minutes, current) as { n: number }
  ).n;
}

test('the four window counts equal plain counts of the messages at every minute offset, over two days', async () => {
  const s = await openStore(path.join(tempDir(), 'windows.db'));
  try {
    const random = lcg(42);
    const senders = ['a@example.com', 'b@example.com', ''];
    s.sqlite.transaction(() => {
      for (let i = 0; i < 3000; i++) store(s.sqlite, senders[Math.floor(random() * 3)], T0 + Math.floor(random() * 2 * DAY));
      // bursts on hour and minute edges
      for (const at of [T0 + HOUR - 1, T0 + HOUR, T0 + DAY - MINUTE, T0 + DAY, T0 + DAY + 59 * MINUTE]) for (let i = 0; i < 7; i++) store(s.sqlite, 'a@example.com', at);
    })();
    let checked = 0;
    for (let now = T0 - HOUR; now <= T0 + 3 * DAY; now += 7 * MINUTE + 13_000) {
      for (const key of ['a@example.com', '', 'nobody@example.com']) {
        assert.deepEqual(rateWindows(s.sqlite, key, now), plainWindows(s.sqlite, key, now), `${key} at ${new Date(now).toISOString()}`);
        checked++;
      }
    }
    assert.ok(checked > 1500);
    assert.ok(rateWindows(s.sqlite, 'a@example.com', T0 + DAY).globalMaxPerDay > 1000, 'the data fills the windows');
  } finally {
    await s.close();
  }
});

test('pruning removes per-minute and hourly buckets no window reaches, and leaves the counts alone', async () => {
  const s = await openStore(path.join(tempDir(), 'prune.db'));
  try {
    for (let h = 0; h < 48; h++) store(s.sqlite, 'a@example.com', T0 + h * HOUR + 30 * MINUTE);
    const now = T0 + 48 * HOUR;
    const before = rateWindows(s.sqlite, 'a@example.com', now);
    let pruned = 0;
    for (let n = pruneRateBuckets(s.sqlite, now, 5); n > 0; n = pruneRateBuckets(s.sqlite, now, 5)) pruned += n;
    const rows = (table: string) => (s.sqlite.prepare(`SELECT COUNT(*) AS n FROM ${table}`).get() as { n: number }).n;
    // the 24 messages of the first day are out of every window: their minute and hour rows go,
    // each twice (the sender's and '*'); the window now starts a minute into hour 24
    assert.equal(pruned, 24 * 2 + 24 * 2);
    assert.equal(rows('rate_buckets'), 24 * 2);
    assert.equal(rows('rate_hours'), 24 * 2);
    assert.deepEqual(rateWindows(s.sqlite, 'a@example.com', now), before);
    assert.equal(before.maxPerDay, 24);
  } finally {
    await s.close();
  }
});

test('pruning keeps the oldest minute still in the rolling day: it counts toward maxPerDay until the minute after', async () => {
  const s = await openStore(path.join(tempDir(), 'prune-edge.db'));
  try {
    const sent = T0 + 17 * MINUTE + 30_000;
    store(s.sqlite, 'a@example.com', sent);
    const limits = { enabled: true, maxPerHour: 100, maxPerDay: 1, globalMaxPerHour: 100, globalMaxPerDay: 100 };
    const pruneAll = (now: number) => {
      let pruned = 0;
      for (let n = pruneRateBuckets(s.sqlite, now, 5); n > 0; n = pruneRateBuckets(s.sqlite, now, 5)) pruned += n;
      return pruned;
    };
    const minuteRows = () => (s.sqlite.prepare('SELECT COUNT(*) AS n FROM rate_buckets').get() as { n: number }).n;
    // 1,439 minutes later the message's minute is the first of the day window (the current minute is its last)
    const lastMinuteInWindow = sent + 1439 * MINUTE;
    assert.equal(pruneAll(lastMinuteInWindow), 0);
    assert.equal(minuteRows(), 2, "the sender's and '*' minute buckets are kept");
    assert.equal(rateWindows(s.sqlite, 'a@example.com', lastMinuteInWindow).maxPerDay, 1);
    assert.deepEqual(checkRateLimits(s.sqlite, 'a@example.com', lastMinuteInWindow, limits), { limit: 'maxPerDay', max: 1, count: 1 });
    // a minute later no window reaches it: its minute buckets go (its hour's go once the whole hour is out)
    const outOfWindow = lastMinuteInWindow + MINUTE;
    assert.equal(pruneAll(outOfWindow), 2);
    assert.equal(minuteRows(), 0);
    assert.equal(checkRateLimits(s.sqlite, 'a@example.com', outOfWindow, limits), undefined);
  } finally {
    await s.close();
  }
});

test('the upgrade to hourly buckets fills them from the per-minute buckets already there', async () => {
  const file = path.join(tempDir(), 'old.db');
  const sqlite = new Database(file);
  const db = kyselyFor(sqlite);
  await migrateToLatest(db, { '001_initial': initial, '002_metrics': metrics, '003_rate_bucket_minute': rateBucketMinute });
  const random = lcg(7);
  for (let i = 0; i < 500; i++) storeBefore004(sqlite, random() < 0.5 ? 'a@example.com' : 'b@example.com', T0 + Math.floor(random() * DAY));
  await db.destroy();

  const s = await openStore(file);
  try {
    for (let now = T0; now <= T0 + 2 * DAY; now += 37 * MINUTE) {
      assert.deepEqual(rateWindows(s.sqlite, 'a@example.com', now), plainWindows(s.sqlite, 'a@example.com', now));
    }
    // and the rewritten trigger keeps counting
    store(s.sqlite, 'a@example.com', T0 + DAY - 1);
    assert.deepEqual(rateWindows(s.sqlite, 'a@example.com', T0 + DAY - 1), plainWindows(s.sqlite, 'a@example.com', T0 + DAY - 1));
    const counters = s.sqlite.prepare("SELECT name, value FROM counters WHERE name IN ('state_queued', 'messages_accepted', 'recipients_accepted', 'bytes_accepted')").all();
    assert.deepEqual(Object.fromEntries((counters as Array<{ name: string; value: number }>).map((r) => [r.name, r.value])), {
      state_queued: 501,
      messages_accepted: 501,
      recipients_accepted: 501,
      bytes_accepted: 501,
    });
  } finally {
    await s.close();
  }
});
