// The database refuses writes: every message in flight gets 451 4.3.0, nothing of it is stored
// (no message row without its recipients, no counter moved), and intake recovers on its own as
// soon as the fault clears.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, type TestContext, test } from 'node:test';
import type { Relay } from '../../src/main.js';
import { newQueueId } from '../../src/store/intake.js';
import { openConnection } from '../../src/store/db.js';
import {
  capturedLog,
  closedPort,
  holdWriteLock,
  messageCount,
  newMessage,
  openSession,
  sendMail,
  SmtpClient,
  spawnRelay,
  startHoldingUpstream,
  startTestRelay,
  tempDir,
  waitFor,
} from '../helpers.js';
import { runCli } from '../cli/run-cli.js';
import { assertStillServing, INTAKE_ONLY, queuedId } from './smtp-session.js';

type SmtpError = Error & { responseCode?: number; response?: string };

/** Everything that must move together when a message is stored, or not at all. */
function footprint(relay: Relay) {
  const q = (sql: string) => (relay.store.sqlite.prepare(sql).get() as { n: number }).n;
  return {
    messages: q('SELECT COUNT(*) AS n FROM messages'),
    recipients: q('SELECT COUNT(*) AS n FROM recipients'),
    orphans: q('SELECT COUNT(*) AS n FROM recipients WHERE message_id NOT IN (SELECT id FROM messages)'),
    incomplete: q('SELECT COUNT(*) AS n FROM messages m WHERE recipient_count <> (SELECT COUNT(*) FROM recipients r WHERE r.message_id = m.id)'),
    accepted: q("SELECT value AS n FROM counters WHERE name = 'messages_accepted'"),
    queued: q("SELECT value AS n FROM counters WHERE name = 'state_queued'"),
    buckets: q("SELECT COALESCE(SUM(count), 0) AS n FROM rate_buckets WHERE sender_key = '*'"),
    hours: q("SELECT COALESCE(SUM(count), 0) AS n FROM rate_hours WHERE sender_key = '*'"),
  };
}

function assertConsistent(relay: Relay) {
  const f = footprint(relay);
  assert.equal(f.orphans, 0, 'recipients without their message');
  assert.equal(f.incomplete, 0, 'messages without all their recipients');
  assert.equal(f.accepted, f.messages, 'messages_accepted counter');
  assert.equal(f.queued, f.messages, 'state_queued counter (nothing is delivered here)');
  assert.equal(f.buckets, f.messages, 'rate buckets');
  assert.equal(f.hours, f.messages, 'hourly rate buckets');
}

/** The failed stores /metrics counts, in its JSON and its Prometheus form (which must agree). */
async function storeFailures(relay: Relay): Promise<number> {
  const json = (await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics`)).json()) as { intake_store_failures: number };
  const text = await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics?format=prometheus`)).text();
  assert.match(text, new RegExp(`^relayq_intake_store_failures_total ${json.intake_store_failures}$`, 'm'));
  return json.intake_store_failures;
}

async function refusedWith451(promise: Promise<unknown>) {
  await assert.rejects(promise, (err: SmtpError) => {
    assert.match(err.response ?? '', /^451 4\.3\.0 /);
    return true;
  });
}

const recipients = (n: number) => Array.from({ length: n }, (_, i) => `rcpt${i}@example.com`);

