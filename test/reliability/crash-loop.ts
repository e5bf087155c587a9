// The crash loop behind `npm run soak` and its short version in `npm test`: relayq runs as a child
// process forwarding to a counting upstream in this process, several clients send continuously,
// the relay is killed with SIGKILL at random moments and restarted on the same files. At the end
// everything must drain: every queue id that got a 250 reached the upstream (missing = 0), no
// message is left in 'sending', and the copies beyond the first are counted (at-least-once).
import fs from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { SMTPServer } from 'smtp-server';
import { Spool } from '../../src/smtp/spool.js';
import { type RelayProcess, SmtpClient, spawnRelay, tempDir } from '../helpers.js';

export interface CrashLoopOptions {
  kills: number;
  /** Concurrent SMTP clients sending all the time. */
  clients: number;
  /** How long the relay runs before the next kill: uniform in [min, max] ms. */
  uptimeMs: [number, number];
  /** Lease of a claim (processingTimeout, seconds); a restart gives back the claims a kill left. */
  processingTimeoutS: number;
  /** Time allowed for the queue to drain after the last restart. */
  drainTimeoutMs: number;
  seed: number;
  /**
   * Run the relay with this spoolAfter and give every message a body four times as large, so
   * that each one is spooled to a file while the relay is being killed. Default: small messages.
   */
  spoolAfter?: number;
  /** Progress lines (the soak prints them; the test stays quiet). */
  progress?: (line: string) => void;
}

export interface CrashLoopResult {
  seed: number;
  kills: number;
  /** Distinct queue ids that got `250 ... queued as <id>`. */
  acknowledged: number;
  /** Acknowledged ids the upstream never received. */
  missing: string[];
  /** Acknowledged ids that are not in the database. */
  notStored: string[];
  /** Copies the upstream received beyond the first, and of how many messages. */
  duplicates: number;
  duplicatedMessages: number;
  /** Delivered although the client never saw the 250 (killed between commit and reply). */
  deliveredUnacknowledged: number;
  /** Messages still in 'sending' (or holding a lease) after the drain. */
  stuckSending: number;
  /** Messages not delivered after the drain (queued or failed). */
  undelivered: number;
  upstreamTransactions: number;
  /** Exit code of the final SIGTERM shutdown (0 = orderly). */
  finalExitCode: number | null;
  /** Files in the spool directory after that shutdown (every session had ended before it). */
  spoolFilesLeft: number;
  elapsedMs: number;
}

/** A small seeded PRNG (mulberry32), so a run's kill schedule can be replayed from its seed. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** relayq's Received header names the queue id: "by <serverName> (relayq) with ESMTP id <id>". */
const QUEUE_ID_IN_RECEIVED = /\(relayq\) with \S+ id ([0-9A-F]{20})/;

/** The smart host: accepts everything, a little slowly, and counts copies per relayq queue id. */
async function startCountingUpstream(random: () => number) {
  const copies = new Map<string, number>();
  let transactions = 0;
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    disableReverseLookup: true,
    logger: false,
    closeTimeout: 100,
    onData(stream, _session, cb) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const head = Buffer.concat(chunks).subarray(0, 2048).toString('latin1');
        const id = QUEUE_ID_IN_RECEIVED.exec(head)?.[1] ?? 'unparsable';
        // a short think time keeps deliveries in flight when the kill comes
        setTimeout(() => {
          transactions++;
          copies.set(id, (copies.get(id) ?? 0) + 1);
          cb();
        }, Math.floor(random() * 20));
      });
    },
  });
  // the relay's connections die with it (ECONNRESET): expected here, not a failure
  server.on('error', () => {});
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    port,
    copies,
    transactions: () => transactions,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** One client: sessions of up to 20 messages, reconnecting to whatever port the relay has now. */
async function sendContinuously(
  client: number,
  current: { port: number },
  acknowledged: Set<string>,
  stop: { now: boolean },
  random: () => number,
  filler: string,
) {
  let n = 0;
  while (!stop.now) {
    const port = current.port;
    if (!port) {
      await sleep(20);
      continue;
    }
    let c: SmtpClient | undefined;
    try {
      c = await SmtpClient.connect(port);
      if (!(await c.read()).startsWith('220')) throw new Error('no greeting');
      await c.send('EHLO crash-loop.test');
      for (let i = 0; i < 20 && !stop.now; i++) {
        n++;
        if (!(await c.send(`MAIL FROM:<client${client}@example.com>`)).startsWith('250')) break;
        const rcpts = 1 + Math.floor(random() * 3);
        let ok = true;
        for (let r = 0; r < rcpts && ok; r++) ok = (await c.send(`RCPT TO:<c${client}m${n}r${r}@example.org>`)).startsWith('250');
        if (!ok || !(await c.send('DATA')).startsWith('354')) break;
        const reply = await c.send(`Message-ID: <c${client}.${n}@crash-loop.test>\r\nSubject: crash loop ${client}/${n}\r\n\r\nbody ${n}\r\n${filler}.`);
        const id = /^250 2\.0\.0 Ok: queued as ([0-9A-F]{20})$/.exec(reply)?.[1];
        if (!id) break;
        acknowledged.add(id);
      }
    } catch {
      // the relay went away under us; whatever got a 250 is in `acknowledged`
    } finally {
      c?.close();
    }
    if (!stop.now) await sleep(5);
  }
}

