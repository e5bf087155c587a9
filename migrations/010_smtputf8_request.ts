// The client's SMTPUTF8 request (RFC 6531) is kept with its message, so that delivery makes it
// too where the upstream offers SMTPUTF8: a message with UTF-8 in its header fields only (RFC
// 6532) needs it as much as one with a UTF-8 address. Mail stored before this has none (0), and
// goes out as it did.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`ALTER TABLE messages ADD COLUMN smtputf8 INTEGER NOT NULL DEFAULT 0`.execute(db);
}
