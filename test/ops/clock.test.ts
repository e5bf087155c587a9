// Times in the database are wall-clock times: a start whose clock is well behind the newest of
// them (a clock stepped back while relayq was down) says so, since mail waiting then waits the
// length of the step longer.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import type { Relay } from '../../src/main.js';
import { ManualClock } from '../manual-clock.js';
import { capturedLog, sendMail, startTestRelay, tempDir } from '../helpers.js';

test('a start with the clock more than a minute behind the newest time in the database warns, relay.clock_behind', async () => {
  const dir = tempDir();
  const config = { databasePath: path.join(dir, 'relayq.db'), emailsDir: path.join(dir, 'emails') };
  const received = Date.parse('2026-06-01T12:00:00Z');
  /** The relay's warnings of its clock at a start with the clock at `now`; `run` is done before it stops. */
  const startAt = async (now: number, run?: (relay: Relay, clock: ManualClock) => Promise<void>) => {
    const log = capturedLog('info');
    const clock = new ManualClock(now);
    const relay = await startTestRelay(config, { clock, startDelivery: false, logger: log.logger });
    try {
      await run?.(relay, clock);
    } finally {
      await relay.stop();
    }
    return log.entries().filter((e) => e.event === 'relay.clock_behind').map((e) => [e.level, e.behindSeconds, e.newest]);
  };
  const queue = async (relay: Relay) => {
    await sendMail(relay.smtpPort, { to: ['a@example.com'] });
  };
  assert.deepEqual(await startAt(received, queue), [], 'an empty database');
  assert.deepEqual(await startAt(received + 3_600_000), [], 'a clock ahead');
  assert.deepEqual(await startAt(received - 60_000), [], 'a minute behind: not taken for a step');
  assert.deepEqual(await startAt(received - 86_400_000), [[40, 86_400, '2026-06-01T12:00:00.000Z']]);
  // an attempt an hour after the message arrived (delivered into emailsDir) is the newest time now
  const attempted = received + 3_600_000;
  await startAt(attempted, async (relay) => {
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.equal(relay.store.sqlite.prepare("SELECT COUNT(*) AS n FROM messages WHERE state = 'delivered'").pluck().get(), 1);
  });
  assert.deepEqual(await startAt(attempted - 86_400_000), [[40, 86_400, '2026-06-01T13:00:00.000Z']]);
});
