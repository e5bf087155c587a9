// The load generator: SMTP clients on raw sockets (TCP_NODELAY, PIPELINING for the envelope),
// either one persistent connection per client or a new connection for every message. It records
// the time from the final dot to the server's reply for every message, so the intake figures
// measure the server, not a client library.
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { percentile } from './statistics.js';

export type ConnectionMode = 'persistent' | 'per-message';

export interface LoadPlan {
  port: number;
  mode: ConnectionMode;
  clients: number;
  /** The message as sent after DATA, without the terminating dot. */
  body: Buffer;
  /** Stop after this many messages in total ... */
  messages?: number;
  /** ... or when this much time has passed (whichever comes first). */
  durationMs?: number;
  /** Sender of client i; defaults to bench<i>@example.com. */
  sender?: (client: number) => string;
  recipient?: string;
  /** Called with each accepted message's queue reply, e.g. to count progress. */
  onAccepted?: () => void;
}

export interface LoadResult {
  mode: ConnectionMode;
  clients: number;
  bodyBytes: number;
  accepted: number;
  /** Non-2xx final replies, by code. */
  refused: Record<string, number>;
  /** Connections that broke (reset, timeout, closed by the server). */
  connectionErrors: number;
  elapsedMs: number;
  acceptedPerSecond: number;
  /** Final dot sent → 250, milliseconds. */
  latency: { p50: number; p99: number; max: number };
  /** performance.now() when the first client started and when the last reply came. */
  startedAt: number;
  finishedAt: number;
}

interface Reply {
  code: number;
  text: string;
}

const REPLY_TIMEOUT_MS = 60_000;

/** One SMTP connection whose replies are matched, in order, to the commands written. */
class SmtpConnection {
  private buffer = '';
  private lines: string[] = [];
  private readonly waiters: Array<(reply: Reply) => void> = [];
  private failure: Error | undefined;

