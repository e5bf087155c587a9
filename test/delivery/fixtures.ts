// Delivery test fixtures: a real smtp-server upstream on 127.0.0.1 whose replies a test can
// script (refuse an RCPT, refuse DATA, hold DATA without answering, go down and come back on
// the same port) and that records every transaction it accepted, byte for byte.
import fs from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';
import type { Relay } from '../../src/main.js';
import type { AttemptsTable, MessagesTable, RecipientsTable } from '../../src/store/schema.js';
import { closedPort } from '../helpers.js';

export interface Transaction {
  from: string;
  to: string[];
  raw: Buffer;
  /** Date.now() when the upstream had the whole message. */
  at: number;
  secure: boolean;
  user: string | undefined;
  bodyType: string;
  /** MAIL FROM carried SMTPUTF8. */
  smtpUtf8: boolean;
  /** The name relayq gave in its EHLO. */
  helo: string;
}

export interface Reply {
  code: number;
  message: string;
}

export interface ScriptedUpstream {
  port: number;
  /** Transactions the upstream accepted (answered 250 to DATA). */
  accepted: Transaction[];
  /** Transactions whose DATA got an error reply. */
  refused: Transaction[];
  /** Every RCPT TO the upstream saw, accepted or not, in order. */
  rcpts: string[];
  /** Reply to RCPT TO for an address (undefined = accept). Checked on every RCPT. */
  rcptReply: (address: string) => Reply | undefined;
  /** Reply to the end of DATA (undefined = accept). */
  dataReply: (t: Transaction) => Reply | undefined;
  /** True: DATA is read completely, recorded in `held`, and never answered (the client waits). */
  hold: (t: Transaction) => boolean;
  held: Transaction[];
  /** Errors of client connections the server reported (a TLS handshake a client cut short). */
  errors: Error[];
  /** Refuses connections: the port is closed (connection refused). */
  goDown(): Promise<void>;
  /** Listens on the same port again. */
  comeBack(): Promise<void>;
  /** Open client connections right now. */
  connections(): number;
  /** Says `421 Timeout - closing connection` on every open connection and closes it, as smtp-server's idle timeout does. */
  timeOutConnections(): void;
  close(): Promise<void>;
}

export async function startScriptedUpstream(options: Partial<SMTPServerOptions> = {}): Promise<ScriptedUpstream> {
  let server: SMTPServer;
  const upstream: ScriptedUpstream = {
    port: 0,
    accepted: [],
    refused: [],
    rcpts: [],
    rcptReply: () => undefined,
    dataReply: () => undefined,
    hold: () => false,
    held: [],
    errors: [],
    goDown: () => closeServer(server),
    comeBack: async () => {
      server = create();
      await listen(server, upstream.port);
    },
    close: () => closeServer(server),
    connections: () => server.connections.size,
    timeOutConnections: () => {
      for (const connection of server.connections) (connection as unknown as { send(code: number, text: string): void }).send(421, 'Timeout - closing connection');
    },
  };
  const create = () => {
    const created = new SMTPServer({
      authOptional: true,
      disabledCommands: ['STARTTLS'],
      logger: false,
      closeTimeout: 100,
      disableReverseLookup: true,
      onRcptTo(address, _session, cb) {
        upstream.rcpts.push(address.address);
        const reply = upstream.rcptReply(address.address);
        if (reply) return cb(Object.assign(new Error(reply.message), { responseCode: reply.code }));
        cb();
      },
      onData(stream, session: SMTPServerSession, cb) {
        const chunks: Buffer[] = [];
        stream.on('data', (c: Buffer) => chunks.push(c));
        stream.on('end', () => {
          const t: Transaction = {
            from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
            to: session.envelope.rcptTo.map((r) => r.address),
            raw: Buffer.concat(chunks),
            at: Date.now(),
            secure: session.secure,
            user: typeof session.user === 'string' ? session.user : undefined,
            bodyType: (session.envelope as { bodyType?: string }).bodyType ?? '',
            smtpUtf8: session.envelope.smtpUtf8 === true,
            helo: session.hostNameAppearsAs,
          };
          if (upstream.hold(t)) {
            upstream.held.push(t);
            return; // never answered: the client waits until it gives up or is killed
          }
          const reply = upstream.dataReply(t);
          if (reply) {
            upstream.refused.push(t);
            return cb(Object.assign(new Error(reply.message), { responseCode: reply.code }));
          }
          upstream.accepted.push(t);
          cb();
        });
      },
      ...options,
    });
    created.on('error', (err) => upstream.errors.push(err));
    return created;
  };
  // Not port 0: a port the system hands out for port 0 is free while the upstream is down, and
  // another test's listener could be given it meanwhile (the relay would then deliver to it, or
  // wait for its greeting). closedPort's ports lie below that range.
  for (;;) {
    server = create();
    try {
      upstream.port = await listen(server, await closedPort());
      return upstream;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE') throw err;
    }
  }
}

function listen(server: SMTPServer, port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    server.server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve((server.server.address() as net.AddressInfo).port));
  });
}

function closeServer(server: SMTPServer): Promise<void> {
  return new Promise((resolve) => {
    for (const connection of server.connections) connection.close();
    server.close(() => resolve());
  });
}

/** Rows as SQLite returns them (the schema's own types). */
export type MessageRow = MessagesTable & { raw: Buffer | null };
export type RecipientRow = RecipientsTable;
export type AttemptRow = AttemptsTable;

export function message(relay: Pick<Relay, 'store'>, id: string): MessageRow {
  return relay.store.sqlite
    .prepare('SELECT *, (SELECT raw FROM message_bodies WHERE id = body_id) AS raw FROM messages WHERE id = ?')
    .get(id) as MessageRow;
}

export function recipients(relay: Pick<Relay, 'store'>, id: string): RecipientRow[] {
  return relay.store.sqlite.prepare('SELECT * FROM recipients WHERE message_id = ? ORDER BY seq').all(id) as RecipientRow[];
}

export function attempts(relay: Pick<Relay, 'store'>, id: string): AttemptRow[] {
  return relay.store.sqlite.prepare('SELECT * FROM attempts WHERE message_id = ? ORDER BY id').all(id) as AttemptRow[];
}

/** The queue id from `250 2.0.0 Ok: queued as <id>`. */
export function queuedId(response: string): string {
  const m = /queued as (\S+)/.exec(response);
  if (!m) throw new Error(`not queued: ${response}`);
  return m[1];
}

export function addresses(n: number, domain = 'example.com'): string[] {
  return Array.from({ length: n }, (_, i) => `rcpt${String(i).padStart(2, '0')}@${domain}`);
}

export function readFailedExport(relay: Pick<Relay, 'config'>, id: string): Record<string, unknown> & {
  recipients: Array<{ address: string; status: string; attempts: number; lastCode: number | null; lastReply: string | null; temporary: boolean }>;
  raw: string;
} {
  return JSON.parse(fs.readFileSync(path.join(relay.config.emailsDir, 'failed', `${id}.json`), 'utf8'));
}

export function failedExportExists(relay: Pick<Relay, 'config'>, id: string): boolean {
  return fs.existsSync(path.join(relay.config.emailsDir, 'failed', `${id}.json`));
}

/** A fixed "random" for the backoff jitter: 0.5 means no jitter at all. */
export const NO_JITTER = () => 0.5;
