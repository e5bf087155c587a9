// Rate limits, queue backpressure and the disk guard, with an injected clock.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { ManualClock } from '../manual-clock.js';
import type { Config } from '../../src/config/schema.js';
import { startRelay } from '../../src/main.js';
import { openStore } from '../../src/store/db.js';
import { DiskSpace, freePageBytes } from '../../src/store/disk.js';
import { claimDueBatches } from '../../src/store/delivery.js';
import { storeMetrics } from '../../src/store/queries.js';
import { capturedLog, closedPort, type DeepPartial, messageCount, openSession, SmtpClient, sendMail, startTestRelay, startUpstream, tempDir, testConfig, waitFor, writeDirect } from '../helpers.js';
import pino from 'pino';
import { call } from '../api/fixtures.js';

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

function limits(over: Partial<Config['rateLimits']>): DeepPartial<Config> {
  return { rateLimits: { enabled: true, maxPerHour: 1000, maxPerDay: 1000, globalMaxPerHour: 1000, globalMaxPerDay: 1000, ...over } };
}

async function mailFrom(port: number, sender: string): Promise<string> {
  const c = await SmtpClient.connect(port);
  await c.read();
  await c.send('EHLO limits.test');
  const reply = await c.send(`MAIL FROM:<${sender}>`);
  c.close();
  return reply;
}

function freeMbOf(dir: string): number {
  const { bavail, bsize } = fs.statfsSync(dir);
  return (bavail * bsize) / 2 ** 20;
}

const send = (port: number, from: string) => sendMail(port, { from, to: ['rcpt@example.com'] });

