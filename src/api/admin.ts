// /admin: requeue failed mail, make queued mail due now, page through the queue, look at one
// message (with its recipients and attempts, or its raw bytes), retry or delete one message.
// Commands go through the group commit like every write of the server; each is logged with who
// asked.
import { type Context, Hono } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { HTTPException } from 'hono/http-exception';
import { MAX_ADDRESS_LENGTH } from '../address.js';
import { isoTime } from '../clock.js';
import { count } from '../count.js';
import { removeFailedExport } from '../delivery/failed-export.js';
import { MAX_NESTING, nestedDeeperThan, repeatedKeys } from '../repeated-keys.js';
import { type DeleteResult, flushQueuedInSteps, HELD, type RequeueFilter, requeueFailedInSteps, type RetryResult, StoppedPartWay } from '../store/admin.js';
import { canonicalQueueId } from '../store/intake.js';
import { addressFilterProblem, BadFilter, listMessages, messageDetail, messageRaw } from '../store/queries.js';
import { isMessageState, MESSAGE_STATES } from '../store/schema.js';
import { type ApiDeps, type ApiEnv, onlyQueries, singleQuery } from './context.js';

const DEFAULT_PAGE_SIZE = 50;
const MAX_PAGE_SIZE = 1000;
const MAX_IDS = 10_000;
/** Ids of a retry-failed request that its log line lists (`idCount` says how many it had). */
const MAX_LOGGED_IDS = 10;
/** Room for MAX_IDS ids and the other filters. */
const MAX_BODY_BYTES = 1024 * 1024;

function badRequest(message: string): HTTPException {
  return new HTTPException(400, { message });
}

/** Database rows keep times as epoch ms; the API shows every `*_at` column as ISO 8601. */
function withIsoTimes<T extends object>(row: T): Record<string, unknown> {
  return Object.fromEntries(Object.entries(row).map(([k, v]) => [k, k.endsWith('_at') && (typeof v === 'number' || v === null) ? isoTime(v) : v]));
}

/**
 * A date (midnight UTC), or a date and time with a zone (`Z` or an offset): a time without one
 * would be the server's local time. Fields out of range (a 30 February) are refused, where
 * Date.parse would roll them over into the next month.
 */
const ISO_8601 = /^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,9})?)?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d))?$/;

/** A time given as epoch milliseconds (a JSON number) or as an ISO 8601 string. */
function parseTime(name: string, value: unknown): number {
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return value;
  const m = typeof value === 'string' ? ISO_8601.exec(value) : null;
  if (m) {
    // the fields read as UTC must come back unchanged: Date.parse rolls 30 February over
    const [, y, mo, d, h = '00', mi = '00', sec = '00'] = m;
    const fields = `${y}-${mo}-${d}T${h}:${mi}:${sec}`;
    const asUtc = Date.parse(`${fields}Z`);
    if (Number.isFinite(asUtc) && new Date(asUtc).toISOString().startsWith(fields)) return Date.parse(m[0]);
  }
  throw badRequest(`${name} must be an ISO 8601 date or time with a zone (2026-03-03T08:00:00Z) or epoch milliseconds (a number)`);
}

function parseSender(value: unknown): string {
  if (typeof value !== 'string') throw badRequest('sender must be a string (an envelope sender address, "<>" or "" for the null sender)');
  if (value.length > MAX_ADDRESS_LENGTH) throw badRequest(`sender must be at most ${MAX_ADDRESS_LENGTH} characters: no envelope sender is longer`);
  const problem = addressFilterProblem('sender', value);
  if (problem) throw badRequest(problem);
  return value;
}

/** The body of retry-queued: optionally, the sender whose mail to make due. */
function parseFlushFilter(body: unknown): { sender?: string } {
  if (body === undefined) return {};
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('the body must be a JSON object with an optional sender');
  const [unknown] = Object.keys(body).filter((key) => key !== 'sender');
  if (unknown !== undefined) throw badRequest(`unknown field ${JSON.stringify(unknown)}: expected sender`);
  const { sender } = body as { sender?: unknown };
  return sender === undefined ? {} : { sender: parseSender(sender) };
}

