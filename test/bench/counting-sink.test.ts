// The benchmark's counting upstream must count what a real relay forwards, however the bytes are
// split into reads: the end-to-end figures are read from it.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, describe, test } from 'node:test';
import { sendMail, startTestRelay, waitFor } from '../helpers.js';
import { createCountingSink, newCounters, type SinkCounters } from './counting-sink.js';

async function listen(counters: SinkCounters): Promise<{ server: net.Server; port: number }> {
  const server = createCountingSink(counters);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, port: (server.address() as net.AddressInfo).port };
}

/** Writes `parts` one write at a time (each its own read at the sink), then reads until the server closes. */
async function converse(port: number, parts: string[]): Promise<string> {
  const socket = net.connect(port, '127.0.0.1');
  socket.setNoDelay(true);
  let received = '';
  socket.on('data', (d) => {
    received += d.toString('latin1');
  });
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  for (const part of parts) {
    await new Promise<void>((resolve) => socket.write(part, () => resolve()));
    await new Promise((r) => setTimeout(r, 5));
  }
  await closed;
  return received;
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

  test('finds the final dot however it is split between reads, pipelined or not', async () => {
    const counters = newCounters();
    const { server, port } = await listen(counters);
    cleanup.push(() => new Promise((r) => server.close(r)));

    const received = await converse(port, [
      'EHLO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n',
      'Subject: one\r\n\r\nbody\r',
      '\n.',
      '\r',
      '\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n.\r\nRSET\r\nMAIL FROM:<>\r\nDATA\r\nQUIT\r\n',
    ]);

    const codes = received.split('\r\n').filter(Boolean).map((line) => line.slice(0, 4));
    assert.deepEqual(codes, [
      '220 ',
      ...['250-', '250-', '250-', '250-', '250 '], // EHLO
      '250 ',
      '250 ',
      '354 ',
      '250 ',
      '250 ',
      '250 ',
      '250 ',
      '354 ',
      '250 ',
      '250 ',
      '250 ',
      '554 ',
      '221 ',
    ]);
    assert.equal(counters.messages, 2);
    assert.equal(counters.recipients, 3);
    // "Subject: one\r\n\r\nbody\r\n" and an empty message
    assert.equal(counters.bytes, 'Subject: one\r\n\r\nbody\r\n'.length);
  });
});