describe('storage faults', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay(undefined, INTAKE_ONLY);
  });
  after(() => relay.stop());

  test('every commit is fsynced before its 250: the writing connection runs WAL with synchronous=FULL', async () => {
    // a power cut, which no test here can cause, would lose what NORMAL had not synced yet
    assert.equal(await relay.writer.pragma('journal_mode'), 'wal');
    assert.equal(await relay.writer.pragma('synchronous'), 2);
    assert.equal(relay.store.sqlite.pragma('synchronous', { simple: true }), 2, 'the main thread writes too (claims in tests, the CLI)');
  });

  test('a read-only database → 451 4.3.0 for every concurrent session, nothing stored, each counted in /metrics; all pass once writable again', async () => {
    const before = footprint(relay);
    const failedBefore = await storeFailures(relay);
    await relay.writer.pragma('query_only = ON');
    try {
      await Promise.all(
        Array.from({ length: 10 }, (_, i) => refusedWith451(sendMail(relay.smtpPort, { from: `s${i}@example.com`, to: recipients(3) }))),
      );
      assert.deepEqual(footprint(relay), before);
      assert.equal(await storeFailures(relay), failedBefore + 10);
    } finally {
      await relay.writer.pragma('query_only = OFF');
    }
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) => sendMail(relay.smtpPort, { from: `s${i}@example.com`, to: recipients(3) })),
    );
    assert.ok(results.every((r) => queuedId(r.response)));
    assert.equal(footprint(relay).messages, before.messages + 10);
    assert.equal(await storeFailures(relay), failedBefore + 10, 'the messages stored are not counted');
    assertConsistent(relay);
  });

  test('a full database (max_page_count): each message is stored whole or refused whole', async () => {
    const sqlite = relay.store.sqlite;
    const maxBefore = (await relay.writer.pragma('max_page_count')) as number;
    let refused = 0;
    let accepted = 0;
    try {
      // a growing page budget: below the boundary the message row may fit while its recipients
      // do not; the first budget that holds everything must store it whole
      for (let extra = 0; extra <= 40 && accepted === 0; extra++) {
        const pages = (await relay.writer.pragma('page_count')) as number;
        await relay.writer.pragma(`max_page_count = ${pages + extra}`);
        const before = footprint(relay);
        try {
          const info = await sendMail(relay.smtpPort, { to: recipients(400), text: 'y'.repeat(6000) });
          const id = queuedId(info.response);
          assert.ok(id);
          const n = sqlite.prepare('SELECT COUNT(*) AS n FROM recipients WHERE message_id = ?').get(id) as { n: number };
          assert.equal(n.n, 400);
          accepted++;
        } catch (err) {
          assert.match((err as SmtpError).response ?? '', /^451 4\.3\.0 /, String(err));
          assert.deepEqual(footprint(relay), before);
          refused++;
        }
        assertConsistent(relay);
      }
    } finally {
      await relay.writer.pragma(`max_page_count = ${maxBefore}`);
    }
    assert.ok(refused > 1, 'the fault was hit at more than one budget');
    assert.equal(accepted, 1, 'a large enough budget stores the message');
    await assertStillServing(relay);
    assertConsistent(relay);
  });

  test('in one group commit, an operation that does not fit fails alone or takes the others with it, never half', async () => {
    const sqlite = relay.store.sqlite;
    const maxBefore = (await relay.writer.pragma('max_page_count')) as number;
    const now = relay.clock.now();
    const message = (raw: Buffer, n: number) => newMessage({ id: newQueueId(now), mailFrom: 'group@example.com', recipients: recipients(n), raw, receivedAt: now });
    const policy = { rateLimits: relay.config.rateLimits, queueSize: 0 };
    const small = message(Buffer.from('Subject: small\r\n\r\nsmall\r\n'), 1);
    const large = message(Buffer.alloc(512 * 1024, 'x'), 50);
    const pages = (await relay.writer.pragma('page_count')) as number;
    await relay.writer.pragma(`max_page_count = ${pages + 4}`);
    let outcomes: PromiseSettledResult<string>[];
    try {
      // sent to the writer together: one transaction, one savepoint each
      outcomes = await Promise.allSettled([
        relay.writer.write('insertMessage', small, policy),
        relay.writer.write('insertMessage', large, policy),
      ]);
    } finally {
      await relay.writer.pragma(`max_page_count = ${maxBefore}`);
    }
    assert.equal(outcomes[1].status, 'rejected');
    for (const [i, msg] of [small, large].entries()) {
      const stored = (sqlite.prepare('SELECT COUNT(*) AS n FROM messages WHERE id = ?').get(msg.id) as { n: number }).n;
      assert.equal(stored, outcomes[i].status === 'fulfilled' ? 1 : 0, `message ${i}: resolved ⇔ stored`);
    }
    assertConsistent(relay);
    await assertStillServing(relay);
  });

  test('another process holding the write lock past the busy timeout → 451 4.3.0; served again once it lets go', async () => {
    const before = footprint(relay);
    const lock = await holdWriteLock(relay);
    try {
      const c = await openSession(relay.smtpPort);
      assert.match(await c.send('DATA'), /^354 /);
      c.write('Subject: locked out\r\n\r\nbody\r\n.\r\n');
      // the commit waits for busy_timeout (5 s) before it gives up
      assert.match(await c.read(30_000), /^451 4\.3\.0 /);
      c.close();
      assert.equal(messageCount(relay), before.messages);
    } finally {
      await lock.release();
    }
    await assertStillServing(relay);
    assertConsistent(relay);
  });
});

