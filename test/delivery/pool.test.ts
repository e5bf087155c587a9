// The upstream connection pool: connections are reused between transactions, a refused message
// does not cost the connection, and a connection the upstream closed while it sat idle is
// replaced without deferring the mail. Real smtp-server upstreams on 127.0.0.1, and one raw
// socket upstream that checks the envelope is pipelined.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, describe, test } from 'node:test';
import type { SMTPServerOptions } from 'smtp-server';
import { ManualClock } from '../manual-clock.js';
import { normalizeForEnvelope } from '../../src/address.js';
import type { Relay } from '../../src/main.js';
import { messageRaw } from '../../src/store/queries.js';
import { capturedLog, sendMail, startTestRelay, waitFor } from '../helpers.js';
import { attempts, message, NO_JITTER, queuedId, recipients, startScriptedUpstream } from './fixtures.js';

describe('upstream connection pool', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  /** A scripted upstream that counts the connections it was opened, and a relay forwarding to it. */
  async function setup(options: Partial<SMTPServerOptions> = {}) {
    const opened = { count: 0 };
    const upstream = await startScriptedUpstream({
      ...options,
      onConnect(_session, cb) {
        opened.count++;
        cb();
      },
    });
    cleanup.push(() => upstream.close());
    const relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, workerCount: 1, batchDelay: 0 },
      { clock: new ManualClock(), startDelivery: false, random: NO_JITTER },
    );
    cleanup.push(() => relay.stop());
    const send = async (to: string[]) => queuedId((await sendMail(relay.smtpPort, { to, raw: 'Subject: pool\r\n\r\nbody\r\n' })).response);
    return { upstream, relay, opened, send };
  }

  test('consecutive transactions share one connection', async () => {
    const { upstream, relay, opened, send } = await setup();
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push(await send([`r${i}@example.com`]));
    // one worker: five transactions one after the other
    assert.equal((await relay.delivery.runOnce()).attempts, 5);
    assert.equal(upstream.accepted.length, 5);
    for (const id of ids) assert.equal(message(relay, id).state, 'delivered');
    assert.equal(opened.count, 1);
  });

  test('a connection is reused for 5 minutes after it was opened (on the relay\'s clock), then a new one is opened', async () => {
    const { relay, opened, send } = await setup();
    const clock = relay.clock as ManualClock;
    await send(['a@example.com']);
    await relay.delivery.runOnce();
    clock.advance(299_000);
    await send(['b@example.com']);
    await relay.delivery.runOnce();
    assert.equal(opened.count, 1, 'reused within the limit');
    clock.advance(1000);
    await send(['c@example.com']);
    await relay.delivery.runOnce();
    assert.equal(opened.count, 2, 'a new connection once the first is 5 minutes old');
    await send(['d@example.com']);
    await relay.delivery.runOnce();
    assert.equal(opened.count, 2, 'and that one is reused');
  });

  test('refused messages keep the connection for the next one (RSET, not a reconnect), and leave no listener on it behind', async () => {
    const { upstream, relay, opened, send } = await setup();
    upstream.rcptReply = (address) => (address.startsWith('bad') ? { code: 550, message: 'no such user' } : undefined);
    // one listener per RSET left on the connection would make Node warn at the eleventh
    const warnings: string[] = [];
    const onWarning = (warning: Error) => warnings.push(warning.name);
    process.on('warning', onWarning);
    try {
      const refused = [];
      for (let i = 0; i < 12; i++) refused.push(await send([`bad${i}@example.com`]));
      const fine = await send(['good@example.com']);
      await relay.delivery.runOnce();
      for (const id of refused) assert.equal(message(relay, id).state, 'failed');
      assert.equal(message(relay, fine).state, 'delivered');
      assert.equal(opened.count, 1);
      await new Promise((resolve) => setImmediate(resolve));
      assert.deepEqual(warnings.filter((name) => name === 'MaxListenersExceededWarning'), []);
    } finally {
      process.off('warning', onWarning);
    }
  });

  test('a connection the upstream closed while idle is replaced; the mail is not deferred', async () => {
    const { upstream, relay, opened, send } = await setup();
    await send(['first@example.com']);
    await relay.delivery.runOnce();
    assert.equal(upstream.accepted.length, 1);
    // as smtp-server closes a connection idle for socketTimeout (a short socketTimeout could cut
    // the first transaction off on a busy machine)
    upstream.timeOutConnections();
    await waitFor(() => upstream.connections() === 0, 10_000, 'the upstream to close the idle connection');
    const second = await send(['second@example.com']);
    await relay.delivery.runOnce();
    assert.equal(message(relay, second).state, 'delivered');
    assert.equal(attempts(relay, second).length, 1);
    assert.equal(upstream.accepted.length, 2);
    assert.equal(opened.count, 2);
  });

  test('421 to the final dot on a reused connection: deferred, not sent again at once (the upstream may have kept it)', async () => {
    const { upstream, relay, opened, send } = await setup();
    upstream.dataReply = (t) => (t.to.includes('two@example.com') ? { code: 421, message: '4.3.2 Service shutting down' } : undefined);
    await send(['one@example.com']);
    const second = await send(['two@example.com']);
    await relay.delivery.runOnce();
    assert.deepEqual(recipients(relay, second).map((r) => [r.status, r.last_code]), [['pending', 421]]);
    assert.equal(upstream.refused.length, 1, 'the message went to the upstream once');
    assert.equal(opened.count, 1);
  });

  test('421 to MAIL FROM on a reused connection: the batch goes out at once on a new connection', async () => {
    const transactions = new Map<string, number>();
    const { upstream, relay, opened, send } = await setup({
      onMailFrom(_address, session, cb) {
        const n = (transactions.get(session.id) ?? 0) + 1;
        transactions.set(session.id, n);
        // the upstream is done with this connection after one message
        if (n > 1) return cb(Object.assign(new Error('too many messages on this connection'), { responseCode: 421 }));
        cb();
      },
    });
    const ids = [await send(['one@example.com']), await send(['two@example.com'])];
    assert.equal((await relay.delivery.runOnce()).attempts, 2);
    for (const id of ids) {
      assert.equal(message(relay, id).state, 'delivered');
      assert.deepEqual(recipients(relay, id).map((r) => r.attempts), [1]);
    }
    assert.equal(upstream.accepted.length, 2);
    assert.equal(opened.count, 2);
  });
});

