// Hourly rate-limit buckets next to the per-minute ones, so that a rolling day is summed from at
// most 24 hourly rows plus the minutes at its two ends (about 140 rows) instead of 1,440 minute
// rows. Both are kept by the insert trigger in the same transaction as the message. The trigger
// is rewritten here; its four counter updates become one statement, which pays for the new upsert.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  const statements = [
    `CREATE TABLE rate_hours (
      sender_key TEXT NOT NULL,
      hour INTEGER NOT NULL,
      count INTEGER NOT NULL,
      PRIMARY KEY (sender_key, hour)
    ) WITHOUT ROWID`,
    `CREATE INDEX rate_hours_hour ON rate_hours (hour)`,
    `INSERT INTO rate_hours (sender_key, hour, count)
      SELECT sender_key, minute / 60, SUM(count) FROM rate_buckets GROUP BY sender_key, minute / 60`,
    `DROP TRIGGER messages_counted_insert`,
    `CREATE TRIGGER messages_counted_insert AFTER INSERT ON messages BEGIN
      UPDATE counters SET value = value + CASE name
          WHEN 'recipients_accepted' THEN NEW.recipient_count
          WHEN 'bytes_accepted' THEN NEW.size
          ELSE 1 END
        WHERE name IN ('state_' || NEW.state, 'messages_accepted', 'recipients_accepted', 'bytes_accepted');
      INSERT INTO rate_buckets (sender_key, minute, count) VALUES (NEW.sender_key, NEW.received_at / 60000, 1), ('*', NEW.received_at / 60000, 1)
        ON CONFLICT (sender_key, minute) DO UPDATE SET count = count + 1;
      INSERT INTO rate_hours (sender_key, hour, count) VALUES (NEW.sender_key, NEW.received_at / 3600000, 1), ('*', NEW.received_at / 3600000, 1)
        ON CONFLICT (sender_key, hour) DO UPDATE SET count = count + 1;
    END`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