test('the writer thread dies: the relay says so once, refuses mail with 451 4.3.0, and still stops in order', async () => {
  const fatal: Error[] = [];
  const relay = await startTestRelay({}, { ...INTAKE_ONLY, onFatal: (err) => fatal.push(err) });
  try {
    const before = messageCount(relay);
    // what an out-of-memory abort or a crash in native code would do to the thread
    await (relay.writer as unknown as { worker: import('node:worker_threads').Worker }).worker.terminate();
    assert.equal(fatal.length, 1);
    assert.match(fatal[0].message, /writer thread exited/);
    await assert.rejects(sendMail(relay.smtpPort, { to: ['a@example.com'] }), (err: SmtpError) => {
      assert.equal(err.responseCode, 451);
      assert.match(err.response ?? '', /^451 4\.3\.0 /);
      return true;
    });
    assert.equal(messageCount(relay), before);
  } finally {
    await relay.stop();
  }
  assert.equal(fatal.length, 1, 'not again at shutdown');
});

test('claims that fail at once (a read-only database) are tried again after a pause that doubles, not in a loop; logged at each failure while the pause grows, then once a minute', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: await closedPort() },
    { logger: log.logger, startDelivery: false, startRetention: false },
  );
  try {
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
    await relay.writer.pragma('query_only = ON');
    relay.delivery.start();
    const failures = () => log.entries().filter((e) => e.event === 'delivery.claim_failed');
    await waitFor(() => failures().length >= 7, 15_000, 'seven failed claims');
    const seen = failures();
    const waits = seen.map((e) => e.retryInMs as number);
    assert.deepEqual(waits, [100, 200, 400, 800, 1600, 3200, 5000], 'each wait twice the one before, up to 5 s');
    assert.deepEqual(seen.map((e) => e.tries), [1, 2, 3, 4, 5, 6, 7]);
    // and no claim came sooner (a timer never fires early; pino's time is in ms)
    for (let i = 1; i < seen.length; i++) {
      const gap = (seen[i].time as number) - (seen[i - 1].time as number);
      assert.ok(gap >= waits[i - 1] - 1, `claim ${i + 1} came ${gap} ms after the one before, not after the ${waits[i - 1]} ms pause`);
    }
    // the eighth failure, 5 s after the seventh, is not logged: the next line would come a minute after the last
    await new Promise((resolve) => setTimeout(resolve, 5_500));
    await relay.writer.pragma('query_only = OFF');
    const claims = () => (relay.store.sqlite.prepare('SELECT claims FROM messages WHERE id = ?').get(id) as { claims: number }).claims;
    await waitFor(() => claims() > 0, 10_000, 'a claim once the database takes writes again');
    const [resumed] = log.entries().filter((e) => e.event === 'delivery.claims_resumed');
    assert.equal(resumed?.tries, 8, 'eight failed claims before the one that worked');
    assert.ok((resumed?.failedForMs as number) >= 11_000, `failing since the first: ${resumed?.failedForMs} ms`);
    assert.equal(failures().length, 7, 'the eighth was not logged');
  } finally {
    await relay.stop();
  }
});