/**
 * An upstream that takes at most `limit.max` connections at once, as Postfix's
 * smtpd_client_connection_count_limit does: a proxy to a scripted upstream (with `options`) that
 * greets the one over it with `421 4.7.0` and closes it. A connection counts until the proxy
 * sees it close, a moment after relayq's QUIT or close. Counts the refused ones and the most open at once.
 */
async function connectionLimitedUpstream(max: number, options: Partial<SMTPServerOptions> = {}) {
  const upstream = await startScriptedUpstream(options);
  const limit = { max, open: 0, mostOpen: 0, refused: 0 };
  const sockets = new Set<net.Socket>();
  const proxy = net.createServer((client) => {
    sockets.add(client);
    client.on('error', () => {});
    if (limit.open >= limit.max) {
      limit.refused++;
      client.end('421 4.7.0 upstream.test Error: too many connections from 127.0.0.1\r\n');
      return;
    }
    limit.open++;
    limit.mostOpen = Math.max(limit.mostOpen, limit.open);
    client.once('close', () => limit.open--);
    const server = net.connect(upstream.port, '127.0.0.1');
    sockets.add(server);
    server.on('error', () => client.destroy());
    server.on('close', () => client.destroy());
    client.pipe(server).pipe(client);
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  const close = async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => proxy.close(resolve));
    await upstream.close();
  };
  return { port: (proxy.address() as net.AddressInfo).port, upstream, limit, close };
}

test('an upstream that takes fewer connections than workerCount (421 to the others): the attempts wait for the open ones, none is deferred, and one more is tried after a minute', async () => {
  const limited = await connectionLimitedUpstream(2);
  const log = capturedLog('info');
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: limited.port, workerCount: 5, batchDelay: 0 },
    { clock: new ManualClock(), startDelivery: false, random: NO_JITTER, logger: log.logger },
  );
  const clock = relay.clock as ManualClock;
  const deliverAll = async (count: number) => {
    const ids = [];
    for (let i = 0; i < count; i++) ids.push(await queueTo(relay, `r${i}@example.com`));
    await relay.delivery.runOnce();
    for (const id of ids) assert.deepEqual(attempts(relay, id).map((a) => a.outcome), ['delivered'], id);
  };
  try {
    await deliverAll(20);
    assert.ok(limited.limit.refused > 0, 'the upstream refused the connections over its limit');
    assert.equal(limited.limit.mostOpen, 2);
    const warnings = log.entries().filter((e) => e.event === 'upstream.connection_limit');
    assert.deepEqual(
      warnings.map((e) => [e.connections, e.workerCount, e.reply]),
      [[2, 5, '421 4.7.0 upstream.test Error: too many connections from 127.0.0.1']],
    );
    // the upstream takes three now: within a minute of the refusal relayq keeps to two, and tries no other
    limited.limit.max = 3;
    const refused = limited.limit.refused;
    await deliverAll(10);
    assert.equal(limited.limit.mostOpen, 2);
    assert.equal(limited.limit.refused, refused);
    clock.advance(60_000);
    await deliverAll(10);
    assert.equal(limited.limit.mostOpen, 3, 'a third connection, a minute later');
    assert.equal(log.entries().filter((e) => e.event === 'upstream.connection_limit').length, 1, 'a limit warned of once');
  } finally {
    await relay.stop();
    await limited.close();
  }
});

