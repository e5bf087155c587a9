import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pino from 'pino';
import { ManualClock } from '../manual-clock.js';
import type { Relay } from '../../src/main.js';
import { storeMetrics } from '../../src/store/queries.js';
import { PRUNE_RATE_BUCKETS_SQL, PRUNE_RATE_HOURS_SQL, type RetentionOptions, RetentionSweeper } from '../../src/store/retention.js';
import { capturedLog, insertMessages, sendMail, startTestRelay, startUpstream, tempDir, type Upstream, waitFor, writeDirect } from '../helpers.js';

const MINUTE = 60_000;
const DAY = 86_400_000;

describe('retention with an injected clock', () => {
  let relay: Relay;
  let upstream: Upstream;
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const t0 = clock.now();
  const ids = { old: [] as string[], failed: '', deferred: '', recent: '' };
  const state = (id: string) => (relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').get(id) as { state: string } | undefined)?.state;
  const rowsOf = (table: 'recipients' | 'attempts', id: string) =>
    (relay.store.sqlite.prepare(`SELECT COUNT(*) AS n FROM ${table} WHERE message_id = ?`).get(id) as { n: number }).n;
  const send = async (to: string) => {
    const info = await sendMail(relay.smtpPort, { from: 'app@example.com', to: [to] });
    return /queued as (\S+)/.exec(info.response)?.[1] as string;
  };

  before(async () => {
    upstream = await startUpstream({
      onRcptTo(address, _session, cb) {
        if (address.address.startsWith('bad')) cb(Object.assign(new Error('5.1.1 unknown user'), { responseCode: 550 }));
        else if (address.address.startsWith('slow')) cb(Object.assign(new Error('4.2.1 try later'), { responseCode: 451 }));
        else cb();
      },
    });
    relay = await startTestRelay(
      {
        forwardSMTP: true,
        forwardHost: '127.0.0.1',
        forwardPort: upstream.port,
        batchDelay: 0,
        retention: { deliveredDays: 7 },
        // the deferred message must still be queued a week later
        retry: { maxAttempts: 1000, initialDelay: 60, maxDelay: 3600, maxAge: 31536000 },
        failedRetryInterval: 0,
      },
      { clock, startDelivery: false, startRetention: false },
    );
    // At t0: three delivered, one failed, one deferred (still queued).
    ids.old = [await send('ok1@example.com'), await send('ok2@example.com'), await send('ok3@example.com')];
    ids.failed = await send('bad@example.com');
    ids.deferred = await send('slow@example.com');
    await relay.delivery.runOnce();
    assert.deepEqual(ids.old.map(state), ['delivered', 'delivered', 'delivered']);
    assert.equal(state(ids.failed), 'failed');
    assert.equal(state(ids.deferred), 'queued');
  });

  after(async () => {
    await relay.stop();
    await upstream.close();
  });

  test('keeps everything younger than retention.deliveredDays and prunes day-old rate buckets', async () => {
    clock.set(t0 + 7 * DAY - MINUTE);
    ids.recent = await send('ok4@example.com');
    await relay.delivery.runOnce();
    assert.equal(state(ids.recent), 'delivered');
    const bucketMinutes = () =>
      (relay.store.sqlite.prepare("SELECT minute FROM rate_buckets WHERE sender_key = '*' ORDER BY minute").all() as Array<{ minute: number }>).map(
        (r) => r.minute,
      );
    assert.deepEqual(bucketMinutes(), [Math.floor(t0 / MINUTE), Math.floor((t0 + 7 * DAY - MINUTE) / MINUTE)]);

    const r = await relay.retention.runOnce();
    assert.equal(r.messages, 0);
    assert.equal(state(ids.old[0]), 'delivered');
    // With no message due, the same run prunes what no rate window reaches: t0's per-minute and
    // hourly buckets (the sender's and the global one), not the buckets of the last day.
    assert.equal(r.buckets, 4);
    assert.deepEqual(bucketMinutes(), [Math.floor((t0 + 7 * DAY - MINUTE) / MINUTE)]);
  });

  test('deletes only delivered mail past its age, in batches, with its recipients and attempts', async () => {
    clock.set(t0 + 7 * DAY + MINUTE);
    const before = storeMetrics(relay.store.sqlite);
    const sweeper = new RetentionSweeper({ writer: relay.writer, clock, logger: pino({ level: 'silent' }), deliveredDays: 7, batchSize: 2 });
    assert.deepEqual(await sweeper.runOnce(), { messages: 2, buckets: 0, more: true });
    assert.deepEqual(await sweeper.runOnce(), { messages: 1, buckets: 0, more: false });
    for (const id of ids.old) {
      assert.equal(state(id), undefined, `${id} deleted`);
      assert.equal(rowsOf('recipients', id), 0);
      assert.equal(rowsOf('attempts', id), 0);
    }
    assert.equal(state(ids.recent), 'delivered', 'delivered a minute short of 7 days ago: kept');
    assert.equal(state(ids.failed), 'failed', 'failed mail is kept for the operator');
    assert.equal(state(ids.deferred), 'queued', 'queued mail is never deleted, however old');
    assert.ok(rowsOf('attempts', ids.failed) > 0);

    const afterSweep = storeMetrics(relay.store.sqlite);
    assert.equal(afterSweep.queue.delivered, before.queue.delivered - 3);
    assert.equal(afterSweep.messagesDelivered, before.messagesDelivered, 'lifetime totals survive retention');
    assert.equal(afterSweep.messagesAccepted, before.messagesAccepted);
  });

  test('deliveredDays 0 keeps delivered mail forever, and a sweep over it has nothing more to do', async () => {
    clock.set(t0 + 3650 * DAY);
    const keep = new RetentionSweeper({ writer: relay.writer, clock, logger: pino({ level: 'silent' }), deliveredDays: 0 });
    const swept = await keep.runOnce();
    // with more to do the timer would come back at its busy interval (50 ms), not its idle one
    assert.deepEqual([swept.messages, swept.more], [0, false]);
    assert.equal(state(ids.recent), 'delivered');
  });

  /** A sweeper on the timer: no pause while there is a backlog, a minute otherwise. */
  const timedSweeper = (batch: Pick<RetentionOptions, 'batchSize' | 'batchBytes'>) =>
    new RetentionSweeper({ writer: relay.writer, clock, logger: pino({ level: 'silent' }), deliveredDays: 7, busyIntervalMs: 0, idleIntervalMs: 60_000, ...batch });

  test('the timer works through a backlog batch by batch and stops on stop()', async () => {
    clock.set(t0 + 7 * DAY - MINUTE);
    const more = [await send('ok5@example.com'), await send('ok6@example.com'), await send('ok7@example.com')];
    await relay.delivery.runOnce();
    clock.set(t0 + 30 * DAY);
    const sweeper = timedSweeper({ batchSize: 1 });
    sweeper.start();
    await waitFor(() => sweeper.totals.messages === 4, 10_000, 'the sweeper to delete the 4 delivered messages');
    await sweeper.stop();
    for (const id of [...more, ids.recent]) assert.equal(state(id), undefined);
    assert.equal(state(ids.failed), 'failed');
    assert.equal(state(ids.deferred), 'queued');
  });

  test('a backlog of batches cut short by their bytes is worked through as quickly, not one batch per idle interval', async () => {
    clock.set(t0 + 30 * DAY);
    const big = [];
    for (let i = 0; i < 3; i++) big.push(await send(`ok-big${i}@example.com`));
    await relay.delivery.runOnce();
    clock.set(t0 + 60 * DAY);
    // every batch is its one message
    const sweeper = timedSweeper({ batchSize: 200, batchBytes: 1 });
    sweeper.start();
    await waitFor(() => sweeper.totals.messages === 3, 10_000, 'the sweeper to delete the 3 delivered messages');
    await sweeper.stop();
    for (const id of big) assert.equal(state(id), undefined);
    assert.equal(state(ids.failed), 'failed');
    assert.equal(state(ids.deferred), 'queued');
  });
});

test('a backlog of stale rate buckets alone is worked through at the busy interval, not one batch per idle interval', async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const relay = await startTestRelay({}, { clock, startDelivery: false, startRetention: false });
  try {
    await writeDirect(relay, (db) => {
      const insert = db.prepare('INSERT INTO rate_buckets (sender_key, minute, count) VALUES (?, ?, 1)');
      for (let i = 0; i < 12; i++) insert.run(`s${i}@example.com`, 1000 + i);
    });
    const sweeper = new RetentionSweeper({ writer: relay.writer, clock, logger: pino({ level: 'silent' }), deliveredDays: 7, batchSize: 5, busyIntervalMs: 0, idleIntervalMs: 60_000 });
    sweeper.start();
    try {
      // batches of 5, 5 and 2: the two full ones are each followed by the busy interval
      await waitFor(() => sweeper.totals.buckets === 12, 10_000, 'every stale bucket pruned');
    } finally {
      await sweeper.stop();
    }
  } finally {
    await relay.stop();
  }
});

