// The Prometheus / OpenMetrics exposition of the store's counters, written by prom-client into
// a fresh Registry per scrape: the values are the persisted counters read a moment earlier, so
// they survive restarts and agree with the JSON /metrics. The attempt-duration histogram is
// kept in the database as per-bucket counts (a trigger on attempts); StoredHistogram hands
// those to prom-client's formatter instead of observations made in this process.
import { Counter, Gauge, Histogram, Registry, type RegistryContentType } from 'prom-client';
import type { InFlowStats } from '../delivery/in-flow.js';
import { averageProcessingMs, type StoreMetrics, type UpstreamRecord } from '../store/queries.js';
import { MESSAGE_STATES } from '../store/schema.js';

export interface MetricsSnapshot {
  now: number;
  store: StoreMetrics;
  upstream: UpstreamRecord;
  /** When a suspension of delivery to the upstream ends (the clock's ms); null when there is none. */
  upstreamSuspendedUntil: number | null;
  upstreamUnreachableSince: number | null;
  queueSize: number;
  diskFreeMb: number;
  smtpListening: boolean;
  /** In-flow pacing since this process started. */
  pacing: InFlowStats;
  /** Messages and MAILs answered 451 because storing failed, since this process started. */
  storeFailures: number;
  /** Connections turned away by the connection limits (421 4.7.0), since this process started. */
  connectionLimitRefusals: number;
}

export type ExpositionFormat = 'prometheus' | 'openmetrics';

interface HistogramSeries {
  /** Upper bounds in seconds, ascending, without +Inf; counts per bucket (not cumulative). */
  buckets: Array<{ le: number; count: number }>;
  sum: number;
  count: number;
}

/** A histogram whose series come from persisted bucket counts, formatted by prom-client. */
class StoredHistogram extends Histogram {
  // Set by prom-client's Metric constructor; missing from its type declarations.
  declare readonly name: string;
  declare readonly help: string;
  private series: HistogramSeries = { buckets: [], sum: 0, count: 0 };

  load(series: HistogramSeries): this {
    this.series = series;
    return this;
  }

  // Registry.getMetricsAsString() prefers this over get() when present (as for Histogram).
  async getForPromString() {
    const { buckets, sum, count } = this.series;
    const bucket = `${this.name}_bucket`;
    let cumulative = 0;
    const values: Array<{ metricName: string; labels: Record<string, string | number>; value: number }> = buckets.map((b) => {
      cumulative += b.count;
      return { metricName: bucket, labels: { le: b.le }, value: cumulative };
    });
    values.push(
      { metricName: bucket, labels: { le: '+Inf' }, value: count },
      { metricName: `${this.name}_sum`, labels: {}, value: sum },
      { metricName: `${this.name}_count`, labels: {}, value: count },
    );
    return { name: this.name, help: this.help, type: 'histogram', values, aggregator: 'sum' };
  }

  override async get(): ReturnType<Histogram['get']> {
    return (await this.getForPromString()) as unknown as Awaited<ReturnType<Histogram['get']>>;
  }
}