for (const workerCount of [1, 2]) {
  test(`workerCount ${workerCount}, the upstream's limit of connections: a connection replaced at the reuse limit, which the upstream still counts for a moment, defers and suspends nothing`, async () => {
    const limited = await connectionLimitedUpstream(workerCount);
    const { relay, send } = await relayTo(limited.port, workerCount);
    const clock = relay.clock as ManualClock;
    const deliverAll = async (tag: string) => {
      const ids = [];
      for (let i = 0; i < workerCount; i++) ids.push(await send(`${tag}${i}@example.com`));
      await relay.delivery.runOnce();
      return ids.map((id) => attempts(relay, id).map((a) => a.outcome));
    };
    try {
      assert.deepEqual(await deliverAll('a'), Array(workerCount).fill(['delivered']));
      clock.advance(300_000); // past the reuse limit: the next attempts say QUIT and open new connections
      assert.deepEqual(await deliverAll('b'), Array(workerCount).fill(['delivered']));
      assert.deepEqual(await deliverAll('c'), Array(workerCount).fill(['delivered']));
      assert.equal(limited.limit.mostOpen, workerCount);
    } finally {
      await relay.stop();
      await limited.close();
    }
  });
}

test("an upstream that takes one connection and one message on it (421 to the next MAIL): each message goes on a new connection, though the upstream still counts the old one for a moment", async () => {
  const transactions = new Map<string, number>();
  const limited = await connectionLimitedUpstream(1, {
    onMailFrom(_address, session, cb) {
      const n = (transactions.get(session.id) ?? 0) + 1;
      transactions.set(session.id, n);
      if (n > 1) return cb(Object.assign(new Error('4.7.0 too many messages on this connection'), { responseCode: 421 }));
      cb();
    },
  });
  const { relay, send } = await relayTo(limited.port, 1);
  try {
    const ids = [];
    for (const to of ['a', 'b', 'c']) {
      ids.push(await send(`${to}@example.com`));
      await relay.delivery.runOnce();
    }
    assert.deepEqual(
      ids.map((id) => attempts(relay, id).map((a) => a.outcome)),
      ids.map(() => ['delivered']),
    );
  } finally {
    await relay.stop();
    await limited.close();
  }
});

test('an upstream that refuses every connection with 421 (none open): the batch is deferred, as a greeting refused', async () => {
  const limited = await connectionLimitedUpstream(0);
  const { relay, send } = await relayTo(limited.port, 3);
  try {
    const ids = [await send('a@example.com'), await send('b@example.com')];
    await relay.delivery.runOnce();
    for (const id of ids) {
      assert.deepEqual(recipients(relay, id).map((r) => [r.status, r.last_code]), [['pending', 421]]);
    }
  } finally {
    await relay.stop();
    await limited.close();
  }
});

/**
 * A raw SMTP upstream on 127.0.0.1, for what smtp-server does not let a test see or do:
 * `session(socket)` is called for each connection and returns what answers its commands (the
 * `354` to DATA included); the message after DATA is read up to its dot and answered `250`.
 */
