import assert from 'node:assert/strict';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import pino from 'pino';
import { ManualClock } from '../manual-clock.js';
import { FailedRetry } from '../../src/delivery/failed-retry.js';
import { classifyUpstreamError } from '../../src/delivery/outcomes.js';
import { backoffDelayMs, describeGiveUp, giveUpReason } from '../../src/delivery/retry-policy.js';
import type { Relay } from '../../src/main.js';
import { openConnection, openStore } from '../../src/store/db.js';
import { FAILED_SCAN_SQL, findTemporaryFailures, requeueTemporaryFailures } from '../../src/store/delivery.js';
import { call } from '../api/fixtures.js';
import { capturedLog, holdWriteLock, sendMail, startTestRelay, tempDir, waitFor, writeDirect } from '../helpers.js';
import { attempts, failedExportExists, message, NO_JITTER, queuedId, readFailedExport, recipients, startScriptedUpstream } from './fixtures.js';

describe('retry policy', () => {
  test('backoff doubles from initialDelay, ±10 % jitter, capped at maxDelay', () => {
    const retry = { initialDelay: 60, maxDelay: 3600 };
    assert.deepEqual(
      [1, 2, 3, 4, 5, 6, 7, 8, 30, 2000].map((n) => backoffDelayMs(n, retry, NO_JITTER)),
      [60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000, 3_600_000, 3_600_000, 3_600_000],
    );
    assert.equal(backoffDelayMs(1, retry, () => 0), 54_000, '-10 %');
    assert.equal(backoffDelayMs(1, retry, () => 0.999999), 66_000, '+10 %');
    assert.equal(backoffDelayMs(3, retry, () => 0.25), 228_000);
    // at the cap, jitter only goes down: never beyond maxDelay
    assert.equal(backoffDelayMs(10, retry, () => 0.999999), 3_600_000);
    assert.equal(backoffDelayMs(10, retry, () => 0), 3_240_000);
    for (let i = 0; i < 200; i++) {
      const n = 1 + (i % 12);
      const d = backoffDelayMs(n, retry, Math.random);
      const base = Math.min(3600, 60 * 2 ** (n - 1)) * 1000;
      assert.ok(d >= base * 0.9 && d <= Math.min(base * 1.1, 3_600_000), `attempt ${n}: ${d}`);
    }
  });

  test('gives up after maxAttempts or maxAge', () => {
    const retry = { maxAttempts: 3, maxAge: 3600 };
    assert.equal(giveUpReason(2, 0, 1000, retry), undefined);
    assert.equal(giveUpReason(3, 0, 1000, retry), 'max-attempts');
    assert.equal(giveUpReason(1, 0, 3_599_999, retry), undefined);
    assert.equal(giveUpReason(1, 0, 3_600_000, retry), 'max-age');
  });

  test('classifyUpstreamError: 5xx to the message is permanent; 4xx, network, TLS, timeouts and AUTH are temporary', () => {
    const cases: Array<[unknown, boolean, number | null]> = [
      [{ code: 'EENVELOPE', responseCode: 550, response: '550 5.1.1 No such user' }, false, 550],
      [{ code: 'EMESSAGE', responseCode: 554, response: '554 5.7.1 Spam' }, false, 554],
      [{ code: 'EENVELOPE', responseCode: 450, response: '450 4.2.1 Busy' }, true, 450],
      [{ code: 'EMESSAGE', responseCode: 451, response: '451 4.3.0 Local error' }, true, 451],
      [{ code: 'EMESSAGE', responseCode: 500, response: '500 5.5.2 Syntax error' }, false, 500],
      [{ code: 'EENVELOPE', responseCode: 503, response: '503 5.5.1 Bad sequence' }, true, 503],
      [{ code: 'EENVELOPE', responseCode: 530, response: '530 5.7.0 Authentication required' }, true, 530],
      [{ code: 'ECONNECTION', message: 'connect ECONNREFUSED 127.0.0.1:1' }, true, null],
      [{ code: 'ETIMEDOUT', message: 'Greeting never received' }, true, null],
      [{ code: 'ESOCKET', message: 'read ECONNRESET' }, true, null],
      [{ code: 'ETLS', message: 'self-signed certificate' }, true, null],
      [{ code: 'EDNS', message: 'getaddrinfo ENOTFOUND smtp.invalid' }, true, null],
      [{ code: 'EAUTH', responseCode: 535, response: '535 5.7.8 Authentication failed' }, true, 535],
      [{ code: 'EAUTH', responseCode: 454, response: '454 4.7.0 Temporary authentication failure' }, true, 454],
      [{ code: 'ECONNECTION', responseCode: 554, response: '554 No SMTP service here' }, true, 554],
      [{ code: 'EMESSAGE', message: 'Message size larger than allowed 1000' }, false, null],
      [new Error('something unexpected'), true, null],
    ];
    for (const [err, temporary, code] of cases) {
      const c = classifyUpstreamError(err);
      assert.equal(c.temporary, temporary, JSON.stringify(err));
      assert.equal(c.code, code, JSON.stringify(err));
      assert.ok(c.reply.length > 0);
    }
    assert.equal(classifyUpstreamError({ code: 'EENVELOPE', responseCode: 550, response: '550 5.1.1 No such user' }).reply, '550 5.1.1 No such user');
    // OpenSSL's messages end with a line end (forwardSSL=true against a plain upstream)
    const tls = classifyUpstreamError({ code: 'ESOCKET', message: '80ACCBCB7F7F0000:error:0A00010B:SSL routines:ssl3_get_record:wrong version number:ssl3_record.c:350:\n' });
    assert.equal(tls.reply, 'ESOCKET: 80ACCBCB7F7F0000:error:0A00010B:SSL routines:ssl3_get_record:wrong version number:ssl3_record.c:350:');
  });
});

