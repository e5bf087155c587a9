// The relay's own `relayq retry --queued` once the upstream is reached after an outage: every
// queued message waiting for a time to come is made due, in steps, each once.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { ADMIN_STEP, dueAfterOutageInSteps } from '../../src/store/admin.js';
import { openStore } from '../../src/store/db.js';
import { WRITE_OPS } from '../../src/store/write-ops.js';
import { NO_LIMITS, newMessage, tempDir } from '../helpers.js';

test('mail waiting for its retry is made due in steps of ADMIN_STEP, each message once, through ties in its due time; mail due already, or between two batches, stays as it was', async () => {
  const store = await openStore(path.join(tempDir(), 'relayq.db'));
  const { sqlite } = store;
  const now = 1_800_000_000_000;
  const batchDelayMs = 1000;
  try {
    const waiting = ADMIN_STEP * 2 + 7;
    const ids = Array.from({ length: waiting + 3 }, (_, i) => `M${String(i).padStart(19, '0')}`);
    sqlite.transaction(() => {
      for (const id of ids) WRITE_OPS.insertMessage(sqlite, newMessage({ id, raw: Buffer.from('Subject: x\r\n\r\nx\r\n'), receivedAt: now - 60_000 }), NO_LIMITS);
      const dueAt = sqlite.prepare('UPDATE messages SET next_attempt_at = ?, claims = 1 WHERE id = ?');
      // three retry times for those waiting, so that pages end within a run of equal times
      for (const [i, id] of ids.slice(0, waiting).entries()) dueAt.run(now + 60_000 * (1 + (i % 3)), id);
      // one due already, one due in the past
      dueAt.run(now, ids[waiting]);
      dueAt.run(now - 5000, ids[waiting + 1]);
      // one whose last batch ended just now: the next waits for batchDelay
      const betweenBatches = ids[waiting + 2];
      dueAt.run(now + batchDelayMs, betweenBatches);
      sqlite
        .prepare("INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome, code, reply) VALUES (?, 0, '[]', 'u', ?, 0, 'deferred', 451, 'x')")
        .run(betweenBatches, now);
    })();
    const before = new Map(ids.map((id) => [id, sqlite.prepare('SELECT next_attempt_at FROM messages WHERE id = ?').pluck().get(id) as number]));

    const steps: string[][] = [];
    const made = await dueAfterOutageInSteps(
      sqlite,
      now,
      async (step) => {
        steps.push(step);
        return sqlite.transaction(() => WRITE_OPS.makeDue(sqlite, step, now, batchDelayMs))();
      },
      () => false,
    );

    assert.equal(made, waiting + 1, "the one between two batches too, kept at its batchDelay");
    assert.deepEqual(
      steps.map((s) => s.length),
      [ADMIN_STEP, ADMIN_STEP, 8],
    );
    const offered = steps.flat();
    assert.equal(new Set(offered).size, offered.length, 'each message once');
    assert.deepEqual(offered.slice().sort(), [...ids.slice(0, waiting), ids[waiting + 2]].sort());
    const dueNow = sqlite.prepare('SELECT id FROM messages WHERE next_attempt_at = ? ORDER BY id').pluck().all(now);
    assert.deepEqual(dueNow, [...ids.slice(0, waiting), ids[waiting]]);
    assert.equal(sqlite.prepare('SELECT next_attempt_at FROM messages WHERE id = ?').pluck().get(ids[waiting + 1]), before.get(ids[waiting + 1]));
    assert.equal(sqlite.prepare('SELECT next_attempt_at FROM messages WHERE id = ?').pluck().get(ids[waiting + 2]), now + batchDelayMs);
    const recipientsDue = sqlite.prepare('SELECT count(*) FROM recipients WHERE next_attempt_at = ?').pluck().get(now);
    assert.equal(recipientsDue, waiting + 1, "their recipients' too");
    // not an operator's request: it ends no suspension by itself
    assert.equal(sqlite.prepare("SELECT count(*) FROM counters WHERE name = 'delivery_requested_at'").pluck().get(), 0);

    // a stop ends the walk between two steps
    let stepsAtStop = 0;
    const afterStop = await dueAfterOutageInSteps(
      sqlite,
      now - 10 * 60_000,
      async () => {
        stepsAtStop++;
        return ADMIN_STEP;
      },
      () => stepsAtStop === 1,
    );
    assert.deepEqual([stepsAtStop, afterStop], [1, ADMIN_STEP]);
  } finally {
    await store.close();
  }
});
