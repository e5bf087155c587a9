// The copy of a failed message for people and other tools: emailsDir/failed/<id>.json, written
// atomically after the commit that marked the message failed (re-export overwrites it). The
// database stays the source of truth; the export can be redone from it at any time.
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Sqlite } from '../store/db.js';
import { type FailedMessageRecord, loadMessageRecord } from '../store/delivery.js';
import { writeFileAtomic } from './atomic-file.js';
import { safeFileStem } from './local.js';

export const FAILED_EXPORT_VERSION = 1;

export function failedExportPath(emailsDir: string, id: string): string {
  return path.join(emailsDir, 'failed', `${safeFileStem(id)}.json`);
}

const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());

/** The JSON document of a failed message (documented in the README). */
export function failedExportDocument(record: FailedMessageRecord, exportedAt: number): Record<string, unknown> {
  return {
    version: FAILED_EXPORT_VERSION,
    id: record.id,
    state: record.state,
    envelope: { mailFrom: record.mailFrom, rcptTo: record.recipients.map((r) => r.address) },
    recipients: record.recipients.map((r) => ({
      address: r.address,
      status: r.status,
      attempts: r.attempts,
      lastCode: r.lastCode,
      lastReply: r.lastReply,
      temporary: r.temporary,
    })),
    receivedAt: iso(record.receivedAt),
    failedAt: iso(record.finishedAt),
    lastError: record.lastError,
    client: { ip: record.clientIp, hostname: record.clientHostname, helo: record.helo, authUser: record.authUser },
    size: record.size,
    attempts: record.attempts.map((a) => ({ ...a, startedAt: iso(a.startedAt) })),
    exportedAt: iso(exportedAt),
    raw: record.raw ? record.raw.toString('base64') : null,
  };
}

/**
 * Writes the export of message `id` if it is failed; returns the file, or undefined when the
 * message is gone or no longer failed (a retry got in first).
 */
export async function exportFailedMessage(sqlite: Sqlite, emailsDir: string, id: string, now: number): Promise<string | undefined> {
  const record = loadMessageRecord(sqlite, id);
  if (record?.state !== 'failed') return undefined;
  const file = failedExportPath(emailsDir, id);
  await writeFileAtomic(file, `${JSON.stringify(failedExportDocument(record, now), null, 2)}\n`);
  return file;
}

/** A message that was failed and got delivered after a retry: its export is no longer true. */
export async function removeFailedExport(emailsDir: string, id: string): Promise<boolean> {
  try {
    await fs.unlink(failedExportPath(emailsDir, id));
    return true;
  } catch {
    return false;
  }
}
