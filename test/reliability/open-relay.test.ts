// relayq never runs as an open relay. With allowLocalOnly=false and requireAuth=true, clients
// from other hosts must authenticate, only over TLS, and outsiders of allowedNetworks are turned
// away at connect. "Other hosts" are simulated by handing 127.0.0.1 sockets to the relay's SMTP
// server under an injected peer address (see listenAsPeer), so nothing leaves the loopback.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Relay } from '../../src/main.js';
import { ManualClock } from '../manual-clock.js';
import { authClientKey, LoginThrottle } from '../../src/smtp/login-throttle.js';
import { capturedLog, messageCount, SmtpClient, startTestRelay, tempDir, waitFor } from '../helpers.js';
import { assertStillServing, closedByPeer, INTAKE_ONLY, listenAsPeer, type PeerListener, queuedId } from './smtp-session.js';

const USER = 'relay-user';
const PASSWORD = 'correct horse battery';
const AUTH = { user: USER, pass: PASSWORD };

function plain(user: string, password: string): string {
  return Buffer.from(`\0${user}\0${password}`).toString('base64');
}

/** A throwaway self-signed certificate for STARTTLS, or undefined when openssl is missing. */
function selfSignedCertificate(): { cert: string; key: string } | undefined {
  const dir = tempDir('relayq-tls-');
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  try {
    execFileSync(
      'openssl',
      ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=relayq.test'],
      { stdio: 'ignore' },
    );
  } catch {
    return undefined;
  }
  return { cert, key };
}

async function dialogVia(listener: PeerListener): Promise<{ dialog: SmtpClient; greeting: string }> {
  const socket = net.connect(listener.port, '127.0.0.1');
  await once(socket, 'connect');
  const dialog = new SmtpClient(socket);
  return { dialog, greeting: await dialog.read() };
}

async function timed<T>(fn: () => Promise<T>): Promise<{ value: T; ms: number }> {
  const start = process.hrtime.bigint();
  const value = await fn();
  return { value, ms: Number(process.hrtime.bigint() - start) / 1e6 };
}

