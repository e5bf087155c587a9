// Random sequences of the writer's operations on a real store file: after each, the counters that
// /health and /metrics read equal the rows they count, every message's state follows its
// recipients' states, and nothing is left behind by a delete (recipients, attempts, bodies).
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { openStore, type Sqlite } from '../../src/store/db.js';
import { WRITE_OPS } from '../../src/store/write-ops.js';
import { NO_LIMITS, newMessage, tempDir } from '../helpers.js';

const SEEDS = 10;
const STEPS = 400;
const DAY_MS = 86_400_000;

/** A claim the test holds, as a delivery worker would. */
interface Held {
  messageId: string;
  token: string;
  batch: number;
  recipients: Array<{ seq: number; attempts: number }>;
}

/** A whole number below `n`, from a seeded generator (mulberry32): a failing seed fails again. */
function seededRandom(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
  };
}

/**
 * A message still queued or sending may have no recipient pending: one an earlier transaction of
 * its batch delivered to (recordDelivered), whose claim was then given back, is finished by its
 * next claim.
 */
function assertConsistent(sqlite: Sqlite, where: string): void {
  const one = (sql: string) => (sqlite.prepare(sql).pluck().get() as number | undefined) ?? 0;
  for (const state of ['queued', 'sending', 'delivered', 'failed']) {
    assert.equal(
      one(`SELECT value FROM counters WHERE name = 'state_${state}'`),
      one(`SELECT count(*) FROM messages WHERE state = '${state}'`),
      `${where}: state_${state}`,
    );
  }
  assert.equal(
    one("SELECT value FROM counters WHERE name = 'queued_deferred'"),
    one("SELECT count(*) FROM messages WHERE state = 'queued' AND claims > 0"),
    `${where}: queued_deferred`,
  );
  assert.equal(one('SELECT count(*) FROM message_bodies WHERE id NOT IN (SELECT body_id FROM messages WHERE body_id IS NOT NULL)'), 0, `${where}: bodies left behind`);
  assert.equal(one('SELECT count(*) FROM recipients WHERE message_id NOT IN (SELECT id FROM messages)'), 0, `${where}: recipients left behind`);
  assert.equal(one('SELECT count(*) FROM attempts WHERE message_id NOT IN (SELECT id FROM messages)'), 0, `${where}: attempts left behind`);
  const disagreeing = sqlite
    .prepare(
      `SELECT m.id, m.state, m.body_id, group_concat(r.status) AS recipients FROM messages m JOIN recipients r ON r.message_id = m.id GROUP BY m.id
       HAVING (m.state = 'delivered' AND SUM(r.status <> 'delivered') > 0)
           OR (m.state = 'failed' AND (SUM(r.status = 'pending') > 0 OR SUM(r.status = 'failed') = 0))
           OR (m.state <> 'delivered' AND m.body_id IS NULL)
           OR (m.state = 'sending' AND m.lease_token IS NULL)
           OR ((m.state IN ('delivered', 'failed')) <> (m.finished_at IS NOT NULL))`,
    )
    .all();
  assert.deepEqual(disagreeing, [], `${where}: a message's state disagrees with its recipients, body or lease`);
}

