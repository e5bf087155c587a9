import assert from 'node:assert/strict';
import { test } from 'node:test';
import { openStore } from '../../src/store/db.js';
import { rateWindows, senderKey } from '../../src/store/intake.js';
import { listMessages } from '../../src/store/queries.js';
import { databaseAtMigration } from '../helpers.js';

const NOW = Date.UTC(2026, 11, 6, 12, 30);

/** A database at the migration before 011 holding `stored` (id, sender, its old key, one recipient), received `minutesAgo`. */
function olderDatabase(stored: ReadonlyArray<readonly [string, string, string, string]>, minutesAgo: readonly number[]): Promise<string> {
  return databaseAtMigration('010_smtputf8_request', (sqlite) => {
    const message = sqlite.prepare(
      `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, received_at, next_attempt_at, updated_at)
       VALUES (?, 'queued', ?, ?, '127.0.0.1', 10, 1, ?, ?, ?)`,
    );
    const recipient = sqlite.prepare(`INSERT INTO recipients (message_id, seq, address, status, next_attempt_at, updated_at) VALUES (?, 0, ?, 'pending', 0, 0)`);
    for (const [i, [id, mailFrom, key, rcpt]] of stored.entries()) {
      message.run(id, mailFrom, key, NOW - minutesAgo[i] * 60_000, NOW, NOW);
      recipient.run(id, rcpt);
    }
  });
}

test('mail stored under the keys of older versions is rekeyed: its rate-limit counts, sender filters and recipient filters find it', async () => {
  // as the first versions stored them: the key the address lower-cased, nothing decoded
  const stored = [
    ['OLDIDN00000000000001', 'h@XN--MNCHEN-3YA.DE', 'h@xn--mnchen-3ya.de', 'x@XN--MNCHEN-3YA.DE'],
    ['OLDIDN00000000000002', 'h@XN--MNCHEN-3YA.DE', 'h@xn--mnchen-3ya.de', 'y@example.com'],
    ['NEWIDN00000000000003', 'h@münchen.de', 'h@münchen.de', 'x@münchen.de'],
    ['OLDIP600000000000004', 'a@[IPv6:2001:DB8:0:0:0:0:0:1]', 'a@[ipv6:2001:db8:0:0:0:0:0:1]', 'r@[IPv6:2001:DB8::1]'],
    ['ASCII000000000000005', 'Plain@Example.com', 'plain@example.com', 'Z@Example.com'],
    // lower-cased, a final Σ became ς, a domain of its own; IDNA maps Σ to σ
    ['SIGMAS00000000000006', 'h@ΑΣ-1.gr', 'h@ας-1.gr', 'y@example.com'],
  ] as const;
  // the first and the third in the same minute: the old key's count is added to the new one's
  const file = await olderDatabase(stored, [0, 1, 0, 2, 3, 4]);

  const store = await openStore(file);
  try {
    const db = store.sqlite;
    const keys = Object.fromEntries((db.prepare('SELECT id, sender_key FROM messages').all() as Array<{ id: string; sender_key: string }>).map((r) => [r.id, r.sender_key]));
    assert.deepEqual(keys, {
      OLDIDN00000000000001: 'h@münchen.de',
      OLDIDN00000000000002: 'h@münchen.de',
      NEWIDN00000000000003: 'h@münchen.de',
      OLDIP600000000000004: 'a@[ipv6:2001:db8::1]',
      ASCII000000000000005: 'plain@example.com',
      SIGMAS00000000000006: 'h@ασ-1.gr',
    });
    for (const r of stored) assert.equal(keys[r[0]], senderKey(r[1]), 'the key MAIL FROM asks for');

    // the counts moved to the current key, added to those already there; no old key is left
    const buckets = db.prepare("SELECT sender_key, SUM(count) AS n FROM rate_buckets WHERE sender_key <> '*' GROUP BY sender_key ORDER BY sender_key").all();
    assert.deepEqual(buckets, [
      { sender_key: 'a@[ipv6:2001:db8::1]', n: 1 },
      { sender_key: 'h@münchen.de', n: 3 },
      { sender_key: 'h@ασ-1.gr', n: 1 },
      { sender_key: 'plain@example.com', n: 1 },
    ]);
    assert.deepEqual(db.prepare("SELECT minute, count FROM rate_buckets WHERE sender_key = 'h@münchen.de' ORDER BY minute").all(), [
      { minute: NOW / 60_000 - 1, count: 1 },
      { minute: NOW / 60_000, count: 2 },
    ]);
    const hours = db.prepare("SELECT sender_key, SUM(count) AS n FROM rate_hours WHERE sender_key <> '*' GROUP BY sender_key ORDER BY sender_key").all();
    assert.deepEqual(hours, buckets);
    assert.deepEqual(rateWindows(db, senderKey('h@XN--MNCHEN-3YA.DE'), NOW), { maxPerHour: 3, maxPerDay: 3, globalMaxPerHour: 6, globalMaxPerDay: 6 });

    const ids = (filter: { sender?: string; recipient?: string }) => listMessages(db, { ...filter, limit: 10 }).messages.map((m) => m.id).sort();
    assert.deepEqual(ids({ sender: 'H@münchen.de' }), ['NEWIDN00000000000003', 'OLDIDN00000000000001', 'OLDIDN00000000000002']);
    assert.deepEqual(ids({ sender: 'a@[IPv6:2001:db8::1]' }), ['OLDIP600000000000004']);
    assert.deepEqual(ids({ recipient: 'x@münchen.de' }), ['NEWIDN00000000000003', 'OLDIDN00000000000001']);
    assert.deepEqual(ids({ recipient: 'r@[ipv6:2001:db8:0:0:0:0:0:1]' }), ['OLDIP600000000000004']);
    const addresses = db.prepare('SELECT address FROM recipients ORDER BY message_id').all().map((r) => (r as { address: string }).address);
    // rewritten as intake stores them now; an ASCII address keeps the case it was given
    assert.deepEqual(addresses, ['Z@Example.com', 'x@münchen.de', 'x@münchen.de', 'y@example.com', 'r@[IPv6:2001:db8::1]', 'y@example.com']);
  } finally {
    await store.close();
  }
});

test('an old key whose messages now have two keys keeps its rate-limit counts: they cannot be told apart', async () => {
  // h@ΑΣ-1.gr and h@ας-1.gr were both keyed h@ας-1.gr (lower case makes a final Σ ς); now h@ασ-1.gr and h@ας-1.gr
  const file = await olderDatabase(
    [
      ['SIGMAS00000000000001', 'h@ΑΣ-1.gr', 'h@ας-1.gr', 'y@example.com'],
      ['SIGMAS00000000000002', 'h@ας-1.gr', 'h@ας-1.gr', 'y@example.com'],
    ],
    [0, 1],
  );
  const store = await openStore(file);
  try {
    const db = store.sqlite;
    assert.deepEqual(db.prepare('SELECT id, sender_key FROM messages ORDER BY id').all(), [
      { id: 'SIGMAS00000000000001', sender_key: 'h@ασ-1.gr' },
      { id: 'SIGMAS00000000000002', sender_key: 'h@ας-1.gr' },
    ]);
    for (const table of ['rate_buckets', 'rate_hours']) {
      const counts = db.prepare(`SELECT sender_key, SUM(count) AS n FROM ${table} WHERE sender_key <> '*' GROUP BY sender_key`).all();
      assert.deepEqual(counts, [{ sender_key: 'h@ας-1.gr', n: 2 }], table);
    }
  } finally {
    await store.close();
  }
});
