// The stop's bounded waits run on the monotonic clock: a wall clock stepped while relayq stops
// neither cuts them short nor lengthens them.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { settleWithin } from '../../src/delivery/settle.js';
import { withSteppedClock } from '../helpers.js';

/** `work` in `tasks` until it settles, as the engine tracks its attempts. */
function track(tasks: Set<Promise<unknown>>, work: Promise<unknown>): void {
  tasks.add(work);
  void work.finally(() => tasks.delete(work));
}

test('settleWithin ends after its time even when the wall clock steps back meanwhile', async () => {
  let settled = false;
  const slow = new Promise<void>((resolve) => setTimeout(resolve, 3000)).then(() => {
    settled = true;
  });
  // tracked, so that a wait that overran its time ends with the task instead of spinning on it
  const tasks = new Set<Promise<unknown>>();
  track(tasks, slow);
  const waiting = settleWithin(tasks, 200);
  // the step comes while the wait is in progress
  await withSteppedClock(-3_600_000, () => waiting);
  assert.equal(settled, false, 'settleWithin waited for the task instead of its 200 ms');
  await slow;
});

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

test('settleWithin also waits for a task added while it waits', async () => {
  const tasks = new Set<Promise<unknown>>();
  let laterSettled = false;
  // the first task, as it ends, starts another (as a finished attempt lets the next one be claimed)
  track(tasks, sleep(20).then(() => {
    track(tasks, sleep(50).then(() => {
      laterSettled = true;
    }));
  }));
  await settleWithin(tasks, 60_000);
  assert.equal(laterSettled, true, 'settleWithin returned while the task added meanwhile was in flight');
  assert.equal(tasks.size, 0);
});
