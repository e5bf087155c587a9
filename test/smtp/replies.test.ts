// One test per row of the spec's §2 reply table that intake owns: the exact code, the enhanced
// code, and whether anything was stored.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import type net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { domainToASCII } from 'node:url';
import type { Clock } from '../../src/clock.js';
import type { Relay } from '../../src/main.js';
import { capturedLog, holdWriteLock, messageCount, openSession, SmtpClient, sendMail, startTestRelay, waitFor, withSteppedClock, withTestRelay } from '../helpers.js';
import { openReadOnly } from '../../src/store/maintenance.js';
import { messageRaw } from '../../src/store/queries.js';
import { Spool } from '../../src/smtp/spool.js';

const MSG = 'Subject: t\r\n\r\nbody\r\n.\r\n';

async function ehlo(port: number) {
  const c = await SmtpClient.connect(port);
  await c.read();
  const reply = await c.send('EHLO client.test');
  return { c, reply };
}

describe('SMTP replies (default config: loopback without AUTH)', () => {
  let relay: Relay;
  const log = capturedLog('info');
  before(async () => {
    relay = await startTestRelay({ maxMessageSize: 2048, maxRecipients: 3 }, { logger: log.logger });
  });
  after(() => relay.stop());

  test('EHLO advertises the spec extensions; AUTH only with credentials to check', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    // serverName names the relay in its greeting and its EHLO reply
    assert.match(await c.read(), /^220 relayq\.test ESMTP/);
    const reply = await c.send('EHLO client.test');
    assert.match(reply, /^250-relayq\.test /);
    for (const ext of ['PIPELINING', '8BITMIME', 'SMTPUTF8', 'SIZE 2048', 'ENHANCEDSTATUSCODES']) {
      assert.match(reply, new RegExp(`250[- ]${ext}`), ext);
    }
    assert.doesNotMatch(reply, /STARTTLS/);
    assert.doesNotMatch(reply, /AUTH/);
    // as Postfix without SASL answers it; no credential is asked for
    assert.match(await c.send(`AUTH PLAIN ${Buffer.from('\0app\0secret').toString('base64')}`), /^503 5\.5\.1 Error: authentication not enabled/);
    assert.match(await c.send('AUTH LOGIN'), /^503 5\.5\.1 /);
    c.close();
    // an application that still has its provider's credentials set sends as it would to Postfix:
    // nodemailer logs in only when AUTH is offered
    const info = await sendMail(relay.smtpPort, { auth: { user: 'provider-user', pass: 'provider-pass' } });
    assert.match(info.response, /^250 2\.0\.0 /);

    const withCredentials = await startTestRelay({ defaultUsername: 'app', defaultPassword: 's3cret' }, { startDelivery: false });
    try {
      const offered = await ehlo(withCredentials.smtpPort);
      assert.match(offered.reply, /250[- ]AUTH PLAIN LOGIN/);
      offered.c.close();
    } finally {
      await withCredentials.stop();
    }
  });

  test('an unknown command → 500 5.5.2, LHLO (the LMTP greeting) too', async () => {
    const { c } = await ehlo(relay.smtpPort);
    for (const line of ['LHLO client.test', 'XYZZY']) assert.match(await c.send(line), /^500 5\.5\.2 Error: command not recognized/, line);
    c.close();
  });

  test('DATA or RCPT with no transaction open → 503 5.5.1 need MAIL, whatever the address; EXPN → 502 5.5.1, not an unknown command', async () => {
    const { c } = await ehlo(relay.smtpPort);
    for (const line of ['DATA', 'RCPT TO:<b@example.com>', 'RCPT TO:<"a b"@example.com>']) {
      assert.match(await c.send(line), /^503 5\.5\.1 Error: need MAIL command$/, line);
    }
    assert.match(await c.send('EXPN staff'), /^502 5\.5\.1 /);
    // as Postfix without TLS answers it, and not counted towards the 10 unknown commands
    for (let i = 0; i < 10; i++) assert.match(await c.send('STARTTLS'), /^502 5\.5\.1 Error: command not implemented$/);
    assert.match(await c.send('VRFY postmaster'), /^252 2\.0\.0 Cannot VRFY user, but will accept message and attempt delivery$/);
    assert.match(await c.send('VRFY'), /^501 5\.5\.4 Error: Syntax: VRFY address$/);
    // smtp-server's jokes are no commands here (WIZ answered 200, which is no SMTP reply)
    for (const line of ['WIZ please', 'SHELL', 'KILL']) assert.match(await c.send(line), /^500 5\.5\.2 Error: command not recognized$/, line);
    // a command without its `FROM:` or `TO:` is a syntax error; an address it cannot read is a bad address
    for (const line of ['MAIL', 'MAIL FROM', 'MAIL FROM <a@example.com>', 'MAIL TO:<a@example.com>', 'MAIL  FROM:<a@example.com>']) {
      assert.match(await c.send(line), /^501 5\.5\.4 Syntax: MAIL FROM:<address>$/, line);
    }
    assert.match(await c.send('MAIL FROM:a@example.com'), /^501 5\.1\.3 Bad sender address syntax$/);
    assert.match(await c.send('mail from:<a@example.com>'), /^250 /, 'in lower case');
    assert.match(await c.send('DATA'), /^503 5\.5\.1 Error: need RCPT command$/);
    for (const line of ['RCPT', 'RCPT TO', 'RCPT FROM:<b@example.com>']) assert.match(await c.send(line), /^501 5\.5\.4 Syntax: RCPT TO:<address>$/, line);
    assert.match(await c.send('RCPT TO:b@example.com'), /^501 5\.1\.3 Bad recipient address syntax$/);
    assert.match(await c.send('rcpt to:<b@example.com>'), /^250 /, 'in lower case');
    c.close();
  });

  test('accepted → 250 2.0.0 Ok: queued as <id>', async () => {
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354/);
    const reply = await c.send(MSG.slice(0, -2));
    assert.match(reply, /^250 2\.0\.0 Ok: queued as [0-9A-F]{20}$/);
    c.close();
  });

  test('invalid address, CR/LF or NUL in a path → 501 5.1.3', async () => {
    const { c } = await ehlo(relay.smtpPort);
    assert.match(await c.send('MAIL FROM:<not an address>'), /^501 5\.1\.3 /);
    assert.match(await c.send('MAIL FROM:<a\0b@example.com>'), /^501 5\.1\.3 /);
    assert.match(await c.send('MAIL FROM:<a\rb@example.com>'), /^501 5\.1\.3 /);
    assert.match(await c.send('MAIL FROM:<ok@example.com>'), /^250 /);
    assert.match(await c.send('RCPT TO:<bad@@example.com>'), /^501 5\.1\.3 /);
    assert.match(await c.send('RCPT TO:<x\0y@example.com>'), /^501 5\.1\.3 /);
    assert.match(await c.send('RCPT TO:<>'), /^501 5\.1\.3 /);
    // RFC 5321 §4.1.2: a label starts and ends with a letter or digit, and has 63 octets at most
    // and none is empty: nor the xn-- label with nothing after it, which smtp-server decodes to
    // nothing (b@a.xn-- would otherwise be stored, and sent upstream, as b@a.)
    const empty = ['example.com.', '.example.com', 'a..example.com', 'a.xn--', 'a.b.xn--', 'xn--ls8h.xn--'];
    for (const domain of ['-x.example.com', 'x-.example.com', 'example.com-', `${'x'.repeat(64)}.example.com`, '-bücher.example', ...empty]) {
      assert.match(await c.send(`RCPT TO:<a@${domain}>`), /^501 5\.1\.3 /, domain);
    }
    assert.match(await c.send('RSET'), /^250 /);
    assert.match(await c.send('MAIL FROM:<app@b.xn-->'), /^501 5\.1\.3 /);
    assert.match(await c.send('MAIL FROM:<ok@example.com>'), /^250 /);
    assert.match(await c.send(`RCPT TO:<a@x-y.${'x'.repeat(63)}.example.com>`), /^250 /);
    assert.match(await c.send('RCPT TO:<a@bücher.example>'), /^250 /);
    // an xn-- label that does not decode: the client's mistake, not an error of relayq's
    assert.match(await c.send('RCPT TO:<b@xn--99999999999999.com>'), /^501 5\.1\.3 /);
    // one that decodes to what IDNA disallows (a⒈), in either case: smtp-server decodes only lower case
    assert.match(await c.send('RCPT TO:<b@xn--a-ecp.de>'), /^501 5\.1\.3 /);
    assert.match(await c.send('RCPT TO:<b@XN--A-ECP.de>'), /^501 5\.1\.3 /);
    assert.match(await c.send('RCPT TO:<b@XN--MNCHEN-3YA.DE>'), /^250 /);
    // a label IDNA maps to nothing (a soft hyphen) is an empty one; a character no host name can
    // hold; a label that breaks the Bidi rule (RFC 5893: a digit first, in a domain with a
    // right-to-left label)
    // a label that IDNA maps to one that starts or ends with '-' (a fullwidth hyphen, U+FF0D)
    // an xn-- label with fullwidth letters, in either case (smtp-server refuses the lower-case one)
    const fullwidth = ['xn--ｍｎcheｎ-3ｙa.de', 'XN--ｍｎcheｎ-3ｙa.de', 'ｘｎ--mnchen-3ya.de'];
    for (const domain of ['a.\u00ad.de', 'mü#nchen.de', 'mü|nchen.de', '1ש.example', '3com.ישראל', 'ab\uff0d.example', '\uff0dcd.example', ...fullwidth]) {
      assert.match(await c.send(`RCPT TO:<b@${domain}>`), /^501 5\.1\.3 /, domain);
    }
    // an address is 253 characters at most (as smtp-server takes them) in the ASCII form it goes
    // upstream in, however it was written: a domain of 234 characters in Unicode, 322 in xn--
    const long = `${Array(8).fill('用户'.repeat(14)).join('.')}.de`;
    assert.match(await c.send(`RCPT TO:<b@${long}>`), /^501 5\.1\.3 /);
    assert.match(await c.send(`RCPT TO:<b@${domainToASCII(long)}>`), /^501 5\.1\.3 /);
    assert.match(await c.send('RSET'), /^250 /);
    assert.match(await c.send(`MAIL FROM:<x@${long}> SMTPUTF8`), /^501 5\.1\.3 /);
    const near = `${Array(5).fill('用户'.repeat(14)).join('.')}.de`; // 147 characters, 202 in xn--
    assert.match(await c.send(`MAIL FROM:<${'x'.repeat(50)}@${near}> SMTPUTF8`), /^250 /);
    assert.match(await c.send('RSET'), /^250 /);
    assert.match(await c.send(`MAIL FROM:<${'x'.repeat(51)}@${near}> SMTPUTF8`), /^501 5\.1\.3 /);
    assert.match(await c.send(`MAIL FROM:<${'x'.repeat(51)}@${domainToASCII(near)}>`), /^501 5\.1\.3 /);
    c.close();
    assert.deepEqual(log.entries().filter((e) => (e.level as number) >= 50), []);
  });

  test('the null sender <> is accepted', async () => {
    const { c } = await ehlo(relay.smtpPort);
    assert.match(await c.send('MAIL FROM:<>'), /^250 /);
    c.close();
  });

  test('an unknown MAIL/RCPT parameter → 555 5.5.4; DSN parameters are taken and ignored (DSN is not offered)', async () => {
    const { c } = await ehlo(relay.smtpPort);
    assert.match(await c.send('MAIL FROM:<a@example.com> FOO=bar'), /^555 5\.5\.4 Unsupported option: FOO/);
    // REQUIRETLS is not offered either: no 530, which would read as "authentication required"
    assert.match(await c.send('MAIL FROM:<a@example.com> REQUIRETLS'), /^555 5\.5\.4 Unsupported option: REQUIRETLS/);
    assert.match(await c.send('MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=x1'), /^250 /);
    // and in the same order of checks as any other: a MAIL inside a transaction is refused first
    assert.match(await c.send('MAIL FROM:<a@example.com> REQUIRETLS'), /^503 /);
    assert.match(await c.send('RCPT TO:<b@example.com> XYZ=1'), /^555 5\.5\.4 Unsupported option: XYZ/);
    assert.match(await c.send('RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com'), /^250 /);
    c.close();
  });

  test('a MAIL parameter repeated with the same value is taken (smtplib sends SMTPUTF8 twice); another value, or a DSN one twice → 501 5.5.4', async () => {
    const { c } = await ehlo(relay.smtpPort);
    // what Python's send_message(msg, mail_options=['SMTPUTF8']) sends for a non-ASCII address
    assert.match(await c.send('MAIL FROM:<jösé@example.com> SMTPUTF8 SMTPUTF8 BODY=8BITMIME'), /^250 /);
    assert.match(await c.send('RCPT TO:<ünï@example.net>'), /^250 /);
    assert.match(await c.send('RSET'), /^250 /);
    assert.match(await c.send('MAIL FROM:<a@example.com> BODY=8BITMIME SIZE=100 body=8bitmime SIZE=100'), /^250 /);
    assert.match(await c.send('RSET'), /^250 /);
    assert.match(await c.send('MAIL FROM:<a@example.com> BODY=8BITMIME BODY=7BIT'), /^501 5\.5\.4 Error: duplicate BODY parameter/);
    assert.match(await c.send('MAIL FROM:<a@example.com> SIZE=100 SIZE=200'), /^501 5\.5\.4 Error: duplicate SIZE parameter/);
    assert.match(await c.send('MAIL FROM:<a@example.com> SMTPUTF8 ENVID=x ENVID=x SMTPUTF8'), /^501 5\.5\.4 Error: duplicate ENVID parameter/);
    assert.match(await c.send('MAIL FROM:<a@example.com> RET=FULL RET=FULL'), /^501 5\.5\.4 Error: duplicate RET parameter/);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    assert.match(await c.send('RCPT TO:<b@example.com> NOTIFY=NEVER NOTIFY=NEVER'), /^501 5\.5\.4 Error: duplicate NOTIFY parameter/);
    c.close();
  });

  test('a non-ASCII local part without SMTPUTF8 → 553 5.6.7; with it the mail is taken, and said so in Received', async () => {
    const { c } = await ehlo(relay.smtpPort);
    assert.match(await c.send('MAIL FROM:<jörg@example.com>'), /^553 5\.6\.7 /);
    // bytes that are not UTF-8 (Latin-1 "ö") would be stored as U+FFFD, another address
    assert.match(await c.send(Buffer.from('MAIL FROM:<j\xf6rg@example.com> SMTPUTF8\r\n', 'latin1')), /^501 5\.1\.3 /);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    assert.match(await c.send(Buffer.from('RCPT TO:<j\xf6rg@example.com>\r\n', 'latin1')), /^501 5\.1\.3 /);
    assert.match(await c.send('RCPT TO:<用户@example.net>'), /^553 5\.6\.7 /);
    assert.match(await c.send('RSET'), /^250 /);
    // refused with SMTPUTF8: the next MAIL without it does not inherit it
    assert.match(await c.send('MAIL FROM:<a@example.com> SMTPUTF8 FOO=1'), /^555 /);
    assert.match(await c.send('MAIL FROM:<jörg@example.com>'), /^553 5\.6\.7 /);
    assert.match(await c.send('MAIL FROM:<jörg@example.com> SMTPUTF8'), /^250 /);
    assert.match(await c.send('RCPT TO:<用户@例子.test>'), /^250 /);
    assert.match(await c.send('DATA'), /^354/);
    const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
    c.close();
    const recipients = relay.store.sqlite.prepare('SELECT address FROM recipients WHERE message_id = ?').all(id);
    assert.deepEqual(recipients, [{ address: '用户@例子.test' }]);
    const raw = messageRaw(relay.store.sqlite, id)?.raw?.toString() ?? '';
    assert.match(raw, /\(relayq\) with UTF8SMTP id /);
    // the local part needs SMTPUTF8 anyway; the domain is written in ASCII, as it is forwarded
    assert.match(raw, /\tfor <用户@xn--fsqu00a\.test>;/);
  });

  test('an internationalized domain needs no SMTPUTF8 in ASCII (xn--), and the Received header keeps it in ASCII either way', async () => {
    // the second: a message with no UTF-8 of its own gets none from relayq's header, so it can be
    // forwarded without SMTPUTF8
    for (const [from, to] of [
      ['<app@xn--bcher-kva.example>', '<user@xn--mnchen-3ya.de>'],
      ['<app@example.com> SMTPUTF8', '<user@münchen.de>'],
    ]) {
      const { c } = await ehlo(relay.smtpPort);
      assert.match(await c.send(`MAIL FROM:${from}`), /^250 /);
      assert.match(await c.send(`RCPT TO:${to}`), /^250 /);
      assert.match(await c.send('DATA'), /^354/);
      const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
      c.close();
      const raw = messageRaw(relay.store.sqlite, id)?.raw ?? Buffer.alloc(0);
      assert.match(raw.toString('latin1'), /\tfor <user@xn--mnchen-3ya\.de>;/, from);
      assert.ok(raw.every((byte) => byte < 0x80), `the message is ASCII: ${raw.toString()}`);
    }
  });

  test('<postmaster> without a domain is a valid recipient (RFC 5321 §4.5.1)', async () => {
    const { c } = await ehlo(relay.smtpPort);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    assert.match(await c.send('RCPT TO:<Postmaster>'), /^250 /);
    assert.match(await c.send('RCPT TO:<webmaster>'), /^501 5\.1\.3 /);
    c.close();
  });

  test('whole messages sent in one write without waiting for 354 are each answered, and the session goes on', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO client.test');
    const message = (i: number) => `MAIL FROM:<burst${i}@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nSubject: burst ${i}\r\n\r\nbody\r\n.\r\n`;
    c.write(`${[1, 2, 3, 4].map(message).join('')}NOOP\r\n`);
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) {
      assert.deepEqual([(await c.read()).slice(0, 3), (await c.read()).slice(0, 3), (await c.read()).slice(0, 3)], ['250', '250', '354'], `message ${i + 1}`);
      ids.push(/^250 2\.0\.0 Ok: queued as (\S+)$/.exec(await c.read())?.[1] ?? `message ${i + 1} not queued`);
    }
    assert.match(await c.read(), /^250 /, 'the NOOP after them is answered too');
    c.close();
    const stored = ids.map((id) => /Subject: burst (\d)/.exec(messageRaw(relay.store.sqlite, id)?.raw?.toString() ?? '')?.[1]);
    assert.deepEqual(stored, ['1', '2', '3', '4']);
  });

  test('a refused DATA with the message sent behind it: 421 and closed, none of its lines run as commands', async () => {
    const before = messageCount(relay);
    // an application that sends whole messages without waiting for 354, whose one recipient is
    // refused (user input): the body must not become another message's envelope
    const body = 'Subject: contact form\r\n\r\nRSET\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: INJECTED\r\n\r\nhi\r\n.\r\n';
    for (const [rcpt, data, refusal] of [
      ['<user input@example.com>', 'DATA', /^503 5\.5\.1 /],
      ['<b@example.com>', 'DATA now', /^501 5\.5\.4 Syntax: DATA/],
      // not a command smtp-server knows (500), but a DATA all the same
      ['<b@example.com>', 'DATA\0', /^500 /],
    ] as const) {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      await c.send('EHLO client.test');
      c.write(`MAIL FROM:<app@example.com>\r\nRCPT TO:${rcpt}\r\n${data}\r\n${body}.\r\nQUIT\r\n`);
      const replies = await c.readAll();
      assert.equal(replies.length, 4, replies.join(' | '));
      assert.match(replies[2], refusal);
      assert.match(replies[3], /^421 4\.5\.0 .*sent before the reply to DATA/);
    }
    assert.equal(messageCount(relay), before);
    // the session's line lists it among what was refused
    await waitFor(() => log.entries().some((e) => e.event === 'smtp.session' && String(e.replies).includes('421 4.5.0')));
  });

  test('the replies to a pipelined group leave in one write (RFC 2920 §3.1: sent as a unit)', async () => {
    let writes = 0;
    // every write the relay's side of the connection hands to the kernel: one per write or writev
    relay.intake.server.server.once('connection', (socket: net.Socket) => {
      const counted = socket as unknown as Record<'_write' | '_writev', (...args: unknown[]) => unknown>;
      for (const method of ['_write', '_writev'] as const) {
        const original = counted[method];
        counted[method] = function (this: unknown, ...args: unknown[]) {
          writes += 1;
          return original.apply(this, args);
        };
      }
    });
    const { c } = await ehlo(relay.smtpPort);
    for (let i = 0; i < 3; i++) {
      writes = 0;
      c.write('MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n');
      const replies = [await c.read(), await c.read(), await c.read(), await c.read()];
      assert.deepEqual(replies.map((r) => r.slice(0, 3)), ['250', '250', '250', '354']);
      assert.equal(writes, 1, 'four replies, one write');
      assert.match(await c.send(MSG.slice(0, -2)), /^250 2\.0\.0 Ok: queued as /);
    }
    c.close();
  });

  test('a client that pipelines its next group behind a final dot and waits (RFC 2920): its refused DATA leaves the session open', async () => {
    for (const [group, refusal] of [
      ['MAIL FROM:<a@example.com>\r\nRCPT TO:<user input@example.com>\r\nDATA\r\n', /^503 5\.5\.1 /],
      ['RSET\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA now\r\n', /^501 5\.5\.4 /],
    ] as const) {
      const { c } = await ehlo(relay.smtpPort);
      c.write('MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n');
      for (const code of ['250', '250', '354']) assert.equal((await c.read()).slice(0, 3), code);
      // the message, its dot and the next group in one write: nothing after that DATA
      c.write(`${MSG}${group}`);
      assert.match(await c.read(), /^250 2\.0\.0 Ok: queued as /);
      const replies = await Promise.all(group.split('\r\n').slice(0, -1).map(() => c.read()));
      assert.match(replies.at(-1) ?? '', refusal, replies.join(' | '));
      assert.match(await c.send('RSET'), /^250 /, 'the session goes on');
      c.close();
    }
  });

  test('before EHLO too (smtp-server refuses DATA itself then): the message behind a refused DATA is not run', async () => {
    const before = messageCount(relay);
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    c.write('MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nEHLO evil.test\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n\r\nINJECTED\r\n.\r\n');
    const replies = await c.readAll();
    assert.deepEqual(
      replies.map((r) => r.slice(0, 9)),
      ['503 5.5.1', '503 5.5.1', '503 5.5.1', '421 4.5.0'],
      replies.join(' | '),
    );
    assert.equal(messageCount(relay), before);
  });

  test('a DATA line split across two reads, with the message behind it: still 421, nothing run', async () => {
    const before = messageCount(relay);
    const { c } = await ehlo(relay.smtpPort);
    c.write('MAIL FROM:<a@example.com>\r\nRCPT TO:<user input@example.com>\r\nDA');
    await new Promise((resolve) => setTimeout(resolve, 100));
    c.write('TA\r\nRSET\r\nMAIL FROM:<x@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n\r\nINJECTED\r\n.\r\n');
    const replies = await c.readAll();
    assert.match(replies.at(-1) ?? '', /^421 4\.5\.0 /, replies.join(' | '));
    assert.equal(messageCount(relay), before);
  });

  test('a refused DATA with nothing behind it (a client that waits) leaves the session open', async () => {
    const { c } = await ehlo(relay.smtpPort);
    assert.match(await c.send('DATA'), /^503 5\.5\.1 /);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    assert.match(await c.send('RCPT TO:<b@example.com>'), /^250 /);
    assert.match(await c.send('DATA foo'), /^501 5\.5\.4 Syntax: DATA/);
    assert.match(await c.send('DATA '), /^354/);
    assert.match(await c.send(MSG.slice(0, -2)), /^250 2\.0\.0 Ok: queued as /);
    c.close();
  });

  test('the EHLO/HELO name is stored and put in Received: as the client wrote it', async () => {
    for (const command of ['EHLO', 'HELO']) {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      // pipelined: the name must be right before the message that follows it is stored
      c.write(`${command} MyApp.Example.COM\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n`);
      for (const code of ['250', '250', '250', '354']) assert.equal((await c.read()).slice(0, 3), code);
      const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
      c.close();
      assert.match(messageRaw(relay.store.sqlite, id)?.raw?.toString() ?? '', /^Received: from MyApp\.Example\.COM \(/);
      const row = relay.store.sqlite.prepare('SELECT helo FROM messages WHERE id = ?').get(id) as { helo: string };
      assert.equal(row.helo, 'MyApp.Example.COM', command);
    }
    // a refused EHLO changes nothing, the case of the name included
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    assert.match(await c.send('EHLO app.example.com'), /^250/);
    assert.match(await c.send('EHLO APP.EXAMPLE.COM extra'), /^501 /);
    for (const line of ['MAIL FROM:<a@example.com>', 'RCPT TO:<b@example.com>', 'DATA']) await c.send(line);
    const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
    c.close();
    assert.match(messageRaw(relay.store.sqlite, id)?.raw?.toString() ?? '', /^Received: from app\.example\.com \(/);
  });

  test('a HELO name with parentheses, a semicolon or 8-bit characters is stored as written; in Received: each of them is a ?', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    // é is two bytes in UTF-8, one character; a parenthesis would end the comment that follows,
    // a semicolon the clauses before the date
    c.socket.write(Buffer.from('EHLO evil)(x.hé;test\r\n', 'utf8'));
    assert.match(await c.read(), /^250/);
    for (const line of ['MAIL FROM:<a@example.com>', 'RCPT TO:<b@example.com>', 'DATA']) await c.send(line);
    const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
    c.close();
    const raw = messageRaw(relay.store.sqlite, id)?.raw as Buffer;
    const header = raw.subarray(0, raw.indexOf('\r\n')).toString('latin1');
    assert.equal(header, 'Received: from evil??x.h??test ([127.0.0.1])');
    assert.ok(raw.subarray(0, raw.length - MSG.length + 3).every((byte) => byte < 0x80), 'the header is ASCII');
    const row = relay.store.sqlite.prepare('SELECT helo FROM messages WHERE id = ?').get(id) as { helo: string };
    assert.equal(row.helo, 'evil)(x.hé;test');
  });

  test('a HELO session is "with SMTP" in the Received header, an EHLO session "with ESMTP"', async () => {
    // a refused HELO or EHLO after the accepted one does not change it
    for (const [greeting, refused, protocol] of [['HELO', '', 'SMTP'], ['EHLO', '', 'ESMTP'], ['EHLO', 'HELO', 'ESMTP'], ['HELO', 'EHLO', 'SMTP']]) {
      const c = await SmtpClient.connect(relay.smtpPort);
      await c.read();
      assert.match(await c.send(`${greeting} client.test`), /^250/);
      if (refused) {
        assert.match(await c.send(refused), /^501 /);
        assert.match(await c.send('RSET'), /^250 /);
      }
      assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
      assert.match(await c.send('RCPT TO:<b@example.com>'), /^250 /);
      assert.match(await c.send('DATA'), /^354/);
      const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
      c.close();
      assert.match(messageRaw(relay.store.sqlite, id)?.raw?.toString() ?? '', new RegExp(`\\(relayq\\) with ${protocol} id ${id}`), `${greeting}, ${refused}`);
    }
  });

  test('too many recipients → 452 4.5.3', async () => {
    const c = await openSession(relay.smtpPort, 'a@example.com', ['1@example.com', '2@example.com', '3@example.com']);
    assert.match(await c.send('RCPT TO:<4@example.com>'), /^452 4\.5\.3 Error: too many recipients$/);
    // a recipient given again takes no second place, in another case either
    assert.match(await c.send('RCPT TO:<2@EXAMPLE.com>'), /^250 /);
    // the limit is for each transaction
    assert.match(await c.send('RSET'), /^250 /);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    assert.match(await c.send('RCPT TO:<4@example.com>'), /^250 /);
    c.close();
  });

  test('maxRecipients counts two spellings of an internationalized address once, as they are stored once', async () => {
    const c = await openSession(relay.smtpPort, 'a@example.com', ['bob@münchen.de', 'bob@XN--MNCHEN-3YA.DE', 'bob@ｍüｎｃｈｅｎ.de', 'r2@example.com']);
    assert.match(await c.send('RCPT TO:<r3@example.com>'), /^250 /);
    assert.match(await c.send('RCPT TO:<r4@example.com>'), /^452 4\.5\.3 /);
    assert.match(await c.send('DATA'), /^354/);
    const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
    c.close();
    const stored = relay.store.sqlite.prepare('SELECT address FROM recipients WHERE message_id = ? ORDER BY seq').pluck().all(id);
    assert.deepEqual(stored, ['bob@münchen.de', 'r2@example.com', 'r3@example.com']);
  });

  test('a recipient repeated in another case is stored once, in its first place and first spelling', async () => {
    const c = await openSession(relay.smtpPort, 'a@example.com', ['first@example.com', 'second@example.com', 'First@Example.COM', 'third@example.com']);
    assert.match(await c.send('DATA'), /^354/);
    const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
    c.close();
    const stored = relay.store.sqlite.prepare('SELECT address FROM recipients WHERE message_id = ? ORDER BY seq').pluck().all(id);
    assert.deepEqual(stored, ['first@example.com', 'second@example.com', 'third@example.com']);
  });

  test('a recipient equal to another in lower case but another address (ΑΣ-1.GR is ασ-1.gr, ας-1.gr is not) is refused, not merged into it', async () => {
    const c = await openSession(relay.smtpPort, 'a@example.com', ['bob@ας-1.gr']);
    assert.match(await c.send('RCPT TO:<BOB@ΑΣ-1.GR>'), /^550 5\.1\.3 /);
    assert.match(await c.send('DATA'), /^354/);
    const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
    c.close();
    assert.deepEqual(relay.store.sqlite.prepare('SELECT address FROM recipients WHERE message_id = ?').pluck().all(id), ['bob@ας-1.gr']);
  });

  test('message over maxMessageSize → 552 5.3.4, nothing stored', async () => {
    const before = messageCount(relay);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354/);
    const reply = await c.send(`Subject: big\r\n\r\n${'x'.repeat(3000)}\r\n.`);
    // smtp-server's own reply, which names the limit as the refusal of a SIZE= over it does
    assert.equal(reply, '552 5.3.4 Error: message exceeds fixed maximum message size 2048');
    assert.equal(messageCount(relay), before);
    c.close();
    // the log line says how big it was (all of it, not what was kept) and from whom
    const refused = log.entries().filter((e) => e.event === 'smtp.refused' && e.reason === 'size');
    assert.equal(refused.length, 1);
    assert.equal(refused[0].bytes, 'Subject: big\r\n\r\n'.length + 3000 + 2);
    assert.equal(refused[0].client, '127.0.0.1');
  });

  test('a SIZE over maxMessageSize on MAIL FROM → 552 5.3.4 there, logged as a refusal for size', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    assert.match(await c.send('EHLO client.test'), /^250/);
    assert.equal(await c.send('MAIL FROM:<big@example.com> SIZE=999999'), '552 5.3.4 Error: message exceeds fixed maximum message size 2048');
    // the sender as every other line names it: an xn-- domain decoded, whatever its case
    assert.match(await c.send('MAIL FROM:<big@XN--MNCHEN-3YA.DE> SIZE=999999'), /^552 5\.3\.4 /);
    assert.match(await c.send('MAIL FROM:<small@example.com> SIZE=100'), /^250 /);
    c.close();
    const refused = log.entries().filter((e) => e.event === 'smtp.refused' && e.reason === 'size' && e.declared !== undefined);
    assert.deepEqual(
      refused.map((e) => [e.declared, e.sender, e.client]),
      [
        [999999, 'big@example.com', '127.0.0.1'],
        [999999, 'big@münchen.de', '127.0.0.1'],
      ],
    );
  });

  test('bare LF or CR in DATA (SMTP smuggling) → 550 5.6.0, nothing stored', async () => {
    const before = messageCount(relay);
    for (const body of ['a\n.\nMAIL FROM:<x@example.com>\r\nb', 'line\rmore', 'trailing lf\n']) {
      const c = await openSession(relay.smtpPort);
      assert.match(await c.send('DATA'), /^354/);
      assert.match(await c.send(`Subject: s\r\n\r\n${body}\r\n.`), /^550 5\.6\.0 /, JSON.stringify(body));
      // the session stays usable
      assert.match(await c.send('NOOP'), /^250/);
      c.close();
    }
    assert.equal(messageCount(relay), before);
  });

  test('50 Received: headers already (a mail loop) → 554 5.4.6, nothing stored; 49 are taken, and lines of the body do not count', async () => {
    const before = messageCount(relay);
    const hops = (n: number) => 'Received: by h\r\n'.repeat(n);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354/);
    assert.match(await c.send(`${hops(49)}RECEIVED: by g\r\nSubject: loop\r\n\r\nbody\r\n.`), /^554 5\.4\.6 Too many hops: 50 /);
    assert.equal(messageCount(relay), before);
    assert.match(await c.send('NOOP'), /^250/);
    c.close();
    assert.equal(log.entries().filter((e) => e.event === 'smtp.refused' && e.reason === 'mail-loop').length, 1);

    // relayq's own header makes 50, the limit
    const taken = await sendMail(relay.smtpPort, { raw: Buffer.from(`${hops(49)}Subject: far\r\n\r\n${hops(5)}`) });
    assert.match(taken.response, /^250 /);
    assert.equal(messageCount(relay), before + 1);
  });
});

