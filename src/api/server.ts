// Serves the API app on a TCP port with @hono/node-server. close() stops listening, drops idle
// keep-alive connections at once and cuts the rest after a short grace, so shutdown is bounded.
// A request the app never sees is answered in JSON too: one @hono/node-server cannot make into a
// Request (no `Host`, `GET *`) and one Node's parser refuses (a head over 16 KB, a control
// character in a header); both would otherwise get a status with an empty body.
import { createServer, STATUS_CODES } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { getRequestListener, RequestError } from '@hono/node-server';
import type { Hono } from 'hono';
import type { ApiEnv } from './context.js';

export interface ApiServer {
  /** The address listened on (a host name's first address). */
  address: string;
  port: number;
  close(): Promise<void>;
}

const CLOSE_GRACE_MS = 2000;

/**
 * Bounds on the API's connections, so that clients of the API (a slow request head holds a
 * connection before the access check can run) cannot use up the file descriptors that SMTP
 * intake needs: at most `maxConnections` at once (more are closed at once), a request head within
 * `headersTimeoutMs` (then `408`), a whole request within 30 s.
 */
export interface ApiLimits {
  maxConnections: number;
  headersTimeoutMs: number;
}

const API_LIMITS: ApiLimits = { maxConnections: 256, headersTimeoutMs: 10_000 };
const REQUEST_TIMEOUT_MS = 30_000;

export function startApiServer(app: Hono<ApiEnv>, host: string, port: number, limits: ApiLimits = API_LIMITS): Promise<ApiServer> {
  // what @hono/node-server's serve() does, with the error handler it does not pass on
  const listener = getRequestListener(app.fetch, { hostname: host, errorHandler: requestError });
  // Node's own check would answer an HTTP/1.1 request without Host (RFC 9112 §3.2) with an empty 400
  const options = {
    requireHostHeader: false,
    headersTimeout: limits.headersTimeoutMs,
    requestTimeout: Math.max(REQUEST_TIMEOUT_MS, limits.headersTimeoutMs),
    // how often those timeouts are checked (Node's default, 30 s, would let a slow head stay 40 s)
    connectionsCheckingInterval: Math.min(1000, limits.headersTimeoutMs),
  };
  const server = createServer(options, (req, res) => {
    if (req.httpVersion !== '1.1' || req.headers.host !== undefined) return listener(req, res);
    const body = JSON.stringify({ error: 'bad_request', message: 'malformed request: an HTTP/1.1 request needs a Host header' });
    res.writeHead(400, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), Connection: 'close' }).end(body);
  });
  server.on('clientError', clientError);
  server.maxConnections = limits.maxConnections;
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      let closing: Promise<void> | undefined;
      resolve({
        address: (server.address() as AddressInfo).address,
        port: (server.address() as AddressInfo).port,
        close() {
          closing ??= new Promise<void>((done) => {
            const force = setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS);
            force.unref();
            server.close(() => {
              clearTimeout(force);
              done();
            });
            server.closeIdleConnections();
          });
          return closing;
        },
      });
    });
  });
}

function requestError(err: unknown): Response {
  if (err instanceof RequestError) return Response.json({ error: 'bad_request', message: `malformed request: ${err.message}` }, { status: 400 });
  return Response.json({ error: 'internal_error', message: 'internal error' }, { status: 500 });
}

/**
 * Node's default clientError handling, with a JSON body: 431 for a head that is too large, 408
 * for one that came too slowly, 400 for the rest, and nothing on a socket that already has part
 * of a response.
 */
function clientError(err: NodeJS.ErrnoException, socket: Socket): void {
  const response = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage;
  if (!socket.writable || response?.headersSent || err.code === 'ECONNRESET') {
    socket.destroy();
    return;
  }
  const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
  const error = status === 431 ? 'request_header_fields_too_large' : status === 408 ? 'request_timeout' : 'bad_request';
  const body = JSON.stringify({ error, message: `malformed request: ${STATUS_CODES[status]?.toLowerCase()}` });
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}
