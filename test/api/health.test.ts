import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ManualClock } from '../../src/clock.js';
import { sendMail, startTestRelay, type Upstream, writeDirect } from '../helpers.js';
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
    database: string;
    smtp_listener: string;
    upstream: { target: string; last_success: string | null; last_failure: string | null; consecutive_failures: number | null };
    warnings: string[];
  };
}

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
      assert.ok(typeof d.disk_space_available_mb === 'number' && d.disk_space_available_mb > 0);
      assert.equal(d.queued_emails, 1);
      assert.equal(d.failed_emails, 0);
      assert.equal(d.total_emails_processed, 0);
      assert.equal(d.success_rate, 100);
      assert.equal(d.oldest_queued_age_seconds, 90);
      assert.equal(d.database, 'ok');
      assert.equal(d.smtp_listener, 'listening');
      assert.deepEqual(d.upstream, { target: 'local', last_success: null, last_failure: null, consecutive_failures: 0 });
      assert.deepEqual(d.warnings, ['loopback clients may send without AUTH']);

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
      assert.ok(body.details.warnings.some((w) => w.startsWith(`upstream 127.0.0.1:${port} failing`)), body.details.warnings.join('; '));

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

  test('one refused attempt right after a success is not an outage yet', async () => {
    const clock = new ManualClock();
    const relay = await startTestRelay({}, { clock, startDelivery: false });
    try {
      await sendMail(relay.smtpPort);
      await relay.delivery.runOnce();
      // Three failed attempts a minute after a success: within the quiet period.
      const now = clock.now();
      await writeDirect(relay, (db) => {
        const insert = db.prepare(
          `INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome, code, reply)
           SELECT id, 0, '[]', 'local', ?, 5, 'deferred', 421, 'try later' FROM messages LIMIT 1`,
        );
        for (let i = 0; i < 3; i++) insert.run(now + 60_000);
      });
      clock.advance(60_000);
      assert.equal((await call<Health>(relay, '/health')).body.status, 'ok');
      clock.advance(5 * 60_000);
      assert.equal((await call<Health>(relay, '/health')).body.status, 'degraded');
    } finally {
      await relay.stop();
    }
  });

  test('degraded when the queue is over 80% of queueSize', async () => {
    const relay = await startTestRelay({ queueSize: 5 }, { startDelivery: false });
    try {
      for (let i = 0; i < 4; i++) await sendMail(relay.smtpPort);
      assert.equal((await call<Health>(relay, '/health')).body.status, 'ok', '4 of 5 is exactly 80%');
      await sendMail(relay.smtpPort);
      const { body } = await call<Health>(relay, '/health');
      assert.equal(body.status, 'degraded');
      assert.equal(body.details.queued_emails, 5);
      assert.ok(body.details.warnings.includes('queue is 100% full (5 of queueSize 5)'), body.details.warnings.join('; '));
    } finally {
      await relay.stop();
    }
  });

  test('error and 503 while the database refuses writes; ok again when it takes them', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      // The connection refuses every write (SQLITE_READONLY), as with a read-only database.
      await relay.commits.pragma('query_only = ON');
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 503);
      assert.equal(body.status, 'error');
      assert.equal(body.details.database, 'error');
      assert.ok(body.details.warnings.some((w) => w.startsWith('database is not writable')), body.details.warnings.join('; '));
      // SMTP intake cannot store either: the two agree.
      await assert.rejects(sendMail(relay.smtpPort), /451/);

      await relay.commits.pragma('query_only = OFF');
      const recovered = await call<Health>(relay, '/health');
      assert.equal(recovered.status, 200);
      assert.equal(recovered.body.details.database, 'ok');
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

  test('error and 503 when free disk space is below minFreeDiskMb', async () => {
    const relay = await startTestRelay({ minFreeDiskMb: 100_000_000 }, { startDelivery: false });
    try {
      const { status, body } = await call<Health>(relay, '/health');
      assert.equal(status, 503);
      assert.equal(body.status, 'error');
      assert.ok(body.details.warnings.some((w) => w.includes('below minFreeDiskMb 100000000 MB')), body.details.warnings.join('; '));
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
