import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { isoTime } from '../../src/clock.js';
import { ManualClock } from '../manual-clock.js';
import { exportFailedMessage, exportIsCurrent } from '../../src/delivery/failed-export.js';
import { exportMissingFailures, removeDeliveredExports } from '../../src/delivery/leftovers.js';
import { type BatchResult, planCompletion, resultFromNodemailer } from '../../src/delivery/outcomes.js';
import type { Relay } from '../../src/main.js';
import { retryMessage } from '../../src/store/admin.js';
import { openConnection } from '../../src/store/db.js';
import { storeMetrics } from '../../src/store/queries.js';
import { capturedLog, openSession, SmtpClient, sendMail, startTestRelay, tempDir, testConfig, waitFor, writeDirect } from '../helpers.js';
import { startMisbehavingUpstream } from '../reliability/misbehaving-upstream.js';
import {
  attempts,
  failedExportExists,
  message,
  NO_JITTER,
  queuedId,
  readFailedExport,
  recipients,
  type ScriptedUpstream,
  startScriptedUpstream,
} from './fixtures.js';

const RAW = Buffer.from('From: app@example.com\r\nSubject: outcomes\r\n\r\nbody\r\n');

describe('per-recipient outcomes', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function setup(overrides: Parameters<typeof startTestRelay>[0] = {}, logger?: ReturnType<typeof capturedLog>['logger']) {
    const clock = new ManualClock();
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, retry: { initialDelay: 60 }, ...overrides },
      { clock, startDelivery: false, random: NO_JITTER, logger },
    );
    cleanup.push(() => relay.stop());
    return { clock, relay, upstream };
  }

  /** An upstream that refuses every recipient with 550, and a config that forwards to it (for relays started and restarted on it). */
  async function refusingUpstream() {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.rcptReply = () => ({ code: 550, message: '5.1.1 No such user' });
    return { upstream, config: testConfig({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port }) };
  }

  /** A relay forwarding to the upstream on `port`, its delivery run by the test (runOnce), stopped after the tests. */
  async function relayTo(port: number, overrides: Parameters<typeof startTestRelay>[0] = {}): Promise<Relay> {
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, ...overrides }, { startDelivery: false });
    cleanup.push(() => relay.stop());
    return relay;
  }

  async function queue(relay: Relay, to: string[]): Promise<string> {
    return queuedId((await sendMail(relay.smtpPort, { from: 'app@example.com', to, raw: RAW })).response);
  }

  test("a failed message's last error names the recipient that failed, not one deferred meanwhile and delivered since", async () => {
    const { clock, relay, upstream } = await setup();
    let busy = true;
    upstream.rcptReply = (a) => (a === 'bad@example.com' ? { code: 550, message: '5.1.1 No such user' } : a === 'tmp@example.com' && busy ? { code: 450, message: '4.2.1 Busy' } : undefined);
    const id = await queue(relay, ['bad@example.com', 'tmp@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual([message(relay, id).state, message(relay, id).last_error], ['queued', 'deferred tmp@example.com: 450 4.2.1 Busy']);
    busy = false;
    clock.advance(60_000);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status]), [['bad@example.com', 'failed'], ['tmp@example.com', 'delivered']]);
    assert.deepEqual([message(relay, id).state, message(relay, id).last_error], ['failed', 'bad@example.com: 550 5.1.1 No such user']);
    assert.equal(readFailedExport(relay, id).lastError, 'bad@example.com: 550 5.1.1 No such user');
  });

  test('a message left waiting names the recipient it waits for, also when one refused after it in RCPT order', async () => {
    const { relay, upstream } = await setup();
    upstream.rcptReply = (a) => (a === 'bad@example.com' ? { code: 550, message: '5.1.1 No such user' } : a === 'tmp@example.com' ? { code: 450, message: '4.2.1 Busy' } : undefined);
    const id = await queue(relay, ['tmp@example.com', 'bad@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status]), [['tmp@example.com', 'pending'], ['bad@example.com', 'failed']]);
    assert.deepEqual([message(relay, id).state, message(relay, id).last_error], ['queued', 'deferred tmp@example.com: 450 4.2.1 Busy']);
  });

  test('a message waiting between batches names a deferral while its recipient waits, and none once it is delivered', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 1, batchDelay: 1000 });
    let busy = true;
    upstream.rcptReply = (a) => (a === 'tmp@example.com' && busy ? { code: 450, message: '4.2.1 Busy' } : undefined);
    const id = await queue(relay, ['tmp@example.com', 'a@example.com', 'b@example.com']);
    const waiting = async (advanceMs: number) => {
      clock.advance(advanceMs);
      await relay.delivery.runOnce();
      return [recipients(relay, id).map((r) => r.status).join(' '), message(relay, id).last_error];
    };
    assert.deepEqual(await waiting(0), ['pending pending pending', 'deferred tmp@example.com: 450 4.2.1 Busy']);
    // a later batch delivered: the message still waits for tmp@
    assert.deepEqual(await waiting(1000), ['pending delivered pending', 'deferred tmp@example.com: 450 4.2.1 Busy']);
    busy = false;
    // b@'s batch, not tried yet, goes before tmp@'s retry, due as well
    assert.deepEqual(await waiting(60_000), ['pending delivered delivered', 'deferred tmp@example.com: 450 4.2.1 Busy']);
    // tmp@ delivered on its retry: no problem is left
    assert.deepEqual(await waiting(1000), ['delivered delivered delivered', null]);
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com'], ['b@example.com'], ['tmp@example.com']]);
  });

  test('a message waiting for its next batch names a recipient that gave up after a deferral as failed, not as deferred', async () => {
    const { relay, upstream } = await setup({ batchSize: 1, batchDelay: 120, retry: { initialDelay: 60, maxAttempts: 1 } });
    upstream.rcptReply = (a) => (a === 'tmp@example.com' ? { code: 450, message: '4.2.1 Busy' } : undefined);
    const id = await queue(relay, ['tmp@example.com', 'a@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status]), [['tmp@example.com', 'failed'], ['a@example.com', 'pending']]);
    assert.deepEqual(
      [message(relay, id).state, message(relay, id).last_error],
      ['queued', 'tmp@example.com: gave up after 1 attempt (retry.maxAttempts=1); last reply: 450 4.2.1 Busy'],
    );
  });

  test('550 to one RCPT → that recipient failed, the others delivered, message failed and exported with the original bytes', async () => {
    const { clock, relay, upstream } = await setup();
    upstream.rcptReply = (a) => (a === 'bad@example.com' ? { code: 550, message: '5.1.1 No such user' } : undefined);
    const id = await queue(relay, ['a@example.com', 'bad@example.com', 'c@example.com']);
    const stored = message(relay, id).raw!;
    clock.advance(5000); // failed later than received
    await relay.delivery.runOnce();

    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com', 'c@example.com']]);
    const rows = recipients(relay, id);
    assert.deepEqual(
      rows.map((r) => [r.address, r.status, r.last_code, r.temporary]),
      [
        ['a@example.com', 'delivered', 250, 0],
        ['bad@example.com', 'failed', 550, 0],
        ['c@example.com', 'delivered', 250, 0],
      ],
    );
    assert.match(rows[1].last_reply!, /550 5\.1\.1 No such user/);
    const m = message(relay, id);
    assert.equal(m.state, 'failed');
    assert.ok(m.finished_at !== null);
    assert.match(m.last_error!, /bad@example\.com.*550/);
    assert.equal(attempts(relay, id)[0].outcome, 'partial');

    const doc = readFailedExport(relay, id);
    // the format's version first, as the README documents the document: what other tools read it by
    assert.deepEqual(Object.keys(doc).slice(0, 5), ['version', 'id', 'state', 'receivedAt', 'failedAt']);
    assert.equal(doc.version, 1);
    assert.equal(doc.id, id);
    assert.deepEqual(doc.envelope, { mailFrom: 'app@example.com', rcptTo: ['a@example.com', 'bad@example.com', 'c@example.com'] });
    assert.deepEqual(
      doc.recipients.map((r) => [r.address, r.status, r.attempts, r.lastCode]),
      [
        ['a@example.com', 'delivered', 1, 250],
        ['bad@example.com', 'failed', 1, 550],
        ['c@example.com', 'delivered', 1, 250],
      ],
    );
    assert.match(doc.recipients[1].lastReply!, /No such user/);
    assert.deepEqual(Buffer.from(doc.raw, 'base64'), stored, 'the export decodes to the stored bytes');
    assert.equal(doc.receivedAt, new Date(m.received_at).toISOString());
    assert.equal(doc.failedAt, new Date(m.finished_at!).toISOString());
    assert.notEqual(doc.failedAt, doc.receivedAt);
    assert.equal(doc.exportedAt, new Date(clock.now()).toISOString());
    assert.equal(doc.size, m.size);
    assert.deepEqual(
      doc.recipients.map((r) => r.temporary),
      [false, false, false],
    );
    const [row] = attempts(relay, id);
    assert.deepEqual(doc.attempts, [
      {
        batch: 0,
        recipients: ['a@example.com', 'bad@example.com', 'c@example.com'],
        upstream: `127.0.0.1:${upstream.port}`,
        startedAt: new Date(row.started_at).toISOString(),
        durationMs: row.duration_ms,
        outcome: 'partial',
        code: 250,
        reply: row.reply,
      },
    ]);
    // the client as stored: no reverse lookup here, so no host name
    assert.ok(m.helo, 'the session had a HELO name');
    assert.deepEqual(doc.client, { ip: '127.0.0.1', hostname: null, helo: m.helo, authUser: null });
  });

  test('the log says why: a partial attempt names each recipient not delivered with its reply; delivery.failed gives the reason', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.rcptReply = (a) =>
      a.startsWith('bad') ? { code: 550, message: '5.1.1 No such user' } : a.startsWith('tmp') ? { code: 450, message: '4.2.1 Busy' } : undefined;
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, retry: { maxAttempts: 1 } },
      { clock: new ManualClock(), startDelivery: false, logger: log.logger },
    );
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['ok@example.com', 'bad@example.com', 'tmp@example.com']);
    await relay.delivery.runOnce();
    const events = log.entries().filter((e) => e.queueId === id);
    const attempt = events.find((e) => e.event === 'delivery.attempt');
    assert.equal(attempt?.outcome, 'partial');
    assert.deepEqual(
      ((attempt?.notDelivered ?? []) as Array<{ to: string; status: string; reply: string }>).map((r) => [r.to, r.status, r.reply.slice(0, 9)]),
      [
        ['bad@example.com', 'failed', '550 5.1.1'],
        ['tmp@example.com', 'failed', '450 4.2.1'],
      ],
    );
    // every address, as Postfix's to=, so that a grep for one finds its message and its attempts
    const all = ['ok@example.com', 'bad@example.com', 'tmp@example.com'];
    assert.deepEqual(attempt?.to, all);
    assert.deepEqual(events.find((e) => e.event === 'smtp.accepted')?.to, all);
    const failed = events.find((e) => e.event === 'delivery.failed');
    assert.equal(failed?.reason, message(relay, id).last_error);
    assert.match(String(failed?.reason), /@example\.com: (550|gave up)/);

    // nobody delivered: the line's reply is the transaction's (the 450), and each recipient with
    // another reply of its own is listed (the 550; the 450 that gave up says so)
    const other = await queue(relay, ['tmp2@example.com', 'bad2@example.com']);
    await relay.delivery.runOnce();
    const line = log.entries().find((e) => e.queueId === other && e.event === 'delivery.attempt');
    const listed = ((line?.notDelivered ?? []) as Array<{ to: string; reply: string }>).map((r) => [r.to, r.reply.slice(0, 9)]);
    assert.deepEqual([String(line?.reply).slice(0, 9), listed], [
      '450 4.2.1',
      [
        ['tmp2@example.com', '450 4.2.1'],
        ['bad2@example.com', '550 5.1.1'],
      ],
    ]);
  });

  test("a message's log line names its first ten recipients and counts them all; an attempt's names every address of its batch", async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 12, batchDelay: 0 },
      { clock: new ManualClock(), startDelivery: false, logger: log.logger },
    );
    cleanup.push(() => relay.stop());
    const to = Array.from({ length: 13 }, (_, i) => `r${i}@example.com`);
    const id = await queue(relay, to);
    await relay.delivery.runOnce();
    const lines = log.entries().filter((e) => e.queueId === id);
    const accepted = lines.find((e) => e.event === 'smtp.accepted');
    assert.deepEqual([accepted?.to, accepted?.rcpts], [to.slice(0, 10), 13]);
    const attempts = lines.filter((e) => e.event === 'delivery.attempt').map((e) => [e.to, e.rcpts]);
    assert.deepEqual(attempts, [
      [to.slice(0, 12), 12],
      [to.slice(12), 1],
    ]);
  });

  test("an attempt's log line names at most 100 addresses of a larger batch, and lists at most ten recipients not delivered", async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 150 },
      { clock: new ManualClock(), startDelivery: false, logger: log.logger },
    );
    cleanup.push(() => relay.stop());
    const to = Array.from({ length: 130 }, (_, i) => `r${i}@example.com`);
    // twelve of them refused: the counts give them all
    const refused = to.slice(100, 112);
    upstream.rcptReply = (a) => (refused.includes(a) ? { code: 550, message: '5.1.1 No such user' } : undefined);
    const id = await queue(relay, to);
    await relay.delivery.runOnce();
    const line = log.entries().find((e) => e.queueId === id && e.event === 'delivery.attempt');
    const listed = ((line?.notDelivered ?? []) as Array<{ to: string }>).map((r) => r.to);
    assert.deepEqual([line?.to, line?.rcpts, line?.delivered, line?.failed, listed], [to.slice(0, 100), 130, 118, 12, refused.slice(0, 10)]);
  });

  test("an attempt that leaves its message queued logs the message's next attempt as an ISO time, as the API gives it", async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.rcptReply = () => ({ code: 450, message: '4.2.1 Busy' });
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, retry: { initialDelay: 60 } },
      { clock: new ManualClock(), startDelivery: false, random: NO_JITTER, logger: log.logger },
    );
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['tmp@example.com']);
    await relay.delivery.runOnce();
    const line = log.entries().find((e) => e.queueId === id && e.event === 'delivery.attempt');
    assert.equal(line?.state, 'queued');
    assert.equal(line?.nextAttemptAt, new Date(message(relay, id).next_attempt_at).toISOString());
  });

  test("an attempt's duration is recorded as long as the upstream took, and counted in the histogram by it", async () => {
    // an upstream that takes 300 ms to answer the end of DATA
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onData(stream, _session, cb) {
        stream.resume();
        stream.on('end', () => setTimeout(() => cb(), 300));
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port },
      { clock: new ManualClock(), startDelivery: false, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['a@example.com']);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'delivered');
    const [row] = attempts(relay, id);
    assert.ok(row.duration_ms >= 250, `attempt recorded as taking ${row.duration_ms} ms`);
    const { buckets, sumMs, count } = storeMetrics(relay.store.sqlite).attemptDuration;
    assert.equal(count, 1);
    assert.equal(sumMs, row.duration_ms);
    assert.deepEqual(buckets.filter((b) => b.leMs <= 250).map((b) => b.count).filter((n) => n > 0), [], 'not counted at or below 250 ms');
  });

  test('450 to one RCPT → only that recipient is tried again later; the others are not re-sent', async () => {
    const { clock, relay, upstream } = await setup();
    let refusals = 1;
    upstream.rcptReply = (a) => (a === 'busy@example.com' && refusals-- > 0 ? { code: 450, message: '4.2.1 Mailbox busy, try later' } : undefined);
    const id = await queue(relay, ['a@example.com', 'busy@example.com', 'c@example.com']);
    await relay.delivery.runOnce();

    let rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => r.status), ['delivered', 'pending', 'delivered']);
    assert.equal(rows[1].temporary, 1);
    assert.equal(rows[1].last_code, 450);
    assert.equal(rows[1].next_attempt_at, clock.now() + 60_000, 'initialDelay');
    assert.equal(message(relay, id).state, 'queued');
    assert.equal(message(relay, id).next_attempt_at, clock.now() + 60_000);
    assert.equal(attempts(relay, id)[0].outcome, 'partial');

    clock.advance(59_999);
    assert.equal((await relay.delivery.runOnce()).attempts, 0);
    clock.advance(1);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);

    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com', 'c@example.com'], ['busy@example.com']]);
    assert.deepEqual(upstream.rcpts, ['a@example.com', 'busy@example.com', 'c@example.com', 'busy@example.com'], 'the retry addresses only the deferred recipient');
    rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.status, r.attempts]), [['delivered', 1], ['delivered', 2], ['delivered', 1]]);
    assert.equal(message(relay, id).state, 'delivered');
    assert.equal(failedExportExists(relay, id), false);
  });

  test('5xx to DATA → every recipient of the batch failed at once and the message exported', async () => {
    const { relay, upstream } = await setup();
    upstream.dataReply = () => ({ code: 554, message: '5.7.1 Message rejected as spam' });
    const id = await queue(relay, ['a@example.com', 'b@example.com']);
    await relay.delivery.runOnce();
    assert.equal(upstream.refused.length, 1);
    assert.equal(upstream.accepted.length, 0);
    assert.deepEqual(recipients(relay, id).map((r) => [r.status, r.attempts, r.last_code, r.temporary]), [
      ['failed', 1, 554, 0],
      ['failed', 1, 554, 0],
    ]);
    assert.equal(message(relay, id).state, 'failed');
    const [a] = attempts(relay, id);
    assert.equal(a.outcome, 'failed');
    assert.equal(a.code, 554);
    assert.match(a.reply!, /spam/);
    const doc = readFailedExport(relay, id);
    assert.deepEqual(doc.recipients.map((r) => r.status), ['failed', 'failed']);
    assert.equal((await relay.delivery.runOnce()).attempts, 0, 'a permanent failure is not retried');
  });

  test('a failed message whose export went missing (a crash right after the commit) is exported at the next start', async () => {
    const { config } = await refusingUpstream();
    const first = await startTestRelay(config, { startDelivery: false });
    const id = await queue(first, ['nobody@example.com']);
    await first.delivery.runOnce();
    assert.equal(message(first, id).state, 'failed');
    assert.ok(failedExportExists(first, id));
    fs.rmSync(path.join(config.emailsDir, 'failed', `${id}.json`));
    await first.stop();

    const second = await startTestRelay(config);
    cleanup.push(() => second.stop());
    await waitFor(() => failedExportExists(second, id), 10_000, 'the export to be written again');
    assert.equal(readFailedExport(second, id).recipients[0].lastCode, 550);
  });

  /** Starts a relay on `config` and waits for its start's restoring of missing exports (its log line). */
  async function restartForExports(config: Parameters<typeof startTestRelay>[0]) {
    const log = capturedLog('info');
    const second = await startTestRelay(config, { logger: log.logger });
    cleanup.push(() => second.stop());
    const line = () => log.entries().find((e) => e.event === 'delivery.exports_restored');
    await waitFor(() => line() !== undefined, 10_000, 'the missing exports to be written again');
    return { second, restored: line() as { count?: unknown; ids?: unknown } };
  }

  test('at a start only missing exports are written: a failed message whose export is there keeps that file', async () => {
    const { config } = await refusingUpstream();
    const first = await startTestRelay(config, { startDelivery: false });
    const kept = await queue(first, ['nobody@example.com']);
    const lost = await queue(first, ['nobody2@example.com']);
    await first.delivery.runOnce();
    assert.deepEqual([message(first, kept).state, message(first, lost).state], ['failed', 'failed']);
    const keptFile = path.join(config.emailsDir, 'failed', `${kept}.json`);
    const before = fs.statSync(keptFile);
    const keptText = fs.readFileSync(keptFile, 'utf8');
    fs.rmSync(path.join(config.emailsDir, 'failed', `${lost}.json`));
    await first.stop();

    const { second, restored } = await restartForExports(config);
    assert.deepEqual([restored.count, restored.ids], [1, [lost]]);
    assert.ok(failedExportExists(second, lost));
    const after = fs.statSync(keptFile);
    assert.deepEqual([after.ino, after.mtimeMs], [before.ino, before.mtimeMs], 'the export still there is not written again');
    assert.equal(fs.readFileSync(keptFile, 'utf8'), keptText);
  });

  test('a stop during the start\'s walk of missing exports waits for one export, not for a page of them', async () => {
    const { config } = await refusingUpstream();
    const relay = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => relay.stop());
    const ids = [await queue(relay, ['nobody@example.com']), await queue(relay, ['nobody2@example.com']), await queue(relay, ['nobody3@example.com'])];
    await relay.delivery.runOnce();
    for (const id of ids) fs.rmSync(path.join(config.emailsDir, 'failed', `${id}.json`));
    const log = capturedLog('info');
    let stopping = false;
    await exportMissingFailures({
      sqlite: relay.store.sqlite,
      emailsDir: config.emailsDir,
      log: log.logger,
      stopping: () => stopping,
      exportFailed: async (id: string) => {
        const file = await exportFailedMessage(relay.store.sqlite, path.join(config.emailsDir, 'failed'), id, Date.now());
        stopping = true; // the stop comes while the first export is written
        return file;
      },
    });
    assert.deepEqual(ids.map((id) => failedExportExists(relay, id)), [true, false, false]);
    assert.deepEqual(
      log.entries().filter((e) => e.event === 'delivery.exports_restored').map((e) => e.ids),
      [[ids[0]]],
      'what was restored before the stop is said',
    );
  });

  test("at a start a message that fails again while the walk runs (failedRetryInterval's first scan beside it) is not taken for a missing export", async () => {
    const { config } = await refusingUpstream();
    const relay = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => relay.stop());
    const ids = [await queue(relay, ['nobody@example.com']), await queue(relay, ['nobody2@example.com'])];
    await relay.delivery.runOnce();
    const log = capturedLog('info');
    const ctx = {
      sqlite: relay.store.sqlite,
      emailsDir: config.emailsDir,
      log: log.logger,
      stopping: () => false,
      exportFailed: (id: string) => exportFailedMessage(relay.store.sqlite, path.join(config.emailsDir, 'failed'), id, Date.now()),
    };
    // the walk has read its page; then the second message is requeued and fails again, and its
    // new export is not written yet (the engine writes it after the commit)
    // (here before the walk's first await: it reads its page at once)
    const walk = exportMissingFailures(ctx);
    const other = openConnection(config.databasePath);
    other.prepare('UPDATE messages SET finished_at = finished_at + 1 WHERE id = ?').run(ids[1]);
    other.close();
    fs.rmSync(path.join(config.emailsDir, 'failed', `${ids[1]}.json`));
    await walk;
    assert.deepEqual(log.entries().filter((e) => e.event === 'delivery.exports_restored'), []);
    assert.equal(failedExportExists(relay, ids[1]), false, "this failure's export is the engine's to write");
  });

  test('at a start an export of the current failure in the key order of earlier versions is kept, its failedAt further down than the first read', async () => {
    const { config } = await refusingUpstream();
    const first = await startTestRelay({ ...config, batchSize: 200 }, { startDelivery: false });
    const to = Array.from({ length: 200 }, (_, i) => `nobody${i}@example.com`);
    const kept = await queue(first, to);
    const lost = await queue(first, ['lost@example.com']);
    await first.delivery.runOnce();
    assert.deepEqual([message(first, kept).state, message(first, lost).state], ['failed', 'failed']);
    // earlier versions wrote receivedAt and failedAt after the recipients: here past byte 16,384
    const { receivedAt, failedAt, ...rest } = readFailedExport(first, kept);
    const { version, id, state, envelope, recipients: rcpts, ...tail } = rest;
    const oldLayout = `${JSON.stringify({ version, id, state, envelope, recipients: rcpts, receivedAt, failedAt, ...tail }, null, 2)}\n`;
    assert.ok(oldLayout.indexOf('"failedAt"') > 16_384, String(oldLayout.indexOf('"failedAt"')));
    const keptFile = path.join(config.emailsDir, 'failed', `${kept}.json`);
    fs.writeFileSync(keptFile, oldLayout);
    fs.rmSync(path.join(config.emailsDir, 'failed', `${lost}.json`));
    await first.stop();

    const { restored } = await restartForExports(config);
    assert.deepEqual(restored.ids, [lost]);
    assert.equal(fs.readFileSync(keptFile, 'utf8'), oldLayout, 'not written again');
  });

  test('at a start an export of an earlier failure (a crash before the export of the next one) is written again', async () => {
    const { config } = await refusingUpstream();
    const clock = new ManualClock();
    const first = await startTestRelay(config, { clock, startDelivery: false });
    const id = await queue(first, ['nobody@example.com']);
    const current = await queue(first, ['nobody2@example.com']);
    await first.delivery.runOnce();
    const file = path.join(config.emailsDir, 'failed', `${id}.json`);
    const firstExport = fs.readFileSync(file);
    clock.advance(60_000);
    assert.equal(await writeDirect(first, (db) => retryMessage(db, id, clock.now(), 0)), 'requeued');
    await first.delivery.runOnce();
    assert.equal(message(first, id).state, 'failed');
    const failedAt = isoTime(message(first, id).finished_at);
    assert.equal(readFailedExport(first, id).failedAt, failedAt);
    await first.stop();
    // what a crash between the commit of the second failure and its export leaves
    fs.writeFileSync(file, firstExport);
    assert.notEqual(readFailedExport(first, id).failedAt, failedAt);

    const { second, restored } = await restartForExports(config);
    assert.deepEqual(restored.ids, [id], 'the export of the other failed message is current, and kept');
    const doc = readFailedExport(second, id);
    assert.equal(doc.failedAt, failedAt);
    assert.equal((doc.attempts as unknown[]).length, 2);
    assert.ok(failedExportExists(second, current));
  });

  test('at a start every failed message is checked for its export, not only the first step of the scan', async () => {
    const { config } = await refusingUpstream();
    const clock = new ManualClock();
    const first = await startTestRelay(config, { clock, startDelivery: false });
    const early = await queue(first, ['nobody@example.com']);
    await first.delivery.runOnce();
    // 500 failed messages that finished after it, inserted as such, fill the rest of the scan's
    // first step (500 messages), so the next one is in its second step. Their exports are there,
    // of their last failure: the scan reads only their failedAt.
    const filler = Array.from({ length: 500 }, (_, i) => `FILLER${String(i).padStart(4, '0')}`);
    await writeDirect(first, (db) => {
      const insert = db.prepare(
        `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, received_at, next_attempt_at, updated_at, finished_at)
         VALUES (?, 'failed', 'app@example.com', 'app@example.com', '127.0.0.1', 1, 1, 0, 0, 0, ?)`,
      );
      for (const [i, id] of filler.entries()) insert.run(id, clock.now() + 1 + i);
    });
    for (const [i, id] of filler.entries()) {
      const head = { version: 1, id, state: 'failed', receivedAt: isoTime(0), failedAt: isoTime(clock.now() + 1 + i) };
      fs.writeFileSync(path.join(config.emailsDir, 'failed', `${id}.json`), `${JSON.stringify(head, null, 2)}\n`);
    }
    clock.advance(60_000);
    const late = await queue(first, ['nobody2@example.com']);
    await first.delivery.runOnce();
    const failedInScanOrder = (first.store.sqlite.prepare("SELECT id FROM messages WHERE state = 'failed' ORDER BY finished_at, id").all() as Array<{ id: string }>).map(
      (r) => r.id,
    );
    assert.deepEqual([failedInScanOrder.length, failedInScanOrder.indexOf(early), failedInScanOrder.indexOf(late)], [502, 0, 501]);
    for (const id of [early, late]) fs.rmSync(path.join(config.emailsDir, 'failed', `${id}.json`));
    await first.stop();

    const { second, restored } = await restartForExports(config);
    assert.deepEqual(restored.ids, [early, late], 'the one in the second step too');
    assert.equal(readFailedExport(second, late).recipients[0].lastCode, 550);
  });

  test('a 552 to RCPT TO defers that recipient (RFC 5321: "too many recipients"); a 552 to DATA fails the batch', async () => {
    const { clock, relay, upstream } = await setup();
    let limited = true;
    upstream.rcptReply = (a) => (a === 'second@example.com' && limited ? { code: 552, message: '5.5.3 Too many recipients' } : undefined);
    const id = await queue(relay, ['first@example.com', 'second@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, id).map((r) => [r.status, r.last_code, r.temporary]), [
      ['delivered', 250, 0],
      ['pending', 552, 1],
    ]);
    limited = false;
    clock.advance(60_000);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'delivered');
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['first@example.com'], ['second@example.com']], 'only the deferred recipient went again');

    // every recipient refused with 552: the transaction ends at RCPT, and each is deferred
    upstream.rcptReply = (a) => (a.startsWith('over') ? { code: 552, message: '5.5.3 Too many recipients' } : undefined);
    const over = await queue(relay, ['over1@example.com', 'over2@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, over).map((r) => [r.status, r.last_code, r.temporary]), [
      ['pending', 552, 1],
      ['pending', 552, 1],
    ]);
    assert.equal(message(relay, over).state, 'queued');

    upstream.dataReply = () => ({ code: 552, message: '5.3.4 Message too big for system' });
    const big = await queue(relay, ['third@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, big).map((r) => [r.status, r.last_code, r.temporary]), [['failed', 552, 0]]);
  });

  test("recipients over the upstream's limit per transaction go at once in another transaction of the same attempt", async () => {
    // an upstream that takes two recipients per transaction (Postfix's smtpd_recipient_limit)
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onRcptTo(address, session, cb) {
        upstream.rcpts.push(address.address);
        if (address.address.startsWith('full')) return cb(Object.assign(new Error('4.2.2 Mailbox full'), { responseCode: 452 }));
        if (session.envelope.rcptTo.length >= 2) return cb(Object.assign(new Error('4.5.3 Error: too many recipients'), { responseCode: 452 }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await relayTo(upstream.port);
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'full@example.com', 'd@example.com', 'e@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.accepted.map((t) => t.to), [
      ['a@example.com', 'b@example.com'],
      ['c@example.com', 'd@example.com'],
      ['e@example.com'],
    ]);
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status, r.attempts, r.last_code]), [
      ['a@example.com', 'delivered', 1, 250],
      ['b@example.com', 'delivered', 1, 250],
      ['c@example.com', 'delivered', 1, 250],
      ['full@example.com', 'pending', 1, 452],
      ['d@example.com', 'delivered', 1, 250],
      ['e@example.com', 'delivered', 1, 250],
    ]);
    // a full mailbox is no limit per transaction: it waits for its retry, as before
    assert.equal(upstream.rcpts.filter((a) => a === 'full@example.com').length, 1);
    assert.deepEqual(attempts(relay, id).map((a) => a.outcome), ['partial']);
  });

  test('an upstream that says "Too many recipients" without an enhanced code is over its limit too: the rest go in another transaction', async () => {
    // two recipients per transaction, and a bare 452 reply (no 4.5.3) as some servers give
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onRcptTo(address, session, cb) {
        upstream.rcpts.push(address.address);
        if (address.address.startsWith('nouser')) return cb(Object.assign(new Error('5.1.1 No such user'), { responseCode: 550 }));
        if (session.envelope.rcptTo.length >= 2) return cb(Object.assign(new Error('Too many recipients'), { responseCode: 452 }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await relayTo(upstream.port);
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'nouser@example.com', 'c@example.com', 'd@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.accepted.map((t) => t.to), [
      ['a@example.com', 'b@example.com'],
      ['c@example.com', 'd@example.com'],
    ]);
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status, r.attempts, r.last_code]), [
      ['a@example.com', 'delivered', 1, 250],
      ['b@example.com', 'delivered', 1, 250],
      ['nouser@example.com', 'failed', 1, 550],
      ['c@example.com', 'delivered', 1, 250],
      ['d@example.com', 'delivered', 1, 250],
    ]);
    assert.equal(message(relay, id).state, 'failed');
    assert.deepEqual(attempts(relay, id).map((a) => [a.batch, a.outcome, a.code]), [[0, 'partial', 250]]);
  });

  /**
   * An upstream that takes `limit` RCPTs per transaction, counting those it refused too: the
   * ones after them get `452 4.5.3`; `refuse` answers the others first.
   */
  async function countingUpstream(limit: number, refuse: (address: string) => { code: number; message: string } | undefined): Promise<ScriptedUpstream> {
    const rcptsInTransaction = new Map<string, number>();
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onMailFrom(_address, session, cb) {
        rcptsInTransaction.set(session.id, 0);
        cb();
      },
      onRcptTo(address, session, cb) {
        upstream.rcpts.push(address.address);
        const n = (rcptsInTransaction.get(session.id) ?? 0) + 1;
        rcptsInTransaction.set(session.id, n);
        const reply = n > limit ? { code: 452, message: '4.5.3 Error: too many recipients' } : refuse(address.address);
        if (reply) return cb(Object.assign(new Error(reply.message), { responseCode: reply.code }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    return upstream;
  }

  test('an upstream that counts refused recipients towards its limit: the rest go in another transaction also when the first delivered to none', async () => {
    // the first two recipients are greylisted
    const greylisted = { code: 450, message: '4.7.1 Greylisted, try again later' };
    const upstream = await countingUpstream(2, (address) => (address.startsWith('grey') ? greylisted : undefined));
    const relay = await relayTo(upstream.port);
    const id = await queue(relay, ['grey1@example.com', 'grey2@example.com', 'a@example.com', 'b@example.com', 'c@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com', 'b@example.com'], ['c@example.com']]);
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status, r.attempts, r.last_code]), [
      ['grey1@example.com', 'pending', 1, 450],
      ['grey2@example.com', 'pending', 1, 450],
      ['a@example.com', 'delivered', 1, 250],
      ['b@example.com', 'delivered', 1, 250],
      ['c@example.com', 'delivered', 1, 250],
    ]);
    // RCPTs: 5, then the 3 over the limit, then the 1 still over it
    assert.equal(upstream.rcpts.length, 9);
    assert.equal(message(relay, id).state, 'queued');
    // one attempt, with the first transaction's reply (its first refusal: it delivered nothing)
    assert.deepEqual(attempts(relay, id).map((a) => [a.outcome, a.code]), [['partial', 450]]);
  });

  test("a batch whose every recipient is refused at RCPT over the upstream's transactions is refused as a whole (continueOnError=false)", async () => {
    const noUser = { code: 550, message: '5.1.1 No such user' };
    const upstream = await countingUpstream(1, (address) => (address.startsWith('nouser') ? noUser : undefined));
    const relay = await relayTo(upstream.port, { batchSize: 2, batchDelay: 0, continueOnError: false, workerCount: 1 });
    const id = await queue(relay, ['nouser1@example.com', 'nouser2@example.com', 'c@example.com', 'd@example.com']);
    await relay.delivery.runOnce();
    // nouser2 went in a second transaction, refused too: batch 0 refused every recipient
    assert.deepEqual(upstream.rcpts, ['nouser1@example.com', 'nouser2@example.com', 'nouser2@example.com']);
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status, r.last_code]), [
      ['nouser1@example.com', 'failed', 550],
      ['nouser2@example.com', 'failed', 550],
      ['c@example.com', 'failed', null],
      ['d@example.com', 'failed', null],
    ]);
    assert.match(rows[2].last_reply!, /^not attempted: batch 0 was refused permanently \(550 .*No such user\) and continueOnError is false/);
    assert.deepEqual(upstream.accepted, []);
    assert.deepEqual(attempts(relay, id).map((a) => [a.outcome, a.code]), [['failed', 550]]);
  });

  test("a transaction that went on to DATA and delivered nothing sends no further one for the recipients over the limit", async () => {
    const upstream = await countingUpstream(1, () => undefined);
    // DATA refused for good when a is in it, and for a while when b is
    upstream.dataReply = (t) =>
      t.to.includes('a@example.com') ? { code: 554, message: '5.7.1 Rejected as spam' } : t.to.includes('b@example.com') ? { code: 451, message: '4.3.0 Try again later' } : undefined;
    const relay = await relayTo(upstream.port, { batchSize: 3, batchDelay: 0, continueOnError: false });
    const refused = await queue(relay, ['a@example.com', 'x@example.com', 'y@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.rcpts, ['a@example.com', 'x@example.com', 'y@example.com'], 'one transaction: the message went out once');
    const rows = recipients(relay, refused);
    assert.deepEqual(rows.map((r) => [r.address, r.status]), [
      ['a@example.com', 'failed'],
      ['x@example.com', 'failed'],
      ['y@example.com', 'failed'],
    ]);
    assert.match(rows[1].last_reply!, /^not attempted again: batch 0 was refused permanently \(554 .*Rejected as spam\)/);
    assert.deepEqual(attempts(relay, refused).map((a) => [a.outcome, a.code]), [['failed', 554]]);

    upstream.rcpts.length = 0;
    const deferred = await queue(relay, ['b@example.com', 'x@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.rcpts, ['b@example.com', 'x@example.com'], 'x waits for the next attempt, with b');
    assert.deepEqual(recipients(relay, deferred).map((r) => [r.address, r.status, r.last_code]), [
      ['b@example.com', 'pending', 451],
      ['x@example.com', 'pending', 452],
    ]);
  });

  test('a refusal of DATA in a later transaction ends the transactions: the rest of the batch is not sent (continueOnError=false)', async () => {
    const upstream = await countingUpstream(1, () => undefined);
    upstream.dataReply = (t) => (t.to.includes('b@example.com') ? { code: 554, message: '5.7.1 Rejected as spam' } : undefined);
    const relay = await relayTo(upstream.port, { batchSize: 4, batchDelay: 0, continueOnError: false, workerCount: 1 });
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com', 'e@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com']]);
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status]), [
      ['a@example.com', 'delivered'],
      ['b@example.com', 'failed'],
      ['c@example.com', 'failed'],
      ['d@example.com', 'failed'],
      ['e@example.com', 'failed'],
    ]);
    assert.match(rows[2].last_reply!, /^not attempted again: batch 0 was refused permanently \(554 .*Rejected as spam\)/);
    assert.match(rows[4].last_reply!, /^not attempted: batch 0 was refused permanently/);
  });

  test('an upstream that answers every recipient "too many recipients" gets no further transaction: the batch waits for its retry', async () => {
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onRcptTo(address, _session, cb) {
        upstream.rcpts.push(address.address);
        cb(Object.assign(new Error('4.5.3 Error: too many recipients'), { responseCode: 452 }));
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await relayTo(upstream.port);
    const id = await queue(relay, ['a@example.com', 'b@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.rcpts, ['a@example.com', 'b@example.com']);
    assert.deepEqual(recipients(relay, id).map((r) => [r.status, r.attempts, r.last_code]), [
      ['pending', 1, 452],
      ['pending', 1, 452],
    ]);
  });

  test('a follow-up transaction refused as a whole with a 5xx stops the message under continueOnError=false, as its batch would', async () => {
    // this upstream says "too many recipients" with a 552, which is taken for a 452
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onRcptTo(_address, session, cb) {
        if (session.envelope.rcptTo.length >= 2) return cb(Object.assign(new Error('5.5.3 Too many recipients'), { responseCode: 552 }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    upstream.dataReply = (t) => (t.to.includes('c@example.com') ? { code: 554, message: '5.7.1 Rejected as spam' } : undefined);
    const relay = await relayTo(upstream.port, { batchSize: 4, batchDelay: 0, continueOnError: false });
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com', 'e@example.com', 'f@example.com']);
    await relay.delivery.runOnce();
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status, r.last_code]), [
      ['a@example.com', 'delivered', 250],
      ['b@example.com', 'delivered', 250],
      ['c@example.com', 'failed', 554],
      ['d@example.com', 'failed', 554],
      ['e@example.com', 'failed', null],
      ['f@example.com', 'failed', null],
    ]);
    assert.match(rows[4].last_reply!, /not attempted: batch 0 was refused permanently \(554 .*Rejected as spam\) and continueOnError is false/);
    assert.equal(message(relay, id).state, 'failed');
    // one row for the attempt, with the reply that refused the batch, not the first transaction's 250
    assert.deepEqual(
      attempts(relay, id).map((a) => [a.outcome, a.code]),
      [['partial', 554]],
    );
  });

  test('continueOnError=false: a follow-up transaction whose one recipient is refused at RCPT does not stop the message', async () => {
    // one recipient per transaction: whether b is refused alone or beside a must not matter
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onRcptTo(address, session, cb) {
        if (session.envelope.rcptTo.length >= 1) return cb(Object.assign(new Error('4.5.3 Error: too many recipients'), { responseCode: 452 }));
        if (address.address === 'b@example.com') return cb(Object.assign(new Error('5.1.1 No such user'), { responseCode: 550 }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await relayTo(upstream.port, { batchSize: 2, batchDelay: 0, continueOnError: false });
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(
      recipients(relay, id).map((r) => [r.address, r.status, r.last_code]),
      [
        ['a@example.com', 'delivered', 250],
        ['b@example.com', 'failed', 550],
        ['c@example.com', 'delivered', 250],
      ],
    );
    assert.deepEqual(attempts(relay, id).map((a) => [a.batch, a.outcome, a.code]), [
      [0, 'partial', 250],
      [1, 'delivered', 250],
    ]);
  });

  test('a failed message is logged as failed also when its export cannot be written', async () => {
    const { config } = await refusingUpstream();
    const log = capturedLog('info');
    const relay = await startTestRelay(config, { startDelivery: false, logger: log.logger });
    cleanup.push(() => relay.stop());
    // emailsDir/failed, made and checked at the start, is replaced by a file while the relay runs
    fs.rmSync(path.join(config.emailsDir, 'failed'), { recursive: true });
    fs.writeFileSync(path.join(config.emailsDir, 'failed'), 'not a directory');
    const id = await queue(relay, ['nobody@example.com']);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'failed');
    const events = log.entries().filter((e) => e.queueId === id);
    assert.deepEqual(
      events.filter((e) => e.event === 'delivery.failed').map((e) => e.export),
      [null],
    );
    assert.equal(events.filter((e) => e.event === 'delivery.export_failed').length, 1);
  });

  test('the export of mail delivered after a retry is removed, and one left by a crash before its removal at the next start; both logged', async () => {
    const { upstream, config } = await refusingUpstream();
    const log = capturedLog('info');
    const first = await startTestRelay(config, { startDelivery: false, logger: log.logger });
    cleanup.push(() => first.stop());
    const retried = await queue(first, ['later@example.com']);
    const stillFailed = await queue(first, ['nobody@example.com']);
    await first.delivery.runOnce();
    const file = (id: string) => path.join(config.emailsDir, 'failed', `${id}.json`);
    const leftover = fs.readFileSync(file(retried));

    upstream.rcptReply = (address) => (address.startsWith('nobody') ? { code: 550, message: '5.1.1 No such user' } : undefined);
    assert.equal(await writeDirect(first, (db) => retryMessage(db, retried, Date.now(), 0)), 'requeued');
    await first.delivery.runOnce();
    assert.equal(message(first, retried).state, 'delivered');
    assert.ok(!fs.existsSync(file(retried)), 'removed once delivered');
    assert.deepEqual(log.entries().filter((e) => e.event === 'delivery.export_removed').map((e) => e.queueId), [retried]);
    await first.stop();
    // What a crash between the commit of the delivery and the removal of the export leaves.
    fs.writeFileSync(file(retried), leftover);
    const foreign = file('0123456789ABCDEF0123');
    fs.writeFileSync(foreign, '{}\n');

    const again = capturedLog('info');
    const second = await startTestRelay(config, { logger: again.logger });
    cleanup.push(() => second.stop());
    await waitFor(() => again.entries().some((e) => e.event === 'delivery.exports_removed'), 10_000, 'the stale export to be removed');
    const atStart = again.entries().filter((e) => e.event === 'delivery.exports_removed');
    assert.deepEqual(atStart.map((e) => [e.count, e.ids]), [[1, [retried]]]);
    assert.ok(!fs.existsSync(file(retried)));
    assert.ok(failedExportExists(second, stillFailed), 'the export of mail still failed stays');
    assert.ok(fs.existsSync(foreign), 'a file of a message this database does not hold stays');
  });

  test("a stop during the start's walk for exports of delivered mail ends it: what it removed before is said", async () => {
    const relay = await startTestRelay({ forwardSMTP: false }, { startDelivery: false });
    cleanup.push(() => relay.stop());
    const ids = [await queue(relay, ['one@example.com']), await queue(relay, ['two@example.com'])];
    await relay.delivery.runOnce();
    assert.deepEqual(ids.map((id) => message(relay, id).state), ['delivered', 'delivered']);
    // what crashes between the commits of the deliveries and the removal of the exports leave
    const file = (id: string) => path.join(relay.config.emailsDir, 'failed', `${id}.json`);
    for (const id of ids) fs.writeFileSync(file(id), '{}\n');
    const log = capturedLog('info');
    let looks = 0;
    await removeDeliveredExports({
      sqlite: relay.store.sqlite,
      emailsDir: relay.config.emailsDir,
      log: log.logger,
      // the stop comes once the first file has been looked at
      stopping: () => looks++ > 0,
      exportFailed: async () => undefined,
    });
    const removed = ids.filter((id) => !fs.existsSync(file(id)));
    assert.equal(removed.length, 1, 'the walk ended at the stop');
    assert.deepEqual(
      log.entries().filter((e) => e.event === 'delivery.exports_removed').map((e) => [e.count, e.ids]),
      [[1, removed]],
    );
  });

  test('an export that cannot be removed once its message is delivered is logged, at the delivery and at the next start', async () => {
    const { upstream, config } = await refusingUpstream();
    const log = capturedLog('info');
    const first = await startTestRelay(config, { startDelivery: false, logger: log.logger });
    const id = await queue(first, ['later@example.com']);
    await first.delivery.runOnce();
    // a path unlink refuses (EISDIR) stands where the export was, as an unwritable directory would
    const file = path.join(config.emailsDir, 'failed', `${id}.json`);
    fs.rmSync(file);
    fs.mkdirSync(path.join(file, 'in-the-way'), { recursive: true });

    upstream.rcptReply = () => undefined;
    assert.equal(await writeDirect(first, (db) => retryMessage(db, id, Date.now(), 0)), 'requeued');
    await first.delivery.runOnce();
    assert.equal(message(first, id).state, 'delivered');
    const atDelivery = log.entries().filter((e) => e.event === 'delivery.export_not_removed');
    assert.deepEqual(atDelivery.map((e) => [e.queueId, e.level]), [[id, 40]]);
    assert.match(String(atDelivery[0].err), /EISDIR|EPERM/);
    assert.equal(log.entries().filter((e) => e.event === 'delivery.export_removed').length, 0);
    await first.stop();

    const again = capturedLog('info');
    const second = await startTestRelay(config, { logger: again.logger });
    cleanup.push(() => second.stop());
    await waitFor(() => again.entries().some((e) => e.event === 'delivery.exports_not_removed'), 10_000, 'the export that stays to be logged');
    const atStart = again.entries().find((e) => e.event === 'delivery.exports_not_removed')!;
    assert.deepEqual([atStart.count, atStart.ids, atStart.level], [1, [id], 40]);
    assert.ok(fs.existsSync(file));
  });

  test('an export that the delivery, deletion or next failure of its message overtakes while it is written does not stay as it was', async () => {
    const { config } = await refusingUpstream();
    const relay = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => relay.stop());
    const delivered = await queue(relay, ['later@example.com']);
    const deleted = await queue(relay, ['gone@example.com']);
    const retried = await queue(relay, ['again@example.com']);
    const failedAgain = await queue(relay, ['twice@example.com']);
    await relay.delivery.runOnce();
    const dir = path.join(config.emailsDir, 'failed');
    // Another connection changes each message between the export's read and its write, as a
    // retry and a delivery (or a delete, or a second failure) committed meanwhile would.
    const other = new Database(config.databasePath);
    try {
      const exports = [delivered, deleted, retried, failedAgain].map((id) => exportFailedMessage(relay.store.sqlite, dir, id, Date.now()));
      other.prepare("UPDATE messages SET state = 'delivered' WHERE id = ?").run(delivered);
      other.prepare('DELETE FROM messages WHERE id = ?').run(deleted);
      other.prepare("UPDATE messages SET state = 'queued' WHERE id = ?").run(retried);
      other.prepare("UPDATE messages SET finished_at = finished_at + 60000, last_error = 'failed again' WHERE id = ?").run(failedAgain);
      const files = await Promise.all(exports);
      assert.deepEqual(files, [undefined, undefined, path.join(dir, `${retried}.json`), path.join(dir, `${failedAgain}.json`)]);
    } finally {
      other.close();
    }
    const again = JSON.parse(fs.readFileSync(path.join(dir, `${failedAgain}.json`), 'utf8'));
    assert.deepEqual([again.failedAt, again.lastError], [new Date(message(relay, failedAgain).finished_at!).toISOString(), 'failed again'], 'the export of the later failure');
    assert.ok(!fs.existsSync(path.join(dir, `${delivered}.json`)), 'no export of delivered mail');
    assert.ok(!fs.existsSync(path.join(dir, `${deleted}.json`)), 'no export of deleted mail');
    assert.ok(fs.existsSync(path.join(dir, `${retried}.json`)), 'retried mail keeps its export until it is delivered');
  });

  test('an export overtaken by a further failure at each of its first two writes is written a third time, of the last failure', async () => {
    const { config } = await refusingUpstream();
    const relay = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['thrice@example.com']);
    await relay.delivery.runOnce();
    const dir = path.join(config.emailsDir, 'failed');
    // Another connection records a further failure right after each of the export's first two
    // reads of the message (each in a transaction of its own), as two retries that failed again
    // while it was written would.
    const other = new Database(config.databasePath);
    let reads = 0;
    const sqlite = new Proxy(relay.store.sqlite, {
      get(target, key) {
        const value = Reflect.get(target, key, target);
        if (key !== 'transaction') return typeof value === 'function' ? value.bind(target) : value;
        return (fn: () => unknown) => {
          const run = target.transaction(fn);
          return () => {
            const result = run();
            if (++reads <= 2) other.prepare('UPDATE messages SET finished_at = finished_at + 60000, last_error = ? WHERE id = ?').run(`failed again ${reads}`, id);
            return result;
          };
        };
      },
    });
    try {
      assert.equal(await exportFailedMessage(sqlite, dir, id, Date.now()), path.join(dir, `${id}.json`));
    } finally {
      other.close();
    }
    assert.equal(reads, 3, 'written three times');
    const written = JSON.parse(fs.readFileSync(path.join(dir, `${id}.json`), 'utf8'));
    assert.deepEqual([written.failedAt, written.lastError], [new Date(message(relay, id).finished_at!).toISOString(), 'failed again 2'], 'the export of the last failure');
  });

  test('continueOnError=false: a permanently refused batch stops the later batches, whose recipients fail saying why', async () => {
    const log = capturedLog('info');
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 0, continueOnError: false }, log.logger);
    upstream.dataReply = () => ({ code: 554, message: '5.7.1 Policy rejection' });
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com', 'e@example.com']);
    await relay.delivery.runOnce();
    clock.advance(3_600_000);
    await relay.delivery.runOnce();
    assert.equal(upstream.refused.length, 1, 'only the first batch reached the upstream');
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.status, r.attempts]), [
      ['failed', 1],
      ['failed', 1],
      ['failed', 0],
      ['failed', 0],
      ['failed', 0],
    ]);
    for (const r of rows.slice(2)) assert.match(r.last_reply!, /not attempted: batch 0 was refused permanently \(554 .*Policy rejection\) and continueOnError is false/);
    assert.equal(message(relay, id).state, 'failed');
    assert.equal(attempts(relay, id).length, 1);
    assert.match(readFailedExport(relay, id).recipients[4].lastReply!, /continueOnError is false/);
    // the message's failure is the refusal that ended it, and its attempt's line counts the
    // recipients of the later batches with this batch's own
    const ended = /^batch 0 was refused permanently \(554 .*Policy rejection\) and continueOnError is false$/;
    assert.match(message(relay, id).last_error!, ended);
    const attempt = log.entries().find((e) => e.event === 'delivery.attempt' && e.queueId === id);
    assert.deepEqual([attempt?.failed, attempt?.notAttempted, attempt?.state], [2, 3, 'failed']);
    assert.match(String(log.entries().find((e) => e.event === 'delivery.failed' && e.queueId === id)?.reason), ended);
  });

  test('continueOnError=false: a message of one batch, refused, names the recipient that failed: nothing was stopped', async () => {
    const log = capturedLog('info');
    const { relay, upstream } = await setup({ batchSize: 2, continueOnError: false }, log.logger);
    upstream.dataReply = () => ({ code: 554, message: '5.7.1 Policy rejection' });
    const id = await queue(relay, ['a@example.com', 'b@example.com']);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'failed');
    assert.equal(message(relay, id).last_error, 'b@example.com: 554 5.7.1 Policy rejection');
    const attempt = log.entries().find((e) => e.event === 'delivery.attempt' && e.queueId === id);
    assert.deepEqual([attempt?.failed, attempt?.notAttempted], [2, undefined]);
  });

  test('continueOnError=false: a message of one batch whose DATA is refused, with a recipient deferred at RCPT, names the refusal that stopped it', async () => {
    const log = capturedLog('info');
    const { relay, upstream } = await setup({ batchSize: 2, continueOnError: false }, log.logger);
    upstream.rcptReply = (a) => (a === 'a@example.com' ? { code: 450, message: '4.2.1 Busy' } : undefined);
    upstream.dataReply = () => ({ code: 554, message: '5.7.1 Policy rejection' });
    const id = await queue(relay, ['a@example.com', 'b@example.com']);
    await relay.delivery.runOnce();
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status]), [['a@example.com', 'failed'], ['b@example.com', 'failed']]);
    assert.match(rows[0].last_reply!, /^not attempted again: batch 0 was refused permanently \(554 .*Policy rejection\) and continueOnError is false; last reply: /);
    // a was stopped by the refusal, not refused itself: no later batch is left, and still the
    // message names that refusal, not b's reply
    const ended = /^batch 0 was refused permanently \(554 .*Policy rejection\) and continueOnError is false$/;
    assert.equal(message(relay, id).state, 'failed');
    assert.match(message(relay, id).last_error!, ended);
    assert.match(String(log.entries().find((e) => e.event === 'delivery.failed' && e.queueId === id)?.reason), ended);
  });

  test('continueOnError=false: a batch whose every RCPT is refused with 5xx stops the later batches too', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 0, continueOnError: false });
    upstream.rcptReply = (a) => (a === 'a@example.com' || a === 'b@example.com' ? { code: 550, message: '5.1.1 No such user' } : undefined);
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com']);
    await relay.delivery.runOnce();
    clock.advance(3_600_000);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.rcpts, ['a@example.com', 'b@example.com'], 'the second batch never reached the upstream');
    assert.equal(upstream.accepted.length + upstream.refused.length, 0);
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status, r.attempts, r.last_code]), [
      ['a@example.com', 'failed', 1, 550],
      ['b@example.com', 'failed', 1, 550],
      ['c@example.com', 'failed', 0, null],
      ['d@example.com', 'failed', 0, null],
    ]);
    for (const r of rows.slice(2)) assert.match(r.last_reply!, /^not attempted: batch 0 was refused permanently \(550 .*\) and continueOnError is false/);
    assert.equal(message(relay, id).state, 'failed');
    assert.deepEqual(attempts(relay, id).map((a) => [a.batch, a.outcome]), [[0, 'failed']]);
  });

  /**
   * Queues a message to a, b, c and d (batches of 2, 120 s apart), runs delivery, calls `then`
   * (the upstream changes its replies), and runs it twice more, 120 s apart each.
   */
  async function deliverInRounds(relay: Relay, clock: ManualClock, then: () => void): Promise<string> {
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com']);
    await relay.delivery.runOnce();
    then();
    for (let round = 0; round < 2; round++) {
      clock.advance(120_000);
      await relay.delivery.runOnce();
    }
    return id;
  }

  /** [batch, recipients] of each attempt, in order. */
  const sent = (relay: Relay, id: string) => attempts(relay, id).map((a) => [a.batch, JSON.parse(a.recipients) as string[]]);
  const BUSY = { code: 450, message: '4.2.1 Busy' };
  const NO_SUCH_USER = { code: 550, message: '5.1.1 No such user' };

  test('a retry goes out with the recipients of its own batch only, after the batches not tried yet', async () => {
    // b is deferred once; its retry is due (60 s) before the next batch (batchDelay 120 s)
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 120_000 });
    upstream.rcptReply = (a) => (a === 'b@example.com' ? BUSY : undefined);
    const id = await deliverInRounds(relay, clock, () => {
      upstream.rcptReply = () => undefined;
    });
    assert.deepEqual(sent(relay, id), [
      [0, ['a@example.com', 'b@example.com']],
      [1, ['c@example.com', 'd@example.com']],
      [0, ['b@example.com']],
    ]);
    const started = attempts(relay, id).map((a) => a.started_at);
    assert.deepEqual(started.map((t) => t - started[0]), [0, 120_000, 240_000]);
    assert.equal(message(relay, id).state, 'delivered');
  });

  test('a retry that keeps coming due within batchDelay does not hold back the batches after it', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 120_000, retry: { initialDelay: 60, maxDelay: 60, maxAttempts: 6 } });
    upstream.rcptReply = (a) => (a === 'b@example.com' ? BUSY : undefined);
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com', 'e@example.com']);
    await relay.delivery.runOnce();
    for (let round = 0; round < 2; round++) {
      clock.advance(120_000);
      await relay.delivery.runOnce();
    }
    assert.deepEqual(sent(relay, id).map(([batch]) => batch), [0, 1, 2]);
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['delivered', 'pending', 'delivered', 'delivered', 'delivered']);
  });

  test('continueOnError=false: a retry whose every RCPT is refused does not stop the message when its batch delivered to others', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 120_000, continueOnError: false });
    upstream.rcptReply = (a) => (a === 'b@example.com' ? BUSY : undefined);
    const id = await deliverInRounds(relay, clock, () => {
      upstream.rcptReply = (a) => (a === 'b@example.com' ? NO_SUCH_USER : a === 'c@example.com' ? BUSY : undefined);
    });
    assert.deepEqual(sent(relay, id), [
      [0, ['a@example.com', 'b@example.com']],
      [1, ['c@example.com', 'd@example.com']],
      [0, ['b@example.com']],
    ]);
    // c, deferred in its own batch, waits for its retry: the message was not stopped
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status, r.last_code]), [
      ['a@example.com', 'delivered', 250],
      ['b@example.com', 'failed', 550],
      ['c@example.com', 'pending', 450],
      ['d@example.com', 'delivered', 250],
    ]);
  });

  test('continueOnError=false: a retry whose every RCPT is refused stops the message when its batch-mates failed (none delivered)', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 120_000, continueOnError: false });
    upstream.rcptReply = (a) => (a === 'a@example.com' ? NO_SUCH_USER : a === 'b@example.com' ? BUSY : undefined);
    const id = await deliverInRounds(relay, clock, () => {
      upstream.rcptReply = (a) => (a === 'a@example.com' || a === 'b@example.com' ? NO_SUCH_USER : a === 'c@example.com' ? BUSY : undefined);
    });
    assert.deepEqual(sent(relay, id), [
      [0, ['a@example.com', 'b@example.com']],
      [1, ['c@example.com', 'd@example.com']],
      [0, ['b@example.com']],
    ]);
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status]), [
      ['a@example.com', 'failed'],
      ['b@example.com', 'failed'],
      ['c@example.com', 'failed'],
      ['d@example.com', 'delivered'],
    ]);
    assert.match(rows[2].last_reply!, /^not attempted again: batch 0 was refused permanently/);
  });

  test('continueOnError=false: a retry whose every RCPT is refused stops the message when its batch delivered to none', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 120_000, continueOnError: false });
    upstream.rcptReply = (a) => (a === 'a@example.com' || a === 'b@example.com' || a === 'c@example.com' ? BUSY : undefined);
    const id = await deliverInRounds(relay, clock, () => {
      upstream.rcptReply = (a) => (a === 'a@example.com' || a === 'b@example.com' ? NO_SUCH_USER : a === 'c@example.com' ? BUSY : undefined);
    });
    assert.deepEqual(sent(relay, id), [
      [0, ['a@example.com', 'b@example.com']],
      [1, ['c@example.com', 'd@example.com']],
      [0, ['a@example.com', 'b@example.com']],
    ]);
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status, r.attempts]), [
      ['a@example.com', 'failed', 2],
      ['b@example.com', 'failed', 2],
      ['c@example.com', 'failed', 1],
      ['d@example.com', 'delivered', 1],
    ]);
    assert.match(rows[2].last_reply!, /^not attempted again: batch 0 was refused permanently \(550 .*\) and continueOnError is false; last reply: 450/);
  });

  test('continueOnError=false: a first try whose every RCPT is refused stops the message, also in a batch a larger batchSize gave delivered recipients', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 2, batchDelay: 120_000, continueOnError: false });
    upstream.rcptReply = (a) => (a === 'c@example.com' || a === 'd@example.com' ? NO_SUCH_USER : undefined);
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com', 'e@example.com']);
    await relay.delivery.runOnce();
    // as after a restart with a larger batchSize: a and b, delivered, are now in c and d's batch
    relay.config.batchSize = 4;
    clock.advance(120_000);
    await relay.delivery.runOnce();
    assert.deepEqual(sent(relay, id), [
      [0, ['a@example.com', 'b@example.com']],
      [0, ['c@example.com', 'd@example.com']],
    ]);
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => r.status), ['delivered', 'delivered', 'failed', 'failed', 'failed']);
    assert.match(rows[4].last_reply!, /^not attempted: batch 0 was refused permanently/);
  });

  test('continueOnError=false: a retry whose follow-up transaction is refused at DATA stops the message, though its batch delivered before', async () => {
    // the upstream takes two recipients per transaction, and is busy for all but a at first
    let busy = true;
    const upstream = await startScriptedUpstream({
      onRcptTo(address, session, cb) {
        if (busy && address.address !== 'a@example.com') return cb(Object.assign(new Error('4.2.1 Busy'), { responseCode: 450 }));
        if (session.envelope.rcptTo.length >= 2) return cb(Object.assign(new Error('4.5.3 Too many recipients'), { responseCode: 452 }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    upstream.dataReply = (t) => (t.to.includes('d@example.com') ? { code: 554, message: '5.7.1 Rejected as spam' } : undefined);
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 4, batchDelay: 120_000, continueOnError: false, retry: { initialDelay: 60 } },
      { clock, startDelivery: false, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com', 'e@example.com']);
    await relay.delivery.runOnce(); // a delivered; b, c and d deferred
    clock.advance(120_000);
    await relay.delivery.runOnce(); // batch 1: e deferred
    busy = false;
    clock.advance(120_000);
    await relay.delivery.runOnce(); // b and c delivered, d refused at DATA in the follow-up transaction
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status, r.last_code]), [
      ['a@example.com', 'delivered', 250],
      ['b@example.com', 'delivered', 250],
      ['c@example.com', 'delivered', 250],
      ['d@example.com', 'failed', 554],
      ['e@example.com', 'failed', 450],
    ]);
    assert.match(rows[4].last_reply!, /^not attempted again: batch 0 was refused permanently \(554 .*Rejected as spam\)/);
  });

  test('a recipient refused at RCPT keeps its own reply when DATA is then refused or deferred', async () => {
    const { relay, upstream } = await setup();
    upstream.rcptReply = (a) =>
      a.startsWith('nouser') ? { code: 550, message: '5.1.1 No such user' } : a.startsWith('full') ? { code: 452, message: '4.2.2 Mailbox full' } : undefined;
    upstream.dataReply = (t) =>
      t.to.includes('grey@example.com') ? { code: 451, message: '4.7.1 Greylisted, try again' } : { code: 554, message: '5.7.1 Rejected as spam' };
    const greylisted = await queue(relay, ['grey@example.com', 'nouser@example.com']);
    const spam = await queue(relay, ['spam@example.com', 'full@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, greylisted).map((r) => [r.address, r.status, r.last_code, r.temporary]), [
      ['grey@example.com', 'pending', 451, 1],
      ['nouser@example.com', 'failed', 550, 0],
    ]);
    assert.match(recipients(relay, greylisted)[1].last_reply!, /No such user/);
    assert.deepEqual(recipients(relay, spam).map((r) => [r.address, r.status, r.last_code, r.temporary]), [
      ['spam@example.com', 'failed', 554, 0],
      ['full@example.com', 'pending', 452, 1],
    ]);
    assert.equal(attempts(relay, spam)[0].code, 554);
  });

  test('continueOnError=false: a recipient deferred in an earlier batch fails too, keeping its own last reply', async () => {
    const { relay, upstream } = await setup({ batchSize: 2, batchDelay: 0, continueOnError: false });
    upstream.rcptReply = (a) => (a === 'b@example.com' ? { code: 450, message: '4.2.1 Mailbox busy' } : undefined);
    upstream.dataReply = (t) => (t.to.includes('c@example.com') ? { code: 554, message: '5.7.1 Policy rejection' } : undefined);
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com', 'd@example.com', 'e@example.com']);
    await relay.delivery.runOnce();
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status, r.attempts, r.last_code]), [
      ['a@example.com', 'delivered', 1, 250],
      ['b@example.com', 'failed', 1, 450],
      ['c@example.com', 'failed', 1, 554],
      ['d@example.com', 'failed', 1, 554],
      ['e@example.com', 'failed', 0, null],
    ]);
    assert.match(rows[1].last_reply!, /^not attempted again: batch 1 was refused permanently \(554 .*Policy rejection\) and continueOnError is false; last reply: 450 .*Mailbox busy/);
    assert.match(rows[4].last_reply!, /^not attempted: batch 1 was refused permanently/);
    assert.equal(message(relay, id).state, 'failed');
    // the message reports the refusal that ended it, not a recipient that was never tried
    assert.equal(message(relay, id).last_error, 'batch 1 was refused permanently (554 5.7.1 Policy rejection) and continueOnError is false');
  });

  test('continueOnError=false: the attempt that fails a recipient deferred in its own batch records it as failed', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.rcptReply = (a) => (a === 'busy@example.com' ? { code: 450, message: '4.2.1 Mailbox busy' } : undefined);
    upstream.dataReply = () => ({ code: 554, message: '5.7.1 Policy rejection' });
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 2, continueOnError: false },
      { clock: new ManualClock(), startDelivery: false, logger: log.logger, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['a@example.com', 'busy@example.com', 'c@example.com']);
    await relay.delivery.runOnce();
    const rows = recipients(relay, id);
    assert.deepEqual(rows.map((r) => [r.address, r.status, r.attempts]), [
      ['a@example.com', 'failed', 1],
      ['busy@example.com', 'failed', 1],
      ['c@example.com', 'failed', 0],
    ]);
    assert.match(rows[1].last_reply!, /^not attempted again: batch 0 was refused permanently \(554 .*\) and continueOnError is false; last reply: 450 4\.2\.1 Mailbox busy/);
    assert.deepEqual(attempts(relay, id).map((a) => [a.outcome, a.code]), [['failed', 554]]);
    const line = log.entries().find((e) => e.queueId === id && e.event === 'delivery.attempt');
    assert.deepEqual([line?.outcome, line?.failed, line?.deferred, line?.state], ['failed', 2, 0, 'failed']);
    const listed = (line?.notDelivered ?? []) as Array<{ to: string; status: string }>;
    assert.deepEqual(listed.map((r) => [r.to, r.status]), [['busy@example.com', 'failed']]);
  });

  test('continueOnError=false: a recipient of a later batch whose try got no reply (cut off by a kill -9) fails "not attempted", with that reply', async () => {
    const { clock, relay, upstream } = await setup({ batchSize: 1, batchDelay: 0, continueOnError: false });
    upstream.rcptReply = (address) => (address === 'a@example.com' ? { code: 550, message: '5.1.1 No such user' } : undefined);
    const id = await queue(relay, ['a@example.com', 'b@example.com']);
    // b's batch was claimed once (a claim counts the try) and the process died before any reply:
    // one try, no reply, waiting for its retry
    await writeDirect(relay, (db) =>
      db.prepare("UPDATE recipients SET attempts = 1, next_attempt_at = ? WHERE message_id = ? AND address = 'b@example.com'").run(clock.now() + 3_600_000, id),
    );
    await relay.delivery.runOnce();
    const rows = recipients(relay, id);
    assert.deepEqual(
      rows.map((r) => [r.address, r.status, r.attempts]),
      [
        ['a@example.com', 'failed', 1],
        ['b@example.com', 'failed', 1],
      ],
    );
    assert.match(rows[1].last_reply ?? '(none)', /^not attempted: batch 0 was refused permanently \(550 .*No such user\) and continueOnError is false$/);
  });

  test('a batch sent in several transactions: each recipient keeps the time of the transaction that delivered it', async () => {
    const clock = new ManualClock();
    const perTransaction = new Map<string, number>();
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onMailFrom(_address, session, cb) {
        perTransaction.set(session.id, 0);
        clock.advance(1000); // each transaction a second after the one before
        cb();
      },
      // one recipient per transaction
      onRcptTo(address, session, cb) {
        upstream.rcpts.push(address.address);
        const n = (perTransaction.get(session.id) ?? 0) + 1;
        perTransaction.set(session.id, n);
        if (n > 1) return cb(Object.assign(new Error('4.5.3 Error: too many recipients'), { responseCode: 452 }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 3, batchDelay: 0 },
      { clock, startDelivery: false, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(
      upstream.accepted.map((t) => t.to),
      [['a@example.com'], ['b@example.com'], ['c@example.com']],
      'control: three transactions',
    );
    const rows = recipients(relay, id);
    assert.deepEqual(
      rows.map((r) => r.status),
      ['delivered', 'delivered', 'delivered'],
    );
    const [a, b, c] = rows.map((r) => r.updated_at);
    assert.ok(a < b && b < c, `updated_at ${[a, b, c].join(', ')}`);
  });

  test('continueOnError=true (default): later batches still go after a refused one', async () => {
    const { relay, upstream } = await setup({ batchSize: 2, batchDelay: 0 });
    let first = true;
    upstream.dataReply = () => {
      const reply = first ? { code: 554, message: '5.7.1 Policy rejection' } : undefined;
      first = false;
      return reply;
    };
    const id = await queue(relay, ['a@example.com', 'b@example.com', 'c@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['failed', 'failed', 'delivered']);
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['c@example.com']]);
    assert.equal(message(relay, id).state, 'failed');
  });

  test('every RCPT refused with 5xx → all failed; a mix of 4xx and 5xx keeps the 4xx ones pending', async () => {
    const { relay, upstream } = await setup();
    upstream.rcptReply = (a) =>
      a.startsWith('perm') ? { code: 550, message: '5.1.1 Unknown user' } : a.startsWith('temp') ? { code: 451, message: '4.3.0 Try later' } : undefined;
    const allBad = await queue(relay, ['perm1@example.com', 'perm2@example.com']);
    const mixed = await queue(relay, ['perm3@example.com', 'temp1@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, allBad).map((r) => [r.status, r.last_code]), [
      ['failed', 550],
      ['failed', 550],
    ]);
    assert.equal(message(relay, allBad).state, 'failed');
    assert.deepEqual(recipients(relay, mixed).map((r) => [r.status, r.last_code, r.temporary]), [
      ['failed', 550, 0],
      ['pending', 451, 1],
    ]);
    assert.equal(message(relay, mixed).state, 'queued');
    assert.equal(attempts(relay, mixed)[0].outcome, 'deferred');
    assert.equal(upstream.accepted.length, 0);
  });
});

describe('envelope details', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  test('addresses nodemailer rewrites (upper-case or IDN domain) are matched back to their recipients; <> stays <>', async () => {
    const clock = new ManualClock();
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port },
      { clock, startDelivery: false, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    // A raw session, so the relay stores the addresses exactly as a client wrote them.
    const client = await SmtpClient.connect(relay.smtpPort);
    await client.read();
    await client.send('EHLO client.test');
    assert.match(await client.send('MAIL FROM:<> SMTPUTF8'), /^250 /);
    for (const rcpt of ['Mixed@EXAMPLE.COM', 'user@bücher.example']) assert.match(await client.send(`RCPT TO:<${rcpt}>`), /^250 /);
    assert.match(await client.send('DATA'), /^354/);
    const reply = await client.send('Subject: bounce\r\n\r\nnull sender\r\n.');
    client.close();
    const id = queuedId(reply);
    assert.deepEqual(recipients(relay, id).map((r) => r.address), ['Mixed@EXAMPLE.COM', 'user@bücher.example']);
    await relay.delivery.runOnce();
    // nodemailer lower-cases and punycodes the domains (smtp-server shows IDN domains decoded again),
    // so the envelope is ASCII (the client's SMTPUTF8 goes upstream all the same).
    assert.deepEqual(upstream.accepted.map((t) => [t.from, t.to]), [['', ['Mixed@example.com', 'user@bücher.example']]]);
    assert.ok(upstream.rcpts.includes('Mixed@example.com'));
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['delivered', 'delivered'], 'not deferred for want of a matching reply');
    assert.equal(message(relay, id).state, 'delivered');
  });

  test('address literals ([192.0.2.1], [IPv6:...]) are taken, forwarded as written and matched back to their recipients', async () => {
    // a raw upstream: it records the addresses as they came on the wire
    const upstream = await startMisbehavingUpstream();
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port }, { startDelivery: false, random: NO_JITTER });
    cleanup.push(() => relay.stop());
    const to = ['b@[192.0.2.1]', 'c@[IPv6:2001:DB8::1]'];
    const client = await openSession(relay.smtpPort, 'device@[198.51.100.7]', to);
    assert.match(await client.send('RCPT TO:<d@[192.0.2.300]>'), /^501 5\.1\.3 /, 'not an IPv4 address');
    assert.match(await client.send('RCPT TO:<d@[IPv6:192.0.2.1]>'), /^501 5\.1\.3 /, 'not an IPv6 address');
    assert.match(await client.send('DATA'), /^354/);
    const id = queuedId(await client.send('Subject: literal\r\n\r\nfrom a device\r\n.'));
    client.close();
    await relay.delivery.runOnce();
    // smtp-server lower-cases a domain as it reads it (the IPv6 tag keeps its spelling, RFC 5321's)
    const stored = ['b@[192.0.2.1]', 'c@[IPv6:2001:db8::1]'];
    assert.deepEqual(upstream.transactions.map((t) => [t.from, t.to]), [['device@[198.51.100.7]', stored]]);
    assert.deepEqual(recipients(relay, id).map((r) => [r.address, r.status]), [[stored[0], 'delivered'], [stored[1], 'delivered']]);
    assert.equal(message(relay, id).state, 'delivered');
  });
});

