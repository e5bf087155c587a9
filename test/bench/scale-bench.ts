// Scale: does the cost of the queue's recurring work depend on how much the database holds?
// Measured on fixture files of 1,000 and 1,000,000 messages (and 100 for the rate-limit window):
// the delivery claim and its due-work probe, the rate-limit check (in process, through the store
// functions the relay calls), /health and /metrics over HTTP against the built relay started on
// the file, and the relay's startup time (spawn → SMTP port accepting).
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { migrations } from '../../migrations/index.js';
import { inFlowBacklogLimit } from '../../src/delivery/in-flow.js';
import { openStore } from '../../src/store/db.js';
import { claimDueBatches, countDueQueued, findTemporaryFailures, hasDueWork } from '../../src/store/delivery.js';
import { checkRateLimits, isQueueFull, rateWindows } from '../../src/store/intake.js';
import { pruneRateBuckets } from '../../src/store/retention.js';
import { type FixtureSummary, HOT_SENDER, writeFixture } from './fixture.js';
import { type SinkProcess, startRelayProcess } from './processes.js';
import { median, microsPerCall, percentile, ratio } from './statistics.js';

/**
 * A cached fixture is reused while younger than this. Its messages span the 23 hours before its
 * creation; a relay started on it prunes rate buckets older than a day, so after an hour it
 * would start thinning the rate-limit windows that the next run measures.
 */
const FIXTURE_MAX_AGE_MS = 3600_000;

export interface StoreCosts {
  messages: number;
  /** Messages of the checked sender in the last hour / day, and of all senders in the last day. */
  window: { senderHour: number; senderDay: number; globalDay: number };
  /** checkRateLimits with all four limits enabled and none reached, µs per call. */
  rateLimitCheckUs: number;
  /** The queue-size check at MAIL FROM, µs. */
  queueSizeCheckUs: number;
  /** hasDueWork when nothing is due (the idle poll), µs. */
  dueProbeIdleUs: number;
  /** The in-flow pacing count at each poll, up to 16 workers' limit (1,600) with all mail due, µs. */
  inFlowCountUs: number;
  inFlowCounted: number;
  /** claimDueBatches of 16 due messages (batchSize 20) in a rolled-back transaction, µs. */
  claimUs: number;
  claimed: number;
  /** Retention's rate-bucket pruning step (200 rows at most), in a rolled-back transaction, µs. */
  pruneBucketsUs: number;
  /** One step (500 failed messages) of failedRetryInterval's scan for failed mail to requeue, µs. */
  temporaryFailuresScanUs: number;
}

export interface RelayOnFixture {
  messages: number;
  startupMs: number[];
  healthMs: { p50: number[]; p99: number[] };
  metricsMs: { p50: number[]; p99: number[] };
  prometheusMs: { p50: number[]; p99: number[] };
  healthStatus: number;
  metricsStatus: number;
  relayPeakRssMb: number;
}

export interface ScaleResult {
  fixtures: FixtureSummary[];
  store: StoreCosts[];
  relay: RelayOnFixture[];
  median: Record<
    'small' | 'large',
    { messages: number; rateLimitCheckUs: number; claimUs: number; dueProbeIdleUs: number; startupMs: number; healthMs: number; metricsMs: number; prometheusMs: number }
  >;
}

interface FixtureMeta extends FixtureSummary {
  migrations: string[];
  createdAt: number;
}

