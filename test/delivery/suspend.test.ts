// An upstream that cannot be reached suspends delivery for a while (Postfix's dead host): the
// batches that come due meanwhile are deferred without a connection attempt, so that an upstream
// that lets connections hang does not cost every batch its connection timeout.
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import Database from 'better-sqlite3';
import { after, describe, test } from 'node:test';
import pino from 'pino';
import { uniformResult } from '../../src/delivery/outcomes.js';
import { UpstreamSuspension } from '../../src/delivery/suspension.js';
import type { Relay } from '../../src/main.js';
import { call, postJson } from '../api/fixtures.js';
import { runCli } from '../cli/run-cli.js';
import { capturedLog, holdWriteLock, sendMail, startTestRelay, tempDir, waitFor } from '../helpers.js';
import { ManualClock } from '../manual-clock.js';
import { attempts, message, NO_JITTER, queuedId, recipients, startScriptedUpstream } from './fixtures.js';

const SUSPENDED = 'delivery temporarily suspended: ';

describe('delivery to an upstream that cannot be reached', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function relayFor(port: number, overrides: Parameters<typeof startTestRelay>[0] = {}, shutdownGraceMs = 2000, clock = new ManualClock()) {
    const log = capturedLog('info');
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, retry: { initialDelay: 10, maxDelay: 100, maxAttempts: 10 }, ...overrides },
      { clock, startDelivery: false, random: NO_JITTER, logger: log.logger, shutdownGraceMs },
    );
    cleanup.push(() => relay.stop());
    return { clock, relay, log };
  }

  async function queue(relay: Relay, to = ['a@example.com']): Promise<string> {
    return queuedId((await sendMail(relay.smtpPort, { to, raw: 'Subject: suspend\r\n\r\nbody\r\n' })).response);
  }

  /** A TCP server on 127.0.0.1 for `onSocket`, closed with its sockets (and those added to the set) after the tests; its port. */
  async function tcpServer(onSocket: (socket: net.Socket, sockets: Set<net.Socket>) => void): Promise<number> {
    const sockets = new Set<net.Socket>();
    const server = net.createServer((socket) => {
      sockets.add(socket);
      socket.on('error', () => {});
      onSocket(socket, sockets);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    cleanup.push(
      () =>
        new Promise((resolve) => {
          for (const s of sockets) s.destroy();
          server.close(resolve);
        }),
    );
    return (server.address() as net.AddressInfo).port;
  }

  /**
   * A TCP proxy to the upstream on `port`: `route` gets each connection's number (from 1) and
   * decides what becomes of it; `pass` joins it to the upstream.
   */
  function proxyTo(port: number, route: (n: number, client: net.Socket, pass: () => void) => void): Promise<number> {
    let accepted = 0;
    return tcpServer((client, sockets) => {
      const pass = () => {
        const server = net.connect(port, '127.0.0.1');
        sockets.add(server);
        server.on('error', () => client.destroy());
        client.pipe(server).pipe(client);
      };
      route(++accepted, client, pass);
    });
  }

  /**
   * A proxy to the upstream on `port` that cuts the first connection after 300 ms, hands the
   * second to `second` (to pass it when it will: meanwhile the first one's failure waits to be
   * judged), and passes the others at once.
   */
  async function cutFirstConnection(port: number, second: (pass: () => void) => void): Promise<{ port: number; cut: () => boolean }> {
    let cut = false;
    const proxyPort = await proxyTo(port, (n, client, pass) => {
      if (n === 1) {
        setTimeout(() => {
          client.destroy();
          cut = true;
        }, 300);
      } else if (n === 2) second(pass);
      else pass();
    });
    return { port: proxyPort, cut: () => cut };
  }

  /** A TCP server that accepts connections and never says a word (a hung upstream); counts them. */
  async function silentServer(): Promise<{ port: number; connections: () => number }> {
    let count = 0;
    const port = await tcpServer(() => count++);
    return { port, connections: () => count };
  }

  /**
   * A relay whose first message found the upstream down (connection refused): delivery is
   * suspended. The upstream listens again on the same port once `comeBack()` is called.
   */
  async function suspendedRelay(overrides: Parameters<typeof startTestRelay>[0] = {}) {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    await upstream.goDown();
    const started = await relayFor(upstream.port, overrides);
    const first = await queue(started.relay);
    await started.relay.delivery.runOnce();
    assert.equal(events(started.log, 'upstream.suspended').length, 1);
    return { ...started, upstream, first };
  }

  /** What /health (`details.upstream[field]`) and the Prometheus gauge `metric` say of a suspension or an outage. */
  async function upstreamTime(relay: Relay, field: 'suspended_until' | 'unreachable_since', metric: string): Promise<[unknown, number]> {
    const health = await call<{ details: { upstream: Record<string, unknown> } }>(relay, '/health');
    const metrics = await call<string>(relay, '/metrics?format=prometheus');
    const gauge = new RegExp(`^${metric} (\\S+)$`, 'm').exec(metrics.body);
    assert.ok(gauge, 'the gauge is exposed');
    return [health.body.details.upstream[field], Number(gauge[1])];
  }
  const suspendedUntil = (relay: Relay) => upstreamTime(relay, 'suspended_until', 'relayq_upstream_suspended_until_timestamp_seconds');
  const unreachableSince = (relay: Relay) => upstreamTime(relay, 'unreachable_since', 'relayq_upstream_unreachable_since_timestamp_seconds');

  const events = (log: ReturnType<typeof capturedLog>, event: string) => log.entries().filter((e) => e.event === event);

  test('a hung upstream: after the attempts that found it so, due batches are deferred at once, without connecting, until 90 % of initialDelay has passed', async () => {
    const hung = await silentServer();
    // processingTimeout 5 s: the greeting is waited for 1.3 s
    const { clock, relay, log } = await relayFor(hung.port, { processingTimeout: 5, workerCount: 2 });
    const first = [await queue(relay), await queue(relay)];
    assert.equal((await relay.delivery.runOnce()).attempts, 2);
    assert.equal(hung.connections(), 2, 'both tried the upstream');
    for (const id of first) assert.match(attempts(relay, id)[0].reply ?? '', /^ETIMEDOUT: Greeting never received/);
    const [suspended] = events(log, 'upstream.suspended');
    assert.equal(suspended.forMs, 9000);
    assert.equal(events(log, 'upstream.suspended').length, 1, 'said once, not per attempt');

    const later = [await queue(relay), await queue(relay), await queue(relay)];
    assert.equal((await relay.delivery.runOnce()).attempts, 3);
    assert.equal(hung.connections(), 2, 'no new connection: no attempt waited for a greeting');
    for (const id of later) {
      const [a] = attempts(relay, id);
      assert.equal(a.outcome, 'deferred');
      assert.equal(a.reply, SUSPENDED + attempts(relay, first[1])[0].reply);
      const [r] = recipients(relay, id);
      assert.deepEqual([r.status, r.attempts, r.next_attempt_at], ['pending', 1, clock.now() + 10_000], 'counted and rescheduled as any deferral');
    }

    // 90 % of initialDelay later the upstream is tried again; still hung, it suspends delivery again
    clock.advance(9000);
    const again = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(hung.connections(), 3);
    assert.match(attempts(relay, again)[0].reply ?? '', /^ETIMEDOUT: Greeting never received/);
    const fresh = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(hung.connections(), 3);
    assert.ok(attempts(relay, fresh)[0].reply?.startsWith(SUSPENDED));
    assert.equal(events(log, 'upstream.suspended').length, 1, 'a suspension renewed is not said again');
  });

  test("an upstream that refuses the session, at its greeting or at relayq's login, suspends delivery as Postfix does: one session per suspension, not one per batch", async () => {
    // a greeting that refuses (Postfix: "host refused to talk to me")
    let greeted = 0;
    const refusing = await tcpServer((socket) => {
      greeted++;
      socket.end('421 4.7.0 upstream.test busy, try again later\r\n');
    });
    // a login refused (Postfix: "SASL authentication failed"): a password rotated at the provider
    const logins: string[] = [];
    const authUpstream = await startScriptedUpstream({
      authOptional: false,
      allowInsecureAuth: true,
      authMethods: ['PLAIN'],
      onAuth(auth, _session, cb) {
        logins.push(auth.username ?? '');
        cb(Object.assign(new Error('5.7.8 Authentication credentials invalid'), { responseCode: 535 }));
      },
    });
    cleanup.push(() => authUpstream.close());
    for (const [port, overrides, sessions, reply] of [
      [refusing, {}, () => greeted, /^421 4\.7\.0 upstream\.test busy/],
      [authUpstream.port, { forwardUsername: 'relay', forwardPassword: 'rotated-at-the-provider' }, () => logins.length, /^535 5\.7\.8 Authentication credentials invalid/],
    ] as const) {
      const { relay, log } = await relayFor(port, { ...overrides, workerCount: 1 });
      const ids = [await queue(relay), await queue(relay), await queue(relay)];
      await relay.delivery.runOnce();
      assert.equal(sessions(), 1, 'one session refused; the batches due meanwhile waited for the suspension to end');
      const [first, ...others] = ids.map((id) => attempts(relay, id)[0].reply ?? '');
      assert.match(first, reply);
      for (const later of others) assert.equal(later, SUSPENDED + first);
      const [suspended] = events(log, 'upstream.suspended');
      assert.match(String(suspended.reply), reply);
      assert.deepEqual(ids.map((id) => message(relay, id).state), ['queued', 'queued', 'queued']);
    }
  });

  test('refused connections suspend delivery; once past the suspension, the first attempt that reaches the upstream resumes it, and the mail the outage deferred is due at once', async () => {
    const { clock, relay, log, upstream, first: a } = await suspendedRelay();
    assert.match(attempts(relay, a)[0].reply ?? '', /ECONNREFUSED/);
    assert.deepEqual(await suspendedUntil(relay), [new Date(clock.now() + 9000).toISOString(), (clock.now() + 9000) / 1000]);
    const outage = [new Date(clock.now()).toISOString(), clock.now() / 1000];
    assert.deepEqual(await unreachableSince(relay), outage);
    // /health's warning says that the run of failures counts deferrals without a connection
    await queue(relay);
    await queue(relay);
    await relay.delivery.runOnce();
    const warnings = (await call<{ details: { warnings: string[] } }>(relay, '/health')).body.details.warnings.filter((w) => w.startsWith('upstream '));
    assert.deepEqual(warnings, [
      `upstream 127.0.0.1:${upstream.port} failing: 3 attempts in a row failed (no attempt has ever succeeded); last reply: ${SUSPENDED}${attempts(relay, a)[0].reply}; delivery to it is suspended until ${new Date(clock.now() + 9000).toISOString()}: the batches due meanwhile are deferred without a connection, and count as failed attempts`,
    ]);
    await upstream.comeBack();
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(attempts(relay, b)[0].reply, SUSPENDED + attempts(relay, a)[0].reply, 'still suspended: not tried though it is back');
    assert.equal(upstream.rcpts.length, 0);

    clock.advance(9000);
    // the suspension is over, and no attempt has reached the upstream yet: the outage goes on
    assert.deepEqual(await suspendedUntil(relay), [null, 0]);
    assert.deepEqual(await unreachableSince(relay), outage);
    const c = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, c).state, 'delivered');
    const [resumed] = events(log, 'upstream.resumed');
    assert.deepEqual([resumed.by, resumed.suspendedMs], ['reached', 9000]);
    assert.deepEqual(await suspendedUntil(relay), [null, 0]);
    assert.deepEqual(await unreachableSince(relay), [null, 0]);
    // a, b and the two sent for the warning wait for their retries no longer: due at once, the clock unmoved
    await waitFor(() => events(log, 'delivery.due_after_outage').length === 1, 10_000, 'the deferred mail to be made due');
    assert.equal(events(log, 'delivery.due_after_outage')[0].count, 4);
    await relay.delivery.runOnce();
    assert.deepEqual([message(relay, a).state, message(relay, b).state], ['delivered', 'delivered']);
    assert.equal(upstream.rcpts.length, 5);
  });

  test('one connection that fails while another reaches the upstream suspends nothing', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    // a proxy that passes every other connection on, and cuts the others (before any greeting)
    // once the relay has recorded a delivery: a failure that comes after another attempt reached the upstream
    let relay: Relay | undefined;
    const delivered = () => relay !== undefined && relay.store.sqlite.prepare("SELECT 1 FROM messages WHERE state = 'delivered'").get() !== undefined;
    const proxyPort = await proxyTo(upstream.port, (n, client, pass) => {
      if (n % 2 === 1) return pass();
      const cut = setInterval(() => {
        if (!delivered()) return;
        clearInterval(cut);
        client.destroy();
      }, 10);
    });
    const started = await relayFor(proxyPort, { workerCount: 2 });
    const { log } = started;
    relay = started.relay;
    const ids = [await queue(relay), await queue(relay)];
    await relay.delivery.runOnce();
    const states = ids.map((id) => message(relay, id).state).sort();
    assert.deepEqual(states, ['delivered', 'queued'], 'one went through, one connection was cut');
    assert.equal(events(log, 'upstream.suspended').length, 0);
    const next = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, next).state, 'delivered', 'tried at once');
    // no outage ended: the mail waiting for its retry keeps waiting
    assert.equal(events(log, 'delivery.due_after_outage').length, 0);
    assert.equal(message(relay, ids.find((id) => message(relay, id).state === 'queued') ?? '').state, 'queued');
  });

  test('one connection that fails while another attempt is in a transaction with the upstream suspends nothing', async () => {
    // the first message's DATA is never answered: its attempt stays in its transaction (until its deadline)
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.hold = (t) => t.to.includes('held@example.com');
    // the second connection is cut before any greeting
    const proxyPort = await proxyTo(upstream.port, (n, client, pass) => (n === 2 ? client.destroy() : pass()));
    const { relay, log } = await relayFor(proxyPort, { processingTimeout: 5 });
    const held = await queue(relay, ['held@example.com']);
    const holding = relay.delivery.runOnce();
    await waitFor(() => upstream.held.length === 1, 10_000, 'the first attempt is in its transaction');
    const cut = await queue(relay);
    await relay.delivery.runOnce();
    assert.match(attempts(relay, cut)[0].reply ?? '', /^ECONNECTION: Connection closed unexpectedly/);
    assert.equal(events(log, 'upstream.suspended').length, 0);
    const next = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, next).state, 'delivered', 'tried at once');
    await holding;
    assert.equal(message(relay, held).state, 'queued');
  });

  test('a connection that fails while others are being set up waits for them: as they reach the upstream, nothing is suspended', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    // the first connection is cut at once; the others reach the upstream 300 ms after they came
    const proxyPort = await proxyTo(upstream.port, (n, client, pass) => (n === 1 ? client.destroy() : setTimeout(pass, 300)));
    const { relay, log } = await relayFor(proxyPort, { workerCount: 3 });
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) ids.push(await queue(relay));
    // delivery as it runs: the slot the cut connection frees claims the next message at once
    relay.delivery.start();
    await waitFor(() => ids.filter((id) => message(relay, id).state === 'delivered').length === 5, 10_000, 'five delivered');
    assert.equal(ids.filter((id) => message(relay, id).state === 'queued').length, 1, 'the one whose connection was cut waits for its retry');
    const replies = ids.flatMap((id) => attempts(relay, id).map((a) => a.reply ?? ''));
    assert.deepEqual(replies.filter((r) => r.startsWith(SUSPENDED)), []);
    assert.equal(events(log, 'upstream.suspended').length, 0);
  });

  test('a failure waits for the connections being set up only until one of them reaches the upstream: one that hangs holds up nothing', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    // the first connection is cut at once, the second hangs (never greeted), the others reach the upstream
    const proxyPort = await proxyTo(upstream.port, (n, client, pass) => (n === 1 ? client.destroy() : n === 2 ? undefined : pass()));
    // processingTimeout 60 s: the hung connection waits 18 s for its greeting
    const { relay, log } = await relayFor(proxyPort, { workerCount: 3, processingTimeout: 60 });
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) ids.push(await queue(relay));
    relay.delivery.start();
    await waitFor(() => ids.filter((id) => message(relay, id).state === 'delivered').length === 4, 15_000, 'four delivered');
    const hanging = ids.filter((id) => message(relay, id).state === 'sending');
    assert.equal(hanging.length, 1, 'one still waits for its greeting');
    assert.deepEqual(attempts(relay, hanging[0]), [], 'the others went out before its attempt ended');
    assert.equal(events(log, 'upstream.suspended').length, 0);
  });

  test('an attempt released at shutdown while it waited for a judgement sent nothing: its attempt is not counted', async () => {
    const hung = await silentServer();
    // processingTimeout 12 s: the greeting is waited for 3.7 s; a stop waits 200 ms for attempts
    const { relay, log } = await relayFor(hung.port, { processingTimeout: 12, workerCount: 2 }, 200);
    relay.delivery.start();
    await queue(relay);
    await waitFor(() => hung.connections() === 1, 10_000, "the first message's connection");
    // the second connection begins 2 s after the first, and gives up 2 s after it
    await new Promise((resolve) => setTimeout(resolve, 2000));
    await queue(relay);
    await waitFor(() => hung.connections() === 2, 10_000, "the second message's connection");
    const waiting = await queue(relay);
    // the first connection gives up; the second is still set up: the third message waits for the judgement
    await waitFor(() => message(relay, waiting).state === 'sending', 10_000, 'the third message claimed');
    const dbFile = relay.config.databasePath;
    await relay.stop();
    const db = new Database(dbFile, { readonly: true });
    try {
      const row = db.prepare('SELECT attempts, status FROM recipients WHERE message_id = ?').get(waiting) as { attempts: number; status: string };
      assert.deepEqual(row, { attempts: 0, status: 'pending' });
      assert.equal(db.prepare('SELECT COUNT(*) AS n FROM attempts WHERE message_id = ?').pluck().get(waiting), 0);
    } finally {
      db.close();
    }
    // logged as the abort reaches the attempt, which a busy machine may make later than the stop's end
    await waitFor(() => log.entries().some((e) => e.event === 'delivery.attempt_released' && e.queueId === waiting), 5000, 'the released attempt logged');
    assert.equal(events(log, 'upstream.suspended').length, 0, 'connections ended by the stop say nothing of the upstream');
  });

  test('an attempt that waited for a judgement and then went out, cut off at shutdown, keeps its claim counted: its message may have reached the upstream', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.hold = () => true; // DATA read, never answered
    // the second connection reaches the upstream after 1.5 s
    const proxy = await cutFirstConnection(upstream.port, (pass) => setTimeout(pass, 1500));
    const { relay } = await relayFor(proxy.port, { processingTimeout: 30, workerCount: 3 }, 200);
    await queue(relay);
    await queue(relay);
    relay.delivery.start();
    await waitFor(proxy.cut, 10_000, 'the first connection cut');
    const judged = await queue(relay);
    await waitFor(() => upstream.held.length === 2, 10_000, "the second and the third message's DATA at the upstream");
    const dbFile = relay.config.databasePath;
    await relay.stop();
    const db = new Database(dbFile, { readonly: true });
    try {
      assert.equal(db.prepare('SELECT claims FROM messages WHERE id = ?').pluck().get(judged), 1);
    } finally {
      db.close();
    }
  });

  test('an attempt whose judgement comes while the stop releases the others is released too, and sends nothing', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.hold = () => true; // DATA read, never answered: the attempts stay unfinished
    // the second connection is held in its setup until the test lets it through
    let passSecond: (() => void) | undefined;
    const proxy = await cutFirstConnection(upstream.port, (pass) => {
      passSecond = pass;
    });
    const { relay } = await relayFor(proxy.port, { processingTimeout: 60, workerCount: 3 }, 200);
    await queue(relay);
    const second = await queue(relay);
    relay.delivery.start();
    await waitFor(() => proxy.cut() && passSecond !== undefined, 10_000, 'the first connection cut, the second being set up');
    const judged = await queue(relay);
    await waitFor(() => message(relay, judged).state === 'sending', 10_000, 'the third message claimed');
    // the stop's release waits for the write lock; meanwhile the second connection is set up,
    // which judges the failure and ends the third attempt's wait
    const lock = await holdWriteLock(relay, 20_000);
    const dbFile = relay.config.databasePath;
    const stopped = relay.stop();
    await new Promise((resolve) => setTimeout(resolve, 800)); // past the 200 ms grace
    passSecond?.();
    await waitFor(() => upstream.held.length === 1, 10_000, "the second message's DATA at the upstream");
    await new Promise((resolve) => setTimeout(resolve, 500));
    await lock.release();
    await stopped;
    assert.equal(upstream.held.length, 1, 'the third message did not go out during the stop');
    const db = new Database(dbFile, { readonly: true });
    try {
      const row = db.prepare('SELECT state, lease_expires_at AS lease FROM messages WHERE id = ?');
      for (const id of [second, judged]) assert.deepEqual(row.get(id), { state: 'queued', lease: null }, id === judged ? 'the attempt that waited' : 'the attempt sending');
    } finally {
      db.close();
    }
  });

  test('while a failure waits for the connections being set up, no attempt opens another: a hung upstream costs each wave only the connections begun before its first failure', async () => {
    const hung = await silentServer();
    // processingTimeout 12 s: the greeting is waited for 3.7 s
    const { relay, log } = await relayFor(hung.port, { processingTimeout: 12, workerCount: 2 });
    relay.delivery.start();
    const a = await queue(relay);
    await waitFor(() => hung.connections() === 1, 10_000, "the first message's connection");
    // a second connection begun later: still waiting for its greeting when the first gives up
    const b = await queue(relay);
    await waitFor(() => hung.connections() === 2, 10_000, "the second message's connection");
    const later = [await queue(relay), await queue(relay)];
    await waitFor(() => later.every((id) => attempts(relay, id).length === 1), 20_000, 'the later messages deferred');
    assert.equal(hung.connections(), 2, 'the later messages opened no connection');
    for (const id of [a, b]) assert.match(attempts(relay, id)[0].reply ?? '', /^ETIMEDOUT: Greeting never received/);
    for (const id of later) assert.ok(attempts(relay, id)[0].reply?.startsWith(SUSPENDED));
    assert.equal(events(log, 'upstream.suspended').length, 1);
  });

  test('a batch whose deferral would end its retries is tried all the same: mail does not fail without being offered', async () => {
    const { relay, upstream, first: a } = await suspendedRelay({ retry: { initialDelay: 10, maxAttempts: 1 } });
    assert.equal(message(relay, a).state, 'failed');
    await upstream.comeBack();
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, b).state, 'delivered', 'its one attempt went to the upstream');
  });

  test('an upstream reached that fails in TLS (forwardSSL against a port in plain text) suspends nothing: a setting to fix, not a host down', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const { relay, log } = await relayFor(upstream.port, { forwardSSL: true });
    const a = await queue(relay);
    await relay.delivery.runOnce();
    assert.match(attempts(relay, a)[0].reply ?? '', /ERR_SSL_WRONG_VERSION_NUMBER/);
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.match(attempts(relay, b)[0].reply ?? '', /^ESOCKET: TLS wrong version number/, 'tried, not deferred without an attempt');
    assert.equal(events(log, 'upstream.suspended').length, 0);
  });

  /** An operator's request that makes the message due, and the answer it gets. */
  type Request = (relay: Relay, id: string) => Promise<{ answer: unknown; expected: unknown }>;
  const api =
    (path: string, expected: (id: string) => unknown): Request =>
    async (relay, id) => {
      const res = await call(relay, path.replace(':id', id), { method: 'POST' });
      return { answer: res.body, expected: expected(id) };
    };
  const cli =
    (args: string[], expected: (id: string) => unknown): Request =>
    async (relay, id) => {
      const env = { DATABASE_PATH: relay.config.databasePath, EMAILS_DIR: relay.config.emailsDir };
      const done = await runCli([...args.map((a) => a.replace(':id', id)), '--json'], { env });
      assert.equal(done.code, 0, done.stderr);
      return { answer: JSON.parse(done.stdout), expected: expected(id) };
    };
  const requests: Array<[string, Request]> = [
    ['POST /admin/retry-queued', api('/admin/retry-queued', () => ({ due_now: 1 }))],
    ['POST /admin/retry-failed', api('/admin/retry-failed', () => ({ requeued: 1 }))],
    ['POST /admin/messages/:id/retry', api('/admin/messages/:id/retry', (id) => ({ id, result: 'due-now' }))],
    ['relayq retry --queued, another process,', cli(['retry', '--queued'], () => ({ due_now: 1 }))],
    ['relayq retry --failed, another process,', cli(['retry', '--failed'], () => ({ requeued: 1 }))],
    ['relayq retry ID, another process,', cli(['retry', ':id'], (id) => ({ results: [{ id, result: 'due-now' }] }))],
  ];
  for (const [name, request] of requests) {
    test(`${name} making mail due ends a suspension: the mail is tried at once`, async () => {
      // the relay's clock keeps to the wall clock, which the command's times come from; the
      // suspension lasts 54 s of it
      const clock = new ManualClock(Date.now());
      const upstream = await startScriptedUpstream();
      cleanup.push(() => upstream.close());
      const { relay, log } = await relayFor(upstream.port, { batchDelay: 0, retry: { initialDelay: 60 } }, undefined, clock);
      // retry-failed: mail the upstream refused for good before it went away (its requeue's
      // attempt is not its last, which would be tried all the same)
      const failed = name.includes('failed');
      upstream.rcptReply = () => (failed ? { code: 550, message: '5.1.1 no such user' } : undefined);
      const a = failed ? await queue(relay) : undefined;
      await relay.delivery.runOnce();
      upstream.rcptReply = () => undefined;
      await upstream.goDown();
      const b = await queue(relay);
      await relay.delivery.runOnce();
      assert.equal(events(log, 'upstream.suspended').length, 1);
      const id = a ?? b;
      assert.equal(message(relay, id).state, failed ? 'failed' : 'queued');
      await upstream.comeBack();
      const { answer, expected } = await request(relay, id);
      assert.deepEqual(answer, expected);
      clock.set(Math.max(clock.now(), Date.now()) + 1000);
      await relay.delivery.runOnce();
      assert.equal(message(relay, id).state, 'delivered');
      const [resumed] = events(log, 'upstream.resumed');
      assert.equal(resumed.by, 'operator');
      assert.deepEqual(await suspendedUntil(relay), [null, 0]);
      assert.deepEqual(await unreachableSince(relay), [null, 0]);
    });
  }

  test('a request that makes nothing due, or one made before the suspension began, leaves it alone', async () => {
    const clock = new ManualClock(Date.now());
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    const { relay, log } = await relayFor(upstream.port, { batchDelay: 0, retry: { initialDelay: 60 } }, undefined, clock);
    const env = { DATABASE_PATH: relay.config.databasePath, EMAILS_DIR: relay.config.emailsDir };
    const delivered = await queue(relay);
    await relay.delivery.runOnce();
    upstream.rcptReply = () => ({ code: 550, message: '5.1.1 no such user' });
    const failed = await queue(relay);
    await relay.delivery.runOnce();
    upstream.rcptReply = () => undefined;
    // made due before the upstream goes away
    const before = await runCli(['retry', '--failed', '--json'], { env });
    assert.deepEqual(JSON.parse(before.stdout), { requeued: 1 });
    await upstream.goDown();
    clock.set(Math.max(clock.now(), Date.now()) + 1000);
    await relay.delivery.runOnce();
    assert.equal(events(log, 'upstream.suspended').length, 1);
    assert.equal(message(relay, failed).state, 'queued');
    await upstream.comeBack();
    const cli = await runCli(['retry', delivered, '--json'], { env });
    assert.equal(cli.code, 1, cli.stderr);
    assert.deepEqual(JSON.parse(cli.stdout), { results: [{ id: delivered, result: 'delivered' }] });
    assert.equal((await call(relay, `/admin/messages/${delivered}/retry`, { method: 'POST' })).status, 409);
    const none = await call(relay, '/admin/retry-queued', postJson({ sender: 'nobody@example.com' }));
    assert.deepEqual(none.body, { due_now: 0 });
    assert.notEqual((await suspendedUntil(relay))[0], null);
    clock.advance(10_000);
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, b).state, 'queued');
    assert.equal(attempts(relay, b)[0].reply?.startsWith(SUSPENDED), true);
    assert.equal(events(log, 'upstream.resumed').length, 0);
  });

  test("after an operator's request for one message ended the suspension, the attempt that reaches the upstream makes the other mail the outage deferred due at once", async () => {
    const { relay, log, upstream, first: a } = await suspendedRelay({ batchDelay: 0, retry: { initialDelay: 60 } });
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(attempts(relay, b)[0].reply?.startsWith(SUSPENDED), true);
    await upstream.comeBack();
    assert.deepEqual((await call(relay, `/admin/messages/${a}/retry`, { method: 'POST' })).body, { id: a, result: 'due-now' });
    await relay.delivery.runOnce();
    assert.equal(message(relay, a).state, 'delivered');
    assert.deepEqual(
      events(log, 'upstream.resumed').map((e) => e.by),
      ['operator'],
    );
    await waitFor(() => events(log, 'delivery.due_after_outage').length === 1, 10_000, 'the rest to be made due');
    assert.equal(events(log, 'delivery.due_after_outage')[0].count, 1);
    await relay.delivery.runOnce();
    assert.equal(message(relay, b).state, 'delivered');
  });

  test('after a suspension, with no batch due, relayq tries a connection without a transaction, once per suspension; the one that reaches the upstream makes the mail the outage deferred due at once', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    let down = true;
    let connections = 0;
    const port = await proxyTo(upstream.port, (_n, client, pass) => {
      connections++;
      if (down) client.destroy();
      else pass();
    });
    const clock = new ManualClock();
    const log = capturedLog('info');
    // suspensions of 60 s (at most a minute), retries after 600 s
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, retry: { initialDelay: 600, maxDelay: 3600 } },
      { clock, random: NO_JITTER, logger: log.logger, deliveryPollMs: 20 },
    );
    cleanup.push(() => relay.stop());
    const settle = () => new Promise((resolve) => setTimeout(resolve, 300));
    const a = await queue(relay);
    await waitFor(() => events(log, 'upstream.suspended').length === 1, 10_000, 'delivery to be suspended');
    assert.equal(connections, 1);
    clock.advance(59_000);
    await settle();
    assert.equal(connections, 1, 'no probe while the suspension lasts');
    clock.advance(1000);
    await waitFor(() => connections === 2, 10_000, 'a probe once the suspension is over');
    await settle();
    assert.equal(connections, 2, 'the failed probe began the next suspension');
    assert.equal(message(relay, a).state, 'queued');
    assert.equal(attempts(relay, a).length, 1, 'a probe is no attempt');

    down = false;
    clock.advance(60_000);
    await waitFor(() => message(relay, a).state === 'delivered', 10_000, 'the mail to be delivered');
    assert.ok(clock.now() < (attempts(relay, a)[0].started_at as number) + 600_000, 'before its retry was due');
    assert.deepEqual(
      events(log, 'upstream.resumed').map((e) => e.by),
      ['reached'],
    );
    assert.equal(events(log, 'delivery.due_after_outage')[0]?.count, 1);
    assert.equal(connections, 3, "the probe's connection carried the mail");
    assert.equal(attempts(relay, a).length, 2);
  });

  test("a stop while a probe waits for a silent upstream's greeting ends it at once, and says nothing of the upstream", async () => {
    const silent = await silentServer();
    const clock = new ManualClock();
    const log = capturedLog('info');
    const relay = await startTestRelay(
      // processingTimeout 30: a greeting is waited for 9 s
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: silent.port, processingTimeout: 30, retry: { initialDelay: 10, maxDelay: 100 } },
      { clock, random: NO_JITTER, logger: log.logger, deliveryPollMs: 20 },
    );
    cleanup.push(() => relay.stop());
    await queue(relay);
    await waitFor(() => events(log, 'upstream.suspended').length === 1, 20_000, 'delivery to be suspended');
    clock.advance(9000);
    await waitFor(() => silent.connections() === 2, 10_000, 'the probe');
    await relay.stop();
    assert.deepEqual(events(log, 'upstream.resumed'), [], 'the upstream was never reached');
    assert.deepEqual(events(log, 'delivery.due_after_outage'), []);
  });

  test('mail a reachable upstream deferred with a 4xx before an outage keeps its backoff when the outage ends; the mail the outage deferred is due at once', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    upstream.rcptReply = () => ({ code: 451, message: '4.3.0 backend unavailable, try again later' });
    const { clock, relay, log } = await relayFor(upstream.port, { retry: { initialDelay: 600, maxDelay: 3600 } });
    const greylisted = await queue(relay);
    await relay.delivery.runOnce();
    const dueAt = message(relay, greylisted).next_attempt_at;
    clock.advance(1000);
    await upstream.goDown();
    const deferredByOutage = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(events(log, 'upstream.suspended').length, 1);
    await upstream.comeBack();
    clock.advance(60_000);
    upstream.rcptReply = () => undefined;
    const next = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, next).state, 'delivered');
    await waitFor(() => events(log, 'delivery.due_after_outage').length === 1, 10_000, 'the outage\'s mail to be made due');
    assert.equal(events(log, 'delivery.due_after_outage')[0].count, 1);
    await relay.delivery.runOnce();
    assert.equal(message(relay, deferredByOutage).state, 'delivered');
    assert.deepEqual([message(relay, greylisted).state, message(relay, greylisted).next_attempt_at, attempts(relay, greylisted).length], ['queued', dueAt, 1]);
  });

  test('an outage outlives a restart: the relay started meanwhile probes the upstream at once, and the mail the outage deferred goes when it is reached', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    await upstream.goDown();
    const dir = tempDir();
    const config = {
      databasePath: path.join(dir, 'data', 'relayq.db'),
      emailsDir: path.join(dir, 'emails'),
      forwardSMTP: true,
      forwardHost: '127.0.0.1',
      forwardPort: upstream.port,
      retry: { initialDelay: 600, maxDelay: 3600 },
    };
    const clock = new ManualClock();
    const first = await startTestRelay(config, { clock, startDelivery: false, random: NO_JITTER });
    const a = await queue(first);
    await first.delivery.runOnce();
    const remembered = () => first.store.sqlite.prepare("SELECT value FROM counters WHERE name = 'upstream_outage_since'").pluck().get();
    await waitFor(() => remembered() !== undefined, 10_000, 'the outage to be written down');
    assert.equal(remembered(), attempts(first, a)[0].started_at);
    await first.stop();

    // a restart (a deploy, a reboot) while the upstream is down; it comes back afterwards
    clock.advance(60_000);
    await upstream.comeBack();
    const log = capturedLog('info');
    const second = await startTestRelay(config, { clock, random: NO_JITTER, logger: log.logger, deliveryPollMs: 20 });
    cleanup.push(() => second.stop());
    await waitFor(() => message(second, a).state === 'delivered', 10_000, 'the mail the outage deferred to go');
    assert.equal(events(log, 'delivery.due_after_outage')[0]?.count, 1);
    assert.equal(attempts(second, a).length, 2);
    const stillRemembered = () => second.store.sqlite.prepare("SELECT count(*) FROM counters WHERE name = 'upstream_outage_since'").pluck().get();
    await waitFor(() => stillRemembered() === 0, 10_000, 'the outage to be over in the database too');
  });

  test('a request ends one suspension at most: the next, begun after it, holds', async () => {
    const { clock, relay, log, first: a } = await suspendedRelay({ batchDelay: 0, retry: { initialDelay: 60 } });
    clock.advance(1000);
    assert.deepEqual((await call(relay, '/admin/retry-queued', { method: 'POST' })).body, { due_now: 1 });
    clock.advance(1);
    // the upstream is still down: the mail made due is tried, and delivery is suspended again
    await relay.delivery.runOnce();
    assert.equal(attempts(relay, a).length, 2);
    assert.equal(attempts(relay, a)[1].reply?.startsWith(SUSPENDED), false, 'tried');
    assert.equal(events(log, 'upstream.resumed').length, 1);
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(attempts(relay, b)[0].reply?.startsWith(SUSPENDED), true, 'deferred without an attempt');
    assert.equal(events(log, 'upstream.resumed').length, 1);
  });

  test('a suspension lasts at most a minute, however long retry.initialDelay is', async () => {
    const { clock, relay, log, upstream } = await suspendedRelay({ retry: { initialDelay: 3600, maxDelay: 3600 } });
    assert.equal(events(log, 'upstream.suspended')[0].forMs, 60_000);
    await upstream.comeBack();
    clock.advance(60_000);
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, b).state, 'delivered');
  });

  test('a wall clock stepped back does not lengthen a suspension', async () => {
    // a suspension of 900 ms
    const { clock, relay, upstream } = await suspendedRelay({ retry: { initialDelay: 1, maxDelay: 1 } });
    await upstream.comeBack();
    clock.advance(-3_600_000);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const b = await queue(relay);
    await relay.delivery.runOnce();
    assert.equal(message(relay, b).state, 'delivered');
  });
});