test('a recipient the upstream named neither accepted nor rejected is deferred, never taken as delivered', () => {
  const result = resultFromNodemailer('x:25', ['a@example.com', 'b@example.com', 'c@example.com'], {
    info: { accepted: ['a@example.com'], rejected: ['c@example.com'], rejectedErrors: [], response: '250 2.0.0 Ok' },
  });
  assert.deepEqual(
    result.recipients.map((r) => [r.verdict, r.reply]),
    [
      ['delivered', '250 2.0.0 Ok'],
      ['deferred', 'the upstream gave no reply for this recipient'],
      ['deferred', 'rejected by the upstream without a reply'],
    ],
  );
});

test("an attempt's outcome carries each recipient's attempts as its claim counted them, whatever becomes of the recipient", () => {
  const counted = [1, 2, 3, 2];
  const recipients = ['delivered', 'failed', 'gave-up', 'deferred'].map((address, seq) => ({ seq, address, attempts: counted[seq] }));
  const claim = { messageId: 'M', token: 'T', batch: 0, deliveredBefore: false, mailFrom: 'a@example.com', smtpUtf8: false, raw: null, receivedAt: 0, claims: 1, leaseExpiresAt: 1, recipients };
  const verdicts = ['delivered', 'failed', 'deferred', 'deferred'] as const;
  const result: BatchResult = {
    upstream: 'x:25',
    code: 250,
    reply: '250 ok',
    recipients: verdicts.map((verdict) => ({ verdict, code: verdict === 'failed' ? 550 : 250, reply: 'r' })),
    permanentFailure: false,
    refusedWhole: false,
  };
  const ctx = { now: 1000, startedAt: 0, durationMs: 1, retry: { maxAttempts: 3, initialDelay: 1, maxDelay: 10, maxAge: 3600 }, batchDelayMs: 0, continueOnError: true, eraseRawOnDelivered: false, random: () => 0.5 };
  const planned = planCompletion(claim, result, ctx);
  assert.deepEqual(planned.recipients.map((r) => [r.status, r.attempts]), [['delivered', 1], ['failed', 2], ['failed', 3], ['pending', 2]]);
  // a permanent refusal with continueOnError=false fails the deferred recipient too
  const stopped = planCompletion(claim, { ...result, permanentFailure: true, refusedWhole: true }, { ...ctx, continueOnError: false, retry: { ...ctx.retry, maxAttempts: 10 } });
  assert.deepEqual(stopped.recipients.map((r) => [r.status, r.attempts]), [['delivered', 1], ['failed', 2], ['failed', 3], ['failed', 2]]);
  assert.match(stopped.recipients[3].reply, /^not attempted again/);
});

test("an export's failedAt is looked for in its first 4 MiB: further down, the export counts as outdated (written again, it has failedAt at the top)", async () => {
  const dir = tempDir();
  const finishedAt = Date.UTC(2026, 0, 2, 3, 4, 5, 678);
  // the layout of earlier versions: failedAt after the recipients, here a list of `bytes` bytes
  const current = async (bytes: number) => {
    const file = path.join(dir, `${bytes}.json`);
    const recipients = `  "recipients": ["${'r'.repeat(bytes)}"],`;
    fs.writeFileSync(file, `{\n  "id": "M1",\n${recipients}\n  "failedAt": "${isoTime(finishedAt)}",\n  "raw": ""\n}\n`);
    return { at: fs.readFileSync(file, 'latin1').indexOf('\n  "failedAt"'), current: await exportIsCurrent(file, finishedAt) };
  };
  assert.deepEqual([(await current(Math.round(3.9 * 1024 * 1024))).current, (await current(Math.round(4.1 * 1024 * 1024))).current], [true, false]);
  // found also where its line straddles two of the 16 KiB reads
  assert.deepEqual(await current(16 * 1024 - 10 - 37), { at: 16 * 1024 - 10, current: true });
});
