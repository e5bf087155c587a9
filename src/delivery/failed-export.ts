// The copy of a failed message for people and other tools: emailsDir/failed/<id>.json, written
// atomically after the commit that marked the message failed (re-export overwrites it). The
// database stays the source of truth; the export can be redone from it at any time.
import fs from 'node:fs/promises';
import path from 'node:path';
import { isoTime } from '../clock.js';
import type { Sqlite } from '../store/db.js';
import { failedAt, failedMessage, type MessageDetail, messageState } from '../store/queries.js';
import { writeFileAtomic } from './atomic-file.js';
import { safeFileStem } from './local.js';

const FAILED_EXPORT_VERSION = 1;

/** emailsDir/failed: where failed mail is exported. */
export function failedExportDir(emailsDir: string): string {
  return path.join(emailsDir, 'failed');
}

/** The file of `id`'s export in `directory`. */
function exportFile(directory: string, id: string): string {
  return path.join(directory, `${safeFileStem(id)}.json`);
}

/** Where the relay keeps the export of `id`: in emailsDir/failed. */
export function failedExportPath(emailsDir: string, id: string): string {
  return exportFile(failedExportDir(emailsDir), id);
}

/** The JSON document of a failed message (documented in the README), but for its last key, `raw`. */
function failedExportDocument(detail: MessageDetail, exportedAt: number): Record<string, unknown> {
  const { message: m, recipients, attempts } = detail;
  return {
    version: FAILED_EXPORT_VERSION,
    id: m.id,
    state: m.state,
    // near the top: after a start, relayq reads each export up to here to find the outdated
    // ones (exportIsCurrent)
    receivedAt: isoTime(m.received_at),
    failedAt: isoTime(m.finished_at),
    envelope: { mailFrom: m.mail_from, rcptTo: recipients.map((r) => r.address) },
    recipients: recipients.map((r) => ({
      address: r.address,
      status: r.status,
      attempts: r.attempts,
      lastCode: r.last_code,
      lastReply: r.last_reply,
      temporary: r.temporary === 1,
    })),
    lastError: m.last_error,
    client: { ip: m.client_ip, hostname: m.client_hostname, helo: m.helo, authUser: m.auth_user },
    size: m.size,
    attempts: attempts.map((a) => ({
      batch: a.batch,
      recipients: a.recipients,
      upstream: a.upstream,
      startedAt: isoTime(a.started_at),
      durationMs: a.duration_ms,
      outcome: a.outcome,
      code: a.code,
      reply: a.reply,
    })),
    exportedAt: isoTime(exportedAt),
  };
}

/** An export is read this many bytes at a time to find its `failedAt`, at most HEAD_LIMIT bytes far. */
const HEAD_STEP = 16 * 1024;
const HEAD_LIMIT = 4 * 1024 * 1024;

/**
 * Whether the export of a failed message at `file` is there and of its last failure: its
 * `failedAt` is `finishedAt`. One that a requeue and a new failure made outdated (the process
 * died before the new export was written) is not. `failedAt` is near the top (after the
 * recipients in exports of earlier versions): the file is read up to it, never into `raw`, and
 * one whose `failedAt` is further down than HEAD_LIMIT counts as outdated (rewritten, it has it at
 * the top).
 */
export async function exportIsCurrent(file: string, finishedAt: number): Promise<boolean> {
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(file, 'r');
  } catch {
    return false; // missing, or unreadable: written again (a failure to write is logged)
  }
  try {
    // each step searches its bytes and the end of the step before, where a match may begin
    let carried = '';
    for (let position = 0; position < HEAD_LIMIT; ) {
      const { buffer, bytesRead } = await handle.read({ buffer: Buffer.alloc(HEAD_STEP), position });
      if (bytesRead === 0) return false;
      position += bytesRead;
      const text = carried + buffer.toString('latin1', 0, bytesRead); // the dates are ASCII
      const failedAt = /\n {2}"failedAt": "([^"]*)"/.exec(text)?.[1];
      if (failedAt !== undefined) return failedAt === isoTime(finishedAt);
      if (text.includes('\n  "raw": ')) return false;
      carried = text.slice(-128);
    }
    return false;
  } catch {
    return false;
  } finally {
    await handle.close();
  }
}

/** The message's bytes are encoded this many at a time (a multiple of 3: base64 pieces that join). */
const BASE64_SLICE = 3 * 64 * 1024;

/**
 * The export's text, `JSON.stringify(document, null, 2)` with `raw` as its last key, in pieces:
 * the message's base64 a slice at a time. As one string, and then inside the whole document's,
 * a large message took about five times its size in the heap for each export being written.
 */
function* failedExportText(document: Record<string, unknown>, raw: Buffer | null): Generator<string> {
  const head = JSON.stringify(document, null, 2);
  yield head.slice(0, head.lastIndexOf('\n}'));
  if (!raw) {
    yield ',\n  "raw": null\n}\n';
    return;
  }
  yield ',\n  "raw": "';
  for (let i = 0; i < raw.length; i += BASE64_SLICE) yield raw.subarray(i, i + BASE64_SLICE).toString('base64');
  yield '"\n}\n';
}

/**
 * Writes the export of message `id` into `directory` if it is failed; returns the file, or
 * undefined when the message is gone or no longer failed (a retry got in first).
 */
export async function exportFailedMessage(sqlite: Sqlite, directory: string, id: string, now: number): Promise<string | undefined> {
  const file = exportFile(directory, id);
  for (let round = 1; ; round++) {
    const read = failedMessage(sqlite, id);
    if (!read) return undefined;
    await writeFileAtomic(file, failedExportText(failedExportDocument(read.detail, now), read.raw));
    // Delivered after a retry, or deleted, while the file was being written: the removal that
    // followed found no file yet, so the export would outlive the failure.
    const state = messageState(sqlite, id);
    if (state === undefined || state === 'delivered') {
      await fs.rm(file, { force: true });
      return undefined;
    }
    // Retried and failed again meanwhile: the export of that failure may have been written
    // before this one replaced it, so this one is written again (a few times at most; the
    // export check of the next start rewrites any still out of date).
    const at = failedAt(sqlite, id);
    if (at === undefined || at === read.detail.message.finished_at || round === MAX_EXPORT_ROUNDS) return file;
  }
}

/** How many times exportFailedMessage writes a message that keeps failing again while it writes. */
const MAX_EXPORT_ROUNDS = 3;

/**
 * Removes the export of a failed message that was delivered since, or deleted; false when it had
 * none. Any other failure is thrown (the file stays: a directory relayq may not write, say).
 */
export async function removeFailedExport(emailsDir: string, id: string): Promise<boolean> {
  try {
    await fs.unlink(failedExportPath(emailsDir, id));
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}