test("the relay's sweeper deletes delivered mail 200 messages a batch", async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const relay = await startTestRelay({}, { clock, startDelivery: false, startRetention: false });
  try {
    await insertMessages(relay, 201, 'failed');
    await writeDirect(relay, (db) => db.prepare("UPDATE messages SET state = 'delivered', finished_at = 1").run());
    const log = capturedLog('info');
    const sweeper = new RetentionSweeper({ writer: relay.writer, clock, logger: log.logger, deliveredDays: 7 });
    assert.deepEqual(await sweeper.runOnce(), { messages: 200, buckets: 0, more: true });
    // the rest, with the rate buckets the inserts counted in (all from 1970)
    assert.deepEqual(await sweeper.runOnce(), { messages: 1, buckets: 4, more: false });
    // a batch that deleted nothing says nothing
    assert.deepEqual(await sweeper.runOnce(), { messages: 0, buckets: 0, more: false });
    const deleted = log.entries().filter((e) => e.event === 'retention.deleted');
    assert.deepEqual(deleted.map((e) => [e.messages, e.buckets]), [[200, 0], [1, 4]]);
  } finally {
    await relay.stop();
  }
});

test('rate buckets are pruned in the batch that deletes delivered mail, so a steady flow of it does not keep them', async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const t0 = clock.now();
  const relay = await startTestRelay({ retention: { deliveredDays: 7 } }, { clock, startDelivery: false, startRetention: false });
  try {
    await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['a@example.com'] });
    await relay.delivery.runOnce();
    clock.set(t0 + 7 * DAY + MINUTE);
    // the message, and t0's minute and hour buckets of its sender and of all mail ('*')
    assert.deepEqual(await relay.retention.runOnce(), { messages: 1, buckets: 4, more: false });
    const rows = (table: string) => (relay.store.sqlite.prepare(`SELECT COUNT(*) AS n FROM ${table}`).get() as { n: number }).n;
    assert.equal(rows('rate_buckets') + rows('rate_hours'), 0);
  } finally {
    await relay.stop();
  }
});

