import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { migrations } from '../../migrations/index.js';
import { MIGRATION_NAMES } from '../../migrations/names.js';
import { ManualClock } from '../manual-clock.js';
import type { Relay } from '../../src/main.js';
import { kyselyFor, migrateToLatest } from '../../src/store/migrate.js';
import { closedPort, sendMail, startHoldingUpstream, startTestRelay, startUpstream, tempDir, type Upstream, waitFor, writeDirect } from '../helpers.js';
import { runCliJson } from '../cli/run-cli.js';
import { call, postJson } from './fixtures.js';

type Json = Record<string, unknown>;

/** An upstream that refuses bad@example.com for good (550) and takes everything else. */
function rejectingUpstream(): Promise<Upstream> {
  return startUpstream({
    onRcptTo(address, _session, cb) {
      if (address.address === 'bad@example.com') return cb(Object.assign(new Error('5.1.1 No such user'), { responseCode: 550 }));
      cb();
    },
  });
}

/** One delivered, one failed and one partly delivered (so failed) message; one refused by the rate limit. */
async function mixedTraffic(relay: Relay, clock: ManualClock): Promise<void> {
  await sendMail(relay.smtpPort, { from: 'a@example.com', to: ['ok1@example.com'] });
  await sendMail(relay.smtpPort, { from: 'a@example.com', to: ['bad@example.com'] });
  await sendMail(relay.smtpPort, { from: 'b@example.com', to: ['ok2@example.com', 'bad@example.com'] });
  await assert.rejects(sendMail(relay.smtpPort, { from: 'c@example.com' }), /451/);
  clock.advance(2000);
  await relay.delivery.runOnce();
}

function relayOptions(clock: ManualClock) {
  return { clock, startDelivery: false, startRetention: false };
}

function config(upstreamPort: number, databasePath?: string) {
  return {
    forwardSMTP: true,
    forwardHost: '127.0.0.1',
    forwardPort: upstreamPort,
    failedRetryInterval: 0,
    rateLimits: { enabled: true, globalMaxPerHour: 3 },
    ...(databasePath ? { databasePath } : {}),
  };
}

function promtoolAvailable(): boolean {
  return spawnSync('promtool', ['--version'], { stdio: 'ignore' }).status === 0;
}

