// An upstream that answers a command of a pipelined burst with a refusal and closes the
// connection at once (RFC 5321 §3.8 for a 421; Haraka's DENYDISCONNECT, as its rcpt_to.max_count
// uses it, for a 5xx): its replies all arrive before the close, and each must count as given.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, describe, test } from 'node:test';
import { ManualClock } from '../manual-clock.js';
import { sendMail, startTestRelay } from '../helpers.js';
import { attempts, queuedId, recipients } from './fixtures.js';

type Refusal = {
  command: 'MAIL' | 'RCPT1' | 'RCPT3' | 'DATA';
  reply: string;
  /** Only in the transaction with this recipient (default: every one). */
  to?: string;
  /** The reply to the other RCPTs of that transaction (default `250 ok`). */
  otherRcpts?: string;
};

/**
 * Pipelining upstream: every reply of a burst in one write; in the transaction to `refusal.to`
 * (every one without it), the refusal, then the close. Counts its connections and transactions.
 */
async function closingUpstream(refusal: Refusal) {
  const seen = { connections: 0, transactions: 0 };
  const server = net.createServer((socket) => {
    socket.on('error', () => {});
    socket.write('220 up.test ESMTP\r\n');
    seen.connections++;
    let buffer = '';
    let rcpts = 0;
    let refusing = false;
    let inData = false;
    socket.on('data', (chunk) => {
      buffer += chunk.toString('latin1');
      const replies: string[] = [];
      let closing = false;
      for (let eol = buffer.indexOf('\r\n'); !closing && eol >= 0; eol = buffer.indexOf('\r\n')) {
        const line = buffer.slice(0, eol);
        const verb = line.slice(0, 4).toUpperCase();
        buffer = buffer.slice(eol + 2);
        if (inData) {
          inData = line !== '.';
          if (!inData) replies.push('250 2.0.0 queued');
          continue;
        }
        if (verb === 'MAIL') {
          seen.transactions++;
          rcpts = 0;
          refusing = !refusal.to;
        }
        if (verb === 'RCPT') {
          rcpts++;
          refusing ||= line.includes(`<${refusal.to}>`);
        }
        closing = refusing && refusal.command === (verb === 'RCPT' ? `RCPT${rcpts}` : verb);
        inData = !closing && verb === 'DATA';
        if (closing) replies.push(refusal.reply);
        else if (verb === 'RCPT' && refusing && refusal.otherRcpts) replies.push(refusal.otherRcpts);
        else replies.push(verb === 'EHLO' ? '250-up.test\r\n250-PIPELINING\r\n250 8BITMIME' : verb === 'QUIT' ? '221 bye' : inData ? '354 go ahead' : '250 ok');
      }
      if (replies.length > 0) socket.write(`${replies.join('\r\n')}\r\n`);
      if (closing) socket.end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return { port: (server.address() as net.AddressInfo).port, seen, close: () => new Promise<void>((r) => server.close(() => r())) };
}

describe('an upstream that refuses within a pipelined burst and closes at once', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  /** The attempt of a message to a, b and c; `after`: on a connection that delivered a message to it first. */
  async function attempt(refusal: Refusal, after?: string) {
    const upstream = await closingUpstream(refusal);
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchDelay: 0, failedRetryInterval: 0, workerCount: 1 },
      { clock: new ManualClock(Date.UTC(2026, 0, 1)), startDelivery: false, startRetention: false },
    );
    cleanup.push(() => relay.stop());
    if (after) {
      await sendMail(relay.smtpPort, { to: [after], subject: 'first', text: 'x' });
      await relay.delivery.runOnce();
    }
    const info = await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com', 'c@example.com'], subject: 's', text: 'x' });
    const id = queuedId(info.response);
    await relay.delivery.runOnce();
    return { attempt: attempts(relay, id)[0], recipients: recipients(relay, id), seen: upstream.seen };
  }

  for (const refusal of [
    { command: 'MAIL', reply: '421 4.7.0 up.test too many sessions, closing connection' },
    { command: 'DATA', reply: '421 4.3.2 up.test shutting down' },
    { command: 'RCPT3', reply: '421 4.7.0 up.test rate limited, closing connection' },
  ] as const) {
    test(`a 421 to ${refusal.command}: the attempt is deferred with the 421 and its text`, async () => {
      const result = await attempt(refusal);
      assert.deepEqual([result.attempt.outcome, result.attempt.code], ['deferred', 421], String(result.attempt.reply));
      assert.match(String(result.attempt.reply), /up\.test/);
      assert.deepEqual(
        result.recipients.map((r) => [r.status, r.last_code]),
        [
          ['pending', 421],
          ['pending', 421],
          ['pending', 421],
        ],
      );
    });
  }

  test('a 550 to MAIL FROM: the batch fails for good with it', async () => {
    const result = await attempt({ command: 'MAIL', reply: '550 5.7.1 up.test sender refused, disconnecting' });
    assert.deepEqual([result.attempt.outcome, result.attempt.code], ['failed', 550], String(result.attempt.reply));
    assert.match(String(result.attempt.reply), /sender refused/);
    assert.deepEqual(
      result.recipients.map((r) => [r.status, r.last_code, r.temporary]),
      [
        ['failed', 550, 0],
        ['failed', 550, 0],
        ['failed', 550, 0],
      ],
    );
  });

  test('every RCPT refused, then the close: the batch fails with the refusals, the attempt with the last of them', async () => {
    const result = await attempt({ command: 'RCPT3', reply: '550 5.7.1 up.test c refused, disconnecting', otherRcpts: '550 5.1.1 up.test no such user' });
    assert.deepEqual([result.attempt.outcome, result.attempt.code], ['failed', 550]);
    assert.match(String(result.attempt.reply), /c refused/);
    assert.deepEqual(
      result.recipients.map((r) => [r.status, r.last_code, r.temporary]),
      [
        ['failed', 550, 0],
        ['failed', 550, 0],
        ['failed', 550, 0],
      ],
    );
  });

  test('a 550 to the first RCPT: that recipient fails for good, the two the upstream did not answer are deferred', async () => {
    const result = await attempt({ command: 'RCPT1', reply: '550 5.7.1 up.test recipient refused, disconnecting' });
    const [a, b, c] = result.recipients;
    assert.deepEqual([a.status, a.last_code, a.temporary], ['failed', 550, 0], String(a.last_reply));
    assert.match(String(a.last_reply), /recipient refused/);
    assert.deepEqual([b.status, c.status], ['pending', 'pending']);
  });

  test('on a reused connection, a 550 to the third RCPT and the close: not sent again at once on another connection', async () => {
    // the upstream answered this transaction's recipients: no connection that had ended while it
    // waited in the pool (that one's transaction goes out at once on a new connection)
    const result = await attempt({ command: 'RCPT3', reply: '550 5.7.1 up.test recipient refused, disconnecting', to: 'a@example.com' }, 'first@example.com');
    const [a, b, c] = result.recipients;
    assert.deepEqual([a.status, b.status, c.status, c.last_code], ['pending', 'pending', 'failed', 550]);
    assert.deepEqual(result.seen, { connections: 1, transactions: 2 });
  });

  test('a 550 to the third RCPT: that recipient fails for good, the two accepted are deferred', async () => {
    const result = await attempt({ command: 'RCPT3', reply: '550 5.7.1 up.test recipient refused, disconnecting' });
    const [a, b, c] = result.recipients;
    assert.deepEqual([c.status, c.last_code, c.temporary], ['failed', 550, 0], String(c.last_reply));
    assert.match(String(c.last_reply), /recipient refused/);
    assert.deepEqual([a.status, b.status], ['pending', 'pending']);
  });
});
