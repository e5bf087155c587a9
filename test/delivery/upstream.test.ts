import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import pino from 'pino';
import { type DeliveryDeps, DeliveryEngine } from '../../src/delivery/engine.js';
import { connectionOptions, withCertificateHint } from '../../src/delivery/upstream.js';
import type { Relay } from '../../src/main.js';
import { capturedLog, holdWriteLock, sendMail, startTestRelay, tempDir, waitFor } from '../helpers.js';
import { ManualClock } from '../manual-clock.js';
import { attempts, message, NO_JITTER, queuedId, recipients, startScriptedUpstream } from './fixtures.js';

/** A second engine on a test relay's store, silent and without jitter, with the given extra dependencies. */
function engineOn(relay: Relay, clock: ManualClock, extra: Partial<DeliveryDeps>): DeliveryEngine {
  return new DeliveryEngine({
    config: relay.config,
    sqlite: relay.store.sqlite,
    writer: relay.writer,
    clock,
    logger: pino({ level: 'silent' }),
    random: NO_JITTER,
    ...extra,
  });
}

test("the nodemailer internals relayq's upstream connections hook are all there", () => {
  // Each hook does nothing when its member is missing (src/delivery/nodemailer-internals.ts): an update of
  // nodemailer that renamed one would drop a check without a word, such as "DATA must get 354"
  // (or, for _onError, which the hooks call, throw).
  const connection = new SMTPConnection({}) as unknown as Record<string, unknown>;
  const kinds = Object.fromEntries(
    ['_actionDATA', '_actionEHLO', '_actionHELO', '_actionSTARTTLS', '_onClose', '_onError', '_createSendStream', '_sendCommand', '_responseQueue', '_supportedExtensions', '_envelope', '_maxAllowedSize', '_socket', '_destroyed'].map(
      (name) => [name, Array.isArray(connection[name]) ? 'array' : typeof connection[name]],
    ),
  );
  assert.deepEqual(kinds, {
    _actionDATA: 'function',
    _actionEHLO: 'function',
    _actionHELO: 'function',
    _actionSTARTTLS: 'function',
    _onClose: 'function',
    _onError: 'function',
    _createSendStream: 'function',
    _sendCommand: 'function',
    _responseQueue: 'array',
    _supportedExtensions: 'array',
    _envelope: 'boolean',
    _maxAllowedSize: 'number',
    _socket: 'boolean',
    _destroyed: 'boolean',
  });
});

test("an untrusted certificate's error reads the same on every Node: Node 26's advice about a flag Node 20 lacks gives way to relayq's hint", () => {
  const hint = "the upstream's certificate is not signed by a CA that relayq trusts: for a private CA, start relayq with NODE_EXTRA_CA_CERTS naming the CA's PEM file";
  const untrusted = (message: string) => Object.assign(new Error(message), { originalCode: 'DEPTH_ZERO_SELF_SIGNED_CERT' });
  const node26 = withCertificateHint(untrusted('self-signed certificate; if the root CA is installed locally, try running Node.js with --use-system-ca'));
  const node20 = withCertificateHint(untrusted('self-signed certificate'));
  assert.equal(node26.message, `self-signed certificate: ${hint}`);
  assert.equal(node20.message, node26.message);
  // another error keeps its words
  assert.equal(withCertificateHint(new Error('connect ECONNREFUSED')).message, 'connect ECONNREFUSED');
});