describe('SMTP replies with AUTH required', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay({ defaultUsername: 'app', defaultPassword: 's3cret', maxConnections: 2 });
  });
  after(() => relay.stop());

  test('an authenticated HELO session is "with SMTP", with SMTPUTF8 too: ESMTPA, UTF8SMTP and their kin are names for ESMTP only (RFC 3848, RFC 6531)', async () => {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    assert.match(await c.send('HELO client.test'), /^250/);
    assert.match(await c.send(`AUTH PLAIN ${Buffer.from('\0app\0s3cret').toString('base64')}`), /^235 /);
    for (const sender of ['<a@example.com>', '<jörg@example.com> SMTPUTF8']) {
      assert.match(await c.send(`MAIL FROM:${sender}`), /^250 /);
      assert.match(await c.send('RCPT TO:<b@example.com>'), /^250 /);
      assert.match(await c.send('DATA'), /^354/);
      const id = /queued as (\S+)/.exec(await c.send(MSG.slice(0, -2)))?.[1] ?? '';
      assert.match(messageRaw(relay.store.sqlite, id)?.raw?.toString() ?? '', new RegExp(`\\(relayq\\) with SMTP id ${id}`), sender);
    }
    c.close();
  });

  test('MAIL before AUTH → 530 5.7.0', async () => {
    const { c } = await ehlo(relay.smtpPort);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^530 5\.7\.0 /);
    c.close();
  });

  test('bad credentials → 535 5.7.8; good ones → 235 and mail is accepted', async () => {
    const { c } = await ehlo(relay.smtpPort);
    const bad = Buffer.from('\0app\0wrong').toString('base64');
    assert.match(await c.send(`AUTH PLAIN ${bad}`), /^535 5\.7\.8 /);
    // the right password, asking to act as another user (RFC 4616's authzid): refused, not granted as app
    const asAnother = Buffer.from('root\0app\0s3cret').toString('base64');
    assert.match(await c.send(`AUTH PLAIN ${asAnother}`), /^535 5\.7\.8 /);
    // asking to act as oneself is taking no authzid
    const good = Buffer.from('app\0app\0s3cret').toString('base64');
    assert.match(await c.send(`AUTH PLAIN ${good}`), /^235 /);
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    c.close();
    const info = await sendMail(relay.smtpPort, { auth: { user: 'app', pass: 's3cret' } });
    assert.match(info.response, /^250 2\.0\.0 /);
    const row = relay.store.sqlite.prepare('SELECT auth_user FROM messages ORDER BY received_at DESC LIMIT 1').get() as { auth_user: string };
    assert.equal(row.auth_user, 'app');
  });

  test('AUTH inside a mail transaction → 503 5.5.1 (RFC 4954); after RSET it is taken', async () => {
    await withTestRelay({ defaultUsername: 'app', defaultPassword: 's3cret', security: { requireAuth: false } }, {}, async (open) => {
      const { c } = await ehlo(open.smtpPort);
      const good = Buffer.from('\0app\0s3cret').toString('base64');
      assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
      assert.match(await c.send(`AUTH PLAIN ${good}`), /^503 5\.5\.1 /);
      assert.match(await c.send('RCPT TO:<b@example.com>'), /^250 /, 'the transaction goes on, unauthenticated');
      assert.match(await c.send('RSET'), /^250 /);
      assert.match(await c.send(`AUTH PLAIN ${good}`), /^235 /);
      c.close();
    });
  });

  test('too many connections → 421 4.7.0', async () => {
    const a = await SmtpClient.connect(relay.smtpPort);
    const b = await SmtpClient.connect(relay.smtpPort);
    assert.match(await a.read(), /^220 /);
    assert.match(await b.read(), /^220 /);
    const c = await SmtpClient.connect(relay.smtpPort);
    assert.match(await c.read(), /^421 4\.7\.0 /);
    a.close();
    b.close();
    c.close();
  });
});

