// Shared test fixtures: a temp dir per test, a relay on port 0 with a fresh SQLite file, a raw
// SMTP client for exact reply checks, nodemailer senders and a recording upstream smtp-server.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import type { TestContext } from 'node:test';
import tls from 'node:tls';
import nodemailer from 'nodemailer';
import pino from 'pino';
import { SMTPServer, type SMTPServerOptions, type SMTPServerSession } from 'smtp-server';
import type { Clock } from '../src/clock.js';
import { defaultConfig, type Config } from '../src/config/schema.js';
import { type Relay, type RelayOptions, startRelay } from '../src/main.js';
import { backupDatabase } from '../src/store/backup.js';
import { BUSY_TIMEOUT_MS, openConnection, type Sqlite } from '../src/store/db.js';
import { openReadOnly } from '../src/store/maintenance.js';
import { MIGRATION_NAMES, type MigrationName } from '../migrations/names.js';
import { type IntakePolicy, insertMessage, type NewMessage } from '../src/store/intake.js';

/** Absolute paths, so child processes work from any working directory. */
export const REPO_ROOT = path.resolve(import.meta.dirname, '..');
const BUILT_CLI = path.join(REPO_ROOT, 'dist', 'src', 'cli', 'index.js');

/**
 * argv for running the relayq CLI in a child process: spawn(process.execPath, cliArgs(...)).
 * It runs the build, as an operator does (`npm test` builds first; each process would take twice
 * as long to start from the sources through tsx). A build older than a source is refused, not tested.
 */
export function cliArgs(...args: string[]): string[] {
  if (!buildChecked) requireCurrentBuild();
  buildChecked = true;
  return [BUILT_CLI, ...args];
}

let buildChecked = false;

function requireCurrentBuild(): void {
  const built = fs.statSync(BUILT_CLI, { throwIfNoEntry: false })?.mtimeMs ?? 0;
  const stale = ['src', 'migrations']
    .flatMap((dir) => fs.readdirSync(path.join(REPO_ROOT, dir), { recursive: true }).map((f) => path.join(dir, String(f))))
    // (an editor's lock file may be a link to nowhere)
    .find((f) => f.endsWith('.ts') && (fs.statSync(path.join(REPO_ROOT, f), { throwIfNoEntry: false })?.mtimeMs ?? 0) > built);
  if (stale !== undefined) throw new Error(`the CLI tests run the build, and ${built === 0 ? 'there is none' : `${stale} is newer than it`}: run npm run build (npm test does)`);
}

/** No rate limit and no queue size: a policy that refuses no insert. */
export const NO_LIMITS: IntakePolicy = { rateLimits: { enabled: false, maxPerHour: 0, maxPerDay: 0, globalMaxPerHour: 0, globalMaxPerDay: 0 }, queueSize: 0 };

/** A message as intake hands it to insertMessage; what a test does not name is a plain default. */
export function newMessage(fields: Pick<NewMessage, 'id' | 'raw' | 'receivedAt'> & Partial<NewMessage>): NewMessage {
  return { mailFrom: 'a@example.com', recipients: ['b@example.net'], authUser: null, clientIp: '127.0.0.1', helo: 'client.test', smtpUtf8: false, ...fields };
}

const tempDirs: string[] = [];

/**
 * A fresh directory under the OS temp dir, removed when this test process exits (each test file
 * runs in a process of its own), together with every database, spool and export written there.
 */
export function tempDir(prefix = 'relayq-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  if (tempDirs.push(dir) === 1) {
    process.once('exit', () => {
      for (const d of tempDirs) {
        try {
          fs.rmSync(d, { recursive: true, force: true });
        } catch {
          // e.g. a directory a test left unreadable: leaving it is no reason to fail the run
        }
      }
    });
  }
  return dir;
}

export type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? (T[K] extends unknown[] ? T[K] : DeepPartial<T[K]>) : T[K] };

