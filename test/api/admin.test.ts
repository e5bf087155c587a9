import assert from 'node:assert/strict';
import net from 'node:net';
import { gzipSync } from 'node:zlib';
import { describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { ManualClock } from '../manual-clock.js';
import type { Relay } from '../../src/main.js';
import { ADMIN_STEP, deleteMessage, flushQueued, lastDeliveryRequest, type RequeueStep, requeueFailed, requeueFailedInSteps, retryMessage } from '../../src/store/admin.js';
import { listMessages, messageRaw, pageSql } from '../../src/store/queries.js';
import type { MessageState } from '../../src/store/schema.js';
import { capturedLog, holdWriteLock, insertMessages, openSession, sendMail, startHoldingUpstream, startTestRelay, startUpstream, type Upstream, waitFor, writeDirect } from '../helpers.js';
import { call, postJson, queueIdOf, upstreamOutage } from './fixtures.js';

interface MessageJson {
  id: string;
  state: string;
  mail_from: string;
  received_at: string;
  next_attempt_at: string | null;
  finished_at: string | null;
  last_error: string | null;
  raw_erased: boolean;
  recipients: Array<{ seq: number; address: string; status: string; attempts: number; temporary: boolean; last_code: number | null; next_attempt_at: string | null }>;
  attempts: Array<{ batch: number; recipients: string[]; upstream: string; outcome: string; code: number | null; started_at: string }>;
}

interface Page {
  messages: Array<{ id: string; state: string; mail_from: string; received_at: string }>;
  next_before: string | null;
}

async function send(relay: Relay, from: string, to: string[]): Promise<string> {
  return queueIdOf((await sendMail(relay.smtpPort, { from, to })).response);
}

/** Like send, with the addresses exactly as written (nodemailer lower-cases and encodes domains). */
async function sendAsWritten(relay: Relay, from: string, to: string[]): Promise<string> {
  const c = await openSession(relay.smtpPort, from, to);
  try {
    await c.send('DATA');
    return queueIdOf(await c.send('Subject: as written\r\n\r\nbody\r\n.'));
  } finally {
    c.close();
  }
}

function options(clock: ManualClock) {
  return { clock, startDelivery: false, startRetention: false };
}

/** One request written as is on a new connection (not ended: the server closes it once it has answered); the whole answer. */
function rawExchange(port: number, request: string): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(request));
    let text = '';
    socket.setEncoding('latin1');
    socket.on('data', (d: string) => {
      text += d;
    });
    socket.on('error', reject);
    socket.on('close', () => resolve(text));
  });
}

describe('admin: requeue failed mail', () => {
  test('retry-failed after an upstream outage delivers the failed mail and reports the number requeued', async () => {
    const clock = new ManualClock();
    const outage = await upstreamOutage();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: outage.port, failedRetryInterval: 0, batchDelay: 0, retry: { maxAttempts: 1 } },
      options(clock),
    );
    let upstream: Upstream | undefined;
    try {
      const a1 = await send(relay, 'a@example.com', ['x@example.com']);
      const a2 = await send(relay, 'a@example.com', ['y@example.com']);
      const b1 = await send(relay, 'B@Example.com', ['z@example.com']);
      await relay.delivery.runOnce();
      for (const id of [a1, a2, b1]) assert.equal((await call<MessageJson>(relay, `/admin/messages/${id}`)).body.state, 'failed');

      upstream = await outage.recover();
      const bySender = await call(relay, '/admin/retry-failed', postJson({ sender: 'b@example.com' }));
      assert.deepEqual([bySender.status, bySender.body], [200, { requeued: 1 }]);
      const rest = await call(relay, '/admin/retry-failed', { method: 'POST' });
      assert.deepEqual([rest.status, rest.body], [200, { requeued: 2 }]);

      const requeued = (await call<MessageJson>(relay, `/admin/messages/${a1}`)).body;
      assert.equal(requeued.state, 'queued');
      assert.equal(requeued.finished_at, null);
      assert.equal(requeued.last_error, null);
      assert.equal(requeued.next_attempt_at, new Date(clock.now()).toISOString());
      assert.deepEqual(
        requeued.recipients.map((r) => [r.status, r.attempts, r.temporary]),
        [['pending', 0, false]],
      );

      // Due at once: no clock advance needed.
      await relay.delivery.runOnce();
      assert.deepEqual(upstream.received.map((m) => m.to[0]).sort(), ['x@example.com', 'y@example.com', 'z@example.com']);
      for (const id of [a1, a2, b1]) assert.equal((await call<MessageJson>(relay, `/admin/messages/${id}`)).body.state, 'delivered');
      assert.deepEqual((await call(relay, '/admin/retry-failed', { method: 'POST' })).body, { requeued: 0 });
      const metrics = (await call(relay, '/metrics')).body;
      assert.equal(metrics.requeued_emails, 3);
      assert.equal(metrics.successful_emails, 3);
      assert.equal(metrics.failed_emails, 0);
      assert.equal(metrics.success_rate, 100, 'a failure since requeued and delivered is no failure');
      const health = (await call<{ details: Record<string, unknown> }>(relay, '/health')).body.details;
      assert.deepEqual([health.failed_emails, health.total_emails_processed, health.success_rate], [0, 3, 100]);
    } finally {
      await relay.stop();
      await upstream?.close();
    }
  });

  test('only the failed recipients are sent again; filters ids and since narrow the requeue', async () => {
    const clock = new ManualClock();
    let refuseLater = true;
    const upstream = await startUpstream({
      onRcptTo(address, _session, cb) {
        if (refuseLater && address.address === 'later@example.com') {
          return cb(Object.assign(new Error('4.2.1 Mailbox busy'), { responseCode: 450 }));
        }
        cb();
      },
    });
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0, batchDelay: 0, retry: { maxAttempts: 1 } },
      options(clock),
    );
    try {
      const early = await send(relay, 'a@example.com', ['now@example.com', 'later@example.com']);
      await relay.delivery.runOnce();
      clock.advance(60_000);
      const late = await send(relay, 'a@example.com', ['later@example.com']);
      await relay.delivery.runOnce();
      const failedAt = (await call<MessageJson>(relay, `/admin/messages/${late}`)).body.finished_at;
      assert.ok(failedAt);
      assert.equal(upstream.received.length, 1, 'only now@ got through');
      refuseLater = false;

      const none = await call(relay, '/admin/retry-failed', postJson({ ids: [early], since: failedAt }));
      assert.deepEqual(none.body, { requeued: 0 }, 'early failed before `since`');
      const bySince = await call(relay, '/admin/retry-failed', postJson({ since: failedAt }));
      assert.deepEqual(bySince.body, { requeued: 1 });
      const byId = await call(relay, '/admin/retry-failed', postJson({ ids: [early.toLowerCase(), early.toLowerCase(), 'NOSUCHID'] }));
      assert.deepEqual(byId.body, { requeued: 1 });

      await relay.delivery.runOnce();
      const resent = upstream.received.slice(1).map((m) => m.to);
      assert.deepEqual(resent, [['later@example.com'], ['later@example.com']], 'now@ was not sent again');
      const detail = (await call<MessageJson>(relay, `/admin/messages/${early}`)).body;
      assert.equal(detail.state, 'delivered');
      assert.deepEqual(
        detail.recipients.map((r) => [r.address, r.status]),
        [
          ['now@example.com', 'delivered'],
          ['later@example.com', 'delivered'],
        ],
      );
      assert.deepEqual(
        detail.attempts.map((a) => [a.outcome, a.recipients]),
        [
          ['partial', ['now@example.com', 'later@example.com']],
          ['delivered', ['later@example.com']],
        ],
      );
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('a bad body is a 400 that names the problem', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      const cases: Array<[RequestInit, string]> = [
        [{ method: 'POST', body: '{"ids": [' }, 'the body is not valid JSON'],
        [postJson([1, 2]), 'the body must be a JSON object with optional ids, sender, since'],
        [postJson({ ids: 'ABC' }), 'ids must be a non-empty array of at most 10000 message ids'],
        [postJson({ ids: [] }), 'ids must be a non-empty array of at most 10000 message ids'],
        [postJson({ sender: 5 }), 'sender must be a string (an envelope sender address, "<>" or "" for the null sender)'],
        ...['yesterday', 'Mar 3 2026', '1772529300000', '2026-03-03T08:00:00', '2026-13-03', '2026-02-30', '2026-02-31T08:00Z', '2026-03-03T24:00Z', -5, 1.5].map(
          (since): [RequestInit, string] => [postJson({ since }), 'since must be an ISO 8601 date or time with a zone (2026-03-03T08:00:00Z) or epoch milliseconds (a number)'],
        ),
        [postJson({ state: 'failed' }), 'unknown field "state": expected ids, sender, since'],
        // JSON.parse would take the last one: the filter narrowed without a word
        [{ method: 'POST', body: '{"sender": "a@example.com", "sender": "b@example.com"}' }, 'sender may be given only once'],
        // 20 KB: the check of repeated keys reads a document recursively
        [{ method: 'POST', body: `{"ids":${'['.repeat(10_000)}${']'.repeat(10_000)}}` }, 'the body nests objects or arrays more than 32 levels deep'],
        [postJson({ ids: [JSON.parse(`${'['.repeat(31)}${']'.repeat(31)}`)] }), 'the body nests objects or arrays more than 32 levels deep'],
      ];
      for (const [init, message] of cases) {
        const res = await call(relay, '/admin/retry-failed', init);
        assert.deepEqual([res.status, res.body], [400, { error: 'bad_request', message }]);
      }
      // 32 levels (the body, ids and 30 arrays) are read, and refused for what they hold
      const deepest = await call(relay, '/admin/retry-failed', postJson({ ids: [JSON.parse(`${'['.repeat(30)}${']'.repeat(30)}`)] }));
      assert.deepEqual(deepest.body, { error: 'bad_request', message: 'ids must be a non-empty array of at most 10000 message ids' });
      for (const since of ['2026-03-03', '2026-03-03T08:00Z', '2026-03-03T09:00:00.5+01:00', 0]) {
        const res = await call(relay, '/admin/retry-failed', postJson({ since }));
        assert.deepEqual([res.status, res.body], [200, { requeued: 0 }], String(since));
      }
      const long = `${'a'.repeat(64)}@${'d'.repeat(256)}`;
      const longSender = await call(relay, '/admin/retry-failed', postJson({ sender: long }));
      assert.deepEqual(longSender.body, { error: 'bad_request', message: 'sender must be at most 320 characters: no envelope sender is longer' });
      // one character less is the longest address intake takes: a filter like any other
      const longest = await call(relay, '/admin/retry-failed', postJson({ sender: long.slice(1) }));
      assert.deepEqual([longest.status, longest.body], [200, { requeued: 0 }]);
      // a From: line pasted: refused as GET /admin/messages?sender= refuses it, not an internal error
      for (const path of ['/admin/retry-failed', '/admin/retry-queued']) {
        const pasted = await call(relay, path, postJson({ sender: 'App Team <app@example.com>' }));
        assert.deepEqual([pasted.status, pasted.body], [400, { error: 'bad_request', message: 'sender: an address has no space' }], path);
      }
      // as GET /admin/messages takes it: left out, it would requeue everything
      const inQuery = await call(relay, '/admin/retry-failed?sender=a@example.com', { method: 'POST' });
      assert.deepEqual([inQuery.status, inQuery.body], [400, { error: 'bad_request', message: 'the filters go in the JSON body, not in the query string' }]);
      const huge = await call(relay, '/admin/retry-failed', postJson({ ids: Array.from({ length: 60_000 }, (_, i) => `ID${i}`.padEnd(20, '0')) }));
      assert.deepEqual([huge.status, huge.body], [413, { error: 'payload_too_large', message: 'the body is over 1048576 bytes' }]);
      // the body left unread ends the connection, which the answer says: fetch sends the next POST on another
      assert.equal(huge.headers.get('connection'), 'close');
      // an encoded body is not read as it came (gzip would be "not valid JSON"); identity is no encoding
      const gzipped = { method: 'POST', headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' }, body: gzipSync('{}') };
      const encoded = await call(relay, '/admin/retry-failed', gzipped);
      assert.deepEqual([encoded.status, encoded.body], [415, { error: 'unsupported_media_type', message: 'the body must come as it is, not in a Content-Encoding (gzip)' }]);
      assert.equal(encoded.headers.get('accept-encoding'), 'identity', 'what it takes (RFC 9110 §15.5.16)');
      const identity = await call(relay, '/admin/retry-failed', { ...postJson({}), headers: { 'content-type': 'application/json', 'content-encoding': 'identity' } });
      assert.deepEqual([identity.status, identity.body], [200, { requeued: 0 }]);
    } finally {
      await relay.stop();
    }
  });
});