describe('storage faults', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay();
  });
  after(() => relay.stop());

  test('storage write failed → 451 4.3.0, nothing stored; recovers when the fault clears', async () => {
    const sqlite = relay.store.sqlite;
    const before = messageCount(relay);
    // the fault is set on the connection that writes (the writer thread's)
    const pages = (await relay.writer.pragma('page_count')) as number;
    const maxBefore = (await relay.writer.pragma('max_page_count')) as number;
    await relay.writer.pragma(`max_page_count = ${pages}`);
    try {
      await assert.rejects(
        sendMail(relay.smtpPort, { text: 'x'.repeat(200_000) }),
        (err: Error & { responseCode?: number; response?: string }) => {
          assert.equal(err.responseCode, 451);
          assert.match(err.response ?? '', /^451 4\.3\.0 /);
          return true;
        },
      );
      assert.equal(messageCount(relay), before);
      const orphans = sqlite.prepare('SELECT COUNT(*) AS n FROM recipients WHERE message_id NOT IN (SELECT id FROM messages)').get() as { n: number };
      assert.equal(orphans.n, 0);
    } finally {
      await relay.writer.pragma(`max_page_count = ${maxBefore}`);
    }
    const ok = await sendMail(relay.smtpPort, { text: 'after the fault' });
    assert.match(ok.response, /^250 2\.0\.0 /);
    assert.equal(messageCount(relay), before + 1);
  });
});