async function startRawUpstream(session: (socket: net.Socket) => (command: string) => void): Promise<{ port: number; close(): void }> {
  const server = net.createServer((socket) => {
    const answer = session(socket);
    let buffered = '';
    let inData = false;
    socket.on('error', () => {});
    socket.write('220 raw.example ESMTP\r\n');
    socket.on('data', (chunk) => {
      buffered += chunk.toString('latin1');
      for (;;) {
        if (inData) {
          const end = buffered.indexOf('\r\n.\r\n');
          if (end < 0) return;
          buffered = buffered.slice(end + 5);
          inData = false;
          socket.write('250 2.0.0 queued\r\n');
        }
        const eol = buffered.indexOf('\r\n');
        if (eol < 0) return;
        const command = buffered.slice(0, eol);
        buffered = buffered.slice(eol + 2);
        inData = /^DATA/i.test(command);
        answer(command);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as net.AddressInfo).port, close: () => server.close() };
}

/**
 * A raw upstream that keeps each connection's commands (their names), and answers a line with
 * `special(line)` when that gives a reply, else as a willing server does.
 */
async function startRecordingUpstream(special: (line: string) => string | undefined) {
  const connections: string[][] = [];
  const server = await startRawUpstream((socket) => {
    const commands: string[] = [];
    connections.push(commands);
    return (line) => {
      commands.push(line.split(/[ :]/)[0].toUpperCase());
      const reply = special(line);
      if (reply !== undefined) socket.write(`${reply}\r\n`);
      else if (/^DATA/i.test(line)) socket.write('354 go ahead\r\n');
      else if (/^QUIT/i.test(line)) socket.end('221 2.0.0 bye\r\n');
      else socket.write('250 ok\r\n');
    };
  });
  return { server, connections };
}

test('with PIPELINING offered, MAIL, every RCPT and DATA go out without waiting for replies', async () => {
  // A raw upstream that answers MAIL only once it has read DATA: a client that waits for each
  // reply would stall here until the upstream gives up waiting (3 s) and answers anyway.
  const seen: Array<{ pipelined: boolean; lines: string[] }> = [];
  const server = await startRawUpstream((socket) => {
    let envelope: string[] = [];
    let giveUp: NodeJS.Timeout | undefined;
    const answerEnvelope = (pipelined: boolean) => {
      clearTimeout(giveUp);
      seen.push({ pipelined, lines: envelope });
      const replies = envelope.map((line) => (/^DATA/i.test(line) ? '354 go ahead' : '250 2.1.0 ok'));
      socket.write(`${replies.join('\r\n')}\r\n`);
      envelope = [];
    };
    return (line) => {
      if (/^EHLO/i.test(line)) socket.write('250-raw.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n');
      else if (/^QUIT/i.test(line)) socket.end('221 bye\r\n');
      else if (/^(MAIL|RCPT|DATA)/i.test(line)) {
        envelope.push(line);
        if (envelope.length === 1) giveUp = setTimeout(() => answerEnvelope(false), 3000);
        if (/^DATA/i.test(line)) answerEnvelope(true);
      } else socket.write('250 2.0.0 ok\r\n');
    };
  });
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: server.port, workerCount: 1 },
    { clock: new ManualClock(), startDelivery: false, random: NO_JITTER },
  );
  try {
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'], raw: 'Subject: pipelined\r\n\r\nbody\r\n' })).response);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'delivered');
    assert.equal(seen.length, 1);
    assert.deepEqual(seen[0].lines.map((line) => line.split(':')[0].toUpperCase()), ['MAIL FROM', 'RCPT TO', 'RCPT TO', 'DATA']);
    assert.equal(seen[0].pipelined, true, 'DATA arrived before MAIL FROM was answered');
  } finally {
    await relay.stop();
    server.close();
  }
});

test('a message and its final dot leave in one write; a large one arrives intact', async () => {
  const upstream = await startScriptedUpstream();
  // What the relay's sockets hand to the kernel towards the upstream, one entry per write call
  // (a corked socket writes its buffered chunks with one _writev).
  const writes: string[] = [];
  type Chunk = { chunk: Buffer | string };
  const socketProto = net.Socket.prototype as unknown as {
    _write(chunk: Buffer | string, encoding: string, cb: () => void): void;
    _writev(chunks: Chunk[], cb: () => void): void;
  };
  const { _write, _writev } = socketProto;
  socketProto._write = function (this: net.Socket, chunk, encoding, cb) {
    if (this.remotePort === upstream.port) writes.push(chunk.toString('latin1'));
    return _write.call(this, chunk, encoding, cb);
  };
  socketProto._writev = function (this: net.Socket, chunks, cb) {
    if (this.remotePort === upstream.port) writes.push(chunks.map((c) => c.chunk.toString('latin1')).join(''));
    return _writev.call(this, chunks, cb);
  };
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, workerCount: 1, batchDelay: 0 },
    { clock: new ManualClock(), startDelivery: false, random: NO_JITTER },
  );
  try {
    const line = `${'x'.repeat(76)}\r\n`;
    const small = Array.from({ length: 10 }, (_, i) => `Subject: small ${i}\r\n\r\n.a line that starts with a dot\r\n${line.repeat(25)}`);
    const large = `Subject: large\r\n\r\n${line.repeat(4000)}.last line\r\n`;
    const ids: string[] = [];
    for (const raw of [...small, large]) ids.push(queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw })).response));
    assert.equal((await relay.delivery.runOnce()).attempts, 11);

    ids.forEach((id, i) => {
      assert.equal(message(relay, id).state, 'delivered');
      const stored = messageRaw(relay.store.sqlite, id)?.raw?.toString('latin1');
      const arrived = upstream.accepted.find((t) => t.raw.includes(` id ${id}\r\n`));
      assert.equal(arrived?.raw.toString('latin1'), stored, `message ${i} arrived as stored`);
    });
    // the small ones: bytes and final dot in one write (they were two, the second ".\r\n");
    // the large one fills the socket's buffer first, so its dot follows on its own as before
    const withDot = writes.filter((w) => w.endsWith('\r\n.\r\n') && w.length > 2000);
    assert.equal(withDot.length, 10);
    assert.equal(writes.filter((w) => w === '.\r\n').length, 1);
  } finally {
    socketProto._write = _write;
    socketProto._writev = _writev;
    await relay.stop();
    await upstream.close();
  }
});

