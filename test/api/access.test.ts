import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { createApp } from '../../src/api/app.js';
import { startApiServer } from '../../src/api/server.js';
import type { Relay } from '../../src/main.js';
import { queuedId } from '../delivery/fixtures.js';
import { capturedLog, holdWriteLock, sendMail, startTestRelay, waitFor } from '../helpers.js';
import { call } from './fixtures.js';

const TOKEN = 'k9-Qx7mT2vLr8cWz';
const REMOTE = '198.51.100.7';
const ROUTES: Array<[string, string]> = [
  ['GET', '/health'],
  ['GET', '/metrics'],
  ['GET', '/admin/messages'],
  ['POST', '/admin/retry-failed'],
  ['POST', '/admin/retry-queued'],
  ['GET', '/no-such-route'],
];

/**
 * Every route the app serves (a message id in place of `:id`), and one it does not: what the
 * refusals below must cover, a route added later included.
 */
function everyRoute(relay: Relay): Array<[string, string]> {
  const served = createApp(relay).routes.filter((r) => r.method !== 'ALL');
  const routes = new Map(served.map((r) => [`${r.method} ${r.path}`, [r.method, r.path.replace(':id', '19CB2FAB0123456789AB')] as [string, string]]));
  return [...routes.values(), ['GET', '/no-such-route']];
}

