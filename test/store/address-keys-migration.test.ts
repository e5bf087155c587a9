import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { migrations } from '../../migrations/index.js';
import { openConnection, openStore } from '../../src/store/db.js';
import { rateWindows, senderKey } from '../../src/store/intake.js';
import { kyselyFor, migrateToLatest } from '../../src/store/migrate.js';
import { listMessages } from '../../src/store/queries.js';
import { tempDir } from '../helpers.js';

const NOW = Date.UTC(2026, 11, 6, 12, 30);

test('mail stored under the keys of older versions is rekeyed: its rate-limit counts, sender filters and recipient filters find it', async () => {
  const file = path.join(tempDir(), 'relayq.db');
  const sqlite = openConnection(file);
  const { '011_address_keys': _, ...before } = migrations;
  await migrateToLatest(kyselyFor(sqlite), before);
  // as the first versions stored them: the key the address lower-cased, nothing decoded
  const message = sqlite.prepare(
    `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, received_at, next_attempt_at, updated_at)
     VALUES (?, 'queued', ?, ?, '127.0.0.1', 10, 1, ?, ?, ?)`,
  );
  const recipient = sqlite.prepare(`INSERT INTO recipients (message_id, seq, address, status, next_attempt_at, updated_at) VALUES (?, 0, ?, 'pending', 0, 0)`);
  const stored = [
    ['OLDIDN00000000000001', 'h@XN--MNCHEN-3YA.DE', 'h@xn--mnchen-3ya.de', 'x@XN--MNCHEN-3YA.DE'],
    ['OLDIDN00000000000002', 'h@XN--MNCHEN-3YA.DE', 'h@xn--mnchen-3ya.de', 'y@example.com'],
    ['NEWIDN00000000000003', 'h@münchen.de', 'h@münchen.de', 'x@münchen.de'],
    ['OLDIP600000000000004', 'a@[IPv6:2001:DB8:0:0:0:0:0:1]', 'a@[ipv6:2001:db8:0:0:0:0:0:1]', 'r@[IPv6:2001:DB8::1]'],
    ['ASCII000000000000005', 'Plain@Example.com', 'plain@example.com', 'Z@Example.com'],
    // lower-cased, ẞ became ß, a domain of its own; IDNA maps ẞ to ss
    ['SHARPS00000000000006', 'h@ẞ.de', 'h@ß.de', 'y@example.com'],
  ] as const;
  // the first and the third in the same minute: the old key's count is added to the new one's
  const minutesAgo = [0, 1, 0, 2, 3, 4];
  for (const [i, [id, mailFrom, key, rcpt]] of stored.entries()) {
    message.run(id, mailFrom, key, NOW - minutesAgo[i] * 60_000, NOW, NOW);
    recipient.run(id, rcpt);
  }
  sqlite.close();

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
      SHARPS00000000000006: 'h@ss.de',
    });
    for (const r of stored) assert.equal(keys[r[0]], senderKey(r[1]), 'the key MAIL FROM asks for');

    // the counts moved to the current key, added to those already there; no old key is left
    const buckets = db.prepare("SELECT sender_key, SUM(count) AS n FROM rate_buckets WHERE sender_key <> '*' GROUP BY sender_key ORDER BY sender_key").all();
    assert.deepEqual(buckets, [
      { sender_key: 'a@[ipv6:2001:db8::1]', n: 1 },
      { sender_key: 'h@münchen.de', n: 3 },
      { sender_key: 'h@ss.de', n: 1 },
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