test('RCPT addresses: the domain lower-cased and in ASCII, the local part untouched', () => {
  assert.equal(normalizeForEnvelope('Mixed@EXAMPLE.COM'), 'Mixed@example.com');
  assert.equal(normalizeForEnvelope('user@bücher.example'), 'user@xn--bcher-kva.example');
  assert.equal(normalizeForEnvelope('Ünïcode@Example.org'), 'Ünïcode@example.org');
  assert.equal(normalizeForEnvelope('user@[192.0.2.1]'), 'user@[192.0.2.1]');
  assert.equal(normalizeForEnvelope('User@[IPv6:2001:db8::a]'), 'User@[IPv6:2001:db8::a]');
  assert.equal(normalizeForEnvelope(''), '');
});

test('the running engine: claims that overlap (a slot freed while another claim commits) never take one message twice', async () => {
  const upstream = await startScriptedUpstream();
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, workerCount: 8, batchDelay: 0 },
    { random: NO_JITTER },
  );
  try {
    const count = 120;
    const sent = await Promise.all(
      Array.from({ length: count }, (_, i) => sendMail(relay.smtpPort, { to: [`r${i}@example.com`], raw: `Subject: ${i}\r\n\r\nbody\r\n` })),
    );
    const ids = sent.map((info) => queuedId(info.response));
    await waitFor(() => ids.every((id) => message(relay, id).state === 'delivered'), 20_000, 'every message delivered');
    const received = upstream.accepted.flatMap((t) => t.to).sort();
    assert.deepEqual(received, Array.from({ length: count }, (_, i) => `r${i}@example.com`).sort(), 'each recipient exactly once');
    for (const id of ids) assert.equal(attempts(relay, id).length, 1, `one attempt for ${id}`);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('a 421 in a transaction closes the connection, also one the upstream keeps open: no RSET on it, the next message on a new one', async () => {
  const { server, connections } = await startRecordingUpstream((line) => (/^RCPT TO:<closing@/i.test(line) ? '421 4.3.2 shutting down' : undefined));
  const { relay, send } = await relayTo(server.port, 1);
  try {
    const deferred = await send('closing@example.com');
    await relay.delivery.runOnce();
    assert.equal(message(relay, deferred).state, 'queued', 'deferred by the 421');
    const next = await send('a@example.com');
    await relay.delivery.runOnce();
    assert.equal(message(relay, next).state, 'delivered');
    assert.equal(connections.length, 2, 'the next message went on a new connection');
    assert.ok(!connections[0].includes('RSET'), `no RSET after the 421: ${connections[0].join(' ')}`);
  } finally {
    await relay.stop();
    server.close();
  }
});

test('a connection says QUIT before it is closed: once it has been idle, and at shutdown, which waits for its answer', async () => {
  // A raw upstream that keeps each connection's commands, whether it answered QUIT, and whether the client closed it.
  const connections: Array<{ commands: string[]; quitAnswered: boolean; closedByClient: boolean }> = [];
  const server = await startRawUpstream((socket) => {
    const seen = { commands: [] as string[], quitAnswered: false, closedByClient: false };
    connections.push(seen);
    socket.on('end', () => {
      seen.closedByClient = true;
      socket.end();
    });
    return (line) => {
      seen.commands.push(line.split(/[ :]/)[0].toUpperCase());
      if (/^DATA/i.test(line)) socket.write('354 go ahead\r\n');
      else if (/^QUIT/i.test(line)) {
        setTimeout(() => {
          seen.quitAnswered = true;
          socket.write('221 2.0.0 bye\r\n');
        }, 300);
      } else if (/^RCPT TO:<refused@/i.test(line)) socket.write('550 5.1.1 no such user\r\n');
      else if (/^RSET/i.test(line)) setTimeout(() => socket.write('250 ok\r\n'), 300);
      else socket.write('250 ok\r\n');
    };
  });
  // processingTimeout 5 s: an attempt has 4 s, and a connection may sit idle for half of that
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: server.port, workerCount: 1, processingTimeout: 5 },
    { clock: new ManualClock(), startDelivery: false, random: NO_JITTER },
  );
  const deliverOne = async (to = 'a@example.com', state = 'delivered') => {
    const id = queuedId((await sendMail(relay.smtpPort, { to: [to], raw: 'Subject: quit\r\n\r\nbody\r\n' })).response);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, state);
  };
  try {
    await deliverOne();
    await waitFor(() => connections[0]?.closedByClient, 10_000, 'the idle connection to be closed');
    assert.deepEqual(connections[0].commands, ['EHLO', 'MAIL', 'RCPT', 'DATA', 'QUIT']);

    await deliverOne();
    assert.equal(connections.length, 2, 'the next message went on a new connection');
    // refused: the attempt ends before the upstream answers its RSET, and the stop waits for that
    await deliverOne('refused@example.com', 'failed');
  } finally {
    await relay.stop();
    server.close();
  }
  assert.deepEqual(connections[1].commands, ['EHLO', 'MAIL', 'RCPT', 'DATA', 'MAIL', 'RCPT', 'RSET', 'QUIT'], 'QUIT at shutdown');
  assert.ok(connections[1].quitAnswered, 'the stop waited for the answer to QUIT');
  // the stop ends on nodemailer's own side closing; the upstream sees the FIN a turn later
  await waitFor(() => connections[1].closedByClient, 5_000, 'the upstream to see the connection closed');
});

