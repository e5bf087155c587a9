// Hostile SMTP input against a live relay: every case checks the exact reply, that nothing was
// stored that did not get a 250, and that a normal client is still served afterwards.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import type { Relay } from '../../src/main.js';
import { call } from '../api/fixtures.js';
import { capturedLog, messageCount, openSession, SmtpClient, sendMail, startTestRelay, waitFor } from '../helpers.js';
import { ManualClock } from '../manual-clock.js';
import { assertStillServing, closedByPeer, INTAKE_ONLY, queuedId } from './smtp-session.js';
import { messageRaw } from '../../src/store/queries.js';
import { MAX_CONNECTIONS_PER_CLIENT } from '../../src/smtp/intake.js';

const MAX_SIZE = 4096;

/** DATA content of exactly `size` bytes (headers, blank line, body lines, final CRLF). */
function contentOfSize(size: number): string {
  let text = 'Subject: exact size\r\n\r\n';
  while (text.length + 78 <= size) text += `${'x'.repeat(76)}\r\n`;
  const rest = size - text.length;
  if (rest >= 2) text += `${'y'.repeat(rest - 2)}\r\n`;
  else text = text.replace('Subject: exact size', `Subject: exact size${'z'.repeat(rest)}`);
  assert.equal(Buffer.byteLength(text), size);
  return text;
}

function rawOf(relay: Relay, id: string): Buffer {
  return (messageRaw(relay.store.sqlite, id) as { raw: Buffer }).raw;
}

/** Reads `count` reply lines from a raw socket (for replies too many to parse one by one). */
function readReplyLines(socket: net.Socket, count: number): Promise<string[]> {
  return new Promise((resolve, reject) => {
    let buffer = '';
    const lines: string[] = [];
    const timer = setTimeout(() => reject(new Error(`only ${lines.length} of ${count} replies`)), 30_000);
    const onData = (d: string) => {
      buffer += d;
      let end = buffer.indexOf('\r\n');
      let start = 0;
      while (end !== -1 && lines.length < count) {
        lines.push(buffer.slice(start, end));
        start = end + 2;
        end = buffer.indexOf('\r\n', start);
      }
      buffer = buffer.slice(start);
      if (lines.length >= count) {
        clearTimeout(timer);
        socket.off('data', onData);
        resolve(lines);
      }
    };
    socket.on('data', onData);
  });
}