describe('rate limits', () => {
  const cases: Array<{ name: keyof Config['rateLimits']; window: number; global: boolean }> = [
    { name: 'maxPerHour', window: HOUR, global: false },
    { name: 'maxPerDay', window: DAY, global: false },
    { name: 'globalMaxPerHour', window: HOUR, global: true },
    { name: 'globalMaxPerDay', window: DAY, global: true },
  ];
  for (const { name, window, global } of cases) {
    test(`${name} 3: the 4th message gets 451 4.7.1 at MAIL FROM; a window later it passes`, async () => {
      const clock = new ManualClock(Date.UTC(2026, 5, 1, 12, 0, 0));
      const relay = await startTestRelay(limits({ [name]: 3 }), { clock });
      try {
        for (let i = 0; i < 3; i++) {
          await send(relay.smtpPort, global ? `s${i}@example.com` : 'Busy@Example.com');
          clock.advance(60_000);
        }
        const refused = await mailFrom(relay.smtpPort, global ? 'new@example.com' : 'busy@example.com');
        assert.match(refused, new RegExp(`^451 4\\.7\\.1 rate limit ${name} reached`));
        if (!global) assert.match(await mailFrom(relay.smtpPort, 'other@example.com'), /^250 /, 'another sender still passes');
        await waitFor(() => storeMetrics(relay.store.sqlite).rateLimitRefusals === 1, 10_000, 'the refusal to be counted');
        clock.advance(window - 60_000);
        assert.match(await mailFrom(relay.smtpPort, global ? 'new@example.com' : 'busy@example.com'), /^250 /);
      } finally {
        await relay.stop();
      }
    });
  }

  test('with several limits reached, the reply names the first in the order of the table: the sender\'s before the global ones, the hour before the day', async () => {
    const relay = await startTestRelay(limits({ maxPerHour: 1, maxPerDay: 1, globalMaxPerHour: 1, globalMaxPerDay: 1 }), { clock: new ManualClock() });
    try {
      await send(relay.smtpPort, 'busy@example.com');
      assert.match(await mailFrom(relay.smtpPort, 'busy@example.com'), /^451 4\.7\.1 rate limit maxPerHour reached/);
      assert.match(await mailFrom(relay.smtpPort, 'new@example.com'), /^451 4\.7\.1 rate limit globalMaxPerHour reached/);
    } finally {
      await relay.stop();
    }
  });

  test('the null sender <> is one sender', async () => {
    const relay = await startTestRelay(limits({ maxPerHour: 1 }), { clock: new ManualClock() });
    try {
      await sendMail(relay.smtpPort, { from: '', to: ['a@example.com'] });
      assert.match(await mailFrom(relay.smtpPort, ''), /^451 4\.7\.1 /);
    } finally {
      await relay.stop();
    }
  });

  test('a sender is one sender whatever the case of its address, an xn-- domain in capitals included', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay(limits({ maxPerHour: 2 }), { clock: new ManualClock(), logger: log.logger });
    try {
      await send(relay.smtpPort, 'H@münchen.de');
      await send(relay.smtpPort, 'h@XN--MNCHEN-3YA.DE');
      assert.match(await mailFrom(relay.smtpPort, 'h@Xn--Mnchen-3ya.de'), /^451 4\.7\.1 /);
      assert.match(await mailFrom(relay.smtpPort, 'h@xn--mnchen-3ya.de'), /^451 4\.7\.1 /);
      const keys = relay.store.sqlite.prepare('SELECT DISTINCT sender_key FROM messages').all();
      assert.deepEqual(keys, [{ sender_key: 'h@münchen.de' }]);
      // the refusal names the sender as smtp.accepted and the stored row do: the domain decoded
      const logged = log.entries().filter((e) => e.event === 'smtp.rate_limited' || e.event === 'smtp.accepted');
      assert.deepEqual(
        logged.map((e) => e.from ?? e.sender),
        ['H@münchen.de', 'h@münchen.de', 'h@münchen.de', 'h@münchen.de'],
      );
    } finally {
      await relay.stop();
    }
  });

  test('MAIL FROM checks the key its message would count under, also where IDNA maps a capital otherwise than its lower case', async () => {
    const relay = await startTestRelay(limits({ maxPerHour: 2 }), { clock: new ManualClock() });
    try {
      // IDNA maps Σ to σ, while lower case makes a final Σ ς, and ας-1.gr is a domain of its own
      await send(relay.smtpPort, 'app@ασ-1.gr');
      await send(relay.smtpPort, 'app@ασ-1.gr');
      assert.match(await mailFrom(relay.smtpPort, 'app@ΑΣ-1.GR'), /^451 4\.7\.1 /);
      assert.match(await mailFrom(relay.smtpPort, 'app@ας-1.gr'), /^250 /, 'another sender');
    } finally {
      await relay.stop();
    }
  });

  test('20 concurrent sessions of one sender with maxPerHour 5 → exactly 5 stored', async () => {
    const relay = await startTestRelay(limits({ maxPerHour: 5 }));
    try {
      const results = await Promise.allSettled(Array.from({ length: 20 }, () => send(relay.smtpPort, 'burst@example.com')));
      const ok = results.filter((r) => r.status === 'fulfilled');
      const refused = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
      assert.equal(ok.length, 5);
      for (const r of refused) assert.match(r.reason.response, /^451 4\.7\.1 /);
      assert.equal(messageCount(relay), 5);
    } finally {
      await relay.stop();
    }
  });

  test('a restart keeps the counts', async () => {
    const clock = new ManualClock();
    const config = testConfig(limits({ maxPerHour: 2 }));
    const logger = pino({ level: 'silent' });
    const first = await startRelay(config, { clock, logger });
    await send(first.smtpPort, 'a@example.com');
    await send(first.smtpPort, 'a@example.com');
    await first.stop();
    const second = await startRelay({ ...config }, { clock, logger });
    try {
      assert.match(await mailFrom(second.smtpPort, 'a@example.com'), /^451 4\.7\.1 /);
    } finally {
      await second.stop();
    }
  });

  test('rateLimits.enabled=false: no limit applies', async () => {
    const relay = await startTestRelay({ rateLimits: { enabled: false, maxPerHour: 1, maxPerDay: 1, globalMaxPerHour: 1, globalMaxPerDay: 1 } });
    try {
      for (let i = 0; i < 4; i++) await send(relay.smtpPort, 'a@example.com');
      assert.equal(messageCount(relay), 4);
    } finally {
      await relay.stop();
    }
  });
});