describe('admin: make queued mail due now', () => {
  test('retry-queued after an upstream outage sends the deferred mail at once (postqueue -f); sender narrows it, and the attempt that reaches the upstream makes the rest due', async () => {
    const clock = new ManualClock();
    const outage = await upstreamOutage();
    const log = capturedLog('info');
    const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: outage.port, batchDelay: 0 }, { ...options(clock), logger: log.logger });
    let upstream: Upstream | undefined;
    try {
      const a1 = await send(relay, 'a@example.com', ['x@example.com']);
      const b1 = await send(relay, 'B@Example.com', ['z@example.com']);
      await relay.delivery.runOnce();
      const dueAt = async (id: string) => (await call<MessageJson>(relay, `/admin/messages/${id}`)).body.next_attempt_at ?? '';
      for (const id of [a1, b1]) assert.ok(Date.parse(await dueAt(id)) > clock.now(), 'deferred: waiting out its backoff');

      upstream = await outage.recover();
      const bySender = await call(relay, '/admin/retry-queued', postJson({ sender: 'b@example.com' }));
      assert.deepEqual([bySender.status, bySender.body], [200, { due_now: 1 }]);
      assert.equal(await dueAt(b1), new Date(clock.now()).toISOString());
      assert.ok(Date.parse(await dueAt(a1)) > clock.now(), 'another sender still waits');
      await relay.delivery.runOnce();
      assert.equal(upstream.received[0].to[0], 'z@example.com');
      // the attempt that reached the upstream again makes the rest due: the relay's own retry-queued
      await waitFor(() => log.entries().some((e) => e.event === 'delivery.due_after_outage'), 10_000, 'the rest to be made due');
      await relay.delivery.runOnce();
      assert.deepEqual(upstream.received.map((m) => m.to[0]).sort(), ['x@example.com', 'z@example.com']);
      assert.deepEqual((await call(relay, '/admin/retry-queued', { method: 'POST' })).body, { due_now: 0 }, 'nothing queued any more');
      assert.deepEqual(
        log.entries().filter((e) => e.event === 'api.admin').map((e) => [e.action, e.filter, e.dueNow]),
        [
          ['retry-queued', { sender: 'b@example.com' }, 1],
          ['retry-queued', {}, 0],
        ],
      );
    } finally {
      await relay.stop();
      await upstream?.close();
    }
  });

  test('retry-queued never makes mail due later than it was: a next batch due before batchDelay after the last one stays due', async () => {
    const clock = new ManualClock();
    const upstream = await startUpstream();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchSize: 1, batchDelay: 60 },
      options(clock),
    );
    try {
      const id = await send(relay, 'a@example.com', ['x@example.com', 'y@example.com']);
      await relay.delivery.runOnce();
      assert.deepEqual(upstream.received.map((m) => m.to), [['x@example.com']]);
      // due a second after its first batch, as a shorter batchDelay had it when the batch ended
      const dueAt = clock.now() + 1000;
      await writeDirect(relay, (db) => db.prepare('UPDATE messages SET next_attempt_at = ? WHERE id = ?').run(dueAt, id));
      clock.advance(2000);
      assert.deepEqual((await call(relay, '/admin/retry-queued', { method: 'POST' })).body, { due_now: 1 });
      assert.equal((await call<MessageJson>(relay, `/admin/messages/${id}`)).body.next_attempt_at, new Date(dueAt).toISOString());
      await relay.delivery.runOnce();
      assert.deepEqual(upstream.received.map((m) => m.to), [['x@example.com'], ['y@example.com']]);
    } finally {
      await relay.stop();
      await upstream.close();
    }
  });

  test('retry-queued: a bad body is a 400 that names the problem', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      const cases: Array<[RequestInit, string]> = [
        [{ method: 'POST', body: '{"sender": ' }, 'the body is not valid JSON'],
        [postJson(['a@example.com']), 'the body must be a JSON object with an optional sender'],
        [postJson({ sender: 5 }), 'sender must be a string (an envelope sender address, "<>" or "" for the null sender)'],
        [postJson({ ids: ['ABC'] }), 'unknown field "ids": expected sender'],
        [postJson({ sender: `a@${'d'.repeat(319)}` }), 'sender must be at most 320 characters: no envelope sender is longer'],
      ];
      for (const [init, message] of cases) {
        const res = await call(relay, '/admin/retry-queued', init);
        assert.deepEqual([res.status, res.body], [400, { error: 'bad_request', message }]);
      }
      const longest = await call(relay, '/admin/retry-queued', postJson({ sender: `a@${'d'.repeat(318)}` }));
      assert.deepEqual([longest.status, longest.body], [200, { due_now: 0 }]);
      const inQuery = await call(relay, '/admin/retry-queued?sender=', { method: 'POST' });
      assert.deepEqual([inQuery.status, inQuery.body], [400, { error: 'bad_request', message: 'the filters go in the JSON body, not in the query string' }]);
      for (const init of [postJson({}), postJson({ sender: '' }), { method: 'POST', body: ' ' }]) {
        assert.deepEqual((await call(relay, '/admin/retry-queued', init)).body, { due_now: 0 });
      }
    } finally {
      await relay.stop();
    }
  });
});