describe('no open relay: allowLocalOnly=false, requireAuth=true', () => {
  const certificate = selfSignedCertificate();
  let relay: Relay;
  let outsider: PeerListener;
  const log = capturedLog('warn');
  before(async () => {
    relay = await startTestRelay({
      defaultUsername: USER,
      defaultPassword: PASSWORD,
      security: { allowLocalOnly: false, requireAuth: true, allowedNetworks: [] },
      tls: certificate ?? { cert: '', key: '' },
    }, { ...INTAKE_ONLY, logger: log.logger });
    outsider = await listenAsPeer(relay, '198.51.100.23');
  });
  after(async () => {
    await outsider.close();
    await relay.stop();
  });

  test('a non-loopback client without AUTH: MAIL → 530 5.7.0 and a pipelined relay attempt stores nothing', async () => {
    const before = messageCount(relay);
    const { dialog, greeting } = await dialogVia(outsider);
    assert.match(greeting, /^220 /);
    await dialog.send('EHLO attacker.test');
    assert.match(await dialog.send('MAIL FROM:<spammer@example.net>'), /^530 5\.7\.0 /);
    assert.match(await dialog.send('RCPT TO:<victim@example.org>'), /^5\d\d /);
    assert.match(await dialog.send('DATA'), /^5\d\d /);
    // the would-be message body is read as commands, none of which is accepted
    assert.match(await dialog.send('Subject: spam'), /^5\d\d /);
    dialog.close();
    assert.equal(messageCount(relay), before);
  });

  test('a loopback client without AUTH is refused too once credentials are configured', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO local.test');
    assert.match(await c.send('MAIL FROM:<app@example.com>'), /^530 5\.7\.0 /);
    c.close();
    await assertStillServing(relay, { auth: AUTH });
  });

  test('AUTH in plain text from a non-loopback client: not offered, and 538 5.7.11 before any credential is asked for', async () => {
    const { dialog } = await dialogVia(outsider);
    const ehlo = await dialog.send('EHLO remote.test');
    assert.doesNotMatch(ehlo, /AUTH/, 'AUTH is offered only after STARTTLS');
    assert.match(ehlo, /STARTTLS/);
    assert.match(await dialog.send(`AUTH PLAIN ${plain(USER, PASSWORD)}`), /^538 5\.7\.11 /);
    // no 334 prompt: the client is never asked for the user name or the password in the clear
    assert.match(await dialog.send('AUTH LOGIN'), /^538 5\.7\.11 /);
    assert.match(await dialog.send('AUTH PLAIN'), /^538 5\.7\.11 /);
    assert.match(await dialog.send('MAIL FROM:<app@example.com>'), /^530 5\.7\.0 /);
    dialog.close();
  });

  test('after STARTTLS the same non-loopback client may authenticate and send', { skip: certificate ? false : 'openssl not available' }, async () => {
    const before = messageCount(relay);
    const { dialog } = await dialogVia(outsider);
    assert.match(await dialog.send('EHLO remote.test'), /STARTTLS/);
    assert.match(await dialog.startTls(), /^220 /);
    assert.match(await dialog.send('EHLO remote.test'), /AUTH PLAIN LOGIN/);
    assert.match(await dialog.send(`AUTH PLAIN ${plain(USER, 'wrong')}`), /^535 5\.7\.8 /);
    assert.match(await dialog.send(`AUTH PLAIN ${plain(USER, PASSWORD)}`), /^235 /);
    assert.match(await dialog.send('MAIL FROM:<app@example.com>'), /^250 /);
    assert.match(await dialog.send('RCPT TO:<rcpt@example.org>'), /^250 /);
    assert.match(await dialog.send('DATA'), /^354 /);
    const id = queuedId(await dialog.send('Subject: over tls\r\n\r\nhello\r\n.'));
    assert.ok(id);
    // the parser made for the TLS session continues like the first one: whole messages in one write
    const whole = 'MAIL FROM:<app@example.com>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\nSubject: burst\r\n\r\nhi\r\n.\r\n';
    dialog.write(`${whole.repeat(3)}NOOP\r\n`);
    for (let i = 0; i < 3; i++) {
      for (const code of ['250', '250', '354']) assert.equal((await dialog.read()).slice(0, 3), code, `message ${i + 1}`);
      assert.ok(queuedId(await dialog.read()), `message ${i + 1} queued`);
    }
    assert.match(await dialog.read(), /^250 /);
    dialog.close();
    assert.equal(messageCount(relay), before + 4);
    const row = relay.store.sqlite.prepare('SELECT client_ip, auth_user, raw FROM messages JOIN message_bodies ON message_bodies.id = body_id WHERE messages.id = ?').get(id) as {
      client_ip: string;
      auth_user: string;
      raw: Buffer;
    };
    assert.equal(row.client_ip, '198.51.100.23');
    assert.equal(row.auth_user, USER);
    assert.match(row.raw.toString(), /^Received: from remote\.test \(\[198\.51\.100\.23\]\)\r\n\tby relayq\.test \(relayq\) with ESMTPSA id /);
  });

  test('wrong passwords → 535 5.7.8, each repeated failure answered more slowly, the right one too; no lockout', async () => {
    // loopback clients may AUTH in plain text: the slowdown is per client address
    const logged = log.entries().length;
    const durations: number[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      await c.send('EHLO guesser.test');
      const { value, ms } = await timed(() => c.send(`AUTH PLAIN ${plain(USER, `guess-${i}`)}`));
      assert.match(value, /^535 5\.7\.8 /);
      durations.push(ms);
      c.close();
    }
    // the first failure is answered at once, the 2nd after 500 ms and the 3rd after 1000 ms (as
    // logged); of the time measured only lower bounds are asserted (a timer never fires early,
    // while a loaded machine makes any reply later)
    const failures = log.entries().slice(logged).filter((e) => e.event === 'smtp.auth_failed' && e.client === '127.0.0.1');
    assert.deepEqual(failures.map((e) => [e.failures, e.replyInMs]), [[1, 0], [2, 500], [3, 1000]]);
    assert.ok(durations[1] >= 490, `2nd failure answered after ${durations[1]} ms, not slowed down`);
    assert.ok(durations[2] >= 990, `3rd failure answered after ${durations[2]} ms, not slowed down further`);
    // while that address is being slowed down, the right password still gets in, as slowly as a
    // 4th failure would be told (2 s): hanging up early tells a guesser nothing
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO guesser.test');
    const success = await timed(() => c.send(`AUTH PLAIN ${plain(USER, PASSWORD)}`));
    assert.match(success.value, /^235 /);
    assert.ok(success.ms >= 1990, `the right password answered after ${success.ms} ms, sooner than a failure would be`);
    const slowed = log.entries().slice(logged).filter((e) => e.event === 'smtp.auth_slowed');
    assert.deepEqual(slowed.map((e) => [e.client, e.user, e.failures, e.replyInMs]), [['127.0.0.1', USER, 3, 2000]]);
    c.close();
    await assertStillServing(relay, { auth: AUTH });
  });

  /** `count` connections at once, each past its EHLO. */
  function sessions(count: number, name: string): Promise<SmtpClient[]> {
    return Promise.all(
      Array.from({ length: count }, async () => {
        const c = await SmtpClient.connect(relay.smtpPort);
        await c.read();
        await c.send(`EHLO ${name}`);
        return c;
      }),
    );
  }

  /** A login on an open session, and its answer: a held-back one comes after 0.5-5 s, or after its turn and that. */
  function login(c: SmtpClient, password: string): Promise<string> {
    c.write(`AUTH PLAIN ${plain(USER, password)}\r\n`);
    return c.read(30_000);
  }

  /**
   * One failure, then `count` sessions, the first ten of which send wrong guesses: once it returns,
   * those ten answers are held back (for 0.5-5 s). `entries` are the log's lines since the failure.
   */
  async function tenGuessesHeldBack(count: number) {
    const logged = log.entries().length;
    const entries = (event: string) => log.entries().slice(logged).filter((e) => e.event === event);
    assert.match(await guess('wrong-0'), /^535 /);
    const clients = await sessions(count, 'guessers.test');
    let answered = 0;
    const guesses = Promise.all(clients.slice(0, 10).map((c, i) => login(c, `wrong-${i + 1}`).finally(() => answered++)));
    await waitFor(() => entries('smtp.auth_failed').length === 11, 10_000, 'ten guesses held back');
    return { clients, entries, guesses, answered: () => answered };
  }

  /** A login on a new connection: its answer, then the connection closes. */
  async function guess(password: string): Promise<string> {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO guesser.test');
    const answer = await c.send(`AUTH PLAIN ${plain(USER, password)}`);
    c.close();
    return answer;
  }

  /** A login followed by `more`, and a hang-up (a FIN, or a reset) `afterMs` later, without waiting for the answer. */
  async function guessAndHangUp(password: string, more: string, afterMs: number, hangUp: 'close' | 'reset' = 'close'): Promise<void> {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO guesser.test');
    c.write(`AUTH PLAIN ${plain(USER, password)}\r\n${more}`);
    await new Promise((resolve) => setTimeout(resolve, afterMs));
    if (hangUp === 'reset') c.socket.resetAndDestroy();
    else c.close();
  }

  test('a right password whose client hung up before the answer still counts: the next guess is not answered faster', async () => {
    const logged = log.entries().length;
    assert.match(await guess('wrong-1'), /^535 /);
    assert.match(await guess('wrong-2'), /^535 /);
    // the right one, answered only after 1 s: the guesser does not wait for it
    await guessAndHangUp(PASSWORD, '', 50);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.match(await guess('wrong-3'), /^535 /);
    const failures = log.entries().slice(logged).filter((e) => e.event === 'smtp.auth_failed' && e.client === '127.0.0.1');
    // the hung-up right guess is the 3rd attempt on the count, so the next is the 4th, 2 s late
    assert.deepEqual(failures.map((e) => [e.failures, e.replyInMs]), [[1, 0], [2, 500], [4, 2000]]);
    // an answered login clears the count
    assert.match(await guess(PASSWORD), /^235 /);
  });

  test('a right password whose client reset the connection before the answer still counts', async () => {
    const logged = log.entries().length;
    assert.match(await guess('wrong-1'), /^535 /);
    assert.match(await guess('wrong-2'), /^535 /);
    // a reset leaves no FIN to read: the session's close is what tells
    await guessAndHangUp(PASSWORD, '', 50, 'reset');
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.match(await guess('wrong-3'), /^535 /);
    const failures = log.entries().slice(logged).filter((e) => e.event === 'smtp.auth_failed' && e.client === '127.0.0.1');
    assert.deepEqual(failures.map((e) => [e.failures, e.replyInMs]), [[1, 0], [2, 500], [4, 2000]]);
    assert.match(await guess(PASSWORD), /^235 /);
  });

  test('a right password followed by more input and a hang-up still counts, though the FIN waits behind the unread input', async () => {
    const logged = log.entries().length;
    assert.match(await guess('wrong-1'), /^535 /);
    assert.match(await guess('wrong-2'), /^535 /);
    // the right one, then 72 KB of commands: relayq stops reading while the login waits for its
    // answer, so the client's FIN stays unread behind them
    await guessAndHangUp(PASSWORD, 'NOOP\r\n'.repeat(12_000), 50);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.match(await guess('wrong-3'), /^535 /);
    const failures = log.entries().slice(logged).filter((e) => e.event === 'smtp.auth_failed' && e.client === '127.0.0.1');
    assert.deepEqual(failures.map((e) => [e.failures, e.replyInMs]), [[1, 0], [2, 500], [4, 2000]]);
    assert.match(await guess(PASSWORD), /^235 /);
  });

  test('right logins that arrive together, with no failure before them, are all answered at once: a connection pool is not slowed down', async () => {
    const clients = await sessions(6, 'pool.test');
    const logged = log.entries().length;
    try {
      const logins = await Promise.all(clients.map((c) => c.send(`AUTH PLAIN ${plain(USER, PASSWORD)}`)));
      for (const reply of logins) assert.match(reply, /^235 /);
      // with each login counted against the others until its answer, five of them would have been
      // answered late, after 0.5, 1, 2, 4 and 5 s
      const slowed = log.entries().slice(logged).filter((e) => e.event === 'smtp.auth_slowed' || e.event === 'smtp.auth_failed');
      assert.deepEqual(slowed, []);
    } finally {
      for (const c of clients) c.close();
    }
  });

  test('at most 10 slowed answers are held back for one address: a login beyond them waits its turn, then is looked at', async () => {
    const { clients, entries, guesses, answered } = await tenGuessesHeldBack(12);
    try {
      // two more, the right password last: not looked at (nor logged) while ten answers are held back
      const waitingGuess = login(clients[10], 'wrong-11');
      const right = login(clients[11], PASSWORD).then((reply) => ({ reply, afterGuesses: answered() }));
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(entries('smtp.auth_failed').length, 11);
      assert.deepEqual(entries('smtp.auth_slowed'), []);
      for (const answer of await guesses) assert.match(answer, /^535 5\.7\.8 /);
      assert.match(await waitingGuess, /^535 5\.7\.8 /);
      // its turn came once a held-back answer was given; then it was slowed down as the 13th login
      const { reply, afterGuesses } = await right;
      assert.match(reply, /^235 /);
      assert.ok(afterGuesses >= 1, 'the right login was answered before any held-back one');
      assert.deepEqual(entries('smtp.auth_failed').map((e) => e.failures), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
      assert.deepEqual(entries('smtp.auth_slowed').map((e) => [e.failures, e.replyInMs]), [[12, 5000]]);
      // the right login cleared the count: the next is answered at once
      assert.match(await guess(PASSWORD), /^235 /);
      assert.equal(entries('smtp.auth_slowed').length, 1);
    } finally {
      for (const c of clients) c.close();
    }
  });

  test('a login waiting its turn whose client hung up is skipped, and one that shut down its side gets 454 4.7.0: neither is looked at', async () => {
    const { clients, entries, guesses } = await tenGuessesHeldBack(17);
    try {
      // three that wait their turn and hang up (reset), three that wait and shut down their side (FIN),
      // then the right password
      for (const c of clients.slice(10, 13)) c.write(`AUTH PLAIN ${plain(USER, PASSWORD)}\r\n`);
      const halfClosed = clients.slice(13, 16).map((c) => {
        c.write(`AUTH PLAIN ${plain(USER, PASSWORD)}\r\n`);
        c.socket.end();
        return c.read(30_000);
      });
      const right = login(clients[16], PASSWORD);
      await new Promise((resolve) => setTimeout(resolve, 100));
      // a reset: a FIN alone would leave the session open, half-closed
      for (const c of clients.slice(10, 13)) c.socket.resetAndDestroy();
      for (const answer of await Promise.all(halfClosed)) assert.match(answer, /^454 4\.7\.0 /);
      assert.match(await right, /^235 /);
      await guesses;
      // the six were not looked at: the right login came after eleven failures, as if they had not been there
      assert.equal(entries('smtp.auth_failed').length, 11);
      assert.deepEqual(entries('smtp.auth_slowed').map((e) => [e.user, e.failures]), [[USER, 11]]);
    } finally {
      for (const c of clients) c.close();
    }
  });

  test('a pool of 20 connections logging in right after a failure from its address: every login gets in', async () => {
    const logged = log.entries().length;
    assert.match(await guess('wrong'), /^535 /);
    const clients = await sessions(20, 'pool.test');
    try {
      const logins = await Promise.all(clients.map((c) => login(c, PASSWORD)));
      for (const reply of logins) assert.match(reply, /^235 /);
      // ten held back (the first answered after 0.5 s clears the count); the other ten, their turn
      // come, are answered at once
      const slowed = log.entries().slice(logged).filter((e) => e.event === 'smtp.auth_slowed');
      assert.equal(slowed.length, 10);
    } finally {
      for (const c of clients) c.close();
    }
  });

  test("one address's failures do not slow down another address", { skip: certificate ? false : 'openssl not available' }, async () => {
    const guesser = await listenAsPeer(relay, '203.0.113.77');
    const bystander = await listenAsPeer(relay, '203.0.113.78');
    try {
      const failOverTls = async (listener: PeerListener) => {
        const { dialog } = await dialogVia(listener);
        await dialog.send('EHLO x.test');
        await dialog.startTls();
        await dialog.send('EHLO x.test');
        const r = await timed(() => dialog.send(`AUTH PLAIN ${plain(USER, 'nope')}`));
        dialog.close();
        assert.match(r.value, /^535 5\.7\.8 /);
        return r.ms;
      };
      const guesses = [await failOverTls(guesser), await failOverTls(guesser), await failOverTls(guesser)];
      assert.ok(guesses[2] >= 990, `3rd failure answered after ${guesses[2]} ms, not slowed down`);
      const first = await failOverTls(bystander);
      assert.ok(first < guesses[2], `another address's first failure (${first} ms) is not slowed like the 3rd guess (${guesses[2]} ms)`);
      // the server as a whole is not locked: a loopback client authenticates at once
      await assertStillServing(relay, { auth: AUTH });
    } finally {
      await guesser.close();
      await bystander.close();
    }
  });
});