test('a read that fails while looking for due work (the schema changed under the relay) pauses claims, and the attempt in flight still ends', async () => {
  const upstream = await startHoldingUpstream();
  const log = capturedLog('info');
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port },
    { logger: log.logger, startRetention: false },
  );
  // another process, as a newer relayq's migration would: the queries for due work name this index
  const other = openConnection(relay.config.databasePath);
  const state = (id: string) => (relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').get(id) as { state: string }).state;
  try {
    const held = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response) as string;
    await waitFor(() => relay.delivery.holds(held), 10_000, 'the attempt in flight');
    other.exec('DROP INDEX messages_due');
    const failures = () => log.entries().filter((e) => e.event === 'delivery.claim_failed');
    // the poll's read fails (it threw out of a timer and ended the process)
    await waitFor(() => failures().length >= 1, 10_000, 'a failed look for due work');
    assert.match(String(failures()[0].err), /no such index: messages_due/);
    // the answer frees a slot, whose look for work fails too; the attempt's outcome is committed all the same
    upstream.release();
    await waitFor(() => state(held) === 'delivered', 10_000, 'the held message delivered');
    await waitFor(() => relay.delivery.status().inFlight === 0, 10_000, 'no attempt left in flight');
    assert.equal(relay.delivery.holds(held), false);
    const waits = failures().map((e) => e.retryInMs as number);
    assert.deepEqual(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000].slice(0, waits.length), 'paused, not tried at every turn');

    other.exec(`CREATE INDEX messages_due ON messages (next_attempt_at) WHERE state = 'queued'`);
    // with nothing due, the next look that works ends the pause: /health no longer degraded, and said once
    await waitFor(() => relay.delivery.claimFailure() === null, 15_000, 'claims working again with nothing due');
    const resumed = log.entries().filter((e) => e.event === 'delivery.claims_resumed');
    assert.equal(resumed.length, 1);
    assert.ok((resumed[0].tries as number) >= failures().length, 'every failure counted');
    const next = queuedId((await sendMail(relay.smtpPort, { to: ['b@example.com'] })).response) as string;
    await waitFor(() => state(next) === 'delivered', 15_000, 'mail delivered once the reads work again');
  } finally {
    other.close();
    await relay.stop();
    await upstream.close();
  }
});

test('a MAIL whose checks cannot read the database gets 451 4.3.0, an error line and a count in /metrics; served again once they can', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({ rateLimits: { enabled: true }, queueSize: 100 }, { logger: log.logger, startDelivery: false });
  const other = openConnection(relay.config.databasePath);
  try {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO faults.test');
    // another process changes the schema under the relay, as a newer relayq's migration might
    for (const [table, away] of [['rate_hours', 'rate_hours_away'], ['counters', 'counters_away']]) {
      other.exec(`ALTER TABLE ${table} RENAME TO ${away}`);
      assert.match(await c.send('MAIL FROM:<app@example.com>'), /^451 4\.3\.0 /, table);
      const failed = log.entries().filter((e) => e.event === 'smtp.store_failed');
      assert.equal(failed.at(-1)?.level, 50);
      assert.match(String(failed.at(-1)?.err), new RegExp(table), table);
      other.exec(`ALTER TABLE ${away} RENAME TO ${table}`);
    }
    assert.match(await c.send('MAIL FROM:<app@example.com>'), /^250 /);
    assert.equal(await storeFailures(relay), 2);
    c.close();
  } finally {
    other.close();
    await relay.stop();
  }
});

/**
 * Runs `fn` with `dataDir`, a directory in the fresh temp dir `dir`, on an 8 MB tmpfs of its own
 * (a disk to fill, a file system to remount read-only), unmounted after; skipped where mounting
 * one needs root.
 */
async function onSmallTmpfs(t: TestContext, fn: (dir: string, dataDir: string) => Promise<void>): Promise<void> {
  const dir = tempDir();
  const dataDir = path.join(dir, 'data');
  fs.mkdirSync(dataDir);
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m,mode=0700', 'tmpfs', dataDir], { stdio: 'ignore' });
  } catch {
    t.skip('mounting a tmpfs needs root');
    return;
  }
  try {
    await fn(dir, dataDir);
  } finally {
    execFileSync('umount', [dataDir]);
  }
}