function merge<T>(base: T, over: DeepPartial<T> | undefined): T {
  if (!over) return base;
  const out = { ...base } as Record<string, unknown>;
  for (const [k, v] of Object.entries(over)) {
    const b = (base as Record<string, unknown>)[k];
    out[k] = v && typeof v === 'object' && !Array.isArray(v) && b && typeof b === 'object' ? merge(b, v as never) : v;
  }
  return out as T;
}

/** Built-in defaults, on port 0, with files in a fresh temp dir and logging silenced. */
export function testConfig(overrides?: DeepPartial<Config>, dir = tempDir()): Config {
  const base = defaultConfig();
  return merge(
    {
      ...base,
      smtpPort: 0,
      healthCheckPort: 0,
      databasePath: path.join(dir, 'data', 'relayq.db'),
      emailsDir: path.join(dir, 'emails'),
      minFreeDiskMb: 0,
      logLevel: 'silent',
      serverName: 'relayq.test',
    },
    overrides,
  );
}

/**
 * A pino logger at `level` whose lines are kept: `lines` as written, `entries()` parsed. `make`
 * builds the logger on the capturing stream (a plain pino logger, or e.g. relayq's createLogger).
 */
export function capturedLog(
  level = 'info',
  make: (level: string, destination: Writable) => pino.Logger = (l, destination) => pino({ level: l }, destination),
): { logger: pino.Logger; lines: string[]; entries(): Array<Record<string, unknown>> } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      lines.push(...String(chunk).trim().split('\n'));
      cb();
    },
  });
  return { logger: make(level, sink), lines, entries: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

export async function startTestRelay(overrides?: DeepPartial<Config>, options: RelayOptions & { clock?: Clock } = {}): Promise<Relay> {
  const config = testConfig(overrides);
  return startRelay(config, { logger: pino({ level: 'silent' }), shutdownGraceMs: 2000, ...options });
}

/** Runs `fn` on a test relay started for it, and stops the relay afterwards, whatever happens. */
export async function withTestRelay<T>(
  overrides: DeepPartial<Config>,
  options: RelayOptions & { clock?: Clock },
  fn: (relay: Relay) => Promise<T>,
): Promise<T> {
  const relay = await startTestRelay(overrides, options);
  try {
    return await fn(relay);
  } finally {
    await relay.stop();
  }
}

export interface SendOptions {
  from?: string;
  to?: string[];
  subject?: string;
  text?: string;
  raw?: string | Buffer;
  auth?: { user: string; pass: string };
}

export async function sendMail(port: number, options: SendOptions = {}) {
  const transport = nodemailer.createTransport({
    host: '127.0.0.1',
    port,
    secure: false,
    ignoreTLS: true,
    auth: options.auth,
  });
  try {
    const envelope = { from: options.from ?? 'sender@example.com', to: options.to ?? ['rcpt@example.com'] };
    return await transport.sendMail(
      options.raw
        ? { envelope, raw: options.raw }
        : { ...envelope, subject: options.subject ?? 'test', text: options.text ?? 'hello' },
    );
  } finally {
    transport.close();
  }
}

/** A raw SMTP client: every `send` resolves with the complete reply (all lines). */
export class SmtpClient {
  private buffer = '';
  private waiters: Array<(reply: string) => void> = [];
  private replies: string[] = [];
  closed = false;

  /** Wraps a connected socket (SmtpClient.connect opens one). */
  constructor(public socket: net.Socket | tls.TLSSocket) {
    this.attach(socket);
  }

  private attach(socket: net.Socket | tls.TLSSocket) {
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => this.onData(d));
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w('');
    });
    socket.on('error', () => {});
  }

  /** STARTTLS, then the TLS handshake on the same connection (any certificate is accepted). */
  async startTls(): Promise<string> {
    const reply = await this.send('STARTTLS');
    if (!reply.startsWith('220')) return reply;
    const plain = this.socket;
    plain.removeAllListeners('data');
    plain.removeAllListeners('close');
    const secure = tls.connect({ socket: plain, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
    this.socket = secure;
    this.attach(secure);
    return reply;
  }

  static async connect(port: number, host = '127.0.0.1', localAddress?: string): Promise<SmtpClient> {
    const socket = net.connect({ port, host, localAddress });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new SmtpClient(socket);
  }

  private onData(data: string) {
    this.buffer += data;
    let m: RegExpExecArray | null;
    // a complete reply ends with a line "NNN text" (no dash)
    while ((m = /^((?:\d{3}-[^\n]*\n)*\d{3}(?: [^\n]*)?\r?\n)/.exec(this.buffer))) {
      this.buffer = this.buffer.slice(m[1].length);
      const reply = m[1].trimEnd();
      const w = this.waiters.shift();
      if (w) w(reply);
      else this.replies.push(reply);
    }
  }

  read(timeoutMs = 5000): Promise<string> {
    const ready = this.replies.shift();
    if (ready !== undefined) return Promise.resolve(ready);
    if (this.closed) return Promise.resolve('');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no SMTP reply within timeout')), timeoutMs);
      this.waiters.push((r) => {
        clearTimeout(timer);
        resolve(r);
      });
    });
  }

  /** Every reply until the server closes the connection. */
  async readAll(timeoutMs = 10_000): Promise<string[]> {
    const replies: string[] = [];
    for (let reply = await this.read(timeoutMs); reply !== ''; reply = await this.read(timeoutMs)) replies.push(reply);
    return replies;
  }

  write(data: string | Buffer): void {
    this.socket.write(data);
  }

  async send(line: string | Buffer): Promise<string> {
    this.write(typeof line === 'string' ? `${line}\r\n` : line);
    return this.read();
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Opens a session up to an accepted MAIL FROM and RCPTs; returns the client. */
export async function openSession(port: number, from = 'sender@example.com', rcpts = ['rcpt@example.com']): Promise<SmtpClient> {
  const c = await SmtpClient.connect(port);
  const greeting = await c.read();
  if (!greeting.startsWith('220')) throw new Error(`greeting: ${greeting}`);
  await c.send('EHLO client.test');
  const mail = await c.send(`MAIL FROM:<${from}>`);
  if (!mail.startsWith('250')) throw new Error(`MAIL: ${mail}`);
  for (const r of rcpts) {
    const rr = await c.send(`RCPT TO:<${r}>`);
    if (!rr.startsWith('250')) throw new Error(`RCPT: ${rr}`);
  }
  return c;
}

export function messageCount(relay: Relay): number {
  return (relay.store.sqlite.prepare('SELECT COUNT(*) AS n FROM messages').get() as { n: number }).n;
}

export interface ReceivedMail {
  from: string;
  to: string[];
  raw: Buffer;
  at: number;
}

export interface Upstream {
  server: SMTPServer;
  port: number;
  received: ReceivedMail[];
  close(): Promise<void>;
}

/** A real smtp-server on 127.0.0.1:0 that records every transaction it accepts. */
export async function startUpstream(options: Partial<SMTPServerOptions> = {}, listenPort = 0): Promise<Upstream> {
  const received: ReceivedMail[] = [];
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    onData(stream, session: SMTPServerSession, cb) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        received.push({
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
          to: session.envelope.rcptTo.map((r) => r.address),
          raw: Buffer.concat(chunks),
          at: Date.now(),
        });
        cb();
      });
    },
    ...options,
  });
  await new Promise<void>((resolve) => server.listen(listenPort, '127.0.0.1', resolve));
  const port = (server.server.address() as net.AddressInfo).port;
  return {
    server,
    port,
    received,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/**
 * An upstream that takes each message's data and answers it only once release() is called: with
 * `250`, or with the error `refusal` gives (one with a `responseCode`).
 */
export async function startHoldingUpstream(refusal: () => Error | undefined = () => undefined): Promise<Upstream & { release(): void }> {
  let release: () => void = () => {};
  const held = new Promise<void>((resolve) => {
    release = resolve;
  });
  const upstream = await startUpstream({
    onData(stream, _session, cb) {
      stream.resume();
      stream.on('end', () => held.then(() => cb(refusal() ?? null)));
    },
  });
  return Object.assign(upstream, { release });
}

/**
 * A port on 127.0.0.1 with nothing listening on it (connection refused), that a test may listen
 * on later, e.g. an upstream that comes back after an outage. It is taken below the range the
 * system hands out for port 0 (on Linux `ip_local_port_range`, 32768 and up by default; 49152
 * and up elsewhere), so that no other test's listener is given it in between.
 */
export async function closedPort(): Promise<number> {
  const [low, high] = belowEphemeralPorts();
  for (let tries = 0; tries < 100; tries++) {
    const port = low + Math.floor(Math.random() * (high - low));
    const server = net.createServer();
    const bound = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, '127.0.0.1', () => resolve(true));
    });
    if (!bound) continue;
    await new Promise<void>((resolve) => server.close(() => resolve()));
    return port;
  }
  throw new Error(`no free port between ${low} and ${high}`);
}