describe('allowedNetworks', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay({
      defaultUsername: USER,
      defaultPassword: PASSWORD,
      security: { allowLocalOnly: false, requireAuth: true, allowedNetworks: ['10.20.0.0/16', '2001:db8:1::/48'] },
    }, INTAKE_ONLY);
  });
  after(() => relay.stop());

  for (const address of ['198.51.100.7', '::ffff:198.51.100.7', '10.21.0.1', '2001:db8:2::5']) {
    test(`an outsider (${address}) gets 554 5.7.1 at connect and the connection is closed`, async () => {
      const before = messageCount(relay);
      const listener = await listenAsPeer(relay, address);
      try {
        const c = await SmtpClient.connect(listener.port);
        // pipelined without waiting: nothing of it may be acted on
        c.write('EHLO outsider.test\r\nMAIL FROM:<x@example.net>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nSubject: no\r\n\r\nno\r\n.\r\n');
        assert.match(await c.read(), /^554 5\.7\.1 /);
        await closedByPeer(c.socket);
        assert.equal(await c.read(), '');
        assert.equal(messageCount(relay), before);
      } finally {
        await listener.close();
      }
    });
  }

  for (const address of ['10.20.4.5', '::ffff:10.20.0.9', '2001:db8:1::77']) {
    test(`an insider (${address}) is greeted, and still has to authenticate`, async () => {
      const listener = await listenAsPeer(relay, address);
      try {
        const c = await SmtpClient.connect(listener.port);
        assert.match(await c.read(), /^220 /);
        await c.send('EHLO insider.test');
        assert.match(await c.send('MAIL FROM:<x@example.net>'), /^530 5\.7\.0 /);
        c.close();
      } finally {
        await listener.close();
      }
    });
  }
});