describe('retries against a real upstream, with an injected clock', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function setup(overrides: Parameters<typeof startTestRelay>[0], random = NO_JITTER) {
    const clock = new ManualClock();
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, ...overrides },
      { clock, startDelivery: false, random },
    );
    cleanup.push(() => relay.stop());
    return { clock, relay, upstream };
  }

  /** failedRetryInterval's scans of `relay`'s failed mail, run by the test itself. */
  function failedRetryOf(relay: Relay, clock: ManualClock, logger = pino({ level: 'silent' })): FailedRetry {
    return new FailedRetry({ config: relay.config, sqlite: relay.store.sqlite, writer: relay.writer, clock, logger, pacingLimit: 100, requeued: () => {} });
  }

  /** A relay delivering as it would run (polling every 20 ms) to an upstream that is down, its log kept. */
  async function runningAgainstDownUpstream(overrides: Parameters<typeof startTestRelay>[0]) {
    const clock = new ManualClock();
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    await upstream.goDown();
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, ...overrides },
      { clock, deliveryPollMs: 20, logger: log.logger, startRetention: false },
    );
    cleanup.push(() => relay.stop());
    return { clock, relay, log };
  }

  /**
   * While a failure's commit waits for `lock`, the clock moves on and the scans of
   * failedRetryInterval (once a second) pass its time; then it is committed, finished at
   * `finishedAt`, and the clock moves past the interval.
   */
  async function passScansThenCommit(clock: ManualClock, relay: Relay, id: string, lock: { release(): Promise<void> }, finishedAt: number) {
    clock.advance(60_000);
    await new Promise((resolve) => setTimeout(resolve, 2500));
    await lock.release();
    await waitFor(() => message(relay, id).state === 'failed', 10_000, 'the failure is committed');
    assert.equal(message(relay, id).finished_at, finishedAt, 'finished when it failed, not when committed');
    clock.advance(11_000);
  }

  async function queue(relay: Relay, to = ['a@example.com', 'b@example.com']): Promise<string> {
    return queuedId((await sendMail(relay.smtpPort, { to, raw: 'Subject: retry\r\n\r\nbody\r\n' })).response);
  }

  /** Moves the clock to the message's next attempt and runs it. */
  async function runWhenDue(clock: ManualClock, relay: Relay, id: string): Promise<void> {
    clock.set(Math.max(clock.now(), message(relay, id).next_attempt_at));
    await relay.delivery.runOnce();
  }

  test('upstream down → deferred with growing delays; back up → delivered, without re-sending anything', async () => {
    const { clock, relay, upstream } = await setup({ retry: { initialDelay: 10, maxDelay: 100, maxAttempts: 10 } });
    await upstream.goDown();
    const id = await queue(relay);
    const delays: number[] = [];
    for (let i = 0; i < 6; i++) {
      await runWhenDue(clock, relay, id);
      const m = message(relay, id);
      assert.equal(m.state, 'queued');
      delays.push(m.next_attempt_at - clock.now());
    }
    assert.deepEqual(delays, [10_000, 20_000, 40_000, 80_000, 100_000, 100_000]);
    const rows = recipients(relay, id);
    assert.ok(rows.every((r) => r.status === 'pending' && r.attempts === 6 && r.temporary === 1));
    assert.match(rows[0].last_reply!, /ECONNECTION|ECONNREFUSED/);
    assert.match(message(relay, id).last_error!, /deferred/);
    assert.deepEqual(new Set(attempts(relay, id).map((a) => a.outcome)), new Set(['deferred']));
    const status = relay.delivery.status();
    assert.equal(status.consecutiveFailures, 6);
    assert.equal(status.lastSuccessAt, null);
    assert.ok(status.lastFailureAt !== null);

    clock.advance(99_999);
    assert.equal((await relay.delivery.runOnce()).attempts, 0, 'not before the backoff');
    await upstream.comeBack();
    await runWhenDue(clock, relay, id);
    assert.equal(message(relay, id).state, 'delivered');
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com', 'b@example.com']]);
    assert.equal(relay.delivery.status().consecutiveFailures, 0);
    assert.equal(attempts(relay, id).length, 7);
  });

  test('the recipients of a deferred batch share one jittered retry time and go out together again', async () => {
    // a different draw at every call: per-recipient jitter would split the batch apart
    const draws = [0.05, 0.95, 0.3, 0.7, 0.15, 0.85, 0.45, 0.6];
    let calls = 0;
    const random = () => draws[calls++ % draws.length];
    const { clock, relay, upstream } = await setup({ batchSize: 3, retry: { initialDelay: 100, maxDelay: 1000, maxAttempts: 10 } }, random);
    await upstream.goDown();
    const to = ['a@example.com', 'b@example.com', 'c@example.com'];
    const id = await queue(relay, to);
    const delays: number[] = [];
    for (let i = 0; i < 3; i++) {
      await runWhenDue(clock, relay, id);
      const due = new Set(recipients(relay, id).map((r) => r.next_attempt_at));
      assert.equal(due.size, 1, `after attempt ${i + 1} every recipient of the batch is due at the same time`);
      delays.push([...due][0] - clock.now());
    }
    assert.ok(calls > 0, 'the jitter source was used');
    delays.forEach((d, i) => {
      const base = 100_000 * 2 ** i;
      assert.ok(d >= base * 0.9 && d <= base * 1.1 && d !== base, `attempt ${i + 1}: ${d} ms is ${base} ms ± 10 %, jittered`);
    });

    await upstream.comeBack();
    await runWhenDue(clock, relay, id);
    assert.equal(message(relay, id).state, 'delivered');
    assert.deepEqual(
      upstream.accepted.map((t) => t.to),
      [to],
      'one transaction with all three recipients',
    );
  });

  test('after retry.maxAttempts temporary failures the recipients fail and the message is exported', async () => {
    const { clock, relay, upstream } = await setup({ retry: { initialDelay: 1, maxDelay: 10, maxAttempts: 3 }, failedRetryInterval: 0 });
    upstream.rcptReply = () => ({ code: 451, message: '4.7.1 Greylisted, try again' });
    const id = await queue(relay);
    for (let i = 0; i < 3; i++) await runWhenDue(clock, relay, id);
    const m = message(relay, id);
    assert.equal(m.state, 'failed');
    const rows = recipients(relay, id);
    assert.ok(rows.every((r) => r.status === 'failed' && r.attempts === 3 && r.temporary === 1 && r.last_code === 451));
    assert.match(rows[0].last_reply!, /gave up after 3 attempts/);
    assert.match(m.last_error!, /retry\.maxAttempts=3/);
    const doc = readFailedExport(relay, id);
    assert.deepEqual(doc.recipients.map((r) => [r.status, r.attempts, r.lastCode, r.temporary]), [
      ['failed', 3, 451, true],
      ['failed', 3, 451, true],
    ]);
    clock.advance(86_400_000);
    assert.equal((await relay.delivery.runOnce()).attempts, 0, 'no more attempts (failedRetryInterval off)');
    assert.equal(upstream.rcpts.length, 6);
  });

  test('after retry.maxAge a temporary failure fails the message', async () => {
    const { clock, relay, upstream } = await setup({ retry: { initialDelay: 10, maxDelay: 100, maxAttempts: 100, maxAge: 60 } });
    await upstream.goDown();
    const id = await queue(relay, ['a@example.com']);
    await runWhenDue(clock, relay, id);
    assert.equal(message(relay, id).state, 'queued');
    clock.advance(59_000);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'queued', 'younger than maxAge: still retried');
    clock.advance(1000);
    await runWhenDue(clock, relay, id);
    assert.equal(message(relay, id).state, 'failed');
    const [r] = recipients(relay, id);
    assert.equal(r.attempts, 3);
    assert.match(r.last_reply!, /older than retry\.maxAge \(60 s\)/);
    assert.ok(failedExportExists(relay, id));
  });

  test('failedRetryInterval re-attempts mail that failed temporarily (once per interval), never permanent failures', async () => {
    const { clock, relay, upstream } = await setup({
      retry: { initialDelay: 1, maxDelay: 1, maxAttempts: 2 },
      failedRetryInterval: 300,
    });
    await upstream.goDown();
    const temporary = await queue(relay, ['t@example.com']);
    await runWhenDue(clock, relay, temporary);
    await runWhenDue(clock, relay, temporary);
    assert.equal(message(relay, temporary).state, 'failed');
    await upstream.comeBack();
    // past the suspension that the unreachable upstream began (90 % of initialDelay)
    clock.advance(900);
    upstream.rcptReply = (a) => (a === 'p@example.com' ? { code: 550, message: '5.1.1 Unknown user' } : undefined);
    const permanent = await queue(relay, ['p@example.com']);
    await relay.delivery.runOnce();
    assert.equal(message(relay, permanent).state, 'failed');
    await upstream.goDown();

    const failedAt = message(relay, temporary).finished_at!;
    clock.set(failedAt + 299_999);
    assert.equal((await relay.delivery.runOnce()).requeued, 0, 'not before the interval');
    clock.set(failedAt + 300_000);
    let report = await relay.delivery.runOnce();
    assert.equal(report.requeued, 1);
    assert.equal(report.attempts, 1, 'one re-attempt');
    assert.equal(message(relay, temporary).state, 'failed', 'one more temporary failure fails it again');
    assert.equal(recipients(relay, temporary)[0].attempts, 2);

    await upstream.comeBack();
    clock.advance(300_000);
    report = await relay.delivery.runOnce();
    assert.equal(report.requeued, 1);
    assert.equal(message(relay, temporary).state, 'delivered');
    assert.equal(failedExportExists(relay, temporary), false, 'the stale failed export is removed');
    assert.equal(message(relay, permanent).state, 'failed', 'a 5xx failure is never requeued');
    assert.deepEqual(
      upstream.rcpts.filter((a) => a === 'p@example.com'),
      ['p@example.com'],
    );
  });

  test('failedRetryInterval re-attempts only the temporarily failed recipients of a message; one refused with 550 stays failed, one delivered is not sent again', async () => {
    const { clock, relay, upstream } = await setup({ retry: { initialDelay: 1, maxDelay: 1, maxAttempts: 2 }, failedRetryInterval: 300 });
    let deferring = true;
    upstream.rcptReply = (a) =>
      a === 'p@example.com'
        ? { code: 550, message: '5.1.1 Unknown user' }
        : a === 't@example.com' && deferring
          ? { code: 451, message: '4.7.1 Try again later' }
          : undefined;
    const id = await queue(relay, ['p@example.com', 't@example.com', 'd@example.com']);
    await runWhenDue(clock, relay, id);
    await runWhenDue(clock, relay, id);
    assert.equal(message(relay, id).state, 'failed');
    const failed = recipients(relay, id).map((r) => [r.address, r.status, r.temporary, r.last_code]);
    assert.deepEqual(failed, [
      ['p@example.com', 'failed', 0, 550],
      ['t@example.com', 'failed', 1, 451],
      ['d@example.com', 'delivered', 0, 250],
    ]);

    deferring = false;
    clock.set(message(relay, id).finished_at! + 300_000);
    const report = await relay.delivery.runOnce();
    assert.equal(report.requeued, 1);
    const [p, t, d] = recipients(relay, id);
    assert.deepEqual([p.status, p.temporary, p.last_code, p.attempts], ['failed', 0, 550, 1], 'the 550 is kept, not re-attempted');
    assert.deepEqual([d.status, d.attempts], ['delivered', 1]);
    assert.match(p.last_reply!, /Unknown user/);
    assert.equal(t.status, 'delivered');
    assert.deepEqual(upstream.accepted.map((tr) => tr.to), [['d@example.com'], ['t@example.com']]);
    assert.deepEqual(
      upstream.rcpts.filter((a) => a === 'p@example.com' || a === 'd@example.com'),
      ['p@example.com', 'd@example.com'],
      'the upstream saw the refused RCPT and the delivered one once',
    );
  });

  test("continueOnError=false, then failedRetryInterval: a message failed again names the recipient the upstream refused, not one of a later batch failed 'not attempted'", async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 0, continueOnError: false, retry: { maxAttempts: 1 }, failedRetryInterval: 300 });
    // batch 0 = t, p; batch 1 = x. t is deferred at RCPT (and gives up: maxAttempts 1), p's DATA is refused
    let refusing = true;
    upstream.rcptReply = (a) => (a === 't@example.com' && refusing ? { code: 451, message: '4.7.1 Try again later' } : undefined);
    upstream.dataReply = () => (refusing ? { code: 554, message: '5.7.1 Policy rejection' } : undefined);
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['t@example.com', 'p@example.com', 'x@example.com'], raw: 'Subject: probe\r\n\r\nbody\r\n' })).response);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'failed');
    assert.deepEqual(
      recipients(relay, id).map((r) => [r.address, r.status, r.temporary]),
      [['t@example.com', 'failed', 1], ['p@example.com', 'failed', 0], ['x@example.com', 'failed', 0]],
    );
    assert.match(recipients(relay, id)[2].last_reply!, /^not attempted: /);
    // failedRetryInterval puts t back, and it is delivered: the message fails again, for p's refusal
    refusing = false;
    clock.set(message(relay, id).finished_at! + 300_000);
    assert.equal((await relay.delivery.runOnce()).requeued, 1);
    assert.equal(recipients(relay, id)[0].status, 'delivered');
    assert.equal(message(relay, id).state, 'failed');
    assert.equal(message(relay, id).last_error, 'p@example.com: 554 5.7.1 Policy rejection');
  });

  test('failedRetryInterval still requeues mail that failed after the clock was stepped back', async () => {
    const { clock, relay } = await runningAgainstDownUpstream({ retry: { maxAttempts: 1 }, failedRetryInterval: 10 });
    const claims = (id: string) => message(relay, id).claims;
    const failed = (id: string) => message(relay, id).state === 'failed';
    const first = await queue(relay, ['a@example.com']);
    await waitFor(() => failed(first), 10_000, 'the first failure');
    clock.advance(10_000);
    await waitFor(() => claims(first) === 2 && failed(first), 10_000, 'the first requeue, and its failure');
    clock.advance(-3_600_000);
    const second = await queue(relay, ['b@example.com']);
    await waitFor(() => failed(second), 10_000, 'a failure after the step back');
    clock.advance(10_000);
    await waitFor(() => claims(second) === 2, 10_000, 'its requeue, an interval later');
  });

  test('failedRetryInterval puts failed mail back only into spare room, oldest first, and the next scans take the rest', async () => {
    // queueSize 8: pacing starts at 4 due messages, so at most 2 go back at a time
    const { clock, relay, log } = await runningAgainstDownUpstream({ queueSize: 8, retry: { maxAttempts: 1 }, failedRetryInterval: 10 });
    const ids: string[] = [];
    for (const to of ['a', 'b', 'c', 'd']) {
      ids.push(await queue(relay, [`${to}@example.com`]));
      clock.advance(1);
    }
    await waitFor(() => ids.every((id) => message(relay, id).state === 'failed'), 10_000, 'all four failed');
    clock.advance(10_000);
    const requeued = () => log.entries().filter((e) => e.event === 'delivery.requeued').map((e) => e.ids as string[]);
    await waitFor(() => ids.every((id) => message(relay, id).claims === 2 && message(relay, id).state === 'failed'), 10_000, 'each requeued once and failed again');
    assert.deepEqual(requeued(), [ids.slice(0, 2), ids.slice(2)]);
  });

  test('the room failedRetryInterval fills: under half of the due backlog that starts pacing, and under half of queueSize', async () => {
    const { clock, relay, upstream } = await setup({ queueSize: 8, retry: { maxAttempts: 1 }, failedRetryInterval: 10 });
    await upstream.goDown();
    const failed: string[] = [];
    for (let i = 0; i < 4; i++) {
      failed.push(await queue(relay, [`f${i}@example.com`]));
      await relay.delivery.runOnce();
      clock.advance(1); // each failed a millisecond after the one before
    }
    clock.advance(10_000);
    // pacing starts at 4 due messages (half of queueSize 8): 2 go back
    assert.equal((await relay.delivery.runOnce()).requeued, 2);
    assert.deepEqual(failed.map((id) => message(relay, id).claims), [2, 2, 1, 1]);
    clock.advance(10_000);
    // 3 messages waiting for a retry tomorrow are not due, but count against queueSize: 4 - 3 = 1
    const waiting: string[] = [];
    for (let i = 0; i < 3; i++) waiting.push(await queue(relay, [`w${i}@example.com`]));
    await writeDirect(relay, (db) => db.prepare(`UPDATE messages SET next_attempt_at = ? WHERE id IN (${waiting.map(() => '?').join()})`).run(clock.now() + 86_400_000, ...waiting));
    assert.equal((await relay.delivery.runOnce()).requeued, 1);
    assert.deepEqual(failed.map((id) => message(relay, id).claims), [2, 2, 2, 1], 'the oldest first');
    clock.advance(10_000);
    // 6 waiting, more than half of queueSize: no room, and nothing goes back
    for (let i = 3; i < 6; i++) waiting.push(await queue(relay, [`w${i}@example.com`]));
    await writeDirect(relay, (db) => db.prepare(`UPDATE messages SET next_attempt_at = ? WHERE id IN (${waiting.map(() => '?').join()})`).run(clock.now() + 86_400_000, ...waiting));
    assert.equal((await relay.delivery.runOnce()).requeued, 0);
    assert.deepEqual(failed.map((id) => message(relay, id).claims), [2, 2, 2, 1]);
  });

  test('failedRetryInterval comes back for a failure committed late while a scan runs, finished before the point that scan passes', async () => {
    const { clock, relay, upstream } = await setup({ retry: { maxAttempts: 1 }, failedRetryInterval: 10 });
    await upstream.goDown();
    const early = await queue(relay, ['early@example.com']);
    await relay.delivery.runOnce();
    assert.equal(message(relay, early).state, 'failed');
    const late = await queue(relay, ['late@example.com']);
    const failedAt = clock.now();
    clock.advance(20_000);
    const scans = failedRetryOf(relay, clock);
    // another process holds the write lock: the scan read the early failure and waits to requeue it
    const holder = openConnection(relay.config.databasePath);
    holder.exec('BEGIN IMMEDIATE');
    const first = scans.scan(false);
    await waitFor(() => relay.writer.waitingFor('requeueTemporaryFailures') > 0, 10_000, 'the requeue to wait for the lock');
    // meanwhile the late message's failure, finished long before the scan's point, commits
    holder.prepare("UPDATE messages SET state = 'failed', finished_at = ? WHERE id = ?").run(failedAt, late);
    holder.prepare("UPDATE recipients SET status = 'failed', temporary = 1 WHERE message_id = ?").run(late);
    scans.failedAt(failedAt);
    holder.exec('COMMIT');
    holder.close();
    assert.equal(await first, 1);
    assert.equal(message(relay, early).state, 'queued');
    // the next scan, a moment later, comes back for it
    clock.advance(1);
    assert.equal(await scans.scan(false), 1);
    assert.equal(message(relay, late).state, 'queued');
  });

  test('failedRetryInterval still requeues mail that its claim gave up on and committed late (the write lock held meanwhile)', async () => {
    const { clock, relay, log } = await runningAgainstDownUpstream({ retry: { maxAttempts: 3, initialDelay: 600 }, failedRetryInterval: 10 });
    const id = await queue(relay, ['a@example.com']);
    await waitFor(() => message(relay, id).claims === 1 && message(relay, id).lease_token === null, 10_000, 'the first attempt deferred');
    // its attempts used up (as after retry.maxAttempts was lowered): the next claim gives it up
    await writeDirect(relay, (db) => db.prepare('UPDATE recipients SET attempts = 3 WHERE message_id = ?').run(id));
    const lock = await holdWriteLock(relay);
    const claimedAt = message(relay, id).next_attempt_at;
    clock.set(claimedAt);
    // the claim (now = claimedAt) waits for the lock, and meanwhile the scans pass claimedAt; the
    // clock moves on only once it is sent (nothing was due before: it is the claim of this message)
    await waitFor(() => relay.writer.waitingFor('claimDueBatches') > 0, 10_000, 'the claim to wait for the lock');
    await passScansThenCommit(clock, relay, id, lock, claimedAt);
    await waitFor(() => log.entries().some((e) => e.event === 'delivery.requeued'), 10_000, 'the requeue of the failure committed late');
  });

  test('failedRetryInterval still requeues mail whose failure was committed late (the write lock held meanwhile)', async () => {
    const clock = new ManualClock();
    let answer: () => void = () => {};
    const answered = new Promise<void>((resolve) => {
      answer = resolve;
    });
    let asked = false;
    const upstream = await startScriptedUpstream({
      // the first RCPT is answered 451 when the test says so; later ones at once
      onRcptTo(_address, _session, cb) {
        asked = true;
        answered.then(() => cb(Object.assign(new Error('try later'), { responseCode: 451 })));
      },
    });
    cleanup.push(() => upstream.close());
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, retry: { maxAttempts: 1 }, failedRetryInterval: 10 },
      { clock, deliveryPollMs: 20, logger: log.logger, startRetention: false },
    );
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['a@example.com']);
    await waitFor(() => asked, 10_000, 'the attempt reaches RCPT');
    const finishedAt = clock.now();
    // another process holds the write lock as the upstream answers: the outcome's commit waits
    const lock = await holdWriteLock(relay, 50);
    answer();
    await waitFor(() => log.entries().some((e) => e.event === 'delivery.commit_retry'), 10_000, 'the commit waits');
    await passScansThenCommit(clock, relay, id, lock, finishedAt);
    await waitFor(() => message(relay, id).claims === 2, 10_000, 'the requeue of the failure committed late');
  });

  test('a failedRetryInterval scan whose failures were all retried by hand before its requeue committed requeues none and logs no delivery.requeued line', async () => {
    const { clock, relay, upstream } = await setup({ retry: { maxAttempts: 1 }, failedRetryInterval: 10 });
    await upstream.goDown();
    const id = await queue(relay, ['a@example.com']);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'failed');
    clock.advance(20_000);
    const log = capturedLog('info');
    const scans = failedRetryOf(relay, clock, log.logger);
    // another process holds the write lock: the scan read the failure and waits to requeue it
    const holder = openConnection(relay.config.databasePath);
    holder.exec('BEGIN IMMEDIATE');
    const scan = scans.scan(false);
    await waitFor(() => relay.writer.waitingFor('requeueTemporaryFailures') > 0, 10_000, 'the requeue to wait for the lock');
    // meanwhile that process (an operator's `relayq retry`) makes the message queued again
    holder.prepare("UPDATE messages SET state = 'queued', finished_at = NULL WHERE id = ?").run(id);
    holder.exec('COMMIT');
    holder.close();
    assert.equal(await scan, 0);
    assert.deepEqual(log.entries().filter((e) => e.event === 'delivery.requeued'), [], 'nothing was requeued: no line says so');
  });
});

