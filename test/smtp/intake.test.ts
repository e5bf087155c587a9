import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { createLogger } from '../../src/logger.js';
import type { Relay } from '../../src/main.js';
import { capturedLog, holdWriteLock, messageCount, openSession, SmtpClient, sendMail, startTestRelay, tempDir, waitFor } from '../helpers.js';

describe('durable intake', () => {
  let relay: Relay;
  before(async () => {
    // intake alone: delivery and retention would add commits of their own
    relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  });
  after(() => relay.stop());

  test('stores the exact bytes plus one Received header, the envelope and every recipient', async () => {
    const raw = Buffer.from(
      'From: Alice <alice@example.com>\r\nTo: team@example.com\r\nSubject: exact bytes\r\nMessage-ID: <m1@example.com>\r\n\r\nline one\r\n..leading dot\r\n\r\nbye\r\n',
    );
    const sentAt = Date.now();
    const info = await sendMail(relay.smtpPort, {
      from: 'alice@example.com',
      to: ['b@example.com', 'c@example.com', 'd@example.com'],
      raw,
    });
    const match = /^250 2\.0\.0 Ok: queued as ([0-9A-F]{20})$/.exec(info.response);
    assert.ok(match, info.response);
    const id = match[1];
    const row = relay.store.sqlite
      .prepare('SELECT messages.*, raw FROM messages JOIN message_bodies ON message_bodies.id = body_id WHERE messages.id = ?')
      .get(id) as Record<string, unknown>;
    assert.equal(row.state, 'queued');
    assert.equal(row.mail_from, 'alice@example.com');
    assert.equal(row.client_ip, '127.0.0.1');
    assert.equal(row.client_hostname, null, 'no reverse lookup, so no name: not "[127.0.0.1]"');
    assert.equal(row.recipient_count, 3);
    const stored = row.raw as Buffer;
    const received = stored.subarray(0, stored.indexOf('\r\n', stored.indexOf('\r\n\t', stored.indexOf(';')) + 1) + 2);
    assert.ok(stored.toString().startsWith('Received: from '), 'starts with Received');
    assert.deepEqual(stored.subarray(stored.length - raw.length), raw, 'client bytes unchanged after the header');
    const header = stored.subarray(0, stored.length - raw.length).toString();
    assert.equal((header.match(/^Received:/gm) ?? []).length, 1);
    assert.equal((stored.toString().match(/^Received:/gm) ?? []).length, 1);
    assert.match(header, new RegExp(`by relayq\\.test \\(relayq\\) with ESMTP id ${id};`));
    // three recipients: no `for` clause, which would name one of them (a Bcc, maybe) to all
    assert.doesNotMatch(header, /\bfor </);
    // the header ends with the time of arrival, as RFC 5322 writes a date (to the second)
    const date = /;\r\n\t(.+)\r\n$/.exec(received.toString())?.[1] ?? '';
    assert.match(date, /^\w{3}, \d{1,2} \w{3} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}$/);
    assert.ok(Date.parse(date) >= Math.floor(sentAt / 1000) * 1000 && Date.parse(date) <= Date.now(), `${date}, sent at ${new Date(sentAt).toISOString()}`);
    assert.equal(row.size, stored.length);
    const rcpts = relay.store.sqlite.prepare('SELECT seq, address, status FROM recipients WHERE message_id = ? ORDER BY seq').all(id);
    assert.deepEqual(rcpts, [
      { seq: 0, address: 'b@example.com', status: 'pending' },
      { seq: 1, address: 'c@example.com', status: 'pending' },
      { seq: 2, address: 'd@example.com', status: 'pending' },
    ]);
  });

  test('a message whose first line starts with a space or tab gets an empty line after the Received header, so it does not continue it', async () => {
    const stored = async (raw: Buffer): Promise<Buffer> => {
      const info = await sendMail(relay.smtpPort, { from: 'a@example.com', to: ['b@example.com'], raw });
      const id = /queued as ([0-9A-F]{20})$/.exec(info.response)?.[1];
      const row = relay.store.sqlite.prepare('SELECT raw FROM messages JOIN message_bodies ON message_bodies.id = body_id WHERE messages.id = ?').get(id) as { raw: Buffer };
      return row.raw;
    };
    for (const first of [' indented first line', '\tindented first line']) {
      const raw = Buffer.from(`${first}\r\nSubject: not a header any more\r\n\r\nbody\r\n`);
      const got = await stored(raw);
      assert.deepEqual(got.subarray(got.length - raw.length), raw, 'client bytes unchanged');
      const header = got.subarray(0, got.length - raw.length).toString();
      assert.match(header, /^Received: from [^\r]+\r\n(\t[^\r]+\r\n)+\r\n$/, JSON.stringify(header));
    }
    // a message that starts with a field, or with a line that is no field, is not changed
    for (const raw of [Buffer.from('Subject: s\r\n\r\nbody\r\n'), Buffer.from('no header at all\r\n')]) {
      const got = await stored(raw);
      const header = got.subarray(0, got.length - raw.length).toString();
      assert.deepEqual(got.subarray(got.length - raw.length), raw);
      assert.doesNotMatch(header, /\r\n\r\n$/, JSON.stringify(header));
    }
  });

  test('a large message (its memory moved to the writer thread, below spoolAfter) is stored byte for byte', async () => {
    const body = Buffer.alloc(204_000, 'abcdefghij\r\n');
    const raw = Buffer.concat([Buffer.from('Subject: large\r\n\r\n'), body]);
    const info = await sendMail(relay.smtpPort, { raw });
    const id = /queued as (\S+)/.exec(info.response)?.[1];
    const row = relay.store.sqlite.prepare('SELECT raw, size FROM messages JOIN message_bodies ON message_bodies.id = body_id WHERE messages.id = ?').get(id) as { raw: Buffer; size: number };
    assert.deepEqual(row.raw.subarray(row.raw.length - raw.length), raw);
    assert.equal(row.size, row.raw.length);
  });

  test('sessions waiting for the disk share one commit, and each gets its own id', async () => {
    // Another connection holds the write lock, as a long commit would: the writer waits for it
    // (longer than its default busy timeout, so a slow machine cannot make this test fail). The
    // pragma runs after every write queued before it, so the counts below start from a quiet writer.
    const lock = await holdWriteLock(relay, 120_000);
    const before = messageCount(relay);
    const commitsBefore = relay.writer.stats.commits;
    let answered = 0;
    const sends = Array.from({ length: 30 }, (_, i) =>
      sendMail(relay.smtpPort, { from: `s${i}@example.com`, to: [`r${i}@example.com`] }).finally(() => answered++),
    );
    try {
      await waitFor(() => relay.writer.waiting >= 30, 60_000, 'all 30 messages waiting for the writer');
      // let the last turn's writes cross to the writer thread
      await new Promise((r) => setImmediate(r));
      assert.equal(answered, 0, 'no 250 before the commit');
    } finally {
      await lock.release();
    }
    const results = await Promise.all(sends);
    const ids = new Set(results.map((r) => /^250 2\.0\.0 Ok: queued as (\S+)/.exec(r.response)?.[1]));
    assert.equal(ids.size, 30);
    assert.equal(messageCount(relay), before + 30);
    // the writer's first transaction holds what reached it before it had to wait (at least one
    // message); everything that arrived while it waited goes in the next one
    const commits = relay.writer.stats.commits - commitsBefore;
    assert.ok(commits >= 1 && commits <= 2, `${commits} commits for 30 messages`);
  });
});