describe('SMTP access control', () => {
  test('client outside allowedNetworks → 554 5.7.1 at connect, then close', async () => {
    const log = capturedLog('info');
    await withTestRelay(
      { defaultUsername: 'u', defaultPassword: 'p', security: { allowLocalOnly: false, allowedNetworks: ['10.0.0.0/8'] } },
      { logger: log.logger },
      async (relay) => {
        const c = await SmtpClient.connect(relay.smtpPort);
        assert.match(await c.read(), /^554 5\.7\.1 /);
        await new Promise((r) => c.socket.once('close', r));
        assert.ok(c.closed);
      },
    );
    const refused = log.entries().filter((e) => e.event === 'smtp.refused');
    assert.deepEqual(refused.map((e) => [e.reason, e.client]), [['not-allowed', '127.0.0.1']]);
  });

  test('allowedNetworks containing the client → greeting', async () => {
    await withTestRelay(
      { defaultUsername: 'u', defaultPassword: 'p', security: { allowLocalOnly: false, allowedNetworks: ['127.0.0.0/8'] } },
      {},
      async (relay) => {
        const c = await SmtpClient.connect(relay.smtpPort);
        assert.match(await c.read(), /^220 /);
        c.close();
      },
    );
  });
});

describe('shutdown', () => {
  /**
   * A stop begins while one client is in DATA: new transactions get 421, the message still
   * completes. `stepMs`: once the grace period has begun, the wall clock steps this far ahead.
   */
  async function messageInDataCompletes(stepMs: number) {
    // a grace far longer than the test, so a slow machine cannot turn the DATA in flight into a 421
    const relay = await startTestRelay({}, { shutdownGraceMs: 60_000 });
    const inData = await openSession(relay.smtpPort);
    assert.match(await inData.send('DATA'), /^354/);
    inData.write('Subject: in flight\r\n\r\npart one\r\n');
    const idle = await SmtpClient.connect(relay.smtpPort);
    await idle.read();
    await idle.send('EHLO x');
    const stopping = relay.stop();
    assert.match(await idle.send('MAIL FROM:<a@example.com>'), /^421 4\.3\.2 /);
    await withSteppedClock(stepMs, async () => {
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.match(await inData.send('part two\r\n.'), /^250 2\.0\.0 /);
    });
    await stopping;
    inData.close();
    idle.close();
  }

  test('commands after shutdown began → 421 4.3.2; a message in DATA still completes', () => messageInDataCompletes(0));

  test('a stop after mail was stored, with no message being committed, waits for no commit and says none', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({}, { logger: log.logger, startDelivery: false });
    try {
      for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { subject: `m${i}` });
      assert.equal(messageCount(relay), 3);
    } finally {
      await relay.stop();
    }
    // each commit got its answer before the stop (nor are answered commits kept for the relay's lifetime)
    assert.deepEqual(log.entries().filter((e) => e.event === 'smtp.shutdown_commits'), []);
    assert.ok(log.entries().some((e) => e.event === 'relay.stopped'));
  });

  // an NTP step or a resumed VM: the grace period runs on the monotonic clock
  test('a wall clock stepped forward during the grace period does not end it: a message in DATA still completes', () =>
    messageInDataCompletes(3_600_000));

  test('at the end of the grace period a message being committed still gets its 250; one completed meanwhile gets 421 and is not stored', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({}, { shutdownGraceMs: 100, startRetention: false, logger: log.logger });
    // another process holds the write lock, and the writer waits for it as long as it takes
    const lock = await holdWriteLock(relay, 120_000);
    let stopping: Promise<void> | undefined;
    const committing = await openSession(relay.smtpPort);
    const late = await openSession(relay.smtpPort);
    try {
      assert.match(await committing.send('DATA'), /^354/);
      assert.match(await late.send('DATA'), /^354/);
      late.write('Subject: late\r\n\r\npart one\r\n');
      committing.write(MSG);
      const answer = committing.read(120_000);
      await waitFor(() => relay.writer.waiting === 1, 10_000, 'the message waiting for the writer');
      stopping = relay.stop();
      // until the grace period is over (or the client has its answer early: told 421 while its
      // message is being committed, it would send it again)
      const graceOver = waitFor(() => log.entries().some((e) => e.event === 'smtp.shutdown_commits'), 10_000, 'the end of the grace period');
      await Promise.race([answer, graceOver.catch(() => {})]);
      // the other message completes while shutdown waits for that commit: too late to be stored
      late.write('part two\r\n.\r\n');
      let lateAnswered = false;
      const lateAnswer = late.read(120_000).finally(() => {
        lateAnswered = true;
      });
      await waitFor(() => lateAnswered || relay.writer.waiting > 1, 10_000, 'an answer, or the late message sent to the writer');
      await lock.release();
      assert.match(await answer, /^250 2\.0\.0 Ok: queued as /);
      assert.match(await lateAnswer, /^421 4\.3\.2 /);
      assert.match(await committing.read(120_000), /^421 4\.3\.2 /);
    } finally {
      await lock.release().catch(() => {});
      committing.close();
      late.close();
      await stopping;
    }
    const stored = openReadOnly(relay.config.databasePath);
    assert.equal((stored.prepare('SELECT COUNT(*) AS n FROM messages').get() as { n: number }).n, 1);
    stored.close();
  });

  test('a client that connects while the relay is still stopping is told 421 4.3.2, not refused', async () => {
    const relay = await startTestRelay({}, { shutdownGraceMs: 60_000 });
    // a message in DATA: the stop waits for it
    const inData = await openSession(relay.smtpPort);
    assert.match(await inData.send('DATA'), /^354/);
    const stopping = relay.stop();
    let late: SmtpClient | undefined;
    try {
      await new Promise((resolve) => setTimeout(resolve, 100));
      // meanwhile SMTP answers, but takes nothing
      late = await SmtpClient.connect(relay.smtpPort);
      assert.match(await late.read(), /^421 4\.3\.2 /);
      assert.match(await inData.send('Subject: in flight\r\n\r\nbody\r\n.'), /^250 2\.0\.0 /);
    } finally {
      late?.close();
      inData.close();
      await stopping;
    }
  });

  test('a client still in DATA when the grace period ends → 421 4.3.2 and disconnected, nothing stored; its spool file is gone', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({ spoolAfter: 1024 }, { shutdownGraceMs: 100, logger: log.logger });
    const c = await openSession(relay.smtpPort);
    let stopping: Promise<void> | undefined;
    try {
      assert.match(await c.send('DATA'), /^354/);
      c.write(`Subject: slow\r\n\r\n${'part one, past spoolAfter\r\n'.repeat(2000)}`);
      const spool = Spool.dirFor(relay.config.databasePath);
      await waitFor(() => fs.existsSync(spool) && fs.readdirSync(spool).length === 1, 10_000, 'the message spooled');
      stopping = relay.stop();
      // the grace period ends while the client is still sending
      assert.match(await c.read(), /^421 4\.3\.2 /);
      assert.equal(await c.send('part two\r\n.'), '', 'the connection is closed');
      assert.equal(messageCount(relay), 0);
      await stopping;
      assert.deepEqual(fs.readdirSync(spool), [], 'nothing left in the spool once stop() has returned');
      // its session line says where it was cut off, as for a client that left there
      const session = log.entries().find((e) => e.event === 'smtp.session');
      assert.ok((session?.lostInData as { bytes?: number } | undefined)?.bytes, JSON.stringify(session));
    } finally {
      c.close();
      await stopping;
    }
  });
});