test("failed logins older than 15 minutes (on the relay's clock) no longer slow an address down", async () => {
  const clock = new ManualClock();
  const log = capturedLog('warn');
  const relay = await startTestRelay({ defaultUsername: USER, defaultPassword: PASSWORD }, { ...INTAKE_ONLY, clock, logger: log.logger });
  try {
    const fail = async () => {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      await c.send('EHLO guesser.test');
      assert.match(await c.send(`AUTH PLAIN ${plain(USER, 'wrong')}`), /^535 5\.7\.8 /);
      c.close();
    };
    await fail();
    await fail();
    clock.advance(15 * 60_000 - 1);
    await fail();
    clock.advance(15 * 60_000);
    await fail();
    const failures = log.entries().filter((e) => e.event === 'smtp.auth_failed');
    assert.deepEqual(failures.map((e) => [e.failures, e.replyInMs]), [[1, 0], [2, 500], [3, 1000], [1, 0]]);
  } finally {
    await relay.stop();
  }
});

test('failed logins from any loopback address count together, an IPv6 client by its /64: other source addresses do not start afresh', async () => {
  const log = capturedLog('warn');
  // each connection comes from another loopback address, as a local user can make it
  const peers = new WeakMap<object, string>();
  let next = 2;
  const relay = await startTestRelay(
    { defaultUsername: USER, defaultPassword: PASSWORD },
    {
      ...INTAKE_ONLY,
      logger: log.logger,
      smtpPeerAddress: (session) => {
        if (!peers.has(session)) peers.set(session, `127.0.${next++}.1`);
        return peers.get(session) as string;
      },
    },
  );
  try {
    for (let i = 0; i < 3; i++) {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      await c.send('EHLO guesser.test');
      assert.match(await c.send(`AUTH PLAIN ${plain(USER, `guess-${i}`)}`), /^535 5\.7\.8 /);
      c.close();
    }
    const failures = log.entries().filter((e) => e.event === 'smtp.auth_failed');
    assert.deepEqual(failures.map((e) => [e.client, e.failures, e.replyInMs]), [
      ['127.0.2.1', 1, 0],
      ['127.0.3.1', 2, 500],
      ['127.0.4.1', 3, 1000],
    ]);
  } finally {
    await relay.stop();
  }
  assert.equal(authClientKey('2001:db8:1:2::10'), '2001:db8:1:2::/64');
  assert.equal(authClientKey('2001:DB8:1:2:ffff:0:0:1'), '2001:db8:1:2::/64');
  assert.equal(authClientKey('2001:db8::1'), '2001:db8:0:0::/64');
  assert.equal(authClientKey('2001:0db8:0001:0003::1'), '2001:db8:1:3::/64');
  assert.equal(authClientKey('192.0.2.7'), '192.0.2.7');
  assert.equal(authClientKey('::1'), 'loopback');
});