function parseRequeueFilter(body: unknown): RequeueFilter {
  if (body === undefined) return {};
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('the body must be a JSON object with optional ids, sender, since');
  const filter: RequeueFilter = {};
  for (const [key, value] of Object.entries(body)) {
    if (key === 'ids') {
      if (!Array.isArray(value) || value.length === 0 || value.length > MAX_IDS || !value.every((v) => typeof v === 'string' && v !== '')) {
        throw badRequest(`ids must be a non-empty array of at most ${MAX_IDS} message ids`);
      }
      filter.ids = value.map(canonicalQueueId);
    } else if (key === 'sender') {
      filter.sender = parseSender(value);
    } else if (key === 'since') {
      filter.since = parseTime('since', value);
    } else {
      throw badRequest(`unknown field ${JSON.stringify(key)}: expected ids, sender, since`);
    }
  }
  return filter;
}

/** The query parameters of GET /messages. */
const LIST_FILTERS = ['state', 'sender', 'recipient', 'limit', 'before'];

function parseLimit(value: string | undefined): number {
  if (value === undefined) return DEFAULT_PAGE_SIZE;
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < 1 || n > MAX_PAGE_SIZE) throw badRequest(`limit must be an integer from 1 to ${MAX_PAGE_SIZE}`);
  return n;
}

const limitBody = bodyLimit({
  maxSize: MAX_BODY_BYTES,
  // the rest of the body is not read, so the connection ends with the answer: said, a client
  // does not send its next request on it (a POST would fail, as it may not be sent again)
  onError: (c) => c.json({ error: 'payload_too_large', message: `the body is over ${MAX_BODY_BYTES} bytes` }, 413, { Connection: 'close' }),
});

/**
 * The filters of a command on many messages: its JSON body, undefined when empty. A query string
 * is refused: `?sender=…` there, as GET /messages takes it, would be left out, and the command
 * would act on every message.
 */
async function filterBody(c: Context<ApiEnv>): Promise<unknown> {
  if (new URL(c.req.url).search !== '') throw badRequest('the filters go in the JSON body, not in the query string');
  // read as it came, a gzipped body would be "not valid JSON"; RFC 9110 §8.4.1 answers 415
  const encoding = c.req.header('content-encoding')?.trim().toLowerCase();
  if (encoding && encoding !== 'identity') {
    c.header('Accept-Encoding', 'identity');
    throw new HTTPException(415, { message: `the body must come as it is, not in a Content-Encoding (${encoding.slice(0, 40)})` });
  }
  const text = await c.req.text();
  if (text.trim() === '') return undefined;
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    throw badRequest('the body is not valid JSON');
  }
  if (nestedDeeperThan(body, MAX_NESTING)) throw badRequest(`the body nests objects or arrays more than ${MAX_NESTING} levels deep`);
  // as a query parameter given twice: JSON.parse would take the last value without a word
  const [repeated] = repeatedKeys(text);
  if (repeated !== undefined) throw badRequest(`${repeated} may be given only once`);
  return body;
}

/** Queue ids have 20 characters: a longer id is quoted in part, not thousands of characters back. */
const QUOTED_ID_MAX = 64;

function quotedId(id: string): string {
  return id.length <= QUOTED_ID_MAX ? id : `${id.slice(0, QUOTED_ID_MAX)}… (${id.length} characters)`;
}

/** A bulk command's filter as its log line shows it: a few ids, each quoted in part when long. */
function loggedFilter<F extends { ids?: string[] }>(filter: F): F & { idCount?: number } {
  return filter.ids ? { ...filter, ids: filter.ids.slice(0, MAX_LOGGED_IDS).map(quotedId), idCount: filter.ids.length } : filter;
}

/**
 * An address filter of the query string. A query string reads `+` as a space, and no address
 * relayq stores has one: `?sender=app+tag@example.com` would find nothing, without a word.
 */
function addressQuery(c: Context<ApiEnv>, name: string): string | undefined {
  const value = singleQuery(c, name);
  if (value?.includes(' ')) throw badRequest(`${name}: an address has no space; a + in a query string is a space, write it %2B`);
  return value;
}

/**
 * A message a delivery worker holds. This relay gave back at its start the claims of one stopped
 * without handing them back (HELD's other case), so here a worker of its own holds it.
 */