describe('admin: queue inspection', () => {
  test('list pages newest first through every filter, with a cursor', async () => {
    const clock = new ManualClock();
    const relay = await startTestRelay({}, options(clock));
    try {
      const ids: string[] = [];
      for (let i = 0; i < 9; i++) {
        // Pairs share an arrival time, so the id breaks the tie.
        if (i % 2 === 0) clock.advance(1000);
        ids.push(await send(relay, i % 3 === 0 ? 'Tom@example.com' : `s${i}@example.com`, [`r${i % 4}@example.com`, 'all@example.com']));
      }
      await writeDirect(relay, (db) => db.prepare(`UPDATE messages SET state = 'failed', finished_at = 1 WHERE id IN (?, ?)`).run(ids[1], ids[4]));

      const truth = (where: string, ...params: unknown[]) =>
        (relay.store.sqlite.prepare(`SELECT id FROM messages ${where} ORDER BY received_at DESC, id DESC`).all(...params) as Array<{ id: string }>).map((r) => r.id);
      const pageThrough = async (query: string, limit: number) => {
        const seen: string[] = [];
        let before: string | null = null;
        for (let guard = 0; guard < 20; guard++) {
          const res: { status: number; body: Page } = await call<Page>(relay, `/admin/messages?${query}&limit=${limit}${before ? `&before=${before}` : ''}`);
          assert.equal(res.status, 200);
          assert.ok(res.body.messages.length <= limit);
          seen.push(...res.body.messages.map((m) => m.id));
          before = res.body.next_before;
          if (!before) return seen;
        }
        throw new Error('paging did not end');
      };
      for (const limit of [1, 2, 4, 50]) {
        assert.deepEqual(await pageThrough('', limit), truth(''), `all, limit ${limit}`);
        assert.deepEqual(await pageThrough('state=queued', limit), truth("WHERE state = 'queued'"));
        assert.deepEqual(await pageThrough('sender=tom@EXAMPLE.com', limit), truth("WHERE sender_key = 'tom@example.com'"));
        assert.deepEqual(
          await pageThrough('recipient=r1@example.com', limit),
          truth("WHERE id IN (SELECT message_id FROM recipients WHERE address = 'r1@example.com')"),
        );
        assert.deepEqual(
          await pageThrough('state=failed&recipient=all@example.com', limit),
          truth("WHERE state = 'failed'"),
        );
      }
      // The cursor outlives its message: delete the last one listed, and the next page starts
      // where it would have. A bare message id still works as a cursor.
      const order = truth('');
      const firstPage = (await call<Page>(relay, '/admin/messages?limit=3')).body;
      assert.deepEqual(firstPage.messages.map((m) => m.id), order.slice(0, 3));
      const byId = (await call<Page>(relay, `/admin/messages?limit=3&before=${order[2]}`)).body;
      assert.deepEqual(byId.messages.map((m) => m.id), order.slice(3, 6));
      assert.equal((await call(relay, `/admin/messages/${order[2]}`, { method: 'DELETE' })).status, 200);
      const next = await call<Page>(relay, `/admin/messages?limit=3&before=${firstPage.next_before}`);
      assert.equal(next.status, 200);
      assert.deepEqual(next.body.messages.map((m) => m.id), order.slice(3, 6));
      assert.equal(next.body.next_before, byId.next_before);

      const all = (await call<Page>(relay, '/admin/messages')).body.messages;
      assert.equal(all.length, 8, 'default page of 50');
      for (let i = 1; i < all.length; i++) {
        const [newer, older] = [all[i - 1], all[i]];
        assert.ok(newer.received_at > older.received_at || (newer.received_at === older.received_at && newer.id > older.id), 'newest first');
      }

      const first = (await call<Page>(relay, '/admin/messages?limit=1')).body.messages[0];
      assert.deepEqual(Object.keys(first).sort(), [
        'auth_user', 'claims', 'client_ip', 'finished_at', 'id', 'last_error', 'mail_from', 'next_attempt_at', 'received_at', 'recipient_count', 'size', 'state',
      ]);
      assert.equal(first.received_at, new Date(clock.now()).toISOString());

      // the null sender is found as a listing shows it, <>, or empty; an address also as MAIL FROM
      // writes it, in angle brackets
      const bounce = await sendAsWritten(relay, '', ['bounced@example.com']);
      for (const query of ['', '<>']) {
        const res = await call<Page>(relay, `/admin/messages?sender=${encodeURIComponent(query)}`);
        assert.deepEqual(res.body.messages.map((m) => m.id), [bounce], JSON.stringify(query));
      }
      const bracketed = await call<Page>(relay, `/admin/messages?sender=${encodeURIComponent('<TOM@example.com>')}`);
      assert.deepEqual(bracketed.body.messages.map((m) => m.id), truth("WHERE sender_key = 'tom@example.com'"));
      assert.ok(bracketed.body.messages.length > 0);

      // the recipient filter ignores case, as the sender filter does
      const mixed = await send(relay, 'x@example.com', ['John.Doe@Example.com']);
      for (const query of ['john.doe@example.com', 'JOHN.DOE@EXAMPLE.COM', 'John.Doe@Example.com']) {
        const res = await call<Page>(relay, `/admin/messages?recipient=${encodeURIComponent(query)}`);
        assert.deepEqual(res.body.messages.map((m) => m.id), [mixed], query);
      }
      // an xn-- domain is stored decoded however the client wrote it, and found in either form;
      // so is a Unicode one, as IDNA maps it (upper case, fullwidth letters, a decomposed ü): two
      // spellings of one address are one recipient, as they are one address upstream
      const idn = await sendAsWritten(relay, 'x@example.com', [
        'bob@XN--MNCHEN-3YA.DE',
        'carl@xn--mnchen-3ya.de',
        'bob@xn--mnchen-3ya.de',
        'bob@MÜNCHEN.de',
        'bob@ｍüｎｃｈｅｎ.de',
        'bob@mu\u0308nchen.de',
      ]);
      assert.deepEqual(
        relay.store.sqlite.prepare('SELECT address FROM recipients WHERE message_id = ? ORDER BY seq').pluck().all(idn),
        ['bob@münchen.de', 'carl@münchen.de'],
      );
      assert.equal(relay.store.sqlite.prepare('SELECT recipient_count FROM messages WHERE id = ?').pluck().get(idn), 2);
      // so is the sender's
      const fromIdn = await sendAsWritten(relay, 'Alice@XN--MNCHEN-3YA.DE', ['x@example.com']);
      assert.equal(relay.store.sqlite.prepare('SELECT mail_from FROM messages WHERE id = ?').pluck().get(fromIdn), 'Alice@münchen.de');
      const fullwidth = await sendAsWritten(relay, 'Eve@ＥＸＡＭＰＬＥ.org', ['x@example.com', 'y@ｅｘａｍｐｌｅ.com', 'Y@example.COM']);
      assert.equal(relay.store.sqlite.prepare('SELECT mail_from FROM messages WHERE id = ?').pluck().get(fullwidth), 'Eve@example.org');
      assert.deepEqual(
        relay.store.sqlite.prepare('SELECT address FROM recipients WHERE message_id = ? ORDER BY seq').pluck().all(fullwidth),
        ['x@example.com', 'y@example.com'],
      );
      for (const query of ['bob@münchen.de', 'bob@xn--mnchen-3ya.de', 'carl@XN--MNCHEN-3YA.DE', 'Carl@münchen.DE', '<bob@münchen.de>']) {
        const res = await call<Page>(relay, `/admin/messages?recipient=${encodeURIComponent(query)}`);
        assert.deepEqual(res.body.messages.map((m) => m.id), [idn], query);
      }
      // an IPv6 literal is stored in its canonical form and found however it is written
      const literal = await sendAsWritten(relay, 'dev@[IPv6:2001:DB8:0:0:0:0:0:1]', ['r@[IPv6:2001:DB8:0:0:0:0:0:2]']);
      for (const [filter, query] of [
        ['sender', 'dev@[IPv6:2001:DB8:0:0:0:0:0:1]'],
        ['sender', '<dev@[ipv6:2001:db8::1]>'],
        ['recipient', 'r@[IPv6:2001:DB8:0:0:0:0:0:2]'],
        ['recipient', 'R@[IPv6:2001:0db8::0:2]'],
      ]) {
        const res = await call<Page>(relay, `/admin/messages?${filter}=${encodeURIComponent(query)}`);
        assert.deepEqual(res.body.messages.map((m) => m.id), [literal], query);
      }

      const bad: Array<[string, string]> = [
        ['state=lost', 'state must be one of queued, sending, delivered, failed'],
        ['limit=0', 'limit must be an integer from 1 to 1000'],
        ['limit=1001', 'limit must be an integer from 1 to 1000'],
        ['limit=ten', 'limit must be an integer from 1 to 1000'],
        ['before=NOSUCHMESSAGE', 'before: no message with id NOSUCHMESSAGE'],
        ['before=1-', 'before: 1- is not a cursor (<received_at>-<id>, as next_before gives it)'],
        ['before=-1A2239F2D794D2B77B69', 'before: -1A2239F2D794D2B77B69 is not a cursor (<received_at>-<id>, as next_before gives it)'],
        ['before=99999999999999999999-X', 'before: 99999999999999999999-X is not a cursor (<received_at>-<id>, as next_before gives it)'],
        // the id of a cursor cut short, or not a queue id at all
        ['before=1796375915710-1A240592CBD48E7C65', 'before: 1796375915710-1A240592CBD48E7C65 is not a cursor (<received_at>-<id>, as next_before gives it)'],
        ['before=1796375915710-nonsense', 'before: 1796375915710-nonsense is not a cursor (<received_at>-<id>, as next_before gives it)'],
        ['before=', 'before must be the next_before of the previous page, or a message id'],
        ['recipient=', 'recipient: must be an address (a recipient is never empty; the null sender is a sender)'],
        ['sender=app+tag%40example.com', 'sender: an address has no space; a + in a query string is a space, write it %2B'],
        ['recipient=bob%20smith%40example.com', 'recipient: an address has no space; a + in a query string is a space, write it %2B'],
        ['state=failed&state=queued', 'state may be given only once'],
        ['limit=5&sender=a%40example.com&limit=5', 'limit may be given only once'],
        ['stat=failed', 'unknown query parameter "stat": expected state, sender, recipient, limit, before'],
        ['state=failed&Sender=a%40example.com', 'unknown query parameter "Sender": expected state, sender, recipient, limit, before'],
        ['=failed', 'a query parameter without a name ("=failed"): expected state, sender, recipient, limit, before'],
        // a value that cannot be decoded is not a filter for its undecoded text
        ['sender=%ZZ%40example.com', 'the query string is not valid percent-encoded UTF-8 at "%ZZ%40example.com"'],
        ['recipient=%E0%A4%40example.com', 'the query string is not valid percent-encoded UTF-8 at "%E0%A4%40example.com"'],
        [`sender=a%4${'x'.repeat(100)}`, `the query string is not valid percent-encoded UTF-8 at "a%4${'x'.repeat(61)}…"`],
      ];
      for (const [query, message] of bad) {
        const res = await call(relay, `/admin/messages?${query}`);
        assert.deepEqual([res.status, res.body], [400, { error: 'bad_request', message }], query);
      }
      for (const limit of [1, 1000]) assert.equal((await call(relay, `/admin/messages?limit=${limit}`)).status, 200, `limit=${limit}`);
      const tagged = await send(relay, 'app+tag@example.com', ['x@example.com']);
      const byTag = await call<Page>(relay, `/admin/messages?sender=${encodeURIComponent('app+tag@example.com')}`);
      assert.deepEqual(byTag.body.messages.map((m) => m.id), [tagged]);
      // the requests about one message take no parameter: a `?dry_run=1` must not delete it
      for (const [method, route] of [['GET', ''], ['GET', '/raw'], ['POST', '/retry'], ['DELETE', '']]) {
        const res = await call(relay, `/admin/messages/${tagged}${route}?dry_run=1`, { method });
        const message = 'unknown query parameter "dry_run": this request takes none';
        assert.deepEqual([res.status, res.body], [400, { error: 'bad_request', message }], `${method} ${route}`);
      }
      assert.equal((await call(relay, `/admin/messages/${tagged}`)).status, 200, 'still there');
    } finally {
      await relay.stop();
    }
  });

  test('a page that holds exactly the last `limit` messages has no next_before, with and without a filter', async () => {
    const clock = new ManualClock();
    const relay = await startTestRelay({}, options(clock));
    try {
      for (let i = 0; i < 3; i++) {
        clock.advance(1000);
        await send(relay, 'tom@example.com', ['x@example.com']);
      }
      for (const query of ['', 'state=queued&', 'sender=tom%40example.com&']) {
        const exact = (await call<Page>(relay, `/admin/messages?${query}limit=3`)).body;
        assert.deepEqual([exact.messages.length, exact.next_before], [3, null], `${query}limit=3`);
        const short = (await call<Page>(relay, `/admin/messages?${query}limit=2`)).body;
        assert.equal(short.messages.length, 2);
        assert.notEqual(short.next_before, null, `${query}limit=2: one more to come`);
      }
    } finally {
      await relay.stop();
    }
  });

  test('detail has the envelope, recipients and attempts; raw is the stored bytes as message/rfc822, and its reading is logged', async () => {
    const clock = new ManualClock();
    const log = capturedLog('info');
    const relay = await startTestRelay({}, { ...options(clock), logger: log.logger });
    try {
      const id = await send(relay, 'alice@example.com', ['b@example.com', 'c@example.com']);
      clock.advance(500);
      await relay.delivery.runOnce();
      const { status, body } = await call<MessageJson>(relay, `/admin/messages/${id}`);
      assert.equal(status, 200);
      assert.equal(body.id, id);
      assert.equal(body.state, 'delivered');
      assert.equal(body.mail_from, 'alice@example.com');
      assert.equal(body.raw_erased, false);
      assert.equal(body.finished_at, new Date(clock.now()).toISOString());
      assert.deepEqual(
        body.recipients.map((r) => [r.seq, r.address, r.status, r.attempts]),
        [
          [0, 'b@example.com', 'delivered', 1],
          [1, 'c@example.com', 'delivered', 1],
        ],
      );
      assert.equal(body.attempts.length, 1);
      assert.deepEqual(body.attempts[0].recipients, ['b@example.com', 'c@example.com']);
      assert.equal(body.attempts[0].upstream, 'local');
      assert.equal(body.attempts[0].outcome, 'delivered');

      const res = await fetch(`http://127.0.0.1:${relay.httpPort}/admin/messages/${id}/raw`);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get('content-type'), 'message/rfc822');
      assert.equal(res.headers.get('content-disposition'), `attachment; filename="${id}.eml"`);
      const stored = messageRaw(relay.store.sqlite, id) as { raw: Buffer };
      assert.deepEqual(Buffer.from(await res.arrayBuffer()), stored.raw);
      const reads = log.entries().filter((e) => e.action === 'read-raw');
      // the GET that returned the content is logged; a HEAD, which returns none, is not
      assert.equal(reads.length, 1, 'the GET is logged');
      const head = await fetch(`http://127.0.0.1:${relay.httpPort}/admin/messages/${id}/raw`, { method: 'HEAD' });
      assert.deepEqual([head.status, (await head.arrayBuffer()).byteLength], [200, 0]);
      assert.equal(log.entries().filter((e) => e.action === 'read-raw').length, 1, 'the HEAD is not');
      assert.deepEqual(
        reads.map(({ event, queueId, client, via, size, msg }) => ({ event, queueId, client, via, size, msg })),
        [{ event: 'api.admin', queueId: id, client: '127.0.0.1', via: 'loopback', size: stored.raw.length, msg: `read-raw ${id}` }],
      );

      // an id typed in lower case names the same message, and replies name it as stored
      const lower = id.toLowerCase();
      assert.deepEqual(await call<MessageJson>(relay, `/admin/messages/${lower}`).then((r) => [r.status, r.body]), [200, body]);
      const rawLower = await fetch(`http://127.0.0.1:${relay.httpPort}/admin/messages/${lower}/raw`);
      assert.equal(rawLower.headers.get('content-disposition'), `attachment; filename="${id}.eml"`);
      assert.deepEqual(Buffer.from(await rawLower.arrayBuffer()), stored.raw);
      const retried = await call(relay, `/admin/messages/${lower}/retry`, { method: 'POST' });
      assert.deepEqual([retried.status, retried.body.message], [409, `${id} is delivered to every recipient; nothing to retry`]);
      const deleted = await call(relay, `/admin/messages/${lower}`, { method: 'DELETE' });
      assert.deepEqual([deleted.status, deleted.body], [200, { id, deleted: true }]);
      assert.equal(messageRaw(relay.store.sqlite, id), undefined);

      for (const path of [`/admin/messages/NOSUCHID`, `/admin/messages/NOSUCHID/raw`]) {
        const missing = await call(relay, path);
        assert.deepEqual([missing.status, missing.body], [404, { error: 'not_found', message: 'no message with id NOSUCHID' }]);
      }
      const long = await call(relay, `/admin/messages/${'A'.repeat(5000)}`);
      assert.deepEqual([long.status, long.body.message], [404, `no message with id ${'A'.repeat(64)}… (5000 characters)`]);
    } finally {
      await relay.stop();
    }
  });

  test('raw is 404 once the content was erased at delivery (logAllEmails=false)', async () => {
    const relay = await startTestRelay({ security: { logAllEmails: false } }, { startDelivery: false });
    try {
      const id = await send(relay, 'a@example.com', ['b@example.com']);
      assert.equal((await call<string>(relay, `/admin/messages/${id}/raw`)).status, 200, 'kept until delivered');
      await relay.delivery.runOnce();
      const raw = await call(relay, `/admin/messages/${id}/raw`);
      assert.equal(raw.status, 404);
      assert.match(String(raw.body.message), /erased after delivery/);
      assert.equal((await call<MessageJson>(relay, `/admin/messages/${id}`)).body.raw_erased, true);
    } finally {
      await relay.stop();
    }
  });
});