test('the failed logins of at most 10,000 clients are remembered: past that, the one that failed longest ago is forgotten', () => {
  const logins = new LoginThrottle();
  const now = 1_000_000;
  for (let i = 0; i <= 10_000; i++) logins.failed(`198.51.${i >> 8}.${i & 255}`, 3, now + i);
  assert.equal(logins.recentFailures('198.51.0.0', now + 10_001), 0, 'the oldest is forgotten');
  assert.equal(logins.recentFailures('198.51.0.1', now + 10_001), 3);
  assert.equal(logins.recentFailures('198.51.39.16', now + 10_001), 3, 'the newest is kept');
  // a client that fails again is the newest: the one being slowed down now is not the one forgotten
  logins.failed('198.51.0.1', 4, now + 10_002);
  logins.failed('203.0.113.1', 1, now + 10_003);
  assert.equal(logins.recentFailures('198.51.0.1', now + 10_003), 4);
  assert.equal(logins.recentFailures('198.51.0.2', now + 10_003), 0, 'the one that failed longest ago is forgotten instead');
});

describe('allowLocalOnly=true (the default)', () => {
  test('a non-loopback client gets 554 5.7.1 at connect, loopback ones are served', async () => {
    const relay = await startTestRelay(undefined, INTAKE_ONLY);
    const listener = await listenAsPeer(relay, '192.0.2.10');
    try {
      const c = await SmtpClient.connect(listener.port);
      assert.match(await c.read(), /^554 5\.7\.1 /);
      await closedByPeer(c.socket);
      await assertStillServing(relay);
    } finally {
      await listener.close();
      await relay.stop();
    }
  });
});

