// Writes a large queue database for the scale benchmark: N messages in a file created with the
// real migrations, inserted with raw SQL in big transactions directly in their final states (the
// columns the intake and the delivery engine would have set), so the schema's triggers keep the
// counters and rate buckets as production would have them. Mostly delivered, some deferred and
// some failed, from many senders (one of them sending a tenth of all mail), spread over the 23
// hours before `now`, small bodies.
//
//   npm run fixture -- --messages 1000000 --out data/fixture.db
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { openStore } from '../../src/store/db.js';
import { senderKey } from '../../src/store/intake.js';

export interface FixtureOptions {
  messages: number;
  /** The end of the fixture's time range (ms); the scale measurements use the same value. */
  now: number;
  /** Rows per transaction. */
  chunk?: number;
}

export interface FixtureSummary {
  file: string;
  messages: number;
  delivered: number;
  queued: number;
  failed: number;
  senders: number;
  hotSender: string;
  /** Messages of the hot sender (in the last day, all of them). */
  hotSenderMessages: number;
  spanMs: number;
  now: number;
  /** Latest next_attempt_at of the deferred messages: at this time every one of them is due. */
  allDueAt: number;
  bytes: number;
  seconds: number;
}

export const HOT_SENDER = 'hot@bench.example';
/** Names of the other senders (sender0 ... sender999), each at up to seven domains (app0 ... app6). */
const SENDERS = 1000;
const SPAN_MS = 23 * 3600_000;

function rawMessage(i: number, from: string): Buffer {
  return Buffer.from(
    `Received: from app.bench.example ([127.0.0.1])\r\n\tby relayq.bench (relayq) with ESMTP;\r\n\tThu, 1 Jan 2026 00:00:00 +0000\r\nFrom: <${from}>\r\nTo: <user${i % 5000}@example.net>\r\nSubject: fixture message ${i}\r\nMessage-ID: <fixture-${i}@bench.example>\r\n\r\nHello, this is fixture message ${i}.\r\n`,
  );
}

/** What happens to message i: 97 % delivered, 2 % deferred (still queued), 1 % failed. */
function fateOf(i: number): 'delivered' | 'queued' | 'failed' {
  const r = i % 100;
  if (r === 0) return 'failed';
  if (r === 1 || r === 2) return 'queued';
  return 'delivered';
}

