import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import nodemailer from 'nodemailer';
import { ManualClock } from '../manual-clock.js';
import { openConnection } from '../../src/store/db.js';
import { storeMetrics } from '../../src/store/queries.js';
import { capturedLog, closedPort, holdWriteLock, sendMail, spawnRelay, startHoldingUpstream, startTestRelay, startUpstream, tempDir, type Upstream, waitFor, whileImmutable } from '../helpers.js';
import { call, upstreamOutage } from './fixtures.js';

interface Health {
  status: string;
  timestamp: string;
  details: {
    disk_space_available_mb: number | null;
    queued_emails: number | null;
    deferred_emails: number | null;
    failed_emails: number | null;
    total_emails_processed: number | null;
    success_rate: number | null;
    oldest_queued_age_seconds: number | null;
    queue_size_limit: number;
    database: string;
    smtp_listener: string;
    upstream: { target: string; last_success: string | null; last_failure: string | null; consecutive_failures: number | null; suspended_until: string | null; unreachable_since: string | null };
    warnings: string[];
  };
}

/**
 * An upstream that refuses `unknown…` recipients for good (550), defers `busy…` ones (451),
 * refuses to relay to `denied…` ones (554 5.7.1) and takes the rest.
 */
function pickyUpstream(): Promise<Upstream> {
  return startUpstream({
    onRcptTo(address, _session, cb) {
      const local = address.address.split('@')[0];
      if (local.startsWith('unknown')) return cb(Object.assign(new Error('5.1.1 No such user'), { responseCode: 550 }));
      if (local.startsWith('denied')) return cb(Object.assign(new Error('5.7.1 Relay access denied'), { responseCode: 554 }));
      if (local.startsWith('busy')) return cb(Object.assign(new Error('4.7.1 Try again later'), { responseCode: 451 }));
      cb();
    },
  });
}

/** Makes every claim fail, as a damaged page under the oldest due message does; `DROP TRIGGER claim_fails` ends it. */
const CLAIMS_FAIL = `CREATE TRIGGER claim_fails BEFORE UPDATE OF lease_token ON messages WHEN NEW.state = 'sending'
  BEGIN SELECT RAISE(ABORT, 'this message cannot be read'); END`;

