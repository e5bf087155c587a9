import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { ManualClock } from '../manual-clock.js';
import type { Relay } from '../../src/main.js';
import { deleteMessage } from '../../src/store/admin.js';
import { openConnection, type Sqlite } from '../../src/store/db.js';
import {
  type ClaimOptions,
  claimDueBatches,
  completeBatch,
  hasDueWork,
  recordDelivered,
  releaseClaims,
  releaseOrphanedClaims,
  SELECT_DUE_SQL,
  SELECT_NEW_SQL,
  SELECT_EXPIRED_SQL,
} from '../../src/store/delivery.js';
import { prepared } from '../../src/store/statements.js';
import { ownMemory } from '../../src/store/write-ops.js';
import { capturedLog, holdWriteLock, sendMail, spawnRelay, startTestRelay, startUpstream, tempDir, testConfig, waitFor, writeDirect } from '../helpers.js';
import { attempts, failedExportExists, message, NO_JITTER, queuedId, recipients, type ScriptedUpstream, startScriptedUpstream } from './fixtures.js';

describe('claims and leases', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function relayWithMail(overrides: Parameters<typeof startTestRelay>[0] = {}, to = ['a@example.com', 'b@example.com', 'c@example.com']) {
    const clock = new ManualClock();
    const relay = await startTestRelay({ processingTimeout: 60, ...overrides }, { clock, startDelivery: false, startRetention: false, random: NO_JITTER });
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to, raw: 'Subject: lease\r\n\r\nbody\r\n' })).response);
    return { clock, relay, id };
  }

  let tokens = 0;
  function claimOptions(clock: ManualClock, overrides: Partial<ClaimOptions> = {}): ClaimOptions {
    return { now: clock.now(), leaseMs: 60_000, batchSize: 2, limit: 5, maxAttempts: 10, eraseRawOnDelivered: false, newToken: () => `token-${++tokens}`, ...overrides };
  }

  function claim(relay: Relay, options: ClaimOptions) {
    return writeDirect(relay, (db) => claimDueBatches(db, options));
  }

  /** The outcome of the first batch (recipients 0 and 1) delivered, fenced by `token`. */
  function deliveredOutcome(clock: ManualClock, id: string, token: string) {
    return {
      messageId: id,
      token,
      now: clock.now(),
      attempt: { batch: 0, recipients: ['a@example.com', 'b@example.com'], upstream: 'x:25', startedAt: clock.now(), durationMs: 1, outcome: 'delivered' as const, code: 250, reply: '250 ok' },
      recipients: [0, 1].map((seq) => ({ seq, attempts: 1, status: 'delivered' as const, code: 250, reply: '250 ok', temporary: false, nextAttemptAt: clock.now() })),
      upstreamFailed: false,
      batchDelayMs: 0,
      eraseRawOnDelivered: false,
      lastFailure: null,
    };
  }

  test('claims through the writer thread bring each message\'s stored bytes, several claims and messages in one commit', async () => {
    const { clock, relay, id } = await relayWithMail();
    const ids = [id];
    for (const size of [2_000, 300_000, 1_500_000]) {
      const raw = `Subject: size ${size}\r\n\r\n${'x'.repeat(size)}\r\n`;
      ids.push(queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw })).response));
    }
    const options = { now: clock.now(), leaseMs: 60_000, batchSize: 10, limit: 2, maxAttempts: 10, eraseRawOnDelivered: false };
    // both writes go in one turn of the event loop: one commit, and their results cross back together
    const results = await Promise.all([relay.writer.write('claimDueBatches', options), relay.writer.write('claimDueBatches', options)]);
    const batches = results.flatMap((r) => r.batches);
    assert.deepEqual(batches.map((b) => b.messageId).sort(), [...ids].sort());
    for (const b of batches) {
      const stored = message(relay, b.messageId).raw;
      assert.ok(stored && b.raw && Buffer.from(b.raw).equals(stored), `${b.messageId}: the claimed bytes differ from the stored ones`);
    }
  });

  test('the memory that crosses between the threads: what a view owns alone, each once', () => {
    const own = Buffer.alloc(10_000);
    const other = new Uint8Array(3);
    const pooled = Buffer.from('in the shared pool');
    assert.ok(pooled.buffer.byteLength > pooled.length, 'a small Buffer.from shares the pool');
    assert.deepEqual(ownMemory([own, null, pooled, own.subarray(1), other, own]), [own.buffer, other.buffer]);
  });

  test('two writes of one turn that move the same memory: it crosses once, and both commit', async () => {
    const { relay } = await relayWithMail();
    const bytes = Buffer.alloc(10_000);
    const writes = relay.writer.stats.writes;
    await Promise.all([relay.writer.writeMoving([bytes], 'probeWrite'), relay.writer.writeMoving([bytes], 'probeWrite')]);
    assert.equal(bytes.byteLength, 0, 'the memory moved to the writer thread');
    assert.equal(relay.writer.stats.writes, writes + 2);
  });

  test('a claim sets the lease and a fresh token and counts attempts before anything is sent', async () => {
    const { clock, relay, id } = await relayWithMail();
    const { batches } = await claim(relay, claimOptions(clock));
    assert.equal(batches.length, 1);
    const [b] = batches;
    assert.deepEqual(b.recipients.map((r) => [r.seq, r.address, r.attempts]), [
      [0, 'a@example.com', 1],
      [1, 'b@example.com', 1],
    ]);
    const m = message(relay, id);
    assert.equal(m.state, 'sending');
    assert.equal(m.lease_token, b.token);
    assert.equal(m.lease_expires_at, clock.now() + 60_000);
    assert.equal(m.claims, 1);
    assert.deepEqual(recipients(relay, id).map((r) => r.attempts), [1, 1, 0]);
    assert.equal((await claim(relay, claimOptions(clock))).batches.length, 0, 'a held lease is not claimable');
  });

  test('an expired lease is claimable again; the old holder is fenced off by its token', async () => {
    const { clock, relay, id } = await relayWithMail();
    const first = (await claim(relay, claimOptions(clock))).batches[0];
    clock.advance(59_999);
    assert.equal((await claim(relay, claimOptions(clock))).batches.length, 0);
    clock.advance(1);
    // due work for the poller, unless this process holds the message itself
    assert.equal(hasDueWork(relay.store.sqlite, clock.now()), true);
    assert.equal(hasDueWork(relay.store.sqlite, clock.now(), [id]), false);
    assert.equal((await claim(relay, claimOptions(clock, { held: [id] }))).batches.length, 0);
    const second = (await claim(relay, claimOptions(clock))).batches[0];
    assert.ok(second, 'claimable once the lease expired, without any manual fix');
    assert.notEqual(second.token, first.token);
    assert.deepEqual(second.recipients.map((r) => [r.address, r.attempts]), [
      ['a@example.com', 2],
      ['b@example.com', 2],
    ]);

    // a stale holder's release leaves the current claim alone: still sending, no attempt undone
    const staleRelease = { messageId: id, token: first.token, unsent: [0, 1] };
    assert.equal(await writeDirect(relay, (db) => releaseClaims(db, [staleRelease], clock.now())), 0, 'a stale release is fenced');
    assert.deepEqual([message(relay, id).state, message(relay, id).lease_token], ['sending', second.token]);
    assert.deepEqual(recipients(relay, id).map((r) => r.attempts), [2, 2, 0]);

    const sofar = (token: string) => ({ messageId: id, token, now: clock.now(), recipients: [{ seq: 0, attempts: 1, code: 250, reply: '250 ok' }] });
    assert.equal(await writeDirect(relay, (db) => recordDelivered(db, sofar(first.token))), false);
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['pending', 'pending', 'pending'], 'the stale holder recorded no recipient delivered');

    const outcome = (token: string) => deliveredOutcome(clock, id, token);
    const stale = await writeDirect(relay, (db) => completeBatch(db, outcome(first.token)));
    assert.deepEqual(stale, { leaseLost: true });
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['pending', 'pending', 'pending'], 'the stale outcome changed no recipient');
    assert.deepEqual(
      attempts(relay, id).map((a) => [a.outcome, a.code, a.reply]),
      [['delivered', 250, 'lease lost before this outcome was recorded, so it was not applied: 250 ok']],
      'the stale attempt is recorded, marked as not applied',
    );
    assert.equal(message(relay, id).lease_token, second.token);

    const current = await writeDirect(relay, (db) => completeBatch(db, outcome(second.token)));
    assert.equal(current.leaseLost, false);
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['delivered', 'delivered', 'pending']);
    assert.equal(message(relay, id).state, 'queued');
    assert.equal(message(relay, id).lease_token, null);
    assert.equal(await writeDirect(relay, (db) => releaseClaims(db, [{ messageId: id, token: second.token }], clock.now())), 0, 'release is fenced too');
  });

  test('an outcome never makes a recipient pending again that an earlier transaction of its batch delivered', async () => {
    const { clock, relay, id } = await relayWithMail();
    const batch = (await claim(relay, claimOptions(clock))).batches[0];
    const delivered = { messageId: id, token: batch.token, now: clock.now(), recipients: [{ seq: 0, attempts: 1, code: 250, reply: '250 ok' }] };
    assert.equal(await writeDirect(relay, (db) => recordDelivered(db, delivered)), true);
    const outcome = deliveredOutcome(clock, id, batch.token);
    const deferred = {
      ...outcome,
      attempt: { ...outcome.attempt, outcome: 'deferred' as const, code: 451, reply: '451 later' },
      recipients: [0, 1].map((seq) => ({ seq, attempts: 1, status: 'pending' as const, code: 451, reply: '451 later', temporary: true, nextAttemptAt: clock.now() + 60_000 })),
      upstreamFailed: true,
    };
    assert.equal((await writeDirect(relay, (db) => completeBatch(db, deferred))).leaseLost, false);
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['delivered', 'pending', 'pending']);
  });

  test('a claim that finds every recipient delivered settles the message, erasing its content when logAllEmails is false', async () => {
    for (const logAllEmails of [false, true]) {
      const { clock, relay, id } = await relayWithMail({ security: { logAllEmails } }, ['a@example.com', 'b@example.com']);
      // both recipients recorded delivered, and the claim given back before its outcome (a stop
      // that cut the batch off after its last transaction was answered)
      const batch = (await claim(relay, claimOptions(clock))).batches[0];
      const delivered = { messageId: id, token: batch.token, now: clock.now(), recipients: [0, 1].map((seq) => ({ seq, attempts: 1, code: 250, reply: '250 ok' })) };
      assert.equal(await writeDirect(relay, (db) => recordDelivered(db, delivered)), true);
      assert.equal(await writeDirect(relay, (db) => releaseClaims(db, [{ messageId: id, token: batch.token }], clock.now())), 1);
      await relay.delivery.runOnce();
      const settled = message(relay, id);
      assert.equal(settled.state, 'delivered');
      assert.equal(settled.raw !== null, logAllEmails, `logAllEmails=${logAllEmails}: content kept`);
    }
  });

  test('a claim given back, at a stop or at the start after a crash, keeps its place in the queue: before the mail that came in meanwhile', async () => {
    const { clock, relay, id } = await relayWithMail({}, ['a@example.com']);
    const dueAt = message(relay, id).next_attempt_at;
    const one = (c: ManualClock) => claimOptions(c, { limit: 1 });
    const first = (await claim(relay, one(clock))).batches[0];
    clock.advance(5_000);
    const later = queuedId((await sendMail(relay.smtpPort, { to: ['b@example.com'] })).response);
    clock.advance(5_000);
    assert.equal(await writeDirect(relay, (db) => releaseClaims(db, [{ messageId: id, token: first.token }], clock.now())), 1);
    assert.equal(message(relay, id).next_attempt_at, dueAt);
    const second = (await claim(relay, one(clock))).batches[0];
    assert.equal(second.messageId, id, 'the message given back goes first, not behind the later one');

    clock.advance(5_000);
    assert.deepEqual(await writeDirect(relay, (db) => releaseOrphanedClaims(db, clock.now())), [id]);
    assert.equal(message(relay, id).next_attempt_at, dueAt);
    assert.deepEqual((await claim(relay, claimOptions(clock))).batches.map((b) => b.messageId), [id, later]);
  });

  test("a stop's release does not count the attempt it cut off; an answer recorded after the release counts it again", async () => {
    const { clock, relay, id } = await relayWithMail();
    const first = (await claim(relay, claimOptions(clock))).batches[0];
    const unanswered = first.recipients.map((r) => r.seq);
    assert.equal(await writeDirect(relay, (db) => releaseClaims(db, [{ messageId: id, token: first.token, unanswered }], clock.now())), 1);
    assert.deepEqual(recipients(relay, id).map((r) => r.attempts), [0, 0, 0]);
    assert.equal(message(relay, id).claims, 1, 'the claim counts: the batch went out');
    const outcome = deliveredOutcome(clock, id, first.token);
    const deferred = { ...outcome, recipients: outcome.recipients.map((r) => ({ ...r, status: 'pending' as const, code: 451, reply: '451 later', temporary: true })) };
    assert.equal((await writeDirect(relay, (db) => completeBatch(db, deferred))).leaseLost, false);
    assert.deepEqual(recipients(relay, id).map((r) => r.attempts), [1, 1, 0], 'answered: counted');
  });

  test('a released claim keeps its token until the next claim: an answer that comes while the release commits is recorded', async () => {
    const { clock, relay, id } = await relayWithMail();
    const first = (await claim(relay, claimOptions(clock))).batches[0];
    assert.equal(await writeDirect(relay, (db) => releaseClaims(db, [{ messageId: id, token: first.token }], clock.now())), 1);
    let m = message(relay, id);
    assert.deepEqual([m.state, m.lease_token, m.lease_expires_at, m.next_attempt_at], ['queued', first.token, null, clock.now()]);
    assert.deepEqual(recipients(relay, id).map((r) => r.attempts), [1, 1, 0], 'a claim given back as it is stays counted');
    const late = await writeDirect(relay, (db) => completeBatch(db, deliveredOutcome(clock, id, first.token)));
    assert.equal(late.leaseLost, false);
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['delivered', 'delivered', 'pending']);
    assert.equal(attempts(relay, id).length, 1);

    const second = (await claim(relay, claimOptions(clock))).batches[0];
    await writeDirect(relay, (db) => releaseClaims(db, [{ messageId: id, token: second.token }], clock.now()));
    const third = (await claim(relay, claimOptions(clock))).batches[0];
    assert.ok(third);
    m = message(relay, id);
    assert.equal(m.lease_token, third.token);
    assert.deepEqual(await writeDirect(relay, (db) => completeBatch(db, deliveredOutcome(clock, id, second.token))), { leaseLost: true });
    assert.equal(attempts(relay, id).length, 2, 'the late answer and the stale one');

    // a message deleted once its lease ran out: the stale outcome has nothing to record against
    clock.advance(60_000);
    assert.equal(await writeDirect(relay, (db) => deleteMessage(db, id, clock.now())), 'deleted');
    assert.deepEqual(await writeDirect(relay, (db) => completeBatch(db, deliveredOutcome(clock, id, third.token))), { leaseLost: true });
    assert.equal(attempts(relay, id).length, 0);
  });

  test('a claim that commits after shutdown began goes back uncounted: no attempt used, nothing sent', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const config = testConfig({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port });
    const first = await startTestRelay(config, { startDelivery: false });
    const id = queuedId((await sendMail(first.smtpPort, { to: ['a@example.com'], raw: 'Subject: late claim\r\n\r\nbody\r\n' })).response);
    // SIGTERM arrives while the first claim commits
    const write = first.writer.write.bind(first.writer);
    let stopping: Promise<void> | undefined;
    first.writer.write = ((op, ...args) => {
      const result = write(op, ...args);
      if (op === 'claimDueBatches' && !stopping) stopping = first.stop();
      return result;
    }) as typeof first.writer.write;
    first.delivery.start();
    await waitFor(() => stopping !== undefined, 10_000, 'the first claim');
    await stopping;

    const second = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => second.stop());
    const m = message(second, id);
    assert.deepEqual([m.state, m.claims], ['queued', 0]);
    assert.ok(m.next_attempt_at <= Date.now(), 'due at once');
    assert.deepEqual(recipients(second, id).map((r) => r.attempts), [0]);
    assert.equal(upstream.rcpts.length, 0);
    await second.delivery.runOnce();
    assert.equal(message(second, id).state, 'delivered');
    assert.deepEqual(recipients(second, id).map((r) => r.attempts), [1]);
  });

  test('a claim still committing when the grace period ends is waited for and handed back, not left to its lease', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const log = capturedLog('info');
    const config = testConfig({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port });
    const first = await startTestRelay(config, { startDelivery: false, startRetention: false, shutdownGraceMs: 100, logger: log.logger });
    const id = queuedId((await sendMail(first.smtpPort, { to: ['a@example.com'], raw: 'Subject: slow claim\r\n\r\nbody\r\n' })).response);
    // another process holds the write lock: the claim waits for it past the grace period
    const lock = await holdWriteLock(first, 120_000);
    let stopping: Promise<void> | undefined;
    try {
      first.delivery.start();
      await waitFor(() => first.writer.waitingFor('claimDueBatches') === 1, 10_000, 'the claim waiting for the writer');
      stopping = first.stop();
      const waiting = waitFor(() => log.entries().some((e) => e.event === 'delivery.shutdown_claims'), 10_000, 'shutdown waiting for the claim');
      await Promise.race([stopping, waiting.catch(() => {})]);
    } finally {
      // (setting the writer's busy timeout back fails once the store is closed)
      await lock.release().catch(() => {});
    }
    await stopping;
    assert.deepEqual(log.entries().filter((e) => e.event === 'delivery.shutdown_claims').map((e) => e.claims), [1], 'the wait is logged');

    const second = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => second.stop());
    const m = message(second, id);
    assert.deepEqual([m.state, m.claims, m.lease_expires_at], ['queued', 0, null]);
    assert.deepEqual(recipients(second, id).map((r) => r.attempts), [0]);
    assert.equal(upstream.rcpts.length, 0);
  });

  test('a batch that never finishes (the process dies every time) still runs out of attempts', async () => {
    const { clock, relay, id } = await relayWithMail({ retry: { maxAttempts: 3 } }, ['a@example.com']);
    for (let i = 1; i <= 3; i++) {
      const { batches } = await claim(relay, claimOptions(clock, { maxAttempts: 3 }));
      assert.equal(batches[0].recipients[0].attempts, i);
      clock.advance(60_000); // the lease expires: the holder died
    }
    const { batches, finalized } = await claim(relay, claimOptions(clock, { maxAttempts: 3 }));
    assert.equal(batches.length, 0);
    assert.deepEqual(finalized, [{ id, state: 'failed' }]);
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'failed');
    assert.equal(r.temporary, 1);
    assert.match(r.last_reply!, /gave up: the maximum number of attempts was used without a result/);
    const m = message(relay, id);
    assert.equal(m.state, 'failed');
    assert.equal(m.lease_token, null);
    assert.ok(m.finished_at !== null);
  });

  test('mail whose attempts all had a result, when retry.maxAttempts is lowered to them, fails saying so, not as a batch that never finished', async () => {
    const { clock, relay, id } = await relayWithMail({}, ['a@example.com', 'b@example.com']);
    const deferred = '451 4.3.0 try again later';
    for (let i = 1; i <= 3; i++) {
      const { batches } = await claim(relay, claimOptions(clock, { maxAttempts: 30 }));
      const b = batches[0];
      // a has a result each time; b's third batch never finishes
      const outcomes = b.recipients.filter((r) => r.address === 'a@example.com' || i < 3);
      await writeDirect(relay, (db) =>
        completeBatch(db, {
          messageId: id,
          token: b.token,
          now: clock.now(),
          attempt: { batch: 0, recipients: outcomes.map((r) => r.address), upstream: 'x:25', startedAt: clock.now(), durationMs: 1, outcome: 'deferred', code: 451, reply: deferred },
          recipients: outcomes.map((r) => ({ seq: r.seq, attempts: r.attempts, status: 'pending' as const, code: 451, reply: deferred, temporary: true, nextAttemptAt: clock.now() })),
          upstreamFailed: false,
          batchDelayMs: 0,
          eraseRawOnDelivered: false,
          lastFailure: null,
        }),
      );
      clock.advance(1000);
    }
    const { batches, finalized } = await claim(relay, claimOptions(clock, { maxAttempts: 3 }));
    assert.equal(batches.length, 0);
    assert.deepEqual(finalized, [{ id, state: 'failed' }]);
    assert.deepEqual(
      recipients(relay, id).map((r) => [r.address, r.status, r.last_reply]),
      [
        ['a@example.com', 'failed', `${deferred} (gave up: retry.maxAttempts is 3, and it has had 3 attempts)`],
        ['b@example.com', 'failed', `${deferred} (gave up: the maximum number of attempts was used without a result)`],
      ],
    );
    // the message's names the recipient and its last reply, as a give-up after an attempt does
    assert.equal(
      message(relay, id).last_error,
      `b@example.com: gave up: the maximum number of attempts was used without a result; last reply: ${deferred}`,
    );
  });

  test('the running engine exports and logs mail that ran out of attempts at its claim', async () => {
    const clock = new ManualClock();
    const log = capturedLog('info');
    const relay = await startTestRelay({ processingTimeout: 60, retry: { maxAttempts: 1 } }, { clock, startDelivery: false, random: NO_JITTER, logger: log.logger });
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw: 'Subject: lease\r\n\r\nbody\r\n' })).response);
    await claim(relay, claimOptions(clock, { maxAttempts: 1 }));
    clock.advance(60_000); // the lease expires: the holder died, its one attempt used
    relay.delivery.start();
    await waitFor(() => failedExportExists(relay, id), 10_000, 'the export of the message that gave up');
    assert.equal(message(relay, id).state, 'failed');
    await waitFor(() => log.entries().some((e) => e.event === 'delivery.failed' && e.queueId === id), 10_000, 'its delivery.failed line');
  });

  test('the claim reads due work through the partial indexes, never a table scan', async () => {
    const { relay } = await relayWithMail();
    const plan = (sql: string) =>
      (relay.store.sqlite.prepare(`EXPLAIN QUERY PLAN ${sql}`).all(0, 1) as Array<{ detail: string }>).map((r) => r.detail).join('\n');
    for (const [sql, index] of [
      [SELECT_DUE_SQL, 'messages_due'],
      [SELECT_NEW_SQL, 'messages_new'],
      [SELECT_EXPIRED_SQL, 'messages_lease'],
    ]) {
      const p = plan(sql);
      assert.match(p, new RegExp(`SEARCH messages USING (COVERING )?INDEX ${index} \\(`), p);
      assert.doesNotMatch(p, /TEMP B-TREE/, 'rows come in index order, no sort of the backlog');
    }
  });

  test('a bound LIMIT is cast, so that SQLite does not compile the claim again at every run', async () => {
    const { relay } = await relayWithMail();
    const sqlite = relay.store.sqlite;
    // the planner reads a plain `LIMIT ?`, and every new binding expires the statement
    assert.throws(() => prepared(sqlite, 'SELECT id FROM messages LIMIT ?'), /CAST\(\? AS INTEGER\)/);
    assert.throws(() => prepared(sqlite, 'SELECT id FROM messages LIMIT 5 OFFSET @skip'), /CAST/);
    assert.equal(prepared(sqlite, 'SELECT id FROM messages LIMIT CAST(? AS INTEGER)').all(1).length, 1);
    for (const sql of [SELECT_DUE_SQL, SELECT_EXPIRED_SQL]) assert.doesNotThrow(() => prepared(sqlite, sql));
  });

  test('a clock stepped forward past the lease during an attempt does not hand its message to another worker', async () => {
    // the upstream holds the first DATA until told to answer
    let answer: (() => void) | undefined;
    let transactions = 0;
    const upstream = await startUpstream({
      onData(stream, _session, cb) {
        transactions++;
        stream.resume();
        stream.on('end', () => (answer ? cb() : (answer = () => cb())));
      },
    });
    cleanup.push(() => upstream.close());
    const clock = new ManualClock();
    const { logger, lines } = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: 60, workerCount: 4 },
      { clock, logger, deliveryPollMs: 10 },
    );
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw: 'Subject: step\r\n\r\nbody\r\n' })).response);
    await waitFor(() => answer !== undefined, 10_000, 'the upstream to hold DATA');
    clock.advance(3_600_000); // an NTP step or a resumed VM: the lease has run out by the wall clock
    // the poller looks every 10 ms; another worker would claim the message within a few polls
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(message(relay, id).claims, 1, 'claimed once');
    answer?.();
    await waitFor(() => message(relay, id).state === 'delivered', 10_000, 'delivery');
    assert.equal(transactions, 1, 'sent once');
    assert.ok(!lines.some((l) => l.includes('delivery.lease_lost')), 'the attempt kept its lease');
  });

  /** A relay whose one message is being delivered: the upstream holds its DATA. */
  async function deliveryHeldUpstream(shutdownGraceMs: number, maxAttempts?: number) {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.hold = () => true;
    const retry = maxAttempts === undefined ? {} : { retry: { maxAttempts } };
    const config = testConfig({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: 300, ...retry });
    const log = capturedLog('info');
    const first = await startTestRelay(config, { shutdownGraceMs, logger: log.logger });
    const id = queuedId((await sendMail(first.smtpPort, { to: ['a@example.com'], raw: 'Subject: held\r\n\r\nbody\r\n' })).response);
    await waitFor(() => upstream.held.length === 1, 10_000, 'the upstream to hold DATA');
    return { upstream, config, log, first, id };
  }

  test('shutdown releases an unfinished claim: due again at once, its attempt not counted, delivered by the next start', async () => {
    // its one allowed attempt cut off by the stop: the mail is not failed for it
    const { upstream, config, log, first, id } = await deliveryHeldUpstream(300, 1);
    assert.equal(first.delivery.status().inFlight, 1);
    await first.stop();
    const [released] = log.entries().filter((e) => e.event === 'delivery.released');
    assert.deepEqual(
      [released?.released, released?.ids, released?.msg],
      [1, [id], 'shutdown: unfinished deliveries stopped and released for the next start'],
    );

    const second = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => second.stop());
    const m = message(second, id);
    assert.equal(m.state, 'queued', 'released, not left to expire');
    assert.equal(m.lease_expires_at, null);
    assert.ok(m.next_attempt_at <= Date.now(), 'due at once: the aborted attempt recorded no deferral');
    assert.equal(attempts(second, id).length, 0);
    assert.equal(recipients(second, id)[0].attempts, 0, 'the attempt cut off has no result, and does not count');
    assert.equal(m.claims, 1, 'the claim counts: the message was tried');
    upstream.hold = () => false;
    await second.delivery.runOnce();
    assert.equal(message(second, id).state, 'delivered');
    assert.equal(upstream.accepted.length, 1);
  });

  test('a release that fails at shutdown leaves the claim to the next start, which takes it back at once', async () => {
    const { upstream, config, log, first, id } = await deliveryHeldUpstream(100);
    // another process holds the write lock past the writer's (shortened) busy timeout
    const lock = await holdWriteLock(first, 50);
    try {
      await first.stop();
    } finally {
      await lock.release().catch(() => {});
    }
    const events = log.entries().filter((e) => e.event === 'delivery.release_failed' || e.event === 'delivery.released');
    assert.deepEqual(events.map((e) => e.event), ['delivery.release_failed', 'delivery.released']);
    assert.match(String(events[0].err), /locked|busy/i);
    assert.deepEqual([events[1].released, events[1].ids], [0, [id]]);
    assert.match(String(events[1].msg), /those not released .* are taken back by the next start/);

    const secondLog = capturedLog('info');
    const second = await startTestRelay(config, { startDelivery: false, logger: secondLog.logger });
    cleanup.push(() => second.stop());
    assert.ok(secondLog.entries().some((e) => e.event === 'delivery.claims_recovered'), 'taken back by the start');
    const m = message(second, id);
    assert.deepEqual([m.state, m.lease_expires_at], ['queued', null]);
    upstream.hold = () => false;
    await second.delivery.runOnce();
    assert.equal(message(second, id).state, 'delivered');
  });

  /** An upstream that takes one recipient per transaction, and holds the DATA of b's. */
  async function oneRecipientPerTransaction(): Promise<ScriptedUpstream> {
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onRcptTo(address, session, cb) {
        upstream.rcpts.push(address.address);
        if (session.envelope.rcptTo.length >= 1) return cb(Object.assign(new Error('4.5.3 Error: too many recipients'), { responseCode: 452 }));
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    upstream.hold = (t) => t.to.includes('b@example.com');
    return upstream;
  }

  test('a batch sent in several transactions commits the recipients each one delivered to before the next one begins', async () => {
    const upstream = await oneRecipientPerTransaction();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 2, processingTimeout: 300 },
      { shutdownGraceMs: 100 },
    );
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'], raw: 'Subject: split\r\n\r\nbody\r\n' })).response);
    await waitFor(() => upstream.held.length === 1, 10_000, "the upstream to hold b's DATA");
    assert.equal(message(relay, id).state, 'sending');
    assert.deepEqual(
      recipients(relay, id).map((r) => [r.address, r.status, r.last_code]),
      [
        ['a@example.com', 'delivered', 250],
        ['b@example.com', 'pending', null],
      ],
    );
  });

  /** A relay that forwards to `upstream` in batches of two, its log, and a message to a and b queued. */
  async function queueSplit(upstream: ScriptedUpstream): Promise<{ relay: Relay; id: string; lines: string[] }> {
    const { logger, lines } = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 2, processingTimeout: 300 },
      { startDelivery: false, logger },
    );
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'], raw: 'Subject: split\r\n\r\nbody\r\n' })).response) as string;
    return { relay, id, lines };
  }

  /** What another worker's claim of the message does to this one's lease. */
  function leaseTakenOver(relay: Relay, id: string): void {
    writeDirect(relay, (db) => db.prepare("UPDATE messages SET lease_token = 'another worker' WHERE id = ?").run(id));
  }

  test('a batch whose lease is found lost between two of its transactions sends no further one', async () => {
    const upstream = await oneRecipientPerTransaction();
    const { relay, id, lines } = await queueSplit(upstream);
    upstream.hold = () => false;
    // another worker takes the message over while the first transaction's DATA is answered
    upstream.dataReply = () => {
      leaseTakenOver(relay, id);
      return undefined;
    };
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.rcpts, ['a@example.com', 'b@example.com'], "b's transaction was not sent");
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com']]);
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['pending', 'pending'], 'nothing recorded without the lease');
    assert.ok(lines.some((l) => l.includes('"delivery.lease_lost"')));
  });

  test('a batch whose first transaction delivered to none (its recipients refused at RCPT) checks its lease before the next one too', async () => {
    // one RCPT per transaction, refused ones counted: a is greylisted, b over the limit
    let rcptsInTransaction = 0;
    const upstream: ScriptedUpstream = await startScriptedUpstream({
      onMailFrom(_address, _session, cb) {
        rcptsInTransaction = 0;
        cb();
      },
      onRcptTo(address, _session, cb) {
        upstream.rcpts.push(address.address);
        rcptsInTransaction++;
        if (rcptsInTransaction > 1) return cb(Object.assign(new Error('4.5.3 Error: too many recipients'), { responseCode: 452 }));
        if (address.address === 'a@example.com') {
          // another worker takes the message over while the first transaction is answered
          if (queued) leaseTakenOver(queued.relay, queued.id);
          return cb(Object.assign(new Error('4.7.1 Greylisted, try again later'), { responseCode: 450 }));
        }
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    let queued: { relay: Relay; id: string } | undefined;
    const { relay, id, lines } = await queueSplit(upstream);
    queued = { relay, id };
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.rcpts, ['a@example.com', 'b@example.com'], "b's own transaction was not sent");
    assert.deepEqual(upstream.accepted, []);
    assert.deepEqual(recipients(relay, id).map((r) => r.status), ['pending', 'pending'], 'nothing recorded without the lease');
    assert.ok(lines.some((l) => l.includes('"delivery.lease_lost"')));
  });

  test('a relay killed while a later transaction of a batch is in flight does not send to the recipients of an earlier one again', async () => {
    const upstream = await oneRecipientPerTransaction();
    const dir = tempDir();
    const flags = ['--forwardSMTP', '--forwardHost', '127.0.0.1', '--forwardPort', String(upstream.port), '--batchSize', '2', '--processingTimeout', '5'];
    const first = await spawnRelay(dir, flags);
    try {
      await sendMail(first.smtpPort, { to: ['a@example.com', 'b@example.com'], raw: 'Subject: split\r\n\r\nbody\r\n' });
      await waitFor(() => upstream.held.length === 1, 10_000, "the upstream to hold b's DATA");
    } finally {
      await first.kill('SIGKILL');
    }
    upstream.hold = () => false;
    const second = await spawnRelay(dir, flags);
    try {
      // b's claim, left by the kill, is given back when the relay starts again
      await waitFor(() => upstream.accepted.length === 2, 30_000, 'b delivered after the restart');
      assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com'], ['b@example.com']], 'a got the message once');
    } finally {
      await second.kill('SIGTERM');
    }
  });

  test('shutdown cuts off a batch sent in several transactions: the recipients an earlier one delivered to are not sent to again', async () => {
    const upstream = await oneRecipientPerTransaction();
    const config = testConfig({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 2, processingTimeout: 300 });
    const log = capturedLog('info');
    const first = await startTestRelay(config, { shutdownGraceMs: 300, logger: log.logger });
    const id = queuedId((await sendMail(first.smtpPort, { to: ['a@example.com', 'b@example.com'], raw: 'Subject: split\r\n\r\nbody\r\n' })).response);
    await waitFor(() => upstream.held.length === 1, 10_000, "the upstream to hold b's DATA");
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com']]);
    await first.stop();
    const [line] = log.entries().filter((e) => e.event === 'delivery.attempt');
    assert.deepEqual(
      [line?.outcome, line?.code, line?.to, line?.delivered, line?.deferred, line?.state],
      ['partial', 250, ['a@example.com', 'b@example.com'], 1, 1, 'queued'],
      'the attempt cut off has its line, as its row',
    );

    const second = await startTestRelay(config, { startDelivery: false });
    cleanup.push(() => second.stop());
    assert.deepEqual(
      recipients(second, id).map((r) => [r.address, r.status, r.attempts]),
      [
        ['a@example.com', 'delivered', 1],
        ['b@example.com', 'pending', 0], // cut off without an answer: not counted
      ],
    );
    // the attempt cut off is recorded with the reply of its transaction that delivered
    assert.deepEqual(
      attempts(second, id).map((a) => [a.batch, a.recipients, a.outcome, a.code]),
      [[0, '["a@example.com","b@example.com"]', 'partial', 250]],
    );
    assert.ok(message(second, id).next_attempt_at <= Date.now(), 'b is due at once');
    upstream.hold = () => false;
    await second.delivery.runOnce();
    assert.equal(message(second, id).state, 'delivered');
    assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com'], ['b@example.com']], 'a got the message once');
  });

  test('a stop that cuts off a batch records the recipients an earlier transaction delivered to when recording them then failed', async () => {
    const upstream = await oneRecipientPerTransaction();
    const config = testConfig({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 2, processingTimeout: 300 });
    const log = capturedLog('info');
    const first = await startTestRelay(config, { shutdownGraceMs: 300, logger: log.logger });
    // another process takes the write lock before a's transaction is answered, and holds it past
    // the writer's (shortened) busy timeout
    await first.writer.pragma('busy_timeout = 50');
    let lock: Sqlite | undefined;
    upstream.dataReply = (t) => {
      if (t.to.includes('a@example.com') && !lock) {
        lock = openConnection(config.databasePath);
        lock.exec('BEGIN IMMEDIATE');
      }
      return undefined;
    };
    const letGo = () => {
      lock?.exec('COMMIT');
      lock?.close();
      lock = undefined;
    };
    try {
      const id = queuedId((await sendMail(first.smtpPort, { to: ['a@example.com', 'b@example.com'], raw: 'Subject: split\r\n\r\nbody\r\n' })).response);
      await waitFor(() => upstream.held.length === 1, 10_000, "the upstream to hold b's DATA");
      assert.ok(log.entries().some((e) => e.event === 'delivery.progress_failed'), 'recording a as delivered failed');
      letGo();
      await first.stop();

      const second = await startTestRelay(config, { startDelivery: false });
      cleanup.push(() => second.stop());
      // a's attempt counts (the release took it back while a was still pending; recording a
      // delivered counts it again); b's, cut off, does not
      assert.deepEqual(
        recipients(second, id).map((r) => [r.address, r.status, r.attempts]),
        [
          ['a@example.com', 'delivered', 1],
          ['b@example.com', 'pending', 0],
        ],
      );
      assert.deepEqual(attempts(second, id).map((a) => a.outcome), ['partial']);
      upstream.hold = () => false;
      await second.delivery.runOnce();
      assert.equal(message(second, id).state, 'delivered');
      assert.deepEqual(upstream.accepted.map((t) => t.to), [['a@example.com'], ['b@example.com']], 'a got the message once');
    } finally {
      letGo();
    }
  });
});
