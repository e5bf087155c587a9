// The HTTP API as a Hono app: the access check in front of everything, then routes grouped by
// concern (health, metrics, admin). Every answer is JSON except the Prometheus text and raw
// messages, including 404, 405 (with Allow) and errors.
import { Hono } from 'hono';
import { HTTPException } from 'hono/http-exception';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { requireAdminAccess } from './access.js';
import { adminRoutes } from './admin.js';
import type { ApiDeps, ApiEnv } from './context.js';
import { healthRoutes } from './health.js';
import { metricsRoutes } from './metrics.js';

const ERROR_NAMES: Record<number, string> = {
  400: 'bad_request',
  401: 'unauthorized',
  403: 'forbidden',
  404: 'not_found',
  405: 'method_not_allowed',
  409: 'conflict',
  415: 'unsupported_media_type',
  503: 'unavailable',
};

function routePattern(path: string): RegExp {
  const source = path
    .split('/')
    .map((part) => (part.startsWith(':') ? '[^/]+' : part.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')))
    .join('/');
  return new RegExp(`^${source}$`);
}

export function createApp(dependencies: ApiDeps) {
  const deps: ApiDeps = { ...dependencies, logger: dependencies.logger.child({ component: 'api' }) };
  const app = new Hono<ApiEnv>();
  app.use('*', requireAdminAccess(deps));
  app.route('/', healthRoutes(deps));
  app.route('/', metricsRoutes(deps));
  app.route('/admin', adminRoutes(deps));

  // Which methods each path answers, to tell 405 from 404 (Hono itself only knows 404).
  let methodsByPath: Array<{ pattern: RegExp; method: string }> | undefined;
  const allowedMethods = (path: string): string[] => {
    methodsByPath ??= app.routes.filter((r) => r.method !== 'ALL').map((r) => ({ pattern: routePattern(r.path), method: r.method }));
    const methods = new Set(methodsByPath.filter((r) => r.pattern.test(path)).map((r) => r.method));
    if (methods.has('GET')) methods.add('HEAD');
    return [...methods].sort();
  };

  app.notFound((c) => {
    const allow = allowedMethods(c.req.path);
    if (allow.length > 0) {
      c.header('Allow', allow.join(', '));
      return c.json({ error: ERROR_NAMES[405], message: `${c.req.method} is not allowed on ${c.req.path}; use ${allow.join(', ')}` }, 405);
    }
    return c.json({ error: ERROR_NAMES[404], message: `no route for ${c.req.method} ${c.req.path}` }, 404);
  });

  app.onError((err, c) => {
    if (err instanceof HTTPException) {
      const status = err.status as ContentfulStatusCode;
      return c.json({ error: ERROR_NAMES[status] ?? 'error', message: err.message }, status);
    }
    const code = (err as { code?: unknown }).code;
    if (typeof code === 'string' && code.startsWith('SQLITE_')) {
      deps.logger.error({ event: 'api.database_error', path: c.req.path, code, err: err.message }, 'database error');
      return c.json({ error: ERROR_NAMES[503], message: `database unavailable: ${err.message}` }, 503);
    }
    if (code === 'ECONNRESET' || err.message === 'aborted') {
      // the client went away while sending its request: nothing failed here, and nobody reads a reply
      deps.logger.info({ event: 'api.client_aborted', path: c.req.path }, 'client closed the connection before its request was complete');
      return c.json({ error: ERROR_NAMES[400], message: 'request aborted by the client' }, 400);
    }
    deps.logger.error({ event: 'api.error', path: c.req.path, err: err.message, stack: err.stack }, 'request failed');
    return c.json({ error: 'internal_error', message: 'internal error; see the relayq log' }, 500);
  });

  return app;
}