/** Reuses `<dir>/fixture-<n>.db` when it was built recently with the current migrations. */
export async function ensureFixture(dir: string, messages: number, log: (line: string) => void): Promise<FixtureSummary> {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `fixture-${messages}.db`);
  const metaFile = `${file}.json`;
  const current = Object.keys(migrations);
  if (fs.existsSync(file) && fs.existsSync(metaFile)) {
    const meta = JSON.parse(fs.readFileSync(metaFile, 'utf8')) as FixtureMeta;
    if (meta.messages === messages && meta.migrations.join() === current.join() && Date.now() - meta.createdAt < FIXTURE_MAX_AGE_MS) {
      log(`fixture of ${messages} messages: reusing ${file} (built ${Math.round((Date.now() - meta.createdAt) / 60000)} min ago in ${meta.seconds.toFixed(1)} s)`);
      return meta;
    }
  }
  fs.rmSync(metaFile, { force: true });
  const summary = await writeFixture(file, { messages, now: Date.now() });
  fs.writeFileSync(metaFile, JSON.stringify({ ...summary, migrations: current, createdAt: Date.now() } satisfies FixtureMeta));
  log(`fixture of ${messages} messages: written in ${summary.seconds.toFixed(1)} s (${(summary.bytes / 2 ** 20).toFixed(0)} MB)`);
  return summary;
}

const LIMITS = { enabled: true, maxPerHour: 1e12, maxPerDay: 1e12, globalMaxPerHour: 1e12, globalMaxPerDay: 1e12 };

/** The store-level costs, in this process, on a read-write connection to the fixture. */
export async function measureStoreCosts(fixture: FixtureSummary): Promise<StoreCosts> {
  const store = await openStore(fixture.file);
  const { sqlite } = store;
  try {
    const now = fixture.now;
    const counts = rateWindows(sqlite, HOT_SENDER, now);
    const window = { senderHour: counts.maxPerHour, senderDay: counts.maxPerDay, globalDay: counts.globalMaxPerDay };
    const rateLimitCheckUs = microsPerCall(() => checkRateLimits(sqlite, HOT_SENDER, now, LIMITS));
    const queueSizeCheckUs = microsPerCall(() => isQueueFull(sqlite, 1000));
    const dueProbeIdleUs = microsPerCall(() => hasDueWork(sqlite, now));
    let inFlowCounted = 0;
    const inFlowCountUs = microsPerCall(() => {
      inFlowCounted = countDueQueued(sqlite, fixture.allDueAt, inFlowBacklogLimit(16, 0));
    });
    let claimed = 0;
    let token = 0;
    const claimUs = microsPerCall(
      () => {
        sqlite.exec('BEGIN IMMEDIATE');
        try {
          const result = claimDueBatches(sqlite, {
            now: fixture.allDueAt,
            leaseMs: 300_000,
            batchSize: 20,
            limit: 16,
            maxAttempts: 10,
            eraseRawOnDelivered: false,
            newToken: () => `bench-${token++}`,
          });
          claimed = result.batches.length;
        } finally {
          sqlite.exec('ROLLBACK');
        }
      },
      { batches: 11, perBatch: 20 },
    );
    const pruneBucketsUs = microsPerCall(
      () => {
        sqlite.exec('BEGIN IMMEDIATE');
        try {
          pruneRateBuckets(sqlite, now, 200);
        } finally {
          sqlite.exec('ROLLBACK');
        }
      },
      { batches: 5, perBatch: 4 },
    );
    const temporaryFailuresScanUs = microsPerCall(
      () => findTemporaryFailures(sqlite, { cursor: { finishedAt: Number.NEGATIVE_INFINITY, id: '' }, finishedBefore: now - 3_600_000, limit: 500 }),
      { batches: 5, perBatch: 4 },
    );
    return {
      messages: fixture.messages,
      window,
      rateLimitCheckUs,
      queueSizeCheckUs,
      dueProbeIdleUs,
      inFlowCountUs,
      inFlowCounted,
      claimUs,
      claimed,
      pruneBucketsUs,
      temporaryFailuresScanUs,
    };
  } finally {
    await store.close();
  }
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function get(port: number, urlPath: string): Promise<{ status: number; ms: number }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const req = http.get({ host: '127.0.0.1', port, path: urlPath, agent }, (res) => {
      res.resume();
      res.on('end', () => resolve({ status: res.statusCode ?? 0, ms: performance.now() - started }));
    });
    req.on('error', reject);
  });
}