describe('hostile SMTP input', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay({ maxMessageSize: MAX_SIZE }, INTAKE_ONLY);
  });
  after(() => relay.stop());

  const smuggling = ['\n.\n', '\r.\r', '\n.\r\n', '\r\n.\n', '\r.\r\n', '\n.\r'];
  for (const sequence of smuggling) {
    test(`smuggling ${JSON.stringify(sequence)} inside DATA → 550 5.6.0, nothing stored, session and server keep serving`, async () => {
      const before = messageCount(relay);
      const c = await openSession(relay.smtpPort, 'honest@example.com', ['rcpt@example.com']);
      assert.match(await c.send('DATA'), /^354 /);
      // the smuggled transaction hides behind the ambiguous end-of-data sequence
      c.write(
        `Subject: outer\r\n\r\nbefore${sequence}MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\nNOOP\r\n`,
      );
      // (reply text is US-ASCII, RFC 5321 section 4.2)
      assert.match(await c.read(), /^550 5\.6\.0 [\x20-\x7e]+$/);
      // the smuggled commands were message content, not commands: the next reply is the NOOP's
      assert.match(await c.read(), /^250 2\.0\.0 /);
      assert.equal(messageCount(relay), before);
      // the same session can still send a clean message
      assert.match(await c.send('MAIL FROM:<honest@example.com>'), /^250 /);
      assert.match(await c.send('RCPT TO:<rcpt@example.com>'), /^250 /);
      assert.match(await c.send('DATA'), /^354 /);
      const id = queuedId(await c.send('Subject: clean\r\n\r\nclean\r\n.'));
      assert.ok(id);
      c.close();
      assert.equal(messageCount(relay), before + 1);
      const evil = relay.store.sqlite
        .prepare(
          `SELECT COUNT(*) AS n FROM messages
           WHERE mail_from = 'evil@example.com' OR body_id IN (SELECT id FROM message_bodies WHERE CAST(raw AS TEXT) LIKE '%smuggled%')`,
        )
        .get() as { n: number };
      assert.equal(evil.n, 0);
      await assertStillServing(relay);
    });
  }

  test('CR, LF or NUL injected into MAIL FROM / RCPT TO → 501 5.1.3, nothing stored', async () => {
    const before = messageCount(relay);
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO hostile.test');
    for (const path of ['a\0@example.com', 'a@exam\0ple.com', 'a@example.com\r', '\ra@example.com', 'a\r@example.com']) {
      assert.match(await c.send(`MAIL FROM:<${path}>`), /^501 5\.1\.3 /, JSON.stringify(path));
      // no transaction was opened by the refused MAIL
      assert.match(await c.send('RCPT TO:<rcpt@example.com>'), /^503 /);
    }
    // an ESMTP parameter carrying a control character is refused as well
    assert.match(await c.send('MAIL FROM:<a@example.com> ENVID=x\0y'), /^501 /);
    // a bare LF ends the command line: neither half is taken as an address
    c.write('MAIL FROM:<a@exam\nple.com>\r\n');
    assert.match(await c.read(), /^501 5\.1\.3 /);
    assert.match(await c.read(), /^500 /);
    assert.match(await c.send('MAIL FROM:<good@example.com>'), /^250 /);
    for (const path of ['r\0@example.com', 'r@example.com\0', 'r@exa\rmple.com', '\0']) {
      assert.match(await c.send(`RCPT TO:<${path}>`), /^501 5\.1\.3 /, JSON.stringify(path));
    }
    // none of the refused recipients joined the envelope
    assert.match(await c.send('DATA'), /^503 /);
    c.close();
    assert.equal(messageCount(relay), before);
    const controls = relay.store.sqlite
      .prepare(
        "SELECT (SELECT COUNT(*) FROM messages WHERE instr(mail_from, char(0)) OR instr(mail_from, char(13)) OR instr(mail_from, char(10))) + (SELECT COUNT(*) FROM recipients WHERE instr(address, char(0)) OR instr(address, char(13)) OR instr(address, char(10))) AS n",
      )
      .get() as { n: number };
    assert.equal(controls.n, 0);
    await assertStillServing(relay);
  });

  test('10,000 pipelined RCPTs → 250 up to maxRecipients, then 452 4.5.3; the message keeps exactly maxRecipients', async () => {
    const max = relay.config.maxRecipients;
    const socket = net.connect(relay.smtpPort, '127.0.0.1');
    socket.setEncoding('latin1');
    await readReplyLines(socket, 1);
    socket.write('EHLO many.test\r\nMAIL FROM:<bulk@example.com>\r\n');
    // EHLO's six lines (no AUTH without credentials), then MAIL's
    const head = await readReplyLines(socket, 7);
    assert.match(head[head.length - 1], /^250 /);
    const rcpts = Array.from({ length: 10_000 }, (_, i) => `RCPT TO:<r${i}@example.com>\r\n`).join('');
    const replies = readReplyLines(socket, 10_000);
    socket.write(rcpts);
    const lines = await replies;
    assert.equal(lines.filter((l) => /^250 /.test(l)).length, max);
    assert.ok(lines.slice(0, max).every((l) => /^250 /.test(l)));
    assert.ok(lines.slice(max).every((l) => /^452 4\.5\.3 /.test(l)), lines[max]);
    const done = readReplyLines(socket, 2);
    socket.write('DATA\r\nSubject: many\r\n\r\nbody\r\n.\r\n');
    const [dataReply, final] = await done;
    assert.match(dataReply, /^354 /);
    const id = queuedId(final);
    assert.ok(id, final);
    socket.destroy();
    const n = relay.store.sqlite.prepare('SELECT COUNT(*) AS n FROM recipients WHERE message_id = ?').get(id) as { n: number };
    assert.equal(n.n, max);
    await assertStillServing(relay);
  });

  test('one byte over maxMessageSize → 552 5.3.4, nothing stored; exactly at the limit → 250', async () => {
    const before = messageCount(relay);
    const over = await openSession(relay.smtpPort);
    assert.match(await over.send('DATA'), /^354 /);
    over.write(`${contentOfSize(MAX_SIZE + 1)}.\r\n`);
    assert.match(await over.read(), /^552 5\.3\.4 /);
    assert.equal(messageCount(relay), before);
    // the session survives the refusal
    assert.match(await over.send('NOOP'), /^250 /);
    over.close();

    const content = contentOfSize(MAX_SIZE);
    const exact = await openSession(relay.smtpPort);
    assert.match(await exact.send('DATA'), /^354 /);
    exact.write(`${content}.\r\n`);
    const id = queuedId(await exact.read());
    assert.ok(id);
    exact.close();
    // the limit applies to the client's bytes; the stored copy also holds the Received header
    const raw = rawOf(relay, id);
    assert.deepEqual(raw.subarray(raw.length - MAX_SIZE), Buffer.from(content, 'latin1'));
    assert.ok(raw.length > MAX_SIZE);
    assert.match(raw.subarray(0, raw.length - MAX_SIZE).toString(), /^Received: from /);
    await assertStillServing(relay);
  });

  test('a SIZE= declaration over the limit is refused at MAIL FROM with 552 5.3.4', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO size.test');
    assert.match(await c.send(`MAIL FROM:<a@example.com> SIZE=${MAX_SIZE + 1}`), /^552 5\.3\.4 /);
    assert.match(await c.send(`MAIL FROM:<a@example.com> SIZE=${MAX_SIZE}`), /^250 /);
    c.close();
  });

  test('an empty message is stored as its Received header alone and acknowledged once', async () => {
    const before = messageCount(relay);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354 /);
    const id = queuedId(await c.send('.'));
    assert.ok(id);
    c.close();
    assert.equal(messageCount(relay), before + 1);
    const raw = rawOf(relay, id).toString();
    assert.match(raw, /^Received: from [^\r\n]+\r\n(\t[^\r\n]+\r\n)+$/);
    await assertStillServing(relay);
  });

  test('a 100 KB command line → 421 and close, nothing stored', async () => {
    const before = messageCount(relay);
    const terminated = await SmtpClient.connect(relay.smtpPort);
    await terminated.read();
    await terminated.send('EHLO long.test');
    assert.match(await terminated.send(`MAIL FROM:<${'a'.repeat(100 * 1024)}@example.com>`), /^421 /);
    await closedByPeer(terminated.socket);
    // and one that never ends: the server does not buffer it without bound either
    const unterminated = await SmtpClient.connect(relay.smtpPort);
    await unterminated.read();
    unterminated.write(`EHLO ${'b'.repeat(100 * 1024)}`);
    assert.match(await unterminated.read(), /^421 /);
    await closedByPeer(unterminated.socket);
    assert.equal(messageCount(relay), before);
    await assertStillServing(relay);
  });

  test('invalid base64 and aborted exchanges in AUTH → 501, the session stays usable; AUTH LOGIN logs in, its lines never taken for commands', async () => {
    const withAuth = await startTestRelay({ defaultUsername: 'app', defaultPassword: 's3cret' }, INTAKE_ONLY);
    try {
      await badAuthExchanges(withAuth);
    } finally {
      await withAuth.stop();
    }
  });

  async function badAuthExchanges(relay: Relay): Promise<void> {
    const greeted = async () => {
      const client = await SmtpClient.connect(relay.smtpPort);
      await client.read();
      await client.send('EHLO auth.test');
      return client;
    };
    let c = await greeted();
    assert.match(await c.send('AUTH PLAIN !!!not-base64!!!'), /^501 /);
    assert.match(await c.send('AUTH LOGIN'), /^334 /);
    assert.match(await c.send('%%%'), /^501 /);
    assert.match(await c.send('AUTH PLAIN'), /^334/);
    assert.match(await c.send('===='), /^501 /);
    assert.match(await c.send('AUTH LOGIN'), /^334 /);
    assert.match(await c.send('*'), /^501 /);
    assert.match(await c.send(`AUTH PLAIN ${Buffer.from('no separators at all').toString('base64')}`), /^(501|535) /);
    assert.match(await c.send(`AUTH PLAIN ${'QUFB'.repeat(3000)}`), /^(501|535) /);
    assert.match(await c.send('AUTH CRAM-MD5'), /^504 /);
    // the right credentials with characters around them that are not base64: refused, not
    // decoded leniently into a login (RFC 4954 §4)
    assert.match(await c.send('AUTH PLAIN !AGFwcABzM2NyZXQ=!!'), /^501 5\.5\.2 /);
    assert.match(await c.send('AUTH LOGIN #YXBw#'), /^501 5\.5\.2 /);
    assert.match(await c.send('AUTH LOGIN'), /^334 /);
    assert.match(await c.send('#YXBw#'), /^501 5\.5\.2 /);
    assert.match(await c.send('AUTH LOGIN'), /^334 /);
    assert.match(await c.send('YXBw'), /^334 /);
    assert.match(await c.send('*czNjcmV0**'), /^501 5\.5\.2 /);
    // the right credentials and one character more: 4k+1 characters are no base64 (node would
    // decode them, dropping the last)
    assert.match(await c.send('AUTH PLAIN AGFwcABzM2NyZXQxA'), /^501 5\.5\.2 /);
    assert.match(await c.send('AUTH PLAIN'), /^334/);
    assert.match(await c.send('AGFwcABzM2NyZXQxA'), /^501 5\.5\.2 /);
    assert.match(await c.send('AUTH PLAIN'), /^334/);
    assert.match(await c.send('AGFwcABzM2NyZXQ'), /^235 /, 'base64 without its padding is base64');
    c.close();
    c = await greeted();
    // the session still works
    assert.match(await c.send(`AUTH PLAIN ${Buffer.from('\0app\0s3cret').toString('base64')}`), /^235 /);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    c.close();
    // AUTH LOGIN logs in too (smtp-server gives its exchange no authorization identity)
    c = await greeted();
    assert.match(await c.send('AUTH LOGIN'), /^334 /);
    assert.match(await c.send('YXBw'), /^334 /);
    assert.match(await c.send('czNjcmV0'), /^235 /);
    c.close();
    // a password line that reads DATA (base64 too) with a command behind it is a line of the
    // exchange, not a DATA whose message came ahead of its reply (421)
    c = await greeted();
    assert.match(await c.send('AUTH LOGIN'), /^334 /);
    assert.match(await c.send('YXBw'), /^334 /);
    c.write('DATA\r\nNOOP\r\n');
    assert.match(await c.read(), /^535 /);
    assert.match(await c.read(), /^250 /);
    c.close();
    await assertStillServing(relay, { auth: { user: 'app', pass: 's3cret' } });
  }

  test('commands sent before the greeting: the greeting comes first, nothing is half-stored', async () => {
    const before = messageCount(relay);
    const socket = net.connect(relay.smtpPort, '127.0.0.1');
    socket.setEncoding('latin1');
    let received = '';
    socket.on('data', (d: string) => (received += d));
    // the whole transaction in the first packet, without waiting for anything
    socket.write('EHLO early.test\r\nMAIL FROM:<early@example.com>\r\nRCPT TO:<r@example.com>\r\nDATA\r\nSubject: early\r\n\r\nearly\r\n.\r\nQUIT\r\n');
    await closedByPeer(socket);
    const codes = received
      .split('\r\n')
      .filter((l) => /^\d{3} /.test(l))
      .map((l) => l.slice(0, 3));
    assert.equal(codes[0], '220', received);
    // either the pipelined commands are answered in order, or the early talker is turned away
    const ids = [...received.matchAll(/queued as ([0-9A-F]{20})/g)].map((m) => m[1]);
    if (codes.includes('421')) {
      assert.deepEqual(ids, []);
    } else {
      assert.deepEqual(codes, ['220', '250', '250', '250', '354', '250', '221']);
      assert.equal(ids.length, 1);
    }
    assert.equal(messageCount(relay), before + ids.length);
    await assertStillServing(relay);
  });

  test('pipelined garbage after DATA: the message is stored once, the garbage gets 500 and then 421', async () => {
    const before = messageCount(relay);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354 /);
    const garbage = Array.from({ length: 12 }, (_, i) => `\x01\x02garbage${i} \xff\xfe\x00`).join('\r\n');
    c.write(Buffer.from(`Subject: then garbage\r\n\r\nbody\r\n.\r\n${garbage}\r\n`, 'latin1'));
    const id = queuedId(await c.read());
    assert.ok(id);
    const rest: string[] = [];
    for (let r = await c.read(); r !== ''; r = await c.read()) rest.push(r);
    assert.ok(rest.length >= 1);
    assert.ok(rest.slice(0, -1).every((r) => /^500 /.test(r)), rest.join('\n'));
    assert.match(rest[rest.length - 1], /^(500|421) /);
    assert.equal(messageCount(relay), before + 1);
    await assertStillServing(relay);
  });

  test('binary garbage as message content (sent without waiting for 354) is stored byte for byte', async () => {
    const c = await openSession(relay.smtpPort);
    const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i).filter((b) => b !== 10 && b !== 13 && b !== 46));
    const content = Buffer.concat([Buffer.from('Subject: binary\r\n\r\n'), bytes, Buffer.from('\r\n'), bytes, Buffer.from('\r\n')]);
    c.write(Buffer.concat([Buffer.from('DATA\r\n'), content, Buffer.from('.\r\nNOOP\r\n')]));
    assert.match(await c.read(), /^354 /);
    const id = queuedId(await c.read());
    assert.ok(id);
    assert.match(await c.read(), /^250 /);
    c.close();
    const raw = rawOf(relay, id);
    assert.deepEqual(raw.subarray(raw.length - content.length), content);
  });

  test('dot-stuffing: a line of two dots loses one; a line of one dot and more text keeps it, as the client sent it', async () => {
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354 /);
    const id = queuedId(await c.send('Subject: dots\r\n\r\n..stuffed\r\n.unstuffed\r\n..\r\n...\r\n.'));
    c.close();
    assert.ok(id);
    const body = '\r\n\r\n.stuffed\r\n.unstuffed\r\n.\r\n..\r\n';
    assert.equal(rawOf(relay, id).toString().slice(-body.length), body);
  });

  test('a client that leaves in the middle of DATA leaves nothing behind', async () => {
    const before = messageCount(relay);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354 /);
    c.write('Subject: half\r\n\r\nhalf a message\r\n');
    await waitFor(() => relay.intake.server.connections.size > 0, 10_000, 'server connection');
    c.close();
    await waitFor(() => relay.intake.server.connections.size === 0, 10_000, 'server to drop the connection');
    assert.equal(messageCount(relay), before);
    await assertStillServing(relay);
  });
});

