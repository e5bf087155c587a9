// The short crash loop of `npm test` (the long one is `npm run soak`): a few SIGKILLs under
// continuous load, then nothing acknowledged may be missing and nothing may be stuck.
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import { runCrashLoop, summaryLine } from './crash-loop.js';

async function shortCrashLoop(t: TestContext, spoolAfter?: number) {
  const seed = Math.floor(Math.random() * 2 ** 31);
  const result = await runCrashLoop({
    kills: 3,
    clients: 4,
    uptimeMs: [300, 900],
    processingTimeoutS: 5,
    drainTimeoutMs: 30_000,
    seed,
    spoolAfter,
  });
  t.diagnostic(summaryLine(result));
  assert.equal(result.kills, 3);
  assert.ok(result.acknowledged > 0, 'the clients got messages through');
  assert.deepEqual(result.notStored, [], 'acknowledged but not in the database');
  assert.deepEqual(result.missing, [], 'acknowledged but never delivered');
  assert.equal(result.stuckSending, 0);
  assert.equal(result.undelivered, 0);
  assert.equal(result.finalExitCode, 0);
  assert.equal(result.spoolFilesLeft, 0);
}

describe('crash loop', () => {
  test('3 SIGKILLs under load from 4 clients: every 250 delivered, none stuck in sending, orderly final stop', (t) => shortCrashLoop(t));

  test('the same with every message spooled to a file while it arrives (spoolAfter 4096, 16 KB bodies)', (t) => shortCrashLoop(t, 4096));
});