test('retention counts deliveredDays from the delivery, not the arrival: mail deferred for six days is kept a week after it went', async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const t0 = clock.now();
  let deferring = true;
  const upstream = await startUpstream({
    onRcptTo(_address, _session, cb) {
      if (deferring) cb(Object.assign(new Error('4.2.1 try later'), { responseCode: 451 }));
      else cb();
    },
  });
  const relay = await startTestRelay(
    {
      forwardSMTP: true,
      forwardHost: '127.0.0.1',
      forwardPort: upstream.port,
      batchDelay: 0,
      retention: { deliveredDays: 7 },
      retry: { maxAttempts: 1000, initialDelay: 60, maxDelay: 3600, maxAge: 31536000 },
      failedRetryInterval: 0,
    },
    { clock, startDelivery: false, startRetention: false },
  );
  try {
    const id = /queued as (\S+)/.exec((await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['late@example.com'] })).response)?.[1] as string;
    const row = () => relay.store.sqlite.prepare('SELECT state, received_at, finished_at FROM messages WHERE id = ?').get(id) as
      | { state: string; received_at: number; finished_at: number | null }
      | undefined;
    await relay.delivery.runOnce();
    assert.equal(row()?.state, 'queued', 'deferred');
    deferring = false;
    clock.set(t0 + 6 * DAY);
    await relay.delivery.runOnce();
    assert.deepEqual(row(), { state: 'delivered', received_at: t0, finished_at: t0 + 6 * DAY });

    clock.set(t0 + 7 * DAY + MINUTE);
    assert.equal((await relay.retention.runOnce()).messages, 0, 'arrived over 7 days ago, delivered a day ago: kept');
    assert.equal(row()?.state, 'delivered');
    clock.set(t0 + 13 * DAY + MINUTE);
    assert.equal((await relay.retention.runOnce()).messages, 1);
    assert.equal(row(), undefined);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test("the relay's sweeper keeps delivered mail for the configured deliveredDays, not the default 7; 0 keeps it for good", async () => {
  const upstream = await startUpstream();
  try {
    for (const [days, keptUntil] of [
      [30, 30 * DAY],
      [0, 400 * DAY],
    ]) {
      const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
      const t0 = clock.now();
      const relay = await startTestRelay(
        { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchDelay: 0, retention: { deliveredDays: days } },
        { clock, startDelivery: false, startRetention: false },
      );
      try {
        const id = /queued as (\S+)/.exec((await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['a@example.com'] })).response)?.[1];
        await relay.delivery.runOnce();
        const state = () => (relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').get(id) as { state: string } | undefined)?.state;
        assert.equal(state(), 'delivered');
        clock.set(t0 + 7 * DAY + MINUTE);
        assert.equal((await relay.retention.runOnce()).messages, 0, `deliveredDays ${days}: kept past the default`);
        clock.set(t0 + keptUntil);
        await relay.retention.runOnce();
        assert.equal(state(), 'delivered', `deliveredDays ${days}`);
        clock.set(t0 + keptUntil + MINUTE);
        assert.equal((await relay.retention.runOnce()).messages, days === 0 ? 0 : 1, `deliveredDays ${days}`);
        assert.equal(state(), days === 0 ? 'delivered' : undefined);
      } finally {
        await relay.stop();
      }
    }
  } finally {
    await upstream.close();
  }
});

