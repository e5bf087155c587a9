// What the reliability tests share about SMTP sessions: a listener that hands sockets to a
// relay's SMTP server under an injected peer address (so "non-loopback" and "outsider" clients
// can be tested while all traffic stays on 127.0.0.1), and the check that a relay still serves a
// normal client after something hostile happened.
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
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

/**
 * A raw SMTP dialog over any socket that can be upgraded to TLS after STARTTLS (the shared
 * SmtpClient stays on its plain socket).
 */
export class SmtpDialog {
  private buffer = '';
  private replies: string[] = [];
  private waiters: Array<(reply: string) => void> = [];

  constructor(private socket: net.Socket | tls.TLSSocket) {
    this.attach(socket);
  }

  private attach(socket: net.Socket | tls.TLSSocket) {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => {
      this.buffer += d;
      let m: RegExpExecArray | null;
      while ((m = /^((?:\d{3}-[^\n]*\n)*\d{3}(?: [^\n]*)?\r?\n)/.exec(this.buffer))) {
        this.buffer = this.buffer.slice(m[1].length);
        const reply = m[1].trimEnd();
        const w = this.waiters.shift();
        if (w) w(reply);
        else this.replies.push(reply);
      }
    });
    socket.on('close', () => {
      for (const w of this.waiters.splice(0)) w('');
    });
    socket.on('error', () => {});
  }

  read(timeoutMs = 5000): Promise<string> {
    const ready = this.replies.shift();
    if (ready !== undefined) return Promise.resolve(ready);
    if (this.socket.destroyed) return Promise.resolve('');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no SMTP reply within timeout')), timeoutMs);
      this.waiters.push((r) => {
        clearTimeout(timer);
        resolve(r);
      });
    });
  }

  send(line: string): Promise<string> {
    this.socket.write(`${line}\r\n`);
    return this.read();
  }

  /** STARTTLS, then the TLS handshake on the same connection (any certificate is accepted). */
  async startTls(): Promise<string> {
    const reply = await this.send('STARTTLS');
    if (!reply.startsWith('220')) return reply;
    const plain = this.socket;
    plain.removeAllListeners('data');
    const secure = tls.connect({ socket: plain, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    this.socket = secure;
    this.attach(secure);
    return reply;
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Relay options for tests of intake alone: no delivery or retention writes in between. */
export const INTAKE_ONLY = { startDelivery: false, startRetention: false } as const;
