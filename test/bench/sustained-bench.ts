// Sustained load: relayq accepts from 50 persistent clients as fast as it can for a fixed time
// while it forwards to the counting sink. Sampled every interval: accepted, delivered, the queue
// depth the store reports (queued + sending), the -wal file's size and the relay's RSS. Answers
// "does delivery keep up?" and "does the queue or the WAL grow without bound?".
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import Database from 'better-sqlite3';
import { currentRssMb, type SinkProcess, startRelayProcess } from './processes.js';
import { messageBody, runLoad } from './smtp-load.js';
import { ratio, slope } from './statistics.js';

export interface SustainedSample {
  seconds: number;
  accepted: number;
  delivered: number;
  queueDepth: number;
  walBytes: number;
  rssMb: number;
}

export interface SustainedResult {
  workerCount: number;
  inFlowDelay: number;
  seconds: number;
  clients: number;
  bodyBytes: number;
  accepted: number;
  /** Delivered while the load ran. */
  deliveredDuringLoad: number;
  acceptedPerSecond: number;
  deliveredPerSecond: number;
  /** deliveredPerSecond / acceptedPerSecond over the load. */
  deliveryShare: number;
  /** Least-squares growth of the queue over the second half of the load, messages/s. */
  queueGrowthPerSecond: number;
  maxQueueDepth: number;
  queueDepthAtEnd: number;
  /** Load end → the sink has every accepted message (NaN: not within drainTimeoutMs). */
  drainSeconds: number;
  /** Delivery rate while draining, with no intake competing for the relay's thread. */
  drainPerSecond: number;
  maxWalMb: number;
  walMbAtEnd: number;
  /** After the drain (or right after the load when not draining) and 2 s of quiet. */
  walMbAfterDrain: number;
  databaseMbAfterDrain: number;
  relayPeakRssMb: number;
  p50Ms: number;
  p99Ms: number;
  samples: SustainedSample[];
}

export interface SustainedSettings {
  workDir: string;
  upstream: SinkProcess;
  seconds: number;
  sampleEveryMs: number;
  /** How long to wait after the load for the sink to have everything (0: do not wait). */
  drainTimeoutMs: number;
  clients?: number;
  bodyBytes?: number;
  /** Delivery workers (the relay's workerCount). */
  workerCount: number;
  /** The relay's inFlowDelay (ms); 0 lets intake outrun delivery. */
  inFlowDelay: number;
  log: (line: string) => void;
}

function fileBytes(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

export async function runSustained(settings: SustainedSettings): Promise<SustainedResult> {
  const clients = settings.clients ?? 50;
  const bodyBytes = settings.bodyBytes ?? 2048;
  const dir = fs.mkdtempSync(path.join(settings.workDir, 'sustained-'));
  const databasePath = path.join(dir, 'relayq.db');
  const relay = await startRelayProcess({
    databasePath,
    dir,
    upstreamPort: settings.upstream.port,
    config: { workerCount: settings.workerCount, inFlowDelay: settings.inFlowDelay },
  });
  // A reader of the counters, as an operator's sqlite3 would be: read-only, its own connection.
  const reader = new Database(databasePath, { readonly: true });
  const queueDepth = () =>
    (reader.prepare(`SELECT COALESCE(SUM(value), 0) AS n FROM counters WHERE name IN ('state_queued', 'state_sending')`).get() as { n: number }).n;
  const deliveredBefore = (await settings.upstream.stats()).messages;
  let accepted = 0;
  const samples: SustainedSample[] = [];
  const started = performance.now();
  const sample = async () => {
    const delivered = (await settings.upstream.stats()).messages - deliveredBefore;
    const s: SustainedSample = {
      seconds: (performance.now() - started) / 1000,
      accepted,
      delivered,
      queueDepth: queueDepth(),
      walBytes: fileBytes(`${databasePath}-wal`),
      rssMb: currentRssMb(relay.pid),
    };
    samples.push(s);
    return s;
  };
  const sampler = setInterval(() => {
    sample().then(
      (s) => {
        if (samples.length % Math.max(1, Math.round(10_000 / settings.sampleEveryMs)) === 0) {
          settings.log(
            `  ${s.seconds.toFixed(0).padStart(4)} s: accepted ${s.accepted}, delivered ${s.delivered}, queue ${s.queueDepth}, WAL ${(s.walBytes / 2 ** 20).toFixed(1)} MB, RSS ${s.rssMb.toFixed(0)} MB`,
          );
        }
      },
      () => {},
    );
  }, settings.sampleEveryMs);
  try {
    const load = await runLoad({
      port: relay.smtpPort,
      mode: 'persistent',
      clients,
      body: messageBody(bodyBytes),
      durationMs: settings.seconds * 1000,
      onAccepted: () => {
        accepted++;
      },
    });
    clearInterval(sampler);
    const atEnd = await sample();
    const loadSeconds = load.elapsedMs / 1000;
    // drain: wait for the sink to have everything (or until 30 s pass without progress)
    const drainStarted = performance.now();
    let lastDelivered = atEnd.delivered;
    let lastProgress = drainStarted;
    let drained = atEnd;
    while (drained.delivered < load.accepted) {
      await new Promise((r) => setTimeout(r, 100));
      drained = await sample();
      if (drained.delivered > lastDelivered) {
        lastDelivered = drained.delivered;
        lastProgress = performance.now();
      }
      if (performance.now() - lastProgress > 30_000 || performance.now() - drainStarted > settings.drainTimeoutMs) break;
    }
    const drainElapsed = (performance.now() - drainStarted) / 1000;
    const drainSeconds = drained.delivered >= load.accepted ? drainElapsed : Number.NaN;
    const drainPerSecond = drainElapsed > 1 ? (drained.delivered - atEnd.delivered) / drainElapsed : Number.NaN;
    // let the relay settle (a checkpoint after the burst) before reading the file sizes again
    await new Promise((r) => setTimeout(r, 2000));
    const afterDrain = await sample();
    const during = samples.filter((s) => s.seconds <= loadSeconds);
    const secondHalf = during.filter((s) => s.seconds >= loadSeconds / 2).map((s) => [s.seconds, s.queueDepth] as const);
    const acceptedPerSecond = load.accepted / loadSeconds;
    const deliveredPerSecond = atEnd.delivered / loadSeconds;
    return {
      workerCount: settings.workerCount,
      inFlowDelay: settings.inFlowDelay,
      seconds: loadSeconds,
      clients,
      bodyBytes,
      accepted: load.accepted,
      deliveredDuringLoad: atEnd.delivered,
      acceptedPerSecond,
      deliveredPerSecond,
      deliveryShare: ratio(deliveredPerSecond, acceptedPerSecond),
      queueGrowthPerSecond: slope(secondHalf),
      maxQueueDepth: Math.max(...during.map((s) => s.queueDepth)),
      queueDepthAtEnd: atEnd.queueDepth,
      drainSeconds,
      drainPerSecond,
      maxWalMb: Math.max(...samples.map((s) => s.walBytes)) / 2 ** 20,
      walMbAtEnd: atEnd.walBytes / 2 ** 20,
      walMbAfterDrain: afterDrain.walBytes / 2 ** 20,
      databaseMbAfterDrain: fileBytes(databasePath) / 2 ** 20,
      relayPeakRssMb: relay.peakRssMb(),
      p50Ms: load.latency.p50,
      p99Ms: load.latency.p99,
      samples,
    };
  } finally {
    clearInterval(sampler);
    reader.close();
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
