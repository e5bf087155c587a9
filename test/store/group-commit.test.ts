// The writer thread's group commit as its callers see it: each write in a shared transaction
// succeeds or fails on its own, a write waits for another process's write lock as long as the
// busy timeout allows, and a write in flight when the thread dies is answered, not left hanging.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { Worker } from 'node:worker_threads';
import type { Relay } from '../../src/main.js';
import { newQueueId, PolicyRefusal } from '../../src/store/intake.js';
import { openConnection } from '../../src/store/db.js';
import { holdWriteLock, messageCount, NO_LIMITS, newMessage, openSession, sendMail, startTestRelay, waitFor } from '../helpers.js';

const INTAKE_ONLY = { startDelivery: false, startRetention: false } as const;

const stored = (relay: Relay, id: string) => ({
  messages: relay.store.sqlite.prepare('SELECT COUNT(*) FROM messages WHERE id = ?').pluck().get(id),
  recipients: relay.store.sqlite.prepare('SELECT COUNT(*) FROM recipients WHERE message_id = ?').pluck().get(id),
});

describe('group commit', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay({}, INTAKE_ONLY);
  });
  after(() => relay.stop());

  test('a message refused by policy inside a shared transaction is refused alone: the others in it are stored', async () => {
    const now = relay.clock.now();
    const policy = { rateLimits: { enabled: true, maxPerHour: 1, maxPerDay: 100, globalMaxPerHour: 100, globalMaxPerDay: 100 }, queueSize: 0 };
    const from = (mailFrom: string) => newMessage({ id: newQueueId(now), mailFrom, raw: Buffer.from(`Subject: ${mailFrom}\r\n\r\nhi\r\n`), receivedAt: now });
    await relay.writer.write('insertMessage', from('limited@example.com'), policy);
    const [over, other, again] = [from('limited@example.com'), from('other@example.com'), from('third@example.com')];
    // sent to the writer together: one transaction, one savepoint each
    const outcomes = await Promise.allSettled([
      relay.writer.write('insertMessage', other, policy),
      relay.writer.write('insertMessage', over, policy),
      relay.writer.write('insertMessage', again, policy),
    ]);
    assert.deepEqual(
      outcomes.map((o) => o.status),
      ['fulfilled', 'rejected', 'fulfilled'],
    );
    assert.ok((outcomes[1] as PromiseRejectedResult).reason instanceof PolicyRefusal);
    assert.deepEqual(stored(relay, other.id), { messages: 1, recipients: 1 });
    assert.deepEqual(stored(relay, over.id), { messages: 0, recipients: 0 });
    assert.deepEqual(stored(relay, again.id), { messages: 1, recipients: 1 });
  });

  test("mail that arrives while another process holds the write lock waits for it, and is stored once it lets go", async () => {
    const before = messageCount(relay);
    // an operator's `relayq retry --failed` or a sqlite3 shell in a transaction; the writer may
    // wait as long as the test needs (the busy timeout)
    const lock = await holdWriteLock(relay, 120_000);
    let sent: Promise<{ response: string }>;
    try {
      let settled = false;
      sent = sendMail(relay.smtpPort, { to: ['waits@example.com'] });
      sent.then(
        () => (settled = true),
        () => (settled = true),
      );
      await waitFor(() => relay.writer.waiting === 1 || settled, 30_000, 'the message sent to the writer');
      // the writer thread is inside its transaction by now, waiting for the lock
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(messageCount(relay), before);
      assert.equal(settled, false, 'no answer before the commit');
    } finally {
      await lock.release();
    }
    const info = await sent;
    assert.match(info.response, /^250 2\.0\.0 Ok: queued as /);
    assert.equal(messageCount(relay), before + 1);
  });
});

test('the writer thread dies while a message is being committed: its session gets 451 4.3.0, not silence', async () => {
  const fatal: Error[] = [];
  const relay = await startTestRelay({}, { ...INTAKE_ONLY, onFatal: (err) => fatal.push(err) });
  try {
    // the write stays in the writer thread, waiting for this lock (up to the busy timeout, 5 s)
    const lock = await holdWriteLock(relay);
    const c = await openSession(relay.smtpPort);
    try {
      assert.match(await c.send('DATA'), /^354 /);
      c.write('Subject: in flight\r\n\r\nbody\r\n.\r\n');
      await waitFor(() => relay.writer.waiting === 1, 30_000, 'the message sent to the writer');
      // what an out-of-memory abort would do; the thread stops once the lock lets its write go on
      const worker = (relay.writer as unknown as { worker: Worker }).worker;
      const terminated = worker.terminate();
      await new Promise((r) => setTimeout(r, 200));
      await lock.release();
      await terminated;
      assert.match(await c.read(30_000), /^451 4\.3\.0 /);
    } finally {
      c.close();
    }
    assert.equal(fatal.length, 1);
    assert.equal(relay.writer.waiting, 0);
  } finally {
    await relay.stop();
  }
});

test('a stop lets the writes already queued commit before it resolves: none is cut off when the process exits', async () => {
  const relay = await startTestRelay({}, INTAKE_ONLY);
  const id = newQueueId(relay.clock.now());
  // the write waits in the writer thread for this lock (up to the busy timeout, 5 s) while the stop begins
  const lock = await holdWriteLock(relay);
  let answered = false;
  const write = relay.writer.write('insertMessage', newMessage({ id, raw: Buffer.from('Subject: s\r\n\r\nhi\r\n'), receivedAt: relay.clock.now() }), NO_LIMITS).then(() => {
    answered = true;
  });
  const released = new Promise<void>((resolve) => setTimeout(() => lock.release().then(resolve), 300));
  await relay.stop();
  assert.equal(answered, true, 'the write was answered before the stop resolved');
  const db = openConnection(relay.config.databasePath);
  try {
    assert.equal(db.prepare('SELECT count(*) FROM messages WHERE id = ?').pluck().get(id), 1);
  } finally {
    db.close();
  }
  await Promise.all([released, write]);
});
