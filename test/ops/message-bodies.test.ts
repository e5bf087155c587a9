// The stored bytes live in message_bodies, apart from the message's row: state changes do not
// rewrite them, deleting a message deletes them, and the upgrade moves every stored message.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { migrations } from '../../migrations/index.js';
import { MIGRATION_NAMES } from '../../migrations/names.js';
import { deleteMessage } from '../../src/store/admin.js';
import { openStore, type Sqlite } from '../../src/store/db.js';
import { kyselyFor, migrateToLatest } from '../../src/store/migrate.js';
import { claimDueBatches, completeBatch } from '../../src/store/delivery.js';
import { insertMessage } from '../../src/store/intake.js';
import { lockDatabase } from '../../src/store/maintenance.js';
import { messageRaw } from '../../src/store/queries.js';
import { deleteDeliveredBefore } from '../../src/store/retention.js';
import { runCli } from '../cli/run-cli.js';
import { capturedLog, NO_LIMITS, newMessage, sendMail, startTestRelay, startUpstream, tempDir } from '../helpers.js';

function store(sqlite: Sqlite, id: string, raw: Buffer, receivedAt = 1_000) {
  const msg = newMessage({ id, mailFrom: 'app@example.com', recipients: ['a@example.net'], raw, receivedAt });
  return sqlite.transaction(() => insertMessage(sqlite, msg, NO_LIMITS))();
}

function bodyCount(sqlite: Sqlite): number {
  return (sqlite.prepare('SELECT COUNT(*) AS n FROM message_bodies').get() as { n: number }).n;
}

/** Bytes the write added to the -wal file, starting from an empty one. */
function walBytesOf(sqlite: Sqlite, file: string, write: () => void): number {
  sqlite.pragma('wal_checkpoint(TRUNCATE)');
  assert.equal(fs.statSync(`${file}-wal`).size, 0);
  sqlite.transaction(write).immediate();
  return fs.statSync(`${file}-wal`).size;
}

test('claiming a 200 KB message and recording its outcome write a few pages, not its bytes again', async () => {
  const file = path.join(tempDir(), 'bodies.db');
  const { sqlite, close } = await openStore(file);
  try {
    const raw = Buffer.alloc(200_000, 'line of text\r\n');
    const stored = walBytesOf(sqlite, file, () => store(sqlite, 'BIG', raw));
    assert.ok(stored > raw.length, `the insert writes the bytes once (${stored} bytes of WAL)`);

    let claim: ReturnType<typeof claimDueBatches>['batches'][number] | undefined;
    const claimed = walBytesOf(sqlite, file, () => {
      claim = claimDueBatches(sqlite, { now: 2_000, leaseMs: 60_000, batchSize: 20, limit: 1, maxAttempts: 10, eraseRawOnDelivered: false, newToken: () => 'T' }).batches[0];
    });
    assert.deepEqual(claim?.raw, raw, 'the claim still hands over the bytes');
    const completed = walBytesOf(sqlite, file, () =>
      completeBatch(sqlite, {
        messageId: 'BIG',
        token: 'T',
        now: 3_000,
        attempt: { batch: 0, recipients: ['a@example.net'], upstream: 'mx:25', startedAt: 2_000, durationMs: 5, outcome: 'delivered', code: 250, reply: '250 ok' },
        recipients: [{ seq: 0, attempts: 1, status: 'delivered', code: 250, reply: '250 ok', temporary: false, nextAttemptAt: 3_000 }],
        upstreamFailed: false,
        batchDelayMs: 0,
        lastFailure: null,
        eraseRawOnDelivered: false,
      }),
    );
    for (const [what, bytes] of [['claim', claimed], ['outcome', completed]] as const) {
      assert.ok(bytes < 25 * 4096, `the ${what} wrote ${bytes} bytes of WAL for a ${raw.length}-byte message`);
    }
    assert.deepEqual(messageRaw(sqlite, 'BIG')?.raw, raw);
  } finally {
    await close();
  }
});