describe('STARTTLS without tls.cert / tls.key', () => {
  test('is neither advertised nor accepted, so plain-text AUTH from a non-loopback client stays refused', async () => {
    const relay = await startTestRelay({
      defaultUsername: USER,
      defaultPassword: PASSWORD,
      security: { allowLocalOnly: false, requireAuth: true, allowedNetworks: [] },
    }, INTAKE_ONLY);
    const listener = await listenAsPeer(relay, '198.51.100.99');
    try {
      const { dialog } = await dialogVia(listener);
      assert.doesNotMatch(await dialog.send('EHLO remote.test'), /STARTTLS/);
      // smtp-server would otherwise upgrade with its built-in certificate, whose key is public
      const reply = await dialog.startTls();
      assert.match(reply, /^5\d\d /);
      assert.match(await dialog.send(`AUTH PLAIN ${plain(USER, PASSWORD)}`), /^538 5\.7\.11 /);
      dialog.close();
    } finally {
      await listener.close();
      await relay.stop();
    }
  });
});

test('a client whose TLS fails (plain text after 220 Ready to start TLS) is one info line, smtp.tls_failed, and the relay serves on', async (t) => {
  const certificate = selfSignedCertificate();
  if (!certificate) return t.skip('openssl is not installed');
  const log = capturedLog('info');
  const relay = await startTestRelay({ tls: certificate }, { ...INTAKE_ONLY, logger: log.logger });
  try {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO client.test');
    assert.match(await c.send('STARTTLS'), /^220 /);
    c.write('EHLO client.test\r\n');
    await closedByPeer(c.socket);
    await assertStillServing(relay);
    const tls = log.entries().filter((e) => e.event === 'smtp.tls_failed');
    assert.equal(tls.length, 1);
    assert.deepEqual([tls[0].level, tls[0].client, tls[0].code], [30, '127.0.0.1', 'ERR_SSL_WRONG_VERSION_NUMBER']);
    // the session's id, as in its closing line (assertStillServing's own session closes too)
    assert.equal(typeof tls[0].session, 'string');
    await waitFor(() => log.entries().some((e) => e.event === 'smtp.session' && e.session === tls[0].session), 10_000, 'the TLS session closed');
    assert.deepEqual(log.entries().filter((e) => (e.level as number) >= 40), [], 'no warning or error for what the client did');
  } finally {
    await relay.stop();
  }
});