describe('upstream connection: TLS and AUTH', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function relayFor(port: number, overrides: Parameters<typeof startTestRelay>[0] = {}, logger?: pino.Logger) {
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, ...overrides },
      { clock, startDelivery: false, random: NO_JITTER, logger },
    );
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw: 'Subject: tls\r\n\r\nbody\r\n' })).response);
    return { clock, relay, id };
  }

  /** An engine on the relay's store with extra TLS options (the test upstream's certificate is self-signed). */
  function engineWith(relay: Relay, clock: ManualClock, tls: Record<string, unknown>): DeliveryEngine {
    const engine = engineOn(relay, clock, { upstreamTls: tls });
    cleanup.push(() => engine.stop(0));
    return engine;
  }

  test("STARTTLS is used when offered; a certificate that does not verify is taken (Postfix's `may`) and said once per connection", async () => {
    const upstream = await startScriptedUpstream({ disabledCommands: [] }); // smtp-server's own certificate, not signed by a CA relayq trusts
    cleanup.push(() => upstream.close());
    const log = capturedLog();
    const { relay, id } = await relayFor(upstream.port, {}, log.logger);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'delivered');
    // the next message reuses the connection
    const next = queuedId((await sendMail(relay.smtpPort, { to: ['b@example.com'] })).response);
    await relay.delivery.runOnce();
    assert.equal(message(relay, next).state, 'delivered');
    assert.deepEqual(
      upstream.accepted.map((m) => m.secure),
      [true, true],
      'both over STARTTLS',
    );
    const unverified = log.entries().filter((e) => e.event === 'upstream.tls_unverified');
    assert.deepEqual(
      unverified.map((e) => [e.level, e.upstream, e.tls]),
      [[30, `127.0.0.1:${upstream.port}`, 'TLSv1.3']],
      'one line for the one connection both messages used',
    );
    assert.match(String(unverified[0].reason), /^(CERT_HAS_EXPIRED|DEPTH_ZERO_SELF_SIGNED_CERT|UNABLE_TO_VERIFY_LEAF_SIGNATURE)$/);
    assert.deepEqual(
      log.entries().filter((e) => e.event === 'delivery.attempt').map((e) => [e.level, e.tls]),
      [
        [30, 'TLSv1.3'],
        [30, 'TLSv1.3'],
      ],
    );
  });

  test('with forwardRequireTLS, a certificate that does not verify is a temporary error, never plain text', async () => {
    const upstream = await startScriptedUpstream({ disabledCommands: [] });
    cleanup.push(() => upstream.close());
    const { clock, relay, id } = await relayFor(upstream.port, { forwardRequireTLS: true });

    await relay.delivery.runOnce();
    assert.equal(upstream.accepted.length, 0, 'nothing sent over an unverified or plain connection');
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'pending');
    assert.equal(r.temporary, 1);
    assert.match(r.last_reply!, /ETLS|certificate/i);

    clock.set(message(relay, id).next_attempt_at);
    await engineWith(relay, clock, { rejectUnauthorized: false }).runOnce();
    assert.equal(message(relay, id).state, 'delivered');
    assert.equal(upstream.accepted.length, 1);
    assert.equal(upstream.accepted[0].secure, true, 'upgraded with STARTTLS');
  });

  test('forwardRequireTLS: an upstream that offers no STARTTLS gets nothing, and the attempt is deferred with a warning that says why', async () => {
    const upstream = await startScriptedUpstream(); // plain, STARTTLS off
    cleanup.push(() => upstream.close());
    const log = capturedLog();
    const { relay, id } = await relayFor(upstream.port, { forwardRequireTLS: true }, log.logger);
    await relay.delivery.runOnce();
    assert.deepEqual([upstream.rcpts, upstream.accepted.length], [[], 0], 'no envelope, no message in plain text');
    const [r] = recipients(relay, id);
    assert.deepEqual([r.status, r.temporary], ['pending', 1]);
    assert.equal(
      r.last_reply,
      `ETLS: TLS is required (forwardRequireTLS=true), but 127.0.0.1:${upstream.port} offered no STARTTLS, so nothing was sent; check forwardHost and forwardPort, or a proxy between the upstream and relayq that strips STARTTLS`,
    );
    const [line] = log.entries().filter((e) => e.event === 'delivery.attempt');
    assert.deepEqual([line.level, line.outcome, 'tls' in line], [40, 'deferred', false]);
  });

  test('the attempt line names the TLS version of the upstream connection, or null in plain text', async () => {
    const tlsUpstream = await startScriptedUpstream({ disabledCommands: [] });
    const plainUpstream = await startScriptedUpstream();
    cleanup.push(() => tlsUpstream.close(), () => plainUpstream.close());
    const secured = await relayFor(tlsUpstream.port, { forwardRequireTLS: true });
    const tlsLog = capturedLog();
    const engine = engineOn(secured.relay, secured.clock, { upstreamTls: { rejectUnauthorized: false }, logger: tlsLog.logger });
    cleanup.push(() => engine.stop(0));
    await engine.runOnce();
    assert.equal(message(secured.relay, secured.id).state, 'delivered');
    assert.equal(tlsUpstream.accepted[0].secure, true);
    const plainLog = capturedLog();
    const plain = await relayFor(plainUpstream.port, {}, plainLog.logger);
    await plain.relay.delivery.runOnce();
    assert.equal(message(plain.relay, plain.id).state, 'delivered');
    const tlsOf = (log: ReturnType<typeof capturedLog>) => log.entries().filter((e) => e.event === 'delivery.attempt').map((e) => [e.level, e.tls]);
    assert.deepEqual(tlsOf(tlsLog), [[30, 'TLSv1.3']]);
    assert.deepEqual(tlsOf(plainLog), [[30, null]]);
  });

  test('an upstream certificate that does not verify defers the attempt with a warning that says what to check', async (t) => {
    // a certificate for relayq.test alone
    const made = ownCertificate('DNS:relayq.test');
    if (!made) return t.skip('openssl is not installed');
    const { cert, key } = made;
    const own = await startScriptedUpstream({ disabledCommands: [], key, cert });
    const expired = await startScriptedUpstream({ disabledCommands: [] }); // smtp-server's own certificate, expired in 2025
    cleanup.push(() => own.close(), () => expired.close());
    // where the certificate must verify (forwardRequireTLS here; also implicit TLS, and credentials for an upstream off loopback)
    const cases: Array<[number, Record<string, unknown> | undefined, string]> = [
      [
        own.port,
        undefined,
        "ESOCKET: self-signed certificate: the upstream's certificate is not signed by a CA that relayq trusts: for a private CA, start relayq with NODE_EXTRA_CA_CERTS naming the CA's PEM file",
      ],
      [
        own.port,
        { ca: cert }, // trusted, as NODE_EXTRA_CA_CERTS would make it, but not for 127.0.0.1
        "ESOCKET: Hostname/IP does not match certificate's altnames: IP: 127.0.0.1 is not in the cert's list: set forwardHost to a name the upstream's certificate holds (openssl s_client -starttls smtp -connect HOST:PORT shows them; -connect alone with forwardSSL)",
      ],
      [expired.port, { ca: cert }, "ESOCKET: certificate has expired: the upstream's certificate is out of its dates (or this machine's clock is wrong)"],
    ];
    for (const [port, tls, reply] of cases) {
      const { clock, relay, id } = await relayFor(port, { forwardRequireTLS: true });
      const log = capturedLog();
      const engine = engineOn(relay, clock, { upstreamTls: tls, logger: log.logger });
      cleanup.push(() => engine.stop(0));
      await engine.runOnce();
      const [r] = recipients(relay, id);
      assert.deepEqual([r.status, r.temporary, r.last_reply], ['pending', 1, reply]);
      assert.deepEqual(attemptLines(log), [[40, 'deferred', null]]);
    }
    assert.equal(own.accepted.length + expired.accepted.length, 0);
  });

  test('NODE_TLS_REJECT_UNAUTHORIZED=0 in the environment does not turn certificate checks off where they apply', async () => {
    const upstream = await startScriptedUpstream({ disabledCommands: [] }); // self-signed
    cleanup.push(() => upstream.close());
    const { relay, id } = await relayFor(upstream.port, { forwardRequireTLS: true });
    const before = process.env.NODE_TLS_REJECT_UNAUTHORIZED;
    process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0';
    try {
      await relay.delivery.runOnce();
    } finally {
      if (before === undefined) delete process.env.NODE_TLS_REJECT_UNAUTHORIZED;
      else process.env.NODE_TLS_REJECT_UNAUTHORIZED = before;
    }
    assert.equal(upstream.accepted.length, 0);
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'pending');
    assert.match(r.last_reply!, /ETLS|certificate/i);
  });

  test('forwardSSL=true speaks implicit TLS, with a certificate that must verify', async () => {
    const upstream = await startScriptedUpstream({ secure: true });
    cleanup.push(() => upstream.close());
    const { clock, relay, id } = await relayFor(upstream.port, { forwardSSL: true });
    await relay.delivery.runOnce();
    assert.equal(upstream.accepted.length, 0);
    assert.match(recipients(relay, id)[0].last_reply!, /^ESOCKET: .*certificate/);
    clock.set(message(relay, id).next_attempt_at);
    await engineWith(relay, clock, { rejectUnauthorized: false }).runOnce();
    assert.equal(message(relay, id).state, 'delivered');
    assert.equal(upstream.accepted[0].secure, true);
  });

  test('forwardSSL=true against a plain port defers with a reply that reads the same every time and says what to check', async () => {
    const upstream = await startScriptedUpstream(); // plain, STARTTLS off
    cleanup.push(() => upstream.close());
    const { relay, id } = await relayFor(upstream.port, { forwardSSL: true });
    await relay.delivery.runOnce();
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'pending');
    assert.equal(
      r.last_reply,
      'ESOCKET: TLS wrong version number (ERR_SSL_WRONG_VERSION_NUMBER): the upstream did not answer in TLS (with forwardSSL=true its port must start with TLS, as 465 does)',
    );
  });

  /**
   * An upstream on raw sockets that offers STARTTLS and fails it: `handshake` answers `220` and
   * then plain text where the TLS handshake should be (what a broken upstream or a proxy in
   * between sends), `refused` answers `454`. Without STARTTLS it takes mail in plain text.
   */
  async function failingStartTls(mode: 'handshake' | 'refused') {
    const sessions: Array<{ startTls: boolean; delivered: number }> = [];
    const server = net.createServer((socket) => {
      const session = { startTls: false, delivered: 0 };
      sessions.push(session);
      let inData = false;
      let buffered = '';
      socket.write('220 plain.example ESMTP\r\n');
      socket.on('data', (data) => {
        buffered += data.toString('latin1');
        if (session.startTls && mode === 'handshake') {
          socket.write('500 5.5.2 not TLS\r\n');
          buffered = '';
          return;
        }
        for (let end = buffered.indexOf('\r\n'); end !== -1; end = buffered.indexOf('\r\n')) {
          const line = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          if (inData) {
            if (line === '.') {
              inData = false;
              session.delivered++;
              socket.write('250 2.0.0 queued\r\n');
            }
          } else if (/^EHLO/i.test(line)) socket.write('250-plain.example\r\n250 STARTTLS\r\n');
          else if (/^STARTTLS/i.test(line)) {
            session.startTls = true;
            socket.write(mode === 'handshake' ? '220 go ahead\r\n' : '454 4.7.0 TLS not available\r\n');
          } else if (/^DATA/i.test(line)) {
            inData = true;
            socket.write('354 go on\r\n');
          } else if (/^QUIT/i.test(line)) socket.end('221 bye\r\n');
          else socket.write('250 ok\r\n');
        }
      });
      socket.on('error', () => {});
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    cleanup.push(() => new Promise((resolve) => server.close(resolve)));
    return { port: (server.address() as net.AddressInfo).port, sessions };
  }

  const HANDSHAKE_FAILED =
    'ESOCKET: TLS wrong version number (ERR_SSL_WRONG_VERSION_NUMBER): the upstream offered STARTTLS, then did not answer in TLS (check the upstream, or a proxy between it and relayq)';

  test('a retry whose connection fails for a reason other than TLS (a 421 greeting) is not taken for a failed STARTTLS: one session, no plain-text retry, no upstream.tls_failed', async () => {
    let sessions = 0;
    const server = net.createServer((socket) => {
      sessions++;
      socket.on('error', () => {});
      socket.end('421 4.3.2 busy, try later\r\n');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    cleanup.push(() => new Promise((resolve) => server.close(resolve)));
    const port = (server.address() as net.AddressInfo).port;
    const log = capturedLog();
    const { clock, relay, id } = await relayFor(port, {}, log.logger);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'queued');
    assert.equal(sessions, 1);
    clock.set(message(relay, id).next_attempt_at);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).claims, 2, 'the retry was made');
    assert.equal(sessions, 2, 'the retry opened one session, not a second one in plain text');
    assert.deepEqual(log.entries().filter((e) => e.event === 'upstream.tls_failed'), []);
  });

  test("a failed STARTTLS defers the first attempt; the retry goes on in plain text when it fails again, as at Postfix's `may` level", async () => {
    for (const mode of ['handshake', 'refused'] as const) {
      const upstream = await failingStartTls(mode);
      const log = capturedLog();
      const { clock, relay, id } = await relayFor(upstream.port, {}, log.logger);
      await relay.delivery.runOnce();
      const [r] = recipients(relay, id);
      assert.equal(r.status, 'pending', mode);
      assert.equal(r.last_reply, mode === 'handshake' ? HANDSHAKE_FAILED : '454 4.7.0 TLS not available');
      assert.deepEqual(upstream.sessions, [{ startTls: true, delivered: 0 }], mode);

      clock.set(message(relay, id).next_attempt_at);
      await relay.delivery.runOnce();
      assert.equal(message(relay, id).state, 'delivered', mode);
      // after a failed handshake on a new connection without STARTTLS, after a refusal on the same one
      assert.deepEqual(
        upstream.sessions.slice(1),
        mode === 'handshake'
          ? [
              { startTls: true, delivered: 0 },
              { startTls: false, delivered: 1 },
            ]
          : [{ startTls: true, delivered: 1 }],
        mode,
      );
      assert.deepEqual(
        log.entries().filter((e) => e.event === 'upstream.tls_failed').map((e) => [e.level, e.queueId, e.err]),
        [[40, id, mode === 'handshake' ? HANDSHAKE_FAILED : '454 4.7.0 TLS not available']],
        mode,
      );
      assert.deepEqual(
        log.entries().filter((e) => e.event === 'delivery.attempt').map((e) => [e.outcome, e.tls]),
        [
          ['deferred', undefined], // it ended before its transaction began
          ['delivered', null],
        ],
        mode,
      );
      // the plain connection served that retry alone: the first attempt of the next message
      // tries STARTTLS on a connection of its own, and is deferred
      const next = queuedId((await sendMail(relay.smtpPort, { to: ['b@example.com'] })).response);
      await relay.delivery.runOnce();
      assert.equal(message(relay, next).state, 'queued', mode);
      assert.deepEqual(upstream.sessions.at(-1), { startTls: true, delivered: 0 }, mode);
    }
  });

  for (const [name, overrides] of [
    ['forwardRequireTLS', { forwardRequireTLS: true }],
    ['credentials', { forwardUsername: 'relay', forwardPassword: 's3cret' }],
  ] as const) {
    test(`with ${name}, a retry whose STARTTLS fails is deferred too: nothing goes in plain text`, async () => {
      for (const mode of ['handshake', 'refused'] as const) {
        const upstream = await failingStartTls(mode);
        const { clock, relay, id } = await relayFor(upstream.port, overrides);
        await relay.delivery.runOnce();
        clock.set(message(relay, id).next_attempt_at);
        await relay.delivery.runOnce();
        const [r] = recipients(relay, id);
        assert.equal(r.status, 'pending', mode);
        assert.equal(r.attempts, 2, mode);
        assert.equal(r.last_reply, mode === 'handshake' ? HANDSHAKE_FAILED : '454 4.7.0 TLS not available');
        assert.deepEqual(
          upstream.sessions,
          [
            { startTls: true, delivered: 0 },
            { startTls: true, delivered: 0 },
          ],
          mode,
        );
      }
    });
  }

  test('forwardSSL=false against a port that starts with TLS defers when no greeting comes, with a reply that says what to check', async () => {
    const upstream = await startScriptedUpstream({ secure: true });
    cleanup.push(() => upstream.close());
    // the shortest attempt: its connection setup waits 1.67 s for the greeting
    const { relay, id } = await relayFor(upstream.port, { processingTimeout: 5 });
    await relay.delivery.runOnce();
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'pending');
    assert.equal(
      r.last_reply,
      'ETIMEDOUT: Greeting never received: no 220 came: the upstream is hung or overloaded, or its port starts with TLS (as 465 does), which needs forwardSSL=true',
    );
    assert.equal(upstream.accepted.length, 0);
    await waitFor(() => upstream.errors.length > 0, 10_000, 'the upstream saw its TLS handshake cut short');
    assert.match(upstream.errors[0].message, /TLS/);
  });

  test('forwardUsername/forwardPassword authenticate; a refused login defers the mail instead of failing it', async () => {
    const upstream = await startScriptedUpstream({
      authOptional: false,
      allowInsecureAuth: true,
      authMethods: ['PLAIN', 'LOGIN'],
      onAuth(auth, _session, cb) {
        if (auth.username === 'relay' && auth.password === 's3cret') return cb(null, { user: auth.username });
        cb(Object.assign(new Error('5.7.8 Authentication credentials invalid'), { responseCode: 535 }));
      },
    });
    cleanup.push(() => upstream.close());

    const wrongLog = capturedLog();
    const wrong = await relayFor(upstream.port, { forwardUsername: 'relay', forwardPassword: 'wrong' }, wrongLog.logger);
    await wrong.relay.delivery.runOnce();
    const [r] = recipients(wrong.relay, wrong.id);
    assert.equal(r.status, 'pending', 'a bad password is a configuration problem, not the message’s');
    assert.equal(r.last_code, 535);
    assert.equal(attempts(wrong.relay, wrong.id)[0].outcome, 'deferred');
    // a setting to fix: the attempt's line is a warning, as Postfix warns of a SASL failure
    assert.deepEqual(attemptLines(wrongLog), [[40, 'deferred', 535]]);

    const rightLog = capturedLog();
    const right = await relayFor(upstream.port, { forwardUsername: 'relay', forwardPassword: 's3cret' }, rightLog.logger);
    await right.relay.delivery.runOnce();
    assert.equal(message(right.relay, right.id).state, 'delivered');
    assert.deepEqual(attemptLines(rightLog), [[30, 'delivered', 250]]);
    assert.equal(upstream.accepted.length, 1);
    assert.equal(upstream.accepted[0].user, 'relay');
  });
});

