// An SMTP server that stores nothing: it drains DATA and answers 250. Run as its own process
// (forked by the benchmark, IPC channel for its counters) in one of three roles:
//   - `--listener relayq`, the store-nothing ceiling: what smtp-server itself can accept on this
//     machine, with relayq's listener class (no greeting pause) and the options relayq uses (no
//     AUTH required, no reverse lookup);
//   - `--listener stock`: smtp-server as shipped (100 ms pause before every greeting);
//   - `--listener counting`: the upstream that relayq forwards to, on raw sockets
//     (counting-sink.ts), so that it takes little of the CPU the relay is measured on.
import type net from 'node:net';
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';
import { type RelayqListenerOptions, RelayqSmtpServer } from '../../src/smtp/server.js';
import { createCountingSink, newCounters, type SinkCounters } from './counting-sink.js';

export type SinkListener = 'stock' | 'relayq' | 'counting';

export type SinkRequest = { type: 'stats' };
export type SinkMessage =
  | { type: 'listening'; port: number }
  | ({ type: 'stats' } & SinkCounters);

function argument(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const listener = argument('listener', 'stock') as SinkListener;
const port = Number(argument('port', '0'));

const stats = newCounters();

const options: SMTPServerOptions = {
  name: 'sink.bench',
  banner: 'sink',
  authOptional: true,
  disableReverseLookup: true,
  // a plain-text local upstream, so relayq's delivery does not negotiate TLS with it
  hideSTARTTLS: true,
  hideDSN: true,
  size: 64 * 1024 * 1024,
  maxClients: 10_000,
  logger: false,
  onConnect(_session, cb) {
    stats.connections++;
    cb();
  },
  onData(stream, session, cb) {
    let bytes = 0;
    stream.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
    });
    stream.on('end', () => {
      const now = Date.now();
      if (stats.messages === 0) stats.firstAt = now;
      stats.lastAt = now;
      stats.messages++;
      stats.recipients += session.envelope.rcptTo.length;
      stats.bytes += bytes;
      cb(null, 'Ok: stored nothing');
    });
  },
};

/** relayq's listener with no policy of its own: every session may AUTH, nothing is refused. */
const EVERY_SESSION: RelayqListenerOptions = { plaintextAuth: () => true, onRefusal: () => {}, onSizeRefused: () => {}, onConnectionLimit: () => {}, authEnabled: true };

function smtpServer(): net.Server {
  const server = listener === 'relayq' ? new RelayqSmtpServer(options, EVERY_SESSION) : new SMTPServer(options);
  server.on('error', () => {
    // client resets during the benchmark are expected
  });
  return server.server;
}

const server = listener === 'counting' ? createCountingSink(stats) : smtpServer();
server.listen(port, '127.0.0.1', () => {
  const address = server.address() as net.AddressInfo;
  process.send?.({ type: 'listening', port: address.port } satisfies SinkMessage);
});

process.on('message', (request: SinkRequest) => {
  if (request.type === 'stats') process.send?.({ type: 'stats', ...stats } satisfies SinkMessage);
});
process.on('disconnect', () => process.exit(0));
process.on('SIGTERM', () => process.exit(0));
