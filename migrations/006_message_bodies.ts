// The raw bytes of a message move out of its `messages` row into `message_bodies`. In the row,
// every state change (claim, outcome, release, requeue) rewrote them: a 2 KB row fills a 4 KB page
// by itself, and a 100 KB message's whole overflow chain was written again at every claim and
// every outcome, and the columns stored after the bytes were read through that chain. The row now
// takes a few hundred bytes and points at its bytes by `body_id` (an integer key, so storing a
// message adds no index to update); the bytes are written once, read when the message is sent or
// shown, and deleted with their message (a trigger), or alone when logAllEmails=false erases
// them (body_id becomes NULL). The upgrade copies every stored message once, in the migration's
// transaction.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  const statements = [
    `CREATE TABLE message_bodies (
      id INTEGER PRIMARY KEY,
      raw BLOB NOT NULL
    )`,
    `ALTER TABLE messages ADD COLUMN body_id INTEGER`,
    `INSERT INTO message_bodies (id, raw) SELECT rowid, raw FROM messages WHERE raw IS NOT NULL ORDER BY rowid`,
    `UPDATE messages SET body_id = rowid WHERE raw IS NOT NULL`,
    `ALTER TABLE messages DROP COLUMN raw`,
    `CREATE TRIGGER messages_body_deleted AFTER DELETE ON messages WHEN OLD.body_id IS NOT NULL BEGIN
      DELETE FROM message_bodies WHERE id = OLD.body_id;
    END`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