async function latency(port: number, urlPath: string, requests: number): Promise<{ p50: number; p99: number; status: number }> {
  let status = 0;
  for (let i = 0; i < 5; i++) status = (await get(port, urlPath)).status;
  const samples: number[] = [];
  for (let i = 0; i < requests; i++) samples.push((await get(port, urlPath)).ms);
  samples.sort((a, b) => a - b);
  return { p50: percentile(samples, 50), p99: percentile(samples, 99), status };
}

/** Starts the built relay on the fixture `repeats` times: startup time, then HTTP latencies. */
async function relayOnFixture(
  fixture: FixtureSummary,
  workDir: string,
  upstream: SinkProcess,
  runs: number,
  requests: number,
  into: RelayOnFixture | undefined,
): Promise<RelayOnFixture> {
  const result: RelayOnFixture = into ?? {
    messages: fixture.messages,
    startupMs: [],
    healthMs: { p50: [], p99: [] },
    metricsMs: { p50: [], p99: [] },
    prometheusMs: { p50: [], p99: [] },
    healthStatus: 0,
    metricsStatus: 0,
    relayPeakRssMb: 0,
  };
  for (let run = 0; run < runs; run++) {
    const dir = fs.mkdtempSync(path.join(workDir, 'scale-'));
    const relay = await startRelayProcess({ databasePath: fixture.file, dir, upstreamPort: upstream.port });
    try {
      result.startupMs.push(relay.startupMs);
      const health = await latency(relay.httpPort, '/health', requests);
      const metrics = await latency(relay.httpPort, '/metrics', requests);
      const prometheus = await latency(relay.httpPort, '/metrics?format=prometheus', requests);
      result.healthMs.p50.push(health.p50);
      result.healthMs.p99.push(health.p99);
      result.metricsMs.p50.push(metrics.p50);
      result.metricsMs.p99.push(metrics.p99);
      result.prometheusMs.p50.push(prometheus.p50);
      result.prometheusMs.p99.push(prometheus.p99);
      result.healthStatus = health.status;
      result.metricsStatus = metrics.status;
      result.relayPeakRssMb = Math.max(result.relayPeakRssMb, relay.peakRssMb());
    } finally {
      await relay.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
  return result;
}

export interface ScaleSettings {
  workDir: string;
  fixtureDir: string;
  smallMessages: number;
  largeMessages: number;
  /** Relay starts per fixture (interleaved small/large). */
  relayRuns: number;
  requests: number;
  upstream: SinkProcess;
  log: (line: string) => void;
}

export async function runScale(settings: ScaleSettings): Promise<ScaleResult> {
  const { log } = settings;
  // the rate-limit window with 100 messages (small fixtures are cheap: always fresh)
  const tiny = await writeFixture(path.join(settings.workDir, 'fixture-100.db'), { messages: 100, now: Date.now() });
  const small = await writeFixture(path.join(settings.workDir, `fixture-${settings.smallMessages}.db`), {
    messages: settings.smallMessages,
    now: Date.now(),
  });
  const large = await ensureFixture(settings.fixtureDir, settings.largeMessages, log);
  const fixtures = [tiny, small, large];

  // five passes in alternating order, so that neither size always runs first; medians of the passes
  const passes: StoreCosts[][] = [];
  for (let pass = 0; pass < 5; pass++) {
    const order = pass % 2 === 0 ? fixtures : [...fixtures].reverse();
    const costs = new Map<number, StoreCosts>();
    for (const f of order) costs.set(f.messages, await measureStoreCosts(f));
    passes.push(fixtures.map((f) => costs.get(f.messages) as StoreCosts));
  }
  const storeMedian = fixtures.map((_, i) => {
    const runs = passes.map((p) => p[i]);
    return {
      ...runs[0],
      rateLimitCheckUs: median(runs.map((r) => r.rateLimitCheckUs)),
      queueSizeCheckUs: median(runs.map((r) => r.queueSizeCheckUs)),
      dueProbeIdleUs: median(runs.map((r) => r.dueProbeIdleUs)),
      inFlowCountUs: median(runs.map((r) => r.inFlowCountUs)),
      claimUs: median(runs.map((r) => r.claimUs)),
      pruneBucketsUs: median(runs.map((r) => r.pruneBucketsUs)),
      temporaryFailuresScanUs: median(runs.map((r) => r.temporaryFailuresScanUs)),
    };
  });
  for (const s of storeMedian) {
    log(
      `${String(s.messages).padStart(8)} messages (hot sender ${s.window.senderHour}/h ${s.window.senderDay}/day, all ${s.window.globalDay}/day): rate-limit check ${s.rateLimitCheckUs.toFixed(1)} µs, queue-size check ${s.queueSizeCheckUs.toFixed(1)} µs, due probe ${s.dueProbeIdleUs.toFixed(1)} µs, in-flow count of ${s.inFlowCounted} ${s.inFlowCountUs.toFixed(1)} µs, claim of ${s.claimed} ${s.claimUs.toFixed(0)} µs, rate-bucket pruning step ${(s.pruneBucketsUs / 1000).toFixed(1)} ms, failed-mail requeue scan step ${(s.temporaryFailuresScanUs / 1000).toFixed(1)} ms`,
    );
  }

  let smallRelay: RelayOnFixture | undefined;
  let largeRelay: RelayOnFixture | undefined;
  for (let run = 0; run < settings.relayRuns; run++) {
    smallRelay = await relayOnFixture(small, settings.workDir, settings.upstream, 1, settings.requests, smallRelay);
    largeRelay = await relayOnFixture(large, settings.workDir, settings.upstream, 1, settings.requests, largeRelay);
  }
  const relays = [smallRelay, largeRelay].filter((r): r is RelayOnFixture => r !== undefined);
  const summary = (costs: StoreCosts, relay: RelayOnFixture | undefined) => ({
    messages: costs.messages,
    rateLimitCheckUs: costs.rateLimitCheckUs,
    claimUs: costs.claimUs,
    dueProbeIdleUs: costs.dueProbeIdleUs,
    startupMs: median(relay?.startupMs ?? []),
    healthMs: median(relay?.healthMs.p50 ?? []),
    metricsMs: median(relay?.metricsMs.p50 ?? []),
    prometheusMs: median(relay?.prometheusMs.p50 ?? []),
  });
  const result: ScaleResult = {
    fixtures,
    store: storeMedian,
    relay: relays,
    median: { small: summary(storeMedian[1], smallRelay), large: summary(storeMedian[2], largeRelay) },
  };
  for (const r of relays) {
    log(
      `${String(r.messages).padStart(8)} messages: startup ${median(r.startupMs).toFixed(0)} ms, /health ${median(r.healthMs.p50).toFixed(2)} ms (p99 ${median(r.healthMs.p99).toFixed(2)}), /metrics ${median(r.metricsMs.p50).toFixed(2)} ms, prometheus ${median(r.prometheusMs.p50).toFixed(2)} ms, status ${r.healthStatus}/${r.metricsStatus}, RSS ${r.relayPeakRssMb.toFixed(0)} MB`,
    );
  }
  const m = result.median;
  log(
    `large/small: claim ${ratio(m.large.claimUs, m.small.claimUs).toFixed(2)}x, rate-limit check ${ratio(m.large.rateLimitCheckUs, m.small.rateLimitCheckUs).toFixed(2)}x (vs 100 messages ${ratio(storeMedian[2].rateLimitCheckUs, storeMedian[0].rateLimitCheckUs).toFixed(2)}x), /health ${ratio(m.large.healthMs, m.small.healthMs).toFixed(2)}x, /metrics ${ratio(m.large.metricsMs, m.small.metricsMs).toFixed(2)}x, rate-bucket pruning ${ratio(storeMedian[2].pruneBucketsUs, storeMedian[1].pruneBucketsUs).toFixed(0)}x, failed-mail scan step ${ratio(storeMedian[2].temporaryFailuresScanUs, storeMedian[1].temporaryFailuresScanUs).toFixed(1)}x`,
  );
  return result;
}
