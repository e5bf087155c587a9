// GET /health: `ok`, `degraded` (200) or `error` (503). Error = the database does not take a
// write right now, free disk is below minFreeDiskMb, or the SMTP listener is down: mail cannot
// be accepted. Degraded = mail is accepted but not leaving: the upstream has failed every
// attempt for a while, the queue is over 80 % of queueSize, or claiming due mail fails; or some
// mail is not accepted: spool files fail, or file descriptors run out. All numbers are counter
// rows or single index steps, so the check costs the same with a thousand or a million messages.
import fs from 'node:fs';
import { Hono } from 'hono';
import { lastAttemptReply, oldestAgeSeconds, type StoreMetrics, storeMetrics, successRate, type UpstreamRecord } from '../store/queries.js';
import { isoTime } from '../clock.js';
import { count } from '../count.js';
import type { ApiDeps, ApiEnv } from './context.js';

/**
 * The upstream counts as failing when at least `upstreamFailures` attempts in a row failed
 * (outcomes.ts, upstreamVerdict: delivered nothing, and not refused for good) and none succeeded
 * for `upstreamQuietMs` (or ever). One refused connection is not an outage; a run of failures
 * right after a success is not one yet either. The queue is nearly full at `queueFullFraction`
 * of `queueSize`; the other two are below.
 */
const HEALTH_THRESHOLDS = {
  upstreamFailures: 3,
  upstreamQuietMs: 5 * 60_000,
  queueFullFraction: 0.8,
  /** A write refused for lack of room, or a spool file that failed, counts this long, unless a later one succeeds. */
  storageFaultMs: 60_000,
  /** Of the process's limit of open files. */
  fileDescriptorsFraction: 0.9,
};

/**
 * The process's limit of open files (Node raised its soft limit to the hard one as it started),
 * from /proc (Linux); undefined elsewhere. Read once, while a file can still be opened.
 */