test('delivered mail goes once it is more than deliveredDays old, not at the instant it is that old, and the oldest goes first', async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const t0 = clock.now();
  const relay = await startTestRelay({ retention: { deliveredDays: 7 } }, { clock, startDelivery: false, startRetention: false });
  try {
    const ids: string[] = [];
    for (const [i, to] of ['first@example.com', 'second@example.com', 'third@example.com'].entries()) {
      clock.set(t0 + i * MINUTE);
      ids.push(/queued as (\S+)/.exec((await sendMail(relay.smtpPort, { from: 'app@example.com', to: [to] })).response)?.[1] as string);
      await relay.delivery.runOnce();
    }
    const state = (id: string) => (relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').get(id) as { state: string } | undefined)?.state;
    assert.deepEqual(ids.map(state), ['delivered', 'delivered', 'delivered']);
    const sweeper = new RetentionSweeper({ writer: relay.writer, clock, logger: pino({ level: 'silent' }), deliveredDays: 7, batchSize: 1 });

    clock.set(t0 + 7 * DAY);
    assert.equal((await sweeper.runOnce()).messages, 0, 'delivered exactly 7 days ago: kept');
    clock.set(t0 + 7 * DAY + 1);
    assert.equal((await sweeper.runOnce()).messages, 1);
    assert.deepEqual(ids.map(state), [undefined, 'delivered', 'delivered']);

    // both others are past their age now; a batch of one takes the one delivered first
    clock.set(t0 + 8 * DAY);
    assert.equal((await sweeper.runOnce()).messages, 1);
    assert.deepEqual(ids.map(state), [undefined, undefined, 'delivered']);
  } finally {
    await relay.stop();
  }
});

test('a sweep removes at most its batch of rows in all: delivered mail first, buckets with what is left', async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const t0 = clock.now();
  const relay = await startTestRelay({ retention: { deliveredDays: 7 } }, { clock, startDelivery: false, startRetention: false });
  try {
    for (const to of ['a@example.com', 'b@example.com']) await sendMail(relay.smtpPort, { from: 'app@example.com', to: [to] });
    await relay.delivery.runOnce();
    clock.set(t0 + 7 * DAY + MINUTE);
    const sweeper = new RetentionSweeper({ writer: relay.writer, clock, logger: pino({ level: 'silent' }), deliveredDays: 7, batchSize: 3 });
    // two messages, then t0's minute and hour buckets of the sender and of all mail: four
    assert.deepEqual(await sweeper.runOnce(), { messages: 2, buckets: 1, more: false });
    assert.deepEqual(await sweeper.runOnce(), { messages: 0, buckets: 3, more: false });
  } finally {
    await relay.stop();
  }
});