function held(id: string): HTTPException {
  return new HTTPException(409, { message: `${id}: a delivery worker is delivering it right now; try again once that attempt has ended` });
}

function notFound(id: string): HTTPException {
  return new HTTPException(404, { message: `no message with id ${quotedId(id)}` });
}

/** What a command on one message did, in the words of its log line (`result` has the code). */
const RESULT_WORDS: Record<RetryResult | DeleteResult, string> = {
  requeued: 'requeued',
  'due-now': 'due now',
  deleted: 'deleted',
  held: `refused: ${HELD}`,
  delivered: 'nothing to retry: delivered to every recipient',
  'not-found': 'no such message',
};

export function adminRoutes(deps: ApiDeps) {
  const { writer, clock, store } = deps;
  const log = deps.logger;

  /** Logs a command on one message with who asked: its result, or (at warn) why it failed. */
  async function logged<T extends RetryResult | DeleteResult>(c: Context<ApiEnv>, action: string, id: string, command: Promise<T>): Promise<T> {
    const who = c.get('requester');
    // queueId, as every other line about one message has it
    const queueId = quotedId(id);
    const line = { event: 'api.admin', action, queueId, client: who.ip, via: who.via };
    try {
      const result = await command;
      log.info({ ...line, result }, `${action} ${queueId}: ${RESULT_WORDS[result]}`);
      return result;
    } catch (err) {
      log.warn({ ...line, result: 'error', err: (err as Error).message }, `${action} ${queueId} failed`);
      throw err;
    }
  }

  /**
   * Logs a command on many messages with who asked and how many it changed, under `count`: also
   * when it stopped part-way (at warn), since what was committed before the failure is a change
   * the admin log must show.
   */
  async function loggedBulk(
    c: Context<ApiEnv>,
    command: { action: string; filter: object; count: string },
    says: (changed: number) => string,
    run: Promise<number>,
  ): Promise<number> {
    const who = c.get('requester');
    const line = { event: 'api.admin', action: command.action, client: who.ip, via: who.via, filter: command.filter };
    try {
      const changed = await run;
      log.info({ ...line, [command.count]: changed }, says(changed));
      return changed;
    } catch (err) {
      const changed = err instanceof StoppedPartWay ? err.changed : 0;
      log.warn({ ...line, result: 'error', [command.count]: changed, err: (err as Error).message }, `${says(changed)}, then stopped`);
      throw err;
    }
  }

  /**
   * 'held' while an attempt of this relay delivers the message, as the engine knows it (not by the
   * claim's lease in the database, which a wall clock stepped forward ends early); otherwise runs
   * the command.
   */
  function unlessDelivering<T extends string>(id: string, command: () => Promise<T>): Promise<T | 'held'> {
    return deps.delivery.holds(id) ? Promise.resolve('held') : command();
  }

  return new Hono<ApiEnv>()
    .post('/retry-failed', limitBody, async (c) => {
      const filter = parseRequeueFilter(await filterBody(c));
      const now = clock.now();
      // the ids a request may list (up to MAX_IDS), or one long one, would make a line of up to a megabyte
      const requeued = await loggedBulk(
        c,
        { action: 'retry-failed', filter: loggedFilter(filter), count: 'requeued' },
        (n) => `requeued ${count(n, 'failed message')}`,
        requeueFailedInSteps(store.sqlite, filter, now, async (step) => {
          const ids = await writer.write('requeueFailed', step, now, deps.config.batchDelay);
          // each message by its queueId, as failedRetryInterval's requeue names it
          if (ids.length > 0) log.info({ event: 'delivery.requeued', ids, count: ids.length, by: 'api' }, 'failed mail requeued (retry-failed)');
          return ids.length;
        }),
      );
      return c.json({ requeued });
    })
    .post('/retry-queued', limitBody, async (c) => {
      const filter = parseFlushFilter(await filterBody(c));
      const now = clock.now();
      const dueNow = await loggedBulk(
        c,
        { action: 'retry-queued', filter, count: 'dueNow' },
        (n) => `made ${count(n, 'queued message')} due now`,
        flushQueuedInSteps(store.sqlite, filter.sender, (ids) => writer.write('flushQueued', ids, now, deps.config.batchDelay)),
      );
      return c.json({ due_now: dueNow });
    })
    .get('/messages', (c) => {
      onlyQueries(c, LIST_FILTERS);
      const state = singleQuery(c, 'state');
      if (state !== undefined && !isMessageState(state)) {
        throw badRequest(`state must be one of ${MESSAGE_STATES.join(', ')}`);
      }
      const before = singleQuery(c, 'before');
      if (before === '') throw badRequest('before must be the next_before of the previous page, or a message id');
      try {
        const page = listMessages(store.sqlite, {
          state,
          sender: addressQuery(c, 'sender'),
          recipient: addressQuery(c, 'recipient'),
          limit: parseLimit(singleQuery(c, 'limit')),
          before,
        });
        return c.json({ messages: page.messages.map(withIsoTimes), next_before: page.nextBefore });
      } catch (err) {
        if (err instanceof BadFilter) throw badRequest(err.message);
        throw err;
      }
    })
    .get('/messages/:id', (c) => {
      onlyQueries(c, []);
      const id = canonicalQueueId(c.req.param('id'));
      const detail = messageDetail(store.sqlite, id);
      if (!detail) throw notFound(id);
      const { raw_erased, smtputf8, ...message } = detail.message;
      return c.json({
        ...withIsoTimes(message),
        smtputf8: smtputf8 === 1,
        raw_erased: raw_erased === 1,
        recipients: detail.recipients.map((r) => ({ ...withIsoTimes(r), temporary: r.temporary === 1 })),
        attempts: detail.attempts.map(withIsoTimes),
      });
    })
    .get('/messages/:id/raw', (c) => {
      onlyQueries(c, []);
      const id = canonicalQueueId(c.req.param('id'));
      const row = messageRaw(store.sqlite, id);
      if (!row) throw notFound(id);
      if (row.raw === null) {
        throw new HTTPException(404, { message: `the content of ${id} was erased after delivery (security.logAllEmails is false)` });
      }
      // who read a message's content, as the commands that change one are logged (HEAD reads none)
      if (c.req.method !== 'HEAD') {
        const who = c.get('requester');
        log.info({ event: 'api.admin', action: 'read-raw', queueId: quotedId(id), client: who.ip, via: who.via, size: row.raw.byteLength }, `read-raw ${quotedId(id)}`);
      }
      // a view of the bytes, not a copy of a message that may be 25 MB
      return c.body(new Uint8Array(row.raw.buffer as ArrayBuffer, row.raw.byteOffset, row.raw.byteLength), 200, {
        'Content-Type': 'message/rfc822',
        'Content-Disposition': `attachment; filename="${id.replace(/[^A-Za-z0-9._-]/g, '_')}.eml"`,
      });
    })
    .post('/messages/:id/retry', async (c) => {
      onlyQueries(c, []);
      const id = canonicalQueueId(c.req.param('id'));
      const result = await logged(c, 'retry', id, unlessDelivering(id, () => writer.write('retryMessage', id, clock.now(), deps.config.batchDelay)));
      switch (result) {
        case 'not-found':
          throw notFound(id);
        case 'held':
          throw held(id);
        case 'delivered':
          throw new HTTPException(409, { message: `${id} is delivered to every recipient; nothing to retry` });
        default:
          return c.json({ id, result });
      }
    })
    .delete('/messages/:id', async (c) => {
      onlyQueries(c, []);
      const id = canonicalQueueId(c.req.param('id'));
      const result = await logged(c, 'delete', id, unlessDelivering(id, () => writer.write('deleteMessage', id, clock.now())));
      if (result === 'not-found') throw notFound(id);
      if (result === 'held') throw held(id);
      // a failed message's export goes with it: it would describe mail that is no longer there
      try {
        await removeFailedExport(deps.config.emailsDir, id);
      } catch (err) {
        const warning = `its failed export could not be removed: ${(err as Error).message}`;
        const who = c.get('requester');
        log.warn(
          { event: 'api.admin', action: 'delete', queueId: quotedId(id), client: who.ip, via: who.via, result: 'deleted', err: (err as Error).message },
          `delete ${quotedId(id)}: ${warning}`,
        );
        return c.json({ id, deleted: true, warning });
      }
      return c.json({ id, deleted: true });
    });
}
