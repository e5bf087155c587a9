// Upstream faults, each against a real misbehaving TCP server: the attempt ends in the state the
// spec's §3 gives (5xx → failed; 4xx, refused, timeout, TLS and network errors → deferred with
// backoff), the claim is never left behind, nothing is lost once the upstream heals, and retries
// go only to the recipients still pending. Delivery is driven with an injected clock and runOnce().
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import type { Logger } from 'pino';
import { ManualClock } from '../manual-clock.js';
import type { Config } from '../../src/config/schema.js';
import type { Relay } from '../../src/main.js';
import { capturedLog, closedPort, type DeepPartial, holdWriteLock, sendMail, startTestRelay, waitFor } from '../helpers.js';
import { type Behaviour, startMisbehavingUpstream, WELL_BEHAVED } from './misbehaving-upstream.js';
import { queuedId } from './smtp-session.js';
import { messageRaw, storeMetrics } from '../../src/store/queries.js';
import { END_UNANSWERED } from '../../src/delivery/outcomes.js';

const PROCESSING_TIMEOUT_S = 5;
const INITIAL_DELAY_S = 60;

interface MessageRow {
  state: string;
  next_attempt_at: number;
  lease_token: string | null;
  lease_expires_at: number | null;
  claims: number;
}
interface RecipientRow {
  address: string;
  status: string;
  attempts: number;
  last_code: number | null;
  last_reply: string | null;
  temporary: number;
  next_attempt_at: number;
}
interface AttemptRow {
  recipients: string;
  outcome: string;
  code: number | null;
  reply: string | null;
  duration_ms: number;
}

function rows(relay: Relay, id: string) {
  const db = relay.store.sqlite;
  return {
    message: db.prepare('SELECT state, next_attempt_at, lease_token, lease_expires_at, claims FROM messages WHERE id = ?').get(id) as MessageRow,
    recipients: db.prepare('SELECT * FROM recipients WHERE message_id = ? ORDER BY seq').all(id) as RecipientRow[],
    attempts: db.prepare('SELECT * FROM attempts WHERE message_id = ? ORDER BY id').all(id) as AttemptRow[],
  };
}

function statuses(relay: Relay, id: string): Record<string, string> {
  return Object.fromEntries(rows(relay, id).recipients.map((r) => [r.address, r.status]));
}

/** No claim is left behind after an attempt, whatever the upstream did. */
function assertNoClaimLeft(relay: Relay) {
  const held = relay.store.sqlite.prepare("SELECT COUNT(*) AS n FROM messages WHERE state = 'sending' OR lease_token IS NOT NULL").get() as { n: number };
  assert.equal(held.n, 0);
}

