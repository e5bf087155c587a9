// An upstream that answers a command of a pipelined burst with a refusal and closes the
// connection at once (RFC 5321 §3.8 for a 421; Haraka's DENYDISCONNECT, as its rcpt_to.max_count
// uses it, for a 5xx): its replies all arrive before the close, and each must count as given.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, describe, test } from 'node:test';
import { ManualClock } from '../manual-clock.js';
import { sendMail, startTestRelay } from '../helpers.js';
import { attempts, queuedId, recipients } from './fixtures.js';

type Refusal = { command: 'DATA' | 'RCPT3'; reply: string };

/** Pipelining upstream: every reply of a burst in one write; the refusal, then the close. */
async function closingUpstream(refusal: Refusal) {
  const server = net.createServer((socket) => {
    socket.on('error', () => {});
    socket.write('220 up.test ESMTP\r\n');
    let buffer = '';
    let rcpts = 0;
    socket.on('data', (chunk) => {
      buffer += chunk.toString('latin1');
      const replies: string[] = [];
      let closing = false;
      for (let eol = buffer.indexOf('\r\n'); !closing && eol >= 0; eol = buffer.indexOf('\r\n')) {
        const verb = buffer.slice(0, 4).toUpperCase();
        buffer = buffer.slice(eol + 2);
        if (verb === 'RCPT') rcpts++;
        closing = (verb === 'DATA' && refusal.command === 'DATA') || (verb === 'RCPT' && rcpts === 3 && refusal.command === 'RCPT3');
        if (closing) replies.push(refusal.reply);
        else replies.push(verb === 'EHLO' ? '250-up.test\r\n250-PIPELINING\r\n250 8BITMIME' : verb === 'QUIT' ? '221 bye' : '250 ok');
      }
      if (replies.length > 0) socket.write(`${replies.join('\r\n')}\r\n`);
      if (closing) socket.end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return { port: (server.address() as net.AddressInfo).port, close: () => new Promise<void>((r) => server.close(() => r())) };
}

describe('an upstream that refuses within a pipelined burst and closes at once', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  async function attempt(refusal: Refusal) {
    const upstream = await closingUpstream(refusal);
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchDelay: 0, failedRetryInterval: 0 },
      { clock: new ManualClock(Date.UTC(2026, 0, 1)), startDelivery: false, startRetention: false },
    );
    cleanup.push(() => relay.stop());
    const info = await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com', 'c@example.com'], subject: 's', text: 'x' });
    const id = queuedId(info.response);
    await relay.delivery.runOnce();
    return { attempt: attempts(relay, id)[0], recipients: recipients(relay, id) };
  }

  for (const refusal of [
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

  test('a 550 to the third RCPT: that recipient fails for good, the two accepted are deferred', async () => {
    const result = await attempt({ command: 'RCPT3', reply: '550 5.7.1 up.test recipient refused, disconnecting' });
    const [a, b, c] = result.recipients;
    assert.deepEqual([c.status, c.last_code, c.temporary], ['failed', 550, 0], String(c.last_reply));
    assert.match(String(c.last_reply), /recipient refused/);
    assert.deepEqual([a.status, b.status], ['pending', 'pending']);
  });
});