describe('clients that are not on loopback (peer address injected)', () => {
  const remote = () => '203.0.113.7';

  test('AUTH in plain text from a non-loopback client → 538 5.7.11; MAIL without AUTH → 530 5.7.0', async () => {
    await withTestRelay(
      { defaultUsername: 'app', defaultPassword: 'pw', security: { allowLocalOnly: false, allowedNetworks: [] } },
      { smtpPeerAddress: remote },
      async (relay) => {
        const { c } = await ehlo(relay.smtpPort);
        assert.match(await c.send(`AUTH PLAIN ${Buffer.from('\0app\0pw').toString('base64')}`), /^538 5\.7\.11 /);
        assert.match(await c.send('MAIL FROM:<a@example.com>'), /^530 5\.7\.0 /);
        c.close();
        assert.equal(messageCount(relay), 0);
      },
    );
  });

  test('an allowed network without AUTH (the Docker setup): an app configured with credentials still sends, as AUTH is not offered in plain text', async () => {
    await withTestRelay(
      { security: { requireAuth: false, allowLocalOnly: false, allowedNetworks: ['203.0.113.0/24'] } },
      { smtpPeerAddress: remote },
      async (relay) => {
        const { c, reply } = await ehlo(relay.smtpPort);
        c.close();
        assert.doesNotMatch(reply, /AUTH/);
        const info = await sendMail(relay.smtpPort, { to: ['a@example.com'], auth: { user: 'app', pass: 'secret' } });
        assert.match(info.response, /^250 2\.0\.0 Ok: queued as /);
        assert.equal(messageCount(relay), 1);
      },
    );
  });

  test('an IPv6 client appears in the Received header as an IPv6 address literal', async () => {
    await withTestRelay(
      { security: { requireAuth: false, allowLocalOnly: false, allowedNetworks: ['2001:db8::/32'] } },
      { smtpPeerAddress: () => '2001:db8::7' },
      async (relay) => {
        const id = (await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response.split(' ').pop() as string;
        const { raw } = messageRaw(relay.store.sqlite, id) as { raw: Buffer };
        // (the injected peer differs from the socket's own address, which smtp-server reports as the host name)
        assert.match(raw.toString(), /^Received: from [^\r\n]*\[IPv6:2001:db8::7\]\)\r\n/);
      },
    );
  });

  test('allowLocalOnly with a remote client → 554 5.7.1', async () => {
    await withTestRelay({}, { smtpPeerAddress: remote }, async (relay) => {
      const c = await SmtpClient.connect(relay.smtpPort);
      assert.match(await c.read(), /^554 5\.7\.1 /);
      c.close();
    });
  });

  test('loopback-only mode never accepts unauthenticated mail from a remote peer', async () => {
    // requireAuth without credentials but the peer is remote (allowed by network): refused
    await withTestRelay(
      { defaultUsername: 'app', defaultPassword: 'pw', security: { allowLocalOnly: false, allowedNetworks: ['203.0.113.0/24'] } },
      { smtpPeerAddress: remote },
      async (relay) => {
        const { c } = await ehlo(relay.smtpPort);
        assert.match(await c.send('MAIL FROM:<a@example.com>'), /^530 5\.7\.0 /);
        c.close();
      },
    );
  });
});