export async function renderExposition(s: MetricsSnapshot, format: ExpositionFormat): Promise<{ contentType: string; body: string }> {
  const registry = new Registry<RegistryContentType>();
  if (format === 'openmetrics') registry.setContentType(Registry.OPENMETRICS_CONTENT_TYPE);
  const registers = [registry as Registry];
  const m = s.store;
  const counter = (name: string, help: string, value: number) => new Counter({ name, help, registers }).inc(value);
  const gauge = (name: string, help: string, value: number) => new Gauge({ name, help, registers }).set(value);

  counter('relayq_messages_accepted_total', 'Messages accepted with 250 and stored.', m.messagesAccepted);
  counter('relayq_recipients_accepted_total', 'Recipients of accepted messages.', m.recipientsAccepted);
  counter('relayq_accepted_bytes_total', 'Bytes of accepted messages as stored.', m.bytesAccepted);
  counter('relayq_messages_delivered_total', 'Messages that reached the delivered state.', m.messagesDelivered);
  counter('relayq_messages_failed_total', 'Times a message reached the failed state.', m.messagesFailed);
  counter('relayq_messages_requeued_total', 'Failed messages put back in the queue.', m.messagesRequeued);
  counter(
    'relayq_message_processing_seconds_total',
    'Sum of receipt-to-final-state times, added at every transition to delivered or failed: a failed message requeued and failed again adds its whole age again.',
    m.processingMsTotal / 1000,
  );
  gauge(
    'relayq_message_processing_seconds_average',
    'Mean receipt-to-final-state time per message, by its last outcome (avg_processing_time_ms of the JSON form).',
    averageProcessingMs(m) / 1000,
  );
  const refusals = new Counter({ name: 'relayq_refusals_total', help: 'Messages refused by policy or for free disk below minFreeDiskMb, by reason.', labelNames: ['reason'], registers });
  refusals.inc({ reason: 'rate_limit' }, m.rateLimitRefusals);
  refusals.inc({ reason: 'queue_full' }, m.queueFullRefusals);
  refusals.inc({ reason: 'disk_low' }, m.diskLowRefusals);
  const attempts = new Counter({
    name: 'relayq_delivery_attempts_total',
    help: 'Delivery attempts, one per try of a recipient batch (several upstream transactions when the upstream takes fewer recipients per transaction, none while delivery is suspended), by outcome.',
    labelNames: ['outcome'],
    registers,
  });
  for (const [outcome, n] of Object.entries(m.attempts)) attempts.inc({ outcome }, n);

  const finite = m.attemptDuration.buckets.filter((b) => Number.isFinite(b.leMs));
  new StoredHistogram({
    name: 'relayq_delivery_attempt_duration_seconds',
    help: 'Duration of upstream transactions.',
    buckets: finite.map((b) => b.leMs / 1000),
    registers,
  }).load({
    buckets: finite.map((b) => ({ le: b.leMs / 1000, count: b.count })),
    sum: m.attemptDuration.sumMs / 1000,
    count: m.attemptDuration.count,
  });

  const queue = new Gauge({ name: 'relayq_queue_messages', help: 'Messages in the database, by state.', labelNames: ['state'], registers });
  for (const state of MESSAGE_STATES) queue.set({ state }, m.queue[state]);
  gauge('relayq_queue_deferred_messages', 'Queued messages tried before: waiting for a retry, or for their next recipient batch.', m.deferred);
  gauge(
    'relayq_queue_oldest_age_seconds',
    'Age of the oldest message not yet delivered or failed (0 when none).',
    s.store.oldestActiveReceivedAt === null ? 0 : Math.max(0, (s.now - s.store.oldestActiveReceivedAt) / 1000),
  );
  gauge('relayq_queue_size_limit_messages', 'The queueSize setting (0 = unlimited).', s.queueSize);
  gauge(
    'relayq_upstream_suspended_until_timestamp_seconds',
    'While delivery is suspended because the upstream could not be reached or refused the session, when that ends (0 = not suspended).',
    (s.upstreamSuspendedUntil ?? 0) / 1000,
  );
  gauge(
    'relayq_upstream_unreachable_since_timestamp_seconds',
    'Since when the upstream could not be reached or refused the session, across the suspensions renewed meanwhile and the gaps between them (0 = reached since, or never found unreachable).',
    (s.upstreamUnreachableSince ?? 0) / 1000,
  );
  gauge('relayq_upstream_consecutive_failures', 'Attempts in a row that failed (delivered nothing, and not refused for good).', s.upstream.consecutiveFailures);
  gauge(
    'relayq_upstream_last_success_timestamp_seconds',
    'End of the last attempt that delivered something (0 = never).',
    (s.upstream.lastSuccessAt ?? 0) / 1000,
  );
  gauge(
    'relayq_upstream_last_failure_timestamp_seconds',
    'End of the last attempt that delivered nothing (0 = never).',
    (s.upstream.lastFailureAt ?? 0) / 1000,
  );
  gauge('relayq_disk_free_bytes', 'Free space for the database: on its filesystem, and free pages in its file.', Number.isFinite(s.diskFreeMb) ? s.diskFreeMb * 1024 * 1024 : 0);
  counter('relayq_intake_paced_total', 'MAIL commands that waited for delivery to catch up (inFlowDelay), since this process started.', s.pacing.delayed);
  counter('relayq_intake_paced_timeouts_total', 'Of those, the ones that waited the whole inFlowDelay.', s.pacing.timedOut);
  gauge('relayq_intake_paced_waiting', 'MAIL commands waiting now.', s.pacing.waiting);
  counter('relayq_intake_store_failures_total', 'Messages and MAIL commands answered 451 4.3.0 because the database or the spool failed, since this process started.', s.storeFailures);
  counter('relayq_smtp_connection_limit_refusals_total', 'SMTP connections turned away with 421 4.7.0 at maxConnections, or at 50 from one address where any may connect, since this process started.', s.connectionLimitRefusals);
  gauge('relayq_smtp_listener_up', '1 while the SMTP listener accepts connections.', s.smtpListening ? 1 : 0);

  return { contentType: registry.contentType as string, body: await registry.metrics() };
}
