// `npm run bench`: builds relayq, runs the built server as a child process against a counting
// sink, and measures intake, end-to-end delivery, scale and memory next to the ceilings of this
// machine (a store-nothing smtp-server and the disk's fsync rate), all in one run. Prints a
// summary with ratios and the targets, and writes everything to bench-results/<time>.json.
//
//   npm run bench                      full run (about 12 minutes on 2 cores)
//   npm run bench -- --quick           short runs, one repeat, a 100,000-message scale fixture
//   npm run bench -- --only intake,fsync
//   npm run bench -- --cpu-prof        also write a CPU profile of every relay process
//   npm run bench:wal                  10 minutes of sustained load; WAL size over time
//   (every flag and its default: the README's Performance section)
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { defaultConfig } from '../../src/config/schema.js';
import { type FsyncCeiling, measureFsyncCeiling } from './fsync.js';
import {
  caseName,
  type IntakeCaseResult,
  type IntakeOnlyResult,
  intakeCases,
  type MemoryResult,
  runIntakeCase,
  runIntakeOnlyCase,
  runMemoryCase,
  warmUpServers,
} from './intake-bench.js';
import { profileRelays, repoRoot, type SinkProcess, startSink } from './processes.js';
import { runScale } from './scale-bench.js';
import { median, ratio } from './statistics.js';
import { runSustained, type SustainedResult } from './sustained-bench.js';

const SECTIONS = ['fsync', 'intake', 'memory', 'sustained', 'scale', 'wal'] as const;
type Section = (typeof SECTIONS)[number];

export interface Options {
  quick: boolean;
  sections: Set<Section>;
  runMs: number;
  repeats: number;
  /** Load against each fresh relay (and once against the ceilings) before its runs are measured. */
  warmUpMs: number;
  sustainedSeconds: number;
  /** One sustained run per workerCount, with the default inFlowDelay. */
  sustainedWorkers: number[];
  /** And one per workerCount here with inFlowDelay 0 (intake not paced). */
  sustainedUnpaced: number[];
  walSeconds: number;
  scaleMessages: number;
  smallMessages: number;
  relayRuns: number;
  fixtureDir: string;
  memoryClients: number;
  memoryBytes: number;
  /** Relay config for the intake and memory sections (`--relay spoolAfter=0,workerCount=4`). */
  relayConfig: Record<string, string>;
  cpuProf: boolean;
  out: string;
}

/** The relay's own default, which the sustained runs use unless they are the unpaced ones. */
const IN_FLOW_DELAY_DEFAULT = defaultConfig().inFlowDelay;

/** A mistake on the command line: said in one line, without a stack. */
export class UsageError extends Error {}

const FLAGS = {
  quick: { type: 'boolean' },
  'cpu-prof': { type: 'boolean' },
  only: { type: 'string' },
  'run-ms': { type: 'string' },
  repeats: { type: 'string' },
  'warm-up-ms': { type: 'string' },
  'sustained-seconds': { type: 'string' },
  'sustained-workers': { type: 'string' },
  'sustained-unpaced': { type: 'string' },
  'wal-seconds': { type: 'string' },
  'scale-messages': { type: 'string' },
  'small-messages': { type: 'string' },
  'relay-runs': { type: 'string' },
  'fixture-dir': { type: 'string' },
  'memory-clients': { type: 'string' },
  'memory-bytes': { type: 'string' },
  relay: { type: 'string' },
  out: { type: 'string' },
} as const;

function parseFlags(argv: string[]) {
  try {
    return parseArgs({ args: argv, options: FLAGS }).values;
  } catch (err) {
    throw new UsageError(`${(err as Error).message} (the README lists the flags under Performance)`);
  }
}