describe('GET /health', () => {
  test('ok while healthy, with the seed names, the oldest queued age and the startup warnings', async () => {
    const clock = new ManualClock();
    const relay = await startTestRelay({}, { clock, startDelivery: false, warnings: ['loopback clients may send without AUTH'] });
    try {
      await sendMail(relay.smtpPort);
      clock.advance(90_000);
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 200);
      assert.equal(body.status, 'ok');
      assert.equal(body.timestamp, new Date(clock.now()).toISOString());
      const d = body.details;
      // in MiB, of the blocks a process without privileges may use (within what others write meanwhile)
      const fsStats = fs.statfsSync(path.dirname(relay.config.databasePath));
      const free = Math.floor((fsStats.bavail * fsStats.bsize) / 2 ** 20);
      assert.ok(Math.abs(Number(d.disk_space_available_mb) - free) <= Math.max(50, free / 100), `${d.disk_space_available_mb} MB; statfs: ${free} MB`);
      assert.equal(d.queued_emails, 1);
      assert.equal(d.failed_emails, 0);
      assert.equal(d.total_emails_processed, 0);
      assert.equal(d.success_rate, 100);
      assert.equal(d.oldest_queued_age_seconds, 90);
      assert.equal(d.database, 'ok');
      assert.equal(d.smtp_listener, 'listening');
      assert.deepEqual(d.upstream, { target: 'local', last_success: null, last_failure: null, consecutive_failures: 0, suspended_until: null, unreachable_since: null });
      assert.deepEqual(d.warnings, ['loopback clients may send without AUTH']);
      // a monitor's query string is ignored, whatever it is
      for (const query of ['?ts=1733480000', '?%ZZ', '?a=1&a=2']) {
        const checked = await call<Health>(relay, `/health${query}`);
        assert.equal(checked.status, 200, query);
        assert.equal(checked.body.status, 'ok', query);
      }

      await relay.delivery.runOnce();
      const after = (await call<Health>(relay, '/health')).body.details;
      assert.equal(after.queued_emails, 0);
      assert.equal(after.oldest_queued_age_seconds, null);
      assert.equal(after.total_emails_processed, 1);
      const ended = relay.store.sqlite.prepare('SELECT started_at + duration_ms AS t FROM attempts').get() as { t: number };
      assert.equal(after.upstream.last_success, new Date(ended.t).toISOString());
    } finally {
      await relay.stop();
    }
  });

  test("the upstream's last success is the attempt's end as stored: /health, /metrics and the store agree to the ms", async () => {
    // a clock that moves on by a second at every reading: a time read after the attempt ended
    // would be seconds past the end the store records
    const clock = new (class extends ManualClock {
      override now(): number {
        const t = super.now();
        this.advance(1000);
        return t;
      }
    })();
    const relay = await startTestRelay({}, { clock, startDelivery: false });
    try {
      await sendMail(relay.smtpPort);
      await relay.delivery.runOnce();
      const ended = relay.store.sqlite.prepare('SELECT started_at + duration_ms AS t FROM attempts').get() as { t: number };
      const expected = new Date(ended.t).toISOString();
      assert.equal(storeMetrics(relay.store.sqlite).upstream.lastSuccessAt, ended.t);
      assert.equal((await call<Health>(relay, '/health')).body.details.upstream.last_success, expected);
      assert.equal((await call<{ upstream: { last_success: string } }>(relay, '/metrics')).body.upstream.last_success, expected);
    } finally {
      await relay.stop();
    }
  });

  test('the oldest queued age counts a message being sent as well', async () => {
    const clock = new ManualClock();
    const upstream = await startHoldingUpstream();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0 },
      { clock, startDelivery: false },
    );
    try {
      await sendMail(relay.smtpPort);
      const run = relay.delivery.runOnce();
      await waitFor(() => storeMetrics(relay.store.sqlite).queue.sending === 1, 10_000, 'the attempt under way');
      clock.advance(120_000);
      const d = (await call<Health>(relay, '/health')).body.details;
      assert.deepEqual([d.queued_emails, d.oldest_queued_age_seconds], [1, 120]);
      assert.equal((await call(relay, '/metrics')).body.oldest_queued_age_seconds, 120);
      upstream.release();
      await run;
      assert.equal((await call<Health>(relay, '/health')).body.details.oldest_queued_age_seconds, null);
    } finally {
      upstream.release();
      await relay.stop();
      await upstream.close();
    }
  });

  test('degraded when every attempt to the upstream fails, ok again once one succeeds', async () => {
    const clock = new ManualClock();
    const outage = await upstreamOutage();
    const port = outage.port;
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, failedRetryInterval: 0 },
      { clock, startDelivery: false },
    );
    let upstream: Upstream | undefined;
    try {
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: [`r${i}@example.com`] });
      assert.equal((await call<Health>(relay, '/health')).body.status, 'ok', 'nothing attempted yet');

      const report = await relay.delivery.runOnce();
      assert.equal(report.attempts, 3);
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 200);
      assert.equal(body.status, 'degraded');
      assert.equal(body.details.upstream.target, `127.0.0.1:${port}`);
      assert.equal(body.details.upstream.consecutive_failures, 3);
      assert.equal(body.details.upstream.last_success, null);
      assert.ok(body.details.upstream.last_failure);
      assert.equal(body.details.deferred_emails, 3);
      // and why: the reply of the last attempt, as stored
      const lastReply = relay.store.sqlite.prepare('SELECT reply FROM attempts ORDER BY id DESC LIMIT 1').pluck().get() as string;
      assert.match(lastReply, /ECONNREFUSED/);
      assert.ok(
        // (the three attempts found it unreachable: delivery is suspended, and the warning says so)
        body.details.warnings.some((w) => w.startsWith(`upstream 127.0.0.1:${port} failing`) && w.includes(`; last reply: ${lastReply}; delivery to it is suspended until `)),
        body.details.warnings.join('; '),
      );

      upstream = await outage.recover();
      clock.advance(10 * 60_000);
      await relay.delivery.runOnce();
      assert.equal(upstream.received.length, 3);
      const recovered = await call<Health>(relay, '/health');
      assert.equal(recovered.body.status, 'ok');
      assert.equal(recovered.body.details.upstream.consecutive_failures, 0);
      assert.ok(recovered.body.details.upstream.last_success);
    } finally {
      await relay.stop();
      await upstream?.close();
    }
  });

  test('two failed attempts in a row are not an outage; the third is', async () => {
    const clock = new ManualClock();
    const outage = await upstreamOutage();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: outage.port, failedRetryInterval: 0 },
      { clock, startDelivery: false },
    );
    try {
      for (let i = 0; i < 2; i++) await sendMail(relay.smtpPort, { to: [`r${i}@example.com`] });
      assert.equal((await relay.delivery.runOnce()).attempts, 2);
      const two = (await call<Health>(relay, '/health')).body;
      assert.deepEqual([two.status, two.details.upstream.consecutive_failures], ['ok', 2]);
      // the first two wait out their backoff: only the new one is tried
      await sendMail(relay.smtpPort, { to: ['r2@example.com'] });
      assert.equal((await relay.delivery.runOnce()).attempts, 1);
      const three = (await call<Health>(relay, '/health')).body;
      assert.deepEqual([three.status, three.details.upstream.consecutive_failures], ['degraded', 3]);
    } finally {
      await relay.stop();
    }
  });

  test('failures right after a success are not an outage until none succeeded for 5 minutes, from exactly then', async () => {
    const clock = new ManualClock();
    const upstream = await pickyUpstream();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0 },
      { clock, startDelivery: false },
    );
    try {
      await sendMail(relay.smtpPort, { to: ['ok@example.com'] });
      await relay.delivery.runOnce();
      const success = Date.parse(String((await call<Health>(relay, '/health')).body.details.upstream.last_success));
      clock.advance(60_000);
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: [`busy${i}@example.com`] });
      await relay.delivery.runOnce();
      const soon = (await call<Health>(relay, '/health')).body;
      assert.deepEqual([soon.status, soon.details.upstream.consecutive_failures], ['ok', 3], 'a minute after a delivery');
      clock.set(success + 5 * 60_000 - 1);
      assert.equal((await call<Health>(relay, '/health')).body.status, 'ok', 'a millisecond short of 5 minutes');
      clock.set(success + 5 * 60_000);
      assert.equal((await call<Health>(relay, '/health')).body.status, 'degraded');
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('an upstream that refuses mail for good (unknown addresses) is not failing; one that defers it is, after a restart too', async () => {
    const clock = new ManualClock();
    const upstream = await pickyUpstream();
    const config = { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0, databasePath: `${tempDir()}/relayq.db` };
    let relay = await startTestRelay(config, { clock, startDelivery: false });
    try {
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: [`unknown${i}@example.com`] });
      assert.equal((await relay.delivery.runOnce()).attempts, 3);
      clock.advance(10 * 60_000);
      let health = (await call<Health>(relay, '/health')).body;
      assert.equal(health.status, 'ok', health.details.warnings.join('; '));
      assert.equal(health.details.failed_emails, 3);
      assert.equal(health.details.upstream.consecutive_failures, 0);
      assert.ok(health.details.upstream.last_failure, 'the attempts delivered nothing');

      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: [`busy${i}@example.com`] });
      await relay.delivery.runOnce();
      health = (await call<Health>(relay, '/health')).body;
      assert.equal(health.status, 'degraded');
      assert.equal(health.details.upstream.consecutive_failures, 3);

      // The run is stored with the attempts: a restart still reports it.
      await relay.stop();
      relay = await startTestRelay(config, { clock, startDelivery: false });
      health = (await call<Health>(relay, '/health')).body;
      assert.equal(health.status, 'degraded');
      assert.equal(health.details.upstream.consecutive_failures, 3);

      // A refusal is an answer: the upstream works again, though nothing was delivered.
      await sendMail(relay.smtpPort, { to: ['unknown9@example.com'] });
      await relay.delivery.runOnce();
      health = (await call<Health>(relay, '/health')).body;
      assert.equal(health.status, 'ok', health.details.warnings.join('; '));
      assert.equal(health.details.upstream.consecutive_failures, 0);
      assert.equal(storeMetrics(relay.store.sqlite).upstream.consecutiveFailures, 0);
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('an upstream that refuses to relay for relayq (554 5.7.1 Relay access denied) is failing, though the mail fails for good', async () => {
    const clock = new ManualClock();
    const upstream = await pickyUpstream();
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0 }, { clock, startDelivery: false });
    try {
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: [`denied${i}@example.com`, `denied-too${i}@example.com`] });
      assert.equal((await relay.delivery.runOnce()).attempts, 3);
      clock.advance(10 * 60_000);
      const health = (await call<Health>(relay, '/health')).body;
      assert.equal(health.status, 'degraded');
      assert.equal(health.details.upstream.consecutive_failures, 3);
      assert.equal(health.details.failed_emails, 3, 'failed for good all the same');
      assert.match(health.details.warnings.join('; '), /last reply: 554 5\.7\.1 Relay access denied/);
      // an unknown address beside a refused relay is an answer about the address: the upstream works
      await sendMail(relay.smtpPort, { to: ['denied9@example.com', 'unknown9@example.com'] });
      await relay.delivery.runOnce();
      assert.equal((await call<Health>(relay, '/health')).body.details.upstream.consecutive_failures, 0);
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('an outage stays degraded once all its mail has failed and nothing waits: the last attempts all failed', async () => {
    const clock = new ManualClock();
    const upstream = await pickyUpstream();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0, retry: { maxAttempts: 1 } },
      { clock, startDelivery: false },
    );
    try {
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: [`busy${i}@example.com`] });
      assert.equal((await relay.delivery.runOnce()).attempts, 3);
      clock.advance(10 * 60_000);
      const health = (await call<Health>(relay, '/health')).body;
      assert.deepEqual([health.details.queued_emails, health.details.failed_emails, health.details.upstream.consecutive_failures], [0, 3, 3]);
      assert.equal(health.status, 'degraded');
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('a failed attempt counts in consecutive_failures at once, while its outcome waits to be committed', async () => {
    const clock = new ManualClock();
    const log = capturedLog('info');
    // takes the message, then defers it (451) once the test lets it answer
    const upstream = await startHoldingUpstream(() => Object.assign(new Error('4.7.1 Try again later'), { responseCode: 451 }));
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0 },
      { clock, startDelivery: false, logger: log.logger },
    );
    try {
      await sendMail(relay.smtpPort);
      const run = relay.delivery.runOnce();
      await waitFor(() => storeMetrics(relay.store.sqlite).queue.sending === 1, 10_000, 'the attempt under way');
      const lock = await holdWriteLock(relay, 50);
      try {
        upstream.release();
        await waitFor(() => log.entries().some((e) => e.event === 'delivery.commit_retry'), 10_000, 'an outcome waiting to be committed');
        assert.equal(storeMetrics(relay.store.sqlite).upstream.consecutiveFailures, 0, 'not stored yet');
        const { details } = (await call<Health>(relay, '/health')).body;
        assert.equal(details.upstream.consecutive_failures, 1);
        assert.ok(details.upstream.last_failure);
      } finally {
        await lock.release();
      }
      await run;
      assert.equal((await call<Health>(relay, '/health')).body.details.upstream.consecutive_failures, 1);
    } finally {
      upstream.release();
      await relay.stop();
      await upstream.close();
    }
  });

  test('degraded when the queue is over 80% of queueSize', async () => {
    const relay = await startTestRelay({ queueSize: 20 }, { startDelivery: false });
    try {
      for (let i = 0; i < 16; i++) await sendMail(relay.smtpPort);
      assert.equal((await call<Health>(relay, '/health')).body.status, 'ok', '16 of 20 is exactly 80%');
      await sendMail(relay.smtpPort);
      const over = (await call<Health>(relay, '/health')).body;
      assert.equal(over.status, 'degraded', '17 of 20 is over 80%');
      assert.ok(over.details.warnings.includes('queue is 85% full (17 of queueSize 20)'), over.details.warnings.join('; '));
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort);
      const { body } = await call<Health>(relay, '/health');
      assert.equal(body.status, 'degraded');
      assert.equal(body.details.queued_emails, 20);
      assert.ok(body.details.warnings.includes('queue is 100% full (20 of queueSize 20)'), body.details.warnings.join('; '));
    } finally {
      await relay.stop();
    }
  });

  test('a queue one short of queueSize is not said to be 100% full: mail is still taken', async () => {
    const relay = await startTestRelay({ queueSize: 200 }, { startDelivery: false });
    const transport = nodemailer.createTransport({ host: '127.0.0.1', port: relay.smtpPort, pool: true, maxConnections: 5, maxMessages: Infinity, ignoreTLS: true });
    try {
      await Promise.all(Array.from({ length: 199 }, () => transport.sendMail({ from: 'sender@example.com', to: 'rcpt@example.com', text: 'hello' })));
      const { body } = await call<Health>(relay, '/health');
      assert.equal(body.details.queued_emails, 199);
      assert.ok(body.details.warnings.includes('queue is 99% full (199 of queueSize 200)'), body.details.warnings.join('; '));
    } finally {
      transport.close();
      await relay.stop();
    }
  });

  test('degraded while claiming due mail fails (a message the database cannot give back), with why; ok once claims work', async () => {
    const upstream = await startUpstream();
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port }, { startRetention: false });
    // another connection makes every claim fail
    const other = openConnection(relay.config.databasePath);
    try {
      other.exec(CLAIMS_FAIL);
      await sendMail(relay.smtpPort, { to: ['a@example.com'] });
      let body: Health | undefined;
      await waitFor(async () => (body = (await call<Health>(relay, '/health')).body).status === 'degraded', 10_000, 'degraded');
      const warning = body?.details.warnings.find((w) => w.startsWith('delivery cannot claim'));
      assert.match(String(warning), /^delivery cannot claim due mail \(since \d{4}-\d\d-\d\dT[\d:.]+Z\): this message cannot be read$/);
      // mail is still taken
      await sendMail(relay.smtpPort, { to: ['b@example.com'] });
      other.exec('DROP TRIGGER claim_fails');
      await waitFor(() => upstream.received.length === 2, 15_000, 'both messages delivered once claims work');
      const { body: after } = await call<Health>(relay, '/health');
      assert.deepEqual([after.status, after.details.warnings], ['ok', []]);
    } finally {
      other.close();
      await relay.stop();
      await upstream.close();
    }
  });

  test('ok again as soon as a claim works, while every worker is busy with what it claimed and more mail is due', async () => {
    // one worker, held at the upstream: no pass finds nothing due, which also says claims work
    const upstream = await startHoldingUpstream();
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, workerCount: 1, inFlowDelay: 0 }, { startRetention: false });
    const other = openConnection(relay.config.databasePath);
    try {
      other.exec(CLAIMS_FAIL);
      await sendMail(relay.smtpPort, { to: ['a@example.com'] });
      await sendMail(relay.smtpPort, { to: ['b@example.com'] });
      await waitFor(async () => (await call<Health>(relay, '/health')).body.status === 'degraded', 10_000, 'degraded');
      other.exec('DROP TRIGGER claim_fails');
      let body: Health | undefined;
      await waitFor(async () => (body = (await call<Health>(relay, '/health')).body).status === 'ok', 15_000, 'ok once a claim works');
      assert.deepEqual(body?.details.warnings, []);
      const { queue } = storeMetrics(relay.store.sqlite);
      assert.deepEqual([queue.sending, queue.queued, upstream.received.length], [1, 1, 0], 'one attempt held at the upstream, the other message due');
    } finally {
      upstream.release();
      other.close();
      await relay.stop();
      await upstream.close();
    }
  });

  test('with queueSize 0 (no limit) a queue of any length is ok', async () => {
    const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false });
    try {
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort);
      const { body } = await call<Health>(relay, '/health');
      assert.deepEqual([body.status, body.details.queued_emails, body.details.queue_size_limit, body.details.warnings], ['ok', 3, 0, []]);
    } finally {
      await relay.stop();
    }
  });

  test('the health status is logged when it changes, not on every check; a first check that is ok logs nothing', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({ queueSize: 1 }, { startDelivery: false, logger: log.logger });
    try {
      const changes = () => log.entries().filter((e) => e.event === 'api.health_changed').map((e) => [e.level, e.status, e.previous]);
      for (let i = 0; i < 2; i++) assert.equal((await call<Health>(relay, '/health')).body.status, 'ok');
      assert.deepEqual(changes(), []);
      await sendMail(relay.smtpPort);
      for (let i = 0; i < 2; i++) assert.equal((await call<Health>(relay, '/health')).body.status, 'degraded');
      // mail is accepted but not leaving: a warning
      assert.deepEqual(changes(), [[40, 'degraded', 'ok']]);
    } finally {
      await relay.stop();
    }
  });

  test('error and 503 while the database refuses writes; ok again when it takes them', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({}, { startDelivery: false, logger: log.logger });
    try {
      // The connection refuses every write (SQLITE_READONLY), as with a read-only database.
      await relay.writer.pragma('query_only = ON');
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 503);
      assert.equal(body.status, 'error');
      assert.equal(body.details.database, 'error');
      assert.ok(body.details.warnings.some((w) => w.startsWith('database is not writable')), body.details.warnings.join('; '));
      // SMTP intake cannot store either: the two agree.
      await assert.rejects(sendMail(relay.smtpPort), /451/);

      await relay.writer.pragma('query_only = OFF');
      const recovered = await call<Health>(relay, '/health');
      assert.equal(recovered.status, 200);
      assert.equal(recovered.body.details.database, 'ok');
      // mail cannot be accepted: logged as an error, its end as info
      const changes = log.entries().filter((e) => e.event === 'api.health_changed');
      // the first check of this process had no status before it
      assert.deepEqual(changes.map((e) => [e.level, e.status, e.previous]), [[50, 'error', null], [30, 'ok', 'error']]);
    } finally {
      await relay.stop();
    }
  });

  test('error and 503 while the figures cannot be read; each figure read from the database is null, not left out', async () => {
    const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
    // another connection takes the counters' table away, as a damaged page would make it unreadable
    const other = openConnection(relay.config.databasePath);
    try {
      other.exec('ALTER TABLE counters RENAME TO counters_away');
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 503);
      assert.equal(body.status, 'error');
      assert.equal(body.details.database, 'error');
      assert.ok(body.details.warnings.some((w) => /^database is not readable: .*counters/.test(w)), body.details.warnings.join('; '));
      for (const key of ['queued_emails', 'deferred_emails', 'failed_emails', 'total_emails_processed', 'success_rate', 'oldest_queued_age_seconds'] as const) {
        assert.ok(key in body.details, `${key} is in the answer`);
        assert.equal(body.details[key], null, key);
      }
    } finally {
      other.exec('ALTER TABLE counters_away RENAME TO counters');
      other.close();
      await relay.stop();
    }
  });

  test('error and 503 on every check while the database file cannot be written (an I/O error at commit)', async (t) => {
    const relay = await startTestRelay({}, { startDelivery: false });
    const wal = `${relay.config.databasePath}-wal`;
    try {
      assert.equal((await call<Health>(relay, '/health')).body.status, 'ok');
      const counted = () => relay.store.sqlite.prepare("SELECT value FROM counters WHERE name = 'health_checks'").pluck().get();
      assert.equal(counted(), 1, 'each check commits a change, which the commit must write to the disk');
      // The immutable flag makes every write to the open WAL fail (EPERM): SQLite reports an I/O
      // error, as on a file system remounted read-only after an error.
      const ran = await whileImmutable(t, wal, async () => {
        for (let i = 0; i < 3; i++) {
          const { status, body } = await call<Health>(relay, '/health');
          assert.equal(status, 503, `check ${i + 1}`);
          assert.ok(body.details.warnings.some((w) => w.startsWith('database is not writable')), body.details.warnings.join('; '));
        }
        await assert.rejects(sendMail(relay.smtpPort), /451/);
      });
      if (!ran) return;
      await sendMail(relay.smtpPort);
      assert.equal((await call<Health>(relay, '/health')).status, 200);
    } finally {
      await relay.stop();
    }
  });

  test('error and 503 when the SMTP listener is down', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      await new Promise<void>((resolve) => relay.intake.server.server.close(() => resolve()));
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 503);
      assert.equal(body.details.smtp_listener, 'down');
      assert.ok(body.details.warnings.includes('the SMTP listener is down'));
    } finally {
      await relay.stop();
    }
  });

  test('error and 503 when free disk space is below minFreeDiskMb, said in the log at the start', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({ minFreeDiskMb: 100_000_000 }, { startDelivery: false, logger: log.logger });
    try {
      const [low] = log.entries().filter((e) => e.event === 'relay.disk_low');
      assert.deepEqual([low?.level, low?.minFreeDiskMb, typeof low?.freeMb], [40, 100_000_000, 'number']);
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 503);
      assert.equal(body.status, 'error');
      assert.ok(body.details.warnings.some((w) => w.includes('below minFreeDiskMb 100000000 MB')), body.details.warnings.join('; '));
    } finally {
      await relay.stop();
    }
  });

  test('free disk space that cannot be read is an error that says so, not "0 MB free"', async () => {
    const dir = tempDir();
    const log = capturedLog('info');
    const relay = await startTestRelay({ databasePath: path.join(dir, 'data', 'relayq.db'), minFreeDiskMb: 1 }, { startDelivery: false, logger: log.logger });
    try {
      assert.equal((await call<Health>(relay, '/health')).body.status, 'ok');
      // the open database stays writable; the directory it was in is gone (which the health
      // check's write finds at once: the database is no longer at databasePath)
      fs.renameSync(path.join(dir, 'data'), path.join(dir, 'moved'));
      let body: Health | undefined;
      const diskUnread = async () => (body = (await call<Health>(relay, '/health')).body).details.warnings.some((w) => w.includes('free disk space'));
      await waitFor(diskUnread, 5000, 'the next disk sample');
      assert.equal(body?.status, 'error');
      const warning = body?.details.warnings.find((w) => w.includes('free disk space'));
      assert.match(String(warning), /^free disk space cannot be read \(ENOENT[^)]*\), so new mail is refused as below minFreeDiskMb$/);
      await assert.rejects(sendMail(relay.smtpPort), /452 4\.3\.1/);
      const [refusal] = log.entries().filter((e) => e.event === 'smtp.disk_low');
      assert.match(String(refusal?.err), /^ENOENT/);
      // the log says why mail is refused: not that the disk is full
      assert.equal(refusal?.msg, 'refusing mail: free disk space cannot be read');
    } finally {
      await relay.stop();
    }
  });

  test('no HTTP listener at all when enableHealthCheck is false', async () => {
    const relay = await startTestRelay({ enableHealthCheck: false }, { startDelivery: false });
    try {
      assert.equal(relay.httpPort, undefined);
    } finally {
      await relay.stop();
    }
  });
});