test('an upstream that does not answer QUIT is cut off a second later, not left open until the socket times out', async () => {
  const connections: Array<{ quit: boolean; closed: boolean }> = [];
  const server = await startRawUpstream((socket) => {
    const seen = { quit: false, closed: false };
    connections.push(seen);
    socket.on('close', () => {
      seen.closed = true;
    });
    return (line) => {
      if (/^QUIT/i.test(line)) seen.quit = true; // never answered
      else if (/^DATA/i.test(line)) socket.write('354 go ahead\r\n');
      else socket.write('250 ok\r\n');
    };
  });
  // processingTimeout 300 s (the default): the socket's own timeout would end it after about five minutes
  const { relay, send } = await relayTo(server.port, 1);
  try {
    await send('a@example.com');
    await relay.delivery.runOnce();
    // past the reuse limit on the relay's clock: the next attempt says QUIT on the first connection
    (relay.clock as ManualClock).advance(300_000);
    await send('b@example.com');
    await relay.delivery.runOnce();
    assert.equal(connections.length, 2, 'the next message went on a new connection');
    await waitFor(() => connections[0].quit, 10_000, 'QUIT on the old connection');
    await waitFor(() => connections[0].closed, 10_000, 'the old connection cut off');
  } finally {
    await relay.stop();
    server.close();
  }
});

/**
 * A raw upstream that refuses every recipient named bad… (550), and drop… with a 421 (relayq then
 * closes the connection), and answers each RSET `rsetDelayMs`
 * late, as an upstream that slows its replies after errors does, or hangs up then instead
 * (`hangUp`); it counts its connections.
 */
async function slowRsetUpstream(rsetDelayMs: number, hangUp = false) {
  const count = { open: 0, mostOpen: 0, opened: 0 };
  const server = await startRawUpstream((socket) => {
    count.opened++;
    count.mostOpen = Math.max(count.mostOpen, ++count.open);
    socket.on('close', () => count.open--);
    return (line) => {
      if (/^QUIT/i.test(line)) socket.end('221 2.0.0 bye\r\n');
      else if (/^RCPT TO:<bad/i.test(line)) socket.write('550 5.1.1 no such user\r\n');
      else if (/^RCPT TO:<drop/i.test(line)) socket.write('421 4.3.2 shutting down\r\n');
      else if (/^DATA/i.test(line)) socket.write('354 go ahead\r\n');
      else if (/^RSET/i.test(line)) setTimeout(() => (hangUp ? socket.destroy() : socket.writable && socket.write('250 ok\r\n')), rsetDelayMs);
      else socket.write('250 ok\r\n');
    };
  });
  return { server, count };
}

