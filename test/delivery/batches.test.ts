import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { MESSAGE_PIECE_BYTES, RECEIVED_HEADER_ROOM } from '../../src/delivery/upstream.js';
import type { Relay } from '../../src/main.js';
import { insertMessage } from '../../src/store/intake.js';
import { call, postJson } from '../api/fixtures.js';
import { capturedLog, NO_LIMITS, newMessage, SmtpClient, sendMail, startTestRelay, startUpstream, waitFor, writeDirect } from '../helpers.js';
import { ManualClock } from '../manual-clock.js';
import { addresses, attempts, message, NO_JITTER, queuedId, recipients, type ScriptedUpstream, startScriptedUpstream } from './fixtures.js';

const RAW = Buffer.from(
  'From: App <app@example.com>\r\nTo: undisclosed-recipients:;\r\nSubject: batches\r\nMessage-ID: <batch@example.com>\r\n\r\nline one\r\n.leading dot\r\n..two dots\r\n\r\nbye\r\n',
);

describe('recipient batches', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function setup(
    overrides: Parameters<typeof startTestRelay>[0],
    clock?: ManualClock,
    upstreamOptions: Parameters<typeof startScriptedUpstream>[0] = {},
  ): Promise<{ relay: Relay; upstream: ScriptedUpstream }> {
    const upstream = await startScriptedUpstream(upstreamOptions);
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, ...overrides },
      clock ? { clock, startDelivery: false, random: NO_JITTER } : { random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    return { relay, upstream };
  }

  test('a message goes upstream in pieces, and lines that start with a dot at their seams arrive unchanged', async () => {
    const clock = new ManualClock();
    const { relay, upstream } = await setup({}, clock);
    const parts = ['Subject: seams\r\n\r\n'];
    let length = parts[0].length;
    const add = (line: string) => {
      parts.push(line);
      length += line.length;
    };
    /** Lines of x up to `offset`, where the next line starts. */
    const fillTo = (offset: number) => {
      while (offset - length > 144) add(`${'x'.repeat(70)}\r\n`);
      const rest = offset - length;
      for (const n of [Math.floor(rest / 2), rest - Math.floor(rest / 2)]) add(`${'y'.repeat(n - 2)}\r\n`);
    };
    const seam = MESSAGE_PIECE_BYTES;
    fillTo(seam);
    add('.a dot that starts a piece\r\n');
    fillTo(2 * seam + 1); // the line end before it is split: CR ends one piece, LF starts the next
    add('.a dot after a line end split across a seam\r\n');
    fillTo(3 * seam);
    add('.\r\n'); // a line of one dot, which unstuffed would end DATA here
    add('after the lone dot\r\n');
    const raw = Buffer.from(parts.join(''));
    assert.equal(raw.subarray(seam, seam + 1).toString(), '.');
    assert.equal(raw.subarray(2 * seam - 1, 2 * seam + 2).toString(), '\r\n.');
    assert.equal(raw.subarray(3 * seam - 2, 3 * seam + 3).toString(), '\r\n.\r\n');
    const id = '1A22AF1C0B4CA8658AD0';
    await writeDirect(relay, (db) => insertMessage(db, newMessage({ id, raw, receivedAt: clock.now() }), NO_LIMITS));
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.equal(message(relay, id).state, 'delivered');
    assert.equal(upstream.accepted.length, 1);
    assert.ok(upstream.accepted[0].raw.equals(raw), 'the upstream received the stored bytes');
  });

  test('45 recipients with batchSize 20 → transactions of 20, 20 and 5, batchDelay apart, bytes unchanged', async () => {
    const clock = new ManualClock();
    const { relay, upstream } = await setup({ batchSize: 20, batchDelay: 1000 }, clock);
    const rcpts = addresses(45);
    const id = queuedId((await sendMail(relay.smtpPort, { from: 'app@example.com', to: rcpts, raw: RAW })).response);
    const stored = message(relay, id).raw!;

    assert.equal((await relay.delivery.runOnce()).attempts, 1, 'first batch goes at once');
    assert.equal(message(relay, id).state, 'queued');
    assert.equal(message(relay, id).next_attempt_at, clock.now() + 1000, 'next batch due batchDelay later');
    assert.equal((await relay.delivery.runOnce()).attempts, 0, 'nothing is due before batchDelay');
    clock.advance(999);
    assert.equal((await relay.delivery.runOnce()).attempts, 0, 'nothing is due 1 ms before batchDelay');
    clock.advance(1);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    clock.advance(1000);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.equal((await relay.delivery.runOnce()).attempts, 0);

    assert.deepEqual(
      upstream.accepted.map((t) => t.to.length),
      [20, 20, 5],
    );
    assert.deepEqual(upstream.accepted.flatMap((t) => t.to), rcpts, 'every recipient once, in RCPT order');
    for (const t of upstream.accepted) {
      assert.equal(t.from, 'app@example.com', 'original envelope sender');
      assert.equal(t.helo, relay.config.serverName, 'EHLO names serverName');
      assert.deepEqual(t.raw, stored, 'stored bytes unchanged');
    }
    const rows = attempts(relay, id);
    assert.deepEqual(
      rows.map((a) => [a.batch, JSON.parse(a.recipients).length, a.outcome, a.code, a.upstream]),
      [
        [0, 20, 'delivered', 250, `127.0.0.1:${upstream.port}`],
        [1, 20, 'delivered', 250, `127.0.0.1:${upstream.port}`],
        [2, 5, 'delivered', 250, `127.0.0.1:${upstream.port}`],
      ],
    );
    for (let i = 1; i < rows.length; i++) assert.ok(rows[i].started_at - rows[i - 1].started_at >= 1000, 'batchDelay apart');
    const m = message(relay, id);
    assert.equal(m.state, 'delivered');
    assert.equal(m.claims, 3);
    assert.equal(m.lease_token, null);
    assert.ok(recipients(relay, id).every((r) => r.status === 'delivered' && r.attempts === 1 && r.last_code === 250));
  });

  test('the running engine keeps batches of one message at least batchDelay apart', async () => {
    const { relay, upstream } = await setup({ batchSize: 2, batchDelay: 150 });
    const id = queuedId((await sendMail(relay.smtpPort, { to: addresses(5), raw: RAW })).response);
    await waitFor(() => message(relay, id).state === 'delivered', 10_000, 'delivery');
    assert.deepEqual(
      upstream.accepted.map((t) => t.to.length),
      [2, 2, 1],
    );
    // Causal lower bound: a batch is claimed only once now >= (previous commit + batchDelay).
    for (let i = 1; i < upstream.accepted.length; i++) {
      assert.ok(upstream.accepted[i].at - upstream.accepted[i - 1].at >= 150, `gap ${upstream.accepted[i].at - upstream.accepted[i - 1].at} ms`);
    }
    assert.equal(relay.delivery.status().consecutiveFailures, 0);
    assert.ok(relay.delivery.status().lastSuccessAt !== null);
  });

  test('a retry by hand, of a message between batches, in backoff or failed, still waits batchDelay after its last batch', async () => {
    const clock = new ManualClock();
    const { relay, upstream } = await setup({ batchSize: 2, batchDelay: 60_000, workerCount: 1, retry: { initialDelay: 600 } }, clock);
    const retry = (id: string) => call(relay, `/admin/messages/${id}/retry`, { method: 'POST' });
    const between = queuedId((await sendMail(relay.smtpPort, { to: addresses(4), raw: RAW })).response);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    const lastBatchAt = clock.now();
    clock.advance(1000);
    assert.deepEqual((await retry(between)).body, { id: between, result: 'due-now' });
    assert.equal((await relay.delivery.runOnce()).attempts, 0, 'not before batchDelay, even retried by hand');
    assert.equal(message(relay, between).next_attempt_at, lastBatchAt + 60_000);
    clock.set(lastBatchAt + 60_000);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.equal(message(relay, between).state, 'delivered');

    // a message in a backoff (600 s) longer than batchDelay: the retry brings it forward to batchDelay
    upstream.rcptReply = () => ({ code: 451, message: 'try later' });
    const backoff = queuedId((await sendMail(relay.smtpPort, { to: ['slow@example.com'], raw: RAW })).response);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    upstream.rcptReply = () => undefined;
    const [deferred] = attempts(relay, backoff);
    assert.equal(message(relay, backoff).next_attempt_at, clock.now() + 600_000);
    clock.advance(1000);
    assert.deepEqual((await retry(backoff)).body, { id: backoff, result: 'due-now' });
    const deferredEnd = deferred.started_at + deferred.duration_ms;
    assert.equal(message(relay, backoff).next_attempt_at, deferredEnd + 60_000, 'brought forward, to batchDelay after the attempt');
    assert.equal((await relay.delivery.runOnce()).attempts, 0);
    clock.set(deferredEnd + 60_000);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.equal(message(relay, backoff).state, 'delivered');

    // a message that failed (one recipient refused for good) and is requeued by hand
    upstream.rcptReply = (address) => (address === 'rcpt01@example.com' ? { code: 550, message: 'no such user' } : undefined);
    const failed = queuedId((await sendMail(relay.smtpPort, { to: addresses(2), raw: RAW })).response);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.equal(message(relay, failed).state, 'failed');
    upstream.rcptReply = () => undefined;
    const [first] = attempts(relay, failed);
    clock.advance(1000);
    const dueAt = first.started_at + first.duration_ms + 60_000;
    assert.deepEqual((await call(relay, '/admin/retry-failed', postJson({ ids: [failed] }))).body, { requeued: 1 });
    assert.equal(message(relay, failed).next_attempt_at, dueAt, 'batchDelay after the failed batch ended');
    assert.equal((await relay.delivery.runOnce()).attempts, 0, 'not before batchDelay');
    clock.set(dueAt);
    assert.equal((await relay.delivery.runOnce()).attempts, 1);
    assert.equal(message(relay, failed).state, 'delivered');
    assert.deepEqual(
      upstream.accepted.slice(-2).map((t) => t.to),
      [['rcpt00@example.com'], ['rcpt01@example.com']],
      'the retry sent the failed recipient only',
    );
  });

  test('other mail is delivered while a message waits for its next batch', async () => {
    const clock = new ManualClock();
    const { relay, upstream } = await setup({ batchSize: 1, batchDelay: 60_000, workerCount: 1 }, clock);
    const big = queuedId((await sendMail(relay.smtpPort, { to: addresses(2), raw: RAW })).response);
    await relay.delivery.runOnce();
    const small = queuedId((await sendMail(relay.smtpPort, { to: ['solo@example.com'], raw: RAW })).response);
    await relay.delivery.runOnce();
    assert.equal(message(relay, small).state, 'delivered', 'not stuck behind the batch delay');
    assert.equal(message(relay, big).state, 'queued');
    assert.deepEqual(
      upstream.accepted.map((t) => t.to),
      [['rcpt00@example.com'], ['solo@example.com']],
    );
  });

  test('new mail goes out beside a backlog of retries, not after all of it: every other claim takes mail never tried', async () => {
    const clock = new ManualClock();
    const { relay, upstream } = await setup({ workerCount: 1 }, clock);
    // a backlog of deferred mail, all due again (as after an outage), then new mail
    let down = true;
    upstream.rcptReply = () => (down ? { code: 451, message: '4.3.0 try again later' } : undefined);
    for (let i = 0; i < 5; i++) await sendMail(relay.smtpPort, { to: [`old${i}@example.com`], raw: RAW });
    await relay.delivery.runOnce();
    down = false;
    clock.advance(24 * 3600_000);
    await sendMail(relay.smtpPort, { to: ['new@example.com'], raw: RAW });
    await relay.delivery.runOnce();
    assert.deepEqual(
      upstream.accepted.map((t) => t.to[0]),
      ['old0@example.com', 'new@example.com', 'old1@example.com', 'old2@example.com', 'old3@example.com', 'old4@example.com'],
      'claims alternate between the oldest due mail and mail never tried; with none of the latter, the oldest due',
    );
  });

  test('a non-ASCII address goes out with SMTPUTF8; an upstream without it gets the ASCII recipients only, the others fail with 5.6.7', async () => {
    const to = ['用户@例子.test', 'ascii@example.com'];
    const raw = Buffer.from('Subject: utf8\r\n\r\nhello\r\n');
    const offers = await setup({}, new ManualClock());
    const sent = queuedId((await sendMail(offers.relay.smtpPort, { from: 'jörg@example.com', to, raw })).response);
    await offers.relay.delivery.runOnce();
    assert.equal(message(offers.relay, sent).state, 'delivered');
    assert.deepEqual(
      offers.upstream.accepted.map((t) => [t.from, t.to, t.smtpUtf8]),
      [['jörg@example.com', to, true]],
    );

    const lacks = await setup({}, new ManualClock(), { hideSMTPUTF8: true });
    const smtpUtf8Required = /^5\.6\.7 SMTPUTF8 is required, but was not offered by 127\.0\.0\.1:\d+/;
    // an ASCII sender (its domain in punycode): the ASCII recipient gets the mail
    const split = queuedId((await sendMail(lacks.relay.smtpPort, { from: 'app@bücher.example', to, raw })).response);
    await lacks.relay.delivery.runOnce();
    assert.deepEqual(
      lacks.upstream.accepted.map((t) => [t.from, t.to, t.smtpUtf8]),
      [['app@bücher.example', ['ascii@example.com'], false]],
      'smtp-server shows the punycoded sender domain decoded again',
    );
    assert.deepEqual(recipients(lacks.relay, split).map((r) => r.status), ['failed', 'delivered']);
    assert.match(recipients(lacks.relay, split)[0].last_reply ?? '', smtpUtf8Required);
    assert.equal(message(lacks.relay, split).state, 'failed');
    // a non-ASCII sender: nothing can go out
    const refused = queuedId((await sendMail(lacks.relay.smtpPort, { from: 'jörg@example.com', to, raw })).response);
    const rcptsBefore = lacks.upstream.rcpts.length;
    await lacks.relay.delivery.runOnce();
    assert.equal(lacks.upstream.rcpts.length, rcptsBefore, 'not one RCPT was sent');
    assert.equal(message(lacks.relay, refused).state, 'failed');
    for (const r of recipients(lacks.relay, refused)) {
      assert.equal(r.status, 'failed');
      assert.match(r.last_reply ?? '', smtpUtf8Required);
    }
  });

  test("a client's SMTPUTF8 goes upstream with its message, also when only its header fields are UTF-8; to an upstream without it, the message goes as it is", async () => {
    const raw = 'From: Jörg <joerg@example.com>\r\nSubject: Grüße\r\n\r\nhello\r\n';
    async function submit(port: number, parameters: string): Promise<string> {
      const client = await SmtpClient.connect(port);
      await client.read();
      await client.send('EHLO client.test');
      assert.match(await client.send(`MAIL FROM:<joerg@example.com>${parameters}`), /^250 /);
      assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250 /);
      assert.match(await client.send('DATA'), /^354/);
      const reply = await client.send(`${raw}.`);
      client.close();
      return queuedId(reply);
    }
    const offers = await setup({}, new ManualClock());
    for (const [parameters, smtpUtf8] of [
      [' SMTPUTF8 BODY=8BITMIME', true],
      [' BODY=8BITMIME', false],
      // a UTF-8 address as well: asked for once (nodemailer asks of itself then, and smtp-server
      // refuses a parameter given twice)
      [' SMTPUTF8', true],
    ] as const) {
      const id = parameters === ' SMTPUTF8' ? queuedId((await sendMail(offers.relay.smtpPort, { from: 'jörg@example.com', to: ['rcpt@example.com'], raw: Buffer.from(raw) })).response) : await submit(offers.relay.smtpPort, parameters);
      await offers.relay.delivery.runOnce();
      assert.equal(message(offers.relay, id).state, 'delivered', parameters);
      assert.equal(offers.upstream.accepted.at(-1)?.smtpUtf8, smtpUtf8, parameters);
      assert.equal((await call<{ smtputf8: boolean }>(offers.relay, `/admin/messages/${id}`)).body.smtputf8, smtpUtf8, 'the API shows the request');
    }
    const lacks = await setup({}, new ManualClock(), { hideSMTPUTF8: true });
    const id = await submit(lacks.relay.smtpPort, ' SMTPUTF8 BODY=8BITMIME');
    await lacks.relay.delivery.runOnce();
    assert.equal(message(lacks.relay, id).state, 'delivered');
    const [sent] = lacks.upstream.accepted;
    assert.equal(sent.smtpUtf8, false);
    assert.ok(sent.raw.toString('utf8').endsWith(raw), 'the header fields as the client wrote them');
  });

  test("a message larger than the upstream's SIZE fails with 5.3.4 and is not sent; a smaller one goes out", async () => {
    const { relay, upstream } = await setup({}, new ManualClock(), { size: 300 });
    const big = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'], raw: Buffer.from(`Subject: big\r\n\r\n${'x'.repeat(300)}\r\n`) })).response);
    await relay.delivery.runOnce();
    assert.equal(upstream.rcpts.length, 0, 'not one RCPT was sent');
    assert.equal(message(relay, big).state, 'failed');
    const size = message(relay, big).raw!.length;
    for (const r of recipients(relay, big)) {
      assert.equal(r.status, 'failed');
      assert.match(r.last_reply ?? '', new RegExp(`^5\\.3\\.4 message size ${size} exceeds the size limit 300 of 127\\.0\\.0\\.1:\\d+`));
    }
    // relayq's own refusal has no SMTP code to put in front of it
    assert.match(message(relay, big).last_error ?? '', new RegExp(`^b@example\\.com: 5\\.3\\.4 message size ${size} exceeds the size limit 300 of 127\\.0\\.0\\.1:\\d+$`));
    const small = queuedId((await sendMail(relay.smtpPort, { to: ['c@example.com'], raw: Buffer.from('Subject: s\r\n\r\nhi\r\n') })).response);
    await relay.delivery.runOnce();
    assert.equal(message(relay, small).state, 'delivered', 'the pooled connection is still good');
  });

  test("a message of exactly the upstream's SIZE goes out (the limit is the largest size allowed)", async () => {
    const upstream = await startUpstream({ size: 1 });
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port },
      { clock: new ManualClock(), startDelivery: false, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw: Buffer.from(`Subject: exact\r\n\r\n${'x'.repeat(300)}\r\n`) })).response);
    // read at EHLO, when delivery connects: the stored size, Received header included
    upstream.server.options.size = message(relay, id).raw!.length;
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'delivered', recipients(relay, id)[0].last_reply ?? '');
    assert.equal(upstream.received.length, 1);
  });

  test("an upstream SIZE below maxMessageSize and the Received: header is named once in a warning, with the maxMessageSize that fits", async () => {
    const limit = 100_000;
    let connections = 0;
    const upstream = await startUpstream({
      size: limit,
      onConnect(_session, cb) {
        connections++;
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    const warningsWith = async (maxMessageSize: number) => {
      const log = capturedLog('warn');
      const relay = await startTestRelay(
        { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, maxMessageSize, workerCount: 3 },
        { clock: new ManualClock(), startDelivery: false, random: NO_JITTER, logger: log.logger },
      );
      try {
        for (const to of ['a@example.com', 'b@example.com', 'c@example.com']) await sendMail(relay.smtpPort, { to: [to] });
        const before = connections;
        await relay.delivery.runOnce();
        assert.equal(upstream.received.length % 3, 0, 'every message went out');
        assert.ok(connections - before > 1, `the three messages went out on ${connections - before} connection(s)`);
        return log.entries().filter((e) => e.event === 'upstream.size_limit');
      } finally {
        await relay.stop();
      }
    };
    // the upstream takes every message this relay accepts
    assert.deepEqual(await warningsWith(limit - RECEIVED_HEADER_ROOM), []);
    // one that leaves less room than that: once, not once per connection
    const warnings = await warningsWith(limit - RECEIVED_HEADER_ROOM + 1);
    assert.equal(warnings.length, 1, JSON.stringify(warnings));
    assert.deepEqual(
      { ...warnings[0], upstream: '' },
      { ...warnings[0], upstream: '', sizeLimit: limit, maxMessageSize: limit - RECEIVED_HEADER_ROOM + 1, suggested: limit - RECEIVED_HEADER_ROOM },
    );
    assert.match(String(warnings[0].msg), /at most 100000 bytes \(SIZE\).*fails for good with 5\.3\.4; set maxMessageSize to at most 97952/);
    // a limit that no maxMessageSize fits under: no value the config would refuse is suggested
    upstream.server.options.size = 2000;
    const [tiny, ...more] = await warningsWith(limit);
    assert.deepEqual(more, []);
    assert.deepEqual([tiny.sizeLimit, tiny.suggested], [2000, null]);
    assert.match(String(tiny.msg), /; raise the upstream's limit: it leaves no room for the smallest maxMessageSize, 1024$/);
  });

  test('8-bit content goes out with BODY=8BITMIME, unchanged (7-bit content without it); logAllEmails=false erases it once delivered', async () => {
    const clock = new ManualClock();
    const { relay, upstream } = await setup({ security: { logAllEmails: false } }, clock);
    const raw = Buffer.concat([Buffer.from('Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n', 'latin1'), Buffer.from('Grüße aus Köln\r\n')]);
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw })).response);
    const stored = message(relay, id).raw!;
    await relay.delivery.runOnce();
    assert.equal(upstream.accepted.length, 1);
    assert.equal(upstream.accepted[0].bodyType, '8bitmime');
    assert.deepEqual(upstream.accepted[0].raw, stored);
    assert.equal(message(relay, id).state, 'delivered');
    assert.equal(message(relay, id).raw, null, 'content erased in the delivering transaction');
    queuedId((await sendMail(relay.smtpPort, { to: ['b@example.com'], raw: Buffer.from('Subject: plain\r\n\r\nascii only\r\n') })).response);
    await relay.delivery.runOnce();
    assert.equal(upstream.accepted.length, 2);
    assert.equal(upstream.accepted[1].bodyType, '7bit', 'no BODY=8BITMIME for a message of 7-bit bytes');
  });
});
