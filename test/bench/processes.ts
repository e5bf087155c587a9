// The processes under test: the built relay (`node dist/src/cli/index.js serve`) and the sink
// servers, each a child process so that its CPU, memory and event loop are its own. Also the
// probes the benchmark reads from outside: peak RSS from /proc and "is the port accepting".
import { type ChildProcess, fork, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import type { SinkCounters } from './counting-sink.js';
import type { SinkListener, SinkMessage } from './sink-server.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const sourceExtension = path.extname(fileURLToPath(import.meta.url));

/** The repository root: the nearest directory above this file with a package.json. */
export function repoRoot(): string {
  let dir = here;
  while (!fs.existsSync(path.join(dir, 'package.json'))) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error('package.json not found above the benchmark');
    dir = up;
  }
  return dir;
}

export function builtCli(): string {
  const cli = path.join(repoRoot(), 'dist', 'src', 'cli', 'index.js');
  if (!fs.existsSync(cli)) throw new Error(`${path.relative(process.cwd(), cli)} is missing: run \`npm run build\` first`);
  return cli;
}

/** A port that was free a moment ago (the child binds it; the race is harmless on loopback). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Resolves once a TCP connection to the port succeeds. */
export async function waitForPort(port: number, timeoutMs: number, alive: () => boolean = () => true): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = net.connect({ port, host: '127.0.0.1' });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (ok) return;
    if (!alive()) throw new Error(`process exited before port ${port} accepted connections`);
    if (performance.now() > deadline) throw new Error(`port ${port} not accepting after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** Peak resident set size of a process in MB (VmHWM), or NaN when /proc is not available. */
export function peakRssMb(pid: number): number {
  return procStatusMb(pid, 'VmHWM');
}

export function currentRssMb(pid: number): number {
  return procStatusMb(pid, 'VmRSS');
}

/**
 * CPU time (user + system, ms) a process has used so far: its main thread, and all its other
 * threads together (for relayq: the writer thread and V8's helper threads). NaN without /proc.
 */
export function threadCpuMs(pid: number): { main: number; others: number } {
  const result = { main: 0, others: 0 };
  try {
    const ticksMs = 10; // USER_HZ is 100 on Linux
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      const stat = fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      // fields after the command name (which may hold spaces): utime is the 12th, stime the 13th
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const ms = (Number(fields[11]) + Number(fields[12])) * ticksMs;
      if (Number(tid) === pid) result.main += ms;
      else result.others += ms;
    }
    return result;
  } catch {
    return { main: Number.NaN, others: Number.NaN };
  }
}

/** Bytes a process has caused to be written to storage so far (/proc/<pid>/io write_bytes), NaN without /proc. */
export function diskWriteBytes(pid: number): number {
  try {
    const match = /^write_bytes: (\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'));
    return match ? Number(match[1]) : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

function procStatusMb(pid: number, field: string): number {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status);
    return match ? Number(match[1]) / 1024 : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

async function terminate(child: ChildProcess, graceMs = 15_000, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited(child);
  clearTimeout(timer);
}

/** What a sink has counted since it started. */
export type SinkStats = SinkCounters;

export interface SinkProcess {
  port: number;
  pid: number;
  stats(): Promise<SinkStats>;
  stop(): Promise<void>;
}

/** Forks sink-server in its own process and waits until it listens. */
export async function startSink(listener: SinkListener): Promise<SinkProcess> {
  const script = path.join(here, `sink-server${sourceExtension}`);
  const child = fork(script, ['--listener', listener], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`sink exited with ${code}`)));
    child.on('message', (m: SinkMessage) => {
      if (m.type === 'listening') resolve(m.port);
    });
  });
  return {
    port,
    pid: child.pid as number,
    stats: () =>
      new Promise<SinkStats>((resolve) => {
        const onMessage = (m: SinkMessage) => {
          if (m.type !== 'stats') return;
          child.off('message', onMessage);
          resolve(m);
        };
        child.on('message', onMessage);
        child.send({ type: 'stats' });
      }),
    stop: () => terminate(child),
  };
}

/** Node options for every relay the benchmark starts, e.g. --cpu-prof (set once by run.ts). */
let relayNodeOptions: string[] = [];

export function profileRelays(dir: string): void {
  fs.mkdirSync(dir, { recursive: true });
  relayNodeOptions = ['--cpu-prof', `--cpu-prof-dir=${dir}`];
}

export interface RelayProcessOptions {
  /** The SQLite file; the relay creates it when missing. */
  databasePath: string;
  /** Directory for emails/ and the process log. */
  dir: string;
  /** Forward to this port on 127.0.0.1; without it the relay delivers into emailsDir. */
  upstreamPort?: number;
  /** Further config as flags, e.g. { workerCount: 16 }. */
  config?: Record<string, string | number | boolean>;
  /** Node options for this relay; default: those set by profileRelays(), if any. */
  nodeOptions?: string[];
}

export interface RelayProcess {
  pid: number;
  smtpPort: number;
  httpPort: number;
  /** Process spawn → SMTP port accepting connections, ms. */
  startupMs: number;
  peakRssMb(): number;
  /** What the relay printed (warn level and above). */
  log(): string;
  /** SIGTERM (orderly shutdown) or, e.g., SIGKILL when its in-flight work does not matter. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Starts the built relay with config given as flags, in a clean environment (no config file, no
 * config env vars), and resolves once its SMTP port (startup time) and its HTTP port accept
 * connections.
 */
export async function startRelayProcess(options: RelayProcessOptions): Promise<RelayProcess> {
  const [smtpPort, httpPort] = [await freePort(), await freePort()];
  const config: Record<string, string | number | boolean> = {
    smtpHost: '127.0.0.1',
    smtpPort,
    healthCheckHost: '127.0.0.1',
    healthCheckPort: httpPort,
    databasePath: options.databasePath,
    emailsDir: path.join(options.dir, 'emails'),
    minFreeDiskMb: 0,
    logLevel: 'warn',
    serverName: 'relayq.bench',
    queueSize: 0,
    // intake as fast as it goes; the sustained runs set their own
    inFlowDelay: 0,
    maxConnections: 2000,
    ...(options.upstreamPort
      ? { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: options.upstreamPort, workerCount: 16, batchDelay: 0 }
      : {}),
    ...options.config,
  };
  const flags = Object.entries(config).map(([key, value]) => `--${key}=${value}`);
  const logFile = path.join(options.dir, `relay-${smtpPort}.log`);
  const logFd = fs.openSync(logFile, 'a');
  const started = performance.now();
  const child = spawn(process.execPath, [...(options.nodeOptions ?? relayNodeOptions), builtCli(), 'serve', ...flags], {
    cwd: options.dir,
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? options.dir },
    stdio: ['ignore', logFd, logFd],
  });
  fs.closeSync(logFd);
  const alive = () => child.exitCode === null && child.signalCode === null;
  const log = () => fs.readFileSync(logFile, 'utf8');
  try {
    await waitForPort(smtpPort, 60_000, alive);
  } catch (err) {
    await terminate(child);
    throw new Error(`${(err as Error).message}\n${log()}`);
  }
  const startupMs = performance.now() - started;
  if (config.enableHealthCheck !== false) {
    try {
      await waitForPort(httpPort, 60_000, alive);
    } catch (err) {
      await terminate(child);
      throw new Error(`${(err as Error).message}\n${log()}`);
    }
  }
  return {
    pid: child.pid as number,
    smtpPort,
    httpPort,
    startupMs,
    peakRssMb: () => peakRssMb(child.pid as number),
    log,
    stop: (signal?: NodeJS.Signals) => terminate(child, 15_000, signal),
  };
}