/** A self-signed certificate made for a test, for `names` (its subjectAltName); undefined without openssl. */
function ownCertificate(names: string): { cert: string; key: string } | undefined {
  const dir = tempDir('relayq-tls-');
  const [certFile, keyFile] = [path.join(dir, 'cert.pem'), path.join(dir, 'key.pem')];
  try {
    execFileSync(
      'openssl',
      ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', keyFile, '-out', certFile, '-days', '1', '-subj', '/CN=relayq.test', '-addext', `subjectAltName=${names}`],
      { stdio: 'ignore' },
    );
  } catch {
    return undefined;
  }
  return { cert: fs.readFileSync(certFile, 'utf8'), key: fs.readFileSync(keyFile, 'utf8') };
}

/** Each delivery.attempt line's level, outcome and code. */
function attemptLines(log: ReturnType<typeof capturedLog>): unknown[][] {
  return log
    .entries()
    .filter((e) => e.event === 'delivery.attempt')
    .map((e) => [e.level, e.outcome, e.code]);
}

describe('upstream AUTH and plain text', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  /** An upstream that takes AUTH PLAIN/LOGIN (in plain text too) and records every login tried. */
  async function authUpstream(startTls: boolean, certificate: { cert?: string; key?: string } = {}) {
    const logins: Array<{ username?: string; secure: boolean }> = [];
    const upstream = await startScriptedUpstream({
      ...certificate,
      disabledCommands: startTls ? [] : ['STARTTLS'],
      authOptional: false,
      allowInsecureAuth: true,
      authMethods: ['PLAIN', 'LOGIN'],
      onAuth(auth, session, cb) {
        logins.push({ username: auth.username, secure: session.secure });
        cb(null, { user: auth.username });
      },
    });
    cleanup.push(() => upstream.close());
    return { upstream, logins };
  }

  async function relayWithCredentials(port: number, logger?: pino.Logger) {
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, forwardUsername: 'relay', forwardPassword: 's3cret' },
      { clock, startDelivery: false, random: NO_JITTER, logger },
    );
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
    return { clock, relay, id };
  }

  test('an upstream elsewhere that offers no STARTTLS never gets the password: the mail is deferred, saying why', async () => {
    const { upstream, logins } = await authUpstream(false);
    const { clock, relay, id } = await relayWithCredentials(upstream.port);
    const log = capturedLog();
    const engine = engineOn(relay, clock, { upstreamAddress: () => '192.0.2.25', logger: log.logger });
    cleanup.push(() => engine.stop(0));
    await engine.runOnce();
    assert.deepEqual(logins, [], 'no AUTH was tried');
    assert.equal(upstream.accepted.length, 0);
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'pending');
    assert.equal(r.temporary, 1);
    assert.match(r.last_reply!, /not sent in plain text/);
    assert.deepEqual(attemptLines(log), [[40, 'deferred', null]]);
  });

  test('an upstream that offers no AUTH while credentials are set gets nothing: the mail is deferred, saying why', async () => {
    // e.g. forwardPort pointing at an MX's port 25, which would refuse relaying with a 554
    const upstream = await startScriptedUpstream({ disabledCommands: ['AUTH', 'STARTTLS'] });
    cleanup.push(() => upstream.close());
    const log = capturedLog();
    const { relay, id } = await relayWithCredentials(upstream.port, log.logger);
    await relay.delivery.runOnce();
    assert.equal(upstream.accepted.length, 0);
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'pending');
    assert.equal(r.temporary, 1);
    assert.match(r.last_reply!, /forwardUsername is set but the upstream offered no AUTH/);
    assert.equal(attempts(relay, id)[0].outcome, 'deferred');
    assert.deepEqual(attemptLines(log), [[40, 'deferred', null]]);
  });

  test('an upstream that offers AUTH with none of PLAIN, LOGIN, CRAM-MD5 (XOAUTH2 only) gets AUTH PLAIN, and its refusal defers the mail', async () => {
    const mechanisms: string[] = [];
    const upstream = await startScriptedUpstream({
      authOptional: false,
      allowInsecureAuth: true,
      authMethods: ['XOAUTH2'],
      onAuth(auth, _session, cb) {
        mechanisms.push(auth.method);
        cb(null, { user: auth.username });
      },
    });
    cleanup.push(() => upstream.close());
    const log = capturedLog();
    const { relay, id } = await relayWithCredentials(upstream.port, log.logger);
    await relay.delivery.runOnce();
    assert.deepEqual(mechanisms, [], 'smtp-server refuses a mechanism it does not offer before its onAuth');
    assert.equal(upstream.accepted.length, 0);
    const [r] = recipients(relay, id);
    assert.deepEqual([r.status, r.last_code, r.temporary], ['pending', 504, 1]);
    assert.match(r.last_reply!, /^504 Error: Unrecognized authentication type/);
    assert.deepEqual(attemptLines(log), [[40, 'deferred', 504]]);
  });

  test('an upstream elsewhere that offers neither STARTTLS nor AUTH (a submission server with STARTTLS stripped) is deferred for the missing TLS', async () => {
    const upstream = await startScriptedUpstream({ disabledCommands: ['AUTH', 'STARTTLS'] });
    cleanup.push(() => upstream.close());
    const { clock, relay, id } = await relayWithCredentials(upstream.port);
    const engine = engineOn(relay, clock, { upstreamAddress: () => '192.0.2.25' });
    cleanup.push(() => engine.stop(0));
    await engine.runOnce();
    assert.equal(upstream.accepted.length, 0);
    const [r] = recipients(relay, id);
    assert.deepEqual([r.status, r.temporary], ['pending', 1]);
    assert.match(r.last_reply!, /upstream offered no TLS \(STARTTLS\), so forwardUsername\/forwardPassword were not sent in plain text/);
  });

  test('an upstream elsewhere whose certificate does not verify gets neither the password nor the mail; one on loopback gets both, over TLS', async () => {
    const { upstream, logins } = await authUpstream(true); // smtp-server's own certificate, not signed by a CA relayq trusts
    const { clock, relay, id } = await relayWithCredentials(upstream.port);
    const log = capturedLog();
    const engine = engineOn(relay, clock, { upstreamAddress: () => '192.0.2.25', logger: log.logger });
    cleanup.push(() => engine.stop(0));
    await engine.runOnce();
    assert.deepEqual([logins, upstream.accepted.length], [[], 0]);
    const [r] = recipients(relay, id);
    assert.deepEqual([r.status, r.temporary], ['pending', 1]);
    assert.match(
      r.last_reply!,
      /^ETLS: the upstream's certificate did not verify \((CERT_HAS_EXPIRED|DEPTH_ZERO_SELF_SIGNED_CERT|UNABLE_TO_VERIFY_LEAF_SIGNATURE)\), so forwardUsername\/forwardPassword were not sent: the upstream's certificate /,
    );
    assert.deepEqual(attemptLines(log), [[40, 'deferred', null]]);

    // over loopback the password would go in plain text to an upstream without STARTTLS: any certificate does
    const local = capturedLog();
    const loopback = await relayWithCredentials(upstream.port, local.logger);
    await loopback.relay.delivery.runOnce();
    assert.equal(message(loopback.relay, loopback.id).state, 'delivered');
    assert.deepEqual(logins, [{ username: 'relay', secure: true }]);
    assert.equal(local.entries().filter((e) => e.event === 'upstream.tls_unverified').length, 1);
  });

  test("credentials kept from an upstream elsewhere whose certificate names another host: the reply gives the names it holds", async (t) => {
    const made = ownCertificate('DNS:mail.example.net,DNS:smtp.example.net');
    if (!made) return t.skip('openssl is not installed');
    const { upstream, logins } = await authUpstream(true, made);
    const { clock, relay, id } = await relayWithCredentials(upstream.port);
    const engine = engineOn(relay, clock, { upstreamAddress: () => '192.0.2.25', upstreamTls: { ca: made.cert } });
    cleanup.push(() => engine.stop(0));
    await engine.runOnce();
    assert.deepEqual([logins, upstream.accepted.length], [[], 0]);
    assert.equal(
      recipients(relay, id)[0].last_reply,
      "ETLS: the upstream's certificate did not verify (ERR_TLS_CERT_ALTNAME_INVALID: it names DNS:mail.example.net, DNS:smtp.example.net), so forwardUsername/forwardPassword were not sent: set forwardHost to a name the upstream's certificate holds (openssl s_client -starttls smtp -connect HOST:PORT shows them; -connect alone with forwardSSL)",
    );
  });

  test('with STARTTLS the password goes out encrypted; over loopback also in plain text', async (t) => {
    // a certificate that verifies: trusted (as NODE_EXTRA_CA_CERTS would make it) and naming 127.0.0.1
    const made = ownCertificate('IP:127.0.0.1');
    if (!made) return t.skip('openssl is not installed');
    const tlsUpstream = await authUpstream(true, made);
    const remote = await relayWithCredentials(tlsUpstream.upstream.port);
    const engine = engineOn(remote.relay, remote.clock, { upstreamAddress: () => '192.0.2.25', upstreamTls: { ca: made.cert } });
    cleanup.push(() => engine.stop(0));
    await engine.runOnce();
    assert.equal(message(remote.relay, remote.id).state, 'delivered');
    assert.deepEqual(tlsUpstream.logins, [{ username: 'relay', secure: true }]);

    const plainUpstream = await authUpstream(false);
    const local = await relayWithCredentials(plainUpstream.upstream.port);
    await local.relay.delivery.runOnce();
    assert.equal(message(local.relay, local.id).state, 'delivered');
    assert.deepEqual(plainUpstream.logins, [{ username: 'relay', secure: false }]);
  });
});