/** Up to 12,000 ports below the first one the system hands out for port 0, and not below 1024. */
function belowEphemeralPorts(): [number, number] {
  let first = 32_768;
  try {
    first = Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || first;
  } catch {
    // not Linux: 49152 and up, so below 32768 is below it too
  }
  if (first <= 2048) throw new Error(`the system hands out ports from ${first} up for port 0: no room below for a port that stays closed`);
  return [Math.max(1024, first - 12_000), first];
}

/**
 * A database file with relayq's migrations applied up to `last`, as an upgrade finds it, and what
 * `fill` writes into it then (the query builder loaded only here).
 */
export async function databaseAtMigration(last: MigrationName, fill?: (sqlite: Sqlite) => void): Promise<string> {
  const file = path.join(tempDir(), 'relayq.db');
  const sqlite = openConnection(file);
  try {
    const [{ kyselyFor, migrateToLatest }, { migrations }] = await Promise.all([import('../src/store/migrate.js'), import('../migrations/index.js')]);
    const upTo = MIGRATION_NAMES.slice(0, MIGRATION_NAMES.indexOf(last) + 1);
    await migrateToLatest(kyselyFor(sqlite), Object.fromEntries(upTo.map((name) => [name, migrations[name]])));
    fill?.(sqlite);
  } finally {
    sqlite.close();
  }
  return file;
}