/** A store of its own (no relay), with inserts for messages and recipients in any state. */
async function scratchStore(name: string) {
  const store = await openStore(path.join(tempDir(), name));
  const message = store.sqlite.prepare(
    `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, received_at, next_attempt_at, updated_at, finished_at)
     VALUES (?, ?, 'a@example.com', 'a@example.com', '127.0.0.1', 1, 1, 0, 0, 0, ?)`,
  );
  const recipient = store.sqlite.prepare(
    `INSERT INTO recipients (message_id, seq, address, status, attempts, temporary, next_attempt_at, updated_at) VALUES (?, ?, ?, ?, 10, ?, 0, 0)`,
  );
  return {
    store,
    insertMessage: (id: string, state: string, finishedAt: number | null) => message.run(id, state, finishedAt),
    insertRecipient: (id: string, seq: number, address: string, status: string, temporary: number) => recipient.run(id, seq, address, status, temporary),
  };
}

test('failedRetryInterval requeues only messages still failed when its write runs', async () => {
  const { store, insertMessage, insertRecipient } = await scratchStore('requeue.db');
  try {
    // F failed for good with a temporary failure; Q was found by the scan, then retried by hand:
    // queued again, one recipient pending and one that has since given up (temporarily) again
    insertMessage('F', 'failed', 1000);
    insertRecipient('F', 0, 'f@example.com', 'failed', 1);
    insertMessage('Q', 'queued', null);
    insertRecipient('Q', 0, 'q0@example.com', 'pending', 0);
    insertRecipient('Q', 1, 'q1@example.com', 'failed', 1);
    // G's last batch ended at 4,600: with batchDelay 1,000 it is due at 5,600, not now (5,000).
    // H's ended at 9,000, after now (the clock was set back since): it waits batchDelay, no more.
    const attempt = store.sqlite.prepare(
      `INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome, code, reply)
       VALUES (?, 0, '[]', 'up', ?, ?, 'deferred', 451, 'busy')`,
    );
    for (const [id, startedAt, durationMs] of [['G', 4000, 600], ['H', 8000, 1000]] as const) {
      insertMessage(id, 'failed', startedAt + durationMs);
      insertRecipient(id, 0, `${id}@example.com`, 'failed', 1);
      attempt.run(id, startedAt, durationMs);
    }
    const requeued = store.sqlite.transaction(() =>
      requeueTemporaryFailures(store.sqlite, ['F', 'Q', 'G', 'H'], { now: 5000, maxAttempts: 10, batchDelayMs: 1000 }),
    )();
    assert.deepEqual(requeued, ['F', 'G', 'H']);
    const due = (id: string) => (store.sqlite.prepare('SELECT next_attempt_at AS due FROM messages WHERE id = ?').get(id) as { due: number }).due;
    assert.deepEqual([due('F'), due('G'), due('H')], [5000, 5600, 6000]);
    const status = (id: string) => store.sqlite.prepare('SELECT status, attempts FROM recipients WHERE message_id = ? ORDER BY seq').all(id);
    assert.deepEqual(status('F'), [{ status: 'pending', attempts: 9 }]);
    assert.deepEqual(status('Q'), [
      { status: 'pending', attempts: 10 },
      { status: 'failed', attempts: 10 },
    ]);
  } finally {
    await store.close();
  }
});