describe('admin: retry and delete one message', () => {
  test('retry: failed → requeued, deferred → due now, delivered → 409, unknown → 404', async () => {
    const clock = new ManualClock();
    const outage = await upstreamOutage();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: outage.port, failedRetryInterval: 0, batchDelay: 0, retry: { maxAttempts: 2 } },
      options(clock),
    );
    let upstream: Upstream | undefined;
    try {
      const id = await send(relay, 'a@example.com', ['x@example.com']);
      await relay.delivery.runOnce();
      const deferred = (await call<MessageJson>(relay, `/admin/messages/${id}`)).body;
      assert.equal(deferred.state, 'queued');
      assert.ok(Date.parse(deferred.next_attempt_at ?? '') > clock.now(), 'waiting for its backoff');
      assert.equal(deferred.recipients[0].next_attempt_at, deferred.next_attempt_at, 'its pending recipient is due then too');

      const now = await call(relay, `/admin/messages/${id}/retry`, { method: 'POST' });
      assert.deepEqual([now.status, now.body], [200, { id, result: 'due-now' }]);
      assert.equal((await call<MessageJson>(relay, `/admin/messages/${id}`)).body.next_attempt_at, new Date(clock.now()).toISOString());
      await relay.delivery.runOnce();
      const failed = (await call<MessageJson>(relay, `/admin/messages/${id}`)).body;
      assert.equal(failed.state, 'failed', 'second attempt was the last');
      // nothing is due any more: no time of a next attempt, in the detail, its recipient and the list
      assert.deepEqual([failed.next_attempt_at, failed.recipients[0].status, failed.recipients[0].next_attempt_at], [null, 'failed', null]);
      const listed = (await call<{ messages: MessageJson[] }>(relay, '/admin/messages?state=failed')).body.messages;
      assert.deepEqual(listed.map((m) => [m.id, m.next_attempt_at]), [[id, null]]);

      upstream = await outage.recover();
      const requeued = await call(relay, `/admin/messages/${id}/retry`, { method: 'POST' });
      assert.deepEqual([requeued.status, requeued.body], [200, { id, result: 'requeued' }]);
      await relay.delivery.runOnce();
      assert.equal(upstream.received.length, 1);

      const done = await call(relay, `/admin/messages/${id}/retry`, { method: 'POST' });
      assert.equal(done.status, 409);
      assert.equal(done.body.error, 'conflict');
      const missing = await call(relay, '/admin/messages/NOSUCHID/retry', { method: 'POST' });
      assert.equal(missing.status, 404);
    } finally {
      await relay.stop();
      await upstream?.close();
    }
  });

  test('delete removes a message with its recipients and attempts; 409 while a worker holds it, even past its lease by a stepped clock', async () => {
    const clock = new ManualClock();
    const upstream = await startHoldingUpstream();
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0, processingTimeout: 60 },
      options(clock),
    );
    try {
      const queued = await send(relay, 'a@example.com', ['x@example.com']);
      const res = await call(relay, `/admin/messages/${queued}`, { method: 'DELETE' });
      assert.deepEqual([res.status, res.body], [200, { id: queued, deleted: true }]);
      assert.equal((await call(relay, `/admin/messages/${queued}`)).status, 404);
      const left = relay.store.sqlite.prepare('SELECT COUNT(*) AS n FROM recipients WHERE message_id = ?').get(queued) as { n: number };
      assert.equal(left.n, 0);
      assert.equal((await call(relay, `/admin/messages/${queued}`, { method: 'DELETE' })).status, 404);

      const busy = await send(relay, 'a@example.com', ['y@example.com']);
      const run = relay.delivery.runOnce();
      await waitFor(async () => (await call<MessageJson>(relay, `/admin/messages/${busy}`)).body.state === 'sending', 10_000, 'the claim');
      const refused = await call(relay, `/admin/messages/${busy}`, { method: 'DELETE' });
      assert.equal(refused.status, 409);
      assert.equal(refused.body.error, 'conflict');
      assert.equal(refused.body.message, `${busy}: a delivery worker is delivering it right now; try again once that attempt has ended`);
      assert.equal((await call(relay, `/admin/messages/${busy}/retry`, { method: 'POST' })).status, 409);
      assert.equal(((await call(relay, '/metrics')).body.queue as Record<string, number>).sending, 1);

      // The wall clock steps past the lease (an NTP step, a resumed VM): by the database the
      // claim has ended, but the attempt still runs, so the message is still held.
      clock.advance(61_000);
      assert.equal((await call(relay, `/admin/messages/${busy}`, { method: 'DELETE' })).status, 409);
      assert.equal((await call(relay, `/admin/messages/${busy}/retry`, { method: 'POST' })).status, 409);
      upstream.release();
      await run;
      assert.equal((await call<MessageJson>(relay, `/admin/messages/${busy}`)).body.state, 'delivered');
      assert.equal(relay.store.sqlite.prepare('SELECT claims FROM messages WHERE id = ?').pluck().get(busy), 1, 'claimed once, sent once');
      const gone = await call(relay, `/admin/messages/${busy}`, { method: 'DELETE' });
      assert.equal(gone.status, 200);
      const m = (await call(relay, '/metrics')).body;
      assert.deepEqual(m.queue, { queued: 0, sending: 0, delivered: 0, failed: 0 });
    } finally {
      upstream.release();
      await relay.stop();
      await upstream.close();
    }
  });
  test('a claim whose lease ran out (its relay stopped without handing it back) holds the message until that instant, not after', async () => {
    const clock = new ManualClock();
    const relay = await startTestRelay({}, options(clock));
    try {
      const retried = await send(relay, 'a@example.com', ['x@example.com']);
      const deleted = await send(relay, 'a@example.com', ['y@example.com']);
      const leaseEnds = clock.now() + 60_000;
      await writeDirect(relay, (db) =>
        db.prepare("UPDATE messages SET state = 'sending', lease_token = 'stopped', lease_expires_at = ? WHERE id IN (?, ?)").run(leaseEnds, retried, deleted),
      );
      const at = <T>(fn: (db: Relay['store']['sqlite']) => T) => writeDirect(relay, fn);
      assert.equal(await at((db) => retryMessage(db, retried, leaseEnds - 1, 0)), 'held');
      assert.equal(await at((db) => deleteMessage(db, deleted, leaseEnds - 1)), 'held');
      assert.equal(await at((db) => retryMessage(db, retried, leaseEnds, 0)), 'due-now', 'claimable again: the delivery engine takes it back');
      // and left as it is for the engine to take back: a process that is not the engine cannot
      // tell whether an attempt still holds it (one committing its outcome late), and clearing
      // the claim would let the message be sent twice
      assert.deepEqual(relay.store.sqlite.prepare('SELECT state, lease_token, lease_expires_at FROM messages WHERE id = ?').get(retried), {
        state: 'sending',
        lease_token: 'stopped',
        lease_expires_at: leaseEnds,
      });
      assert.equal(await at((db) => deleteMessage(db, deleted, leaseEnds)), 'deleted');
      assert.equal(relay.store.sqlite.prepare('SELECT 1 FROM messages WHERE id = ?').get(deleted), undefined);
    } finally {
      await relay.stop();
    }
  });
});

