// `relayq status`: queue depth and lifetime totals read from the same store counters as
// GET /metrics, under the same names in --json, plus the oldest waiting message, the upstream's
// record and the size of the database files.
import { systemClock } from '../clock.js';
import { count } from '../count.js';
import { appliedMigrations, databaseFileSizes } from '../store/maintenance.js';
import { metricsSummary, storeMetrics, successRate } from '../store/queries.js';
import { type GlobalOptions, loadCliConfig, printJson, printText, requireMigrated, withReader } from './context.js';
import { formatAge, formatBytes, formatFields, formatTime } from './table.js';

export async function statusCommand(global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const { m, now } = await withReader(config, (sqlite) => {
    requireMigrated(appliedMigrations(sqlite), config.databasePath);
    return { m: storeMetrics(sqlite), now: systemClock.now() };
  });
  const oldest = m.oldestActiveReceivedAt;
  const files = databaseFileSizes(config.databasePath);
  const summary = metricsSummary(m, now);
  const failedNet = summary.failed_emails;

  if (global.json) {
    printJson({
      database: { path: config.databasePath, bytes: files.database, wal_bytes: files.wal },
      ...summary,
    });
    return;
  }
  const q = m.queue;
  const a = m.attempts;
  printText(
    formatFields([
      ['database', `${config.databasePath} (${formatBytes(files.database)}, WAL ${formatBytes(files.wal)})`],
      ['queued', `${q.queued} (${m.deferred} tried before)`],
      ['sending', q.sending],
      ['delivered', `${q.delivered} (kept ${keptFor(config.retention.deliveredDays)})`],
      ['failed', `${q.failed} (kept until retried or deleted)`],
      ['oldest waiting', oldest === null ? 'none' : `${formatTime(oldest)} (${formatAge(now - oldest)} ago)`],
      ['accepted', `${count(m.messagesAccepted, 'message')}, ${count(m.recipientsAccepted, 'recipient')}, ${formatBytes(m.bytesAccepted)}`],
      ['finished', `${m.messagesDelivered} delivered, ${failedNet} failed, ${m.messagesRequeued} requeued after failing (lifetime)`],
      ['avg processing', successRate(m).processed ? `${summary.avg_processing_time_ms} ms` : '-'],
      ['attempts', `${a.delivered} delivered, ${a.partial} partial, ${a.deferred} deferred, ${a.failed} failed`],
      ['upstream ok', formatTime(m.upstream.lastSuccessAt)],
      ['upstream error', `${formatTime(m.upstream.lastFailureAt)} (${count(m.upstream.consecutiveFailures, 'failed attempt')} in a row)`],
      ['refused', `${m.rateLimitRefusals} over a rate limit, ${m.queueFullRefusals} queue full, ${m.diskLowRefusals} disk low`],
    ]),
  );
}

function keptFor(days: number): string {
  return days ? count(days, 'day') : 'forever';
}
