// Every schema migration, in order. Listed here (not discovered on disk) so that the same
// code runs from TypeScript sources and from the compiled build; a name missing from names.ts,
// or one of its names missing here, does not compile.
import type { Migration } from 'kysely';
import * as initial from './001_initial.js';
import * as metrics from './002_metrics.js';
import * as rateBucketMinute from './003_rate_bucket_minute.js';
import * as rateHours from './004_rate_hours.js';
import * as recipientAddressNocase from './005_recipient_address_nocase.js';
import * as messageBodies from './006_message_bodies.js';
import * as upstreamFailures from './007_upstream_failures.js';
import * as processingTimeFloor from './008_processing_time_floor.js';
import * as processingTimeByMessage from './009_processing_time_by_message.js';
import * as smtpUtf8Request from './010_smtputf8_request.js';
import * as addressKeys from './011_address_keys.js';
import * as newMailIndex from './012_new_mail_index.js';
import type { MigrationName } from './names.js';

export const migrations: Record<MigrationName, Migration> = {
  '001_initial': initial,
  '002_metrics': metrics,
  '003_rate_bucket_minute': rateBucketMinute,
  '004_rate_hours': rateHours,
  '005_recipient_address_nocase': recipientAddressNocase,
  '006_message_bodies': messageBodies,
  '007_upstream_failures': upstreamFailures,
  '008_processing_time_floor': processingTimeFloor,
  '009_processing_time_by_message': processingTimeByMessage,
  '010_smtputf8_request': smtpUtf8Request,
  '011_address_keys': addressKeys,
  '012_new_mail_index': newMailIndex,
};