test('an attempt that could not reach the upstream does not suspend delivery when another, pooled, reached it after it started', () => {
  // no connection of the pool says it reached the upstream since: only the other attempt's result does
  const reach = { label: 'up.test:25', reachedSince: () => false, setupsSettled: () => undefined };
  const suspension = new UpstreamSuspension(reach, 60_000, new ManualClock(), pino({ level: 'silent' }), () => Number.NEGATIVE_INFINITY);
  const startedAt = performance.now() - 1000;
  suspension.note(uniformResult('up.test:25', 1, 'delivered', '250 ok'), performance.now());
  suspension.note({ ...uniformResult('up.test:25', 1, 'deferred', 'connect ECONNREFUSED'), unreachable: true }, startedAt);
  assert.equal(suspension.until(), null);
  assert.equal(suspension.deferral(1), undefined);
});

test('an operator request made after a suspension ran out does not end the one the next failure renews; one made during it does', () => {
  const reach = { label: 'up.test:25', reachedSince: () => false, setupsSettled: () => undefined };
  const clock = new ManualClock();
  let requestedAt = Number.NEGATIVE_INFINITY;
  const suspension = new UpstreamSuspension(reach, 1000, clock, pino({ level: 'silent' }), () => requestedAt);
  const unreachable = () => suspension.note({ ...uniformResult('up.test:25', 1, 'deferred', 'connect ECONNREFUSED'), unreachable: true }, performance.now());
  unreachable();
  assert.equal(suspension.until(), clock.now() + 1000);
  clock.advance(1000);
  assert.equal(suspension.until(), null, 'ran out');
  // mail made due now is tried, finds the upstream unreachable again, and renews the suspension
  requestedAt = clock.now();
  clock.advance(10);
  unreachable();
  assert.equal(suspension.until(), clock.now() + 1000, 'the request came before the renewal');
  requestedAt = clock.now();
  assert.equal(suspension.until(), null, 'a request since the renewal ends it');
});