describe('GET /metrics', () => {
  test('JSON counts what the store recorded: messages, recipients, attempts by outcome, refusals, timing', async () => {
    const clock = new ManualClock();
    const upstream = await rejectingUpstream();
    const relay = await startTestRelay(config(upstream.port), relayOptions(clock));
    try {
      await mixedTraffic(relay, clock);
      await waitFor(async () => (await call(relay, '/metrics')).body.rate_limit_refusals === 1, 10_000, 'the refusal counted');
      const { status, headers, body } = await call(relay, '/metrics');
      assert.equal(status, 200);
      assert.match(headers.get('content-type') ?? '', /^application\/json/);
      const durations = relay.store.sqlite.prepare('SELECT COALESCE(SUM(duration_ms), 0) AS sum FROM attempts').get() as { sum: number };
      const { attempt_duration_ms: histogramJson, upstream: upstreamJson, ...counts } = body;
      assert.deepEqual(
        counts,
        {
          timestamp: new Date(clock.now()).toISOString(),
          total_emails: 3,
          successful_emails: 1,
          failed_emails: 2,
          requeued_emails: 0,
          total_recipients: 4,
          total_bytes: (relay.store.sqlite.prepare('SELECT SUM(size) AS n FROM messages').get() as { n: number }).n,
          avg_processing_time_ms: 2000,
          success_rate: 33.33,
          queue: { queued: 0, sending: 0, delivered: 1, failed: 2 },
          deferred_emails: 0,
          oldest_queued_age_seconds: null,
          rate_limit_refusals: 1,
          queue_full_refusals: 0,
          disk_low_refusals: 0,
          attempts: { delivered: 1, partial: 1, deferred: 0, failed: 1, total: 3 },
          intake_pacing: { waiting: 0, delayed: 0, timed_out: 0 },
          intake_store_failures: 0,
          smtp_connection_limit_refusals: 0,
        },
      );
      // The three attempts run concurrently: which one ended last is not fixed.
      const upstreamRecord = upstreamJson as { last_success: string; last_failure: string; consecutive_failures: number };
      assert.ok(upstreamRecord.last_success && upstreamRecord.last_failure);
      assert.ok([0, 1].includes(upstreamRecord.consecutive_failures));
      const histogram = histogramJson as { count: number; sum: number; buckets: Array<{ le: number | string; count: number }> };
      assert.equal(histogram.count, 3);
      assert.equal(histogram.sum, durations.sum);
      assert.deepEqual(histogram.buckets.at(-1), { le: '+Inf', count: 3 });
      for (let i = 1; i < histogram.buckets.length; i++) assert.ok(histogram.buckets[i].count >= histogram.buckets[i - 1].count, 'cumulative');
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('queued mail waiting for a retry is counted as deferred, and a full queue as refusals', async () => {
    const clock = new ManualClock();
    const port = await closedPort();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, failedRetryInterval: 0, queueSize: 2, rateLimits: { enabled: true, maxPerHour: 1 } },
      relayOptions(clock),
    );
    try {
      await sendMail(relay.smtpPort, { from: 'a@example.com', to: ['x@example.com'] });
      for (let i = 0; i < 2; i++) await assert.rejects(sendMail(relay.smtpPort, { from: 'a@example.com' }), /451/);
      await sendMail(relay.smtpPort, { from: 'b@example.com', to: ['y@example.com'] });
      await assert.rejects(sendMail(relay.smtpPort, { from: 'c@example.com' }), /452/);
      // refusals are counted in a write of their own, after the reply
      const prometheus = async () => (await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics?format=prometheus`)).text()).split('\n');
      await waitFor(
        async () => {
          const text = await prometheus();
          return text.includes('relayq_refusals_total{reason="rate_limit"} 2') && text.includes('relayq_refusals_total{reason="queue_full"} 1');
        },
        10_000,
        'each refusal counted under its own reason',
      );
      let m = (await call(relay, '/metrics')).body;
      assert.equal(m.deferred_emails, 0, 'never attempted yet');
      await relay.delivery.runOnce();
      clock.advance(3_600_000);
      await relay.delivery.runOnce();
      m = (await call(relay, '/metrics')).body;
      assert.equal(m.deferred_emails, 2);
      assert.deepEqual(m.queue, { queued: 2, sending: 0, delivered: 0, failed: 0 });
      assert.deepEqual(m.attempts, { delivered: 0, partial: 0, deferred: 4, failed: 0, total: 4 });
      assert.equal(m.queue_full_refusals, 1);
      assert.equal(m.oldest_queued_age_seconds, 3600);
      assert.equal((m.upstream as Json).consecutive_failures, 4);
    } finally {
      await relay.stop();
    }
  });

  test('the oldest message not yet final counts while it is being sent, not only while it waits', async () => {
    const clock = new ManualClock();
    const upstream = await startHoldingUpstream();
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0 }, relayOptions(clock));
    try {
      await sendMail(relay.smtpPort, { from: 'a@example.com', to: ['x@example.com'] });
      clock.advance(30_000);
      const run = relay.delivery.runOnce();
      await waitFor(async () => ((await call(relay, '/metrics')).body.queue as Json).sending === 1, 10_000, 'the claim');
      assert.equal((await call(relay, '/metrics')).body.oldest_queued_age_seconds, 30);
      upstream.release();
      await run;
      assert.equal((await call(relay, '/metrics')).body.oldest_queued_age_seconds, null);
    } finally {
      upstream.release();
      await relay.stop();
      await upstream.close();
    }
  });

  test('JSON and Prometheus numbers are the same after a restart on the same database', async () => {
    const clock = new ManualClock();
    const upstream = await rejectingUpstream();
    const databasePath = `${tempDir()}/relayq.db`;
    const before: { json?: Json; text?: string } = {};
    const first = await startTestRelay(config(upstream.port, databasePath), relayOptions(clock));
    try {
      await mixedTraffic(first, clock);
      await sendMail(first.smtpPort, { from: 'd@example.com' }).catch(() => {});
      await waitFor(async () => (await call(first, '/metrics')).body.rate_limit_refusals === 2, 10_000, 'refusals counted');
      before.json = (await call(first, '/metrics')).body;
      before.text = (await call<string>(first, '/metrics?format=prometheus')).body;
    } finally {
      await first.stop();
    }
    const second = await startTestRelay(config(upstream.port, databasePath), relayOptions(clock));
    try {
      const after = (await call(second, '/metrics')).body;
      const text = (await call<string>(second, '/metrics?format=prometheus')).body;
      assert.deepEqual(after, before.json);
      const stable = (t: string) => t.split('\n').filter((line) => !line.startsWith('relayq_disk_free_bytes'));
      assert.deepEqual(stable(text), stable(before.text ?? ''));
      assert.equal(after.total_emails, 3);
      assert.equal(after.rate_limit_refusals, 2);
    } finally {
      await second.stop();
      await upstream.close();
    }
  });

  test('each Prometheus sample is the number JSON reports under its name, or the setting it names', async () => {
    const clock = new ManualClock();
    const upstream = await rejectingUpstream();
    const relay = await startTestRelay({ ...config(upstream.port), queueSize: 7 }, relayOptions(clock));
    try {
      await mixedTraffic(relay, clock);
      assert.deepEqual((await call(relay, '/admin/retry-failed', postJson({}))).body, { requeued: 2 });
      // past the rate-limit hour: one more message, never tried, beside the two requeued ones
      clock.advance(3_700_000);
      await sendMail(relay.smtpPort, { from: 'd@example.com', to: ['ok3@example.com'] });
      clock.advance(90_000);
      await waitFor(async () => (await call(relay, '/metrics')).body.rate_limit_refusals === 1, 10_000, 'the refusal counted');
      const json = (await call(relay, '/metrics')).body;
      assert.deepEqual([json.requeued_emails, json.deferred_emails, (json.queue as Json).queued], [2, 2, 3]);
      const text = (await call<string>(relay, '/metrics?format=prometheus')).body;
      const sample = (series: string) => {
        const line = text.split('\n').find((l) => l.startsWith(`${series} `));
        assert.ok(line, `${series} in the output`);
        return Number(line.slice(series.length + 1));
      };
      const upstreamJson = json.upstream as { last_success: string; last_failure: string; consecutive_failures: number };
      assert.deepEqual(
        {
          accepted: sample('relayq_messages_accepted_total'),
          recipients: sample('relayq_recipients_accepted_total'),
          bytes: sample('relayq_accepted_bytes_total'),
          delivered: sample('relayq_messages_delivered_total'),
          requeued: sample('relayq_messages_requeued_total'),
          deferred: sample('relayq_queue_deferred_messages'),
          queued: sample('relayq_queue_messages{state="queued"}'),
          oldest: sample('relayq_queue_oldest_age_seconds'),
          lastSuccess: sample('relayq_upstream_last_success_timestamp_seconds'),
          lastFailure: sample('relayq_upstream_last_failure_timestamp_seconds'),
          consecutiveFailures: sample('relayq_upstream_consecutive_failures'),
        },
        {
          accepted: json.total_emails,
          recipients: json.total_recipients,
          bytes: json.total_bytes,
          delivered: json.successful_emails,
          requeued: 2,
          deferred: 2,
          queued: 3,
          oldest: json.oldest_queued_age_seconds,
          lastSuccess: Date.parse(upstreamJson.last_success) / 1000,
          lastFailure: Date.parse(upstreamJson.last_failure) / 1000,
          consecutiveFailures: upstreamJson.consecutive_failures,
        },
      );
      assert.equal(json.oldest_queued_age_seconds, 3792, 'the requeued messages arrived 2 s before the attempt, 3790 s ago');
      assert.equal(sample('relayq_queue_size_limit_messages'), 7);
      assert.equal(sample('relayq_smtp_listener_up'), 1);
      // /health's free MB (MiB, as the disk guard counts them) in bytes; the two reads may be a sample apart
      const freeMb = ((await call(relay, '/health')).body.details as { disk_space_available_mb: number }).disk_space_available_mb;
      const freeBytes = sample('relayq_disk_free_bytes');
      assert.ok(Math.abs(freeBytes / 2 ** 20 - freeMb) <= 1, `${freeBytes} bytes against ${freeMb} MB`);
      await new Promise<void>((resolve) => relay.intake.server.server.close(() => resolve()));
      assert.match((await call<string>(relay, '/metrics?format=prometheus')).body, /^relayq_smtp_listener_up 0$/m);
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('a clock stepped back between receipt and delivery adds no processing time; the Prometheus form still renders', async () => {
    const clock = new ManualClock();
    const upstream = await rejectingUpstream();
    const relay = await startTestRelay(config(upstream.port), relayOptions(clock));
    try {
      await sendMail(relay.smtpPort, { to: ['ok1@example.com'] });
      clock.advance(2000);
      await relay.delivery.runOnce();
      const id = /queued as ([0-9A-F]+)/.exec((await sendMail(relay.smtpPort, { to: ['ok2@example.com'] })).response)?.[1];
      clock.advance(-3_600_000);
      // due an hour from now by the stepped clock, so an operator sends it at once; it is
      // delivered "an hour before" it was received
      assert.equal((await call(relay, `/admin/messages/${id}/retry`, { method: 'POST' })).status, 200);
      await relay.delivery.runOnce();
      assert.equal(relay.store.sqlite.prepare("SELECT COUNT(*) FROM messages WHERE state = 'delivered'").pluck().get(), 2);
      assert.equal((await call(relay, '/metrics')).body.avg_processing_time_ms, 1000);
      const { status, body } = await call<string>(relay, '/metrics?format=prometheus');
      assert.equal(status, 200, body);
      assert.match(body, /^relayq_message_processing_seconds_total 2$/m);
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('a message that fails, is requeued and fails again counts once in the mean processing time, by its last outcome', async () => {
    const clock = new ManualClock();
    const upstream = await rejectingUpstream();
    const relay = await startTestRelay(config(upstream.port), relayOptions(clock));
    try {
      const id = /queued as ([0-9A-F]+)/.exec((await sendMail(relay.smtpPort, { to: ['bad@example.com'] })).response)?.[1];
      clock.advance(1000);
      await relay.delivery.runOnce(); // failed 1 s after receipt
      await sendMail(relay.smtpPort, { to: ['ok1@example.com'] });
      clock.advance(9000);
      assert.equal((await call(relay, `/admin/messages/${id}/retry`, { method: 'POST' })).status, 200);
      clock.advance(1000);
      await relay.delivery.runOnce(); // the first fails again 11 s after receipt; the second is delivered after 10 s
      const { body } = await call<Json>(relay, '/metrics');
      assert.deepEqual([body.successful_emails, body.failed_emails, body.requeued_emails], [1, 1, 1]);
      assert.equal(body.avg_processing_time_ms, (11_000 + 10_000) / 2, 'not (1 s + 11 s + 10 s) / 3: the first failure was taken back');
      const { body: text } = await call<string>(relay, '/metrics?format=prometheus');
      assert.match(text, /^relayq_message_processing_seconds_total 22$/m, 'the counter keeps every final transition');
      assert.match(text, /^relayq_message_processing_seconds_average 10\.5$/m, 'the mean per message, as the JSON form gives it');
      const status = await runCliJson<Json>(['status', '--databasePath', relay.config.databasePath]);
      assert.equal(status.avg_processing_time_ms, 10_500);
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('a clock stepped back past the oldest waiting message shows an age of 0, not a negative one', async () => {
    const clock = new ManualClock();
    const relay = await startTestRelay({}, { clock, startDelivery: false });
    try {
      await sendMail(relay.smtpPort);
      clock.advance(-60_000);
      const { body } = await call<string>(relay, '/metrics?format=prometheus');
      assert.match(body, /^relayq_queue_oldest_age_seconds 0$/m);
      assert.equal((await call(relay, '/metrics')).body.oldest_queued_age_seconds, 0);
    } finally {
      await relay.stop();
    }
  });

  test('the upgrade to 008 starts a processing-time total that a stepped clock made negative again at 0', async () => {
    const sqlite = new Database(path.join(tempDir(), 'old.db'));
    const db = kyselyFor(sqlite);
    try {
      await migrateToLatest(db, Object.fromEntries(Object.entries(migrations).filter(([name]) => name < '008')));
      sqlite.prepare("UPDATE counters SET value = -3598000 WHERE name = 'processing_ms_total'").run();
      assert.deepEqual(await migrateToLatest(db), MIGRATION_NAMES.filter((name) => name >= '008'));
      assert.equal(sqlite.prepare("SELECT value FROM counters WHERE name = 'processing_ms_total'").pluck().get(), 0);
    } finally {
      await db.destroy();
    }
  });

  test('the upgrade to 009 starts the per-message processing time where the mean stays what it was', async () => {
    /** processing_ms_by_message after 009, on a database at 008 with these lifetime counters (none: a new database). */
    const startedAt = async (counters?: { total: number; delivered: number; failed: number; requeued: number }) => {
      const sqlite = new Database(path.join(tempDir(), 'old.db'));
      const db = kyselyFor(sqlite);
      try {
        if (counters) {
          await migrateToLatest(db, Object.fromEntries(Object.entries(migrations).filter(([name]) => name < '009')));
          const set = sqlite.prepare('UPDATE counters SET value = ? WHERE name = ?');
          const { total, delivered, failed, requeued } = counters;
          for (const [name, value] of [['processing_ms_total', total], ['messages_delivered', delivered], ['messages_failed', failed], ['messages_requeued', requeued]] as const) set.run(value, name);
          assert.deepEqual(await migrateToLatest(db), MIGRATION_NAMES.filter((name) => name >= '009'));
        } else {
          await migrateToLatest(db);
        }
        return sqlite.prepare("SELECT value FROM counters WHERE name = 'processing_ms_by_message'").pluck().get();
      } finally {
        await db.destroy();
      }
    };
    // 2 delivered and 2 failures, one of them requeued since: a mean of 2 s over 4 final states
    assert.equal(await startedAt({ total: 8000, delivered: 2, failed: 2, requeued: 1 }), 6000, '2 s for each of the 3 messages counted now');
    // a total of 0 (as 008 leaves one a stepped clock made negative) keeps a mean of 0
    assert.equal(await startedAt({ total: 0, delivered: 3, failed: 0, requeued: 0 }), 0);
    assert.equal(await startedAt(), 0, 'a new database');
  });

  test('the attempt-duration histogram is built from the persisted bucket counts', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      await sendMail(relay.smtpPort);
      await writeDirect(relay, (db) => {
        const insert = db.prepare(
          `INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome)
           SELECT id, 0, '[]', 'local', 1000, ?, 'deferred' FROM messages LIMIT 1`,
        );
        for (const ms of [5, 30, 30, 400_000]) insert.run(ms);
      });
      const text = (await call<string>(relay, '/metrics?format=prometheus')).body;
      const sample = (series: string) => {
        const line = text.split('\n').find((l) => l.startsWith(`${series} `));
        assert.ok(line, `${series} in the output`);
        return Number(line.slice(series.length + 1));
      };
      const name = 'relayq_delivery_attempt_duration_seconds';
      assert.match(text, new RegExp(`^# TYPE ${name} histogram$`, 'm'));
      assert.equal(sample(`${name}_bucket{le="0.01"}`), 1);
      assert.equal(sample(`${name}_bucket{le="0.025"}`), 1);
      assert.equal(sample(`${name}_bucket{le="0.05"}`), 3);
      assert.equal(sample(`${name}_bucket{le="300"}`), 3);
      assert.equal(sample(`${name}_bucket{le="+Inf"}`), 4);
      assert.equal(sample(`${name}_count`), 4);
      assert.equal(sample(`${name}_sum`), 400.065);
      assert.equal(sample('relayq_delivery_attempts_total{outcome="deferred"}'), 4);
      assert.equal(sample('relayq_queue_messages{state="queued"}'), 1);
    } finally {
      await relay.stop();
    }
  });

  test('the Prometheus output passes promtool check metrics', { skip: promtoolAvailable() ? false : 'promtool is not installed (apt-get install prometheus)' }, async () => {
    const clock = new ManualClock();
    const upstream = await rejectingUpstream();
    const relay = await startTestRelay(config(upstream.port), relayOptions(clock));
    try {
      await mixedTraffic(relay, clock);
      const { body } = await call<string>(relay, '/metrics?format=prometheus');
      const check = spawnSync('promtool', ['check', 'metrics'], { input: body, encoding: 'utf8' });
      assert.equal(check.status, 0, `promtool: ${check.stdout}${check.stderr}`);
      assert.equal(`${check.stdout}${check.stderr}`.trim(), '', 'no lint findings');
      for (const name of ['relayq_messages_accepted_total', 'relayq_queue_messages', 'relayq_delivery_attempt_duration_seconds']) {
        assert.match(body, new RegExp(`^# HELP ${name} .+`, 'm'));
        assert.match(body, new RegExp(`^# TYPE ${name} (counter|gauge|histogram)$`, 'm'));
      }
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('the format follows ?format= first, then the Accept header; JSON by default', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      const type = async (path: string, accept?: string) =>
        (await call(relay, path, { headers: accept ? { accept } : {} })).headers.get('content-type') ?? '';
      assert.match(await type('/metrics'), /^application\/json/);
      assert.match(await type('/metrics', '*/*'), /^application\/json/);
      assert.match(await type('/metrics', 'text/plain'), /^text\/plain; version=0\.0\.4/);
      assert.match(await type('/metrics?format=prometheus', 'application/json'), /^text\/plain; version=0\.0\.4/);
      assert.match(await type('/metrics?format=json', 'text/plain'), /^application\/json/);
      // by q-value; a tie goes to JSON, and between the two text forms to OpenMetrics
      assert.match(await type('/metrics', 'text/plain, application/json'), /^application\/json/);
      assert.match(await type('/metrics', 'application/json;q=0.4, text/plain;q=0.5'), /^text\/plain; version=0\.0\.4/);
      assert.match(await type('/metrics', 'text/plain;q=0.9, application/openmetrics-text;q=0.9'), /^application\/openmetrics-text/);
      assert.match(await type('/metrics', 'application/openmetrics-text;q=0.5, application/json;q=0.5'), /^application\/json/);
      assert.match(await type('/metrics', 'text/plain;q=abc'), /^application\/json/, 'a q-value that is no number counts for nothing');
      assert.match(await type('/metrics', 'text/plain;q=abc, application/openmetrics-text;q=0.5'), /^application\/openmetrics-text/, 'nor does its entry');
      // What Prometheus sends when it scrapes.
      const scrape = 'application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1';
      const om = await call<string>(relay, '/metrics', { headers: { accept: scrape } });
      assert.match(om.headers.get('content-type') ?? '', /^application\/openmetrics-text; version=1\.0\.0/);
      assert.ok(om.body.endsWith('# EOF\n'));
      assert.match(om.body, /^# TYPE relayq_messages_accepted counter$/m);
      assert.match(om.body, /^relayq_messages_accepted_total 0$/m);
      // a type listed twice counts at its highest q-value, wherever it stands
      assert.match(await type('/metrics', 'application/openmetrics-text;version=1.0.0, application/openmetrics-text;version=0.0.1;q=0.2, text/plain;q=0.5'), /^application\/openmetrics-text/);
      assert.match(await type('/metrics', 'text/plain;q=0.1, application/json;q=0.5, text/plain;version=0.0.4'), /^text\/plain; version=0\.0\.4/);
      const bad = await call(relay, '/metrics?format=xml');
      assert.equal(bad.status, 400);
      assert.deepEqual(bad.body, { error: 'bad_request', message: 'format must be one of json, prometheus, openmetrics' });
      const twice = await call(relay, '/metrics?format=json&format=prometheus');
      assert.deepEqual([twice.status, twice.body], [400, { error: 'bad_request', message: 'format may be given only once' }]);
      // a misspelt parameter is refused, not answered in JSON as if it were not there
      const typo = await call(relay, '/metrics?fromat=prometheus');
      assert.deepEqual([typo.status, typo.body], [400, { error: 'bad_request', message: 'unknown query parameter "fromat": expected format' }]);
      // and so is one without its name, over HTTP too
      const nameless = await fetch(`http://127.0.0.1:${relay.httpPort}/metrics?=prometheus`);
      assert.deepEqual([nameless.status, await nameless.json()], [400, { error: 'bad_request', message: 'a query parameter without a name ("=prometheus"): expected format' }]);
    } finally {
      await relay.stop();
    }
  });
});