test('the failed-mail scan goes in bounded steps and finds every temporary failure, also among many finished at the same instant', async () => {
  const { store, insertMessage, insertRecipient } = await scratchStore('failed.db');
  try {
    const temporary: string[] = [];
    store.sqlite.transaction(() => {
      // 1,300 failed messages, 700 of them finished in the same millisecond; every 97th failed temporarily
      for (let i = 0; i < 1300; i++) {
        const id = `M${String(i).padStart(5, '0')}`;
        insertMessage(id, 'failed', i < 700 ? 1000 : 1000 + i);
        insertRecipient(id, 0, 'r@example.com', 'failed', i % 97 === 0 ? 1 : 0);
        if (i % 97 === 0) temporary.push(id);
      }
    })();
    const found: string[] = [];
    let steps = 0;
    let cursor: { finishedAt: number; id: string } | null = { finishedAt: Number.NEGATIVE_INFINITY, id: '' };
    while (cursor) {
      const step = findTemporaryFailures(store.sqlite, { cursor, finishedBefore: 10_000, limit: 200 });
      found.push(...step.messages.map((m) => m.id));
      cursor = step.next;
      steps++;
    }
    assert.deepEqual(found, temporary);
    assert.equal(steps, 7, '1,300 messages in steps of 200');
    // the step reads the finish-time index, not the table
    for (const senderKey of [null, 'a@example.com']) {
      const plan = store.sqlite.prepare(`EXPLAIN QUERY PLAN ${FAILED_SCAN_SQL}`).all({ after: 1, id: '', before: 2, limit: 5, senderKey }) as Array<{ detail: string }>;
      assert.ok(plan.some((row) => /messages_finished/.test(row.detail)), JSON.stringify(plan));
      assert.ok(!plan.some((row) => /^SCAN messages\b/.test(row.detail)), JSON.stringify(plan));
    }
  } finally {
    await store.close();
  }
});