export async function writeFixture(file: string, options: FixtureOptions): Promise<FixtureSummary> {
  const started = performance.now();
  for (const suffix of ['', '-wal', '-shm']) fs.rmSync(file + suffix, { force: true });
  const store = await openStore(file);
  const { sqlite } = store;
  // Bulk load: nothing here needs to survive a crash, the file is rebuilt on the next run.
  sqlite.pragma('journal_mode = OFF');
  sqlite.pragma('synchronous = OFF');
  sqlite.pragma('cache_size = -262144');
  const chunk = options.chunk ?? 50_000;
  const start = options.now - SPAN_MS;
  const step = SPAN_MS / Math.max(1, options.messages);
  const summary = { delivered: 0, queued: 0, failed: 0, hotSenderMessages: 0, allDueAt: options.now };
  const senders = new Set<string>();

  const insertMessageRow = sqlite.prepare(
    `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, helo, size, recipient_count, body_id, received_at,
       next_attempt_at, claims, last_error, updated_at, finished_at)
     VALUES (?, ?, ?, ?, '127.0.0.1', 'app.bench.example', ?, ?, ?, ?, ?, 1, ?, ?, ?)`,
  );
  const insertBody = sqlite.prepare('INSERT INTO message_bodies (raw) VALUES (?)');
  const insertRecipient = sqlite.prepare(
    `INSERT INTO recipients (message_id, seq, address, status, attempts, next_attempt_at, last_code, last_reply, temporary, updated_at)
     VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?)`,
  );
  const insertAttempt = sqlite.prepare(
    `INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome, code, reply)
     VALUES (?, 0, ?, 'smarthost.example:587', ?, ?, ?, ?, ?)`,
  );

  const writeChunk = sqlite.transaction((from: number, to: number) => {
    for (let i = from; i < to; i++) {
      const receivedAt = Math.floor(start + i * step);
      const hot = i % 10 === 3;
      const mailFrom = hot ? HOT_SENDER : `sender${i % SENDERS}@app${i % 7}.bench.example`;
      if (hot) summary.hotSenderMessages++;
      senders.add(mailFrom);
      const recipients = i % 20 === 7 ? [`user${i % 5000}@example.net`, `other${i % 977}@example.org`] : [`user${i % 5000}@example.net`];
      // sortable, unique and deterministic, in the shape of newQueueId
      const id = receivedAt.toString(16).toUpperCase().padStart(11, '0') + i.toString(16).toUpperCase().padStart(9, '0');
      const raw = rawMessage(i, mailFrom);
      const fate = fateOf(i);
      const attemptAt = receivedAt + 50;
      const duration = 20 + (i % 180);
      const doneAt = attemptAt + duration;
      let status: 'delivered' | 'failed' | 'pending' = 'delivered';
      let code = 250;
      let reply = '250 2.0.0 Ok: queued';
      let nextAttemptAt = receivedAt;
      if (fate === 'failed') {
        status = 'failed';
        code = 550;
        reply = '550 5.1.1 <user@example.net>: Recipient address rejected';
      } else if (fate === 'queued') {
        // deferred, due a day after `now`: a relay started on a reused fixture finds nothing to
        // deliver, so the file stays as written (the claim benchmark passes allDueAt as its now)
        status = 'pending';
        code = 451;
        reply = '451 4.3.0 Temporary local problem, try again';
        nextAttemptAt = options.now + 86_400_000 + (i % 3_540_000);
        summary.allDueAt = Math.max(summary.allDueAt, nextAttemptAt);
      }
      summary[fate]++;
      insertMessageRow.run(
        id,
        fate,
        mailFrom,
        senderKey(mailFrom),
        raw.length,
        recipients.length,
        insertBody.run(raw).lastInsertRowid,
        receivedAt,
        nextAttemptAt,
        fate === 'delivered' ? null : reply,
        doneAt,
        fate === 'queued' ? null : doneAt,
      );
      for (const [seq, address] of recipients.entries()) {
        insertRecipient.run(id, seq, address, status, nextAttemptAt, code, reply, fate === 'queued' ? 1 : 0, doneAt);
      }
      insertAttempt.run(id, JSON.stringify(recipients), attemptAt, duration, fate === 'queued' ? 'deferred' : fate, code, reply);
    }
  });
  for (let from = 0; from < options.messages; from += chunk) writeChunk(from, Math.min(options.messages, from + chunk));
  // The insert triggers kept the state counts, acceptance totals, rate buckets and attempt
  // counters. The lifetime totals that triggers keep on a state *change* are set here, as if
  // every final message had got there through the delivery engine.
  sqlite.exec(`
    UPDATE counters SET value = (SELECT COUNT(*) FROM messages WHERE state = 'delivered') WHERE name = 'messages_delivered';
    UPDATE counters SET value = (SELECT COUNT(*) FROM messages WHERE state = 'failed') WHERE name = 'messages_failed';
    UPDATE counters SET value = (SELECT COALESCE(SUM(finished_at - received_at), 0) FROM messages WHERE finished_at IS NOT NULL)
      WHERE name IN ('processing_ms_total', 'processing_ms_by_message');`);
  // no ANALYZE: a production database has no planner statistics either
  sqlite.pragma('journal_mode = WAL');
  await store.close();
  return {
    file,
    messages: options.messages,
    ...summary,
    senders: senders.size,
    hotSender: HOT_SENDER,
    spanMs: SPAN_MS,
    now: options.now,
    bytes: fs.statSync(file).size,
    seconds: (performance.now() - started) / 1000,
  };
}

async function main() {
  const { values } = parseArgs({ options: { messages: { type: 'string', default: '1000000' }, out: { type: 'string' } } });
  const messages = /^\d+$/.test(values.messages) ? Number(values.messages) : Number.NaN;
  if (!Number.isSafeInteger(messages) || messages < 1) throw new Error(`--messages takes a positive integer, not "${values.messages}"`);
  const out = path.resolve(values.out ?? path.join('data', `fixture-${messages}.db`));
  fs.mkdirSync(path.dirname(out), { recursive: true });
  const summary = await writeFixture(out, { messages, now: Date.now() });
  process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err) => {
    process.stderr.write(`fixture failed: ${(err as Error).message}\n`);
    process.exit(1);
  });
}
