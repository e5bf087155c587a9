// Serves the API app on a TCP port with @hono/node-server. close() stops listening, drops idle
// keep-alive connections at once and cuts the rest after a short grace, so shutdown is bounded.
// A request the app never sees is answered in JSON too: one @hono/node-server cannot make into a
// Request (no `Host`, `GET *`) and one Node's parser refuses (a head over 16 KB, a control
// character in a header); both would otherwise get a status with an empty body, as would an
// `Expect:` other than 100-continue. So is a CONNECT, which Node would close unanswered.
import { createServer, type ServerResponse, STATUS_CODES } from 'node:http';
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
 * `headersTimeoutMs` and a whole request within `requestTimeoutMs` (then `408`), and a
 * connection on which nothing moves for `idleTimeoutMs` while its answer is sent is closed: a
 * client that stopped reading its answer (a message's raw bytes) would otherwise hold its place
 * and the answer's memory. An answer still being prepared (a bulk requeue) is waited for.
 */
export interface ApiLimits {
  maxConnections: number;
  headersTimeoutMs: number;
  requestTimeoutMs: number;
  idleTimeoutMs: number;
}

const API_LIMITS: ApiLimits = { maxConnections: 256, headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, idleTimeoutMs: 60_000 };

export function startApiServer(app: Hono<ApiEnv>, host: string, port: number, limits: ApiLimits = API_LIMITS): Promise<ApiServer> {
  // what @hono/node-server's serve() does, with the error handler it does not pass on
  const listener = getRequestListener(app.fetch, { hostname: host, errorHandler: requestError });
  // Node refuses a whole-request timeout shorter than the one for the head
  const timeouts = { headersTimeoutMs: limits.headersTimeoutMs, requestTimeoutMs: Math.max(limits.requestTimeoutMs, limits.headersTimeoutMs) };
  // Node's own check would answer an HTTP/1.1 request without Host (RFC 9112 §3.2) with an empty 400
  const options = {
    requireHostHeader: false,
    headersTimeout: timeouts.headersTimeoutMs,
    requestTimeout: timeouts.requestTimeoutMs,
    // how often those timeouts are checked (Node's default, 30 s, would let a slow head stay 40 s)
    connectionsCheckingInterval: Math.min(1000, limits.headersTimeoutMs),
  };
  /** The response each connection is answering now: a handler that takes long (a bulk requeue) is not idle. */
  const answering = new WeakMap<Socket, ServerResponse>();
  const server = createServer(options, (req, res) => {
    answering.set(req.socket, res);
    if (req.httpVersion !== '1.1' || req.headers.host !== undefined) return listener(req, res);
    answerJson(res, 400, 'bad_request', 'malformed request: an HTTP/1.1 request needs a Host header', { Connection: 'close' });
  });
  server.on('clientError', (err: NodeJS.ErrnoException & { reason?: string }, socket: Socket) => {
    const res = answering.get(socket);
    // bytes that are no request after a whole one (a wrong Content-Length, a stray line ending):
    // the request may have run a command already, so its answer goes out, and then the connection closes
    if (res && !res.headersSent && !res.writableEnded && res.req.complete && socket.writable) res.shouldKeepAlive = false;
    else clientError(err, socket, timeouts);
  });
  // Node hands a CONNECT to this event, and closes the connection unanswered when nobody listens
  server.on('connect', (_req, socket: Socket) =>
    answerAndClose(socket, 405, 'method_not_allowed', 'CONNECT is not served: this is the API of relayq, not a proxy', 'Allow: GET, HEAD, POST, DELETE\r\n'),
  );
  // Node answers an Expect other than 100-continue itself, with an empty 417, unless this is heard
  server.on('checkExpectation', (req, res) =>
    answerJson(res, 417, 'expectation_failed', `Expect: ${req.headers.expect} is not supported (only 100-continue)`),
  );
  // A client that closes its sending side after its request (`nc -N`, a script's shutdown(SHUT_WR))
  // waits for the answer; by default Node drops the request at that FIN, so a health check or an
  // admin command that answers after a write got nothing, though the command ran. The switch is
  // Node's own (http.Server's httpAllowHalfOpen), though not in its documentation: a test of
  // such a client fails if it goes.
  Object.assign(server, { httpAllowHalfOpen: true });
  server.maxConnections = limits.maxConnections;
  server.setTimeout(limits.idleTimeoutMs, (socket: Socket) => {
    const res = answering.get(socket);
    // still working on its answer: the client waits for it, and so does the timer
    if (res && !res.headersSent && !res.writableEnded) socket.setTimeout(limits.idleTimeoutMs);
    else socket.destroy();
  });
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
 * for a request that came too slowly, 400 for the rest, and nothing on a socket that already has
 * part of a response. A HEAD request, told by the bytes the parser refused, gets no body (RFC 9110
 * §9.3.2): a client would read it as the start of another answer. The socket is closed once the
 * answer is written, whether or not the client closes its side: one that never does must not keep
 * holding a place under `maxConnections`.
 */
function clientError(err: NodeJS.ErrnoException & { reason?: string }, socket: Socket, timeouts: Pick<ApiLimits, 'headersTimeoutMs' | 'requestTimeoutMs'>): void {
  const response = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage;
  if (!socket.writable || response?.headersSent || err.code === 'ECONNRESET') {
    socket.destroy();
    return;
  }
  const [status, error, message] =
    err.code === 'HPE_HEADER_OVERFLOW'
      ? [431, 'request_header_fields_too_large', 'request head too large: its request line and headers may take at most 16 KiB']
      : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? [408, 'request_timeout', `request too slow: a request head must arrive within ${seconds(timeouts.headersTimeoutMs)} and the whole request within ${seconds(timeouts.requestTimeoutMs)}`]
        : err.code === 'HPE_INVALID_EOF_STATE'
          ? [400, 'bad_request', 'incomplete request: the client closed its side before the end of its request (head or body)']
          : [400, 'bad_request', `malformed request: ${err.reason ?? 'bad request'}`];
  const head = (err as { rawPacket?: Buffer }).rawPacket?.subarray(0, 5).toString('latin1') === 'HEAD ';
  answerAndClose(socket, status, error, message, '', head);
}

/** A JSON error for a request the app never sees. */
function answerJson(res: ServerResponse, status: number, error: string, message: string, headers: Record<string, string> = {}): void {
  const body = JSON.stringify({ error, message });
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body), ...headers }).end(body);
}

/** A JSON error written on the socket itself, which is then closed. */
function answerAndClose(socket: Socket, status: number, error: string, message: string, headers = '', headOnly = false): void {
  const body = JSON.stringify({ error, message });
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n${headers}Connection: close\r\n\r\n${headOnly ? '' : body}`,
    () => socket.destroy(),
  );
}

function seconds(ms: number): string {
  return `${ms / 1000} s`;
}