describe('upstream faults', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  /** A relay forwarding to 127.0.0.1:`port`, with a manual clock and delivery driven by runOnce(). */
  async function relayFor(port: number, overrides: DeepPartial<Config> = {}, logger?: Logger) {
    const clock = new ManualClock(Date.UTC(2026, 0, 1));
    const relay = await startTestRelay(
      {
        forwardSMTP: true,
        forwardHost: '127.0.0.1',
        forwardPort: port,
        processingTimeout: PROCESSING_TIMEOUT_S,
        batchDelay: 0,
        failedRetryInterval: 0,
        retry: { initialDelay: INITIAL_DELAY_S, maxDelay: 3600, maxAttempts: 5 },
        ...overrides,
      },
      // no jitter: the next attempt is exactly initialDelay later
      { clock, startDelivery: false, startRetention: false, random: () => 0.5, logger },
    );
    cleanup.push(() => relay.stop());
    return { clock, relay };
  }

  async function setup(overrides: DeepPartial<Config> = {}, logger?: Logger) {
    const upstream = await startMisbehavingUpstream();
    cleanup.push(() => upstream.close());
    return { ...(await relayFor(upstream.port, overrides, logger)), upstream };
  }

  /**
   * An upstream that holds its reply to DATA until `accept()`, and a relay (manual clock, a 60 s
   * lease) whose warnings are captured.
   */
  /**
   * A running relay whose one message is at the upstream, waiting for `accept()`, while another
   * process holds the database's write lock (the relay's busy timeout cut to 100 ms), so that the
   * outcome's commit fails until `lock.release()`.
   */
  async function outcomeAgainstHeldLock(shutdownGraceMs: number) {
    const setup = await gatedSetup({ startDelivery: true, shutdownGraceMs });
    const id = await queue(setup.relay, RCPTS);
    await waitFor(() => setup.upstream.transactions.length === 1, 10_000, 'DATA at the upstream');
    return { ...setup, id, lock: await holdWriteLock(setup.relay, 100) };
  }

  async function gatedSetup(options: { startDelivery: boolean; processingTimeout?: number; shutdownGraceMs?: number }) {
    const upstream = await startMisbehavingUpstream();
    cleanup.push(() => upstream.close());
    const log = capturedLog('warn');
    const clock = new ManualClock(Date.UTC(2026, 0, 1));
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: options.processingTimeout ?? 60, batchDelay: 0 },
      { clock, startDelivery: options.startDelivery, startRetention: false, logger: log.logger, shutdownGraceMs: options.shutdownGraceMs },
    );
    cleanup.push(() => relay.stop());
    let release = () => {};
    upstream.behaviour = { ...WELL_BEHAVED, dataEnd: { until: new Promise<void>((resolve) => (release = resolve)) } };
    return { upstream, log, relay, clock, accept: () => release() };
  }

  async function queue(relay: Relay, to: string[]): Promise<string> {
    const info = await sendMail(relay.smtpPort, { to, subject: 'fault test', text: 'body\r\n.leading dot line' });
    const id = queuedId(info.response);
    assert.ok(id, info.response);
    return id;
  }

  /** Runs due work, moving the clock to each next attempt, until nothing is queued any more. */
  async function deliverEverything(clock: ManualClock, relay: Relay, id: string) {
    for (let i = 0; i < 10 && rows(relay, id).message.state === 'queued'; i++) {
      clock.set(Math.max(clock.now(), rows(relay, id).message.next_attempt_at));
      await relay.delivery.runOnce();
    }
  }

  /** The deferral the spec asks for: pending, temporary, due initialDelay later, nothing held. */
  function assertDeferred(relay: Relay, id: string, clock: ManualClock, reply: RegExp, code: number | null = null) {
    const { message, recipients, attempts } = rows(relay, id);
    assert.equal(message.state, 'queued');
    assert.equal(message.next_attempt_at, clock.now() + INITIAL_DELAY_S * 1000);
    for (const r of recipients) {
      assert.equal(r.status, 'pending', r.address);
      assert.equal(r.temporary, 1);
      assert.equal(r.attempts, 1);
    }
    assert.equal(attempts.length, 1);
    assert.equal(attempts[0].outcome, 'deferred');
    assert.equal(attempts[0].code, code);
    assert.match(attempts[0].reply ?? '', reply);
    assertNoClaimLeft(relay);
  }

  const RCPTS = ['one@example.com', 'two@example.com', 'three@example.com'];

  /** A deferring fault: then the upstream heals and every recipient gets the message exactly `copies` times. */
  async function deferThenHeal(fault: Partial<Behaviour>, reply: RegExp, code: number | null, copies = 1) {
    const { clock, relay, upstream } = await setup();
    upstream.behaviour = { ...WELL_BEHAVED, ...fault };
    const id = await queue(relay, RCPTS);
    await relay.delivery.runOnce();
    assertDeferred(relay, id, clock, reply, code);
    // not due before the backoff has passed
    clock.advance(INITIAL_DELAY_S * 1000 - 1);
    assert.equal((await relay.delivery.runOnce()).attempts, 0);
    upstream.behaviour = { ...WELL_BEHAVED };
    await deliverEverything(clock, relay, id);
    assert.equal(rows(relay, id).message.state, 'delivered');
    for (const address of RCPTS) assert.equal(upstream.deliveriesTo(address), copies, address);
    // the delivered copy is the stored message, byte for byte
    const raw = (messageRaw(relay.store.sqlite, id) as { raw: Buffer }).raw;
    const delivered = upstream.transactions.filter((t) => t.answered?.startsWith('250'));
    assert.deepEqual(delivered[0].raw, raw);
    assertNoClaimLeft(relay);
    return { relay, upstream, id };
  }

  test('connection refused → deferred; delivered once the upstream listens again', async () => {
    const port = await closedPort();
    const { clock, relay } = await relayFor(port);
    const id = await queue(relay, RCPTS);
    await relay.delivery.runOnce();
    assertDeferred(relay, id, clock, /ECONNREFUSED|ECONNECTION/);
    assert.ok(!rows(relay, id).attempts[0].reply?.includes(END_UNANSWERED), 'nothing was sent');
    const upstream = await startMisbehavingUpstream(port);
    cleanup.push(() => upstream.close());
    await deliverEverything(clock, relay, id);
    assert.equal(rows(relay, id).message.state, 'delivered');
    for (const address of RCPTS) assert.equal(upstream.deliveriesTo(address), 1);
  });

  test('greeting 421 → deferred with the code recorded; delivered once it greets', async () => {
    await deferThenHeal({ greeting: { reply: '421 4.3.2 upstream.test busy, try later' } }, /busy/, 421);
  });

  test('a greeting that never comes → deferred by the greeting timeout, before the attempt deadline', async () => {
    const { relay, id } = await deferThenHeal({ greeting: 'silent' }, /Greeting never received/, null);
    // the setup timeout (a third of the attempt's time) ended it, not the attempt's own deadline
    assert.doesNotMatch(rows(relay, id).attempts[0].reply ?? '', /processingTimeout/);
  });

  test('connection dropped after DATA, before the reply → deferred; the retry makes one duplicate (at-least-once)', async () => {
    const { relay, upstream, id } = await deferThenHeal({ dataEnd: 'drop' }, /ECONNECTION|closed|ECONNRESET|EPIPE/i, null, 1);
    // the stored reply says that the upstream may have it
    assert.ok(rows(relay, id).attempts[0].reply?.endsWith(END_UNANSWERED), rows(relay, id).attempts[0].reply ?? '');
    // the upstream did get the first copy in full: that is the window the spec allows
    const unanswered = upstream.transactions.filter((t) => t.answered === null);
    assert.equal(unanswered.length, 1);
    assert.deepEqual(unanswered[0].to, RCPTS);
  });

  test('no reply to DATA at all → the attempt times out, deferred, claim released', async () => {
    // (that the attempt's deadline lies before the lease's end: test/delivery/upstream.test.ts)
    const { relay, upstream, id } = await deferThenHeal({ dataEnd: 'silent' }, /timed out|timeout|ETIMEDOUT/i, null);
    assert.ok(rows(relay, id).attempts[0].reply?.endsWith(END_UNANSWERED), rows(relay, id).attempts[0].reply ?? '');
    assert.equal(upstream.transactions.filter((t) => t.answered === null).length, 1);
  });

  test('an upstream that stops reading a large message: deferred by the deadline, with no word that it may have the message', async () => {
    const { clock, relay, upstream } = await setup();
    upstream.behaviour = { ...WELL_BEHAVED, stallData: true };
    // larger than what the sockets' buffers take: its final dot never leaves relayq
    const info = await sendMail(relay.smtpPort, { to: RCPTS, subject: 'large', text: 'x'.repeat(76).concat('\r\n').repeat(250_000) });
    const id = queuedId(info.response);
    assert.ok(id, info.response);
    await relay.delivery.runOnce();
    assertDeferred(relay, id, clock, /^ETIMEDOUT: timed out: the attempt exceeded \d+ ms \(processingTimeout\)$/);
    assert.equal(upstream.transactions.length, 0, 'the upstream never had the whole message');
  });

  test('4xx to DATA → deferred; 250 later', async () => {
    const { relay, id } = await deferThenHeal({ dataEnd: { reply: '451 4.3.0 queue temporarily full' } }, /queue temporarily full/, 451);
    // a reply to the final dot says what became of the message: no guess added to it
    assert.equal(rows(relay, id).attempts[0].reply, '451 4.3.0 queue temporarily full');
  });

  test('STARTTLS refused with 454 → the first attempt is deferred, nothing sent in plain text after it', async () => {
    const { upstream } = await deferThenHeal({ startTls: { reply: '454 4.7.0 TLS not available' } }, /TLS not available/, 454);
    assert.deepEqual(upstream.afterStartTls, []);
    // the first session carried no envelope at all
    assert.equal(upstream.transactions.length, 1);
  });

  test('STARTTLS handshake answered with garbage → the first attempt is deferred, nothing sent in plain text', async () => {
    const { upstream } = await deferThenHeal({ startTls: 'garbage-handshake' }, /TLS|SSL|wrong version|ETLS|ECONNECTION/i, null);
    assert.deepEqual(upstream.afterStartTls, []);
  });

  test('per-RCPT 4xx and 5xx: only the refused ones wait or fail; the retry goes to the pending one alone', async () => {
    const { clock, relay, upstream } = await setup();
    upstream.behaviour = {
      ...WELL_BEHAVED,
      rcpt: (a) => (a.startsWith('later') ? '450 4.2.1 mailbox busy' : a.startsWith('never') ? '550 5.1.1 no such user' : undefined),
    };
    const id = await queue(relay, ['ok@example.com', 'later@example.com', 'never@example.com', 'fine@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(statuses(relay, id), {
      'ok@example.com': 'delivered',
      'later@example.com': 'pending',
      'never@example.com': 'failed',
      'fine@example.com': 'delivered',
    });
    const after1 = rows(relay, id);
    assert.equal(after1.message.state, 'queued');
    assert.equal(after1.attempts[0].outcome, 'partial');
    const never = after1.recipients.find((r) => r.address === 'never@example.com') as RecipientRow;
    assert.equal(never.last_code, 550);
    assert.equal(never.temporary, 0);
    assertNoClaimLeft(relay);

    upstream.behaviour = { ...upstream.behaviour, rcpt: (a) => (a.startsWith('never') ? '550 5.1.1 no such user' : undefined) };
    const seen = upstream.rcpts.length;
    await deliverEverything(clock, relay, id);
    // the retry addressed the one pending recipient, nobody else
    assert.deepEqual(upstream.rcpts.slice(seen), ['later@example.com']);
    assert.equal(rows(relay, id).message.state, 'failed');
    for (const a of ['ok@example.com', 'later@example.com', 'fine@example.com']) assert.equal(upstream.deliveriesTo(a), 1, a);
    assert.equal(upstream.deliveriesTo('never@example.com'), 0);
    assert.ok(fs.existsSync(path.join(relay.config.emailsDir, 'failed', `${id}.json`)), 'failed mail exported');
    assertNoClaimLeft(relay);
  });

  test('a multi-line refusal is stored as one line, its lines joined by a space (as Postfix logs it)', async () => {
    const { relay, upstream } = await setup();
    upstream.behaviour = { ...WELL_BEHAVED, rcpt: (a) => (a.startsWith('never') ? '550-5.1.1 no such user\r\n550 5.1.1 see https://example.com/bounce' : undefined) };
    const id = await queue(relay, ['never@example.com', 'ok@example.com']);
    await relay.delivery.runOnce();
    const never = rows(relay, id).recipients.find((r) => r.address === 'never@example.com') as RecipientRow;
    assert.deepEqual([never.status, never.last_code], ['failed', 550]);
    assert.equal(never.last_reply, '550-5.1.1 no such user 550 5.1.1 see https://example.com/bounce');
  });

  test('a reply that is no SMTP reply, to RCPT or to the final dot → deferred, not failed', async () => {
    await deferThenHeal({ rcpt: () => 'HELLO THIS IS NOT SMTP' }, /^HELLO THIS IS NOT SMTP$/, null);
    await deferThenHeal({ dataEnd: { reply: '999 what is this' } }, /^999 what is this$/, null);
  });

  test('a reply that is no SMTP reply to one RCPT defers that recipient only; a 550 to another still fails it', async () => {
    const { relay, upstream } = await setup();
    upstream.behaviour = {
      ...WELL_BEHAVED,
      rcpt: (a) => (a === 'one@example.com' ? '550 5.1.1 no such user' : a === 'two@example.com' ? '999 weird' : undefined),
    };
    const id = await queue(relay, ['one@example.com', 'two@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(
      rows(relay, id).recipients.map((r) => [r.address, r.status, r.last_code]),
      [
        ['one@example.com', 'failed', 550],
        ['two@example.com', 'pending', null],
      ],
    );
  });

  test('replies out of step with the commands (a second greeting line): the message is not sent until they are in step', async () => {
    // DATA gets the last RCPT's 250; going ahead would send the message, read the 354 as the
    // reply to the final dot, and send it again at every retry
    // the second 220 comes as the reply to EHLO: no transaction starts
    const outOfStep = /^EPROTOCOL: the upstream answered EHLO with "220 [^"]*" instead of 250/;
    const { upstream } = await deferThenHeal({ greeting: 'twice' }, outOfStep, null);
    assert.equal(upstream.transactions.length, 1, 'no message went out while out of step');
    for (const refused of RCPTS) {
      // else one recipient's refusal would come as the reply to another's RCPT
      await deferThenHeal({ greeting: 'twice', rcpt: (a) => (a === refused ? '550 5.1.1 no such user' : undefined) }, outOfStep, null);
    }
  });

  test('a 2xx to DATA: the message is not sent, every recipient waits, the RCPT replies are disregarded', async () => {
    // an upstream that answers DATA with 250 (replies out of step, or a broken server)
    const outOfStep = /^EPROTOCOL: the upstream answered DATA with "250 [^"]*" instead of 354/;
    const { upstream } = await deferThenHeal({ data: '250 2.0.0 go on', rcpt: (a) => (a === 'two@example.com' ? '550 5.1.1 no such user' : undefined) }, outOfStep, null);
    assert.equal(upstream.transactions.length, 1, 'no message went out before the 354');
  });

  test('a very long reply is kept to 2,048 characters in the database', async () => {
    const { relay, upstream } = await setup();
    upstream.behaviour = { ...WELL_BEHAVED, dataEnd: { reply: `554 5.6.0 ${'x'.repeat(100_000)}` } };
    const id = await queue(relay, ['one@example.com']);
    await relay.delivery.runOnce();
    const { recipients, attempts } = rows(relay, id);
    const kept = `554 5.6.0 ${'x'.repeat(2038)}… (100010 characters)`;
    assert.deepEqual([recipients[0].status, recipients[0].last_code, recipients[0].last_reply, attempts[0].reply], ['failed', 554, kept, kept]);
  });

  test('5xx to DATA → every recipient of the batch failed at once, exported, never retried', async () => {
    const { clock, relay, upstream } = await setup();
    upstream.behaviour = { ...WELL_BEHAVED, dataEnd: { reply: '554 5.6.0 content rejected' } };
    const id = await queue(relay, RCPTS);
    await relay.delivery.runOnce();
    const { message, recipients, attempts } = rows(relay, id);
    assert.equal(message.state, 'failed');
    assert.ok(recipients.every((r) => r.status === 'failed' && r.last_code === 554 && r.temporary === 0));
    assert.equal(attempts[0].outcome, 'failed');
    assert.ok(fs.existsSync(path.join(relay.config.emailsDir, 'failed', `${id}.json`)));
    upstream.behaviour = { ...WELL_BEHAVED };
    clock.advance(7 * 24 * 3600 * 1000);
    assert.equal((await relay.delivery.runOnce()).attempts, 0);
    assert.equal(upstream.transactions.length, 1);
    assertNoClaimLeft(relay);
  });

  test('very slow acceptance: the claim holds while the upstream thinks; delivered exactly once', async () => {
    const { relay, upstream } = await setup();
    let accept = () => {};
    upstream.behaviour = { ...WELL_BEHAVED, dataEnd: { until: new Promise<void>((resolve) => (accept = resolve)) } };
    const id = await queue(relay, RCPTS);
    const running = relay.delivery.runOnce();
    try {
      await waitFor(() => upstream.transactions.length === 1, 10_000, 'DATA at the upstream');
      const during = rows(relay, id).message;
      assert.equal(during.state, 'sending');
      assert.equal(during.lease_expires_at, relay.clock.now() + PROCESSING_TIMEOUT_S * 1000);
      // nobody else may claim it meanwhile
      assert.equal((await relay.delivery.runOnce()).attempts, 0);
    } finally {
      accept();
    }
    await running;
    assert.equal(rows(relay, id).message.state, 'delivered');
    assert.equal(rows(relay, id).message.claims, 1);
    for (const address of RCPTS) assert.equal(upstream.deliveriesTo(address), 1);
    assertNoClaimLeft(relay);
  });

  test('a claim that commits too late to send before its lease ends is handed back uncounted, and the next claim sends it', async () => {
    const log = capturedLog('warn');
    const { clock, relay, upstream } = await setup({}, log.logger);
    const id = await queue(relay, RCPTS);
    // another connection holds the write lock while the claim waits to commit, and the clock
    // moves on meanwhile: when the claim commits, less than the lease's margin is left
    const lock = await holdWriteLock(relay, 120_000);
    let running: Promise<unknown> | undefined;
    try {
      running = relay.delivery.runOnce();
      await waitFor(() => relay.writer.waitingFor('claimDueBatches') === 1, 10_000, 'the claim waiting for the writer');
      clock.advance(PROCESSING_TIMEOUT_S * 1000 - 500);
    } finally {
      await lock.release();
    }
    // runOnce claims again at once: that claim has its whole lease, and delivers
    await running;
    assert.ok(log.entries().some((e) => e.event === 'delivery.claim_late' && e.queueId === id));
    const { message, recipients, attempts } = rows(relay, id);
    assert.equal(message.state, 'delivered');
    // the late claim counts for nothing: one claim, one attempt per recipient, one attempts row
    assert.equal(message.claims, 1);
    assert.ok(recipients.every((r) => r.attempts === 1));
    assert.equal(attempts.length, 1);
    assert.equal(upstream.transactions.length, 1);
    for (const address of RCPTS) assert.equal(upstream.deliveriesTo(address), 1);
    // the upstream was never asked under the late claim: its health is untouched, live and stored
    assert.equal(relay.delivery.status().lastFailureAt, null);
    assert.equal(storeMetrics(relay.store.sqlite).upstream.consecutiveFailures, 0);
    assert.equal(storeMetrics(relay.store.sqlite).upstream.lastFailureAt, null);
  });

  /**
   * The upstream takes the message; the outcome's first commit fails (another process holds the
   * write lock, and the writer gives up on it after 100 ms); it must be committed again, not left
   * for the lease to end and the batch to go out twice. `stepMs`: the clock steps forward by this
   * much while the upstream thinks.
   */
  async function outcomeCommittedAgain(stepMs: number) {
    const { upstream, log, relay, clock, accept } = await gatedSetup({ startDelivery: false });
    const id = await queue(relay, RCPTS);
    const running = relay.delivery.runOnce();
    await waitFor(() => upstream.transactions.length === 1, 10_000, 'DATA at the upstream');
    clock.advance(stepMs);
    const lock = await holdWriteLock(relay, 100);
    try {
      accept();
      await waitFor(() => log.entries().some((e) => e.event === 'delivery.commit_retry'), 10_000, 'a retried outcome commit');
      assert.equal(rows(relay, id).message.state, 'sending');
    } finally {
      await lock.release();
    }
    await running;
    const { message, attempts } = rows(relay, id);
    assert.equal(message.state, 'delivered');
    assert.equal(message.claims, 1);
    assert.equal(attempts.length, 1);
    assert.equal(upstream.transactions.length, 1);
    assert.ok(!log.entries().some((e) => e.event === 'delivery.commit_failed'));
  }

  test('an outcome whose commit fails is committed again, not left for the lease to expire and the batch to go out twice', () =>
    outcomeCommittedAgain(0));

  // an NTP step (a resumed VM): by the new clock the claim's 60 s lease has long ended, but the
  // attempt keeps its message, and its outcome gets the time that was left on the monotonic clock
  test('after the clock steps forward past the lease, an outcome whose commit fails is still committed again, not sent twice', () =>
    outcomeCommittedAgain(3_600_000));

  test('an outcome kept from its commit past the end of the lease (another process holds the write lock) keeps its message: committed when the lock goes, sent once', async () => {
    const { upstream, log, relay, clock, accept } = await gatedSetup({ startDelivery: true, processingTimeout: 5 });
    const id = await queue(relay, RCPTS);
    await waitFor(() => upstream.transactions.length === 1, 10_000, 'DATA at the upstream');
    const lock = await holdWriteLock(relay, 100);
    try {
      accept();
      await waitFor(() => log.entries().some((e) => e.event === 'delivery.commit_retry'), 10_000, 'a retried outcome commit');
      // the 5 s lease ends by both clocks: the one the claim counts on, and the database's
      await sleep(5500);
      clock.advance(5500);
      assert.equal(rows(relay, id).message.state, 'sending');
    } finally {
      await lock.release();
    }
    await waitFor(() => rows(relay, id).message.state === 'delivered', 30_000, 'the outcome committed');
    assert.equal(upstream.transactions.length, 1, 'the batch went out once');
    const { message, attempts } = rows(relay, id);
    assert.deepEqual([message.claims, attempts.length], [1, 1]);
    assert.ok(!log.entries().some((e) => e.event === 'delivery.commit_failed'));
  });

  test('at shutdown an outcome waiting to be committed again is tried at once, not released to go out a second time', async () => {
    // the grace period and the wait for released attempts after it (1 s) end before the next try
    const { upstream, log, relay, accept, id, lock } = await outcomeAgainstHeldLock(1000);
    try {
      accept();
      // the outcome's commit failed five times: its next try is 3.2 s away, far past the grace period
      const longWait = () => log.entries().some((e) => e.event === 'delivery.commit_retry' && Number(e.retryInMs) >= 3200);
      await waitFor(longWait, 30_000, 'a long wait before the next try');
    } finally {
      await lock.release();
    }
    await relay.stop();
    // not handed back to go out again: the commit, tried at once, landed before the store closed
    // (left waiting for its next try, the message would stay `sending`, to go out again at the next start)
    const db = new Database(relay.config.databasePath, { readonly: true });
    try {
      assert.deepEqual(db.prepare('SELECT state, lease_token FROM messages WHERE id = ?').get(id), { state: 'delivered', lease_token: null });
      assert.equal(db.prepare('SELECT count(*) FROM attempts WHERE message_id = ?').pluck().get(id), 1);
    } finally {
      db.close();
    }
    assert.equal(upstream.transactions.length, 1);
    const events = log.entries().map((e) => e.event);
    assert.ok(!events.includes('delivery.released') && !events.includes('delivery.commit_failed'), events.join(' '));
  });

  test('at shutdown an outcome whose commit still fails when the grace period ends is given up and said so, not tried again after the stop', async () => {
    // another process holds the write lock through the whole stop
    const { log, relay, accept, id, lock } = await outcomeAgainstHeldLock(500);
    try {
      accept();
      await waitFor(() => log.entries().some((e) => e.event === 'delivery.commit_retry'), 10_000, 'a retried outcome commit');
      await relay.stop();
      const events = log.entries().map((e) => e.event);
      assert.ok(log.entries().some((e) => e.event === 'delivery.commit_failed' && e.queueId === id), events.join(' '));
      const retries = () => log.entries().filter((e) => e.event === 'delivery.commit_retry').length;
      const atStop = retries();
      await sleep(3000);
      assert.equal(retries(), atStop, 'no outcome commit is tried after the stop');
    } finally {
      await lock.release().catch(() => {}); // the writer is closed: only its busy_timeout cannot be set back
    }
    // the batch stays claimed, for the next start to send again (at least once), not half recorded
    const db = new Database(relay.config.databasePath, { readonly: true });
    try {
      assert.equal(db.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(id), 'sending');
    } finally {
      db.close();
    }
  });

  test('a fault that outlasts retry.maxAttempts → failed (temporary) and exported, nothing left queued', async () => {
    const { clock, relay, upstream } = await setup({ retry: { initialDelay: INITIAL_DELAY_S, maxDelay: 3600, maxAttempts: 3 } });
    upstream.behaviour = { ...WELL_BEHAVED, greeting: { reply: '421 4.3.2 still busy' } };
    const id = await queue(relay, RCPTS);
    await deliverEverything(clock, relay, id);
    const { message, recipients, attempts } = rows(relay, id);
    assert.equal(message.state, 'failed');
    assert.equal(attempts.length, 3);
    assert.ok(recipients.every((r) => r.status === 'failed' && r.temporary === 1 && r.attempts === 3));
    assert.ok(fs.existsSync(path.join(relay.config.emailsDir, 'failed', `${id}.json`)));
    assertNoClaimLeft(relay);
  });
});

test('a stop during the set-up of a connection (an upstream that never greets) closes that connection, not only at the greeting timeout', async (t) => {
  // takes the connection and says nothing: the set-up waits for the greeting, here up to 30 s
  const sockets: net.Socket[] = [];
  const closed: net.Socket[] = [];
  const upstream = net.createServer((socket) => {
    sockets.push(socket);
    socket.on('close', () => closed.push(socket));
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    return new Promise<void>((resolve) => upstream.close(() => resolve()));
  });
  const port = (upstream.address() as net.AddressInfo).port;
  const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, processingTimeout: 300 }, { shutdownGraceMs: 100, startRetention: false });
  await sendMail(relay.smtpPort, { to: ['a@example.com'], raw: 'Subject: x\r\n\r\nbody\r\n' });
  await waitFor(() => sockets.length === 1, 10_000, 'the connection at the upstream');
  await relay.stop();
  // the attempt was aborted at the end of the grace period, and its connection with it
  await waitFor(() => closed.length === 1, 10_000, 'the connection closed by the stop');
});