describe('HTTP errors are JSON', () => {
  test('404 for unknown routes, 405 with Allow for known ones', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    try {
      const unknown = await call(relay, '/admin/messages/X/raw/more');
      assert.deepEqual([unknown.status, unknown.body], [404, { error: 'not_found', message: 'no route for GET /admin/messages/X/raw/more' }]);
      const wrong = await call(relay, '/admin/retry-failed');
      assert.equal(wrong.status, 405);
      assert.equal(wrong.headers.get('allow'), 'POST');
      assert.equal(wrong.body.error, 'method_not_allowed');
      const put = await call(relay, '/admin/messages/X', { method: 'PUT' });
      assert.equal(put.status, 405);
      assert.equal(put.headers.get('allow'), 'DELETE, GET, HEAD');
      const metrics = await call(relay, '/metrics', { method: 'POST' });
      assert.deepEqual([metrics.status, metrics.headers.get('allow')], [405, 'GET, HEAD']);
      const head = await fetch(`http://127.0.0.1:${relay.httpPort}/health`, { method: 'HEAD' });
      assert.equal(head.status, 200);
    } finally {
      await relay.stop();
    }
  });

  test('requests the app never sees (no Host, GET *, a head over 16 KB, a control character in a header, CONNECT, an Expect other than 100-continue) get JSON errors too, without the body for HEAD', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    /** One request written as is; the response as status, content type and parsed body. */
    const raw = async (request: string) => {
      const text = await rawExchange(relay.httpPort as number, request);
      const [head, body] = [text.slice(0, text.indexOf('\r\n\r\n')), text.slice(text.indexOf('\r\n\r\n') + 4)];
      const type = /\r\ncontent-type: ([^\r]*)/i.exec(head)?.[1] ?? '';
      try {
        return { status: Number(head.split(' ')[1]), type, body: JSON.parse(body) as { error: string; message: string } };
      } catch {
        throw new Error(`not JSON: ${JSON.stringify(text)}`);
      }
    };
    try {
      const cases: Array<[string, number, string, RegExp]> = [
        ['GET /health HTTP/1.1\r\nConnection: close\r\n\r\n', 400, 'bad_request', /^malformed request: an HTTP\/1\.1 request needs a Host header$/],
        ['GET * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n', 400, 'bad_request', /^malformed request: Invalid URL$/],
        [`GET /admin/messages?sender=${'a'.repeat(17_000)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, 431, 'request_header_fields_too_large', /^request head too large: its request line and headers may take at most 16 KiB$/],
        ['GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: a\x01b\r\n\r\n', 400, 'bad_request', /^malformed request: Invalid header value char$/],
        ['CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n', 405, 'method_not_allowed', /^CONNECT is not served: this is the API of relayq, not a proxy$/],
        [
          'POST /admin/retry-failed HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 200-ok\r\nContent-Length: 2\r\nConnection: close\r\n\r\n',
          417,
          'expectation_failed',
          /^Expect: 200-ok is not supported \(only 100-continue\)$/,
        ],
      ];
      for (const [request, status, error, message] of cases) {
        const r = await raw(request);
        assert.deepEqual([r.status, r.type.startsWith('application/json'), r.body.error], [status, true, error], request.slice(0, 40));
        assert.match(r.body.message, message);
      }
      for (const [request, status] of [
        [`HEAD /health?pad=${'a'.repeat(17_000)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`, 431],
        ['HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: a\x01b\r\n\r\n', 400],
      ] as const) {
        const text = await rawExchange(relay.httpPort as number, request);
        assert.match(text, new RegExp(`^HTTP/1\\.1 ${status} [^\r]*\r\nContent-Type: application/json\r\nContent-Length: \\d+\r\n`));
        assert.ok(text.endsWith('\r\n\r\n'), `nothing after the head of the answer to HEAD: ${JSON.stringify(text)}`);
      }
      assert.equal((await call(relay, '/health')).status, 200, 'the API goes on answering');
    } finally {
      await relay.stop();
    }
  });
});

test('an HTTP/1.0 request without Host is answered; an HTTP/1.1 one gets its 400 with Connection: close', async () => {
  const relay = await startTestRelay({}, { startDelivery: false });
  const raw = (request: string) => rawExchange(relay.httpPort as number, request);
  try {
    // as a plain HTTP/1.0 health check (HAProxy's httpchk, nc) sends it
    const old = await raw('GET /health HTTP/1.0\r\n\r\n');
    assert.match(old, /^HTTP\/1\.1 200 /);
    assert.equal(JSON.parse(old.slice(old.indexOf('\r\n\r\n') + 4)).status, 'ok');
    // the client asked for no close: the server closes, and says so
    const noHost = await raw('GET /health HTTP/1.1\r\n\r\n');
    assert.match(noHost, /^HTTP\/1\.1 400 /);
    assert.match(noHost.slice(0, noHost.indexOf('\r\n\r\n')), /\r\nConnection: close(\r\n|$)/i);
  } finally {
    await relay.stop();
  }
});

test('a sender with a state other than delivered is listed through the state index, newest first; with delivered, through the sender index; a recipient, through the recipient index whatever else is given', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    const planOf = (filter: Parameters<typeof pageSql>[0]) => {
      const { sql, params } = pageSql(filter);
      return (relay.store.sqlite.prepare(`EXPLAIN QUERY PLAN ${sql}`).all(...params, 10) as Array<{ detail: string }>).map((r) => r.detail).join('\n');
    };
    const plan = (state: MessageState) => planOf({ sender: 'a@example.com', state });
    for (const state of ['queued', 'sending', 'failed'] as const) assert.match(plan(state), /USING INDEX messages_state_received \(state=\?\)/, state);
    assert.match(plan('delivered'), /USING INDEX messages_sender \(sender_key=\?\)/);
    // the recipient's messages by id, not every message in a state (delivered: most of the store) or of a sender
    for (const state of [undefined, 'queued', 'delivered'] as const) {
      for (const sender of [undefined, 'a@example.com']) {
        const recipientPlan = planOf({ recipient: 'r@example.com', state, sender });
        assert.match(recipientPlan, /SEARCH recipients USING COVERING INDEX recipients_address_lower/, `${state} ${sender}`);
        assert.match(recipientPlan, /SEARCH messages USING INDEX sqlite_autoindex_messages_1 \(id=\?\)/, `${state} ${sender}`);
      }
    }
    // and it finds the sender's messages in that state, newest first
    const a: string[] = [];
    for (let i = 0; i < 3; i++) a.push(await send(relay, 'A@example.com', ['r@example.com']));
    await send(relay, 'b@example.com', ['r@example.com']);
    await writeDirect(relay, (db) => db.prepare("UPDATE messages SET state = 'failed', finished_at = received_at WHERE id = ?").run(a[1]));
    const list = (state: MessageState) => listMessages(relay.store.sqlite, { sender: 'a@example.com', state, limit: 10 }).messages.map((m) => m.id);
    assert.deepEqual([list('queued'), list('failed'), list('delivered')], [[a[2], a[0]], [a[1]], []]);
  } finally {
    await relay.stop();
  }
});

test('the unfiltered message list is one snapshot: a message changing state meanwhile shows up exactly once', async () => {
  const { Worker } = await import('node:worker_threads');
  const { createRequire } = await import('node:module');
  const relay = await startTestRelay({}, { startDelivery: false });
  // [0]: set to stop the other thread; [1]: the state flips it has committed
  const shared = new Int32Array(new SharedArrayBuffer(8));
  let flipper: InstanceType<typeof Worker> | undefined;
  try {
    for (let i = 0; i < 20; i++) await send(relay, 'a@example.com', [`r${i}@example.com`]);
    // another connection moves every message between queued and sending as fast as it can, as
    // delivery does, while this thread lists them
    const sqlitePath = createRequire(import.meta.url).resolve('better-sqlite3');
    flipper = new Worker(
      `const { workerData } = require('node:worker_threads');
       const db = new (require(workerData.sqlitePath))(workerData.file);
       db.pragma('busy_timeout = 5000');
       const flip = db.prepare("UPDATE messages SET state = CASE state WHEN 'queued' THEN 'sending' ELSE 'queued' END");
       while (Atomics.load(workerData.shared, 0) === 0) {
         flip.run();
         Atomics.add(workerData.shared, 1, 1);
       }
       db.close();`,
      { eval: true, workerData: { file: relay.config.databasePath, sqlitePath, shared } },
    );
    await waitFor(() => Atomics.load(shared, 1) > 0, 30_000, 'the other thread to flip states');
    const flipsBefore = Atomics.load(shared, 1);
    for (let i = 0; i < 3000; i++) {
      const ids = listMessages(relay.store.sqlite, { limit: 100 }).messages.map((m) => m.id);
      assert.equal(new Set(ids).size, 20, `listing ${i}: ${ids.length} rows, ${new Set(ids).size} distinct`);
      assert.equal(ids.length, 20);
    }
    // the listings ran while the states changed, or the test proved nothing
    assert.ok(Atomics.load(shared, 1) > flipsBefore, 'no state changed while listing');
  } finally {
    Atomics.store(shared, 0, 1);
    if (flipper) await new Promise((resolve) => flipper?.once('exit', resolve));
    await relay.stop();
  }
});

test('retry-failed requeues any number of failed messages in writes of at most 500, with its filters', async () => {
  const relay = await startTestRelay({}, { startDelivery: false });
  try {
    await writeDirect(relay, (db) => {
      const message = db.prepare(
        `INSERT INTO messages (id, state, mail_from, sender_key, client_ip, size, recipient_count, received_at, next_attempt_at, updated_at, finished_at)
         VALUES (?, 'failed', ?, ?, '127.0.0.1', 1, 1, 0, 0, 0, ?)`,
      );
      const recipient = db.prepare(
        `INSERT INTO recipients (message_id, seq, address, status, temporary, next_attempt_at, updated_at) VALUES (?, 0, 'r@example.com', 'failed', 0, 0, 0)`,
      );
      for (let i = 0; i < 1300; i++) {
        const id = `F${String(i).padStart(5, '0')}`;
        const from = i % 2 ? 'odd@example.com' : 'even@example.com';
        message.run(id, from, from, 1000 + (i % 700));
        recipient.run(id);
      }
    });
    const steps: number[] = [];
    const write = relay.writer.write.bind(relay.writer);
    relay.writer.write = ((op, ...args) => {
      if (op === 'requeueFailed') steps.push((args[0] as { ids: string[] }).ids.length);
      return write(op, ...args);
    }) as typeof relay.writer.write;

    // odd senders finished at 1100 or later: i odd with i % 700 >= 100, 300 + 250 of them
    const some = await call(relay, '/admin/retry-failed', postJson({ sender: 'ODD@example.com', since: 1100 }));
    assert.deepEqual(some.body, { requeued: 550 });
    // only theirs are written: not a step for each page of everyone's failed mail
    assert.deepEqual(steps, [500, 50], 'the 550 failed messages of odd senders finished since 1100, in steps');
    steps.length = 0;
    const rest = await call(relay, '/admin/retry-failed', { method: 'POST' });
    assert.deepEqual(rest.body, { requeued: 750 });
    assert.deepEqual(steps, [500, 250]);
    const states = relay.store.sqlite.prepare('SELECT state, COUNT(*) AS n FROM messages GROUP BY state').all();
    assert.deepEqual(states, [{ state: 'queued', n: 1300 }]);
  } finally {
    await relay.stop();
  }
});

test('deleting a failed message removes its JSON export too', async () => {
  const fs = await import('node:fs');
  const path = await import('node:path');
  const upstream = await startUpstream({
    onRcptTo(_address, _session, cb) {
      cb(Object.assign(new Error('5.1.1 No such user'), { responseCode: 550 }));
    },
  });
  const clock = new ManualClock();
  const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port }, options(clock));
  try {
    const id = await send(relay, 'a@example.com', ['nobody@example.com']);
    await relay.delivery.runOnce();
    const file = path.join(relay.config.emailsDir, 'failed', `${id}.json`);
    assert.ok(fs.existsSync(file));
    assert.equal((await call(relay, `/admin/messages/${id}`, { method: 'DELETE' })).status, 200);
    assert.equal(fs.existsSync(file), false);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('the AUTH user a message came with is in its failed export, the admin API and relayq show', async () => {
  const fs = await import('node:fs');
  const path = await import('node:path');
  const { runCliJson } = await import('../cli/run-cli.js');
  const upstream = await startUpstream({
    onRcptTo(_address, _session, cb) {
      cb(Object.assign(new Error('5.1.1 No such user'), { responseCode: 550 }));
    },
  });
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, defaultUsername: 'billing-app', defaultPassword: 's3cret' },
    options(new ManualClock()),
  );
  try {
    const info = await sendMail(relay.smtpPort, { from: 'a@example.com', to: ['nobody@example.com'], auth: { user: 'billing-app', pass: 's3cret' } });
    const id = queueIdOf(info.response);
    await relay.delivery.runOnce();
    const file = path.join(relay.config.emailsDir, 'failed', `${id}.json`);
    assert.equal(JSON.parse(fs.readFileSync(file, 'utf8')).client.authUser, 'billing-app');
    const one = await call(relay, `/admin/messages/${id}`);
    assert.equal((one.body as { auth_user: string }).auth_user, 'billing-app');
    const list = await call(relay, '/admin/messages?state=failed');
    assert.deepEqual((list.body as { messages: Array<{ id: string; auth_user: string }> }).messages.map((m) => [m.id, m.auth_user]), [[id, 'billing-app']]);
    const shown = await runCliJson<{ message: { auth_user: string } }>(['show', id, '--databasePath', relay.config.databasePath]);
    assert.equal(shown.message.auth_user, 'billing-app');
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('a deleted message whose export cannot be removed is deleted all the same, with a warning in the reply and the log', async () => {
  const fs = await import('node:fs');
  const path = await import('node:path');
  const upstream = await startUpstream({
    onRcptTo(_address, _session, cb) {
      cb(Object.assign(new Error('5.1.1 No such user'), { responseCode: 550 }));
    },
  });
  const log = capturedLog('info');
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port },
    { ...options(new ManualClock()), logger: log.logger },
  );
  try {
    const id = await send(relay, 'a@example.com', ['nobody@example.com']);
    await relay.delivery.runOnce();
    // a path unlink refuses (EISDIR) where the export was, as an unwritable directory would make
    const file = path.join(relay.config.emailsDir, 'failed', `${id}.json`);
    fs.rmSync(file);
    fs.mkdirSync(path.join(file, 'in-the-way'), { recursive: true });
    const res = await call(relay, `/admin/messages/${id}`, { method: 'DELETE' });
    assert.equal(res.status, 200);
    const body = res.body as { id: string; deleted: boolean; warning: string };
    assert.deepEqual([body.id, body.deleted], [id, true]);
    assert.match(body.warning, /^its failed export could not be removed: EISDIR/);
    assert.equal(relay.store.sqlite.prepare('SELECT COUNT(*) FROM messages WHERE id = ?').pluck().get(id), 0);
    const lines = log.entries().filter((e) => e.event === 'api.admin' && e.action === 'delete');
    assert.deepEqual(
      lines.map((e) => [e.level, e.queueId, e.result, e.via]),
      [
        [30, id, 'deleted', 'loopback'],
        [40, id, 'deleted', 'loopback'],
      ],
      'both lines say who asked',
    );
    assert.match(String(lines[1].err), /EISDIR/);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('a client that closes the connection in the middle of its request body is logged at info, not as an error', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({}, { logger: log.logger, startDelivery: false });
  try {
    const port = relay.httpPort as number;
    const abortedLogged = () => log.entries().some((e) => e.event === 'api.client_aborted');
    // the request must have reached the app before the client goes: wait longer each time
    for (let waitMs = 50; !abortedLogged() && waitMs < 5000; waitMs *= 2) {
      await new Promise<void>((resolve, reject) => {
        const socket = net.connect(port, '127.0.0.1', () => {
          socket.write('POST /admin/retry-failed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"sin');
          setTimeout(() => socket.destroy(), waitMs);
        });
        socket.on('close', () => resolve());
        socket.on('error', reject);
      });
      await waitFor(abortedLogged, waitMs).catch(() => {});
    }
    assert.ok(abortedLogged(), 'the aborted request is in the log');
    const [aborted] = log.entries().filter((e) => e.event === 'api.client_aborted');
    assert.equal(aborted.level, 30);
    assert.equal(aborted.path, '/admin/retry-failed');
    assert.ok(!log.entries().some((e) => e.event === 'api.error'));
    // and the API goes on answering
    assert.equal((await fetch(`http://127.0.0.1:${port}/health`)).status, 200);
  } finally {
    await relay.stop();
  }
});

/**
 * From the second step of a command on many messages, the relay's write meets a write lock that
 * another connection (a backup, the CLI) took meanwhile, and gives up at once instead of after
 * busy_timeout; `runStep` is the step's write op. `release` lets the lock go.
 */
function lockAfterFirstStep(relay: Relay, runStep: (db: Database.Database, args: unknown[]) => number): { release(): void } {
  const locker = new Database(relay.config.databasePath);
  const late = new Database(relay.config.databasePath, { timeout: 0 });
  const write = relay.writer.write.bind(relay.writer) as (...args: unknown[]) => Promise<number>;
  let steps = 0;
  relay.writer.write = (async (...args: unknown[]) => {
    if (steps++ === 0) return write(...args);
    locker.exec('BEGIN IMMEDIATE');
    return late.transaction(() => runStep(late, args.slice(1))).immediate();
  }) as typeof relay.writer.write;
  return {
    release() {
      if (locker.inTransaction) locker.exec('ROLLBACK');
      locker.close();
      late.close();
    },
  };
}

for (const [when, latest] of [
  ['', undefined],
  [', also after the clock was set back below a failure recorded before', 100_000],
] as const) {
  test(`retry-failed requeues each failed message once per call, even one that fails again while the call walks the rest${when}`, async () => {
    const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false, startRetention: false });
    try {
      const ids = await insertMessages(relay, ADMIN_STEP + 100, 'failed');
      // a failure recorded at 100,000 by a clock that was ahead, which then stepped back to 5,000
      if (latest !== undefined) await writeDirect(relay, (db) => db.prepare('UPDATE messages SET finished_at = ? WHERE id = ?').run(latest, ids[0]));
      const stepIds: string[][] = [];
      const requeued = await requeueFailedInSteps(relay.store.sqlite, {}, 5000, async (step) => {
        stepIds.push(step.ids ?? []);
        // as a fast worker would: the step's messages are requeued, tried, and failed again at once
        return writeDirect(relay, (db) => {
          const n = requeueFailed(db, step, 5000, 0).length;
          db.prepare(`UPDATE messages SET state = 'failed', finished_at = 9000 WHERE id IN (${(step.ids ?? []).map(() => '?').join(',')})`).run(...(step.ids ?? []));
          return n;
        });
      });
      assert.equal(requeued, ids.length);
      assert.deepEqual(stepIds.flat().sort(), ids, 'every failed message was requeued exactly once');
    } finally {
      await relay.stop();
    }
  });
}

test('retry-failed names each message it requeued, a line per write, as failedRetryInterval does', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false, startRetention: false, logger: log.logger });
  try {
    const ids = await insertMessages(relay, ADMIN_STEP + 3, 'failed');
    const res = await call(relay, '/admin/retry-failed', postJson({ ids: [...ids, 'NOSUCHID'] }));
    assert.deepEqual([res.status, res.body], [200, { requeued: ids.length }]);
    const lines = log.entries().filter((e) => e.event === 'delivery.requeued');
    assert.deepEqual(
      lines.map((e) => [e.by, e.count]),
      [
        ['api', ADMIN_STEP],
        ['api', 3],
      ],
    );
    assert.deepEqual(lines.flatMap((e) => e.ids as string[]), ids);
  } finally {
    await relay.stop();
  }
});