test('a message of several batches that failedRetryInterval retried logs delivery.failed_again when it fails again, however its batches end', async () => {
  const clock = new ManualClock();
  const upstream = await startScriptedUpstream();
  upstream.rcptReply = () => ({ code: 451, message: '4.7.1 Try again later' });
  const log = capturedLog('info');
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 1, batchDelay: 0, retry: { maxAttempts: 1 }, failedRetryInterval: 300 },
    { clock, startDelivery: false, logger: log.logger },
  );
  try {
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['t1@example.com', 't2@example.com', 't3@example.com'] })).response);
    await relay.delivery.runOnce();
    const failures = () => log.entries().filter((e) => e.queueId === id && String(e.event).startsWith('delivery.failed')).map((e) => [e.event, e.level]);
    assert.deepEqual(failures(), [['delivery.failed', 40]]);
    for (let i = 0; i < 2; i++) {
      clock.advance(300_000);
      assert.equal((await relay.delivery.runOnce()).requeued, 1);
      assert.equal(message(relay, id).state, 'failed');
    }
    // each retry was three attempts, the first two ending with the message still queued
    assert.equal(log.entries().filter((e) => e.queueId === id && e.event === 'delivery.attempt').length, 9);
    assert.deepEqual(failures(), [['delivery.failed', 40], ['delivery.failed_again', 30], ['delivery.failed_again', 30]]);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('after a restart, failed mail that the start\'s scan puts back and that fails again logs delivery.failed_again, not a second warning', async () => {
  const clock = new ManualClock();
  const upstream = await startScriptedUpstream();
  upstream.rcptReply = () => ({ code: 451, message: '4.7.1 Try again later' });
  const log = capturedLog('info');
  const config = { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, retry: { maxAttempts: 1 }, failedRetryInterval: 300 };
  const first = await startTestRelay(config, { clock, startDelivery: false, logger: log.logger });
  let second: Awaited<ReturnType<typeof startTestRelay>> | undefined;
  try {
    const id = queuedId((await sendMail(first.smtpPort, { to: ['t@example.com'] })).response);
    await first.delivery.runOnce();
    await first.stop();
    const failures = () => log.entries().filter((e) => String(e.event).startsWith('delivery.failed')).map((e) => [e.event, e.level]);
    assert.deepEqual(failures(), [['delivery.failed', 40]]);
    clock.advance(300_000);
    second = await startTestRelay(
      { ...config, databasePath: first.config.databasePath, emailsDir: first.config.emailsDir },
      { clock, startDelivery: false, logger: log.logger },
    );
    assert.equal((await second.delivery.runOnce()).requeued, 1);
    assert.equal(message(second, id).state, 'failed');
    assert.deepEqual(failures(), [['delivery.failed', 40], ['delivery.failed_again', 30]]);
  } finally {
    await first.stop();
    await second?.stop();
    await upstream.close();
  }
});