/** Queues one message to `to`; returns its id. */
async function queueTo(relay: Relay, to: string): Promise<string> {
  return queuedId((await sendMail(relay.smtpPort, { to: [to], raw: 'Subject: s\r\n\r\nbody\r\n' })).response);
}

/** A relay forwarding to `port` with `workerCount` workers, delivery run by hand; `send` queues one message. */
async function relayTo(port: number, workerCount: number) {
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: port, workerCount, batchDelay: 0 },
    { clock: new ManualClock(), startDelivery: false, random: NO_JITTER },
  );
  return { relay, send: (to: string) => queueTo(relay, to) };
}

test('an upstream slow to answer RSET gets no more than workerCount sessions: the next attempt waits for the reply', async () => {
  const { server, count } = await slowRsetUpstream(500);
  const { relay, send } = await relayTo(server.port, 2);
  try {
    const ids = [];
    for (let i = 0; i < 8; i++) ids.push(await send(`bad${i}@example.com`));
    // four rounds of workerCount attempts, each after the last round's connections were reset
    assert.equal((await relay.delivery.runOnce()).attempts, 8);
    assert.deepEqual(
      ids.map((id) => message(relay, id).state),
      ids.map(() => 'failed'),
    );
    assert.equal(count.opened, 2, 'every attempt went on one of two connections');
    assert.equal(count.mostOpen, 2);
  } finally {
    await relay.stop();
    server.close();
  }
});

test('attempts that start together while connections wait for their RSET open only the connections workerCount leaves room for', async () => {
  const { server, count } = await slowRsetUpstream(1000);
  const { relay, send } = await relayTo(server.port, 4);
  try {
    // two connections left waiting for their RSET
    const refused = [await send('bad1@example.com'), await send('bad2@example.com')];
    assert.equal((await relay.delivery.runOnce()).attempts, 2);
    const good = [];
    for (let i = 0; i < 4; i++) good.push(await send(`ok${i}@example.com`));
    // one claim of four batches: two new connections, and two attempts that wait for the RSETs
    assert.equal((await relay.delivery.runOnce()).attempts, 4);
    assert.deepEqual([...refused, ...good].map((id) => message(relay, id).state), ['failed', 'failed', 'delivered', 'delivered', 'delivered', 'delivered']);
    assert.equal(count.mostOpen, 4);
  } finally {
    await relay.stop();
    server.close();
  }
});

test('a connection closed after a 421 frees its place: with the other one waiting for its RSET, the next message opens a new one', async () => {
  const { server, count } = await slowRsetUpstream(3000);
  const { relay, send } = await relayTo(server.port, 2);
  try {
    const dropped = await send('drop@example.com');
    await relay.delivery.runOnce();
    assert.equal(message(relay, dropped).state, 'queued', 'deferred by the 421; relayq closed that connection');
    const refused = await send('bad@example.com');
    await relay.delivery.runOnce();
    assert.equal(message(relay, refused).state, 'failed', 'refused; its connection waits 3 s for the reply to its RSET');
    const next = await send('ok@example.com');
    await relay.delivery.runOnce();
    assert.equal(message(relay, next).state, 'delivered');
    // had the closed connection still counted, the two would fill workerCount, and the message would
    // have waited for the RSET and gone on that connection
    assert.equal(count.opened, 3, 'the next message went on a new connection');
  } finally {
    await relay.stop();
    server.close();
  }
});

test('a connection that ends while its RSET waits for a reply frees its place at once', async () => {
  // workerCount 1: the next message can only go once that connection is gone; the wait for a
  // reply to RSET would last the greeting timeout (30 s here)
  const { server } = await slowRsetUpstream(200, true);
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: server.port, workerCount: 1, batchDelay: 0 },
    { startRetention: false },
  );
  try {
    const refused = await queueTo(relay, 'bad@example.com');
    await waitFor(() => message(relay, refused).state === 'failed', 10_000, 'the refused message failed');
    const next = await queueTo(relay, 'ok@example.com');
    await waitFor(() => message(relay, next).state === 'delivered', 10_000, 'the next message delivered on a new connection');
  } finally {
    await relay.stop();
    server.close();
  }
});

