// Mail never claimed yet, in the order it came: claims alternate between it and all due mail (the
// oldest due first), as Postfix's queue manager alternates between its incoming and deferred
// queues, so that new mail does not wait behind a backlog of retries. An entry lives from the
// message's insert to its first claim.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`CREATE INDEX messages_new ON messages (next_attempt_at) WHERE state = 'queued' AND claims = 0`.execute(db);
}