/**
 * Two sessions of one sender pass MAIL FROM before either sends its message; the first's is
 * stored. Resolves with the second's reply to its final dot.
 */
async function secondAfterFirst(port: number): Promise<string> {
  const [first, second] = await Promise.all([openSession(port), openSession(port)]);
  assert.match(await first.send('DATA'), /^354/);
  assert.match(await first.send('Subject: one\r\n\r\nbody\r\n.'), /^250 /);
  assert.match(await second.send('DATA'), /^354/);
  const reply = await second.send('Subject: two\r\n\r\nbody\r\n.');
  for (const c of [first, second]) c.close();
  return reply;
}

describe('backpressure', () => {
  test('queueSize 5 and 20 sessions that all passed MAIL FROM before any message was stored: exactly 5 stored, the rest 452 4.3.1 after DATA', async () => {
    const relay = await startTestRelay({ queueSize: 5 }, { startDelivery: false });
    try {
      const sessions = await Promise.all(Array.from({ length: 20 }, (_, i) => openSession(relay.smtpPort, `sender${i}@example.com`)));
      for (const c of sessions) assert.match(await c.send('DATA'), /^354/);
      const replies = await Promise.all(sessions.map((c) => c.send('Subject: race\r\n\r\nbody\r\n.')));
      for (const c of sessions) c.close();
      assert.equal(replies.filter((r) => r.startsWith('250 ')).length, 5, replies.join('\n'));
      for (const r of replies.filter((r) => !r.startsWith('250 '))) assert.match(r, /^452 4\.3\.1 /);
      assert.equal(messageCount(relay), 5);
    } finally {
      await relay.stop();
    }
  });

  test('a message both a full queue and a rate limit refuse after DATA gets the reply MAIL FROM would give: 452 4.3.1', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({ queueSize: 1, ...limits({ maxPerHour: 1 }) }, { startDelivery: false, clock: new ManualClock(), logger: log.logger });
    try {
      assert.match(await secondAfterFirst(relay.smtpPort), /^452 4\.3\.1 /);
      assert.match(await mailFrom(relay.smtpPort, 'sender@example.com'), /^452 4\.3\.1 /);
      // the refusal after DATA names the message it refused, as the other refusals there do; the one at MAIL has none yet
      const full = log.entries().filter((e) => e.event === 'smtp.queue_full');
      assert.equal(full.length, 2);
      assert.match(String(full[0].queueId), /^[0-9A-F]{20}$/);
      assert.equal(full[1].queueId, undefined);
    } finally {
      await relay.stop();
    }
  });

  test('a rate limit that another session reached while this one sent its message refuses it after DATA, naming its queueId', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay(limits({ maxPerHour: 1 }), { startDelivery: false, clock: new ManualClock(), logger: log.logger });
    try {
      assert.match(await secondAfterFirst(relay.smtpPort), /^451 4\.7\.1 /);
      const limited = log.entries().filter((e) => e.event === 'smtp.rate_limited');
      assert.equal(limited.length, 1);
      assert.match(String(limited[0].queueId), /^[0-9A-F]{20}$/);
      assert.equal(messageCount(relay), 1);
    } finally {
      await relay.stop();
    }
  });

  test('queueSize 10 with the upstream down: the 11th message gets 452 4.3.1; accepted again once the queue drains', async () => {
    // a port below the range handed out for port 0: no other test file's listener is given it
    // while the upstream is down (see closedPort)
    const port = await closedPort();
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { queueSize: 10, forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, batchDelay: 0, retry: { initialDelay: 1 } },
      { clock, startDelivery: false },
    );
    let upstream: Awaited<ReturnType<typeof startUpstream>> | undefined;
    try {
      for (let i = 0; i < 10; i++) await send(relay.smtpPort, 'a@example.com');
      await relay.delivery.runOnce();
      const deferred = relay.store.sqlite.prepare("SELECT COUNT(*) AS n FROM messages WHERE state = 'queued' AND claims > 0").get() as { n: number };
      assert.ok(deferred.n > 0, 'delivery was attempted and deferred');
      await assert.rejects(send(relay.smtpPort, 'a@example.com'), (err: { response: string }) => /^452 4\.3\.1 /.test(err.response));
      assert.equal(messageCount(relay), 10);
      await waitFor(() => storeMetrics(relay.store.sqlite).queueFullRefusals === 1, 10_000, 'the refusal to be counted');
      // the upstream comes back and the queue drains
      upstream = await startUpstream({}, port);
      for (let round = 0; round < 20 && storeMetrics(relay.store.sqlite).queue.delivered < 10; round++) {
        clock.advance(5_000);
        await relay.delivery.runOnce();
      }
      assert.equal(storeMetrics(relay.store.sqlite).queue.delivered, 10);
      await send(relay.smtpPort, 'a@example.com');
      assert.equal(messageCount(relay), 11);
    } finally {
      await relay.stop();
      await upstream?.close();
    }
  });

  test('queueSize counts the messages being sent as well as the queued ones', async () => {
    const clock = new ManualClock();
    const log = capturedLog('info');
    const relay = await startTestRelay({ queueSize: 3 }, { clock, startDelivery: false, logger: log.logger });
    try {
      for (let i = 0; i < 3; i++) await send(relay.smtpPort, 'a@example.com');
      // two of the three are claimed, as a delivery worker claims them: 'sending'
      const claimed = await writeDirect(relay, (db) =>
        claimDueBatches(db, { now: clock.now(), leaseMs: 60_000, batchSize: 20, limit: 2, maxAttempts: 10, eraseRawOnDelivered: false, newToken: () => 'worker' }),
      );
      assert.equal(claimed.batches.length, 2);
      const { queued, sending } = storeMetrics(relay.store.sqlite).queue;
      assert.deepEqual([queued, sending], [1, 2]);
      await assert.rejects(send(relay.smtpPort, 'a@example.com'), (err: { response: string }) => /^452 4\.3\.1 /.test(err.response));
      assert.equal(messageCount(relay), 3);
      // refusing all mail is worth a warning, as a rate limit is
      const full = log.entries().filter((e) => e.event === 'smtp.queue_full');
      assert.deepEqual(full.map((e) => [e.level, e.sender, e.queueSize]), [[40, 'a@example.com', 3]]);
      // the session id ties each line of a session to its closing line
      const sessionLines = () => log.entries().filter((e) => e.event === 'smtp.session');
      await waitFor(() => sessionLines().length === 4, 10_000, 'four closed sessions');
      const sessions = new Map(sessionLines().map((e) => [e.session, e]));
      const accepted = log.entries().filter((e) => e.event === 'smtp.accepted');
      assert.deepEqual(accepted.map((e) => sessions.get(e.session)?.accepted), [1, 1, 1]);
      assert.match(String((sessions.get(full[0].session)?.replies as string[] | undefined)?.[0]), /^452 4\.3\.1 /);
    } finally {
      await relay.stop();
    }
  });

  test('free disk below minFreeDiskMb → 452 4.3.1 and nothing written', async () => {
    const relay = await startTestRelay({ minFreeDiskMb: 100_000_000 });
    try {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      await c.send('EHLO disk.test');
      assert.match(await c.send('MAIL FROM:<a@example.com>'), /^452 4\.3\.1 /);
      assert.match(await c.send('MAIL FROM:<a@example.com>'), /^452 4\.3\.1 /);
      c.close();
      assert.equal(messageCount(relay), 0);
      // counted, for /metrics and relayq status (a counter row is small enough to fit still)
      await waitFor(() => storeMetrics(relay.store.sqlite).diskLowRefusals === 2, 10_000, 'the refusals to be counted');
      const metrics = await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics?format=prometheus`)).text();
      assert.match(metrics, /^relayq_refusals_total\{reason="disk_low"\} 2$/m);
    } finally {
      await relay.stop();
    }
  });

  test('a MAIL FROM whose SIZE would take free disk below minFreeDiskMb → 452 4.3.1; a smaller one, or none, is taken', async (t) => {
    const dir = tempDir();
    // the filesystem's free space held still: other work on this disk would move it meanwhile
    const real = fs.statfsSync(dir);
    t.mock.method(fs, 'statfsSync', () => real);
    const freeMb = Math.floor((real.bavail * real.bsize) / 2 ** 20);
    // 300 MB above the floor: 490 MB do not fit, 1 KB and 100 MB do
    const log = capturedLog('info');
    const relay = await startTestRelay({ minFreeDiskMb: Math.max(1, freeMb - 300), maxMessageSize: 500 * 2 ** 20 }, { startDelivery: false, logger: log.logger });
    try {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      await c.send('EHLO disk.test');
      assert.match(await c.send(`MAIL FROM:<a@example.com> SIZE=${490 * 2 ** 20}`), /^452 4\.3\.1 Insufficient system storage/);
      const [refusal] = log.entries().filter((e) => e.event === 'smtp.disk_low');
      assert.deepEqual([refusal?.msg, refusal?.size], ['refusing mail: its declared SIZE would take free disk space below minFreeDiskMb', 490 * 2 ** 20]);
      assert.match(await c.send('MAIL FROM:<a@example.com> SIZE=1024'), /^250 /);
      assert.match(await c.send('RSET'), /^250 /);
      assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
      c.close();
      // each MAIL FROM is weighed on its own, as Postfix weighs SIZE against queue_minfree: three
      // sessions that declared 100 MB each and then wait do not refuse a fourth (with the sizes
      // counted together, idle sessions could refuse every client that declares one)
      const sessions = [];
      for (let i = 0; i < 4; i++) {
        const s = await SmtpClient.connect(relay.smtpPort);
        await s.read();
        await s.send('EHLO disk.test');
        assert.match(await s.send(`MAIL FROM:<s${i}@example.com> SIZE=${100 * 2 ** 20}`), /^250 /, `session ${i}`);
        sessions.push(s);
      }
      for (const s of sessions) s.close();
    } finally {
      await relay.stop();
    }
  });

  test('free pages inside the database count as free space: a file grown to the floor and emptied takes mail again', async () => {
    const dir = tempDir();
    const databasePath = path.join(dir, 'relayq.db');
    // 48 MiB the file grew by and then gave back (as delivered content erased, or retention)
    const store = await openStore(databasePath);
    store.sqlite.exec(`CREATE TABLE scratch (b BLOB);
      WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 48) INSERT INTO scratch SELECT zeroblob(1048576) FROM n;
      DROP TABLE scratch`);
    const freePagesMb = freePageBytes(store.sqlite) / 2 ** 20;
    await store.close();
    assert.ok(freePagesMb >= 48, `free pages: ${freePagesMb} MiB`);
    const relay = await startTestRelay({ databasePath, minFreeDiskMb: 1 }, { startDelivery: false });
    try {
      await sleep(1100); // past the sample the start took
      const before = freeMbOf(dir);
      const { details } = (await call<{ details: { disk_space_available_mb: number } }>(relay, '/health')).body;
      const after = freeMbOf(dir);
      // the filesystem's free space then, and the file's free pages
      assert.ok(
        details.disk_space_available_mb >= Math.floor(Math.min(before, after) + freePagesMb) - 1 && details.disk_space_available_mb <= Math.max(before, after) + freePagesMb,
        `${details.disk_space_available_mb} MB, with ${before}-${after} MB free on the filesystem and ${freePagesMb} MiB of free pages`,
      );
    } finally {
      await relay.stop();
    }
    // the floor weighs the two together (the filesystem alone is checked for room for a message)
    const floor = Math.floor(freeMbOf(dir)) + 1000;
    const disk = (reusable: number) => new DiskSpace({ databasePath, minFreeMb: floor, reusableBytes: () => reusable });
    assert.equal(disk(2 ** 50).isLow(), false);
    assert.equal(disk(0).isLow(), true);
    // refused below minFreeDiskMb, not at it (free space is sampled once a second: one sample here)
    const options = { databasePath, minFreeMb: 1 };
    const sampled = new DiskSpace(options);
    const free = sampled.freeMb();
    options.minFreeMb = free;
    assert.equal(sampled.isLow(), false, `${free} MB free, minFreeDiskMb ${free}`);
    options.minFreeMb = free + 1;
    assert.equal(sampled.isLow(), true);
  });

  test('each message stored counts against free space at once, not only at the next sample: a fast client does not run past the floor for a second', (t) => {
    const dir = tempDir();
    const real = fs.statfsSync(dir);
    t.mock.method(fs, 'statfsSync', () => real);
    let now = 60_000;
    const options = { databasePath: path.join(dir, 'relayq.db'), minFreeMb: 1, now: () => now };
    const disk = new DiskSpace(options);
    options.minFreeMb = disk.freeMb() - 100;
    assert.equal(disk.isLow(), false);
    disk.noteStored(60 * 2 ** 20);
    assert.equal(disk.isLow(), false, '40 MB above the floor');
    disk.noteStored(60 * 2 ** 20);
    assert.equal(disk.isLow(), true, '20 MB below it until the next sample');
    disk.noteStored(disk.freeMb() * 2 ** 20 + 2 ** 20);
    assert.equal(disk.freeMb(), 0, 'reported as none, not below');
    now += 1000;
    assert.equal(disk.isLow(), false, 'the next sample reads the filesystem again, where nothing was written');
  });

  test("the database file's free pages do not stand in for the filesystem's room for a message: the WAL, and the spool first, need it", () => {
    const dir = tempDir();
    const fsFree = freeMbOf(dir) * 2 ** 20;
    // a file with free pages far beyond any message, on a filesystem that has what it has
    const disk = (spoolAfter: number) =>
      new DiskSpace({ databasePath: path.join(dir, 'relayq.db'), minFreeMb: 1, spoolDir: path.join(dir, 'relayq.db-spool'), spoolAfter, reusableBytes: () => 2 ** 50 });
    assert.equal(disk(0).isLow(1024), false);
    assert.equal(disk(0).isLow(fsFree * 0.75), false, 'held in memory, it needs its size once: in the WAL');
    assert.equal(disk(0).isLow(fsFree * 1.25), true, 'more than the filesystem holds');
    assert.equal(disk(1).isLow(fsFree * 0.75), true, 'spooled, it needs its size twice: the spool file and the WAL');
    assert.equal(disk(1).isLow(fsFree * 0.25), false);
  });

  test('a databasePath that is a symbolic link is weighed by the free space where the file is', async (t) => {
    // a link in the temp dir to a database on /dev/shm, when that is a filesystem of its own
    const shm = '/dev/shm';
    const dir = tempDir();
    let shmFree: number;
    try {
      if (fs.statfsSync(shm).type === fs.statfsSync(dir).type) return t.skip(`${shm} is not a filesystem of its own here`);
      shmFree = freeMbOf(shm);
    } catch {
      return t.skip(`no ${shm} here`);
    }
    const linkFree = freeMbOf(dir);
    if (Math.abs(linkFree - shmFree) < 1024) return t.skip('the two filesystems have about as much free space');
    const real = fs.mkdtempSync(path.join(shm, 'relayq-test-'));
    t.after(() => fs.rmSync(real, { recursive: true, force: true }));
    await (await openStore(path.join(real, 'relayq.db'))).close();
    const databasePath = path.join(dir, 'relayq.db');
    fs.symlinkSync(path.join(real, 'relayq.db'), databasePath);
    // a floor between the two: mail is refused when the target's filesystem has less, taken when more
    const relay = await startTestRelay({ databasePath, minFreeDiskMb: Math.round((linkFree + shmFree) / 2) }, { startDelivery: false });
    try {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      await c.send('EHLO disk.test');
      assert.match(await c.send('MAIL FROM:<a@example.com>'), shmFree < linkFree ? /^452 4\.3\.1 / : /^250 /);
      c.close();
    } finally {
      await relay.stop();
    }
  });
});