test('a connection whose RSET is refused is closed, not reused: the next message goes on a new one', async () => {
  const { server, connections } = await startRecordingUpstream((line) =>
    /^RCPT TO:<refused@/i.test(line) ? '550 5.1.1 no such user' : /^RSET/i.test(line) ? '500 5.5.1 unrecognized command' : undefined,
  );
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: server.port, workerCount: 1 },
    { startDelivery: false, random: NO_JITTER },
  );
  try {
    const send = async (to: string) => queuedId((await sendMail(relay.smtpPort, { to: [to], raw: 'Subject: rset\r\n\r\nbody\r\n' })).response);
    const refused = await send('refused@example.com');
    await relay.delivery.runOnce();
    assert.equal(message(relay, refused).state, 'failed');
    await waitFor(() => connections[0]?.includes('RSET'), 10_000, 'the RSET after the refusal');
    const fine = await send('fine@example.com');
    await relay.delivery.runOnce();
    assert.equal(message(relay, fine).state, 'delivered');
    assert.equal(connections.length, 2, 'a new connection');
    assert.deepEqual(connections[0], ['EHLO', 'MAIL', 'RCPT', 'RSET'], 'nothing more on the first one');
  } finally {
    await relay.stop();
    server.close();
  }
});

test('a connection the upstream closed right after refusing a pipelined envelope leaves no reset waiting: later attempts go on', async () => {
  // Answers a pipelined envelope line by line; to RCPT closing@ the refusal, the reply to the DATA
  // behind it and the close in one write; RSET after a pause, as an upstream slow after errors.
  const server = net.createServer((socket) => {
    socket.on('error', () => {});
    socket.write('220 raw.example ESMTP\r\n');
    let buffered = '';
    let accepted = 0;
    let inData = false;
    socket.on('data', (chunk) => {
      buffered += chunk.toString('latin1');
      for (let eol = buffered.indexOf('\r\n'); eol >= 0 && !socket.writableEnded; eol = buffered.indexOf('\r\n')) {
        const line = buffered.slice(0, eol);
        buffered = buffered.slice(eol + 2);
        if (inData) {
          if (line === '.') {
            inData = false;
            socket.write('250 2.0.0 queued\r\n');
          }
        } else if (/^EHLO/i.test(line)) socket.write('250-raw.example\r\n250 PIPELINING\r\n');
        else if (/^MAIL/i.test(line)) {
          accepted = 0;
          socket.write('250 2.1.0 ok\r\n');
        } else if (/^RCPT TO:<closing@/i.test(line)) socket.end('550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n');
        else if (/^RCPT TO:<bad@/i.test(line)) socket.write('550 5.1.1 no such user\r\n');
        else if (/^RCPT/i.test(line)) {
          accepted++;
          socket.write('250 2.1.5 ok\r\n');
        } else if (/^DATA/i.test(line)) {
          inData = accepted > 0;
          socket.write(inData ? '354 go ahead\r\n' : '554 5.5.1 no valid recipients\r\n');
        } else if (/^RSET/i.test(line)) setTimeout(() => socket.writable && socket.write('250 2.0.0 ok\r\n'), 300);
        else if (/^QUIT/i.test(line)) socket.end('221 2.0.0 bye\r\n');
        else socket.write('502 5.5.2 unknown\r\n');
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const { relay, send } = await relayTo((server.address() as net.AddressInfo).port, 1);
  try {
    const closing = await send('closing@example.com');
    await relay.delivery.runOnce();
    assert.deepEqual([message(relay, closing).state, recipients(relay, closing)[0].last_code], ['failed', 550]);
    // A reset entry left for it would make the next attempt that waits for a reset (one
    // connection, taken by bad@'s RSET) race a settled promise for ever: nothing else would run.
    const pool = (relay.delivery as unknown as { upstream: { resetting: Map<unknown, unknown> } }).upstream;
    await waitFor(() => pool.resetting.size === 0, 5_000, 'no reset left waiting for the closed connection');
    const bad = await send('bad@example.com');
    const ok = await send('ok@example.com');
    assert.equal((await relay.delivery.runOnce()).attempts, 2);
    assert.deepEqual([message(relay, bad).state, message(relay, ok).state], ['failed', 'delivered']);
  } finally {
    await relay.stop();
    server.close();
  }
});