describe('intake log', () => {
  test('a client that resets its connection is one info line (smtp.connection_lost), not an error', async () => {
    const log = capturedLog();
    const relay = await startTestRelay({}, { startDelivery: false, logger: log.logger });
    try {
      // one reset in the middle of a transaction, one between transactions
      const inTransaction = await openSession(relay.smtpPort);
      const between = await SmtpClient.connect(relay.smtpPort);
      await between.read();
      await between.send('EHLO client.test');
      for (const client of [inTransaction, between]) {
        const closed = new Promise((resolve) => client.socket.once('close', resolve));
        (client.socket as net.Socket).resetAndDestroy();
        await closed;
      }
      await waitFor(() => log.entries().filter((l) => l.event === 'smtp.connection_lost').length === 2, 10_000, 'two lost connections logged');
      const lines = log.entries();
      const lost = lines.filter((l) => l.event === 'smtp.connection_lost');
      assert.deepEqual(
        lost.map((l) => [l.level, l.client, l.code, l.component]),
        [
          [30, '127.0.0.1', 'ECONNRESET', 'smtp'],
          [30, '127.0.0.1', 'ECONNRESET', 'smtp'],
        ],
      );
      assert.deepEqual(
        lines.filter((l) => (l.level as number) >= 50 || l.event === 'smtp.error'),
        [],
        'no error lines, no smtp.error warning',
      );
    } finally {
      await relay.stop();
    }
  });

  test('clients that reset the connection at once (TCP health checks) are not warned about as clients not allowed', async () => {
    const log = capturedLog();
    const relay = await startTestRelay({}, { startDelivery: false, logger: log.logger });
    try {
      // from another process, so that the reset comes before the relay reads the client's
      // address, which is then gone (in this process the relay reads it first)
      const probes = `
        const net = require('node:net');
        (async () => {
          for (let i = 0; i < 20; i++) {
            const socket = net.connect(${relay.smtpPort}, '127.0.0.1');
            await new Promise((resolve) => socket.once('connect', resolve));
            socket.resetAndDestroy();
            await new Promise((resolve) => socket.once('close', resolve));
          }
        })();`;
      await promisify(execFile)(process.execPath, ['-e', probes]);
      await waitFor(() => log.entries().filter((l) => l.event === 'smtp.session').length === 20, 10_000, 'every session logged');
      const lines = log.entries();
      assert.deepEqual(lines.filter((l) => (l.level as number) >= 40), [], 'no warning: nothing was refused');
      // each is a lost connection, and a session that refused nothing
      assert.ok(lines.filter((l) => l.event === 'smtp.connection_lost').length > 0);
      const sessions = lines.filter((l) => l.event === 'smtp.session');
      assert.deepEqual(new Set(sessions.map(({ refused, replies }) => [refused, replies].join())), new Set(['0,']));
    } finally {
      await relay.stop();
    }
  });

  test("what a terminal would act on, in a subject, an address or a HELO name, is a JSON escape in the log's line", async () => {
    const log = capturedLog('info', createLogger);
    const relay = await startTestRelay({}, { startDelivery: false, logger: log.logger });
    try {
      const helo = 'client\u202eelpmaxe.test';
      const from = 'evil\u202emoc.elpmaxe@example.com';
      const subject = 'Invoice \u009b2J\u009b31mPAID\u009b0m \u2066x\u2069 \u2028line \u2029para \u061c\u200e\u200f\x7f';
      const client = await SmtpClient.connect(relay.smtpPort);
      await client.read();
      assert.match(await client.send(`EHLO ${helo}`), /^250/);
      assert.match(await client.send(`MAIL FROM:<${from}> SMTPUTF8`), /^250 /);
      assert.match(await client.send('RCPT TO:<rcpt@example.com>'), /^250 /);
      assert.match(await client.send('DATA'), /^354 /);
      // a line separator is no line end: the header after it is not the Subject
      assert.match(await client.send(`X-Note: a\u2028Subject: spoofed\r\nSubject: ${subject}\r\n\r\nbody\r\n.`), /^250 /);
      await client.send('QUIT');
      await waitFor(() => log.entries().some((l) => l.event === 'smtp.session'), 10_000, 'the session logged');
      const unsafe = /[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;
      assert.deepEqual(log.lines.filter((line) => unsafe.test(line)), []);
      const accepted = log.lines.find((line) => line.includes('"smtp.accepted"')) ?? '';
      assert.ok(accepted.includes('Invoice \\u009b2J'), accepted);
      // the same values to a JSON reader
      const entries = log.entries();
      const entry = entries.find((l) => l.event === 'smtp.accepted');
      assert.deepEqual([entry?.from, entry?.subject], [from, subject]);
      assert.equal(entries.find((l) => l.event === 'smtp.session')?.helo, helo);
    } finally {
      await relay.stop();
    }
  });

  test('every session ends with one info line (smtp.session): client, HELO name, messages stored, replies refused', async () => {
    const log = capturedLog();
    const relay = await startTestRelay({ maxRecipients: 2 }, { startDelivery: false, logger: log.logger });
    try {
      const busy = await SmtpClient.connect(relay.smtpPort);
      await busy.read();
      await busy.send('EHLO Client.Example');
      // smtp-server's parser refuses it; its text is made the one relayq's own check gives
      assert.match(await busy.send('MAIL FROM:<not an address>'), /^501 5\.1\.3 Bad sender address syntax$/);
      assert.match(await busy.send('MAIL FROM:<sender@example.com>'), /^250 /);
      for (const rcpt of ['a', 'b']) assert.match(await busy.send(`RCPT TO:<${rcpt}@example.com>`), /^250 /);
      assert.match(await busy.send('RCPT TO:<c@example.com>'), /^452 /); // smtp-server's own
      assert.match(await busy.send('DATA'), /^354 /);
      const queued = /queued as (\S+)/.exec(await busy.send('Subject: one\r\n\r\nbody\r\n.'))?.[1];
      assert.ok(queued);
      await busy.send('QUIT');
      const idle = await SmtpClient.connect(relay.smtpPort);
      await idle.read();
      await idle.send('QUIT');
      await waitFor(() => log.entries().filter((l) => l.event === 'smtp.session').length === 2, 10_000, 'two session lines');
      const sessions = log.entries().filter((l) => l.event === 'smtp.session');
      assert.deepEqual(
        sessions.map(({ level, client, helo, accepted, queueIds, refused, replies }) => ({ level, client, helo, accepted, queueIds, refused, replies })),
        [
          {
            level: 30,
            client: '127.0.0.1',
            helo: 'Client.Example',
            accepted: 1,
            queueIds: [queued],
            refused: 2,
            replies: ['501 5.1.3 Bad sender address syntax', '452 4.5.3 Error: too many recipients'],
          },
          { level: 30, client: '127.0.0.1', helo: undefined, accepted: 0, queueIds: undefined, refused: 0, replies: undefined },
        ],
      );
      // a client that did not log in: no user in its lines, not even a null one (jq's has("user") is false)
      const withUser = log.entries().filter((l) => (l.event === 'smtp.session' || l.event === 'smtp.accepted') && 'user' in l);
      assert.deepEqual(withUser, []);
    } finally {
      await relay.stop();
    }
  });

  test('smtp.session lists no reply to a client that was gone before it could be sent', async () => {
    const log = capturedLog();
    const relay = await startTestRelay({}, { startDelivery: false, logger: log.logger });
    try {
      const leaving = await openSession(relay.smtpPort);
      assert.match(await leaving.send('DATA'), /^354 /);
      leaving.write('Subject: cut off\r\n\r\nthe first half');
      leaving.socket.resetAndDestroy();
      await waitFor(() => log.entries().some((l) => l.event === 'smtp.session'), 10_000, 'the session logged');
      const [session] = log.entries().filter((l) => l.event === 'smtp.session');
      assert.deepEqual([session.accepted, session.refused, session.replies], [0, 0, undefined]);
      assert.equal(messageCount(relay), 0);
    } finally {
      await relay.stop();
    }
  });

  test("a write lock held too long by another process: 451 4.3.0, and smtp.store_failed says what SQLite's 'database is locked' means", async () => {
    const log = capturedLog();
    const relay = await startTestRelay({}, { startDelivery: false, startRetention: false, logger: log.logger });
    const lock = await holdWriteLock(relay, 50);
    try {
      const c = await openSession(relay.smtpPort);
      assert.match(await c.send('DATA'), /^354 /);
      assert.match(await c.send('Subject: locked out\r\n\r\nbody\r\n.'), /^451 4\.3\.0 /);
      c.close();
      const failed = log.entries().filter((e) => e.event === 'smtp.store_failed');
      assert.deepEqual(
        failed.map((e) => e.err),
        ['database is locked: another process (a sqlite3 shell inside a transaction, a relayq command) held its write lock for more than 5 s'],
      );
      assert.equal(messageCount(relay), 0);
    } finally {
      await lock.release();
      await relay.stop();
    }
  });

  test('smtp.session names the client refused for too many connections, and counts a message stored after its client left', async () => {
    const log = capturedLog();
    const relay = await startTestRelay({ maxConnections: 1 }, { startDelivery: false, startRetention: false, logger: log.logger });
    const lock = await holdWriteLock(relay, 120_000);
    try {
      const leaving = await openSession(relay.smtpPort);
      const refused = await SmtpClient.connect(relay.smtpPort);
      assert.match(await refused.read(), /^421 4\.7\.0 /);
      refused.close();
      assert.match(await leaving.send('DATA'), /^354 /);
      leaving.write('Subject: left\r\n\r\nbody\r\n.\r\n');
      await waitFor(() => relay.writer.waiting === 1, 10_000, 'the message waiting for the writer');
      leaving.close();
      await waitFor(() => log.entries().filter((l) => l.event === 'smtp.session').length === 1, 10_000, 'the refused session logged');
      await lock.release();
      await waitFor(() => log.entries().filter((l) => l.event === 'smtp.session').length === 2, 10_000, 'the other session logged once stored');
      const sessions = log.entries().filter((l) => l.event === 'smtp.session');
      assert.deepEqual(
        sessions.map(({ client, accepted, replies }) => ({ client, accepted, replies })),
        [
          { client: '127.0.0.1', accepted: 0, replies: ['421 4.7.0 Too many connections, try again later'] },
          { client: '127.0.0.1', accepted: 1, replies: undefined },
        ],
      );
      assert.equal(messageCount(relay), 1);
    } finally {
      await lock.release().catch(() => {});
      await relay.stop();
    }
  });
});

test('smtp.session counts a spooled message whose client reset the connection while its spool file was being finished', async () => {
  // The session's line must wait for the message from the end of DATA on, also while the last
  // bytes of a message larger than spoolAfter are still being written to its spool file. Those
  // writes run on libuv's thread pool: every thread of it is held in the open() of a FIFO until
  // the client has reset the connection.
  const log = capturedLog();
  const relay = await startTestRelay({ spoolAfter: 4096 }, { startDelivery: false, logger: log.logger });
  const dir = tempDir('relayq-pool-');
  const fifos = Array.from({ length: Number(process.env.UV_THREADPOOL_SIZE ?? 4) }, (_, i) => path.join(dir, `fifo${i}`));
  let held: Array<Promise<unknown>> = [];
  const release = async () => {
    for (const fifo of fifos) fs.closeSync(fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK));
    await Promise.all(held);
    held = [];
  };
  try {
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354 /);
    const body = `Subject: spooled\r\n\r\n${'x'.repeat(76)}\r\n`.repeat(100);
    c.write(body);
    const spool = `${relay.config.databasePath}-spool`;
    const spooled = () => fs.readdirSync(spool).map((f) => fs.statSync(path.join(spool, f)).size);
    // all but the first spoolAfter bytes (kept in memory) and the last few (that the parser keeps
    // until it knows they are no end of DATA)
    await waitFor(() => (spooled()[0] ?? 0) >= body.length - 4096 - 16, 30_000, 'the body written to its spool file');
    for (const fifo of fifos) execFileSync('mkfifo', [fifo]);
    held = fifos.map((fifo) => fs.promises.open(fifo, 'r').then((f) => f.close()));
    c.write('.\r\n');
    await new Promise((r) => setTimeout(r, 1000)); // for the relay to read the final dot, on a busy machine too
    c.socket.resetAndDestroy();
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(log.entries().filter((l) => l.event === 'smtp.session'), [], 'not logged before the message is stored');
    await release();
    // generous: the spool write, the commit and its fsync wait behind whatever else the machine does
    await waitFor(() => log.entries().some((l) => l.event === 'smtp.session'), 30_000, 'the session logged');
    const [session] = log.entries().filter((l) => l.event === 'smtp.session');
    assert.equal(messageCount(relay), 1);
    assert.equal(session.accepted, 1);
  } finally {
    if (held.length) await release();
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

describe('a client that shuts down its sending side (half-close)', () => {
  let relay: Relay;
  before(async () => {
    relay = await startTestRelay({}, { startDelivery: false });
  });
  after(() => relay.stop());

  /** Greeting and EHLO, then `input` in one write and the client's FIN; every reply until relayq closes. */
  async function sendThenHalfClose(input: string): Promise<string[]> {
    const client = await SmtpClient.connect(relay.smtpPort);
    assert.match(await client.read(), /^220 /);
    assert.match(await client.send('EHLO client.test'), /^250-/);
    client.socket.end(input);
    return client.readAll();
  }

  const transaction = 'MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.com>\r\nDATA\r\nSubject: half-closed\r\n\r\nbody\r\n.\r\n';

  test('its message and QUIT are answered, 250 and 221, and relayq closes the connection', async () => {
    const before = messageCount(relay);
    const replies = await sendThenHalfClose(`${transaction}QUIT\r\n`);
    assert.equal(replies.length, 5, replies.join(' | '));
    assert.match(replies[3], /^250 2\.0\.0 Ok: queued as [0-9A-F]{20}$/);
    assert.match(replies[4], /^221 /);
    assert.equal(messageCount(relay), before + 1);
  });

  test('without QUIT: the 250 is sent, then relayq closes the connection', async () => {
    const before = messageCount(relay);
    const replies = await sendThenHalfClose(transaction);
    assert.deepEqual(replies.slice(0, 3).map((r) => r.slice(0, 3)), ['250', '250', '354']);
    const id = /^250 2\.0\.0 Ok: queued as ([0-9A-F]{20})$/.exec(replies[3] ?? '')?.[1];
    assert.ok(id, replies.join(' | '));
    assert.equal(replies.length, 4);
    const stored = relay.store.sqlite.prepare('SELECT COUNT(*) AS n FROM messages WHERE id = ?').get(id) as { n: number };
    assert.equal(stored.n, 1);
    assert.equal(messageCount(relay), before + 1);
  });

  test('in the middle of a message: nothing is stored and relayq closes the connection', async () => {
    const before = messageCount(relay);
    const replies = await sendThenHalfClose('MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.com>\r\nDATA\r\nSubject: cut\r\n\r\nbody\r\n');
    assert.deepEqual(replies.map((r) => r.slice(0, 3)), ['250', '250', '354']);
    assert.equal(messageCount(relay), before);
  });
});