function openFilesLimit(): number | undefined {
  try {
    const limit = Number(/^Max open files\s+(\d+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'))?.[1]);
    return limit > 0 ? limit : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The file descriptors open now; at the limit, where even the listing cannot be opened, the limit.
 * There nothing is logged: libuv accepts each new connection and closes it at once, unanswered.
 */
function openFiles(limit: number): number | undefined {
  try {
    // less the descriptor of the listing itself
    return fs.readdirSync('/proc/self/fd').length - 1;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return code === 'EMFILE' || code === 'ENFILE' ? limit : undefined;
  }
}

/** From 90 % of the process's file descriptors in use: how many. */
function descriptorsWarning(limit: number): string | undefined {
  const open = openFiles(limit);
  if (open === undefined || open < limit * HEALTH_THRESHOLDS.fileDescriptorsFraction) return undefined;
  return `${open} of ${limit} file descriptors in use (ulimit -n): at the limit new connections are closed unanswered`;
}

export type HealthStatus = 'ok' | 'degraded' | 'error';

/** The store's record of the upstream, merged with what a delivery engine reports live. */
export function upstreamView(persisted: UpstreamRecord, delivery: ApiDeps['delivery']): UpstreamRecord {
  const live = delivery.status();
  const latest = (a: number | null, b: number | null) => (b === null ? a : a === null ? b : Math.max(a, b));
  return {
    lastSuccessAt: latest(persisted.lastSuccessAt, live.lastSuccessAt),
    lastFailureAt: latest(persisted.lastFailureAt, live.lastFailureAt),
    consecutiveFailures: Math.max(persisted.consecutiveFailures, live.consecutiveFailures),
  };
}

function upstreamFailing(upstream: UpstreamRecord, now: number): boolean {
  if (upstream.consecutiveFailures < HEALTH_THRESHOLDS.upstreamFailures) return false;
  return upstream.lastSuccessAt === null || now - upstream.lastSuccessAt >= HEALTH_THRESHOLDS.upstreamQuietMs;
}

export function healthRoutes(deps: ApiDeps) {
  const { config, clock } = deps;
  const upstreamTarget = deps.delivery.status().upstream;
  const fileLimit = openFilesLimit();
  // Logged when the status changes, not on every probe of a load balancer; the first check logs
  // only a status other than ok, with no previous one.
  let lastStatus: HealthStatus | null = null;

  return new Hono<ApiEnv>().get('/health', async (c) => {
    const now = clock.now();
    const errors: string[] = [];
    const degraded: string[] = [];

    let database: 'ok' | 'error' = 'ok';
    try {
      await deps.writer.write('probeWrite');
    } catch (err) {
      database = 'error';
      errors.push(`database is not writable: ${(err as Error).message}`);
    }
    // the probe is small: it may still commit where messages and claims no longer fit
    const fault = database === 'ok' ? deps.writer.storageFault(HEALTH_THRESHOLDS.storageFaultMs) : undefined;
    if (fault) {
      database = 'error';
      errors.push(`the database refused a write in the last minute: ${fault}`);
    }
    let metrics: StoreMetrics | undefined;
    try {
      metrics = storeMetrics(deps.store.sqlite);
    } catch (err) {
      database = 'error';
      errors.push(`database is not readable: ${(err as Error).message}`);
    }

    const freeMb = deps.disk.freeMb();
    if (deps.disk.isLow()) {
      const unread = deps.disk.readError;
      errors.push(
        unread
          ? `free disk space cannot be read (${unread}), so new mail is refused as below minFreeDiskMb`
          : `free disk space ${freeMb} MB is below minFreeDiskMb ${config.minFreeDiskMb} MB`,
      );
    }
    const listening = deps.intake.isListening;
    if (!listening) errors.push('the SMTP listener is down');

    const descriptors = fileLimit === undefined ? undefined : descriptorsWarning(fileLimit);
    if (descriptors) degraded.push(descriptors);
    // small messages are still taken
    const spoolFault = deps.intake.spoolFault(HEALTH_THRESHOLDS.storageFaultMs);
    if (spoolFault) degraded.push(`messages over spoolAfter (${config.spoolAfter} bytes) get 451: a spool file failed in the last minute: ${spoolFault}`);

    let upstream: UpstreamRecord | undefined;
    let active: number | null = null;
    let rate: ReturnType<typeof successRate> | undefined;
    if (metrics) {
      upstream = upstreamView(metrics.upstream, deps.delivery);
      if (upstreamFailing(upstream, now)) {
        const since = upstream.lastSuccessAt === null ? 'no attempt has ever succeeded' : `last success ${isoTime(upstream.lastSuccessAt)}`;
        const last = lastAttemptReply(deps.store.sqlite);
        // the attempts of a suspension were deferred without a connection: that run is no count of connections
        const suspendedUntil = deps.delivery.suspendedUntil();
        const suspended =
          suspendedUntil === null ? '' : `; delivery to it is suspended until ${isoTime(suspendedUntil)}: the batches due meanwhile are deferred without a connection, and count as failed attempts`;
        degraded.push(`upstream ${upstreamTarget} failing: ${count(upstream.consecutiveFailures, 'attempt')} in a row failed (${since})${last ? `; last reply: ${last}` : ''}${suspended}`);
      }
      active = metrics.queue.queued + metrics.queue.sending;
      if (config.queueSize > 0 && active > config.queueSize * HEALTH_THRESHOLDS.queueFullFraction) {
        degraded.push(`queue is ${Math.floor((active / config.queueSize) * 100)}% full (${active} of queueSize ${config.queueSize})`);
      }
      rate = successRate(metrics);
    }
    const claims = deps.delivery.claimFailure();
    if (claims) degraded.push(`delivery cannot claim due mail (since ${isoTime(claims.since)}): ${claims.err}`);

    const status: HealthStatus = errors.length ? 'error' : degraded.length ? 'degraded' : 'ok';
    const body = {
      status,
      timestamp: isoTime(now),
      details: {
        disk_space_available_mb: Number.isFinite(freeMb) ? freeMb : null,
        queued_emails: active,
        deferred_emails: metrics?.deferred ?? null,
        failed_emails: metrics?.queue.failed ?? null,
        total_emails_processed: rate?.processed ?? null,
        success_rate: rate?.rate ?? null,
        oldest_queued_age_seconds: metrics ? oldestAgeSeconds(metrics, now) : null,
        queue_size_limit: config.queueSize,
        database,
        smtp_listener: listening ? 'listening' : 'down',
        upstream: {
          target: upstreamTarget,
          last_success: isoTime(upstream?.lastSuccessAt),
          last_failure: isoTime(upstream?.lastFailureAt),
          consecutive_failures: upstream?.consecutiveFailures ?? null,
          suspended_until: isoTime(deps.delivery.suspendedUntil()),
          unreachable_since: isoTime(deps.delivery.unreachableSince()),
        },
        warnings: [...errors, ...degraded, ...deps.warnings],
      },
    };
    if (status !== (lastStatus ?? 'ok')) {
      // error: mail cannot be accepted
      const level = status === 'ok' ? 'info' : status === 'degraded' ? 'warn' : 'error';
      deps.logger[level]({ event: 'api.health_changed', status, previous: lastStatus, reasons: [...errors, ...degraded] }, `health ${status}`);
    }
    lastStatus = status;
    return c.json(body, status === 'error' ? 503 : 200);
  });
}
