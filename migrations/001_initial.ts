// The initial schema: messages with their raw bytes, one row per recipient, every delivery
// attempt, per-minute acceptance buckets for the rate limits, and trigger-maintained counters
// so that queue depth and lifetime totals are O(1) reads that survive restarts and retention.
import { type Kysely, sql } from 'kysely';

export async function up(db: Kysely<unknown>): Promise<void> {
  const statements = [
    `CREATE TABLE messages (
      id TEXT PRIMARY KEY,
      state TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'delivered', 'failed')),
      mail_from TEXT NOT NULL,
      sender_key TEXT NOT NULL,
      auth_user TEXT,
      client_ip TEXT NOT NULL,
      client_hostname TEXT,
      helo TEXT,
      size INTEGER NOT NULL,
      recipient_count INTEGER NOT NULL,
      raw BLOB,
      received_at INTEGER NOT NULL,
      next_attempt_at INTEGER NOT NULL,
      lease_token TEXT,
      lease_expires_at INTEGER,
      claims INTEGER NOT NULL DEFAULT 0,
      last_error TEXT,
      updated_at INTEGER NOT NULL,
      finished_at INTEGER
    )`,
    `CREATE INDEX messages_due ON messages (next_attempt_at) WHERE state = 'queued'`,
    `CREATE INDEX messages_lease ON messages (lease_expires_at) WHERE state = 'sending'`,
    `CREATE INDEX messages_state_received ON messages (state, received_at)`,
    `CREATE INDEX messages_sender ON messages (sender_key, received_at)`,
    `CREATE INDEX messages_finished ON messages (state, finished_at)`,
    `CREATE TABLE recipients (
      message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
      seq INTEGER NOT NULL,
      address TEXT NOT NULL,
      status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
      attempts INTEGER NOT NULL DEFAULT 0,
      next_attempt_at INTEGER NOT NULL,
      last_code INTEGER,
      last_reply TEXT,
      temporary INTEGER NOT NULL DEFAULT 0,
      updated_at INTEGER NOT NULL,
      PRIMARY KEY (message_id, seq)
    ) WITHOUT ROWID`,
    `CREATE INDEX recipients_address ON recipients (address)`,
    `CREATE TABLE attempts (
      id INTEGER PRIMARY KEY,
      message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
      batch INTEGER NOT NULL,
      recipients TEXT NOT NULL,
      upstream TEXT NOT NULL,
      started_at INTEGER NOT NULL,
      duration_ms INTEGER NOT NULL,
      outcome TEXT NOT NULL CHECK (outcome IN ('delivered', 'partial', 'deferred', 'failed')),
      code INTEGER,
      reply TEXT
    )`,
    `CREATE INDEX attempts_message ON attempts (message_id, id)`,
    `CREATE INDEX attempts_started ON attempts (started_at)`,
    // Accepted messages per minute, per lower-cased envelope sender ('' is the null sender)
    // and under '*' for all senders. Rolling windows sum at most 1440 rows, whatever the volume.
    `CREATE TABLE rate_buckets (
      sender_key TEXT NOT NULL,
      minute INTEGER NOT NULL,
      count INTEGER NOT NULL,
      PRIMARY KEY (sender_key, minute)
    ) WITHOUT ROWID`,
    `CREATE TABLE counters (
      name TEXT PRIMARY KEY,
      value INTEGER NOT NULL
    ) WITHOUT ROWID`,
    `INSERT INTO counters (name, value) VALUES
      ('state_queued', 0), ('state_sending', 0), ('state_delivered', 0), ('state_failed', 0),
      ('messages_accepted', 0), ('recipients_accepted', 0), ('bytes_accepted', 0),
      ('messages_delivered', 0), ('messages_failed', 0), ('processing_ms_total', 0),
      ('rate_limit_refusals', 0), ('queue_full_refusals', 0)`,
    `CREATE TRIGGER messages_counted_insert AFTER INSERT ON messages BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'state_' || NEW.state;
      UPDATE counters SET value = value + 1 WHERE name = 'messages_accepted';
      UPDATE counters SET value = value + NEW.recipient_count WHERE name = 'recipients_accepted';
      UPDATE counters SET value = value + NEW.size WHERE name = 'bytes_accepted';
      INSERT INTO rate_buckets (sender_key, minute, count) VALUES (NEW.sender_key, NEW.received_at / 60000, 1)
        ON CONFLICT (sender_key, minute) DO UPDATE SET count = count + 1;
      INSERT INTO rate_buckets (sender_key, minute, count) VALUES ('*', NEW.received_at / 60000, 1)
        ON CONFLICT (sender_key, minute) DO UPDATE SET count = count + 1;
    END`,
    `CREATE TRIGGER messages_counted_state AFTER UPDATE OF state ON messages WHEN OLD.state <> NEW.state BEGIN
      UPDATE counters SET value = value - 1 WHERE name = 'state_' || OLD.state;
      UPDATE counters SET value = value + 1 WHERE name = 'state_' || NEW.state;
    END`,
    `CREATE TRIGGER messages_counted_final AFTER UPDATE OF state ON messages
      WHEN OLD.state IN ('queued', 'sending') AND NEW.state IN ('delivered', 'failed') BEGIN
      UPDATE counters SET value = value + 1 WHERE name = 'messages_' || NEW.state;
      UPDATE counters SET value = value + (COALESCE(NEW.finished_at, NEW.updated_at) - NEW.received_at)
        WHERE name = 'processing_ms_total';
    END`,
    `CREATE TRIGGER messages_counted_delete AFTER DELETE ON messages BEGIN
      UPDATE counters SET value = value - 1 WHERE name = 'state_' || OLD.state;
    END`,
  ];
  for (const statement of statements) await sql.raw(statement).execute(db);
}
