import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import * as initial from '../../migrations/001_initial.js';
import { openStore } from '../../src/store/db.js';
import { kyselyFor, migrateToLatest } from '../../src/store/migrate.js';
import { storeMetrics } from '../../src/store/queries.js';
import { tempDir } from '../helpers.js';

test('the metrics migration starts its counters from the rows of an existing database', async () => {
  const file = path.join(tempDir(), 'old.db');
  const sqlite = new Database(file);
  const db = kyselyFor(sqlite);
  await migrateToLatest(db, { '001_initial': initial });
  const message = sqlite.prepare(
    `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, raw, received_at, next_attempt_at, updated_at, claims)
     VALUES (?, ?, 'a@example.com', 'a@example.com', '127.0.0.1', 10, 1, x'00', 0, 0, 0, ?)`,
  );
  message.run('A', 'queued', 2);
  message.run('B', 'queued', 0);
  message.run('C', 'failed', 1);
  const attempt = sqlite.prepare(
    `INSERT INTO attempts (message_id, batch, recipients, upstream, started_at, duration_ms, outcome)
     VALUES (?, 0, '[]', 'mx:25', ?, ?, ?)`,
  );
  attempt.run('C', 1000, 20, 'failed');
  attempt.run('A', 2000, 70, 'delivered');
  attempt.run('A', 3000, 5, 'deferred');
  attempt.run('A', 4000, 999_999, 'deferred');
  await db.destroy();

  const store = await openStore(file);
  try {
    const m = storeMetrics(store.sqlite);
    assert.equal(m.deferred, 1, 'A: queued and claimed before');
    assert.deepEqual(m.attempts, { delivered: 1, partial: 0, deferred: 2, failed: 1 });
    assert.equal(m.attemptDuration.count, 4);
    assert.equal(m.attemptDuration.sumMs, 20 + 70 + 5 + 999_999);
    const counts = Object.fromEntries(m.attemptDuration.buckets.map((b) => [String(b.leMs), b.count]));
    assert.equal(counts['10'], 1);
    assert.equal(counts['25'], 1);
    assert.equal(counts['100'], 1);
    assert.equal(counts.Infinity, 1);
    assert.deepEqual(m.upstream, { lastSuccessAt: 2070, lastFailureAt: 4000 + 999_999, consecutiveFailures: 2 });

    // From here on the triggers keep them.
    store.sqlite.prepare("UPDATE messages SET state = 'sending', claims = claims + 1 WHERE id = 'A'").run();
    store.sqlite.prepare("UPDATE messages SET state = 'queued', claims = claims + 1 WHERE id = 'B'").run();
    store.sqlite.prepare("UPDATE messages SET state = 'queued' WHERE id = 'C'").run();
    const after = storeMetrics(store.sqlite);
    assert.equal(after.deferred, 2, 'B and C now; A is being sent');
    assert.equal(after.messagesRequeued, 1);
    store.sqlite.prepare("DELETE FROM messages WHERE id = 'C'").run();
    assert.equal(storeMetrics(store.sqlite).deferred, 1);
  } finally {
    await store.close();
  }
});

test('a migration that fails part-way leaves nothing behind, and the next start applies it whole', async () => {
  const { sql } = await import('kysely');
  const file = path.join(tempDir(), 'upgrade.db');
  const sqlite = new Database(file);
  const db = kyselyFor(sqlite);
  try {
    await migrateToLatest(db, { '001_initial': initial });
    let crash = true;
    const next = {
      async up(trx: Parameters<typeof initial.up>[0]) {
        await sql`CREATE TABLE upgrade_half (x INTEGER)`.execute(trx);
        await sql`DROP TRIGGER messages_counted_insert`.execute(trx);
        if (crash) throw new Error('killed in the middle of the migration');
        await sql`CREATE TABLE upgrade_rest (x INTEGER)`.execute(trx);
      },
    };
    await assert.rejects(migrateToLatest(db, { '001_initial': initial, '002_next': next }), /killed in the middle/);
    const names = (type: string) => (sqlite.prepare('SELECT name FROM sqlite_schema WHERE type = ? ORDER BY name').all(type) as Array<{ name: string }>).map((r) => r.name);
    assert.ok(!names('table').includes('upgrade_half'), 'the first statement was rolled back with the rest');
    assert.ok(names('trigger').includes('messages_counted_insert'), 'the dropped trigger is back');
    assert.deepEqual((sqlite.prepare('SELECT name FROM schema_migrations').all() as Array<{ name: string }>).map((r) => r.name), ['001_initial']);

    crash = false;
    assert.deepEqual(await migrateToLatest(db, { '001_initial': initial, '002_next': next }), ['002_next']);
    assert.ok(names('table').includes('upgrade_rest'));
  } finally {
    await db.destroy();
  }
});
