// The benchmark's counting upstream must count what a real relay forwards, however the bytes are
// split into reads: the end-to-end figures are read from it.
import assert from 'node:assert/strict';
import type net from 'node:net';
import { after, describe, test } from 'node:test';
import { sendMail, startTestRelay, waitFor } from '../helpers.js';
import { createCountingSink, newCounters, type SinkCounters, SinkSession, type SinkSocket } from './counting-sink.js';

async function listen(counters: SinkCounters): Promise<{ server: net.Server; port: number }> {
  const server = createCountingSink(counters);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, port: (server.address() as net.AddressInfo).port };
}

/** A session fed `parts` as separate reads, through a stand-in socket that records the replies. */
function feed(parts: Buffer[]): { replies: string; counters: SinkCounters; ended: number } {
  const counters = newCounters();
  let replies = '';
  let ended = 0;
  const socket = {
    setNoDelay: () => socket,
    on: () => socket,
    write: (data: string) => {
      replies += data;
      return true;
    },
    end: (data: string) => {
      replies += data;
      ended++;
      return socket;
    },
  } as unknown as SinkSocket;
  const session = new SinkSession(socket, counters);
  for (const part of parts) session.receive(part);
  return { replies, counters, ended };
}

describe('counting sink', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  test('counts the messages, recipients and bytes a relay forwards to it', async () => {
    const counters = newCounters();
    const { server, port } = await listen(counters);
    cleanup.push(() => new Promise((r) => server.close(r)));
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, batchDelay: 0 });
    cleanup.push(() => relay.stop());

    const raw = 'Subject: counted\r\n\r\n.a line that starts with a dot\r\n\r\n.\r\nlast\r\n';
    for (let i = 0; i < 3; i++) await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'], raw });
    await waitFor(() => counters.messages === 3, 10_000, 'three messages at the sink');

    assert.equal(counters.recipients, 6);
    // relayq adds a Received: line; the rest is the message, dot-stuffed as sent
    const stored = relay.store.sqlite.prepare('SELECT b.raw FROM messages m JOIN message_bodies b ON b.id = m.body_id').all() as Array<{ raw: Buffer }>;
    const stuffed = stored.reduce((sum, { raw: bytes }) => sum + bytes.toString('latin1').replace(/^\./gm, '..').length, 0);
    assert.equal(counters.bytes, stuffed);
    assert.ok(counters.connections >= 1);
  });

  test('finds every command and final dot however the bytes are split between reads', () => {
    const body = '.a stuffed first line\r\n..\r\n\r\nbody\r\n';
    const session = Buffer.from(
      'EHLO client\r\nMAIL FROM:<a@example.com> SIZE=100\r\nRCPT TO:<b@example.com>\r\nDATA\r\n' +
        `${body}.\r\n` +
        'MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n.\r\n' +
        'RSET\r\nMAIL FROM:<>\r\nDATA\r\nQUIT\r\n',
    );
    const expected = feed([session]);
    const codes = expected.replies.split('\r\n').filter(Boolean).map((line) => line.slice(0, 4));
    assert.deepEqual(codes, [
      '220 ',
      ...['250-', '250-', '250-', '250-', '250 '], // EHLO
      ...['250 ', '250 ', '354 ', '250 '], // the first message
      ...['250 ', '250 ', '250 ', '354 ', '250 '], // an empty one to two recipients
      ...['250 ', '250 ', '554 ', '221 '], // RSET, DATA without a recipient, QUIT
    ]);
    assert.deepEqual(
      { messages: expected.counters.messages, recipients: expected.counters.recipients, bytes: expected.counters.bytes, ended: expected.ended },
      { messages: 2, recipients: 3, bytes: body.length, ended: 1 },
    );

    const same = (parts: Buffer[], how: string) => {
      const got = feed(parts);
      assert.equal(got.replies, expected.replies, how);
      assert.equal(got.counters.messages, 2, how);
      assert.equal(got.counters.recipients, 3, how);
      assert.equal(got.counters.bytes, body.length, how);
      assert.equal(got.ended, 1, how);
    };
    same([...session].map((byte) => Buffer.from([byte])), 'one byte per read');
    for (let i = 1; i < session.length; i++) {
      for (let j = i + 1; j <= session.length; j++) {
        same([session.subarray(0, i), session.subarray(i, j), session.subarray(j)], `split at ${i} and ${j}`);
      }
    }
  });
});