export function parseOptions(argv: string[]): Options {
  const values = parseFlags(argv);
  const integer = (name: string, text: string, min: number): number => {
    const n = /^\d+$/.test(text) ? Number(text) : Number.NaN;
    if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`--${name} takes an integer of at least ${min}, not "${text}"`);
    return n;
  };
  const num = (name: keyof typeof FLAGS, fallback: number, min = 1) => {
    const text = values[name];
    return typeof text === 'string' ? integer(name, text, min) : fallback;
  };
  const numbers = (name: keyof typeof FLAGS, fallback: string) => {
    const text = values[name] ?? fallback;
    return typeof text === 'string' && text !== '' ? text.split(',').map((n) => integer(name, n, 1)) : [];
  };
  const quick = values.quick === true;
  const sections = new Set<Section>(values.only !== undefined ? (values.only.split(',') as Section[]) : SECTIONS.filter((s) => s !== 'wal'));
  for (const s of sections) if (!SECTIONS.includes(s)) throw new UsageError(`unknown section "${s}"; known: ${SECTIONS.join(', ')}`);
  return {
    quick,
    sections,
    runMs: num('run-ms', quick ? 1000 : 2000),
    repeats: num('repeats', quick ? 1 : 3),
    warmUpMs: num('warm-up-ms', quick ? 1000 : 5000, 0),
    sustainedSeconds: num('sustained-seconds', quick ? 10 : 60),
    sustainedWorkers: numbers('sustained-workers', '16,128'),
    sustainedUnpaced: numbers('sustained-unpaced', '16'),
    walSeconds: num('wal-seconds', 600),
    scaleMessages: num('scale-messages', quick ? 100_000 : 1_000_000),
    smallMessages: num('small-messages', 1000),
    relayRuns: num('relay-runs', quick ? 2 : 5),
    fixtureDir: values['fixture-dir'] ?? path.join(os.tmpdir(), 'relayq-bench-fixtures'),
    memoryClients: num('memory-clients', 200),
    memoryBytes: num('memory-bytes', 1024 * 1024),
    relayConfig: Object.fromEntries(
      (values.relay ?? '')
        .split(',')
        .filter(Boolean)
        .map((pair) => {
          const eq = pair.indexOf('=');
          if (eq < 1) throw new UsageError(`--relay takes key=value pairs separated by commas, not "${pair}"`);
          return [pair.slice(0, eq), pair.slice(eq + 1)];
        }),
    ),
    cpuProf: values['cpu-prof'] === true,
    out: values.out ?? path.join(repoRoot(), 'bench-results'),
  };
}

const log = (line: string) => process.stdout.write(`${line}\n`);
const fmt = (n: number, digits = 0) => (Number.isFinite(n) ? n.toFixed(digits) : '-');

