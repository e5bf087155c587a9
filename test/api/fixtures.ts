// Fixtures of the HTTP API tests: JSON calls over real HTTP to a running relay, and an upstream
// that is down (connection refused) until its outage is switched off, on the same port.
import type { Relay } from '../../src/main.js';
import { closedPort, startUpstream, type Upstream } from '../helpers.js';

export interface HttpReply<T = Record<string, unknown>> {
  status: number;
  headers: Headers;
  body: T;
}

/** A request to the relay's HTTP API over a real socket; the body parsed as JSON when it is. */
export async function call<T = Record<string, unknown>>(relay: Relay, path: string, init: RequestInit = {}): Promise<HttpReply<T>> {
  if (relay.httpPort === undefined) throw new Error('the relay serves no HTTP API');
  const res = await fetch(`http://127.0.0.1:${relay.httpPort}${path}`, init);
  const text = await res.text();
  const json = (res.headers.get('content-type') ?? '').includes('application/json');
  return { status: res.status, headers: res.headers, body: (json ? JSON.parse(text) : text) as T };
}

export function postJson(body: unknown): RequestInit {
  return { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) };
}

/** An upstream that is down (connection refused) until `recover()` starts it on the same port. */
export async function upstreamOutage(): Promise<{ port: number; recover(): Promise<Upstream> }> {
  const port = await closedPort();
  return {
    port,
    async recover() {
      const upstream = await startUpstream();
      // startUpstream binds port 0; move it to the port the relay was configured with.
      await new Promise<void>((resolve) => upstream.server.server.close(() => resolve()));
      await new Promise<void>((resolve, reject) => {
        upstream.server.server.once('error', reject);
        upstream.server.server.listen(port, '127.0.0.1', () => resolve());
      });
      return { ...upstream, port };
    },
  };
}

/** The queue id in a `250 2.0.0 Ok: queued as <id>` reply. */
export function queueIdOf(response: string): string {
  const id = /queued as ([0-9A-F]+)/.exec(response)?.[1];
  if (!id) throw new Error(`no queue id in ${response}`);
  return id;
}