describe('attempt deadline', () => {
  test('an upstream that never answers DATA is cut off before the lease ends: deferred, connection closed', async () => {
    const upstream = await startScriptedUpstream();
    upstream.hold = () => upstream.held.length === 0;
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: 5 },
      { clock, startDelivery: false, random: NO_JITTER },
    );
    // time enough for the whole transaction up to the final dot on a loaded machine
    const log = capturedLog();
    const engine = engineOn(relay, clock, { attemptTimeoutMs: 2000, logger: log.logger });
    try {
      const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
      assert.equal(engine.attemptTimeoutMs, 2000);
      assert.equal(relay.delivery.attemptTimeoutMs, 4000, 'by default 10 % (at least 1 s) below the 5 s lease');
      await engine.runOnce();
      const [r] = recipients(relay, id);
      assert.equal(r.status, 'pending');
      assert.match(r.last_reply!, /timed out: the attempt exceeded 2000 ms.*; no reply to the final dot: /);
      const [line] = log.entries().filter((e) => e.event === 'delivery.attempt');
      assert.equal(line.tls, null, 'the message went out in plain text, and the line says so');
      assert.equal(message(relay, id).lease_token, null, 'recorded while the lease was still held');
      assert.equal(upstream.held.length, 1);
      await waitFor(() => upstream.connections() === 0, 10_000, 'the stalled connection to close');

      clock.set(message(relay, id).next_attempt_at);
      await engine.runOnce();
      assert.equal(message(relay, id).state, 'delivered');
    } finally {
      await engine.stop(0);
      await relay.stop();
      await upstream.close();
    }
  });

  test('an attempt cut off by its deadline keeps the refusals that came before: a recipient refused at RCPT fails', async () => {
    const upstream = await startScriptedUpstream();
    upstream.rcptReply = (address) => (address.startsWith('b@') ? { code: 550, message: '5.1.1 no such user here' } : undefined);
    upstream.hold = () => true;
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: 5 },
      { clock, startDelivery: false, random: NO_JITTER },
    );
    const engine = engineOn(relay, clock, { attemptTimeoutMs: 1500 });
    try {
      const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'] })).response);
      await engine.runOnce();
      const [a, b] = recipients(relay, id);
      assert.equal(a.status, 'pending');
      assert.match(a.last_reply!, /timed out: the attempt exceeded 1500 ms.*; no reply to the final dot: /);
      assert.deepEqual([b.status, b.last_code, b.temporary], ['failed', 550, 0], String(b.last_reply));
      assert.match(b.last_reply!, /no such user here/);
    } finally {
      await engine.stop(0);
      await relay.stop();
      await upstream.close();
    }
  });

  test('an attempt cut off by its deadline after a refused MAIL FROM (the upstream silent since) fails the batch with the refusal', async () => {
    // refuses MAIL, and then answers nothing
    const server = net.createServer((socket) => {
      socket.on('error', () => {});
      socket.write('220 silent.example ESMTP\r\n');
      socket.on('data', (chunk) => {
        for (const line of chunk.toString('latin1').split('\r\n')) {
          if (/^EHLO/i.test(line)) socket.write('250-silent.example\r\n250 PIPELINING\r\n');
          else if (/^MAIL/i.test(line)) socket.write('550 5.7.1 sender refused here\r\n');
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: (server.address() as net.AddressInfo).port, processingTimeout: 5 },
      { clock, startDelivery: false, random: NO_JITTER },
    );
    const engine = engineOn(relay, clock, { attemptTimeoutMs: 1500 });
    try {
      const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'] })).response);
      await engine.runOnce();
      assert.equal(message(relay, id).state, 'failed');
      assert.deepEqual(
        recipients(relay, id).map((r) => [r.status, r.last_code]),
        [
          ['failed', 550],
          ['failed', 550],
        ],
      );
      assert.deepEqual(
        attempts(relay, id).map((a) => [a.outcome, a.code]),
        [['failed', 550]],
      );
    } finally {
      await engine.stop(0);
      await relay.stop();
      server.close();
    }
  });

  test('an attempt cut off by what is left of its lease says so in whole milliseconds', async () => {
    const upstream = await startScriptedUpstream();
    upstream.hold = () => true;
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: 5 },
      { startDelivery: false, random: NO_JITTER },
    );
    try {
      const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
      // the lease counts from the claim, so the attempt gets a little less than its 4,000 ms
      await relay.delivery.runOnce();
      assert.match(recipients(relay, id)[0].last_reply!, /^ETIMEDOUT: timed out: the attempt exceeded \d{4} ms \(processingTimeout\); no reply to the final dot: /);
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('a claim that commits late leaves its attempt only what is left of the lease, not the whole attempt timeout', async () => {
    const upstream = await startScriptedUpstream();
    upstream.hold = () => true;
    const clock = new ManualClock();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: 5 },
      { clock, startDelivery: false, startRetention: false, random: NO_JITTER },
    );
    try {
      const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
      assert.equal(relay.delivery.attemptTimeoutMs, 4000);
      // another connection holds the write lock while the claim waits to commit, and the clock
      // moves on 2.5 s meanwhile: of the 5 s lease, 2.5 s are left, 1.5 s of them to send in
      const lock = await holdWriteLock(relay, 120_000);
      let running: Promise<unknown> | undefined;
      try {
        running = relay.delivery.runOnce();
        await waitFor(() => relay.writer.waitingFor('claimDueBatches') === 1, 10_000, 'the claim waiting for the writer');
        clock.advance(2_500);
      } finally {
        await lock.release();
      }
      await running;
      assert.equal(upstream.held.length, 1, 'the upstream had the message and held it');
      const [r] = recipients(relay, id);
      assert.equal(r.status, 'pending');
      const budget = Number(/timed out: the attempt exceeded (\d+) ms \(processingTimeout\); no reply to the final dot: /.exec(r.last_reply!)?.[1]);
      assert.ok(budget > 0 && budget <= 1500, `cut off after ${budget} ms, not within what was left of the lease: ${r.last_reply}`);
      assert.equal(attempts(relay, id)[0].reply, r.last_reply, 'recorded while the lease was still held');
      assert.equal(message(relay, id).lease_token, null);
      await waitFor(() => upstream.connections() === 0, 10_000, 'the held connection to close');
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('an engine whose attempts would have no time at all is refused: its claims would come back forever', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      const clock = new ManualClock();
      // a 1 s lease is all margin (config refuses processingTimeout below 5 s; the engine checks too)
      const oneSecondLease = { ...relay, config: { ...relay.config, processingTimeout: 1 } };
      assert.throws(() => engineOn(oneSecondLease, clock, {}), /no time for an attempt: processingTimeout 1 s less the lease's 1000 ms margin$/);
      assert.throws(() => engineOn(relay, clock, { attemptTimeoutMs: 0 }), /no time for an attempt: .* and attemptTimeoutMs 0$/);
    } finally {
      await relay.stop();
    }
  });
});

test('the wait for a reply (the final dot\'s too) is the attempt\'s whole budget; for the connection and the greeting a third of it, 1 s to 30 s', () => {
  const settings = { host: '127.0.0.1', port: 25, secure: false, requireTls: false, username: '', password: '', clientName: 'relay.test', maxMessageSize: 1000, maxConnections: 1, logger: pino({ level: 'silent' }) };
  // processingTimeout 900 (less its 10 % margin), past RFC 5321's 10 minutes for the final dot
  assert.deepEqual(pick(connectionOptions({ ...settings, attemptTimeoutMs: 810_000 })), { socketTimeout: 810_000, greetingTimeout: 30_000, connectionTimeout: 30_000 });
  // the default, 300 s
  assert.deepEqual(pick(connectionOptions({ ...settings, attemptTimeoutMs: 270_000 })), { socketTimeout: 270_000, greetingTimeout: 30_000, connectionTimeout: 30_000 });
  // processingTimeout 12: a third of its 10.8 s; a budget under 3 s still gives the greeting 1 s
  assert.deepEqual(pick(connectionOptions({ ...settings, attemptTimeoutMs: 10_800 })), { socketTimeout: 10_800, greetingTimeout: 3_600, connectionTimeout: 3_600 });
  assert.deepEqual(pick(connectionOptions({ ...settings, attemptTimeoutMs: 2_000 })), { socketTimeout: 2_000, greetingTimeout: 1_000, connectionTimeout: 1_000 });
});

function pick(options: ReturnType<typeof connectionOptions>) {
  return { socketTimeout: options.socketTimeout, greetingTimeout: options.greetingTimeout, connectionTimeout: options.connectionTimeout };
}

describe('an upstream that refuses MAIL FROM in a pipelined envelope, and answers its RCPTs "503 need MAIL command"', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function refusedSender(code: number, text: string) {
    const upstream = await startScriptedUpstream({
      onMailFrom(_address, _session, cb) {
        cb(Object.assign(new Error(text), { responseCode: code }));
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchDelay: 0, failedRetryInterval: 0 },
      { clock: new ManualClock(), startDelivery: false, startRetention: false, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { from: 'bad@example.org', to: ['a@example.com', 'b@example.com'], subject: 's', text: 'x' })).response);
    await relay.delivery.runOnce();
    return { message: message(relay, id), recipients: recipients(relay, id) };
  }

  test('a 5xx fails the batch with it, not with the 503s', async () => {
    const result = await refusedSender(553, '5.7.1 <bad@example.org>: Sender address rejected');
    assert.equal(result.message.state, 'failed');
    assert.deepEqual(
      result.recipients.map((r) => [r.status, r.last_code]),
      [
        ['failed', 553],
        ['failed', 553],
      ],
    );
    assert.match(String(result.recipients[0].last_reply), /Sender address rejected/);
  });

  test('a 4xx defers the batch with it, not with the 503s', async () => {
    const result = await refusedSender(450, '4.1.8 <bad@example.org>: Sender address rejected: Domain not found');
    assert.equal(result.message.state, 'queued');
    assert.deepEqual(
      result.recipients.map((r) => [r.status, r.last_code]),
      [
        ['pending', 450],
        ['pending', 450],
      ],
    );
  });
});