describe('API access: loopback, or a bearer token', () => {
  let open: Relay;
  let guarded: Relay;
  before(async () => {
    open = await startTestRelay({}, { startDelivery: false });
    guarded = await startTestRelay({ security: { adminToken: TOKEN } }, { startDelivery: false });
  });
  after(async () => {
    await open.stop();
    await guarded.stop();
  });

  test('loopback clients may call everything, with or without a token configured', async () => {
    for (const relay of [open, guarded]) {
      for (const ip of ['127.0.0.1', '127.8.9.10', '::1', '::ffff:127.0.0.1']) {
        const app = createApp({ ...relay, getClientIp: () => ip });
        for (const [method, path] of ROUTES.slice(0, 5)) {
          const res = await app.request(path, { method });
          assert.equal(res.status, 200, `${ip} ${method} ${path}`);
        }
      }
    }
  });

  test('without a configured token, other clients get 403 on every route, token or not, each logged', async () => {
    const { logger, entries } = capturedLog();
    const app = createApp({ ...open, logger, getClientIp: () => REMOTE });
    const routes = everyRoute(open);
    assert.ok(routes.some(([method, path]) => method === 'DELETE' && path.startsWith('/admin/messages/')), 'the routes of one message are among them');
    for (const [method, path] of routes) {
      for (const headers of [{}, { authorization: `Bearer ${TOKEN}` }] as Array<Record<string, string>>) {
        const res = await app.request(path, { method, headers });
        assert.equal(res.status, 403, `${method} ${path}`);
        assert.deepEqual(await res.json(), {
          error: 'forbidden',
          message: 'only loopback clients may use this API: security.adminToken is not set',
        });
      }
    }
    const refusals = entries().filter((e) => e.event === 'api.refused');
    assert.deepEqual([refusals.length, [...new Set(refusals.map((e) => `${e.level} ${e.client} ${e.reason}`))]], [routes.length * 2, [`40 ${REMOTE} no-token-configured`]]);
    // Addresses that only look local are not loopback.
    for (const ip of ['10.0.0.1', '::ffff:10.0.0.1', '0.0.0.0', '128.0.0.1', '::2']) {
      const res = await createApp({ ...open, getClientIp: () => ip }).request('/health');
      assert.equal(res.status, 403, ip);
    }
  });

  test('a request that did not come over a socket is not taken for loopback', async () => {
    const res = await createApp(open).request('/health');
    assert.equal(res.status, 403);
  });

  test('with a token: missing or wrong is 401, the right one is let in', async () => {
    const app = createApp({ ...guarded, getClientIp: () => REMOTE });
    const status = async (authorization?: string, path = '/health') =>
      (await app.request(path, { headers: authorization ? { authorization } : {} })).status;
    const missing = await app.request('/health');
    assert.equal(missing.status, 401);
    assert.equal(missing.headers.get('www-authenticate'), 'Bearer realm="relayq"');
    assert.equal((await missing.json()).error, 'unauthorized');
    assert.equal(await status(`Bearer ${TOKEN}x`), 401);
    assert.equal(await status(`Bearer ${TOKEN.slice(0, -1)}`), 401);
    assert.equal(await status('Bearer '), 401);
    assert.equal(await status(`Basic ${Buffer.from(`admin:${TOKEN}`).toString('base64')}`), 401);
    assert.equal(await status(TOKEN), 401);
    assert.equal(await status(`Bearer ${TOKEN}`), 200);
    assert.equal(await status(`bearer ${TOKEN}`), 200);
    assert.equal(await status(`Bearer ${TOKEN}`, '/admin/messages'), 200);
    assert.equal(await status(`Bearer ${TOKEN}`, '/no-such-route'), 404);
    // every route, the routes of one message included
    for (const [method, path] of everyRoute(guarded)) {
      for (const authorization of [undefined, `Bearer ${TOKEN}x`]) {
        const res = await app.request(path, { method, headers: authorization ? { authorization } : {} });
        assert.equal(res.status, 401, `${method} ${path} ${authorization ?? 'without a token'}`);
      }
    }
  });

  test('over real HTTP: the socket peer decides; an injected non-loopback peer needs the token', async () => {
    assert.equal((await call(guarded, '/health')).status, 200, 'a real loopback socket');
    const remote = await startTestRelay({ security: { adminToken: TOKEN } }, { startDelivery: false, apiClientIp: () => REMOTE });
    try {
      assert.equal((await call(remote, '/health')).status, 401);
      assert.equal((await call(remote, '/health', { headers: { authorization: 'Bearer wrong' } })).status, 401);
      assert.equal((await call(remote, '/health', { headers: { authorization: `Bearer ${TOKEN}` } })).status, 200);
    } finally {
      await remote.stop();
    }
  });

  test('a loopback request from another site (form post, DNS rebinding) is refused; the token path is not affected', async () => {
    const loopback = createApp({ ...open, getClientIp: () => '127.0.0.1' });
    for (const headers of [{ host: 'localhost:8025' }, { host: '127.0.0.1' }, { host: '[::1]:8025' }, { origin: 'http://localhost:8025' }, {}] as Array<Record<string, string>>) {
      assert.equal((await loopback.request('/admin/messages', { headers })).status, 200, JSON.stringify(headers));
    }
    for (const headers of [{ host: 'rebound.example:8025' }, { origin: 'https://evil.example' }, { origin: 'null' }, { host: '127.0.0.1.evil.example' }, { host: 'notlocalhost:8025' }, { origin: 'http://evillocalhost' }] as Array<Record<string, string>>) {
      const res = await loopback.request('/admin/retry-failed', { method: 'POST', headers: { ...headers, 'content-type': 'text/plain' }, body: '{}' });
      assert.equal(res.status, 403, JSON.stringify(headers));
      const body = (await res.json()) as { error: string; message: string };
      assert.equal(body.error, 'forbidden');
      assert.match(body.message, /a loopback request must name a loopback host in (Host|Origin)/);
    }
    const remote = createApp({ ...guarded, getClientIp: () => REMOTE });
    const withToken = await remote.request('/admin/messages', { headers: { authorization: `Bearer ${TOKEN}`, origin: 'https://ops.example' } });
    assert.equal(withToken.status, 200);

    // over a real socket, with the Host header a rebinding page's browser would send
    assert.equal((await namingHost(open, `rebound.example:${open.httpPort}`)).status, 403);
  });

  test('a name under .localhost, or a loopback name in capitals, is a loopback host in Host and Origin', async () => {
    const loopback = createApp({ ...open, getClientIp: () => '127.0.0.1' });
    for (const headers of [{ host: 'relayq.localhost:8025' }, { host: 'LOCALHOST:8025' }, { host: 'Localhost' }, { origin: 'http://app.localhost:3000' }, { host: 'a.b.localhost', origin: 'http://LOCALHOST' }, { host: 'localhost.:8025' }, { host: '127.0.0.1.', origin: 'http://relayq.localhost.:8025' }] as Array<Record<string, string>>) {
      assert.equal((await loopback.request('/admin/messages', { headers })).status, 200, JSON.stringify(headers));
    }
    for (const headers of [{ host: 'localhost.evil.example' }, { origin: 'http://localhost.evil.example' }] as Array<Record<string, string>>) {
      assert.equal((await loopback.request('/admin/messages', { headers })).status, 403, JSON.stringify(headers));
    }
  });

  test('a loopback request that names another host (a reverse proxy on the same host) gets in with the token, and only with it', async () => {
    const viaProxy = (relay: Relay, headers: Record<string, string>) => namingHost(relay, 'relay.example.com', { 'x-forwarded-for': REMOTE, ...headers });
    const withToken = await viaProxy(guarded, { authorization: `Bearer ${TOKEN}` });
    assert.equal(withToken.status, 200);
    assert.ok(Array.isArray(withToken.body.messages));
    // a proxy that passes the client's Host on and adds no forwarding header: the token lets it in too
    const unmarked = await namingHost(guarded, 'relay.example.com', { authorization: `Bearer ${TOKEN}` });
    assert.equal(unmarked.status, 200);
    assert.ok(Array.isArray(unmarked.body.messages));
    for (const headers of [{}, { authorization: TOKEN }] as Array<Record<string, string>>) {
      // relayed (X-Forwarded-For): a remote client without the token
      const refused = await viaProxy(guarded, headers);
      assert.deepEqual([refused.status, refused.body.error], [401, 'unauthorized'], JSON.stringify(headers));
      // not relayed, but naming another host: a browser's page, refused outright
      const page = await namingHost(guarded, 'relay.example.com', headers);
      assert.deepEqual([page.status, page.body.error], [403, 'forbidden'], JSON.stringify(headers));
    }
    // a token, but the wrong one: told so, as any client with a wrong token is
    const wrong = await viaProxy(guarded, { authorization: 'Bearer wrong-token-of-16-chars' });
    assert.deepEqual([wrong.status, wrong.body.error], [401, 'unauthorized']);
    // no token configured: nothing to present, so the Host rule alone decides
    assert.equal((await viaProxy(open, { authorization: 'Bearer anything' })).status, 403);
  });

  test('with no token configured, a loopback request that names another host is refused with 403 whatever Authorization it carries', async () => {
    for (const headers of [{ authorization: 'Bearer anything-at-all-16' }, { authorization: `Bearer ${TOKEN}` }] as Array<Record<string, string>>) {
      const page = await namingHost(open, 'relay.example.com', headers);
      assert.deepEqual([page.status, page.body.error], [403, 'forbidden'], JSON.stringify(headers));
      assert.match(String(page.body.message), /^a loopback request must name a loopback host in Host, got "relay\.example\.com"$/);
    }
  });

  test('a loopback request a proxy relays (Forwarded, X-Forwarded-For, X-Real-IP) is a remote client: it needs the token', async () => {
    for (const forwarding of [{ forwarded: `for=${REMOTE}` }, { 'x-forwarded-for': REMOTE }, { 'x-real-ip': REMOTE }] as Array<Record<string, string>>) {
      // as nginx's plain proxy_pass http://127.0.0.1:8025 does, the request names the loopback host it connects to
      const noTokenConfigured = await call(open, '/admin/messages', { headers: forwarding });
      assert.equal(noTokenConfigured.status, 403, JSON.stringify(forwarding));
      assert.match(String(noTokenConfigured.body.message), /^only loopback clients may use this API \(a request relayed by a proxy, with (forwarded|x-forwarded-for|x-real-ip), is not a loopback client's\): security\.adminToken is not set$/);
      assert.equal((await call(guarded, '/admin/messages', { headers: forwarding })).status, 401);
      assert.equal((await call(guarded, '/admin/messages', { headers: { ...forwarding, authorization: `Bearer ${TOKEN}` } })).status, 200);
    }
    assert.equal((await call(open, '/admin/messages')).status, 200, 'control: the same request without the header is loopback');
  });

  test('admin actions are logged with who asked, and the token never is', async () => {
    const { logger, lines, entries } = capturedLog();
    const relay = await startTestRelay({ security: { adminToken: TOKEN } }, { startDelivery: false, logger });
    try {
      const asRemote = createApp({ ...relay, getClientIp: () => REMOTE });
      const viaToken = await asRemote.request('/admin/retry-failed', { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` } });
      assert.equal(viaToken.status, 200);
      const refused = await asRemote.request('/admin/retry-failed', { method: 'POST', headers: { authorization: 'Bearer nope' } });
      assert.equal(refused.status, 401);
      const local = await call(relay, '/admin/retry-failed', { method: 'POST' });
      assert.equal(local.status, 200);
      const flush = await asRemote.request('/admin/retry-queued', { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` } });
      assert.equal(flush.status, 200);
      const events = entries();
      const admin = events.filter((e) => e.event === 'api.admin');
      assert.deepEqual(
        admin.map((e) => [e.action, e.client, e.via, e.requeued ?? e.dueNow, e.component]),
        [
          ['retry-failed', REMOTE, 'token', 0, 'api'],
          ['retry-failed', '127.0.0.1', 'loopback', 0, 'api'],
          ['retry-queued', REMOTE, 'token', 0, 'api'],
        ],
      );
      const refusal = events.find((e) => e.event === 'api.refused');
      assert.equal(refusal?.client, REMOTE);
      assert.equal(refusal?.reason, 'wrong-token');
      assert.ok(!lines.join('\n').includes(TOKEN), 'the token is not in the log');
    } finally {
      await relay.stop();
    }
  });
});

/** GET /admin/messages over a real socket with this Host header (fetch does not let a caller set Host). */
function namingHost(relay: Relay, host: string, headers: Record<string, string> = {}): Promise<{ status: number; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: relay.httpPort, path: '/admin/messages', headers: { ...headers, host } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        text += chunk;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) }));
    });
    req.on('error', reject);
    req.end();
  });
}