/** A copy of the relay database `file` as `relayq backup` writes it: in rollback-journal mode, as a restore finds it. */
export function rollbackJournalCopy(file: string): string {
  const copy = path.join(tempDir(), 'restored.db');
  const source = openReadOnly(file);
  try {
    backupDatabase(source, copy);
  } finally {
    source.close();
  }
  const check = openReadOnly(copy);
  try {
    const mode = check.pragma('journal_mode', { simple: true });
    if (mode !== 'delete') throw new Error(`a backup in journal mode ${String(mode)}, not delete`);
  } finally {
    check.close();
  }
  return copy;
}

/**
 * Another connection takes the database's write lock, as another process or a long commit would.
 * With `writerBusyTimeoutMs` the relay's writer waits that long for it instead of its usual
 * BUSY_TIMEOUT_MS. `release()` lets go of the lock and gives the writer its usual timeout back.
 */
export async function holdWriteLock(relay: Relay, writerBusyTimeoutMs?: number): Promise<{ release(): Promise<void> }> {
  if (writerBusyTimeoutMs !== undefined) await relay.writer.pragma(`busy_timeout = ${writerBusyTimeoutMs}`);
  const holder = openConnection(relay.config.databasePath);
  holder.exec('BEGIN IMMEDIATE');
  return {
    async release() {
      holder.exec('COMMIT');
      holder.close();
      if (writerBusyTimeoutMs !== undefined) await relay.writer.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
    },
  };
}