test('a give-up reason counts its attempts in words: 1 attempt, 2 attempts', () => {
  const retry = { maxAttempts: 1, maxAge: 60 };
  assert.equal(describeGiveUp('max-attempts', 1, retry), 'gave up after 1 attempt (retry.maxAttempts=1)');
  assert.equal(describeGiveUp('max-attempts', 2, { ...retry, maxAttempts: 2 }), 'gave up after 2 attempts (retry.maxAttempts=2)');
});

test('mail that failedRetryInterval retried and that fails again logs delivery.failed_again (info), not delivery.failed a second time; a retry by hand does', async () => {
  const clock = new ManualClock();
  const upstream = await startScriptedUpstream();
  upstream.rcptReply = () => ({ code: 451, message: '4.7.1 Try again later' });
  const log = capturedLog('info');
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, retry: { maxAttempts: 1 }, failedRetryInterval: 300 },
    { clock, startDelivery: false, logger: log.logger },
  );
  try {
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['t@example.com'] })).response);
    await relay.delivery.runOnce();
    const failures = () => log.entries().filter((e) => String(e.event).startsWith('delivery.failed')).map((e) => [e.event, e.level]);
    assert.deepEqual(failures(), [['delivery.failed', 40]]);
    clock.advance(300_000);
    assert.equal((await relay.delivery.runOnce()).requeued, 1);
    clock.advance(300_000);
    assert.equal((await relay.delivery.runOnce()).requeued, 1);
    assert.equal(message(relay, id).state, 'failed');
    assert.deepEqual(failures(), [['delivery.failed', 40], ['delivery.failed_again', 30], ['delivery.failed_again', 30]]);
    const [again] = log.entries().filter((e) => e.event === 'delivery.failed_again');
    assert.deepEqual([again.queueId, typeof again.reason, again.export], [id, 'string', path.join(relay.config.emailsDir, 'failed', `${id}.json`)]);

    // an operator's retry is news again
    assert.equal((await call(relay, `/admin/messages/${id}/retry`, { method: 'POST' })).status, 200);
    clock.advance(1000); // batchDelay after its last batch
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.deepEqual(failures().at(-1), ['delivery.failed', 40]);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});