function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  return [line(headers), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

interface Target {
  name: string;
  goal: string;
  measured: string;
  met: boolean | null;
}

async function main() {
  const options = parseOptions(process.argv.slice(2));
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'relayq-bench-'));
  const startedAt = new Date();
  const results: Record<string, unknown> = {
    startedAt: startedAt.toISOString(),
    command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
    machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, memoryMb: Math.round(os.totalmem() / 2 ** 20), node: process.version, platform: `${os.platform()} ${os.release()}` },
    options: { ...options, sections: [...options.sections] },
  };
  const targets: Target[] = [];
  if (options.cpuProf) {
    const profiles = path.join(options.out, `profiles-${startedAt.toISOString().replace(/[:.]/g, '-')}`);
    profileRelays(profiles);
    results.profiles = profiles;
  }
  log(`relayq benchmark — ${os.cpus().length} CPUs, node ${process.version}, work dir in ${os.tmpdir()}`);
  const relayFlags = Object.entries(options.relayConfig).map(([k, v]) => `${k}=${v}`);
  if (relayFlags.length) log(`relay config for intake and memory: ${relayFlags.join(', ')}`);

  const sinks: SinkProcess[] = [];
  try {
    const upstream = await startSink('counting');
    const ceiling = await startSink('relayq');
    const stock = await startSink('stock');
    sinks.push(upstream, ceiling, stock);

    let fsync: FsyncCeiling | undefined;
    if (options.sections.has('fsync')) {
      log('\n## fsync ceiling (database directory)');
      fsync = measureFsyncCeiling(path.join(workDir, 'fsync'), options.quick ? 1000 : 3000);
      results.fsync = fsync;
      log(`SQLite WAL synchronous=FULL single-row commits/s: ${fmt(fsync.sqliteCommitsPerSecond)}`);
      log(`write+fsync/s: ${fmt(fsync.fsyncsPerSecond)}`);
    }

    if (options.sections.has('intake')) {
      log(
        `\n## intake (${options.repeats} x ${options.runMs} ms per case and server, interleaved; each relay warmed up for ${options.warmUpMs} ms first)`,
      );
      // The ceiling servers live through the whole section; the first cases should not find them cold.
      await warmUpServers([ceiling, stock], options.warmUpMs);
      const caseResults: IntakeCaseResult[] = [];
      for (const c of intakeCases()) {
        const r = await runIntakeCase(c, {
          workDir,
          runMs: options.runMs,
          repeats: options.repeats,
          warmUpMs: options.warmUpMs,
          drainTimeoutMs: 60_000,
          upstream,
          ceiling,
          stock,
          relayConfig: options.relayConfig,
          log,
        });
        caseResults.push(r);
        const m = r.median;
        log(
          `${caseName(c).padEnd(26)} relayq ${fmt(m.relayqPerSecond).padStart(6)}/s p50 ${fmt(m.relayqP50Ms, 2)} ms p99 ${fmt(m.relayqP99Ms, 2)} ms e2e ${fmt(m.endToEndPerSecond).padStart(6)}/s rss ${fmt(r.relayPeakRssMb)} MB | ceiling ${fmt(m.ceilingPerSecond)}/s (${fmt(ratio(m.relayqPerSecond, m.ceilingPerSecond) * 100)} %)${c.mode === 'per-message' ? ` | stock ${fmt(m.stockPerSecond)}/s (${fmt(ratio(m.relayqPerSecond, m.stockPerSecond), 1)}x)` : ''}`,
        );
        log(
          `  CPU per message: relayq main thread ${fmt(m.cpu.relayMain)} µs + other threads ${fmt(m.cpu.relayOtherThreads)} µs (intake and the delivery meanwhile); sink ${fmt(m.cpu.sink)} µs; load generator ${fmt(m.cpu.loadGenerator)} µs; ${fmt(m.cpu.coresBusy, 2)} cores busy`,
        );
      }
      results.intake = caseResults;
      log(`\n${intakeTable(caseResults, fsync)}`);
      const headline = caseResults.find((r) => r.mode === 'persistent' && r.bodyBytes === 2048 && r.clients === 50);
      if (headline) {
        const share = ratio(headline.median.relayqPerSecond, headline.median.ceilingPerSecond);
        targets.push({
          name: 'durable accept, 50 persistent connections, 2 KB',
          goal: '>= 85 % of the store-nothing smtp-server',
          measured: `${fmt(headline.median.relayqPerSecond)}/s = ${fmt(share * 100)} % of ${fmt(headline.median.ceilingPerSecond)}/s`,
          met: share >= 0.85,
        });
      }
      const perMessage = caseResults.find((r) => r.mode === 'per-message' && r.bodyBytes === 2048 && r.clients === 50);
      // the headline cases again, with delivery out of the way (workers wait on a silent upstream)
      const silent = net.createServer((socket) => socket.on('error', () => {}));
      await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
      const intakeOnly: IntakeOnlyResult[] = [];
      try {
        for (const c of [headline, perMessage]) {
          if (!c) continue;
          const only = await runIntakeOnlyCase(
            c,
            { workDir, runMs: options.runMs, repeats: options.repeats, warmUpMs: options.warmUpMs, drainTimeoutMs: 0, upstream, ceiling, stock, relayConfig: options.relayConfig, log },
            (silent.address() as net.AddressInfo).port,
          );
          intakeOnly.push(only);
          const m = only.median;
          const share = ratio(m.relayqPerSecond, m.ceilingPerSecond);
          log(
            `${caseName(c)}, delivery idle: relayq ${fmt(m.relayqPerSecond)}/s p50 ${fmt(m.p50Ms, 2)} ms p99 ${fmt(m.p99Ms, 2)} ms = ${fmt(share * 100)} % of ceiling ${fmt(m.ceilingPerSecond)}/s${c.mode === 'per-message' ? `, ${fmt(ratio(m.relayqPerSecond, m.stockPerSecond), 1)}x stock ${fmt(m.stockPerSecond)}/s` : ''}`,
          );
          const cpu = m.cpuUsPerMessage;
          log(
            `  CPU per message: relayq main thread ${fmt(cpu.relayMain)} µs + other threads ${fmt(cpu.relayOtherThreads)} µs (writer, GC helpers); store-nothing server ${fmt(cpu.ceiling)} µs; load generator ${fmt(cpu.loadGenerator)} µs; ${fmt(cpu.coresBusy, 2)} cores busy (relayq and the load generator)`,
          );
          log(`  disk writes per message: ${fmt(m.diskBytesPerMessage / 1024, 1)} KB (WAL frames and their checkpoints; body ${fmt(c.bodyBytes / 1024, 1)} KB)`);
        }
      } finally {
        silent.close();
      }
      results.intakeOnly = intakeOnly;
      if (perMessage) {
        const x = ratio(perMessage.median.relayqPerSecond, perMessage.median.stockPerSecond);
        targets.push({
          name: 'one connection per message, 50 clients, 2 KB',
          goal: '>= 3x stock smtp-server',
          measured: `${fmt(perMessage.median.relayqPerSecond)}/s = ${fmt(x, 1)}x stock ${fmt(perMessage.median.stockPerSecond)}/s`,
          met: x >= 3,
        });
      }
      for (const only of intakeOnly) {
        const m = only.median;
        if (only.mode === 'persistent') {
          const share = ratio(m.relayqPerSecond, m.ceilingPerSecond);
          targets.push({
            name: `${caseName(only)}, delivery idle`,
            goal: '>= 85 % of the store-nothing smtp-server',
            measured: `${fmt(m.relayqPerSecond)}/s = ${fmt(share * 100)} % of ${fmt(m.ceilingPerSecond)}/s`,
            met: share >= 0.85,
          });
        } else {
          const x = ratio(m.relayqPerSecond, m.stockPerSecond);
          targets.push({
            name: `${caseName(only)}, delivery idle`,
            goal: '>= 3x stock smtp-server',
            measured: `${fmt(m.relayqPerSecond)}/s = ${fmt(x, 1)}x stock ${fmt(m.stockPerSecond)}/s`,
            met: x >= 3,
          });
        }
      }
    }

    if (options.sections.has('memory')) {
      log(`\n## memory (${options.memoryClients} concurrent clients, one ${fmt(options.memoryBytes / 1024)} KB message each; a fresh relay per run)`);
      const runs: MemoryResult[] = [];
      for (let rep = 0; rep < options.repeats; rep++) {
        const memory = await runMemoryCase({ workDir, upstream, relayConfig: options.relayConfig }, options.memoryClients, options.memoryBytes);
        runs.push(memory);
        log(
          `accepted ${memory.accepted}/${memory.clients} in ${fmt(memory.elapsedMs)} ms, delivered ${memory.delivered}, relay RSS idle ${fmt(memory.relayIdleRssMb)} MB, peak ${fmt(memory.relayPeakRssMb)} MB`,
        );
      }
      const peak = median(runs.map((r) => r.relayPeakRssMb));
      const worst = Math.max(...runs.map((r) => r.relayPeakRssMb));
      const allAccepted = runs.every((r) => r.accepted === r.clients);
      results.memory = { runs, medianPeakRssMb: peak, maxPeakRssMb: worst };
      targets.push({
        name: `memory, ${options.memoryClients} clients x ${fmt(options.memoryBytes / 2 ** 20)} MB`,
        goal: 'peak RSS < 400 MB',
        measured: `median ${fmt(peak)} MB, max ${fmt(worst)} MB of ${runs.length} runs${allAccepted ? '' : ' (not all accepted)'}`,
        met: peak < 400 && allAccepted,
      });
    }

    if (options.sections.has('sustained')) {
      const runs: SustainedResult[] = [];
      const plan = [
        ...options.sustainedWorkers.map((workerCount) => ({ workerCount, inFlowDelay: IN_FLOW_DELAY_DEFAULT })),
        ...options.sustainedUnpaced.map((workerCount) => ({ workerCount, inFlowDelay: 0 })),
      ];
      for (const { workerCount, inFlowDelay } of plan) {
        const setting = `workerCount ${workerCount}, inFlowDelay ${inFlowDelay}`;
        log(`\n## sustained end to end (${options.sustainedSeconds} s, 50 persistent clients, 2 KB, forwarding to the sink, ${setting})`);
        const sustained = await runSustained({
          workDir,
          upstream,
          seconds: options.sustainedSeconds,
          sampleEveryMs: 1000,
          drainTimeoutMs: 300_000,
          workerCount,
          inFlowDelay,
          log,
        });
        runs.push(sustained);
        log(sustainedSummary(sustained));
        targets.push({
          name: `end to end, sustained ${options.sustainedSeconds} s, ${setting}`,
          goal: 'delivery >= 80 % of accept rate; queue bounded',
          measured: `delivered ${fmt(sustained.deliveredPerSecond)}/s of ${fmt(sustained.acceptedPerSecond)}/s accepted (${fmt(sustained.deliveryShare * 100)} %), queue ${sustained.queueGrowthPerSecond >= 0 ? '+' : ''}${fmt(sustained.queueGrowthPerSecond, 1)}/s at the end`,
          met: sustained.deliveryShare >= 0.8 && !(sustained.queueGrowthPerSecond > 0.05 * sustained.acceptedPerSecond),
        });
      }
      results.sustained = runs;
    }

    if (options.sections.has('scale')) {
      log(`\n## scale (${options.smallMessages} vs ${options.scaleMessages} messages; fixtures cached in ${options.fixtureDir})`);
      const scale = await runScale({
        workDir,
        fixtureDir: options.fixtureDir,
        smallMessages: options.smallMessages,
        largeMessages: options.scaleMessages,
        relayRuns: options.relayRuns,
        requests: 30,
        upstream,
        log,
      });
      results.scale = scale;
      const { small, large } = scale.median;
      const twice = (name: string, a: number, b: number, unit: string, digits: number) => {
        const x = ratio(b, a);
        targets.push({
          name: `scale: ${name}`,
          goal: `${large.messages} <= 2x ${small.messages}`,
          measured: `${fmt(a, digits)} -> ${fmt(b, digits)} ${unit} (${fmt(x, 2)}x)`,
          met: Number.isFinite(x) ? x <= 2 : null,
        });
      };
      twice('claiming work', small.claimUs, large.claimUs, 'µs', 0);
      twice('rate-limit check', small.rateLimitCheckUs, large.rateLimitCheckUs, 'µs', 1);
      twice('/health', small.healthMs, large.healthMs, 'ms', 2);
      twice('/metrics', small.metricsMs, large.metricsMs, 'ms', 2);
      targets.push({
        name: `scale: /health and /metrics at ${large.messages}`,
        goal: '< 50 ms',
        measured: `${fmt(large.healthMs, 2)} ms, ${fmt(large.metricsMs, 2)} ms`,
        met: large.healthMs < 50 && large.metricsMs < 50,
      });
      targets.push({
        name: `scale: startup with ${large.messages}`,
        goal: '< 2 s',
        measured: `${fmt(large.startupMs)} ms (${fmt(small.startupMs)} ms with ${small.messages})`,
        met: large.startupMs < 2000,
      });
    }

    if (options.sections.has('wal')) {
      log(`\n## WAL under sustained load (${options.walSeconds} s, 50 persistent clients, 2 KB, workerCount 128)`);
      const wal = await runSustained({
        workDir,
        upstream,
        seconds: options.walSeconds,
        sampleEveryMs: 5000,
        drainTimeoutMs: 0,
        // enough workers for delivery to keep up: the steady state of a relay that is not falling behind
        workerCount: 128,
        inFlowDelay: IN_FLOW_DELAY_DEFAULT,
        log,
      });
      results.wal = wal;
      log(sustainedSummary(wal));
    }
  } finally {
    for (const s of sinks) await s.stop();
    fs.rmSync(workDir, { recursive: true, force: true });
  }

  results.targets = targets;
  if (targets.length) {
    log('\n## targets');
    log(table(['target', 'goal', 'measured', 'met'], targets.map((t) => [t.name, t.goal, t.measured, t.met === null ? 'n/a' : t.met ? 'yes' : 'NO'])));
  }
  fs.mkdirSync(options.out, { recursive: true });
  const file = path.join(options.out, `${startedAt.toISOString().replace(/[:.]/g, '-')}.json`);
  fs.writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
  log(`\nresults: ${path.relative(process.cwd(), file)}`);
}