test('a start that cannot hand back the claims of a killed relay for lack of room still starts, and logs why', (t) =>
  onSmallTmpfs(t, async (dir, dataDir) => {
    let db: ReturnType<typeof openConnection> | undefined;
    try {
      const databasePath = path.join(dataDir, 'relayq.db');
      const relay = await startTestRelay({ databasePath }, { startDelivery: false, startRetention: false });
      try {
        for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: ['a@example.com'] });
      } finally {
        await relay.stop();
      }
      // as a relay killed while delivering leaves them: claimed, their lease running; and received
      // an hour ahead of the clock now (stepped back since), which the start warns of all the same
      db = openConnection(databasePath);
      db.prepare("UPDATE messages SET state = 'sending', claims = 1, lease_token = 'killed', lease_expires_at = ?, received_at = received_at + 3600000").run(
        Date.now() + 3_600_000,
      );
      // kept open until the end: closed now it would remove the -wal and -shm files, which a
      // killed relay leaves behind (and a full disk has no room to make again)
      const filler = fs.openSync(path.join(dataDir, 'filler'), 'w');
      try {
        for (;;) fs.writeSync(filler, Buffer.alloc(65536));
      } catch (err) {
        assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
      } finally {
        fs.closeSync(filler);
      }
      // it exited 1 here: "databasePath …: database or disk is full"
      const restarted = await spawnRelay(dir, ['--databasePath', databasePath]);
      try {
        const line = restarted
          .output()
          .split('\n')
          .find((l) => l.includes('"delivery.claims_not_recovered"'));
        assert.ok(line, restarted.output());
        assert.match(JSON.parse(line).err, /database or disk is full/);
        assert.match(restarted.output(), /"event":"relay\.clock_behind"/);
      } finally {
        await restarted.kill('SIGKILL');
      }
    } finally {
      db?.close();
    }
  }));