test('deleting a message, by hand or by retention, deletes its bytes', async () => {
  const file = path.join(tempDir(), 'bodies.db');
  const { sqlite, close } = await openStore(file);
  try {
    for (const id of ['A', 'B', 'C']) store(sqlite, id, Buffer.from(`Subject: ${id}\r\n\r\nbody\r\n`));
    assert.equal(bodyCount(sqlite), 3);
    assert.equal(deleteMessage(sqlite, 'A', 5_000), 'deleted');
    assert.equal(bodyCount(sqlite), 2);
    sqlite.prepare("UPDATE messages SET state = 'delivered', finished_at = 2_000 WHERE id = 'B'").run();
    assert.equal(deleteDeliveredBefore(sqlite, 3_000, 10), 1);
    assert.equal(bodyCount(sqlite), 1);
    assert.equal(messageRaw(sqlite, 'C')?.raw?.toString(), 'Subject: C\r\n\r\nbody\r\n');
  } finally {
    await close();
  }
});

test('retention deletes no more stored bytes in one batch than it may, but always one message; erased content counts nothing', async () => {
  const file = path.join(tempDir(), 'batch.db');
  const { sqlite, close } = await openStore(file);
  try {
    for (const id of ['A', 'B', 'C', 'D', 'E']) store(sqlite, id, Buffer.alloc(1000, 'x'));
    // E's content was erased at its delivery (logAllEmails=false)
    sqlite.prepare("DELETE FROM message_bodies WHERE id = (SELECT body_id FROM messages WHERE id = 'E')").run();
    sqlite.prepare("UPDATE messages SET body_id = NULL WHERE id = 'E'").run();
    sqlite.prepare("UPDATE messages SET state = 'delivered', finished_at = CASE id WHEN 'A' THEN 1 WHEN 'B' THEN 2 WHEN 'C' THEN 3 WHEN 'D' THEN 4 ELSE 0 END").run();
    const left = () => (sqlite.prepare('SELECT id FROM messages ORDER BY id').all() as Array<{ id: string }>).map((r) => r.id);
    // E (nothing stored), A and B: 2,000 bytes, all the batch may take; with C it would be 3,000
    assert.equal(deleteDeliveredBefore(sqlite, 10, 10, 2_000), 3);
    assert.deepEqual(left(), ['C', 'D']);
    assert.equal(deleteDeliveredBefore(sqlite, 10, 10, 500), 1, 'one message even when it alone is larger');
    assert.deepEqual(left(), ['D']);
  } finally {
    await close();
  }
});

interface OldMessage {
  id: string;
  state: 'queued' | 'delivered' | 'failed';
  raw: Buffer | null;
  rcpt: string;
}

/** A database with the schema before migration `next` (006 by default: bytes in messages.raw), holding `messages`. */
async function databaseBefore006(file: string, messages: OldMessage[], next = '006') {
  const before = Object.fromEntries(Object.entries(migrations).filter(([name]) => name < next));
  const sqlite = new Database(file);
  const db = kyselyFor(sqlite);
  await migrateToLatest(db, before);
  const insert = sqlite.prepare(
    `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, raw, received_at, next_attempt_at, updated_at, finished_at)
     VALUES (?, ?, 'app@example.com', 'app@example.com', '127.0.0.1', ?, 1, ?, 0, 0, 0, ?)`,
  );
  const recipient = sqlite.prepare(`INSERT INTO recipients (message_id, seq, address, status, next_attempt_at, updated_at) VALUES (?, 0, ?, ?, 0, 0)`);
  for (const m of messages) {
    insert.run(m.id, m.state, m.raw?.length ?? 99, m.raw, m.state === 'queued' ? null : 10);
    recipient.run(m.id, m.rcpt, m.state === 'queued' ? 'pending' : m.state);
  }
  return { sqlite, db };
}