test('a suspension stays while the time of the last operator request cannot be read (a database fault)', () => {
  const reach = { label: 'up.test:25', reachedSince: () => false, setupsSettled: () => undefined };
  const clock = new ManualClock();
  const suspension = new UpstreamSuspension(reach, 60_000, clock, pino({ level: 'silent' }), () => {
    throw new Error('SQLITE_IOERR: disk I/O error');
  });
  suspension.note({ ...uniformResult('up.test:25', 1, 'deferred', 'connect ECONNREFUSED'), unreachable: true }, performance.now());
  assert.equal(suspension.until(), clock.now() + 60_000);
  assert.equal(suspension.deferral(1)?.recipients[0].verdict, 'deferred');
});

test('a probe is due once a suspension is over, in an outage, one at a time; never after a login the upstream refused', async () => {
  const reach = { label: 'up.test:25', reachedSince: () => false, setupsSettled: () => undefined };
  const clock = new ManualClock();
  const suspension = new UpstreamSuspension(reach, 60_000, clock, pino({ level: 'silent' }), () => 0);
  let probes = 0;
  let answer: () => void = () => {};
  const connect = () => {
    probes++;
    return new Promise<ReturnType<typeof uniformResult>>((resolve) => {
      answer = () => resolve({ ...uniformResult('up.test:25', 0, 'deferred', 'connect ECONNREFUSED'), unreachable: true });
    });
  };
  assert.equal(suspension.probe(connect), undefined, 'no outage');
  suspension.note({ ...uniformResult('up.test:25', 1, 'deferred', 'connect ECONNREFUSED'), unreachable: true }, performance.now());
  assert.equal(suspension.probe(connect), undefined, 'while suspended');
  clock.advance(60_000);
  const probing = suspension.probe(connect);
  assert.ok(probing);
  assert.equal(suspension.probe(connect), undefined, 'one at a time');
  answer();
  await probing;
  assert.equal(probes, 1);
  assert.equal(suspension.until(), clock.now() + 60_000, 'the failed probe began the next suspension');

  const refusedLogin = new UpstreamSuspension(reach, 60_000, clock, pino({ level: 'silent' }), () => 0);
  refusedLogin.note(
    { ...uniformResult('up.test:25', 1, 'deferred', '535 5.7.8 Error: authentication failed'), unreachable: true, settingFault: true },
    performance.now(),
  );
  clock.advance(60_000);
  assert.equal(refusedLogin.until(), null);
  assert.equal(refusedLogin.probe(connect), undefined, 'after a refused login');
});