test('on a file system that turned read-only, the start and every command say so, and the mail stays readable in a copy', (t) =>
  onSmallTmpfs(t, async (_dir, dataDir) => {
    const databasePath = path.join(dataDir, 'relayq.db');
    const relay = await startTestRelay({ databasePath }, { startDelivery: false, startRetention: false });
    let id: string;
    try {
      const reply = (await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response;
      id = queuedId(reply) ?? assert.fail(reply);
    } finally {
      await relay.stop();
    }
    // as an ext4 errors=remount-ro does (the lock file stays from the first start)
    execFileSync('mount', ['-o', 'remount,ro', dataDir]);
    const serve = await runCli(['serve', '--smtpPort', '0', '--enableHealthCheck', 'false', '--databasePath', databasePath]);
    assert.equal(serve.code, 1, serve.stderr);
    assert.match(serve.stderr, new RegExp(`^relayq: databasePath \\S+: ${databasePath}-lock: EROFS: read-only file system, open `, 'm'));
    const readOnly = `${dataDir} is on a read-only file system`;
    for (const args of [['delete', id], ['retry', '--queued']]) {
      const run = await runCli([...args, '--databasePath', databasePath]);
      assert.deepEqual([run.code, run.stderr], [1, `relayq: cannot open database ${databasePath}: cannot write to it (unable to open database file): ${readOnly}\n`], args[0]);
    }
    const status = await runCli(['status', '--databasePath', databasePath]);
    assert.deepEqual(
      [status.code, status.stderr],
      [1, `relayq: cannot read database ${databasePath}: unable to open database file (to read a database in WAL mode SQLite needs relayq.db-shm beside it, and ${readOnly}); copy relayq.db, and its -wal if there is one, to another directory and read the copy\n`],
    );
    const copy = path.join(tempDir(), 'relayq.db');
    fs.copyFileSync(databasePath, copy);
    const shown = await runCli(['show', id, '--databasePath', copy]);
    assert.equal(shown.code, 0, shown.stderr);
    assert.match(shown.stdout, /state: +queued/);
  }));

test('/health says error while the database refuses messages for lack of room, though its small probe still commits', async () => {
  const relay = await startTestRelay(undefined, INTAKE_ONLY);
  const health = async () => {
    const res = await fetch(`http://127.0.0.1:${relay.httpPort}/health`);
    return { status: res.status, body: (await res.json()) as { status: string; details: { database: string; warnings: string[] } } };
  };
  try {
    const maxBefore = (await relay.writer.pragma('max_page_count')) as number;
    await relay.writer.pragma(`max_page_count = ${(await relay.writer.pragma('page_count')) as number}`);
    try {
      await refusedWith451(sendMail(relay.smtpPort, { to: recipients(50), text: 'y'.repeat(20_000) }));
      // small writes still fit: the health check's own, and a claim (delivery goes on draining)
      await relay.writer.write('probeWrite');
      await relay.writer.write('claimDueBatches', { now: Date.now(), leaseMs: 60_000, batchSize: 10, limit: 1, maxAttempts: 5, eraseRawOnDelivered: false });
      const full = await health();
      assert.equal(full.status, 503);
      assert.equal(full.body.status, 'error');
      assert.equal(full.body.details.database, 'error');
      assert.ok(full.body.details.warnings.some((w) => /^the database refused a write in the last minute: .*full/.test(w)), String(full.body.details.warnings));
    } finally {
      await relay.writer.pragma(`max_page_count = ${maxBefore}`);
    }
    // a message stored clears it
    await sendMail(relay.smtpPort, { to: recipients(50), text: 'y'.repeat(20_000) });
    const again = await health();
    assert.equal(again.status, 200);
    assert.equal(again.body.details.database, 'ok');
  } finally {
    await relay.stop();
  }
});

test('the database file removed or replaced while the relay runs: new mail is refused 451 4.3.0 and /health says error; the mail queued before is still delivered; put back, all is well; its WAL removed, refused again', async () => {
  const relay = await startTestRelay({}, INTAKE_ONLY);
  const file = relay.config.databasePath;
  const health = async () => {
    const res = await fetch(`http://127.0.0.1:${relay.httpPort}/health`);
    return { status: res.status, body: (await res.json()) as { details: { database: string; warnings: string[] } } };
  };
  try {
    const queued = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
    // removed (moved away), then replaced (another file at its path)
    for (const change of [(f: string) => fs.renameSync(f, `${f}.moved`), (f: string) => fs.copyFileSync(`${f}.moved`, f)]) {
      change(file);
      const before = messageCount(relay);
      await refusedWith451(sendMail(relay.smtpPort, { to: ['b@example.com'] }));
      assert.equal(messageCount(relay), before, 'nothing stored in the file the next start would not find');
      const refused = await health();
      assert.equal(refused.status, 503);
      assert.equal(refused.body.details.database, 'error');
      assert.ok(refused.body.details.warnings.some((w) => w.includes(`the database file ${file} was removed or replaced while relayq runs`)), String(refused.body.details.warnings));
      if (fs.existsSync(file)) fs.rmSync(file); // the copy: another file at the path
    }
    // what was queued before still goes, from the file the relay has open
    await relay.delivery.runOnce();
    assert.equal((relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').get(queued) as { state: string }).state, 'delivered');
    fs.renameSync(`${file}.moved`, file);
    assert.match((await sendMail(relay.smtpPort, { to: ['c@example.com'] })).response, /^250 /);
    assert.equal((await health()).status, 200);
    // its directory moved away and a file in its place: the path leads to no file (ENOTDIR)
    const dir = path.dirname(file);
    fs.renameSync(dir, `${dir}.away`);
    fs.writeFileSync(dir, '');
    try {
      await refusedWith451(sendMail(relay.smtpPort, { to: ['c2@example.com'] }));
    } finally {
      fs.rmSync(dir);
      fs.renameSync(`${dir}.away`, dir);
    }
    assert.match((await sendMail(relay.smtpPort, { to: ['c3@example.com'] })).response, /^250 /);
    // the WAL removed, as a restore does: what is committed now would be lost with it
    fs.rmSync(`${file}-wal`);
    await refusedWith451(sendMail(relay.smtpPort, { to: ['d@example.com'] }));
    assert.equal((await health()).status, 503);
  } finally {
    await relay.stop();
  }
});
