// The relay's own `relayq retry --queued` once the upstream is reached after an outage: every
// queued message the outage deferred is made due, in steps, each once.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { ADMIN_STEP, dueAfterOutageInSteps } from '../../src/store/admin.js';
import { openStore } from '../../src/store/db.js';
import { WRITE_OPS } from '../../src/store/write-ops.js';
import { NO_LIMITS, newMessage, tempDir } from '../helpers.js';

test("the mail an outage deferred is made due in steps of ADMIN_STEP, each message once, through ties in its due time; mail deferred before the outage, tried since the walk began, due already, or between two batches keeps its time", async () => {
  const store = await openStore(path.join(tempDir(), 'relayq.db'));
  const { sqlite } = store;
  const now = 1_800_000_000_000;
  const outageSince = now - 60_000;
  const batchDelayMs = 1000;
  try {
    const waiting = ADMIN_STEP * 2 + 7;
    const ids = Array.from({ length: waiting + 4 }, (_, i) => `M${String(i).padStart(19, '0')}`);
    const [dueAlready, duePast, betweenBatches, beforeOutage] = ids.slice(waiting);
    const attempt = sqlite.prepare(
      "INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome, code, reply) VALUES (?, 0, '[]', 'u', ?, 0, 'deferred', 451, 'x')",
    );
    const dueAt = sqlite.prepare('UPDATE messages SET next_attempt_at = ?, claims = 1 WHERE id = ?');
    sqlite.transaction(() => {
      for (const id of ids) {
        WRITE_OPS.insertMessage(sqlite, newMessage({ id, raw: Buffer.from('Subject: x\r\n\r\nx\r\n'), receivedAt: now - 120_000 }), NO_LIMITS);
        attempt.run(id, id === beforeOutage ? outageSince - 1 : outageSince);
      }
      // three retry times for those waiting, so that pages end within a run of equal times
      for (const [i, id] of ids.slice(0, waiting).entries()) dueAt.run(now + 60_000 * (1 + (i % 3)), id);
      dueAt.run(now, dueAlready);
      dueAt.run(now - 5000, duePast);
      // its last batch ended just now: the next waits for batchDelay
      attempt.run(betweenBatches, now);
      dueAt.run(now + batchDelayMs, betweenBatches);
      dueAt.run(now + 3_600_000, beforeOutage);
    })();
    const dueTime = sqlite.prepare('SELECT next_attempt_at FROM messages WHERE id = ?').pluck();
    // tried while the walk goes on: deferred again, to a time a later page meets
    const triedMeanwhile = ids[waiting - 1];

    const steps: string[][] = [];
    const made = await dueAfterOutageInSteps(
      sqlite,
      now,
      outageSince,
      async (step, outage) => {
        steps.push(step);
        if (steps.length === 1) attempt.run(triedMeanwhile, now);
        return sqlite.transaction(() => WRITE_OPS.makeDue(sqlite, step, now, batchDelayMs, outage))();
      },
      () => false,
    );

    // offered: those due after now; made due: the waiting ones but the one tried meanwhile, and
    // the one between two batches (kept at its batchDelay)
    const offered = steps.flat();
    assert.equal(new Set(offered).size, offered.length, 'each message once');
    assert.deepEqual(offered.slice().sort(), [...ids.slice(0, waiting), betweenBatches, beforeOutage].sort());
    assert.deepEqual(
      steps.map((s) => s.length),
      [ADMIN_STEP, ADMIN_STEP, 9],
    );
    assert.equal(made, waiting);
    const dueNow = sqlite.prepare('SELECT id FROM messages WHERE next_attempt_at = ? ORDER BY id').pluck().all(now);
    assert.deepEqual(dueNow, [...ids.slice(0, waiting - 1), dueAlready]);
    assert.ok((dueTime.get(triedMeanwhile) as number) > now, 'tried meanwhile: its early attempt had');
    assert.equal(dueTime.get(duePast), now - 5000);
    assert.equal(dueTime.get(betweenBatches), now + batchDelayMs);
    assert.equal(dueTime.get(beforeOutage), now + 3_600_000, 'deferred by a reachable upstream before the outage');
    assert.equal(sqlite.prepare('SELECT count(*) FROM recipients WHERE next_attempt_at = ?').pluck().get(now), waiting, "their recipients' too");
    // not an operator's request: it ends no suspension by itself
    assert.equal(sqlite.prepare("SELECT count(*) FROM counters WHERE name = 'delivery_requested_at'").pluck().get(), 0);

    // a stop ends the walk between two steps
    let stepsAtStop = 0;
    const afterStop = await dueAfterOutageInSteps(
      sqlite,
      now - 10 * 60_000,
      outageSince,
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