test('retry-failed that requeues nothing (ids of no failed message) logs no delivery.requeued line', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false, startRetention: false, logger: log.logger });
  try {
    const queued = await insertMessages(relay, 2, 'queued');
    const res = await call(relay, '/admin/retry-failed', postJson({ ids: [...queued, 'NOSUCHID'] }));
    assert.deepEqual([res.status, res.body], [200, { requeued: 0 }]);
    assert.deepEqual(log.entries().filter((e) => e.event === 'delivery.requeued'), []);
  } finally {
    await relay.stop();
  }
});

test('retry-failed logs the first ten ids it was given, and how many: a request may list 10,000', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false, logger: log.logger });
  try {
    const ids = Array.from({ length: 500 }, (_, i) => `NOSUCHID${String(i).padStart(12, '0')}`);
    const res = await call(relay, '/admin/retry-failed', postJson({ ids, sender: 'a@example.com' }));
    assert.deepEqual([res.status, res.body], [200, { requeued: 0 }]);
    const entry = log.entries().find((e) => e.event === 'api.admin');
    assert.deepEqual(entry?.filter, { ids: ids.slice(0, 10), idCount: 500, sender: 'a@example.com' });
    // a few long ones are quoted in part: the line stays short
    const long = Array.from({ length: 16 }, () => 'X'.repeat(60_000));
    assert.equal((await call(relay, '/admin/retry-failed', postJson({ ids: long }))).status, 200);
    const line = log.lines.filter((l) => l.includes('"event":"api.admin"')).at(-1) ?? '';
    assert.ok(line.length < 4000, `a line of ${line.length} characters`);
    const filter = log.entries().filter((e) => e.event === 'api.admin').at(-1)?.filter as { ids: string[]; idCount: number };
    assert.equal(filter.idCount, 16);
    assert.deepEqual(filter.ids, Array(10).fill(`${'X'.repeat(64)}… (60000 characters)`));
  } finally {
    await relay.stop();
  }
});

