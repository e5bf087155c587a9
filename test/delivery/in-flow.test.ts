// In-flow pacing (inFlowDelay): while more mail is due than the workers take, MAIL FROM waits
// until delivery has taken some, or at most inFlowDelay; nothing is refused for it. The gate on
// its own, then a relay whose one worker is held by a real upstream that does not answer yet.
import assert from 'node:assert/strict';
import { describe, type TestContext, test } from 'node:test';
import { createApp } from '../../src/api/app.js';
import { InFlowGate, inFlowBacklogLimit } from '../../src/delivery/in-flow.js';
import type { Relay } from '../../src/main.js';
import { openConnection } from '../../src/store/db.js';
import type { Logger } from 'pino';
import { capturedLog, openSession, SmtpClient, startTestRelay, startUpstream, waitFor } from '../helpers.js';

/** The pacing limit of the one-worker relays below (no queueSize). */
const LIMIT = inFlowBacklogLimit(1, 0);

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
  test('the limit: 100 due messages per worker, at most 10,000 and at most half of queueSize', () => {
    assert.equal(inFlowBacklogLimit(5, 1000), 500);
    assert.equal(inFlowBacklogLimit(16, 1000), 500);
    assert.equal(inFlowBacklogLimit(16, 0), 1600);
    assert.equal(inFlowBacklogLimit(1000, 0), 10_000);
    assert.equal(inFlowBacklogLimit(1, 1), 1);
    assert.equal(inFlowBacklogLimit(5, 7), 3, 'half of an odd queueSize, rounded down');
  });

  test('claims of more than the estimate counted (mail it did not see: retries come due) leave the backlog at 0, not below', async () => {
    const gate = new InFlowGate(2, 60_000);
    gate.setEnabled(true);
    assert.equal(gate.admit(), undefined);
    gate.taken(5);
    assert.equal(gate.stats().backlog, 0);
    assert.equal(gate.admit(), undefined);
    assert.equal(gate.admit(), undefined);
    const third = gate.admit();
    assert.ok(third, 'the limit still holds: a negative backlog would let more through');
    third.cancel();
  });

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

  test('a cancelled wait gives up its place: it counts nothing, never settles, and the next MAIL is not held behind it', async () => {
    const gate = new InFlowGate(1, 60_000);
    gate.setEnabled(true);
    gate.admit();
    const gone = gate.admit();
    const next = gate.admit();
    assert.ok(gone && next);
    gone.cancel();
    assert.deepEqual(gate.stats(), { backlog: 1, limit: 1, delayed: 2, timedOut: 0, waiting: 1 });
    gate.taken(1);
    assert.equal(await settled(next), true, 'the claim goes to the MAIL still waiting');
    assert.equal(await settled(gone), false);
    assert.deepEqual(gate.stats(), { backlog: 1, limit: 1, delayed: 2, timedOut: 0, waiting: 0 });
    gone.cancel();
    assert.equal(gate.stats().backlog, 1);
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
  /**
   * A relay with one worker (no queueSize, so the pacing limit is LIMIT) forwarding to an upstream
   * that holds every DATA until released, and a client session after EHLO. Everything is closed
   * after the test, the upstream released first.
   */
  async function pacedRelay(t: TestContext, inFlowDelay: number, logger?: Logger, config: Parameters<typeof startTestRelay>[0] = {}) {
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
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, workerCount: 1, batchDelay: 0, queueSize: 0, inFlowDelay, ...config },
      { deliveryPollMs: 20, ...(logger ? { logger } : {}) },
    );
    const client = await SmtpClient.connect(relay.smtpPort);
    t.after(async () => {
      release();
      client.close();
      await relay.stop();
      await upstream.close();
    });
    assert.match(await client.read(), /^220/);
    assert.match(await client.send('EHLO client.test'), /^250/);
    return { relay, client, release, held };
  }

  async function sendOne(client: SmtpClient, subject: string): Promise<void> {
    assert.match(await client.send('MAIL FROM:<sender@example.com>'), /^250/, subject);
    assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250/);
    assert.match(await client.send('DATA'), /^354/);
    assert.match(await client.send(`Subject: ${subject}\r\n\r\nbody\r\n.`), /^250/);
  }

  /** As pacedRelay, with the first message held at the upstream and LIMIT due behind it. */
  async function backlogged(t: TestContext, inFlowDelay: number, logger?: Logger, config: Parameters<typeof startTestRelay>[0] = {}) {
    const paced = await pacedRelay(t, inFlowDelay, logger, config);
    await fillBacklog(paced);
    return paced;
  }

  /** Sends the message the upstream holds and LIMIT more, and waits until the backlog counts them. */
  async function fillBacklog({ relay, client, held }: Awaited<ReturnType<typeof pacedRelay>>): Promise<void> {
    for (let i = 0; i <= LIMIT; i++) await sendOne(client, `message ${i}`);
    await waitFor(() => held.length === 1 && count(relay, 'queued') === LIMIT, 10_000, 'one message at the upstream, the rest due');
    // a poll that ran before the last commit counted one less: wait for one that ran after it
    await waitFor(() => relay.delivery.inFlow.stats().backlog === LIMIT, 10_000, 'the backlog counted');
  }

  function count(relay: Relay, state: string): number {
    return (relay.store.sqlite.prepare('SELECT count(*) AS n FROM messages WHERE state = ?').get(state) as { n: number }).n;
  }

  test('a MAIL over the backlog waits, and goes ahead when the worker takes the next message', async (t) => {
    const { relay, client, release } = await backlogged(t, 10_000);
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
    await waitFor(() => count(relay, 'delivered') === LIMIT + 2, 60_000, 'everything delivered');
  });

  test('a MAIL let go by delivery is counted as paced, not as timed out, in /metrics and its Prometheus form', async (t) => {
    const { relay, client, release } = await backlogged(t, 10_000);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const reply = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    const metrics = async () => ((await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics`)).json()) as { intake_pacing: unknown }).intake_pacing;
    const prometheus = async () => (await createApp({ ...relay, getClientIp: () => '127.0.0.1' }).request('/metrics?format=prometheus')).text();
    assert.deepEqual(await metrics(), { waiting: 1, delayed: 1, timed_out: 0 });
    assert.match(await prometheus(), /^relayq_intake_paced_waiting 1$/m);
    release();
    assert.match(await reply, /^250/);
    assert.deepEqual(await metrics(), { waiting: 0, delayed: 1, timed_out: 0 });
    const text = await prometheus();
    assert.match(text, /^relayq_intake_paced_total 1$/m);
    assert.match(text, /^relayq_intake_paced_timeouts_total 0$/m);
  });

  test('a MAIL let go after its sender reached its limit meanwhile is refused then, before the client sends its message', async (t) => {
    // the backlog is LIMIT + 1 messages from sender@example.com: one more fits its hourly limit
    const { relay, client } = await backlogged(t, 10_000, undefined, { rateLimits: { enabled: true, maxPerHour: LIMIT + 2 } });
    const second = await SmtpClient.connect(relay.smtpPort);
    t.after(() => second.close());
    assert.match(await second.read(), /^220/);
    assert.match(await second.send('EHLO second.test'), /^250/);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const first = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the first MAIL waiting');
    second.write('MAIL FROM:<sender@example.com>\r\n');
    const late = second.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 2, 10_000, 'the second MAIL waiting');
    // delivery takes one message: the first goes ahead, and its message takes the last place
    relay.delivery.inFlow.taken(1);
    assert.match(await first, /^250/);
    assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250/);
    assert.match(await client.send('DATA'), /^354/);
    assert.match(await client.send('Subject: the last one\r\n\r\nbody\r\n.'), /^250/);
    assert.equal(await settled(late), false);
    relay.delivery.inFlow.taken(1);
    assert.match(await late, /^451 4\.7\.1 /);
    assert.equal(count(relay, 'queued'), LIMIT + 1);
  });

  test('a MAIL let go when the database cannot be read is answered 451 4.3.0 and logged; the relay goes on', async (t) => {
    const log = capturedLog('info');
    const { relay, client, release } = await backlogged(t, 10_000, log.logger, { rateLimits: { enabled: true } });
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const reply = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    // another process changes the schema under the relay: its read of the rate limits fails
    const other = openConnection(relay.config.databasePath);
    t.after(() => other.close());
    other.exec('ALTER TABLE rate_hours RENAME TO rate_hours_away');
    relay.delivery.inFlow.taken(1);
    assert.match(await reply, /^451 4\.3\.0 /);
    const failed = log.entries().filter((e) => e.event === 'smtp.store_failed');
    assert.equal(failed.length, 1);
    assert.equal(failed[0].sender, 'sender@example.com');
    assert.match(String(failed[0].err), /rate_hours/);
    other.exec('ALTER TABLE rate_hours_away RENAME TO rate_hours');
    // the next MAIL goes ahead once delivery has caught up (the polls count the due mail again,
    // so lowering the count by hand would not last)
    release();
    await waitFor(() => relay.delivery.inFlow.stats().backlog < LIMIT, 30_000, 'delivery caught up');
    await sendOne(client, 'after');
  });

  test('with the upstream stuck, a MAIL waits inFlowDelay and is then accepted: nothing is refused', async (t) => {
    const { relay, client } = await backlogged(t, 100);
    for (let i = 0; i < 3; i++) await sendOne(client, `late ${i}`);
    const { delayed, timedOut } = relay.delivery.inFlow.stats();
    assert.deepEqual([delayed, timedOut, count(relay, 'queued')], [3, 3, LIMIT + 3]);
    // what an operator sees: /metrics over HTTP, and its Prometheus form through the app
    const metrics = (await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics`)).json()) as { intake_pacing: unknown };
    assert.deepEqual(metrics.intake_pacing, { waiting: 0, delayed: 3, timed_out: 3 });
    const text = await (await createApp({ ...relay, getClientIp: () => '127.0.0.1' }).request('/metrics?format=prometheus')).text();
    assert.match(text, /^relayq_intake_paced_total 3$/m);
    assert.match(text, /^relayq_intake_paced_timeouts_total 3$/m);
    assert.match(text, /^relayq_intake_paced_waiting 0$/m);
  });

  test('intake.paced is logged at most once a minute, and what was counted since is logged at the stop', async (t) => {
    const log = capturedLog('warn');
    const { relay, client, release } = await backlogged(t, 100, log.logger);
    for (let i = 0; i < 3; i++) await sendOne(client, `late ${i}`);
    release();
    client.close();
    await relay.stop();
    const lines = log.entries().filter((e) => e.event === 'intake.paced');
    assert.ok(lines.length <= 2, `${lines.length} lines in well under a minute`);
    assert.deepEqual(
      [lines.reduce((n, e) => n + (e.delayed as number), 0), lines.reduce((n, e) => n + (e.timedOut as number), 0)],
      [3, 3],
      'every paced MAIL is in the log',
    );
  });

  test('intake.paced counts a wait once it has ended, so no line has more timeouts than waits, and the stop logs the last', async (t) => {
    const log = capturedLog('warn');
    const { relay, client } = await backlogged(t, 3000, log.logger);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const reply = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    // polls run while it waits (every 20 ms here); then it waits the whole delay
    await new Promise((r) => setTimeout(r, 300));
    assert.match(await reply, /^250/);
    client.close();
    await relay.stop();
    const lines = log.entries().filter((e) => e.event === 'intake.paced');
    for (const line of lines) assert.ok((line.timedOut as number) <= (line.delayed as number), JSON.stringify(line));
    assert.deepEqual(
      [lines.reduce((n, e) => n + (e.delayed as number), 0), lines.reduce((n, e) => n + (e.timedOut as number), 0)],
      [1, 1],
      JSON.stringify(lines),
    );
  });

  test('a count that ran ahead of the store (MAILs that stored nothing) is corrected by the next poll', async (t) => {
    // no claim comes to lower it: only the poll's count of due mail (none) lets the MAIL go
    const { relay, client } = await pacedRelay(t, 10_000);
    for (let i = 0; i < LIMIT; i++) relay.delivery.inFlow.admit();
    await sendOne(client, 'after the poll');
    assert.equal(relay.delivery.inFlow.stats().timedOut, 0);
  });

  test('inFlowDelay 0: no MAIL waits, however large the backlog', async (t) => {
    const { relay, client } = await backlogged(t, 0);
    await sendOne(client, 'not paced');
    assert.equal(relay.delivery.inFlow.stats().delayed, 0);
  });

  test('a client that drops its connection while its MAIL waits gives up its place at once', async (t) => {
    const { relay, client } = await backlogged(t, 60_000);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    (client.socket as import('node:net').Socket).resetAndDestroy();
    // without the cancel it would keep its place for the whole minute: the upstream holds, so no claim comes
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 0, 10_000, 'the place given up');
    assert.equal(relay.delivery.inFlow.stats().timedOut, 0);
  });

  test('a client that shuts down its side (FIN) right after its waiting MAIL gives up its place at once, and still gets its reply', async (t) => {
    const { relay, client } = await backlogged(t, 60_000);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    const backlog = relay.delivery.inFlow.stats().backlog;
    client.socket.end();
    // without it, it would keep its place, and its connection, for the whole minute (the upstream holds)
    assert.match(await client.read(10_000), /^250/);
    const stats = relay.delivery.inFlow.stats();
    assert.deepEqual([stats.waiting, stats.timedOut, stats.backlog], [0, 0, backlog], 'given up, not let through');
  });

  test('a MAIL whose client had already shut down its side (FIN read while the message before it committed) gives up its place at once', async (t) => {
    const { relay, client } = await backlogged(t, 60_000);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const first = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the first MAIL waiting');
    relay.delivery.inFlow.taken(1);
    assert.match(await first, /^250/);
    assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250/);
    assert.match(await client.send('DATA'), /^354/);
    // one write: the message's end, the next MAIL and the FIN. The FIN is read while the message
    // commits, so by the time the MAIL is looked at (after the 250) its client's side has ended
    client.socket.end('Subject: the last one\r\n\r\nbody\r\n.\r\nMAIL FROM:<sender@example.com>\r\n');
    assert.match(await client.read(10_000), /^250 2\.0\.0 Ok: queued/);
    // without it, it would wait for an end already past, and keep its place for the whole minute
    assert.match(await client.read(10_000), /^250/, 'the MAIL answered at once');
    const stats = relay.delivery.inFlow.stats();
    assert.deepEqual([stats.waiting, stats.timedOut], [0, 0], 'given up, not let through by the delay');
  });

  test('a client that half-closes after its whole transaction keeps its place, and gets its 250 once its MAIL goes ahead', async (t) => {
    const { relay, client, release } = await backlogged(t, 60_000);
    client.socket.end('MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.com>\r\nDATA\r\nSubject: paced, half-closed\r\n\r\nbody\r\n.\r\nQUIT\r\n');
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    release();
    const replies = [await client.read(30_000), await client.read(), await client.read(), await client.read(), await client.read()];
    assert.deepEqual(
      replies.map((r) => r.slice(0, 3)),
      ['250', '250', '354', '250', '221'],
    );
    assert.equal(relay.delivery.inFlow.stats().timedOut, 0, 'let go by delivery, not by the delay');
    await waitFor(() => count(relay, 'delivered') === LIMIT + 2, 60_000, 'everything delivered');
  });

  test('a MAIL waiting when shutdown begins gets 421, and the stop lets it go', async (t) => {
    const { relay, client } = await backlogged(t, 10_000);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const reply = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    const stopping = relay.stop();
    assert.match(await reply, /^421 4\.3\.2/);
    await stopping;
    const { waiting, timedOut } = relay.delivery.inFlow.stats();
    assert.deepEqual([waiting, timedOut], [0, 0]);
  });

  test('a MAIL let go while the shutdown waits for a message in DATA gets 421 too, not 250', async (t) => {
    const paced = await pacedRelay(t, 60_000);
    const { relay, client } = paced;
    // another session, in DATA before the backlog: the shutdown gives it its grace period
    const inData = await openSession(relay.smtpPort);
    t.after(() => inData.close());
    assert.match(await inData.send('DATA'), /^354/);
    inData.write('Subject: in DATA at the stop\r\n\r\nbody');
    await fillBacklog(paced);
    client.write('MAIL FROM:<sender@example.com>\r\n');
    const reply = client.read(30_000);
    await waitFor(() => relay.delivery.inFlow.stats().waiting === 1, 10_000, 'the MAIL waiting');
    // the stop lets the MAIL go at once, while the other session still holds the shutdown
    const stopping = relay.stop();
    assert.equal(await reply, '421 4.3.2 Service shutting down, try again later');
    assert.match(await inData.send('\r\n.'), /^250 2\.0\.0 Ok: queued as/);
    await stopping;
  });
});
