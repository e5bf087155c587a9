// Mail stored by earlier relayq under the keys the addresses get now (addressKey). The first
// versions keyed a sender by its address lower-cased: a domain with `XN--` in capitals stayed in
// its ASCII form (smtp-server decodes only lower-case `xn--` labels), an IPv6 literal kept the
// client's spelling, and so on. Such a sender's mail of the last day was then not counted toward
// its rate limits, and the sender filters did not find its mail; a recipient stored with such a
// domain was not found by the decoded form. Rows are rewritten only where a key differs. The
// candidates are found in SQL: `xn--` in any case, an IPv6 literal, or a character that is not
// ASCII (more bytes than characters); every key an earlier version wrote for a sender that needs
// a new one is one of them, as each lower-cased or decoded the address. On a 1,000,000-message
// database with none to rewrite the migration reads for about half a second.
import { type Kysely, sql } from 'kysely';
import { addressKey, decodeIdnDomain } from '../src/address.js';

/** A condition that every address addressKey or decodeIdnDomain may change meets. */
const mayChange = (column: string) =>
  sql.raw(`(${column} LIKE '%xn--%' OR ${column} LIKE '%[ipv6:%' OR length(CAST(${column} AS BLOB)) <> length(${column}))`);

export async function up(db: Kysely<unknown>): Promise<void> {
  // each old key's new keys, as its messages' senders have them now
  const rekeyed = new Map<string, Set<string>>();
  const senders = await sql<{ id: string; mail_from: string; sender_key: string }>`
    SELECT id, mail_from, sender_key FROM messages WHERE ${mayChange('sender_key')}`.execute(db);
  for (const m of senders.rows) {
    const key = addressKey(m.mail_from);
    let keys = rekeyed.get(m.sender_key);
    if (!keys) rekeyed.set(m.sender_key, (keys = new Set()));
    keys.add(key);
    if (key !== m.sender_key) await sql`UPDATE messages SET sender_key = ${key} WHERE id = ${m.id}`.execute(db);
  }

  // The rate-limit counts move to the key their messages have now, added to what is counted
  // there already: the old key lower-cased the address, which IDNA maps otherwise (`h@ΑΣ-1.gr` was
  // `h@ας-1.gr`, a domain of its own, and is `h@ασ-1.gr`), so it is not always addressKey(old key).
  // An old key whose messages went to two keys keeps its counts, which cannot be told apart;
  // one whose messages are gone takes addressKey's.
  for (const table of ['rate_buckets', 'rate_hours'] as const) {
    const slot = sql.raw(table === 'rate_buckets' ? 'minute' : 'hour');
    const keys = await sql<{ sender_key: string }>`
      SELECT DISTINCT sender_key FROM ${sql.table(table)} WHERE sender_key <> '*' AND ${mayChange('sender_key')}`.execute(db);
    for (const { sender_key: old } of keys.rows) {
      const targets = rekeyed.get(old) ?? new Set([addressKey(old)]);
      const [key] = targets;
      if (targets.size !== 1 || key === old) continue;
      await sql`INSERT INTO ${sql.table(table)} (sender_key, ${slot}, count)
        SELECT ${key}, ${slot}, count FROM ${sql.table(table)} WHERE sender_key = ${old}
        ON CONFLICT (sender_key, ${slot}) DO UPDATE SET count = count + excluded.count`.execute(db);
      await sql`DELETE FROM ${sql.table(table)} WHERE sender_key = ${old}`.execute(db);
    }
  }

  const recipients = await sql<{ message_id: string; seq: number; address: string }>`
    SELECT message_id, seq, address FROM recipients WHERE ${mayChange('address')}`.execute(db);
  for (const r of recipients.rows) {
    const address = decodeIdnDomain(r.address);
    if (address !== r.address) await sql`UPDATE recipients SET address = ${address} WHERE message_id = ${r.message_id} AND seq = ${r.seq}`.execute(db);
  }
}
