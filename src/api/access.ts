// Who may use the HTTP API: loopback clients may call everything; any other client needs
// `Authorization: Bearer <security.adminToken>`, and is refused outright when no token is set.
// The token is compared in constant time (both sides hashed to equal length first).
import crypto from 'node:crypto';
import { getConnInfo } from '@hono/node-server/conninfo';
import type { Context, MiddlewareHandler } from 'hono';
import { isLoopback, normalizeIp } from '../access-control.js';
import type { ApiDeps, ApiEnv } from './context.js';

/** The socket's peer address; undefined when the request did not come over a socket. */
export function socketClientIp(c: Context): string | undefined {
  try {
    return getConnInfo(c).remote.address;
  } catch {
    return undefined;
  }
}

function tokensEqual(given: string, expected: string): boolean {
  const a = crypto.createHash('sha256').update(given).digest();
  const b = crypto.createHash('sha256').update(expected).digest();
  return crypto.timingSafeEqual(a, b);
}

export function requireAdminAccess(deps: ApiDeps): MiddlewareHandler<ApiEnv> {
  const clientIp = deps.getClientIp ?? socketClientIp;
  const log = deps.logger;
  return async (c, next) => {
    const raw = clientIp(c);
    const ip = normalizeIp(raw) || 'unknown';
    if (isLoopback(raw)) {
      c.set('requester', { ip, via: 'loopback' });
      return next();
    }
    const token = deps.config.security.adminToken;
    if (!token) {
      log.warn({ event: 'api.refused', client: ip, path: c.req.path, reason: 'no-token-configured' }, 'non-loopback client refused');
      return c.json(
        { error: 'forbidden', message: 'only loopback clients may use this API: security.adminToken is not set' },
        403,
      );
    }
    const match = /^Bearer\s+(\S+)\s*$/i.exec(c.req.header('authorization') ?? '');
    if (!match || !tokensEqual(match[1], token)) {
      log.warn({ event: 'api.refused', client: ip, path: c.req.path, reason: match ? 'wrong-token' : 'no-token' }, 'client refused');
      c.header('WWW-Authenticate', 'Bearer realm="relayq"');
      return c.json({ error: 'unauthorized', message: 'a valid Authorization: Bearer <adminToken> header is required' }, 401);
    }
    c.set('requester', { ip, via: 'token' });
    return next();
  };
}