test('a client that leaves in the middle of DATA is named in its session line: the queue id and the bytes it sent', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay(undefined, { ...INTAKE_ONLY, logger: log.logger });
  const sessions = () => log.entries().filter((e) => e.event === 'smtp.session');
  try {
    // a FIN (the client shut down its side), then a reset
    for (const [i, leave] of (['end', 'destroy'] as const).entries()) {
      const c = await openSession(relay.smtpPort);
      assert.match(await c.send('DATA'), /^354 /);
      c.write('Subject: half\r\n\r\nhalf a message\r\n');
      await new Promise((r) => setTimeout(r, 200));
      if (leave === 'end') c.socket.end();
      else c.socket.destroy();
      await waitFor(() => sessions().length === i + 1, 10_000, 'the session line');
      const lost = sessions()[i].lostInData as { queueId: string; bytes: number } | undefined;
      assert.match(String(lost?.queueId), /^[0-9A-F]{20}$/, leave);
      // smtp-server holds back the last bytes until it knows they are not the final dot
      assert.ok(lost && lost.bytes > 0 && lost.bytes <= 33, `${leave}: ${lost?.bytes}`);
    }
  } finally {
    await relay.stop();
  }
});

describe('idle and slow clients', () => {
  const SOCKET_TIMEOUT_MS = 2000;
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay(undefined, INTAKE_ONLY);
    // smtp-server reads its options object per connection; a short idle timeout keeps the test fast
    relay.intake.server.options.socketTimeout = SOCKET_TIMEOUT_MS;
  });
  after(() => relay.stop());

  test('an idle client is closed with 421 after the socket timeout', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    assert.match(await c.read(), /^220 /);
    assert.match(await c.read(SOCKET_TIMEOUT_MS * 10), /^421 /);
    await closedByPeer(c.socket);
    await assertStillServing(relay);
  });

  test('a client that stalls in the middle of DATA is timed out and nothing is stored', async () => {
    const before = messageCount(relay);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354 /);
    c.write('Subject: stalled\r\n\r\nfirst half\r\n');
    assert.match(await c.read(SOCKET_TIMEOUT_MS * 10), /^421 /);
    await closedByPeer(c.socket);
    assert.equal(messageCount(relay), before);
    await assertStillServing(relay);
  });

  test('a very slow client that keeps sending is not cut off, and others are served meanwhile', async () => {
    const before = messageCount(relay);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354 /);
    const content = `Subject: slow\r\n\r\n${'slow line\r\n'.repeat(12)}`;
    const chunks = content.match(/[\s\S]{1,4}/g) ?? [];
    // a few bytes every 120 ms: each gap is well inside the idle timeout (a loaded machine may
    // stall for a second), the whole far beyond it
    assert.ok(chunks.length * 120 > SOCKET_TIMEOUT_MS * 2);
    // other clients send meanwhile, without holding up the slow one (whose gaps stay 120 ms)
    const others: Array<Promise<void>> = [];
    for (const [i, chunk] of chunks.entries()) {
      c.write(chunk);
      if (i % 10 === 0) {
        others.push(sendMail(relay.smtpPort, { subject: 'meanwhile' }).then((info) => assert.ok(queuedId(info.response), info.response)));
      }
      await new Promise((r) => setTimeout(r, 120));
    }
    await Promise.all(others);
    const id = queuedId(await c.send('.'));
    assert.ok(id);
    c.close();
    assert.equal(messageCount(relay), before + others.length + 1);
    const raw = rawOf(relay, id);
    assert.ok(raw.toString().endsWith(content));
  });
});