test('a per-minute rate bucket is pruned in the minute no rolling day reaches it any more', async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const t0 = clock.now();
  const relay = await startTestRelay({ retention: { deliveredDays: 0 } }, { clock, startDelivery: false, startRetention: false });
  try {
    await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['a@example.com'] });
    const minutes = () => (relay.store.sqlite.prepare('SELECT COUNT(*) AS n FROM rate_buckets').get() as { n: number }).n;
    assert.equal(minutes(), 2, "the sender's bucket and that of all mail");
    // the day window is the last 1,440 minutes, this one included: t0's minute is its first
    clock.set(t0 + 1439 * MINUTE);
    await relay.retention.runOnce();
    assert.equal(minutes(), 2);
    clock.set(t0 + 1440 * MINUTE);
    await relay.retention.runOnce();
    assert.equal(minutes(), 0);
  } finally {
    await relay.stop();
  }
});

test('pruning rate buckets reads the minute and hour indexes, not the whole tables', async () => {
  const { openStore } = await import('../../src/store/db.js');
  const store = await openStore(path.join(tempDir(), 'plan.db'));
  try {
    const plan = store.sqlite.prepare(`EXPLAIN QUERY PLAN ${PRUNE_RATE_BUCKETS_SQL}`).all(1, 10) as Array<{ detail: string }>;
    assert.ok(plan.some((row) => /rate_buckets_minute/.test(row.detail)), JSON.stringify(plan));
    assert.ok(!plan.some((row) => /^SCAN rate_buckets/.test(row.detail)), JSON.stringify(plan));
    const hours = store.sqlite.prepare(`EXPLAIN QUERY PLAN ${PRUNE_RATE_HOURS_SQL}`).all(1, 10) as Array<{ detail: string }>;
    assert.ok(hours.some((row) => /rate_hours_hour/.test(row.detail)), JSON.stringify(hours));
    assert.ok(!hours.some((row) => /^SCAN rate_hours/.test(row.detail)), JSON.stringify(hours));
  } finally {
    await store.close();
  }
});

test('a batch that fails (a full disk, say) is tried again later: retention does not stop until a restart', async () => {
  const clock = new ManualClock(Date.UTC(2026, 2, 1, 12, 0, 0));
  const t0 = clock.now();
  const relay = await startTestRelay({ retention: { deliveredDays: 7 } }, { clock, startDelivery: false, startRetention: false });
  try {
    const ids: string[] = [];
    for (const to of ['a@example.com', 'b@example.com']) {
      ids.push(/queued as (\S+)/.exec((await sendMail(relay.smtpPort, { from: 'app@example.com', to: [to] })).response)?.[1] as string);
    }
    await relay.delivery.runOnce();
    clock.set(t0 + 7 * DAY + MINUTE);
    // the first sweep's write is refused; every later one goes to the writer thread
    const write = relay.writer.write.bind(relay.writer);
    let refused = 0;
    relay.writer.write = ((op, ...args) => {
      if (op === 'retentionSweep' && refused++ === 0) return Promise.reject(new Error('database or disk is full'));
      return write(op, ...args);
    }) as typeof relay.writer.write;
    const log = capturedLog('warn');
    const sweeper = new RetentionSweeper({ writer: relay.writer, clock, logger: log.logger, deliveredDays: 7, busyIntervalMs: 0, idleIntervalMs: 10 });
    sweeper.start();
    try {
      await waitFor(() => sweeper.totals.messages === 2, 10_000, 'the sweeper to delete the 2 delivered messages after its failed batch');
    } finally {
      await sweeper.stop();
    }
    assert.deepEqual(log.entries().filter((e) => e.event === 'retention.failed').map((e) => e.err), ['database or disk is full']);
    for (const id of ids) assert.equal(relay.store.sqlite.prepare('SELECT 1 FROM messages WHERE id = ?').get(id), undefined);
  } finally {
    await relay.stop();
  }
});