/**
 * A raw client of the API that never closes its side, as a stuck or hostile one may not: the
 * server must not wait for it once it has answered. Its socket is added to `sockets`.
 */
async function openRawClient(port: number, sockets: net.Socket[]) {
  const socket = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  sockets.push(socket);
  let received = '';
  socket.setEncoding('utf8').on('data', (d: string) => (received += d));
  const closed = new Promise<void>((resolve) => {
    socket.on('end', () => resolve());
    socket.on('close', () => resolve());
  });
  socket.on('error', () => {});
  await new Promise((resolve) => socket.once('connect', resolve));
  return { socket, closed, received: () => received };
}

test('API clients cannot hold more connections than its limit, nor a request longer than its timeouts', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const api = await startApiServer(createApp(relay), '127.0.0.1', 0, { maxConnections: 5, headersTimeoutMs: 3000, requestTimeoutMs: 4000, idleTimeoutMs: 60_000 });
  const sockets: net.Socket[] = [];
  try {
    const open = () => openRawClient(api.port, sockets);
    // four clients that start a request and never finish its head, and one that never finishes its body
    const slow = [];
    for (let i = 0; i < 4; i++) {
      const c = await open();
      c.socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n');
      slow.push(c);
    }
    const slowBody = await open();
    slowBody.socket.write('POST /admin/retry-failed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{"ids":');
    slow.push(slowBody);
    await new Promise((r) => setTimeout(r, 200));
    // a sixth is closed at once, without an answer (the timeouts leave the slow ones nearly 3 s)
    const sixth = await open();
    sixth.socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await sixth.closed;
    assert.equal(sixth.received(), '');
    // the slow ones get 408 once their request is overdue, and their places are free again
    // though none of them has closed its side: five new clients are all answered
    await Promise.all(slow.map((c) => c.closed));
    for (const c of slow) {
      assert.match(c.received(), /^HTTP\/1\.1 408 /);
      const body = JSON.parse(c.received().slice(c.received().indexOf('\r\n\r\n') + 4));
      assert.deepEqual(body, { error: 'request_timeout', message: 'request too slow: a request head must arrive within 3 s and the whole request within 4 s' });
    }
    const fresh = await Promise.all(slow.map(() => open()));
    for (const c of fresh) c.socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n');
    await Promise.all(fresh.map((c) => c.closed));
    for (const c of fresh) assert.match(c.received(), /^HTTP\/1\.1 200 /);
  } finally {
    for (const s of sockets) s.destroy();
    await api.close();
    await relay.stop();
  }
});

