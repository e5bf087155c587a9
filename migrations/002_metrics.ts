// Counters for the HTTP API's health and metrics, kept by triggers in the same transaction as
// the change they count, so /health and /metrics read a few rows whatever the queue holds and
// report the same numbers after a restart: queued messages that were tried before, requeues of
// failed mail, delivery attempts by outcome, a histogram of attempt durations, and the
// upstream's last success, last failure and current run of failed attempts.
import { type Kysely, sql } from 'kysely';

/**
 * Upper bounds (ms) of the attempt-duration buckets. Each attempt increments exactly one
 * counter, `attempt_duration_le_<bound>` or `attempt_duration_le_inf`; readers derive the
 * bounds from the counter names. 007 writes the trigger again with a copy of this list.
 */
const DURATION_BUCKETS_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000];

/** Outcomes that show the upstream took the mail (at least for some recipients). */
const SUCCESS = `('delivered', 'partial')`;

export async function up(db: Kysely<unknown>): Promise<void> {
  const bucketNames = [...DURATION_BUCKETS_MS.map(String), 'inf'].map((bound) => `'attempt_duration_le_${bound}'`);
  const bucketOf = (duration: string) =>
    `CASE ${DURATION_BUCKETS_MS.map((ms) => `WHEN ${duration} <= ${ms} THEN 'attempt_duration_le_${ms}'`).join(' ')} ELSE 'attempt_duration_le_inf' END`;
  const statements = [
    // Starting values come from the rows already there (a one-time scan at upgrade).
    `INSERT INTO counters (name, value) VALUES
      ('queued_deferred', (SELECT COUNT(*) FROM messages WHERE state = 'queued' AND claims > 0)),
      ('messages_requeued', 0),
      ('attempts_delivered', (SELECT COUNT(*) FROM attempts WHERE outcome = 'delivered')),
      ('attempts_partial', (SELECT COUNT(*) FROM attempts WHERE outcome = 'partial')),
      ('attempts_deferred', (SELECT COUNT(*) FROM attempts WHERE outcome = 'deferred')),
      ('attempts_failed', (SELECT COUNT(*) FROM attempts WHERE outcome = 'failed')),
      ('attempt_duration_ms_total', (SELECT COALESCE(SUM(duration_ms), 0) FROM attempts)),
      ('upstream_last_success_at', (SELECT COALESCE(MAX(started_at + duration_ms), 0) FROM attempts WHERE outcome IN ${SUCCESS})),
      ('upstream_last_failure_at', (SELECT COALESCE(MAX(started_at + duration_ms), 0) FROM attempts WHERE outcome NOT IN ${SUCCESS})),
      ('upstream_consecutive_failures', (SELECT COUNT(*) FROM attempts WHERE id > COALESCE((SELECT MAX(id) FROM attempts WHERE outcome IN ${SUCCESS}), 0)))`,
    `INSERT INTO counters (name, value) VALUES ${bucketNames.map((name) => `(${name}, 0)`).join(', ')}`,
    `INSERT INTO counters (name, value) SELECT ${bucketOf('duration_ms')}, COUNT(*) FROM attempts WHERE true GROUP BY 1
      ON CONFLICT (name) DO UPDATE SET value = excluded.value`,

    // "Deferred" = queued and claimed before: waiting for a retry rather than for a first try.
    `CREATE TRIGGER messages_counted_deferred_insert AFTER INSERT ON messages
      WHEN NEW.state = 'queued' AND NEW.claims > 0 BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'queued_deferred';
    END`,
    `CREATE TRIGGER messages_counted_deferred_update AFTER UPDATE OF state, claims ON messages
      WHEN (OLD.state = 'queued' AND OLD.claims > 0) <> (NEW.state = 'queued' AND NEW.claims > 0) BEGIN
      UPDATE counters SET value = value + (CASE WHEN NEW.state = 'queued' AND NEW.claims > 0 THEN 1 ELSE -1 END)
        WHERE name = 'queued_deferred';
    END`,
    `CREATE TRIGGER messages_counted_deferred_delete AFTER DELETE ON messages
      WHEN OLD.state = 'queued' AND OLD.claims > 0 BEGIN
      UPDATE counters SET value = value - 1 WHERE name = 'queued_deferred';
    END`,
    // A failed message that goes back to the queue (by hand or by failedRetryInterval). The
    // lifetime messages_failed stays monotonic; failed-net-of-requeues is the difference.
    `CREATE TRIGGER messages_counted_requeue AFTER UPDATE OF state ON messages
      WHEN OLD.state = 'failed' AND NEW.state IN ('queued', 'sending') BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'messages_requeued';
    END`,

    `CREATE TRIGGER attempts_counted AFTER INSERT ON attempts BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'attempts_' || NEW.outcome;
      UPDATE counters SET value = value + NEW.duration_ms WHERE name = 'attempt_duration_ms_total';
      UPDATE counters SET value = value + 1 WHERE name = ${bucketOf('NEW.duration_ms')};
      UPDATE counters SET value = CASE WHEN NEW.outcome IN ${SUCCESS} THEN 0 ELSE value + 1 END
        WHERE name = 'upstream_consecutive_failures';
      UPDATE counters SET value = MAX(value, NEW.started_at + NEW.duration_ms)
        WHERE name = CASE WHEN NEW.outcome IN ${SUCCESS} THEN 'upstream_last_success_at' ELSE 'upstream_last_failure_at' END;
    END`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
