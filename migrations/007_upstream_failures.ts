// The run of failed attempts that /health reads (`upstream_consecutive_failures`) counts only the
// attempts that failed for the upstream's sake, which completeBatch decides from the transport's
// verdict per recipient; the attempts row does not hold it, so this trigger stops keeping that
// counter and keeps the others as 002 made them. The run as it stands is kept.
import { type Kysely, sql } from 'kysely';

/** 002's attempt-duration buckets (ms), as 002 wrote them into its trigger. */
const DURATION_BUCKETS_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000];
const BUCKET = `CASE ${DURATION_BUCKETS_MS.map((ms) => `WHEN NEW.duration_ms <= ${ms} THEN 'attempt_duration_le_${ms}'`).join(' ')} ELSE 'attempt_duration_le_inf' END`;

export async function up(db: Kysely<unknown>): Promise<void> {
  const statements = [
    `DROP TRIGGER attempts_counted`,
    `CREATE TRIGGER attempts_counted AFTER INSERT ON attempts BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'attempts_' || NEW.outcome;
      UPDATE counters SET value = value + NEW.duration_ms WHERE name = 'attempt_duration_ms_total';
      UPDATE counters SET value = value + 1 WHERE name = ${BUCKET};
      UPDATE counters SET value = MAX(value, NEW.started_at + NEW.duration_ms)
        WHERE name = CASE WHEN NEW.outcome IN ('delivered', 'partial') THEN 'upstream_last_success_at' ELSE 'upstream_last_failure_at' END;
    END`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
