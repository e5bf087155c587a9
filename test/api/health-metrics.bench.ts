// Latency of the HTTP API's read paths against a small and a large queue: /health (which also
// commits a probe write, so it includes one fsync), /metrics as JSON and as Prometheus text, and
// the admin listing with each of its filters. Run over real HTTP against a relay on a fixture
// database, so the numbers include Hono, the socket and SQLite.
//
//   npm run bench:api                      1,000 and 1,000,000 messages
//   npm run bench:api -- --messages 1000,100000 --requests 100
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import pino from 'pino';
import { startRelay } from '../../src/main.js';
import { HOT_SENDER, writeFixture } from '../bench/fixture.js';
import { tempDir, testConfig } from '../helpers.js';

const ROUTES: Array<[string, string]> = [
  ['health', '/health'],
  ['metrics json', '/metrics'],
  ['metrics prometheus', '/metrics?format=prometheus'],
  ['list newest 50', '/admin/messages?limit=50'],
  ['list failed 50', '/admin/messages?state=failed&limit=50'],
  ['list sender 50', `/admin/messages?sender=${encodeURIComponent(HOT_SENDER)}&limit=50`],
  ['list recipient 50', '/admin/messages?recipient=user42%40example.net&limit=50'],
];

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function timeRoute(base: string, url: string, requests: number): Promise<{ p50: number; p99: number; max: number }> {
  for (let i = 0; i < 10; i++) await (await fetch(base + url)).arrayBuffer();
  const samples: number[] = [];
  for (let i = 0; i < requests; i++) {
    const t = performance.now();
    const res = await fetch(base + url);
    await res.arrayBuffer();
    samples.push(performance.now() - t);
    if (res.status !== 200) throw new Error(`${url}: HTTP ${res.status}`);
  }
  samples.sort((a, b) => a - b);
  return { p50: percentile(samples, 50), p99: percentile(samples, 99), max: samples[samples.length - 1] };
}

async function main() {
  const sizes = arg('messages', '1000,1000000').split(',').map(Number);
  const requests = Number(arg('requests', '200'));
  const dir = tempDir('relayq-api-bench-');
  const results: Record<string, Record<string, { p50: number; p99: number; max: number }>> = {};
  console.log(`relayq HTTP API latency, ${requests} sequential requests per route, ${os.cpus().length} CPUs (${os.cpus()[0]?.model})`);
  for (const messages of sizes) {
    const file = path.join(dir, `fixture-${messages}.db`);
    const fixture = await writeFixture(file, { messages, now: Date.now() });
    console.log(`\n${messages.toLocaleString('en')} messages (fixture built in ${fixture.seconds.toFixed(1)} s, ${(fixture.bytes / 1e6).toFixed(0)} MB)`);
    const relay = await startRelay(testConfig({ databasePath: file, queueSize: 0 }, dir), {
      logger: pino({ level: 'silent' }),
      startDelivery: false,
      startRetention: false,
    });
    try {
      const base = `http://127.0.0.1:${relay.httpPort}`;
      results[messages] = {};
      for (const [name, url] of ROUTES) {
        const r = await timeRoute(base, url, requests);
        results[messages][name] = r;
        console.log(`  ${name.padEnd(20)} p50 ${r.p50.toFixed(2).padStart(7)} ms   p99 ${r.p99.toFixed(2).padStart(7)} ms   max ${r.max.toFixed(2).padStart(7)} ms`);
      }
    } finally {
      await relay.stop();
      for (const suffix of ['', '-wal', '-shm']) fs.rmSync(file + suffix, { force: true });
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
  if (sizes.length > 1) {
    const [small, large] = [sizes[0], sizes[sizes.length - 1]];
    console.log(`\np50 ratio ${large.toLocaleString('en')} / ${small.toLocaleString('en')} messages:`);
    for (const [name] of ROUTES) console.log(`  ${name.padEnd(20)} ${(results[large][name].p50 / results[small][name].p50).toFixed(2)}x`);
  }
  console.log(`\n${JSON.stringify(results)}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