test('random sequences of store writes keep the counters equal to the rows, each state following its recipients, and leave nothing behind', async () => {
  const dir = tempDir();
  for (let seed = 1; seed <= SEEDS; seed++) {
    const erase = seed % 2 === 0;
    const store = await openStore(path.join(dir, `seed-${seed}.db`), { secureDelete: erase });
    const sqlite = store.sqlite;
    const random = seededRandom(seed);
    let now = 1_800_000_000_000;
    const held: Held[] = [];
    const ids: string[] = [];
    const done: string[] = [];
    const write = <T>(name: string, fn: () => T): T => {
      done.push(name);
      return sqlite.transaction(fn).immediate();
    };
    const takeHeld = () => held.splice(random(held.length), 1)[0];
    try {
      for (let step = 0; step < STEPS; step++) {
        now += random(5) === 0 ? 3 * DAY_MS : random(120_000);
        const op = random(12);
        if (op <= 1) {
          const id = `M${String(seed).padStart(3, '0')}x${String(step).padStart(5, '0')}`.padEnd(20, '0');
          const recipients = Array.from({ length: 1 + random(5) }, (_, k) => `r${k}@example.net`);
          write('insert', () =>
            WRITE_OPS.insertMessage(sqlite, newMessage({ id, raw: Buffer.from(`Subject: ${step}\r\n\r\nbody\r\n`), receivedAt: now, recipients }), NO_LIMITS),
          );
          ids.push(id);
        } else if (op <= 3) {
          const claimed = write('claim', () =>
            WRITE_OPS.claimDueBatches(sqlite, { now, leaseMs: 300_000, batchSize: 2, limit: 3, fresh: 1, maxAttempts: 3, eraseRawOnDelivered: erase }),
          );
          for (const b of claimed.batches) held.push({ messageId: b.messageId, token: b.token, batch: b.batch, recipients: b.recipients });
        } else if (op <= 5 && held.length > 0) {
          const claim = takeHeld();
          const recipients = claim.recipients.map((r) => {
            const k = random(3);
            const status = k === 0 ? 'delivered' : k === 1 ? 'failed' : 'pending';
            return { seq: r.seq, attempts: r.attempts, status, code: [250, 550, 450][k], reply: 'reply', temporary: k === 2, nextAttemptAt: now + 60_000 } as const;
          });
          write('complete', () =>
            WRITE_OPS.completeBatch(sqlite, {
              messageId: claim.messageId,
              token: claim.token,
              now,
              attempt: { batch: claim.batch, recipients: [], upstream: 'upstream', startedAt: now, durationMs: 5, outcome: 'deferred', code: 450, reply: 'reply' },
              recipients,
              upstreamFailed: false,
              batchDelayMs: 1000,
              eraseRawOnDelivered: erase,
              lastFailure: null,
              failRemaining: random(6) === 0 ? 'stop' : undefined,
            }),
          );
        } else if (op === 6 && held.length > 0) {
          const claim = takeHeld();
          const seqs = claim.recipients.map((r) => r.seq);
          const k = random(3);
          const uncount = k === 0 ? { unsent: seqs } : k === 1 ? { unanswered: seqs } : {};
          write('release', () => WRITE_OPS.releaseClaims(sqlite, [{ messageId: claim.messageId, token: claim.token, ...uncount }], now));
        } else if (op === 7 && held.length > 0) {
          // an earlier transaction of the batch delivered to its first recipient; the claim goes on
          const claim = held[random(held.length)];
          const first = claim.recipients[0];
          write('delivered so far', () =>
            WRITE_OPS.recordDelivered(sqlite, { messageId: claim.messageId, token: claim.token, now, recipients: [{ ...first, code: 250, reply: 'ok' }] }),
          );
        } else if (op === 8 && ids.length > 0) {
          const id = ids[random(ids.length)];
          const k = random(4);
          if (k === 0) write('delete', () => WRITE_OPS.deleteMessage(sqlite, id, now));
          else if (k === 1) write('retry', () => WRITE_OPS.retryMessage(sqlite, id, now, 1000));
          else if (k === 2) write('requeue failed', () => WRITE_OPS.requeueFailed(sqlite, { ids: [id] }, now, 1000));
          else write('requeue temporary failures', () => WRITE_OPS.requeueTemporaryFailures(sqlite, [id], { now, maxAttempts: 3, batchDelayMs: 1000 }));
        } else if (op === 9) {
          write('flush', () => WRITE_OPS.flushQueued(sqlite, ids.slice(-5), now, 1000));
        } else if (op === 10) {
          write('retention', () => WRITE_OPS.retentionSweep(sqlite, { now, deliveredDays: 1, limit: 5 }));
          write('erase delivered', () => WRITE_OPS.eraseDeliveredContent(sqlite, { after: { finishedAt: Number.MIN_SAFE_INTEGER, rowid: 0 }, limit: 5 }));
        } else if (op === 11 && random(10) === 0) {
          // a start after a crash: the claims held are given back
          write('orphaned claims', () => WRITE_OPS.releaseOrphanedClaims(sqlite, now));
          held.length = 0;
        }
        assertConsistent(sqlite, `seed ${seed}, step ${step}, after ${done.slice(-4).join(', ')}`);
      }
      assert.ok(done.filter((name) => name === 'complete').length > 20, `seed ${seed} completed batches`);
      for (const final of ['messages_delivered', 'messages_failed', 'messages_requeued']) {
        assert.ok((sqlite.prepare('SELECT value FROM counters WHERE name = ?').pluck().get(final) as number) > 0, `seed ${seed}: ${final}`);
      }
    } finally {
      await store.close();
    }
  }
});