  private constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.setEncoding('latin1');
    socket.setTimeout(REPLY_TIMEOUT_MS, () => socket.destroy(new Error('reply timeout')));
    socket.on('data', (data: string) => this.onData(data));
    socket.on('error', (err) => this.fail(err));
    socket.on('close', () => this.fail(new Error('connection closed')));
  }

  static open(port: number): Promise<SmtpConnection> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ port, host: '127.0.0.1' });
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new SmtpConnection(socket));
      });
      socket.once('error', reject);
    });
  }

  private onData(data: string) {
    this.buffer += data;
    let nl = this.buffer.indexOf('\n');
    while (nl !== -1) {
      const line = this.buffer.slice(0, nl).replace(/\r$/, '');
      this.buffer = this.buffer.slice(nl + 1);
      this.lines.push(line);
      // "250-..." continues a reply, "250 ..." (or a bare "250") ends it
      if (line.length < 4 || line[3] !== '-') {
        const reply = { code: Number(line.slice(0, 3)), text: this.lines.join('\n') };
        this.lines = [];
        this.waiters.shift()?.(reply);
      }
      nl = this.buffer.indexOf('\n');
    }
  }

  private fail(err: Error) {
    if (this.failure) return;
    this.failure = err;
    for (const w of this.waiters.splice(0)) w({ code: 0, text: err.message });
  }

  /** The next reply; code 0 when the connection broke first. */
  reply(): Promise<Reply> {
    if (this.failure) return Promise.resolve({ code: 0, text: this.failure.message });
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  write(data: string | Buffer, written?: () => void): void {
    this.socket.write(data, written);
  }

  get broken(): boolean {
    return this.failure !== undefined;
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Greeting and EHLO; undefined when the server refused or the connection broke. */
async function openSession(port: number): Promise<SmtpConnection | undefined> {
  let conn: SmtpConnection;
  try {
    conn = await SmtpConnection.open(port);
  } catch {
    return undefined;
  }
  const greeting = await conn.reply();
  if (greeting.code !== 220) {
    conn.close();
    return undefined;
  }
  const ehlo = conn.reply();
  conn.write('EHLO bench.example\r\n');
  if ((await ehlo).code !== 250) {
    conn.close();
    return undefined;
  }
  return conn;
}

type Outcome = { kind: 'accepted'; latencyMs: number } | { kind: 'refused'; code: number } | { kind: 'broken' };

const TERMINATOR = Buffer.from('\r\n.\r\n');

/** One transaction: MAIL, RCPT and DATA pipelined in one write, then the body and the dot. */
async function sendMessage(conn: SmtpConnection, from: string, to: string, body: Buffer): Promise<Outcome> {
  const envelope = [conn.reply(), conn.reply(), conn.reply()];
  conn.write(`MAIL FROM:<${from}>\r\nRCPT TO:<${to}>\r\nDATA\r\n`);
  const [mail, rcpt, data] = await Promise.all(envelope);
  if (mail.code === 0 || rcpt.code === 0 || data.code === 0) return { kind: 'broken' };
  if (data.code !== 354) {
    const code = mail.code !== 250 ? mail.code : rcpt.code !== 250 ? rcpt.code : data.code;
    return { kind: 'refused', code };
  }
  const final = conn.reply();
  conn.write(body);
  const calledAt = performance.now();
  let dotSentAt: number | undefined;
  // the callback runs once the dot has left for the kernel, i.e. after the body did
  conn.write(TERMINATOR, () => {
    dotSentAt = performance.now();
  });
  const reply = await final;
  const repliedAt = performance.now();
  if (reply.code === 0) return { kind: 'broken' };
  if (reply.code !== 250) return { kind: 'refused', code: reply.code };
  return { kind: 'accepted', latencyMs: repliedAt - (dotSentAt ?? calledAt) };
}

/** Runs the plan to completion and summarises it. */
export async function runLoad(plan: LoadPlan): Promise<LoadResult> {
  const startedAt = performance.now();
  const deadline = plan.durationMs === undefined ? Number.POSITIVE_INFINITY : startedAt + plan.durationMs;
  let tickets = plan.messages ?? Number.POSITIVE_INFINITY;
  const takeTicket = () => {
    if (tickets <= 0 || performance.now() >= deadline) return false;
    tickets--;
    return true;
  };
  const latencies: number[] = [];
  const refused: Record<string, number> = {};
  let connectionErrors = 0;
  let finishedAt = startedAt;
  const recipient = plan.recipient ?? 'rcpt@example.net';

  const record = (outcome: Outcome) => {
    if (outcome.kind === 'accepted') {
      latencies.push(outcome.latencyMs);
      finishedAt = performance.now();
      plan.onAccepted?.();
    } else if (outcome.kind === 'refused') {
      refused[outcome.code] = (refused[outcome.code] ?? 0) + 1;
    } else {
      connectionErrors++;
    }
  };

  const client = async (index: number) => {
    const from = plan.sender ? plan.sender(index) : `bench${index}@example.com`;
    if (plan.mode === 'per-message') {
      while (takeTicket()) {
        const conn = await openSession(plan.port);
        if (!conn) {
          connectionErrors++;
          continue;
        }
        record(await sendMessage(conn, from, recipient, plan.body));
        // like a client that sends one message per connection: QUIT and go
        conn.write('QUIT\r\n');
        conn.socket.end();
      }
      return;
    }
    let conn: SmtpConnection | undefined;
    while (takeTicket()) {
      if (!conn || conn.broken) {
        conn = await openSession(plan.port);
        if (!conn) {
          connectionErrors++;
          continue;
        }
      }
      const outcome = await sendMessage(conn, from, recipient, plan.body);
      record(outcome);
      if (outcome.kind === 'refused') {
        // a refused transaction leaves the session usable; reset it
        const rset = conn.reply();
        conn.write('RSET\r\n');
        await rset;
      }
    }
    if (conn && !conn.broken) {
      conn.write('QUIT\r\n');
      conn.socket.end();
    }
  };

  await Promise.all(Array.from({ length: plan.clients }, (_, i) => client(i)));
  const sorted = Float64Array.from(latencies).sort();
  const elapsedMs = Math.max(1, finishedAt - startedAt);
  return {
    mode: plan.mode,
    clients: plan.clients,
    bodyBytes: plan.body.length,
    accepted: latencies.length,
    refused,
    connectionErrors,
    elapsedMs,
    acceptedPerSecond: (latencies.length * 1000) / elapsedMs,
    latency: { p50: percentile(sorted, 50), p99: percentile(sorted, 99), max: percentile(sorted, 100) },
    startedAt,
    finishedAt,
  };
}

/**
 * A plain-text message of about `bytes` bytes: a few headers and 76-character lines, CRLF line
 * endings, no line starting with a dot (so no dot-stuffing is needed).
 */
export function messageBody(bytes: number, subject = 'relayq benchmark'): Buffer {
  const head = `From: Bench <bench@example.com>\r\nTo: <rcpt@example.net>\r\nSubject: ${subject}\r\nMessage-ID: <bench-${bytes}@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n`;
  const line = `${'The quick brown fox jumps over the lazy dog 0123456789 '.repeat(2).slice(0, 76)}\r\n`;
  let text = head;
  while (text.length + line.length <= bytes) text += line;
  text += 'x'.repeat(Math.max(0, bytes - text.length));
  return Buffer.from(text, 'latin1');
}