test('with the limits serve uses, the API takes 256 connections at once: the 256th is answered, the 257th closed unanswered', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const api = await startApiServer(createApp(relay), '127.0.0.1', 0);
  const sockets: net.Socket[] = [];
  try {
    // 255 clients hold a place each with a request head begun (the 10 s head timeout leaves time)
    for (let i = 0; i < 255; i++) (await openRawClient(api.port, sockets)).socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n');
    const last = await openRawClient(api.port, sockets);
    last.socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n');
    const over = await openRawClient(api.port, sockets);
    over.socket.write('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n');
    await over.closed;
    assert.equal(over.received(), '', 'the 257th is closed at once, unanswered');
    last.socket.write('Connection: close\r\n\r\n');
    await last.closed;
    assert.match(last.received(), /^HTTP\/1\.1 200 /, 'the 256th is answered');
  } finally {
    for (const s of sockets) s.destroy();
    await api.close();
    await relay.stop();
  }
});

test('a client that closes its sending side after its request (nc -N, shutdown(SHUT_WR)) still gets the answer', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    const id = queuedId((await sendMail(relay.smtpPort, {})).response);
    /** The request, then the client's FIN at once; everything it reads until the server closes. */
    const halfClosed = async (request: string) => {
      const socket = net.connect({ port: relay.httpPort as number, host: '127.0.0.1', allowHalfOpen: true });
      socket.on('error', () => {});
      let received = '';
      socket.setEncoding('utf8').on('data', (d: string) => (received += d));
      const closed = new Promise((resolve) => socket.once('close', resolve));
      await new Promise((resolve) => socket.once('connect', resolve));
      socket.end(request);
      await closed;
      return received;
    };
    // answered after a write to the database (the health probe, an admin command), not at once
    assert.match(await halfClosed('GET /health HTTP/1.0\r\n\r\n'), /^HTTP\/1\.1 200 [\s\S]*"status":"ok"/);
    const retried = await halfClosed(`POST /admin/messages/${id}/retry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n`);
    assert.match(retried, /^HTTP\/1\.1 200 /);
    assert.match(retried, /"result":"due-now"/);
    assert.match(await halfClosed('GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'), /^HTTP\/1\.1 200 /);
    // bytes that are no request after a whole one (a stray byte, a Content-Length too short): the
    // request is answered, as its command may have run
    assert.match(await halfClosed('GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nX'), /^HTTP\/1\.1 200 [\s\S]*"status":"ok"/);
    const shortLength = await halfClosed(`POST /admin/messages/${id}/retry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n{}`);
    assert.match(shortLength, /^HTTP\/1\.1 200 [\s\S]*"result":"due-now"/);
    // one that closes its side before its request is complete is told so
    const incomplete = await halfClosed('POST /admin/retry-failed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{"ids":');
    assert.match(incomplete, /^HTTP\/1\.1 400 /);
    assert.deepEqual(JSON.parse(incomplete.slice(incomplete.indexOf('\r\n\r\n') + 4)), {
      error: 'bad_request',
      message: 'incomplete request: the client closed its side before the end of its request (head or body)',
    });
  } finally {
    await relay.stop();
  }
});

