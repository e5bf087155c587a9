// In-flow pacing (inFlowDelay): while more mail is due than the workers take, MAIL FROM waits
// until delivery has taken some, or at most inFlowDelay; nothing is refused for it. The gate on
// its own, then a relay whose one worker is held by a real upstream that does not answer yet.
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { inFlowBacklogLimit } from '../../src/delivery/engine.js';
import { InFlowGate } from '../../src/delivery/in-flow.js';
import type { Relay } from '../../src/main.js';
import { SmtpClient, startTestRelay, startUpstream, waitFor } from '../helpers.js';

/** The pacing limit of the one-worker relays below. */
const LIMIT = inFlowBacklogLimit(1);

/** Whether a promise settled by now (after pending callbacks ran). */
async function settled(promise: Promise<unknown>): Promise<boolean> {
  let done = false;
  promise.then(() => {
    done = true;
  });
  await new Promise((resolve) => setImmediate(resolve));
  return done;
}

describe('in-flow gate', () => {
  test('admits at once under the limit; over it, waits until delivery takes mail', async () => {
    const gate = new InFlowGate(2, 60_000);
    gate.setEnabled(true);
    assert.equal(gate.admit(), undefined);
    assert.equal(gate.admit(), undefined);
    const third = gate.admit();
    assert.ok(third);
    const fourth = gate.admit();
    assert.ok(fourth);
    assert.equal(await settled(third), false);
    gate.taken(1);
    assert.equal(await settled(third), true);
    // oldest first: the fourth still waits, the backlog is back at the limit
    assert.equal(await settled(fourth), false);
    assert.deepEqual(gate.stats(), { backlog: 2, limit: 2, delayed: 2, timedOut: 0, waiting: 1 });
    // a measurement of the store lets it go too
    gate.measured(0);
    assert.equal(await settled(fourth), true);
    assert.equal(gate.stats().backlog, 1);
  });

  test('a MAIL that waited the whole delay goes ahead anyway', async () => {
    const gate = new InFlowGate(1, 20);
    gate.setEnabled(true);
    gate.admit();
    const waiting = gate.admit();
    assert.ok(waiting);
    await waiting;
    assert.deepEqual(gate.stats(), { backlog: 2, limit: 1, delayed: 1, timedOut: 1, waiting: 0 });
  });

  test('never waits when off (delay 0 or delivery not running), and lets everyone go when turned off', async () => {
    const off = new InFlowGate(1, 0);
    off.setEnabled(true);
    for (let i = 0; i < 5; i++) assert.equal(off.admit(), undefined);
    const stopped = new InFlowGate(1, 60_000);
    for (let i = 0; i < 5; i++) assert.equal(stopped.admit(), undefined);
    stopped.setEnabled(true);
    const waiting = stopped.admit();
    assert.ok(waiting);
    stopped.setEnabled(false);
    assert.equal(await settled(waiting), true);
    assert.equal(stopped.admit(), undefined);
  });
});

describe('in-flow pacing in the relay', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  /**
   * A relay with one worker, forwarding to an upstream that holds every DATA until released, with
   * the first message in the worker's hands and a backlog of exactly the pacing limit behind it.
   */
  async function backlogged(inFlowDelay: number) {
    const held: Array<() => void> = [];
    let holding = true;
    const upstream = await startUpstream({
      onData(stream, _session, cb) {
        stream.resume();
        stream.on('end', () => (holding ? held.push(() => cb()) : cb()));
      },
    });
    const release = () => {
      holding = false;
      for (const answer of held.splice(0)) answer();
    };
    cleanup.push(() => upstream.close());
    cleanup.push(async () => release());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, workerCount: 1, batchDelay: 0, inFlowDelay },
      { deliveryPollMs: 20 },
    );
    cleanup.push(() => relay.stop());
    const client = await SmtpClient.connect(relay.smtpPort);
    cleanup.push(async () => client.close());
    assert.match(await client.read(), /^220/);
    assert.match(await client.send('EHLO client.test'), /^250/);
    for (let i = 0; i <= LIMIT; i++) {
      assert.match(await client.send('MAIL FROM:<sender@example.com>'), /^250/, `MAIL ${i}`);
      assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250/);
      assert.match(await client.send('DATA'), /^354/);
      assert.match(await client.send(`Subject: ${i}\r\n\r\nbody\r\n.`), /^250/);
    }
    await waitFor(() => held.length === 1 && dueCount(relay) === LIMIT, 10_000, 'one message at the upstream, the rest due');
    await waitFor(() => relay.delivery.inFlow.stats().backlog === LIMIT, 10_000, 'the backlog measured');
    return { relay, client, release, held };
  }

  function dueCount(relay: Relay): number {
    return (relay.store.sqlite.prepare(`SELECT count(*) AS n FROM messages WHERE state = 'queued'`).get() as { n: number }).n;
  }

  function state(relay: Relay, states: string): number {
    return (relay.store.sqlite.prepare(`SELECT count(*) AS n FROM messages WHERE state = ?`).get(states) as { n: number }).n;
  }

  test('a MAIL over the backlog waits, and goes ahead when the worker takes the next message', async () => {
    const { relay, client, release } = await backlogged(10_000);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const reply = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    assert.equal(await settled(reply), false);
    release();
    assert.match(await reply, /^250/);
    assert.equal(relay.delivery.inFlow.stats().delayed, 1);
    assert.equal(relay.delivery.inFlow.stats().timedOut, 0, 'let go by delivery, not by the delay');
    assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250/);
    assert.match(await client.send('DATA'), /^354/);
    assert.match(await client.send('Subject: paced\r\n\r\nbody\r\n.'), /^250/);
    await waitFor(() => state(relay, 'delivered') === LIMIT + 2, 30_000, 'everything delivered');
  });

  test('with the upstream stuck, a MAIL waits inFlowDelay and is then accepted: nothing is refused', async () => {
    const { relay, client } = await backlogged(100);
    for (let i = 0; i < 3; i++) {
      assert.match(await client.send('MAIL FROM:<sender@example.com>'), /^250/);
      assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250/);
      assert.match(await client.send('DATA'), /^354/);
      assert.match(await client.send(`Subject: late ${i}\r\n\r\nbody\r\n.`), /^250/);
    }
    assert.deepEqual(
      [relay.delivery.inFlow.stats().delayed, relay.delivery.inFlow.stats().timedOut, dueCount(relay)],
      [3, 3, LIMIT + 3],
    );
  });

  test('inFlowDelay 0: no MAIL waits, however large the backlog', async () => {
    const { relay, client } = await backlogged(0);
    assert.match(await client.send('MAIL FROM:<sender@example.com>'), /^250/);
    assert.equal(relay.delivery.inFlow.stats().delayed, 0);
  });

  test('a MAIL waiting when shutdown begins gets 421', async () => {
    const { relay, client } = await backlogged(10_000);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const reply = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    const stopping = relay.stop();
    assert.match(await reply, /^421 4\.3\.2/);
    await stopping;
  });
});