test('degraded from 90 % of the file descriptors the process may open (ulimit -n) up to the limit itself, ok once connections close', async () => {
  const httpPort = await closedPort();
  // above the ~250 files Node opens at once as it loads the relay's modules (README, Open files)
  const limit = 400;
  const relay = await spawnRelay(tempDir(), ['--healthCheckPort', String(httpPort)], {}, limit);
  const sockets: net.Socket[] = [];
  // one kept-alive connection for every check: at the limit a new one would be closed unanswered
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const health = () =>
    new Promise<Health>((resolve, reject) => {
      const req = http.get({ host: '127.0.0.1', port: httpPort, path: '/health', agent, timeout: 5000 }, (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (d: string) => (body += d));
        res.on('end', () => resolve(JSON.parse(body) as Health));
      });
      req.on('timeout', () => req.destroy(new Error('no answer from /health')));
      req.on('error', reject);
    });
  const warning = (h: Health) => h.details.warnings.find((w) => w.endsWith(` of ${limit} file descriptors in use (ulimit -n): at the limit new connections are closed unanswered`));
  try {
    await waitFor(async () => (await health()).status === 'ok', 10_000, 'the relay healthy at first');
    // idle SMTP connections, one descriptor each in the relay, up to the limit, where the relay
    // closes a new one unanswered
    const seen: Health[] = [];
    let limitReached = false;
    while (!limitReached && sockets.length < limit + 40) {
      const socket = net.connect(relay.smtpPort, '127.0.0.1');
      socket.on('error', () => {});
      sockets.push(socket);
      // greeted, or closed at the limit; a greeting slow to come on a busy machine is no limit
      const greeted = await Promise.race([
        once(socket, 'data').then(() => true),
        once(socket, 'close').then(() => false),
        sleep(30_000, undefined, { ref: false }).then(() => {
          throw new Error('neither a greeting nor a close within 30 s');
        }),
      ]);
      limitReached = !greeted;
      if (sockets.length % 10 === 0 || limitReached) seen.push(await health());
    }
    assert.ok(limitReached, 'the limit was reached');
    const first = seen.findIndex((h) => h.status === 'degraded');
    assert.ok(first > 0, 'ok first, then degraded before the limit');
    assert.ok(seen.slice(first).every((h) => h.status === 'degraded' && warning(h)), 'degraded from then on, at the limit too');
    const inUse = (h: Health) => Number(String(warning(h)).split(' ')[0]);
    assert.ok(inUse(seen[first]) >= 0.9 * limit && inUse(seen[first]) < 0.9 * limit + 10, `degraded from 90 % of the limit, ${inUse(seen[first])} in use`);
    // below the limit, above 90 % of it: the figure is what the process has open, read from outside
    // while nothing opens or closes one
    for (const socket of sockets.splice(0, 20)) socket.destroy();
    const openNow = () => fs.readdirSync(`/proc/${relay.child.pid}/fd`).length;
    await waitFor(
      async () => {
        const before = openNow();
        const h = await health();
        return openNow() === before && inUse(h) === before;
      },
      10_000,
      '/health to count the descriptors the process has open',
    );
    for (const socket of sockets.splice(0)) socket.destroy();
    await waitFor(async () => (await health()).status === 'ok', 10_000, 'ok again once the connections closed');
  } finally {
    agent.destroy();
    for (const socket of sockets) socket.destroy();
    await relay.kill('SIGTERM');
  }
});