describe('connection flood', () => {
  test('where any address may connect, more than 50 connections from one (not loopback) → 421 4.7.0 for the extra ones; other addresses and loopback are not held to it', async () => {
    let from = '10.0.0.5';
    const peers = new WeakMap<object, string>();
    const { logger, entries } = capturedLog('info');
    const relay = await startTestRelay(
      { maxConnections: 200, defaultUsername: 'u', defaultPassword: 'a-long-random-password', security: { allowLocalOnly: false } },
      {
        ...INTAKE_ONLY,
        logger,
        smtpPeerAddress: (session) => {
          if (!peers.has(session)) peers.set(session, from);
          return peers.get(session) as string;
        },
      },
    );
    const open: SmtpClient[] = [];
    const connect = async (peer: string) => {
      from = peer;
      const c = await SmtpClient.connect(relay.smtpPort);
      open.push(c);
      return c.read();
    };
    try {
      for (let i = 0; i < MAX_CONNECTIONS_PER_CLIENT; i++) assert.match(await connect('10.0.0.5'), /^220 /);
      assert.match(await connect('10.0.0.5'), /^421 4\.7\.0 Too many connections from 10\.0\.0\.5, try again later/);
      assert.match(await connect('10.0.0.6'), /^220 /);
      for (let i = 0; i < MAX_CONNECTIONS_PER_CLIENT + 10; i++) assert.match(await connect('127.0.0.1'), /^220 /);
      // one of the first address's connections gone: it may open another
      open[0].close();
      await waitFor(() => relay.intake.server.connections.size === open.length - 2, 10_000, 'the refused and the closed connection to end');
      assert.match(await connect('10.0.0.5'), /^220 /);
      const metrics = await call<{ smtp_connection_limit_refusals: number }>(relay, '/metrics');
      assert.equal(metrics.body.smtp_connection_limit_refusals, 1);
      assert.deepEqual(
        entries()
          .filter((e) => e.event === 'smtp.connection_limit')
          .map((e) => [e.refused, e.maxPerClient]),
        [[1, MAX_CONNECTIONS_PER_CLIENT]],
      );
    } finally {
      for (const c of open) c.close();
      await relay.stop();
    }
  });

  test('clients admitted by allowedNetworks are not held to 50 connections each (behind a NAT or a published container port they share one address)', async () => {
    const { logger } = capturedLog('info');
    const relay = await startTestRelay(
      { maxConnections: 200, defaultUsername: 'u', defaultPassword: 'a-long-random-password', security: { allowLocalOnly: false, allowedNetworks: ['172.28.0.0/16'] } },
      { ...INTAKE_ONLY, logger, smtpPeerAddress: () => '172.28.0.1' },
    );
    const open: SmtpClient[] = [];
    try {
      for (let i = 0; i < MAX_CONNECTIONS_PER_CLIENT + 10; i++) {
        const c = await SmtpClient.connect(relay.smtpPort);
        open.push(c);
        assert.match(await c.read(), /^220 /);
      }
    } finally {
      for (const c of open) c.close();
      await relay.stop();
    }
  });

  test('more than maxConnections at once → 421 4.7.0 for the extra ones, counted and logged at most once a minute (the rest with the next connection a minute on, or at the stop); the admitted ones keep working', async () => {
    const clock = new ManualClock();
    const { logger, entries } = capturedLog('info');
    const relay = await startTestRelay({ maxConnections: 3 }, { ...INTAKE_ONLY, clock, logger });
    const limitLines = () => entries().filter((e) => e.event === 'smtp.connection_limit');
    const refusedSoFar = async () => {
      const json = (await call<{ smtp_connection_limit_refusals: number }>(relay, '/metrics')).body.smtp_connection_limit_refusals;
      assert.match((await call<string>(relay, '/metrics?format=prometheus')).body, new RegExp(`^relayq_smtp_connection_limit_refusals_total ${json}$`, 'm'));
      return json;
    };
    const turnedAway = async (n: number) => {
      const flood = await Promise.all(Array.from({ length: n }, () => SmtpClient.connect(relay.smtpPort)));
      const replies = await Promise.all(flood.map((c) => c.read()));
      assert.ok(
        replies.every((r) => /^421 4\.7\.0 /.test(r)),
        replies.join('\n'),
      );
      await Promise.all(flood.map((c) => closedByPeer(c.socket)));
    };
    let stopped = false;
    try {
      const held = await Promise.all([1, 2, 3].map(() => SmtpClient.connect(relay.smtpPort)));
      for (const c of held) assert.match(await c.read(), /^220 /);
      await turnedAway(20);
      // the first at once; the other 19 wait for the next line
      assert.equal(await refusedSoFar(), 20);
      assert.deepEqual(
        limitLines().map((e) => [e.level, e.refused, e.maxConnections]),
        [[40, 1, 3]],
      );
      clock.advance(59_000);
      await turnedAway(1);
      assert.equal(limitLines().length, 1, 'not twice in a minute');
      clock.advance(1000);
      // a minute on: the first of these says how many since the last line; the second waits again
      await turnedAway(2);
      assert.deepEqual(
        limitLines().map((e) => e.refused),
        [1, 21],
      );
      assert.equal(await refusedSoFar(), 23);
      await turnedAway(1);
      // an admitted client completes a transaction while the flood is being turned away
      const [first, ...others] = held;
      await first.send('EHLO held.test');
      assert.match(await first.send('MAIL FROM:<a@example.com>'), /^250 /);
      assert.match(await first.send('RCPT TO:<b@example.com>'), /^250 /);
      assert.match(await first.send('DATA'), /^354 /);
      assert.ok(queuedId(await first.send('Subject: held\r\n\r\nheld\r\n.')));
      first.close();
      for (const c of others) c.close();
      await waitFor(() => relay.intake.server.connections.size === 0, 10_000, 'connections to close');
      await assertStillServing(relay);
      assert.equal(limitLines().length, 2, 'a connection let in within the minute tells nothing');
      clock.advance(60_000);
      // a minute on, the next connection let in tells of those left unsaid
      await assertStillServing(relay);
      assert.deepEqual(
        limitLines().map((e) => e.refused),
        [1, 21, 2],
      );
      const full = await Promise.all([1, 2, 3].map(() => SmtpClient.connect(relay.smtpPort)));
      for (const c of full) assert.match(await c.read(), /^220 /);
      await turnedAway(1);
      for (const c of full) c.close();
      // the stop says what is left unsaid
      await relay.stop();
      stopped = true;
      assert.deepEqual(
        limitLines().map((e) => e.refused),
        [1, 21, 2, 1],
      );
    } finally {
      if (!stopped) await relay.stop();
    }
  });
});
