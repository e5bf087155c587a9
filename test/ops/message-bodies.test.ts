// The stored bytes live in message_bodies, apart from the message's row: state changes do not
// rewrite them, deleting a message deletes them, and the upgrade moves every stored message.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { migrations } from '../../migrations/index.js';
import { deleteMessage } from '../../src/store/admin.js';
import { kyselyFor, migrateToLatest, openStore, type Sqlite } from '../../src/store/db.js';
import { claimDueBatches, completeBatch } from '../../src/store/delivery.js';
import { insertMessage } from '../../src/store/intake.js';
import { messageRaw } from '../../src/store/queries.js';
import { deleteDeliveredBefore } from '../../src/store/retention.js';
import { sendMail, startTestRelay, startUpstream, tempDir } from '../helpers.js';

const POLICY = {
  rateLimits: { enabled: false, maxPerHour: 500, maxPerDay: 2000, globalMaxPerHour: 1000, globalMaxPerDay: 5000 },
  queueSize: 0,
};

function store(sqlite: Sqlite, id: string, raw: Buffer, receivedAt = 1_000) {
  const msg = { id, mailFrom: 'app@example.com', recipients: ['a@example.net'], authUser: null, clientIp: '127.0.0.1', clientHostname: null, helo: 'app', raw, receivedAt };
  return sqlite.transaction(() => insertMessage(sqlite, msg, POLICY))();
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
      claim = claimDueBatches(sqlite, { now: 2_000, leaseMs: 60_000, batchSize: 20, limit: 1, maxAttempts: 10, newToken: () => 'T' }).batches[0];
    });
    assert.deepEqual(claim?.raw, raw, 'the claim still hands over the bytes');
    const completed = walBytesOf(sqlite, file, () =>
      completeBatch(sqlite, {
        messageId: 'BIG',
        token: 'T',
        now: 3_000,
        attempt: { batch: 0, recipients: ['a@example.net'], upstream: 'mx:25', startedAt: 2_000, durationMs: 5, outcome: 'delivered', code: 250, reply: '250 ok' },
        recipients: [{ seq: 0, status: 'delivered', code: 250, reply: '250 ok', temporary: false, nextAttemptAt: 3_000 }],
        batchDelayMs: 0,
        lastError: null,
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

test('the upgrade moves every stored message into message_bodies, and the relay delivers the moved bytes', async () => {
  const dir = tempDir();
  const file = path.join(dir, 'old.db');
  const before = Object.fromEntries(Object.entries(migrations).filter(([name]) => name < '006'));
  const sqlite = new Database(file);
  const db = kyselyFor(sqlite);
  await migrateToLatest(db, before);
  const insert = sqlite.prepare(
    `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, raw, received_at, next_attempt_at, updated_at, finished_at)
     VALUES (?, ?, 'app@example.com', 'app@example.com', '127.0.0.1', ?, 1, ?, 0, 0, 0, ?)`,
  );
  const recipient = sqlite.prepare(`INSERT INTO recipients (message_id, seq, address, status, next_attempt_at, updated_at) VALUES (?, 0, ?, ?, 0, 0)`);
  const queued = Buffer.concat([Buffer.from('Subject: moved\r\n\r\n'), Buffer.alloc(70_000, 'abc\r\n'), Buffer.from([0xe9, 0x0d, 0x0a])]);
  const kept = Buffer.from('Subject: kept\r\n\r\ndelivered, content kept\r\n');
  insert.run('Q', 'queued', queued.length, queued, null);
  insert.run('K', 'delivered', kept.length, kept, 10);
  insert.run('E', 'delivered', 99, null, 10);
  recipient.run('Q', 'q@example.net', 'pending');
  recipient.run('K', 'k@example.net', 'delivered');
  recipient.run('E', 'e@example.net', 'delivered');

  assert.deepEqual(await migrateToLatest(db), ['006_message_bodies']);
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