test('the upgrade moves every stored message into message_bodies, and the relay delivers the moved bytes', async () => {
  const file = path.join(tempDir(), 'old.db');
  const queued = Buffer.concat([Buffer.from('Subject: moved\r\n\r\n'), Buffer.alloc(70_000, 'abc\r\n'), Buffer.from([0xe9, 0x0d, 0x0a])]);
  const kept = Buffer.from('Subject: kept\r\n\r\ndelivered, content kept\r\n');
  const { sqlite, db } = await databaseBefore006(file, [
    { id: 'Q', state: 'queued', raw: queued, rcpt: 'q@example.net' },
    { id: 'K', state: 'delivered', raw: kept, rcpt: 'k@example.net' },
    { id: 'E', state: 'delivered', raw: null, rcpt: 'e@example.net' },
  ]);

  assert.deepEqual(await migrateToLatest(db), MIGRATION_NAMES.filter((name) => name >= '006'));
  const columns = (sqlite.prepare('PRAGMA table_info(messages)').all() as Array<{ name: string }>).map((c) => c.name);
  assert.ok(!columns.includes('raw') && columns.includes('body_id'), columns.join(', '));
  assert.deepEqual(messageRaw(sqlite, 'Q')?.raw, queued);
  assert.deepEqual(messageRaw(sqlite, 'K')?.raw, kept);
  assert.deepEqual(messageRaw(sqlite, 'E'), { raw: null }, 'erased content stays erased');
  assert.equal(bodyCount(sqlite), 2);
  assert.equal(sqlite.pragma('integrity_check', { simple: true }), 'ok');
  await db.destroy();

  const upstream = await startUpstream();
  const relay = await startTestRelay(
    { databasePath: file, forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port },
    { startDelivery: false },
  );
  try {
    await relay.delivery.runOnce();
    assert.deepEqual(
      upstream.received.map((m) => [m.to, m.raw]),
      [[['q@example.net'], queued]],
    );
    // and new mail goes to the new table as well
    const id = /queued as (\S+)/.exec((await sendMail(relay.smtpPort, { raw: kept })).response)?.[1] ?? '';
    assert.ok(messageRaw(relay.store.sqlite, id)?.raw?.subarray(-kept.length).equals(kept));
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('a start that migrates says which migrations it applies before it begins, and how long they took after; the next start says nothing', async () => {
  const file = path.join(tempDir(), 'old.db');
  const { db } = await databaseBefore006(file, [{ id: 'Q', state: 'queued', raw: Buffer.from('Subject: q\r\n\r\nbody\r\n'), rcpt: 'q@example.net' }]);
  await db.destroy();
  const migrationLines = async () => {
    const { logger, entries } = capturedLog('info');
    const relay = await startTestRelay({ databasePath: file }, { logger, startDelivery: false });
    await relay.stop();
    return entries().filter((e) => e.event === 'store.migrating' || e.event === 'store.migrated');
  };
  const pending = MIGRATION_NAMES.filter((name) => name >= '006');
  const [starting, done, ...more] = await migrationLines();
  assert.deepEqual([starting?.event, starting?.migrations, done?.event, done?.migrations, more], ['store.migrating', pending, 'store.migrated', pending, []]);
  assert.equal(typeof done.durationMs, 'number');
  assert.deepEqual(await migrationLines(), []);
});

test('with logAllEmails=false no copy of moved content stays in the file once the mail is delivered', async () => {
  const file = path.join(tempDir(), 'old.db');
  const marker = 'PRIVATE-CONTENT-7Q2X';
  const { db } = await databaseBefore006(file, [
    { id: 'S', state: 'queued', raw: Buffer.from(`Subject: short\r\n\r\n${marker}\r\n`), rcpt: 's@example.net' },
    { id: 'L', state: 'queued', raw: Buffer.from(`Subject: long\r\n\r\n${marker}\r\n${'x'.repeat(30_000)}\r\n${marker}\r\n`), rcpt: 'l@example.net' },
  ]);
  await db.destroy();
  const upstream = await startUpstream();
  const relay = await startTestRelay(
    { databasePath: file, forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, security: { logAllEmails: false } },
    { startDelivery: false },
  );
  try {
    await relay.delivery.runOnce();
    assert.equal(upstream.received.length, 2);
    assert.equal(bodyCount(relay.store.sqlite), 0, 'erased at delivery');
  } finally {
    await relay.stop();
    await upstream.close();
  }
  const onDisk = [file, `${file}-wal`].filter((f) => fs.existsSync(f)).map((f) => fs.readFileSync(f));
  for (const bytes of onDisk) assert.equal(bytes.indexOf(marker), -1, 'the migration rewrote those rows with secure_delete on');
});

test('CLI commands that read refuse a database the migration has not reached yet, in one line', async () => {
  const dir = tempDir();
  const file = path.join(dir, 'old.db');
  const { db } = await databaseBefore006(file, [{ id: 'F', state: 'failed', raw: Buffer.from('Subject: f\r\n\r\nf\r\n'), rcpt: 'f@example.net' }]);
  await db.destroy();
  for (const args of [['show', 'F'], ['show', 'F', '--raw']]) {
    const r = await runCli([...args, '--databasePath', file]);
    assert.equal(r.code, 1, `${args.join(' ')}: ${r.stdout}`);
    assert.match(r.stderr.trim(), /^relayq: database .*old\.db needs migrations \(no such (table|column): [a-z_0-9]+\): stop any relayq running on it, then run `relayq migrate` or start the server$/);
  }
  // export-failed reads the newest tables: it asks for every migration, before it makes its directory
  const exports = path.join(dir, 'exports');
  const r = await runCli(['export-failed', exports, '--databasePath', file]);
  assert.equal(r.code, 1, r.stdout);
  assert.match(r.stderr.trim(), /^relayq: database .*old\.db needs migrations 006_message_bodies, 007_upstream_failures, 008_processing_time_floor, 009_processing_time_by_message, 010_smtputf8_request, 011_address_keys, 012_new_mail_index: stop any relayq running on it, then run `relayq migrate`/);
  assert.equal(fs.existsSync(exports), false);
  // status reads counters that the pending migrations add: it would report them as 0
  for (const args of [['status'], ['status', '--json']]) {
    const s = await runCli([...args, '--databasePath', file]);
    assert.equal(s.code, 1, `${args.join(' ')}: ${s.stdout}`);
    assert.match(s.stderr.trim(), /^relayq: database .*old\.db needs migrations 006_message_bodies, .*012_new_mail_index: stop any relayq running on it, then run `relayq migrate` or start the server$/);
  }
  // with a relay running on it (which migrates it as it starts, or is older), the advice says so
  const lock = lockDatabase(file);
  try {
    for (const args of [['status'], ['show', 'F']]) {
      const s = await runCli([...args, '--databasePath', file]);
      assert.equal(s.code, 1, `${args.join(' ')}: ${s.stdout}`);
      assert.match(s.stderr.trim(), /^relayq: database .*old\.db needs migrations .*: a relayq runs on it: this version applies them as it starts \(its store\.migrated log line says when they are done\), an older one does not \(stop it, and start this version\)$/);
    }
  } finally {
    lock.release();
  }
});

test('a WAL grown past 16 MiB under a long reader is cut back to 16 MiB once the reader is gone', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const file = relay.config.databasePath;
  const wal = () => fs.statSync(`${file}-wal`).size;
  const reader = new Database(file, { readonly: true });
  try {
    // a backup or a sqlite3 shell in the middle of its read: no checkpoint may pass its snapshot
    reader.prepare('BEGIN').run();
    reader.prepare('SELECT count(*) FROM messages').get();
    const text = 'x'.repeat(1024 * 1024);
    for (let i = 0; i < 20; i++) await sendMail(relay.smtpPort, { text });
    assert.ok(wal() > 20 * 1024 * 1024, `control: the WAL grew (${wal()} bytes)`);
    reader.prepare('COMMIT').run();
    // the next commits checkpoint it all, then start the WAL over and cut the file back
    for (let i = 0; i < 5 && wal() > 16 * 1024 * 1024; i++) await sendMail(relay.smtpPort);
    assert.ok(wal() <= 16 * 1024 * 1024, `the WAL is ${wal()} bytes`);
  } finally {
    reader.close();
    await relay.stop();
  }
});

test('a database a newer relayq migrated is refused by the start, by relayq migrate, export-failed and the CLI commands that write, and left as it was; the other reads work', async () => {
  const dir = tempDir();
  const file = path.join(dir, 'newer.db');
  const relay = await startTestRelay({ databasePath: file }, { startDelivery: false, startRetention: false });
  const id = (await sendMail(relay.smtpPort)).response.split(' ').pop() as string;
  await relay.stop();
  const db = new Database(file);
  db.prepare("INSERT INTO schema_migrations (name, timestamp) VALUES ('999_from_the_future', '2030-01-01T00:00:00.000Z')").run();
  db.close();
  const before = fs.readFileSync(file);
  const newer = /it was migrated by a newer relayq \(999_from_the_future\): run that version, or restore the backup taken before the upgrade/;
  // the lock file the refused start makes stays: another relayq may have opened it in the moment
  // since this one let go (removed, a third one would make a new file and run beside that one);
  // only one made beside another program's file is removed
  fs.rmSync(`${file}-lock`);
  await assert.rejects(startTestRelay({ databasePath: file }), newer);
  assert.ok(fs.existsSync(`${file}-lock`));
  for (const args of [['migrate'], ['delete', id], ['retry', id], ['export-failed', path.join(dir, 'exports')]]) {
    const r = await runCli([...args, '--databasePath', file]);
    assert.equal(r.code, 1, `${args.join(' ')}: ${r.stdout}`);
    assert.match(r.stderr.trim(), newer, args.join(' '));
  }
  assert.deepEqual(fs.readFileSync(file), before);
  for (const args of [['show', id], ['status'], ['queue'], ['backup', path.join(dir, 'copy.db')]]) {
    const r = await runCli([...args, '--databasePath', file]);
    assert.equal(r.code, 0, `reading still works: ${args.join(' ')}: ${r.stderr}`);
  }
});

test('a database of the first relayq, which recorded the metrics migration as 003_metrics, is migrated: the CLI says so, and the start migrates it', async () => {
  const dir = tempDir();
  const file = path.join(dir, 'first.db');
  const { sqlite, db } = await databaseBefore006(file, [{ id: 'Q', state: 'queued', raw: Buffer.from('Subject: q\r\n\r\nbody\r\n'), rcpt: 'q@example.net' }], '003');
  sqlite.prepare("UPDATE schema_migrations SET name = '003_metrics' WHERE name = '002_metrics'").run();
  await db.destroy();
  const later = MIGRATION_NAMES.filter((name) => name >= '003');
  const s = await runCli(['status', '--databasePath', file]);
  assert.equal(s.code, 1, s.stdout);
  assert.equal(s.stderr.trim(), `relayq: database ${file} needs migrations ${later.join(', ')}: stop any relayq running on it, then run \`relayq migrate\` or start the server`);

  const upstream = await startUpstream();
  const { logger, entries } = capturedLog('info');
  const relay = await startTestRelay({ databasePath: file, forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port }, { logger, startDelivery: false });
  try {
    assert.deepEqual(entries().find((e) => e.event === 'store.migrated')?.migrations, later);
    const recorded = relay.store.sqlite.prepare('SELECT name FROM schema_migrations ORDER BY name').pluck().all();
    assert.deepEqual(recorded, [...MIGRATION_NAMES]);
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.received.map((m) => m.to), [['q@example.net']]);
  } finally {
    await relay.stop();
    await upstream.close();
  }
  // and relayq migrate, on another such database
  const other = path.join(dir, 'other.db');
  const made = await databaseBefore006(other, [], '003');
  made.sqlite.prepare("UPDATE schema_migrations SET name = '003_metrics' WHERE name = '002_metrics'").run();
  await made.db.destroy();
  const m = await runCli(['migrate', '--databasePath', other]);
  assert.equal(m.code, 0, m.stderr);
  const reader = new Database(other, { readonly: true });
  assert.deepEqual(reader.prepare('SELECT name FROM schema_migrations ORDER BY name').pluck().all(), [...MIGRATION_NAMES]);
  reader.close();
});

test('an upgrade of such a database that fails part-way (a full disk) leaves it recorded as the first relayq knows it, and a later one migrates it', async () => {
  const file = path.join(tempDir(), 'first.db');
  const made = await databaseBefore006(file, [], '004');
  made.sqlite.prepare("UPDATE schema_migrations SET name = '003_metrics' WHERE name = '002_metrics'").run();
  await made.db.destroy();
  const sqlite = new Database(file);
  try {
    const recorded = () => sqlite.prepare('SELECT name FROM schema_migrations ORDER BY name').pluck().all();
    const before = recorded();
    assert.deepEqual(before, ['001_initial', '003_metrics', '003_rate_bucket_minute']);
    // the file may not grow: the first migration that adds a table fails
    sqlite.pragma(`max_page_count = ${sqlite.pragma('page_count', { simple: true })}`);
    await assert.rejects(migrateToLatest(kyselyFor(sqlite)), /database or disk is full/);
    assert.deepEqual(recorded(), before, 'the first relayq would find migrations it does not know');
    sqlite.pragma('max_page_count = 1073741823');
    assert.deepEqual(await migrateToLatest(kyselyFor(sqlite)), MIGRATION_NAMES.filter((name) => name >= '004'));
    assert.deepEqual(recorded(), [...MIGRATION_NAMES]);
  } finally {
    sqlite.close();
  }
});

test('a databasePath that is a directory is refused as one', async () => {
  const dir = tempDir();
  await assert.rejects(startTestRelay({ databasePath: dir }), new RegExp(`^Error: databasePath ${dir}: ${dir} is a directory$`));
});
