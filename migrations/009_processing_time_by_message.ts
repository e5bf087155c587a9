// /metrics' `avg_processing_time_ms` was the processing-time total over every time a message
// became final. A failed message that is requeued (by hand, or every failedRetryInterval) and
// fails again added its whole age once more each time, so one message left failing for days
// pulled the mean up by hours. `processing_ms_by_message` counts each message once, by its last
// outcome, as `success_rate` does: a requeue takes back what the message's failure added. An
// older database cannot tell which part of its lifetime total the requeued failures added, so the
// new total starts where the mean stays what it was: the lifetime total's share of the messages
// counted now. `processing_ms_total` (relayq_message_processing_seconds_total, a Prometheus
// counter) stays what it was.
import { type Kysely, sql } from 'kysely';

const COUNTER = (name: string) => `COALESCE((SELECT value FROM counters WHERE name = '${name}'), 0)`;
const AGE = (row: 'NEW' | 'OLD') => `MAX(0, COALESCE(${row}.finished_at, ${row}.updated_at) - ${row}.received_at)`;

export async function up(db: Kysely<unknown>): Promise<void> {
  const statements = [
    `INSERT INTO counters (name, value)
      SELECT 'processing_ms_by_message', CASE WHEN finals = 0 THEN 0 ELSE total * (delivered + MAX(0, failed - requeued)) / finals END
      FROM (SELECT MAX(0, ${COUNTER('processing_ms_total')}) AS total, ${COUNTER('messages_delivered')} AS delivered,
              ${COUNTER('messages_failed')} AS failed, ${COUNTER('messages_requeued')} AS requeued,
              ${COUNTER('messages_delivered')} + ${COUNTER('messages_failed')} AS finals)`,
    `DROP TRIGGER messages_counted_final`,
    `CREATE TRIGGER messages_counted_final AFTER UPDATE OF state ON messages
      WHEN OLD.state IN ('queued', 'sending') AND NEW.state IN ('delivered', 'failed') BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'messages_' || NEW.state;
      UPDATE counters SET value = value + ${AGE('NEW')} WHERE name IN ('processing_ms_total', 'processing_ms_by_message');
    END`,
    `CREATE TRIGGER messages_processing_requeue AFTER UPDATE OF state ON messages
      WHEN OLD.state = 'failed' AND NEW.state IN ('queued', 'sending') BEGIN
      UPDATE counters SET value = MAX(0, value - ${AGE('OLD')}) WHERE name = 'processing_ms_by_message';
    END`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
