// The crash loop behind `npm run soak` and its short version in `npm test`: relayq runs as a child
// process forwarding to a counting upstream in this process, several clients send continuously
// (1-5 recipients a message, in batches of 2, so most messages take several upstream
// transactions), the upstream defers some recipients with 451, and the relay is killed with
// SIGKILL at random moments (every third time in the middle of a SIGTERM shutdown) and restarted
// on the same files. At the end everything must drain: every recipient of every queue id that got
// a 250 reached the upstream (missing = 0), no message is left in 'sending', and the copies beyond
// the first are counted per recipient (at-least-once).
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
  /** Distinct queue ids that got `250 ... queued as <id>`, and their recipients. */
  acknowledged: number;
  acknowledgedRecipients: number;
  /** Kills that came while a SIGTERM shutdown was under way. */
  shutdownKills: number;
  /** Recipients of acknowledged ids the upstream never received, as "<id> <address>". */
  missing: string[];
  /** Acknowledged ids that are not in the database. */
  notStored: string[];
  /** Recipient copies the upstream received beyond the first, and of how many messages. */
  duplicates: number;
  duplicatedMessages: number;
  /** Delivered although the client never saw the 250 (killed between commit and reply). */
  deliveredUnacknowledged: number;
  /** Messages still in 'sending' (or holding a lease) after the drain. */
  stuckSending: number;
  /** Messages not delivered after the drain (queued or failed). */
  undelivered: number;
  upstreamTransactions: number;
  /** RCPTs the upstream answered with 451 (each is delivered by a later attempt). */
  upstreamDeferrals: number;
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

/** Recipients of an upstream transaction the relay's attempt is deferred for, at random. */
const UPSTREAM_DEFERRAL_RATE = 0.1;

/**
 * The smart host: defers a tenth of the recipients (451), takes the rest a little slowly, and
 * counts the copies of each recipient per relayq queue id ("<id> <address>").
 */
async function startCountingUpstream(random: () => number) {
  const copies = new Map<string, number>();
  let transactions = 0;
  let deferrals = 0;
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    disableReverseLookup: true,
    logger: false,
    closeTimeout: 100,
    onRcptTo(_address, _session, cb) {
      if (random() >= UPSTREAM_DEFERRAL_RATE) return cb();
      deferrals++;
      cb(Object.assign(new Error('4.2.0 try again later'), { responseCode: 451 }));
    },
    onData(stream, session, cb) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const head = Buffer.concat(chunks).subarray(0, 2048).toString('latin1');
        const id = QUEUE_ID_IN_RECEIVED.exec(head)?.[1] ?? 'unparsable';
        // a short think time keeps deliveries in flight when the kill comes
        setTimeout(() => {
          transactions++;
          for (const r of session.envelope.rcptTo) {
            const key = `${id} ${r.address}`;
            copies.set(key, (copies.get(key) ?? 0) + 1);
          }
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
    deferrals: () => deferrals,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** One client: sessions of up to 20 messages, reconnecting to whatever port the relay has now. */
async function sendContinuously(
  client: number,
  current: { port: number },
  acknowledged: Map<string, string[]>,
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
        const rcpts = Array.from({ length: 1 + Math.floor(random() * 5) }, (_, r) => `c${client}m${n}r${r}@example.org`);
        let ok = true;
        for (const r of rcpts) if (ok) ok = (await c.send(`RCPT TO:<${r}>`)).startsWith('250');
        if (!ok || !(await c.send('DATA')).startsWith('354')) break;
        const reply = await c.send(`Message-ID: <c${client}.${n}@crash-loop.test>\r\nSubject: crash loop ${client}/${n}\r\n\r\nbody ${n}\r\n${filler}.`);
        const id = /^250 2\.0\.0 Ok: queued as ([0-9A-F]{20})$/.exec(reply)?.[1];
        if (!id) break;
        acknowledged.set(id, rcpts);
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
    '--batchSize', '2',
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
  const acknowledged = new Map<string, string[]>();
  const stop = { now: false };
  const current = { port: 0 };
  let relay: RelayProcess = await spawnRelay(dir, flags);
  current.port = relay.smtpPort;
  const clients = Array.from({ length: options.clients }, (_, i) => sendContinuously(i, current, acknowledged, stop, seededRandom(options.seed + i + 1), filler));
  let kills = 0;
  let shutdownKills = 0;
  let finalExitCode: number | null = null;
  try {
    for (let k = 0; k < options.kills; k++) {
      const [min, max] = options.uptimeMs;
      await sleep(min + random() * (max - min));
      current.port = 0;
      if (k % 3 === 2) {
        // in the middle of an orderly stop: attempts finishing, claims being handed back
        relay.child.kill('SIGTERM');
        await sleep(random() * 60);
        if (relay.child.exitCode === null) shutdownKills++;
      }
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
      const ackedRecipients = [...acknowledged].flatMap(([id, rcpts]) => rcpts.map((r) => `${id} ${r}`));
      let duplicates = 0;
      const duplicated = new Set<string>();
      const received = new Set<string>();
      for (const [key, n] of upstream.copies) {
        const id = key.split(' ')[0];
        received.add(id);
        if (n > 1) {
          duplicates += n - 1;
          duplicated.add(id);
        }
      }
      result = {
        seed: options.seed,
        kills,
        shutdownKills,
        acknowledged: acknowledged.size,
        acknowledgedRecipients: ackedRecipients.length,
        missing: ackedRecipients.filter((key) => !upstream.copies.has(key)),
        notStored: [...acknowledged.keys()].filter((id) => !stored.has(id)),
        duplicates,
        duplicatedMessages: duplicated.size,
        deliveredUnacknowledged: [...received].filter((id) => !acknowledged.has(id)).length,
        stuckSending: count("SELECT COUNT(*) AS n FROM messages WHERE state = 'sending' OR lease_token IS NOT NULL"),
        undelivered: count("SELECT COUNT(*) AS n FROM messages WHERE state <> 'delivered'"),
        upstreamTransactions: upstream.transactions(),
        upstreamDeferrals: upstream.deferrals(),
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
    `kills=${r.kills} (in_shutdown=${r.shutdownKills})`,
    `acknowledged=${r.acknowledged} (recipients=${r.acknowledgedRecipients})`,
    `missing=${r.missing.length}`,
    `duplicates=${r.duplicates} (messages=${r.duplicatedMessages})`,
    `delivered_unacknowledged=${r.deliveredUnacknowledged}`,
    `stuck_sending=${r.stuckSending}`,
    `undelivered=${r.undelivered}`,
    `upstream_transactions=${r.upstreamTransactions}`,
    `upstream_deferrals=${r.upstreamDeferrals}`,
    `final_exit=${r.finalExitCode}`,
    `spool_files_left=${r.spoolFilesLeft}`,
    `seed=${r.seed}`,
    `elapsed=${(r.elapsedMs / 1000).toFixed(1)}s`,
  ].join(' ');
}
