// Who may use the HTTP API: loopback clients may call everything; any other client needs
// `Authorization: Bearer <security.adminToken>`, and is refused outright when no token is set.
// The token is compared in constant time (both sides hashed to equal length first).
// A web page in a browser on the relay's host reaches the loopback listener too: by a form
// post from another site, or by DNS rebinding (a name of the page's site that now resolves to
// 127.0.0.1). Loopback trust therefore also needs a loopback name in `Host`, and in `Origin`
// when the browser sends one. A page does not know the bearer token (at least 16 characters, so
// not guessed), so the token path is open, also to a loopback request that names another host
// (a reverse proxy on the relay's host).
// A reverse proxy on the relay's host connects from loopback for every client it relays, and
// unless told otherwise it sends its own upstream address as `Host` (nginx's `proxy_pass
// http://127.0.0.1:8025`). A loopback request that carries a forwarding header is therefore a
// remote client's: it needs the token, as that client would.
import { getConnInfo } from '@hono/node-server/conninfo';
import type { Context, MiddlewareHandler } from 'hono';
import { isLoopback, normalizeIp, secretsEqual } from '../access-control.js';
import type { ApiDeps, ApiEnv } from './context.js';

/** The socket's peer address; undefined when the request did not come over a socket. */
function socketClientIp(c: Context): string | undefined {
  try {
    return getConnInfo(c).remote.address;
  } catch {
    return undefined;
  }
}

export function requireAdminAccess(deps: ApiDeps): MiddlewareHandler<ApiEnv> {
  const clientIp = deps.getClientIp ?? socketClientIp;
  const log = deps.logger;
  return async (c, next) => {
    const raw = clientIp(c);
    const ip = normalizeIp(raw) || 'unknown';
    const token = deps.config.security.adminToken;
    const bearer = /^Bearer\s+(\S+)\s*$/i.exec(c.req.header('authorization') ?? '')?.[1];
    const forwarding = FORWARDING_HEADERS.find((name) => c.req.header(name) !== undefined);
    if (isLoopback(raw) && forwarding === undefined) {
      const foreign = foreignBrowserContext(c.req.header('host'), c.req.header('origin'));
      if (!foreign) {
        c.set('requester', { ip, via: 'loopback' });
        return next();
      }
      // a page cannot know the token: a request that carries one (a reverse proxy) takes the token path
      if (!token || bearer === undefined) {
        log.warn({ event: 'api.refused', client: ip, path: c.req.path, reason: 'foreign-host-or-origin', [foreign.header.toLowerCase()]: foreign.value }, 'loopback request from another site refused');
        return c.json({ error: 'forbidden', message: `a loopback request must name a loopback host in ${foreign.header}, got ${JSON.stringify(foreign.value)}` }, 403);
      }
    } else if (!token) {
      const reason = forwarding === undefined ? 'no-token-configured' : 'proxied-no-token-configured';
      log.warn({ event: 'api.refused', client: ip, path: c.req.path, reason }, 'non-loopback client refused');
      const via = forwarding === undefined ? '' : ` (a request relayed by a proxy, with ${forwarding}, is not a loopback client's)`;
      return c.json({ error: 'forbidden', message: `only loopback clients may use this API${via}: security.adminToken is not set` }, 403);
    }
    if (bearer === undefined || !secretsEqual(bearer, token)) {
      log.warn({ event: 'api.refused', client: ip, path: c.req.path, reason: bearer === undefined ? 'no-token' : 'wrong-token' }, 'client refused');
      c.header('WWW-Authenticate', 'Bearer realm="relayq"');
      return c.json({ error: 'unauthorized', message: 'a valid Authorization: Bearer <adminToken> header is required' }, 401);
    }
    c.set('requester', { ip, via: 'token' });
    return next();
  };
}

/** Headers a proxy adds to say whom it relays (RFC 7239, and the older de facto ones). */
const FORWARDING_HEADERS = ['forwarded', 'x-forwarded-for', 'x-real-ip'] as const;

/** localhost, 127.x.x.x or ::1, as a URL or `Host` header writes them (a port, brackets and a name's final dot allowed). */
function isLoopbackName(host: string): boolean {
  const name = host.trim().toLowerCase();
  const bare = name.startsWith('[') ? name.slice(1, name.indexOf(']')) : name.replace(/:\d*$/, '').replace(/\.$/, '');
  return bare === 'localhost' || bare.endsWith('.localhost') || isLoopback(bare);
}

/** The header that shows a loopback request comes from another site's page, if one does. */
function foreignBrowserContext(host: string | undefined, origin: string | undefined): { header: 'Host' | 'Origin'; value: string } | undefined {
  if (host !== undefined && !isLoopbackName(host)) return { header: 'Host', value: host };
  if (origin === undefined) return undefined;
  let originHost: string;
  try {
    originHost = new URL(origin).host;
  } catch {
    return { header: 'Origin', value: origin }; // "null": a sandboxed page or a local file
  }
  return isLoopbackName(originHost) ? undefined : { header: 'Origin', value: origin };
}