test('retry-failed takes up to 10,000 ids, each a non-empty string; one more, or an empty id, is a 400', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    const ids = Array.from({ length: 10_000 }, (_, i) => `NOSUCHID${String(i).padStart(12, '0')}`);
    const all = await call(relay, '/admin/retry-failed', postJson({ ids }));
    assert.deepEqual([all.status, all.body], [200, { requeued: 0 }]);
    const message = 'ids must be a non-empty array of at most 10000 message ids';
    for (const body of [{ ids: [...ids, 'ONEMORE'] }, { ids: [''] }, { ids: ['A', ''] }]) {
      const res = await call(relay, '/admin/retry-failed', postJson(body));
      assert.deepEqual([res.status, res.body], [400, { error: 'bad_request', message }], String(body.ids.length));
    }
  } finally {
    await relay.stop();
  }
});

test('a retry or delete of one message is logged at info with its result and who asked, an unknown id too', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false, logger: log.logger });
  try {
    const [id, done] = await insertMessages(relay, 2, 'queued');
    await writeDirect(relay, (db) => db.prepare("UPDATE messages SET state = 'delivered', finished_at = received_at WHERE id = ?").run(done));
    assert.equal((await call(relay, `/admin/messages/${id}/retry`, { method: 'POST' })).status, 200);
    assert.equal((await call(relay, `/admin/messages/${done}/retry`, { method: 'POST' })).status, 409);
    assert.equal((await call(relay, `/admin/messages/${id}`, { method: 'DELETE' })).status, 200);
    assert.equal((await call(relay, '/admin/messages/NOSUCHID/retry', { method: 'POST' })).status, 404);
    // an id of thousands of characters is quoted in part, as in the 404
    assert.equal((await call(relay, `/admin/messages/${'A'.repeat(15_000)}`, { method: 'DELETE' })).status, 404);
    const long = `${'A'.repeat(64)}… (15000 characters)`;
    assert.deepEqual(
      log.entries().filter((e) => e.event === 'api.admin').map((e) => [e.level, e.action, e.queueId, e.result, e.client, e.via, e.msg]),
      [
        [30, 'retry', id, 'due-now', '127.0.0.1', 'loopback', `retry ${id}: due now`],
        [30, 'retry', done, 'delivered', '127.0.0.1', 'loopback', `retry ${done}: nothing to retry: delivered to every recipient`],
        [30, 'delete', id, 'deleted', '127.0.0.1', 'loopback', `delete ${id}: deleted`],
        [30, 'retry', 'NOSUCHID', 'not-found', '127.0.0.1', 'loopback', 'retry NOSUCHID: no such message'],
        [30, 'delete', long, 'not-found', '127.0.0.1', 'loopback', `delete ${long}: no such message`],
      ],
    );
  } finally {
    await relay.stop();
  }
});