/** smtp-server's own certificate (valid 2015-02-12T11:32:58Z to 2025-02-09T11:32:58Z) and key, as the files tls.cert and tls.key name. */
async function tlsFiles(): Promise<{ key: string; cert: string }> {
  const path = await import('node:path');
  const { default: tlsOptions } = await import('smtp-server/lib/tls-options.js');
  const { key, cert } = tlsOptions({}) as { key: string; cert: string };
  const dir = (await import('../helpers.js')).tempDir();
  const files = { key: path.join(dir, 'key.pem'), cert: path.join(dir, 'cert.pem') };
  fs.writeFileSync(files.key, key, { mode: 0o600 });
  fs.writeFileSync(files.cert, cert);
  return files;
}

/** The config warnings a relay started with `config` logs, which /health's `warnings` repeats. */
async function startWarnings(config: Parameters<typeof startTestRelay>[0], clock?: Clock): Promise<string[]> {
  const log = capturedLog('warn');
  const relay = await startTestRelay(config, { clock, logger: log.logger, startDelivery: false });
  try {
    const health = (await (await fetch(`http://127.0.0.1:${relay.httpPort}/health`)).json()) as { details: { warnings: string[] } };
    const logged = log.entries().filter((e) => e.event === 'config.warning').map((e) => String(e.msg));
    assert.deepEqual(health.details.warnings, logged);
    return logged;
  } finally {
    await relay.stop();
  }
}

