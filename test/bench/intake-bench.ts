// Intake cases: the same load against relayq (durable, forwarding to a counting sink) and against
// the store-nothing smtp-server ceilings, interleaved run by run so that both see the same
// machine. Also the memory case: many concurrent clients each uploading one large message.
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { currentRssMb, diskWriteBytes, type RelayProcess, type SinkProcess, startRelayProcess, threadCpuMs } from './processes.js';
import { type ConnectionMode, type LoadResult, messageBody, runLoad } from './smtp-load.js';
import { median, medians } from './statistics.js';

export interface IntakeCase {
  mode: ConnectionMode;
  bodyBytes: number;
  clients: number;
}

export interface RunFigures {
  acceptedPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  accepted: number;
  refused: Record<string, number>;
  connectionErrors: number;
}

export interface RelayRunFigures extends RunFigures {
  /** Accepted messages / (load start → the sink has all of them); NaN when not all arrived. */
  endToEndPerSecond: number;
  delivered: number;
  /** While the load ran; relayq's figures include the delivery that ran meanwhile. */
  cpu: RelayCpu;
}

/** CPU time per accepted message (µs) while a load ran against relayq, and the cores that kept busy. */
export interface RelayCpu {
  relayMain: number;
  /** The writer thread and V8's helper threads. */
  relayOtherThreads: number;
  /** The counting sink relayq forwards to. */
  sink: number;
  loadGenerator: number;
  /** All of the above together, in cores (CPU time / wall time of the load). */
  coresBusy: number;
}

export interface IntakeCaseResult extends IntakeCase {
  relayq: RelayRunFigures[];
  /** smtp-server storing nothing, with relayq's listener (no greeting pause). */
  ceiling: RunFigures[];
  /** smtp-server storing nothing, as shipped (100 ms before each greeting); per-message cases only. */
  stock: RunFigures[];
  relayPeakRssMb: number;
  median: {
    relayqPerSecond: number;
    relayqP50Ms: number;
    relayqP99Ms: number;
    endToEndPerSecond: number;
    ceilingPerSecond: number;
    stockPerSecond: number;
    ceilingP50Ms: number;
    ceilingP99Ms: number;
    cpu: RelayCpu;
  };
}

export interface IntakeSettings {
  workDir: string;
  runMs: number;
  repeats: number;
  /**
   * Load against a fresh relay before its runs are measured. V8 compiles the hot paths while
   * the first seconds of load run: right after a 0.5 s warm-up, a relay accepted a third to a half
   * less than it did a few seconds later.
   */
  warmUpMs: number;
  /** Longest wait for the sink to receive what relayq accepted in one run. */
  drainTimeoutMs: number;
  upstream: SinkProcess;
  ceiling: SinkProcess;
  stock: SinkProcess;
  relayConfig?: Record<string, string | number | boolean>;
  log: (line: string) => void;
}

export function intakeCases(): IntakeCase[] {
  const cases: IntakeCase[] = [];
  for (const mode of ['persistent', 'per-message'] as const) {
    for (const bodyBytes of [2 * 1024, 100 * 1024]) {
      for (const clients of [1, 10, 50]) cases.push({ mode, bodyBytes, clients });
    }
  }
  return cases;
}

export function caseName(c: IntakeCase): string {
  return `${c.mode} ${c.bodyBytes / 1024} KB x${c.clients}`;
}

function figures(r: LoadResult): RunFigures {
  return {
    acceptedPerSecond: r.acceptedPerSecond,
    p50Ms: r.latency.p50,
    p99Ms: r.latency.p99,
    accepted: r.accepted,
    refused: r.refused,
    connectionErrors: r.connectionErrors,
  };
}

/**
 * Waits until the sink has received `target` messages in total. Gives up after `timeoutMs`, or
 * when nothing arrived for `stallMs` (delivery stalled, or not built yet).
 */
