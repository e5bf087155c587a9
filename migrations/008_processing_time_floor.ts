// The lifetime processing time (`processing_ms_total`, /metrics' `avg_processing_time_ms` and
// `relayq_message_processing_seconds_total`) adds each final message's time from receipt to its
// end on the wall clock. A clock stepped back between the two made that negative, and the total
// went down: a counter that Prometheus reads as reset, and that the exposition refuses while the
// total is below zero. A message now adds at least 0; a total already below zero starts again at 0.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  const statements = [
    `DROP TRIGGER messages_counted_final`,
    `CREATE TRIGGER messages_counted_final AFTER UPDATE OF state ON messages
      WHEN OLD.state IN ('queued', 'sending') AND NEW.state IN ('delivered', 'failed') BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'messages_' || NEW.state;
      UPDATE counters SET value = value + MAX(0, COALESCE(NEW.finished_at, NEW.updated_at) - NEW.received_at)
        WHERE name = 'processing_ms_total';
    END`,
    `UPDATE counters SET value = 0 WHERE name = 'processing_ms_total' AND value < 0`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