describe('STARTTLS', () => {
  test('is offered when tls.cert/tls.key are set, and AUTH + mail work over it', async () => {
    const files = await tlsFiles();
    const log = capturedLog('info');
    await withTestRelay(
      {
        defaultUsername: 'app',
        defaultPassword: 'pw',
        security: { allowLocalOnly: false },
        tls: files,
      },
      { smtpPeerAddress: () => '203.0.113.8', logger: log.logger },
      async (relay) => {
        const plain = await ehlo(relay.smtpPort);
        plain.c.close();
        const { c, reply } = await ehlo(relay.smtpPort);
        assert.match(reply, /250[- ]STARTTLS/);
        // over TLS too the EHLO reply offers no REQUIRETLS (relayq does not implement it)
        assert.match(await c.startTls(), /^220 /);
        assert.doesNotMatch(await c.send('EHLO client.test'), /REQUIRETLS/);
        c.close();
        const nodemailer = (await import('nodemailer')).default;
        const transport = nodemailer.createTransport({
          host: '127.0.0.1',
          port: relay.smtpPort,
          requireTLS: true,
          tls: { rejectUnauthorized: false },
          auth: { user: 'app', pass: 'pw' },
        });
        const info = await transport.sendMail({ from: 'a@example.com', to: 'b@example.com', subject: 'tls', text: 'secret' });
        transport.close();
        assert.match(info.response, /^250 2\.0\.0 /);
        const row = relay.store.sqlite.prepare('SELECT raw FROM message_bodies').get() as { raw: Buffer };
        assert.match(row.raw.toString(), /with ESMTPSA id/);
        // each session's line says whether it was encrypted, and with what, as Postfix logs it
        await waitFor(() => log.entries().filter((e) => e.event === 'smtp.session').length === 3, 10_000, 'three sessions logged');
        const sessions = log.entries().filter((e) => e.event === 'smtp.session');
        const encrypted = sessions.filter((e) => e.tls !== undefined);
        assert.equal(encrypted.length, 2, 'the plain session has no tls');
        for (const session of encrypted) assert.match(String(session.tls), /^TLSv1\.[23] [A-Z0-9_-]+$/);
      },
    );
  });

  test('commands sent behind STARTTLS in plain text are dropped, not run inside TLS (CVE-2011-0411), also behind a message', async () => {
    const net = await import('node:net');
    const tls = await import('node:tls');
    await withTestRelay({ tls: await tlsFiles() }, { startDelivery: false }, async (relay) => {
      // what the client writes in one packet once EHLO is answered, and the replies it gets before TLS
      const cases: Array<[string, RegExp]> = [
        ['STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n', /^220 /],
        [`MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n${MSG}STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n`, /^250 [\s\S]*\r\n354 [\s\S]*\r\n250 2\.0\.0 Ok: queued as [0-9A-F]+\r\n220 /],
      ];
      for (const [packet, beforeTls] of cases) {
        const plain = net.connect({ port: relay.smtpPort, host: '127.0.0.1' });
        let text = '';
        const onData = (d: Buffer) => {
          text += d.toString();
        };
        plain.on('data', onData);
        await waitFor(() => /^220 /m.test(text), 10_000, 'the greeting');
        text = '';
        plain.write('EHLO client.test\r\n');
        await waitFor(() => /^250 /m.test(text), 10_000, 'the EHLO reply');
        text = '';
        plain.write(packet);
        await waitFor(() => /^220 .*\r\n$/m.test(text), 10_000, 'the reply to STARTTLS');
        assert.match(text, beforeTls);
        plain.off('data', onData);
        text = '';
        const secure = tls.connect({ socket: plain, rejectUnauthorized: false });
        await new Promise((resolve) => secure.once('secureConnect', resolve));
        secure.on('data', onData);
        // a reply to the plain-text MAIL or RCPT would come now, unasked
        await new Promise((r) => setTimeout(r, 300));
        assert.equal(text, '', 'no reply inside TLS to a command sent before it');
        secure.write('MAIL FROM:<a@example.com>\r\n');
        await waitFor(() => /^\d{3} .*\r\n$/m.test(text), 10_000, 'the reply to MAIL');
        assert.match(text, /^503 /, 'no EHLO inside TLS yet: the session starts again, with nothing of before');
        secure.end();
      }
      assert.equal(messageCount(relay), 1, 'the one message sent before STARTTLS');
    });
  });

  test('a client without a handshake after the 220 to STARTTLS is logged as such, whether it leaves or is still there at shutdown (the 421 it cannot read is no refusal)', async () => {
    const { connect } = await import('node:net');
    const log = capturedLog('info');
    const sockets: net.Socket[] = [];
    await withTestRelay({ tls: await tlsFiles() }, { logger: log.logger, startDelivery: false }, async (relay) => {
      for (let i = 0; i < 2; i++) {
        const socket = connect({ port: relay.smtpPort, host: '127.0.0.1' });
        sockets.push(socket);
        socket.on('error', () => {});
        let text = '';
        socket.on('data', (d: Buffer) => {
          text += d.toString();
        });
        await waitFor(() => /^220 /m.test(text), 10_000, 'the greeting');
        socket.write('EHLO client.test\r\n');
        await waitFor(() => /^250 /m.test(text), 10_000, 'the EHLO reply');
        socket.write('STARTTLS\r\n');
        await waitFor(() => /^220 .*TLS/im.test(text), 10_000, 'the reply to STARTTLS');
      }
      sockets[0].end();
      await waitFor(() => log.entries().some((e) => e.event === 'smtp.session'), 10_000, 'the first session line');
      // the other sends no ClientHello: the relay stops (a 421 to every session) while it waits for one
    });
    sockets[1].destroy();
    await waitFor(() => log.entries().filter((e) => e.event === 'smtp.session').length === 2, 10_000, 'the second session line');
    const lines = log.entries().filter((e) => e.event === 'smtp.session');
    assert.deepEqual(
      lines.map((l) => [l.helo, l.tls, l.refused, l.replies]),
      [
        ['client.test', 'not completed', 0, undefined],
        ['client.test', 'not completed', 0, undefined],
      ],
    );
  });

  test('a TLS client that resets its connection after QUIT is one smtp.connection_lost line, which names its session', async () => {
    const net = await import('node:net');
    const tls = await import('node:tls');
    const log = capturedLog('info');
    await withTestRelay({ tls: await tlsFiles() }, { logger: log.logger, startDelivery: false }, async (relay) => {
      for (let i = 0; i < 2; i++) {
        // a client that reads no more after 221 and ends with a reset (SO_LINGER 0, or a process
        // that exits with the relay's close still unread), as Python's smtplib and swaks can
        const plain = net.connect({ port: relay.smtpPort, host: '127.0.0.1', allowHalfOpen: true });
        let text = '';
        const onData = (d: Buffer) => {
          text += d.toString();
        };
        const reply = async (code: string) => {
          await waitFor(() => new RegExp(`^${code} `, 'm').test(text), 10_000, `a ${code} reply`);
          text = '';
        };
        plain.on('data', onData);
        await reply('220');
        plain.write('EHLO client.test\r\n');
        await reply('250');
        plain.write('STARTTLS\r\n');
        await reply('220');
        plain.off('data', onData);
        const secure = tls.connect({ socket: plain, rejectUnauthorized: false });
        await new Promise((resolve) => secure.once('secureConnect', resolve));
        secure.on('data', onData);
        secure.write('QUIT\r\n');
        await reply('221');
        secure.pause();
        await new Promise((r) => setTimeout(r, 200));
        plain.resetAndDestroy();
      }
      await waitFor(() => log.entries().filter((e) => e.event === 'smtp.session').length === 2, 10_000, 'two sessions logged');
      await waitFor(() => log.entries().filter((e) => e.event === 'smtp.connection_lost').length >= 2, 10_000, 'lost connections logged');
      await new Promise((r) => setTimeout(r, 200));
    });
    const sessions = log.entries().filter((e) => e.event === 'smtp.session').map((e) => e.session);
    const lost = log.entries().filter((e) => e.event === 'smtp.connection_lost');
    assert.deepEqual(
      lost.map((e) => e.session),
      sessions,
      'one line for each session, not one for the TLS socket and one for the TCP socket under it',
    );
  });

  test('a tls.cert that is expired or not valid yet starts, with a warning in the log and in /health', async () => {
    const { ManualClock } = await import('../manual-clock.js');
    const files = await tlsFiles();
    const warningsAt = async (time: number) => (await startWarnings({ tls: files }, new ManualClock(time))).filter((w) => w.startsWith('tls.cert'));
    assert.deepEqual(await warningsAt(Date.UTC(2026, 0, 1)), [
      `tls.cert ${files.cert} expired on 2025-02-09T11:32:58.000Z: clients that verify certificates cannot use STARTTLS`,
    ]);
    assert.deepEqual(await warningsAt(Date.UTC(2020, 0, 1)), []);
    // valid from notBefore through notAfter, both included, to the second (RFC 5280 4.1.2.5)
    const notBefore = Date.UTC(2015, 1, 12, 11, 32, 58);
    const notAfter = Date.UTC(2025, 1, 9, 11, 32, 58);
    for (const time of [notBefore, notAfter, notAfter + 999]) assert.deepEqual(await warningsAt(time), [], new Date(time).toISOString());
    assert.equal((await warningsAt(notAfter + 1000)).length, 1);
    assert.equal((await warningsAt(notBefore - 1)).length, 1);
    assert.deepEqual(await warningsAt(Date.UTC(2010, 0, 1)), [
      `tls.cert ${files.cert} is not valid before 2015-02-12T11:32:58.000Z: clients that verify certificates cannot use STARTTLS`,
    ]);
  });

  test('a tls.key every user may read starts, with a warning in the log and in /health; one its group may read does not warn', async () => {
    const files = await tlsFiles();
    const keyWarnings = async (mode: number) => {
      fs.chmodSync(files.key, mode);
      return (await startWarnings({ tls: files })).filter((w) => w.startsWith('tls.key'));
    };
    assert.deepEqual(await keyWarnings(0o644), [
      `tls.key ${files.key} may be read by every user of this machine (mode 0644), who could pose as this relay to its clients: chmod o-r it`,
    ]);
    assert.deepEqual(await keyWarnings(0o640), []);
    assert.deepEqual(await keyWarnings(0o600), []);
  });
});