async function waitForSink(sink: SinkProcess, target: number, timeoutMs: number, stallMs = 10_000): Promise<{ delivered: number; at: number }> {
  const deadline = performance.now() + timeoutMs;
  let lastCount = -1;
  let lastChange = performance.now();
  for (;;) {
    const { messages } = await sink.stats();
    const now = performance.now();
    if (messages >= target) return { delivered: messages, at: now };
    if (messages !== lastCount) {
      lastCount = messages;
      lastChange = now;
    }
    if (now > deadline || now - lastChange > stallMs) return { delivered: messages, at: Number.NaN };
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Loads each server with both connection modes for `ms` in all, so that its code is compiled before anything is measured. */
export async function warmUpServers(servers: readonly SinkProcess[], ms: number): Promise<void> {
  const body = messageBody(2048);
  for (const server of servers) {
    for (const mode of ['persistent', 'per-message'] as const) await runLoad({ port: server.port, mode, body, clients: 50, durationMs: ms / 2 });
  }
}

/** One load run against relayq that also waits for the sink to have every accepted message. */
export async function relayRun(
  relay: RelayProcess,
  upstream: SinkProcess,
  plan: { mode: ConnectionMode; body: Buffer; clients: number; durationMs?: number; messages?: number },
  drainTimeoutMs: number,
  stallMs?: number,
): Promise<RelayRunFigures> {
  const before = (await upstream.stats()).messages;
  const run = await measuredLoad(relay.pid, { port: relay.smtpPort, ...plan }, upstream.pid);
  const result = run.load;
  const drained = await waitForSink(upstream, before + result.accepted, drainTimeoutMs, stallMs);
  const delivered = drained.delivered - before;
  return {
    ...figures(result),
    delivered,
    endToEndPerSecond: Number.isFinite(drained.at) ? (result.accepted * 1000) / (drained.at - result.startedAt) : Number.NaN,
    cpu: { relayMain: run.mainUs, relayOtherThreads: run.othersUs, sink: run.sinkUs, loadGenerator: run.loadGeneratorUs, coresBusy: run.coresBusy },
  };
}

export async function runIntakeCase(c: IntakeCase, settings: IntakeSettings): Promise<IntakeCaseResult> {
  const body = messageBody(c.bodyBytes);
  const dir = fs.mkdtempSync(path.join(settings.workDir, 'intake-'));
  const relay = await startRelayProcess({
    databasePath: path.join(dir, 'relayq.db'),
    dir,
    upstreamPort: settings.upstream.port,
    config: settings.relayConfig,
  });
  const plan = { mode: c.mode, body, clients: c.clients, durationMs: settings.runMs };
  const result: IntakeCaseResult = { ...c, relayq: [], ceiling: [], stock: [], relayPeakRssMb: Number.NaN, median: {} as IntakeCaseResult['median'] };
  try {
    // warm-up: JIT and statement caches of the fresh relay process; also tells whether the
    // relay delivers at all (when it does not, the runs below do not wait for the sink)
    const warmUp = await relayRun(relay, settings.upstream, { ...plan, durationMs: settings.warmUpMs }, settings.drainTimeoutMs, 5000);
    const drainTimeoutMs = warmUp.delivered > 0 ? settings.drainTimeoutMs : 0;
    for (let rep = 0; rep < settings.repeats; rep++) {
      result.ceiling.push(figures(await runLoad({ port: settings.ceiling.port, ...plan })));
      if (c.mode === 'per-message') result.stock.push(figures(await runLoad({ port: settings.stock.port, ...plan })));
      result.relayq.push(await relayRun(relay, settings.upstream, plan, drainTimeoutMs));
    }
    result.relayPeakRssMb = relay.peakRssMb();
  } finally {
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  result.median = {
    relayqPerSecond: median(result.relayq.map((r) => r.acceptedPerSecond)),
    relayqP50Ms: median(result.relayq.map((r) => r.p50Ms)),
    relayqP99Ms: median(result.relayq.map((r) => r.p99Ms)),
    endToEndPerSecond: median(result.relayq.map((r) => r.endToEndPerSecond)),
    ceilingPerSecond: median(result.ceiling.map((r) => r.acceptedPerSecond)),
    stockPerSecond: median(result.stock.map((r) => r.acceptedPerSecond)),
    ceilingP50Ms: median(result.ceiling.map((r) => r.p50Ms)),
    ceilingP99Ms: median(result.ceiling.map((r) => r.p99Ms)),
    cpu: medians(result.relayq.map((r) => r.cpu)),
  };
  return result;
}

export interface MemoryResult {
  clients: number;
  bodyBytes: number;
  accepted: number;
  refused: Record<string, number>;
  connectionErrors: number;
  elapsedMs: number;
  /** Messages the sink received (NaN wait time means delivery stalled). */
  delivered: number;
  /** VmHWM of the relay process after intake and delivery; it started fresh for this case. */
  relayPeakRssMb: number;
  relayIdleRssMb: number;
}

/** Peak RSS of a fresh relay while `clients` clients each upload one message of `bodyBytes`. */
export async function runMemoryCase(
  settings: Pick<IntakeSettings, 'workDir' | 'upstream' | 'relayConfig'>,
  clients: number,
  bodyBytes: number,
): Promise<MemoryResult> {
  const dir = fs.mkdtempSync(path.join(settings.workDir, 'memory-'));
  const relay = await startRelayProcess({
    databasePath: path.join(dir, 'relayq.db'),
    dir,
    upstreamPort: settings.upstream.port,
    config: settings.relayConfig,
  });
  try {
    const relayIdleRssMb = currentRssMb(relay.pid);
    const before = (await settings.upstream.stats()).messages;
    const load = await runLoad({
      port: relay.smtpPort,
      mode: 'per-message',
      clients,
      messages: clients,
      body: messageBody(bodyBytes),
    });
    const drained = await waitForSink(settings.upstream, before + load.accepted, 120_000);
    return {
      clients,
      bodyBytes,
      accepted: load.accepted,
      refused: load.refused,
      connectionErrors: load.connectionErrors,
      elapsedMs: load.elapsedMs,
      delivered: drained.delivered - before,
      relayPeakRssMb: relay.peakRssMb(),
      relayIdleRssMb,
    };
  } finally {
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export interface IntakeOnlyResult extends IntakeCase {
  relayqPerSecond: number[];
  ceilingPerSecond: number[];
  /** Per-message cases only. */
  stockPerSecond: number[];
  /** CPU time per accepted message, µs: relayq's main thread and its other threads, the ceiling server, the load generator. */
  cpuUsPerMessage: CpuPerMessage[];
  /** Bytes relayq wrote to the disk per accepted message (WAL frames, checkpoints). */
  diskBytesPerMessage: number[];
  median: {
    relayqPerSecond: number;
    ceilingPerSecond: number;
    stockPerSecond: number;
    p50Ms: number;
    p99Ms: number;
    cpuUsPerMessage: CpuPerMessage;
    diskBytesPerMessage: number;
  };
}

export interface CpuPerMessage {
  relayMain: number;
  relayOtherThreads: number;
  /** The store-nothing server (one thread does all its work). */
  ceiling: number;
  /** The load generator while it drove relayq. */
  loadGenerator: number;
  /** relayq and the load generator together while it drove relayq, in cores. */
  coresBusy: number;
}

/**
 * Runs a load and returns it with the CPU µs per accepted message that `pid`, the sink process
 * (when given) and this process (the load generator) spent, the cores they kept busy together,
 * and the bytes `pid` wrote to the disk per accepted message.
 */
async function measuredLoad(pid: number, plan: Parameters<typeof runLoad>[0], sinkPid?: number) {
  const sinkMs = () => {
    if (sinkPid === undefined) return 0;
    const t = threadCpuMs(sinkPid);
    return t.main + t.others;
  };
  const before = threadCpuMs(pid);
  const sinkBefore = sinkMs();
  const writtenBefore = diskWriteBytes(pid);
  const own = process.cpuUsage();
  const load = await runLoad(plan);
  const after = threadCpuMs(pid);
  const sinkSpentMs = sinkMs() - sinkBefore;
  const written = diskWriteBytes(pid) - writtenBefore;
  const ownUs = process.cpuUsage(own);
  const totalMs = after.main - before.main + (after.others - before.others) + sinkSpentMs + (ownUs.user + ownUs.system) / 1000;
  const per = (ms: number) => (ms * 1000) / load.accepted;
  return {
    load,
    mainUs: per(after.main - before.main),
    othersUs: per(after.others - before.others),
    sinkUs: per(sinkSpentMs),
    loadGeneratorUs: (ownUs.user + ownUs.system) / load.accepted,
    coresBusy: totalMs / load.elapsedMs,
    diskBytes: written / load.accepted,
  };
}

/**
 * The same case with delivery out of the way: relayq forwards to an upstream that accepts TCP
 * connections and never greets, so every worker waits and the relay's one thread does intake
 * only. Separates the cost of storing from the cost of forwarding on the same core.
 */
export async function runIntakeOnlyCase(c: IntakeCase, settings: IntakeSettings, silentUpstreamPort: number): Promise<IntakeOnlyResult> {
  const body = messageBody(c.bodyBytes);
  const dir = fs.mkdtempSync(path.join(settings.workDir, 'intake-only-'));
  const relay = await startRelayProcess({
    databasePath: path.join(dir, 'relayq.db'),
    dir,
    upstreamPort: silentUpstreamPort,
    config: settings.relayConfig,
  });
  const plan = { mode: c.mode, body, clients: c.clients, durationMs: settings.runMs };
  const relayq: LoadResult[] = [];
  const ceiling: LoadResult[] = [];
  const stock: LoadResult[] = [];
  const cpu: CpuPerMessage[] = [];
  const diskBytes: number[] = [];
  try {
    await runLoad({ port: relay.smtpPort, ...plan, durationMs: settings.warmUpMs });
    for (let rep = 0; rep < settings.repeats; rep++) {
      const sink = await measuredLoad(settings.ceiling.pid, { port: settings.ceiling.port, ...plan });
      ceiling.push(sink.load);
      if (c.mode === 'per-message') stock.push(await runLoad({ port: settings.stock.port, ...plan }));
      const run = await measuredLoad(relay.pid, { port: relay.smtpPort, ...plan });
      relayq.push(run.load);
      cpu.push({
        relayMain: run.mainUs,
        relayOtherThreads: run.othersUs,
        ceiling: sink.mainUs + sink.othersUs,
        loadGenerator: run.loadGeneratorUs,
        coresBusy: run.coresBusy,
      });
      diskBytes.push(run.diskBytes);
    }
  } finally {
    // its workers wait on the silent upstream; an orderly stop would wait for them
    await relay.stop('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return {
    ...c,
    relayqPerSecond: relayq.map((r) => r.acceptedPerSecond),
    ceilingPerSecond: ceiling.map((r) => r.acceptedPerSecond),
    stockPerSecond: stock.map((r) => r.acceptedPerSecond),
    cpuUsPerMessage: cpu,
    diskBytesPerMessage: diskBytes,
    median: {
      relayqPerSecond: median(relayq.map((r) => r.acceptedPerSecond)),
      ceilingPerSecond: median(ceiling.map((r) => r.acceptedPerSecond)),
      stockPerSecond: median(stock.map((r) => r.acceptedPerSecond)),
      p50Ms: median(relayq.map((r) => r.latency.p50)),
      p99Ms: median(relayq.map((r) => r.latency.p99)),
      cpuUsPerMessage: medians(cpu),
      diskBytesPerMessage: median(diskBytes),
    },
  };
}
