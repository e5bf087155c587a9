// The run of failed attempts that /health reads (`upstream_consecutive_failures`) no longer grows
// with every attempt that delivered nothing: an upstream that refuses a message for good (a 5xx
// to an unknown address) works, and a relay whose mail all went to bad addresses reported
// "upstream failing" with nothing in its queue until the next delivery. Whether an attempt
// failed for the upstream's sake is decided where its outcome is recorded (completeBatch, from
// the transport's verdict per recipient), which the attempts row does not say, so this trigger
// stops keeping that counter; it keeps the others as 002 made them. The run as it stands is
// kept: the next attempt that delivers or is refused ends it.
import { type Kysely, sql } from 'kysely';
import { bucketOf, SUCCESS } from './002_metrics.js';

export async function up(db: Kysely<unknown>): Promise<void> {
  const statements = [
    `DROP TRIGGER attempts_counted`,
    `CREATE TRIGGER attempts_counted AFTER INSERT ON attempts BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'attempts_' || NEW.outcome;
      UPDATE counters SET value = value + NEW.duration_ms WHERE name = 'attempt_duration_ms_total';
      UPDATE counters SET value = value + 1 WHERE name = ${bucketOf('NEW.duration_ms')};
      UPDATE counters SET value = MAX(value, NEW.started_at + NEW.duration_ms)
        WHERE name = CASE WHEN NEW.outcome IN ${SUCCESS} THEN 'upstream_last_success_at' ELSE 'upstream_last_failure_at' END;
    END`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
