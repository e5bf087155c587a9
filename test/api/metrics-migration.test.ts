import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { Kysely, SqliteDialect } from 'kysely';
import * as initial from '../../migrations/001_initial.js';
import { migrateToLatest, openStore } from '../../src/store/db.js';
import { storeMetrics } from '../../src/store/queries.js';
import { tempDir } from '../helpers.js';

test('the metrics migration starts its counters from the rows of an existing database', async () => {
  const file = path.join(tempDir(), 'old.db');
  const sqlite = new Database(file);
  const db = new Kysely({ dialect: new SqliteDialect({ database: sqlite }) });
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
