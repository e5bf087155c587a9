// GET /metrics: JSON by default; Prometheus text for ?format=prometheus or an Accept header that
// prefers text/plain; OpenMetrics for ?format=openmetrics or an Accept header that prefers it
// (what Prometheus itself sends). The message and attempt figures are read from the store's
// counters, so they survive restarts and cost the same whatever the database holds; the upstream's
// last success and failure are the later of the store's and the running engine's (upstreamView),
// and the suspension, free disk, listener, in-flow pacing and failed-store figures are this
// process's own.
import { Hono } from 'hono';
import { HTTPException } from 'hono/http-exception';
import { metricsSummary, storeMetrics } from '../store/queries.js';
import { isoTime } from '../clock.js';
import { type ApiDeps, type ApiEnv, onlyQueries, singleQuery } from './context.js';
import { upstreamView } from './health.js';
import { type ExpositionFormat, type MetricsSnapshot, renderExposition } from './prometheus.js';

type MetricsFormat = 'json' | ExpositionFormat;

const FORMATS: readonly MetricsFormat[] = ['json', 'prometheus', 'openmetrics'];

/** The format an Accept header prefers (by q-value; ties go to JSON), JSON when it names none. */
function formatFromAccept(accept: string | undefined): MetricsFormat {
  const q: Record<MetricsFormat, number> = { json: 0, prometheus: 0, openmetrics: 0 };
  for (const part of (accept ?? '').split(',')) {
    const [type, ...params] = part.split(';').map((p) => p.trim().toLowerCase());
    const qParam = params.find((p) => p.startsWith('q='));
    const weight = qParam ? Number(qParam.slice(2)) : 1;
    if (!Number.isFinite(weight)) continue;
    const format = type === 'application/json' ? 'json' : type === 'text/plain' ? 'prometheus' : type === 'application/openmetrics-text' ? 'openmetrics' : undefined;
    if (format) q[format] = Math.max(q[format], weight);
  }
  if (q.openmetrics > q.json && q.openmetrics >= q.prometheus) return 'openmetrics';
  if (q.prometheus > q.json) return 'prometheus';
  return 'json';
}

export function metricsRoutes(deps: ApiDeps) {
  const snapshot = (): MetricsSnapshot => {
    const store = storeMetrics(deps.store.sqlite);
    return {
      now: deps.clock.now(),
      store,
      upstream: upstreamView(store.upstream, deps.delivery),
      upstreamSuspendedUntil: deps.delivery.suspendedUntil(),
      upstreamUnreachableSince: deps.delivery.unreachableSince(),
      queueSize: deps.config.queueSize,
      diskFreeMb: deps.disk.freeMb(),
      smtpListening: deps.intake.isListening,
      pacing: deps.delivery.inFlow.stats(),
      storeFailures: deps.intake.storeFailureCount,
      connectionLimitRefusals: deps.intake.connectionLimitCount,
    };
  };

  return new Hono<ApiEnv>().get('/metrics', async (c) => {
    onlyQueries(c, ['format']);
    const requested = singleQuery(c, 'format');
    if (requested !== undefined && !FORMATS.includes(requested as MetricsFormat)) {
      throw new HTTPException(400, { message: `format must be one of ${FORMATS.join(', ')}` });
    }
    const format = (requested as MetricsFormat | undefined) ?? formatFromAccept(c.req.header('accept'));
    const s = snapshot();
    if (format !== 'json') {
      const { contentType, body } = await renderExposition(s, format);
      return c.body(body, 200, { 'Content-Type': contentType });
    }
    return c.json({
      timestamp: isoTime(s.now),
      ...metricsSummary(s.store, s.now, s.upstream),
      intake_pacing: { waiting: s.pacing.waiting, delayed: s.pacing.delayed, timed_out: s.pacing.timedOut },
      intake_store_failures: s.storeFailures,
      smtp_connection_limit_refusals: s.connectionLimitRefusals,
    });
  });
}
