// Retention prunes rate-limit buckets older than a day by minute; without an index that is a scan
// of the whole table on the writer thread (about 900,000 rows at a million messages a day).
// Updating a bucket's count does not touch this index, only the first message of a minute does.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`CREATE INDEX rate_buckets_minute ON rate_buckets (minute)`.execute(db);
}
