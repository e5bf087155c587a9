// The recipient filter of the message list ignores case, as the sender filter does: the index on
// the address becomes one on its lower-cased form. Addresses keep the case the client gave; the
// index costs what the old one did (one entry per recipient). SQLite's lower() folds ASCII only.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`CREATE INDEX recipients_address_lower ON recipients (lower(address))`.execute(db);
  await sql`DROP INDEX recipients_address`.execute(db);
}