test('an admin command the database cannot run (another process holds the write lock) is a JSON 503, logged as api.admin with who asked', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false, logger: log.logger });
  try {
    const [id] = await insertMessages(relay, 1, 'failed');
    await insertMessages(relay, 1, 'queued');
    const lock = await holdWriteLock(relay, 50);
    try {
      for (const [path, method, action] of [
        [`/admin/messages/${id}`, 'DELETE', 'delete'],
        [`/admin/messages/${id}/retry`, 'POST', 'retry'],
        ['/admin/retry-failed', 'POST', 'retry-failed'],
        ['/admin/retry-queued', 'POST', 'retry-queued'],
      ]) {
        const res = await call(relay, path, { method });
        assert.deepEqual([res.status, res.body.error], [503, 'unavailable'], path);
        const entry = log.entries().find((e) => e.event === 'api.admin' && e.action === action);
        assert.deepEqual([entry?.level, entry?.result, entry?.client, entry?.via], [40, 'error', '127.0.0.1', 'loopback'], action);
        assert.match(String(entry?.err), /database is locked/);
      }
      // refused at their first step, the bulk commands say they changed none
      const bulk = (action: string) => log.entries().find((e) => e.event === 'api.admin' && e.action === action);
      assert.deepEqual([bulk('retry-failed')?.requeued, bulk('retry-failed')?.msg], [0, 'requeued 0 failed messages, then stopped']);
      assert.deepEqual([bulk('retry-queued')?.dueNow, bulk('retry-queued')?.msg], [0, 'made 0 queued messages due now, then stopped']);
    } finally {
      await lock.release();
    }
    assert.equal(relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(id), 'failed', 'nothing changed');
  } finally {
    await relay.stop();
  }
});

test('retry-failed that fails after its first step says how many it requeued, in its 503 and in the admin log', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false, startRetention: false, logger: log.logger });
  const lock = lockAfterFirstStep(relay, (db, [step, now, batchDelay]) => requeueFailed(db, step as RequeueStep, now as number, batchDelay as number).length);
  try {
    await insertMessages(relay, ADMIN_STEP + 100, 'failed');
    const res = await call(relay, '/admin/retry-failed', { method: 'POST' });
    assert.deepEqual([res.status, res.body], [
      503,
      {
        error: 'unavailable',
        message: `database unavailable: database is locked; ${ADMIN_STEP} failed messages were requeued before that and stay requeued (run it again for the rest)`,
      },
    ]);
    const [entry] = log.entries().filter((e) => e.event === 'api.admin');
    assert.deepEqual([entry?.level, entry?.action, entry?.result, entry?.requeued], [40, 'retry-failed', 'error', ADMIN_STEP]);
    lock.release();
    const states = relay.store.sqlite.prepare('SELECT state, count(*) AS n FROM messages GROUP BY state ORDER BY state').all();
    assert.deepEqual(states, [
      { state: 'failed', n: 100 },
      { state: 'queued', n: ADMIN_STEP },
    ]);
  } finally {
    lock.release();
    await relay.stop();
  }
});

test('retry-queued that fails after its first step says how many it made due, in its 503 and in the admin log', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false, startRetention: false, logger: log.logger });
  const lock = lockAfterFirstStep(relay, (db, [ids, now, batchDelay]) => flushQueued(db, ids as string[], now as number, batchDelay as number));
  try {
    await insertMessages(relay, ADMIN_STEP + 10, 'queued');
    const res = await call(relay, '/admin/retry-queued', { method: 'POST' });
    assert.deepEqual([res.status, res.body], [
      503,
      {
        error: 'unavailable',
        message: `database unavailable: database is locked; ${ADMIN_STEP} queued messages were made due before that (run it again for the rest)`,
      },
    ]);
    const [entry] = log.entries().filter((e) => e.event === 'api.admin');
    assert.deepEqual([entry?.level, entry?.action, entry?.result, entry?.dueNow], [40, 'retry-queued', 'error', ADMIN_STEP]);
    lock.release();
    assert.equal(relay.store.sqlite.prepare('SELECT count(*) FROM messages WHERE next_attempt_at <= ?').pluck().get(Date.now()), ADMIN_STEP);
  } finally {
    lock.release();
    await relay.stop();
  }
});

test('the time of the latest delivery request never goes back: a request committed late with an earlier time leaves it', async () => {
  // the steps of one `relayq retry --failed` all carry the time it started, so a later step may
  // commit after another request of a later time, whose time a suspension compares with its start
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    const id = queueIdOf((await sendMail(relay.smtpPort, { text: 'x' })).response);
    assert.equal(lastDeliveryRequest(relay.store.sqlite), 0, 'none before the first request');
    await writeDirect(relay, (db) => retryMessage(db, id, 2_000_000, 0));
    await writeDirect(relay, (db) => retryMessage(db, id, 1_000_000, 0));
    assert.equal(lastDeliveryRequest(relay.store.sqlite), 2_000_000);
    await writeDirect(relay, (db) => retryMessage(db, id, 3_000_000, 0));
    assert.equal(lastDeliveryRequest(relay.store.sqlite), 3_000_000);
  } finally {
    await relay.stop();
  }
});