test('a client that stops reading its answer (a large raw message) is cut off once nothing moves, and its place is free again', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const api = await startApiServer(createApp(relay), '127.0.0.1', 0, { maxConnections: 1, headersTimeoutMs: 1000, requestTimeoutMs: 2000, idleTimeoutMs: 1000 });
  let socket: net.Socket | undefined;
  try {
    // far more than the socket buffers hold
    const id = queuedId((await sendMail(relay.smtpPort, { raw: `Subject: big\r\n\r\n${`${'x'.repeat(998)}\r\n`.repeat(20_000)}` })).response);
    const client = net.connect({ port: api.port, host: '127.0.0.1' });
    socket = client;
    client.on('error', () => {});
    await new Promise((resolve) => client.once('connect', resolve));
    client.pause();
    client.write(`GET /admin/messages/${id}/raw HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
    // it holds the one place (a client that reads nothing does not see its end): others are
    // closed at once until the server has cut it off
    const health = () =>
      fetch(`http://127.0.0.1:${api.port}/health`).then(
        (res) => res.status,
        () => 'refused',
      );
    assert.equal(await health(), 'refused');
    await waitFor(async () => (await health()) === 200, 30_000, 'the place of the client that reads nothing to be free again', 200);
  } finally {
    socket?.destroy();
    await api.close();
    await relay.stop();
  }
});

test('an answer that takes longer than the idle time to prepare (here /health waiting for a locked database) is still given', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const api = await startApiServer(createApp(relay), '127.0.0.1', 0, { maxConnections: 5, headersTimeoutMs: 1000, requestTimeoutMs: 2000, idleTimeoutMs: 500 });
  // the health check's write waits 2 s for the lock another connection holds, then gives up
  const lock = await holdWriteLock(relay, 2000);
  try {
    const res = await fetch(`http://127.0.0.1:${api.port}/health`);
    assert.equal(res.status, 503);
    assert.equal(((await res.json()) as { status: string }).status, 'error');
  } finally {
    await lock.release();
    await api.close();
    await relay.stop();
  }
});