test('an outage begins at the start of the earliest attempt found failing in it, as its attempt row records it: the mail of a whole cohort is made due when the upstream is reached again', () => {
  const reach = { label: 'up.test:25', reachedSince: () => false, setupsSettled: () => undefined };
  const clock = new ManualClock();
  const outages: number[] = [];
  const suspension = new UpstreamSuspension(reach, 60_000, clock, pino({ level: 'silent' }), () => 0, { reachedAgain: (since) => outages.push(since) });
  const unreachable = { ...uniformResult('up.test:25', 1, 'deferred', 'connect ECONNREFUSED'), unreachable: true };
  const begun = clock.now();
  clock.advance(1500);
  // the first judged began 1 s ago; another of its cohort, judged next, 1.5 s ago
  suspension.note(unreachable, performance.now(), begun + 500);
  suspension.note(unreachable, performance.now(), begun);
  suspension.note(unreachable, performance.now(), begun + 1000);
  clock.advance(60_000);
  suspension.note(uniformResult('up.test:25', 1, 'delivered', '250 ok'), performance.now());
  assert.deepEqual(outages, [begun]);
  // the next outage begins afresh
  suspension.note(unreachable, performance.now(), clock.now());
  suspension.note(uniformResult('up.test:25', 1, 'delivered', '250 ok'), performance.now());
  assert.deepEqual(outages, [begun, clock.now()]);
});