function relayFlags(upstreamPort: number, processingTimeoutS: number, spoolAfter: number | undefined): string[] {
  return [
    ...(spoolAfter === undefined ? [] : ['--spoolAfter', String(spoolAfter)]),
    '--serverName', 'relayq.crash-loop',
    '--enableHealthCheck', 'false',
    '--forwardSMTP', 'true',
    '--forwardHost', '127.0.0.1',
    '--forwardPort', String(upstreamPort),
    '--processingTimeout', String(processingTimeoutS),
    '--batchDelay', '0',
    '--workerCount', '4',
    '--queueSize', '0',
    '--retry.initialDelay', '1',
    '--retry.maxDelay', '2',
    '--retry.maxAttempts', '1000',
  ];
}

export async function runCrashLoop(options: CrashLoopOptions): Promise<CrashLoopResult> {
  const started = Date.now();
  const random = seededRandom(options.seed);
  const progress = options.progress ?? (() => {});
  const dir = tempDir('relayq-crash-loop-');
  // the relay runs in `dir` with the default databasePath
  const databasePath = path.join(dir, 'data', 'relayq.db');
  const upstream = await startCountingUpstream(random);
  const flags = relayFlags(upstream.port, options.processingTimeoutS, options.spoolAfter);
  const filler = options.spoolAfter ? `${'x'.repeat(78)}\r\n`.repeat(Math.ceil((4 * options.spoolAfter) / 80)) : '';
  const acknowledged = new Set<string>();
  const stop = { now: false };
  const current = { port: 0 };
  let relay: RelayProcess = await spawnRelay(dir, flags);
  current.port = relay.smtpPort;
  const clients = Array.from({ length: options.clients }, (_, i) => sendContinuously(i, current, acknowledged, stop, seededRandom(options.seed + i + 1), filler));
  let kills = 0;
  let finalExitCode: number | null = null;
  try {
    for (let k = 0; k < options.kills; k++) {
      const [min, max] = options.uptimeMs;
      await sleep(min + random() * (max - min));
      current.port = 0;
      await relay.kill('SIGKILL');
      kills++;
      progress(`kill ${kills}/${options.kills}: ${acknowledged.size} acknowledged, ${upstream.transactions()} upstream transactions`);
      relay = await spawnRelay(dir, flags);
      current.port = relay.smtpPort;
    }
    // a last stretch of load on the final process, then let the queue drain
    await sleep(options.uptimeMs[0]);
    stop.now = true;
    await Promise.all(clients);

    const db = new Database(databasePath, { readonly: true });
    const count = (sql: string) => (db.prepare(sql).get() as { n: number }).n;
    let result: CrashLoopResult;
    try {
      const deadline = Date.now() + options.drainTimeoutMs;
      while (Date.now() < deadline && count("SELECT COUNT(*) AS n FROM messages WHERE state IN ('queued', 'sending')") > 0) await sleep(100);
      const stored = new Set((db.prepare('SELECT id FROM messages').all() as Array<{ id: string }>).map((r) => r.id));
      const acked = [...acknowledged];
      let duplicates = 0;
      let duplicatedMessages = 0;
      for (const n of upstream.copies.values()) {
        if (n > 1) {
          duplicates += n - 1;
          duplicatedMessages++;
        }
      }
      result = {
        seed: options.seed,
        kills,
        acknowledged: acked.length,
        missing: acked.filter((id) => !upstream.copies.has(id)),
        notStored: acked.filter((id) => !stored.has(id)),
        duplicates,
        duplicatedMessages,
        deliveredUnacknowledged: [...upstream.copies.keys()].filter((id) => !acknowledged.has(id)).length,
        stuckSending: count("SELECT COUNT(*) AS n FROM messages WHERE state = 'sending' OR lease_token IS NOT NULL"),
        undelivered: count("SELECT COUNT(*) AS n FROM messages WHERE state <> 'delivered'"),
        upstreamTransactions: upstream.transactions(),
        finalExitCode,
        spoolFilesLeft: 0,
        elapsedMs: 0,
      };
    } finally {
      db.close();
    }
    finalExitCode = await relay.kill('SIGTERM');
    result.finalExitCode = finalExitCode;
    const spoolDir = Spool.dirFor(databasePath);
    result.spoolFilesLeft = fs.existsSync(spoolDir) ? fs.readdirSync(spoolDir).length : 0;
    result.elapsedMs = Date.now() - started;
    return result;
  } finally {
    stop.now = true;
    await relay.kill('SIGKILL');
    await upstream.close();
  }
}

export function summaryLine(r: CrashLoopResult): string {
  return [
    `kills=${r.kills}`,
    `acknowledged=${r.acknowledged}`,
    `missing=${r.missing.length}`,
    `duplicates=${r.duplicates} (messages=${r.duplicatedMessages})`,
    `delivered_unacknowledged=${r.deliveredUnacknowledged}`,
    `stuck_sending=${r.stuckSending}`,
    `undelivered=${r.undelivered}`,
    `upstream_transactions=${r.upstreamTransactions}`,
    `final_exit=${r.finalExitCode}`,
    `spool_files_left=${r.spoolFilesLeft}`,
    `seed=${r.seed}`,
    `elapsed=${(r.elapsedMs / 1000).toFixed(1)}s`,
  ].join(' ');
}