export async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs = 10_000, what = 'condition', intervalMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out waiting for ${what}`);
}

export interface RelayProcess {
  child: import('node:child_process').ChildProcess;
  smtpPort: number;
  /** Everything the process printed so far. */
  output: () => string;
  kill(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * Runs `relayq serve` (the build) as a child process in `dir` (its database and emails live
 * there) and resolves once it logged `relay.started`. Extra config as flags, e.g.
 * ['--forwardSMTP', 'true'].
 */
export async function spawnRelay(dir: string, flags: string[] = [], env: NodeJS.ProcessEnv = {}, fileLimit?: number): Promise<RelayProcess> {
  const { spawn } = await import('node:child_process');
  const args = cliArgs('serve', '--smtpPort', '0', '--healthCheckPort', '0', '--minFreeDiskMb', '0', '--logLevel', 'info', ...flags);
  // `fileLimit`: the relay runs under `ulimit -n` (bash execs it: the same process)
  const [command, commandArgs] =
    fileLimit === undefined ? [process.execPath, args] : ['bash', ['-c', `ulimit -n ${fileLimit} && exec "$0" "$@"`, process.execPath, ...args]];
  const child = spawn(command, commandArgs, {
    cwd: dir,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const started = await new Promise<{ smtp: string }>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL'); // it would hold its database and ports after the test
      reject(new Error(`relay did not start:\n${out}`));
    }, 30_000);
    const onData = () => {
      for (const line of out.split('\n')) {
        if (!line.includes('"relay.started"')) continue;
        clearTimeout(timer);
        child.stdout.off('data', onData);
        resolve(JSON.parse(line));
        return;
      }
    };
    child.stdout.on('data', onData);
    exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`relay exited with ${code} before starting:\n${out}`));
    });
  });
  return {
    child,
    smtpPort: Number(started.smtp.slice(started.smtp.lastIndexOf(':') + 1)),
    output: () => out,
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/**
 * Runs `fn` in one IMMEDIATE transaction on the relay's main-thread connection: a second real
 * connection to the same file, beside the writer thread, for tests that set up or change rows
 * directly.
 */
export async function writeDirect<T>(relay: Relay, fn: (db: Relay['store']['sqlite']) => T): Promise<T> {
  const db = relay.store.sqlite;
  return db.transaction(() => fn(db)).immediate();
}

/**
 * `count` messages written straight into the relay's database, failed or queued (waiting out an
 * hour's backoff); their ids in order.
 */
export function insertMessages(relay: Relay, count: number, state: 'failed' | 'queued'): Promise<string[]> {
  return writeDirect(relay, (db) => {
    const made: string[] = [];
    for (let i = 0; i < count; i++) {
      const id = `${state.toUpperCase()}${String(i).padStart(14, '0')}`;
      insertMessage(db, newMessage({ id, raw: Buffer.from('x'), receivedAt: 1000 + i }), NO_LIMITS);
      made.push(id);
    }
    if (state === 'failed') db.prepare("UPDATE messages SET state = 'failed', finished_at = received_at WHERE id LIKE 'FAILED%'").run();
    else db.prepare("UPDATE messages SET next_attempt_at = ? WHERE id LIKE 'QUEUED%'").run(Date.now() + 3600_000);
    return made;
  });
}

/**
 * Runs `fn` while `file` (a file or a directory) is immutable: no one may write to it, root
 * included, also through descriptors already open, as on a file system that went read-only or
 * full. Where `chattr +i` is not available (it needs root and ext4) the test is skipped and
 * `fn` does not run: the result says which.
 */
export async function whileImmutable(t: TestContext, file: string, fn: () => Promise<void>): Promise<boolean> {
  if (spawnSync('chattr', ['+i', file]).status !== 0) {
    t.skip('chattr +i is not available here (needs root and ext4)');
    return false;
  }
  try {
    await fn();
  } finally {
    spawnSync('chattr', ['-i', file]);
  }
  return true;
}

/**
 * Runs `fn` while Date.now() is `stepMs` away from the real time (an NTP step, a resumed VM): for
 * code that must keep its timing on the monotonic clock. The whole process sees the step.
 */
export async function withSteppedClock<T>(stepMs: number, fn: () => Promise<T>): Promise<T> {
  const realNow = Date.now;
  Date.now = () => realNow() + stepMs;
  try {
    return await fn();
  } finally {
    Date.now = realNow;
  }
}
