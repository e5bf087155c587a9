// What a crash can leave in emailsDir, put right after a start: temp files of local deliveries
// and exports it cut off, failed mail without its JSON export or with that of an earlier
// failure, and the exports of mail delivered since. Each walk goes in bounded steps and lets
// SMTP sessions run between them.
import fs from 'node:fs/promises';
import { setImmediate as nextTurn } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { Sqlite } from '../store/db.js';
import { type FailedScanCursor, failedPage } from '../store/delivery.js';
import { failedAt, messageState } from '../store/queries.js';
import { removeStrayTempFiles } from './atomic-file.js';
import { exportIsCurrent, failedExportDir, failedExportPath, removeFailedExport } from './failed-export.js';

/** Failed messages whose export is looked for, and exports whose message is, per step. */
const EXPORT_CHECK_STEP = 500;

/** A log line of this clean-up names at most this many messages (its count gives them all). */
const MAX_LOGGED_IDS = 100;

export interface LeftoversContext {
  sqlite: Sqlite;
  emailsDir: string;
  log: Logger;
  /** The engine is stopping: the walks end early. */
  stopping(): boolean;
  /** Writes one failed message's export; the file, or undefined when it was not written (logged). */
  exportFailed(id: string): Promise<string | undefined>;
}

/**
 * Removes the temp files of local deliveries and failed-mail exports that a crash cut off:
 * those last written before `before`, a minute before now at the least, since a
 * `relayq export-failed` running beside the server may be writing one.
 */
export async function sweepCrashTempFiles(ctx: LeftoversContext, before: number): Promise<void> {
  const { emailsDir, log } = ctx;
  for (const dir of [emailsDir, failedExportDir(emailsDir)]) {
    try {
      const removed = await removeStrayTempFiles(dir, before);
      if (removed.length) log.info({ event: 'delivery.temp_files_removed', dir, files: removed }, 'removed temp files left by a crash');
    } catch (err) {
      log.warn({ event: 'delivery.temp_files_unreadable', dir, err: (err as Error).message }, 'could not look for temp files left by a crash');
    }
  }
}

/**
 * After a start: failed mail without its JSON export, or whose export is of an earlier failure
 * (the process died between the commit and the export, or the export could not be written), is
 * exported now. In steps of EXPORT_CHECK_STEP failed messages, letting SMTP sessions run between
 * them.
 */
export async function exportMissingFailures(ctx: LeftoversContext): Promise<void> {
  const { sqlite, emailsDir, log } = ctx;
  let cursor: FailedScanCursor | null = { finishedAt: Number.NEGATIVE_INFINITY, id: '' };
  const exported: string[] = [];
  while (cursor && !ctx.stopping()) {
    const page = failedPage(sqlite, { cursor, limit: EXPORT_CHECK_STEP });
    for (const { id, finishedAt } of page.messages) {
      // a stop waits for the walk: one export at most, not a page of them (a page of large
      // messages takes longer than the grace, and the store would close under an export)
      if (ctx.stopping()) break;
      if (await exportIsCurrent(failedExportPath(emailsDir, id), finishedAt)) continue;
      // requeued since the page was read (failedRetryInterval's first scan runs beside this walk),
      // and maybe failed again: this process exports that failure itself, and nothing was missing
      if (failedAt(sqlite, id) !== finishedAt) continue;
      if (await ctx.exportFailed(id)) exported.push(id);
    }
    cursor = page.next;
    await nextTurn();
  }
  if (exported.length > 0) log.warn({ event: 'delivery.exports_restored', count: exported.length, ids: exported.slice(0, MAX_LOGGED_IDS) }, 'failed mail whose export was missing or of an earlier failure exported');
}

/**
 * After a start: the exports of mail that was delivered after it failed (the process died
 * between the commit of the delivery and the removal of its export). Only delivered mail: a
 * message retried and not yet delivered keeps its export until it is, as while relayq runs,
 * and a file of a message this database does not hold is not relayq's to judge. In steps of
 * EXPORT_CHECK_STEP files, letting SMTP sessions run between them.
 */
export async function removeDeliveredExports(ctx: LeftoversContext): Promise<void> {
  const { sqlite, emailsDir, log } = ctx;
  let names: string[];
  try {
    names = await fs.readdir(failedExportDir(emailsDir));
  } catch (err) {
    log.warn({ event: 'delivery.exports_unreadable', err: (err as Error).message }, 'could not look for exports of mail delivered since it failed');
    return;
  }
  const removed: string[] = [];
  const stayed: string[] = [];
  let stayedBecause = '';
  for (let i = 0; i < names.length && !ctx.stopping(); i++) {
    const id = names[i].endsWith('.json') ? names[i].slice(0, -'.json'.length) : '';
    if (id && messageState(sqlite, id) === 'delivered') {
      try {
        if (await removeFailedExport(emailsDir, id)) removed.push(id);
      } catch (err) {
        stayed.push(id);
        stayedBecause ||= (err as Error).message;
      }
    }
    if ((i + 1) % EXPORT_CHECK_STEP === 0) await nextTurn();
  }
  if (removed.length > 0) log.info({ event: 'delivery.exports_removed', count: removed.length, ids: removed.slice(0, MAX_LOGGED_IDS) }, 'exports of mail delivered after it failed removed');
  if (stayed.length > 0) {
    log.warn(
      { event: 'delivery.exports_not_removed', count: stayed.length, ids: stayed.slice(0, MAX_LOGGED_IDS), err: stayedBecause },
      'exports of mail delivered after it failed could not be removed',
    );
  }
}