test('the 421 of a stop is not counted for a session in the middle of its TLS handshake: it was never written', async (t) => {
  const certificate = selfSignedCertificate();
  if (!certificate) return t.skip('openssl is not installed');
  const log = capturedLog('info');
  const relay = await startTestRelay({ tls: certificate }, { ...INTAKE_ONLY, logger: log.logger });
  let stopped = false;
  try {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO client.test');
    assert.match(await c.send('STARTTLS'), /^220 /);
    // no ClientHello: the session waits in its handshake while the relay stops
    await relay.stop();
    stopped = true;
    const [session] = log.entries().filter((e) => e.event === 'smtp.session');
    assert.deepEqual([session?.refused, session?.replies], [0, undefined]);
  } finally {
    if (!stopped) await relay.stop();
  }
});

test('STARTTLS: a client that hangs up before its handshake is disconnected at once; one that half-closes its TLS session gets its 250', async (t) => {
  const certificate = selfSignedCertificate();
  if (!certificate) return t.skip('openssl is not installed');
  const relay = await startTestRelay({ tls: certificate }, INTAKE_ONLY);
  try {
    const gone = await SmtpClient.connect(relay.smtpPort);
    await gone.read();
    await gone.send('EHLO client.test');
    assert.match(await gone.send('STARTTLS'), /^220 /);
    gone.socket.end();
    // not held until the idle timeout (60 s) with nothing to read it
    await closedByPeer(gone.socket);

    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO client.test');
    await c.startTls();
    await c.send('EHLO client.test');
    c.socket.end('MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.com>\r\nDATA\r\nSubject: tls\r\n\r\nbody\r\n.\r\nQUIT\r\n');
    const replies = await c.readAll();
    const id = queuedId(replies[3] ?? '');
    assert.ok(id, replies.join(' | '));
    assert.match(replies[4] ?? '', /^221 /);
    assert.equal(messageCount(relay), 1);
  } finally {
    await relay.stop();
  }
});
