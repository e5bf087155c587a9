// What the reliability tests share about SMTP sessions: a listener that hands sockets to a
// relay's SMTP server under an injected peer address (so "non-loopback" and "outsider" clients
// can be tested while all traffic stays on 127.0.0.1), and the check that a relay still serves a
// normal client after something hostile happened.
import assert from 'node:assert/strict';
import net from 'node:net';
import type { Relay } from '../../src/main.js';
import { messageCount, type SendOptions, sendMail } from '../helpers.js';

export interface PeerListener {
  port: number;
  close(): Promise<void>;
}

/**
 * A 127.0.0.1 listener whose connections reach `relay`'s SMTP server as if they came from
 * `remoteAddress`. smtp-server's `connect(socket, { remoteAddress })` is the same entry point its
 * PROXY-protocol support uses, so access control, AUTH and the Received header see that address.
 */
export async function listenAsPeer(relay: Relay, remoteAddress: string): Promise<PeerListener> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    relay.intake.server.connect(socket, { remoteAddress, remotePort: 40000 + sockets.size });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** The queue id of a `250 2.0.0 Ok: queued as <id>` reply, or undefined for any other reply. */
export function queuedId(reply: string): string | undefined {
  return /^250 2\.0\.0 Ok: queued as ([0-9A-F]{20})$/.exec(reply)?.[1];
}

/** A normal message from a new client still gets `250` and is stored exactly once. */
export async function assertStillServing(relay: Relay, options: SendOptions = {}): Promise<void> {
  const before = messageCount(relay);
  const info = await sendMail(relay.smtpPort, { subject: 'still serving', ...options });
  const id = queuedId(info.response);
  assert.ok(id, `expected 250 queued, got ${info.response}`);
  assert.equal(messageCount(relay), before + 1);
  const row = relay.store.sqlite.prepare('SELECT COUNT(*) AS n FROM messages WHERE id = ?').get(id) as { n: number };
  assert.equal(row.n, 1);
}

/** Resolves when the socket has been closed by the other side (or rejects after `ms`). */
export function closedByPeer(socket: net.Socket, ms = 5000): Promise<void> {
  if (socket.destroyed || socket.readableEnded) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('connection was not closed')), ms);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** Relay options for tests of intake alone: no delivery or retention writes in between. */
export const INTAKE_ONLY = { startDelivery: false, startRetention: false } as const;
