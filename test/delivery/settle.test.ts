// The stop's bounded waits run on the monotonic clock: a wall clock stepped while relayq stops
// neither cuts them short nor lengthens them.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { settleWithin } from '../../src/delivery/settle.js';
import { withSteppedClock } from '../helpers.js';

test('settleWithin ends after its time even when the wall clock steps back meanwhile', async () => {
  let settled = false;
  const slow = new Promise<void>((resolve) => setTimeout(resolve, 3000)).then(() => {
    settled = true;
  });
  const tasks = new Set([slow]);
  const waiting = settleWithin(tasks, 200);
  // the step comes while the wait is in progress
  await withSteppedClock(-3_600_000, () => waiting);
  assert.equal(settled, false, 'settleWithin waited for the task instead of its 200 ms');
  await slow;
});
