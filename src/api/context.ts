// What the HTTP API needs from the running relay, and what every request carries once the
// access check has passed (who asked, for the admin log). The Relay handle satisfies ApiDeps.
import type { Context } from 'hono';
import { HTTPException } from 'hono/http-exception';
import type { Logger } from 'pino';
import type { Clock } from '../clock.js';
import type { Config } from '../config/schema.js';
import type { InFlowStats } from '../delivery/in-flow.js';
import type { Sqlite } from '../store/db.js';
import type { DiskSpace } from '../store/disk.js';
import type { UpstreamRecord } from '../store/queries.js';
import type { StoreWriter } from '../store/writer.js';

/**
 * The delivery engine's live view: of the upstream, beyond what the store records, and of in-flow
 * pacing (counted since this process started).
 */
export interface DeliveryView {
  status(): UpstreamRecord & { upstream: string };
  claimFailure(): { since: number; err: string } | null;
  inFlow: { stats(): InFlowStats };
  /**
   * An attempt of this relay is delivering the message now. Its lease in the database says the
   * same, except after the wall clock stepped forward past it: the attempt keeps its message.
   */
  holds(messageId: string): boolean;
  /** While delivery to an upstream found unreachable is suspended, when that ends (the clock's ms); else null. */
  suspendedUntil(): number | null;
  /** Since when that upstream could not be reached: from `upstream.suspended` to `upstream.resumed`, across renewed suspensions; else null. */
  unreachableSince(): number | null;
}

export interface ApiDeps {
  config: Config;
  store: { sqlite: Sqlite };
  writer: Pick<StoreWriter, 'write' | 'storageFault'>;
  disk: Pick<DiskSpace, 'freeMb' | 'isLow' | 'readError'>;
  intake: { readonly isListening: boolean; readonly storeFailureCount: number; readonly connectionLimitCount: number; spoolFault(withinMs: number): string | undefined };
  clock: Clock;
  logger: Logger;
  /** Startup warnings shown in /health (e.g. loopback clients accepted without AUTH). */
  warnings: readonly string[];
  delivery: DeliveryView;
  /** The client's address; by default the socket's peer address. Tests inject other peers. */
  getClientIp?: (c: Context) => string | undefined;
}

export interface Requester {
  ip: string;
  /** How the request was let in. */
  via: 'loopback' | 'token';
}

export type ApiEnv = { Variables: { requester: Requester } };

/**
 * A query parameter given at most once. A repeated one (`?state=failed&state=queued`) is a `400`:
 * taking one of the values would answer a question the client did not ask.
 */
export function singleQuery(c: Context, name: string): string | undefined {
  const values = c.req.queries(name);
  if (values && values.length > 1) throw new HTTPException(400, { message: `${name} may be given only once` });
  return values?.[0];
}

/**
 * Refuses a query parameter the route does not take: a misspelt one would otherwise be left out,
 * and the answer would be to another question (`?stat=failed` a page of every message,
 * `/metrics?fromat=prometheus` JSON).
 */
export function onlyQueries(c: Context, names: readonly string[]): void {
  // Hono keeps a value it cannot decode as it was: `sender=%ZZ` would be a filter for "%ZZ"
  const query = c.req.url.includes('?') ? c.req.url.slice(c.req.url.indexOf('?') + 1) : '';
  const shown = (part: string) => JSON.stringify(part.length > 64 ? `${part.slice(0, 64)}…` : part);
  for (const part of query.split(/[&=]/)) {
    try {
      decodeURIComponent(part);
    } catch {
      throw new HTTPException(400, { message: `the query string is not valid percent-encoded UTF-8 at ${shown(part)}` });
    }
  }
  const expected = names.length > 0 ? `expected ${names.join(', ')}` : 'this request takes none';
  // Hono leaves out a parameter without a name (`?=prometheus`), as it would a misspelt one
  const nameless = query.split('&').find((pair) => pair.startsWith('='));
  if (nameless !== undefined) throw new HTTPException(400, { message: `a query parameter without a name (${shown(nameless)}): ${expected}` });
  const [unknown] = Object.keys(c.req.queries()).filter((name) => !names.includes(name));
  if (unknown === undefined) return;
  throw new HTTPException(400, { message: `unknown query parameter ${JSON.stringify(unknown)}: ${expected}` });
}
