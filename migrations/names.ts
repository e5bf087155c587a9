// The schema migrations' names, in order. What a database's schema_migrations is checked against
// (needs migrating? migrated by a newer relayq?) without loading the migrations and the query
// builder they are written with: a start with nothing to migrate, the writer thread and the CLI
// do without it. index.ts must list exactly these, which its type checks.
export const MIGRATION_NAMES = [
  '001_initial',
  '002_metrics',
  '003_rate_bucket_minute',
  '004_rate_hours',
  '005_recipient_address_nocase',
  '006_message_bodies',
  '007_upstream_failures',
  '008_processing_time_floor',
  '009_processing_time_by_message',
  '010_smtputf8_request',
  '011_address_keys',
  '012_new_mail_index',
] as const;

export type MigrationName = (typeof MIGRATION_NAMES)[number];