function sustainedSummary(r: SustainedResult): string {
  return [
    `workerCount ${r.workerCount}, inFlowDelay ${r.inFlowDelay}: accepted ${r.accepted} in ${fmt(r.seconds, 1)} s = ${fmt(r.acceptedPerSecond)}/s (p50 ${fmt(r.p50Ms, 2)} ms, p99 ${fmt(r.p99Ms, 2)} ms)`,
    `delivered during the load ${r.deliveredDuringLoad} = ${fmt(r.deliveredPerSecond)}/s (${fmt(r.deliveryShare * 100)} % of the accept rate)`,
    `queue depth: max ${r.maxQueueDepth}, at the end ${r.queueDepthAtEnd}, growth over the second half ${fmt(r.queueGrowthPerSecond, 1)}/s; drained in ${fmt(r.drainSeconds, 1)} s (${fmt(r.drainPerSecond)}/s with intake idle)`,
    `WAL: max ${fmt(r.maxWalMb, 1)} MB, at the end of the load ${fmt(r.walMbAtEnd, 1)} MB, after draining ${fmt(r.walMbAfterDrain, 1)} MB; database ${fmt(r.databaseMbAfterDrain, 1)} MB; relay peak RSS ${fmt(r.relayPeakRssMb)} MB`,
  ].join('\n');
}

function intakeTable(rows: IntakeCaseResult[], fsync: FsyncCeiling | undefined): string {
  return table(
    ['case', 'relayq/s', 'p50 ms', 'p99 ms', 'e2e/s', 'RSS MB', 'ceiling/s', 'of ceiling', 'stock/s', 'x stock', 'x fsync'],
    rows.map((r) => {
      const m = r.median;
      return [
        caseName(r),
        fmt(m.relayqPerSecond),
        fmt(m.relayqP50Ms, 2),
        fmt(m.relayqP99Ms, 2),
        fmt(m.endToEndPerSecond),
        fmt(r.relayPeakRssMb),
        fmt(m.ceilingPerSecond),
        `${fmt(ratio(m.relayqPerSecond, m.ceilingPerSecond) * 100)} %`,
        fmt(m.stockPerSecond),
        fmt(ratio(m.relayqPerSecond, m.stockPerSecond), 1),
        fmt(ratio(m.relayqPerSecond, fsync?.sqliteCommitsPerSecond ?? Number.NaN), 1),
      ];
    }),
  );
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err) => {
    process.stderr.write(err instanceof UsageError ? `bench: ${err.message}\n` : `bench failed: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  });
}
