import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import type { Relay } from '../../src/main.js';
import { createApp } from '../../src/api/app.js';
import { MessageBytes, Spool } from '../../src/smtp/spool.js';
import { openStore } from '../../src/store/db.js';
import { insertMessage } from '../../src/store/intake.js';
import { capturedLog, messageCount, NO_LIMITS, newMessage, openSession, type SmtpClient, sendMail, startTestRelay, tempDir, testConfig, waitFor, whileImmutable } from '../helpers.js';

const SPOOL_AFTER = 4096;

function spoolFiles(relay: Relay): string[] {
  const dir = Spool.dirFor(relay.config.databasePath);
  return fs.existsSync(dir) ? fs.readdirSync(dir) : [];
}

function storedBody(relay: Relay, id: string): { raw: Buffer; size: number } {
  return relay.store.sqlite
    .prepare('SELECT raw, size FROM messages JOIN message_bodies ON message_bodies.id = body_id WHERE messages.id = ?')
    .get(id) as { raw: Buffer; size: number };
}

/** A session in DATA that has sent `first` and whose message is being spooled: one file exists. */
async function spoolingSession(relay: Relay, first: Buffer): Promise<SmtpClient> {
  const c = await openSession(relay.smtpPort);
  assert.match(await c.send('DATA'), /^354/);
  c.write(first);
  await waitFor(() => spoolFiles(relay).length === 1, 10_000, 'a spool file during DATA');
  return c;
}

function spoolEmptied(relay: Relay): Promise<void> {
  return waitFor(() => spoolFiles(relay).length === 0, 10_000, 'the spool file removed');
}

/** Lines of 60 characters, some starting with a dot (dot-stuffed on the wire). */
function body(bytes: number): Buffer {
  const lines: string[] = [];
  for (let i = 0, n = 0; n < bytes; i++) {
    const line = `${i % 7 === 0 ? '.' : ''}${String(i).padStart(8, '0')} ${'x'.repeat(50)}\r\n`;
    lines.push(line);
    n += line.length;
  }
  return Buffer.from(`Subject: spooled\r\n\r\n${lines.join('')}`);
}

describe('spooling a large message while it is received (spoolAfter)', () => {
  let relay: Relay;
  const log = capturedLog('info');
  before(async () => {
    relay = await startTestRelay({ spoolAfter: SPOOL_AFTER, maxMessageSize: 500_000 }, { startDelivery: false, logger: log.logger });
  });
  after(() => relay.stop());

  test('the bytes past spoolAfter wait in a file during DATA; the stored message is exact and the file is gone after the 250', async () => {
    const raw = body(200_000);
    const wire = Buffer.from(raw.toString('latin1').replace(/^\./gm, '..'), 'latin1');
    const c = await spoolingSession(relay, wire.subarray(0, 100_000));
    const [file] = spoolFiles(relay);
    await waitFor(() => fs.statSync(path.join(Spool.dirFor(relay.config.databasePath), file)).size > 0, 10_000, 'bytes in the spool file');
    c.write(wire.subarray(100_000));
    const reply = await c.send('.');
    const id = /^250 2\.0\.0 Ok: queued as (\S+)$/.exec(reply)?.[1];
    assert.ok(id, reply);
    const row = storedBody(relay, id);
    assert.deepEqual(row.raw.subarray(row.raw.length - raw.length), raw);
    assert.match(row.raw.subarray(0, row.raw.length - raw.length).toString(), /^Received: from client\.test /);
    assert.equal(row.size, row.raw.length);
    await spoolEmptied(relay);
    c.close();
  });

  test("a spool file holds a message's bytes for relayq's user alone: mode 0600", async () => {
    const before = messageCount(relay);
    const c = await spoolingSession(relay, body(100_000));
    const [file] = spoolFiles(relay);
    assert.equal(fs.statSync(path.join(Spool.dirFor(relay.config.databasePath), file)).mode & 0o777, 0o600);
    c.close();
    await spoolEmptied(relay);
    assert.equal(messageCount(relay), before);
  });

  test('a message up to spoolAfter stays in memory: no spool file', async () => {
    const dir = Spool.dirFor(relay.config.databasePath);
    fs.rmSync(dir, { recursive: true, force: true });
    const raw = body(SPOOL_AFTER - 500);
    const info = await sendMail(relay.smtpPort, { raw });
    const id = /queued as (\S+)/.exec(info.response)?.[1] as string;
    assert.deepEqual(storedBody(relay, id).raw.subarray(-raw.length), raw);
    assert.equal(fs.existsSync(dir), false, 'the spool directory is created only when a message needs it');
  });

  test('a message of exactly spoolAfter bytes stays in memory; one byte more is spooled', async () => {
    const dir = Spool.dirFor(relay.config.databasePath);
    fs.rmSync(dir, { recursive: true, force: true });
    /** `size` bytes of content, no line starting with a dot: as many bytes on the wire. */
    const ofSize = (size: number) => {
      const head = 'Subject: edge\r\n\r\n';
      const lines = `${'x'.repeat(60)}\r\n`.repeat(Math.floor((size - head.length - 2) / 62));
      return Buffer.from(`${head}${lines}${'y'.repeat(size - head.length - lines.length - 2)}\r\n`);
    };
    const exact = ofSize(SPOOL_AFTER);
    assert.equal(exact.length, SPOOL_AFTER);
    const id = /queued as (\S+)/.exec((await sendMail(relay.smtpPort, { raw: exact })).response)?.[1] as string;
    assert.deepEqual(storedBody(relay, id).raw.subarray(-exact.length), exact);
    assert.equal(fs.existsSync(dir), false, 'no spool file for a message of spoolAfter bytes');
    const over = ofSize(SPOOL_AFTER + 1);
    const spooled = /queued as (\S+)/.exec((await sendMail(relay.smtpPort, { raw: over })).response)?.[1] as string;
    assert.deepEqual(storedBody(relay, spooled).raw.subarray(-over.length), over);
    assert.equal(fs.existsSync(dir), true, 'the spool directory made for a message of spoolAfter + 1 bytes');
    await spoolEmptied(relay);
  });

  test('a client that disconnects mid-DATA leaves nothing stored and no spool file', async () => {
    const before = messageCount(relay);
    const c = await spoolingSession(relay, body(100_000));
    c.close();
    await spoolEmptied(relay);
    assert.equal(messageCount(relay), before);
  });

  test('a message over maxMessageSize gets 552 and its spool file is removed', async () => {
    const before = messageCount(relay);
    const c = await spoolingSession(relay, body(100_000));
    c.write(body(500_000));
    assert.match(await c.send('.'), /^552 5\.3\.4 /);
    await spoolEmptied(relay);
    assert.equal(messageCount(relay), before);
    c.close();
  });

  test('a bare LF past spoolAfter gets 550 and the spool file is removed', async () => {
    const before = messageCount(relay);
    const c = await spoolingSession(relay, body(50_000));
    c.write('smuggled\n.\nMAIL FROM:<x@example.com>\r\n');
    c.write(body(20_000));
    assert.match(await c.send('.'), /^550 5\.6\.0 /);
    await spoolEmptied(relay);
    assert.equal(messageCount(relay), before);
    c.close();
  });

  test('a spool file that cannot be created: 451 4.3.0, nothing stored, the next message goes through', async (t) => {
    const dir = Spool.dirFor(relay.config.databasePath);
    const before = messageCount(relay);
    // a plain file where the directory should be
    fs.rmSync(dir, { recursive: true, force: true });
    fs.writeFileSync(dir, 'not a directory');
    try {
      await assert.rejects(sendMail(relay.smtpPort, { raw: body(50_000) }), (err: Error & { response?: string }) => {
        assert.match(err.response ?? '', /^451 4\.3\.0 Local error in processing: message not stored/);
        return true;
      });
      assert.equal(messageCount(relay), before);
      assert.ok(log.entries().some((e) => e.event === 'smtp.store_failed' && /EEXIST|ENOTDIR/.test(String(e.err))), log.lines.join('\n'));
      // small messages are still taken, large ones are not: degraded, saying why
      const health = await createApp({ ...relay, getClientIp: () => '127.0.0.1' }).request('/health');
      assert.equal(health.status, 200);
      const { status, details } = (await health.json()) as { status: string; details: { warnings: string[] } };
      assert.equal(status, 'degraded');
      assert.ok(
        details.warnings.some((w) => /^messages over spoolAfter \(4096 bytes\) get 451: a spool file failed in the last minute: .*(EEXIST|ENOTDIR)/.test(w)),
        details.warnings.join('\n'),
      );
      // for a minute: a little less than a minute later it is still said, a minute later no more
      const realNow = performance.now.bind(performance);
      const spoolWarnings = async (laterMs: number) => {
        const now = t.mock.method(performance, 'now', () => realNow() + laterMs);
        try {
          const later = await createApp({ ...relay, getClientIp: () => '127.0.0.1' }).request('/health');
          const warnings = ((await later.json()) as { details: { warnings: string[] } }).details.warnings;
          return warnings.filter((w) => w.startsWith('messages over spoolAfter')).length;
        } finally {
          now.mock.restore();
        }
      };
      assert.equal(await spoolWarnings(55_000), 1);
      assert.equal(await spoolWarnings(60_000), 0);
    } finally {
      fs.rmSync(dir, { force: true });
    }
    const info = await sendMail(relay.smtpPort, { raw: body(50_000) });
    assert.match(info.response, /^250 /);
    assert.equal(messageCount(relay), before + 1);
    // a spooled message since: ok again
    const health = (await (await fetch(`http://127.0.0.1:${relay.httpPort}/health`)).json()) as { status: string };
    assert.equal(health.status, 'ok');
  });
});

test('spoolAfter 0 keeps every message in memory', async () => {
  const relay = await startTestRelay({ spoolAfter: 0 }, { startDelivery: false });
  try {
    const raw = body(300_000);
    const info = await sendMail(relay.smtpPort, { raw });
    const id = /queued as (\S+)/.exec(info.response)?.[1] as string;
    assert.deepEqual(storedBody(relay, id).raw.subarray(-raw.length), raw);
    assert.equal(fs.existsSync(Spool.dirFor(relay.config.databasePath)), false);
  } finally {
    await relay.stop();
  }
});

test('files that an earlier process left in the spool directory are removed at startup; the directory stays', async () => {
  const config = testConfig();
  const dir = Spool.dirFor(config.databasePath);
  // the directory may be a link the operator made (or a mount point): it stays, emptied
  const target = tempDir('relayq-spool-');
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  fs.symlinkSync(target, dir);
  const cutOff = 'a message that never got its 250';
  fs.writeFileSync(path.join(dir, '1A22AF1C0B4CA8658AC5.4242.1'), cutOff);
  fs.writeFileSync(path.join(dir, '1A22AF1C0B4CA8658AC6.4242.2'), cutOff.repeat(3));
  fs.mkdirSync(path.join(dir, 'stray'));
  const log = capturedLog('info');
  const relay = await startTestRelay({ databasePath: config.databasePath }, { startDelivery: false, logger: log.logger });
  try {
    assert.ok(fs.lstatSync(dir).isSymbolicLink());
    assert.deepEqual(fs.readdirSync(target), []);
    // said once, with what was removed: the bytes are the files' (a directory's own size is not counted)
    const cleared = log.entries().filter((e) => e.event === 'smtp.spool_cleared');
    assert.equal(cleared.length, 1);
    assert.equal(cleared[0]!.files, 3);
    assert.equal(cleared[0]!.bytes, cutOff.length * 4);
    assert.match(String(cleared[0]!.msg), /spool files of messages cut off by an earlier stop \(none of them was answered 250\)/);
  } finally {
    await relay.stop();
  }
  // a start that finds the spool empty says nothing of it
  const again = capturedLog('info');
  const restarted = await startTestRelay({ databasePath: config.databasePath }, { startDelivery: false, logger: again.logger });
  await restarted.stop();
  assert.ok(again.entries().some((e) => e.event === 'relay.started'));
  assert.equal(again.entries().filter((e) => e.event === 'smtp.spool_cleared').length, 0);
});

test('a spool link that another user made is refused at start, and what it points to is left alone', {
  skip: process.getuid?.() === 0 ? false : 'giving a link another owner takes root',
}, async () => {
  const config = testConfig();
  const dir = Spool.dirFor(config.databasePath);
  const victim = tempDir('relayq-victim-');
  fs.writeFileSync(path.join(victim, 'keep.txt'), 'not relayq\'s');
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  fs.symlinkSync(victim, dir);
  fs.lchownSync(dir, 65534, 65534);
  // the spool's own check, for a relay run as its user; as root, the root rule refuses it first
  assert.throws(() => new Spool(dir, 1024).clear(), /-spool is a symbolic link made by another user \(uid 65534\); relayq will not empty what it points to/);
  await assert.rejects(
    startTestRelay({ databasePath: config.databasePath, emailsDir: config.emailsDir }, { startDelivery: false }),
    /^Error: databasePath \S+: \S+-spool may be changed by its owner, uid 65534 \(a symbolic link\): as root, /,
  );
  assert.deepEqual(fs.readdirSync(victim), ['keep.txt']);
});

test('a spool directory that another user owns is refused at start, and left alone', {
  skip: process.getuid?.() === 0 ? false : 'giving a directory another owner takes root',
}, async () => {
  const config = testConfig();
  const dir = Spool.dirFor(config.databasePath);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'theirs.txt'), 'not relayq\'s');
  fs.chownSync(dir, 65534, 65534);
  // the spool's own check, for a relay run as its user; as root, the root rule refuses it first
  assert.throws(() => new Spool(dir, 1024).clear(), /-spool belongs to another user \(uid 65534\); relayq will not empty it/);
  await assert.rejects(
    // a relay that starts all the same is stopped, so that the failed assertion ends the test
    startTestRelay({ databasePath: config.databasePath, emailsDir: config.emailsDir }, { startDelivery: false }).then((relay) => relay.stop()),
    /^Error: databasePath \S+: \S+-spool may be changed by its owner, uid 65534: as root, /,
  );
  assert.deepEqual(fs.readdirSync(dir), ['theirs.txt']);
});

test('a spool directory relayq cannot write into stops the start, naming databasePath', async (t) => {
  const config = testConfig();
  const dir = Spool.dirFor(config.databasePath);
  fs.mkdirSync(dir, { recursive: true });
  // immutable: no one may write into it, root included (a mode would not stop root)
  await whileImmutable(t, dir, () =>
    assert.rejects(
      startTestRelay({ databasePath: config.databasePath, emailsDir: config.emailsDir, spoolAfter: SPOOL_AFTER }, { startDelivery: false }).then((relay) =>
        relay.stop(),
      ),
      /^Error: databasePath: cannot empty or write into .*-spool: EPERM/,
    ),
  );
});

test('a spool link that points nowhere stops the start, naming databasePath', async () => {
  const config = testConfig();
  const dir = Spool.dirFor(config.databasePath);
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  fs.symlinkSync(path.join(tempDir('relayq-gone-'), 'nothing-here'), dir);
  await assert.rejects(
    startTestRelay({ databasePath: config.databasePath, emailsDir: config.emailsDir }, { startDelivery: false }),
    /^Error: databasePath: cannot make .*-spool: ENOENT/,
  );
});

test('the spool directory is made at start; a link another user puts there later gets no message: 451 4.3.0, nothing stored', {
  skip: process.getuid?.() === 0 ? false : 'giving a link another owner takes root',
}, async () => {
  const relay = await startTestRelay({ spoolAfter: SPOOL_AFTER }, { startDelivery: false });
  try {
    const dir = Spool.dirFor(relay.config.databasePath);
    const made = fs.lstatSync(dir);
    assert.ok(made.isDirectory() && (made.mode & 0o777) === 0o700, 'relayq\'s own, before any message');
    // what another user could do in a directory others may write to, had it not been made
    const theirs = tempDir('relayq-theirs-');
    fs.rmdirSync(dir);
    fs.symlinkSync(theirs, dir);
    fs.lchownSync(dir, 65534, 65534);
    const before = messageCount(relay);
    const c = await openSession(relay.smtpPort);
    assert.match(await c.send('DATA'), /^354/);
    c.write(body(3 * SPOOL_AFTER));
    assert.match(await c.send('.'), /^451 4\.3\.0 /);
    c.close();
    assert.equal(messageCount(relay), before);
    assert.deepEqual(fs.readdirSync(theirs), [], 'nothing written where the link points');
  } finally {
    await relay.stop();
  }
});

test('a second relay started on the same database (on other ports) is refused, and leaves the running one\'s spool alone', async () => {
  const relay = await startTestRelay({ spoolAfter: SPOOL_AFTER }, { startDelivery: false });
  try {
    const raw = body(100_000);
    const c = await spoolingSession(relay, raw.subarray(0, 50_000));
    await assert.rejects(
      startTestRelay({ databasePath: relay.config.databasePath, spoolAfter: SPOOL_AFTER }),
      /^Error: databasePath \S+: another relayq is running on this database/,
    );
    assert.equal(spoolFiles(relay).length, 1);
    c.write(raw.subarray(50_000));
    const id = /^250 2\.0\.0 Ok: queued as (\S+)$/.exec(await c.send('.'))?.[1];
    assert.ok(id);
    assert.deepEqual(storedBody(relay, id).raw.subarray(-raw.length), raw);
    c.close();
  } finally {
    await relay.stop();
  }
});

test('a spool file shorter than the bytes counted into it: the insert fails and stores nothing', async () => {
  const dir = tempDir();
  const store = await openStore(path.join(dir, 'relayq.db'));
  try {
    const file = path.join(dir, 'short');
    fs.writeFileSync(file, 'abc');
    const msg = newMessage({ id: '1A22AF1C0B4CA8658AC6', raw: Buffer.from('Received: x\r\n'), spooled: { file, bytes: 10 }, receivedAt: Date.now() });
    const sqlite = store.sqlite;
    sqlite.exec('BEGIN IMMEDIATE');
    assert.throws(() => insertMessage(sqlite, msg, NO_LIMITS), /spool file .*short holds 3 bytes, not 10/);
    sqlite.exec('ROLLBACK');
    assert.equal((sqlite.prepare('SELECT COUNT(*) AS n FROM message_bodies').get() as { n: number }).n, 0);
    fs.writeFileSync(file, '0123456789');
    sqlite.exec('BEGIN IMMEDIATE');
    insertMessage(sqlite, msg, NO_LIMITS);
    sqlite.exec('COMMIT');
    const row = sqlite.prepare('SELECT raw, size FROM messages JOIN message_bodies ON message_bodies.id = body_id').get() as { raw: Buffer; size: number };
    assert.equal(row.raw.toString(), 'Received: x\r\n0123456789');
    assert.equal(row.size, 23);
  } finally {
    await store.close();
  }
});

test('spooled messages of one commit, smaller and larger than the last and over 4 MiB, are each stored exactly', async () => {
  const dir = tempDir();
  const store = await openStore(path.join(dir, 'relayq.db'));
  try {
    const sizes = [300_000, 100_000, 5 * 1024 * 1024, 200_000, 4 * 1024 * 1024 - 12];
    const sqlite = store.sqlite;
    const wanted = new Map<string, Buffer>();
    sqlite.exec('BEGIN IMMEDIATE');
    for (const [i, size] of sizes.entries()) {
      const file = path.join(dir, `spool-${i}`);
      const rest = Buffer.alloc(size, String.fromCharCode(97 + i));
      fs.writeFileSync(file, rest);
      const id = `1A22AF1C0B4CA8658AC${i}`;
      const head = Buffer.from(`Received: ${i}\r\n`);
      wanted.set(id, Buffer.concat([head, rest]));
      insertMessage(sqlite, newMessage({ id, raw: head, spooled: { file, bytes: size }, receivedAt: Date.now() }), NO_LIMITS);
    }
    sqlite.exec('COMMIT');
    const rows = sqlite.prepare('SELECT messages.id, raw, size FROM messages JOIN message_bodies ON message_bodies.id = body_id').all() as Array<{ id: string; raw: Buffer; size: number }>;
    assert.equal(rows.length, sizes.length);
    for (const row of rows) {
      const expected = wanted.get(row.id);
      assert.ok(expected, row.id);
      assert.equal(row.size, expected.length, row.id);
      assert.ok(row.raw.equals(expected), `${row.id}: the stored bytes differ`);
    }
  } finally {
    await store.close();
  }
});

test('a spool file opened before a spool failure does not clear it: /health stays degraded until a newer one is written', async () => {
  const relay = await startTestRelay({ spoolAfter: SPOOL_AFTER, maxMessageSize: 500_000 }, { startDelivery: false });
  const status = async () => ((await (await createApp({ ...relay, getClientIp: () => '127.0.0.1' }).request('/health')).json()) as { status: string }).status;
  const dir = Spool.dirFor(relay.config.databasePath);
  try {
    // A spools its message; then the directory goes, and B's spool file cannot be made
    const a = await spoolingSession(relay, body(50_000));
    fs.renameSync(dir, `${dir}.old`);
    fs.writeFileSync(dir, 'not a directory');
    await assert.rejects(sendMail(relay.smtpPort, { raw: body(50_000) }), (err: Error & { response?: string }) => /^451 /.test(err.response ?? ''));
    assert.equal(await status(), 'degraded');
    // A's file, opened before the failure, is written in full: that says nothing of the spool now
    await a.send('.');
    a.close();
    assert.equal(await status(), 'degraded');
    fs.rmSync(dir);
    fs.renameSync(`${dir}.old`, dir);
    assert.match((await sendMail(relay.smtpPort, { raw: body(50_000) })).response, /^250 /);
    assert.equal(await status(), 'ok');
  } finally {
    await relay.stop();
  }
});

describe('a message\'s bytes past spoolAfter (MessageBytes)', () => {
  /** A fresh spool and the bytes of one message, read from `data` (the DATA stream). */
  function receiving(name: string): { dir: string; spool: Spool; data: PassThrough; bytes: MessageBytes } {
    const dir = path.join(tempDir(), 'spool');
    const spool = new Spool(dir, SPOOL_AFTER);
    const data = new PassThrough();
    return { dir, spool, data, bytes: new MessageBytes(spool, name, data) };
  }

  test('a message sent a byte per TCP segment is held in blocks, not a Buffer per byte (each costs over 100 bytes), in order, in memory and in the file', async () => {
    const spool = new Spool(path.join(tempDir(), 'spool'), 256 * 1024);
    const bytes = new MessageBytes(spool, '1A22AF1C0B4CA8658AC6', new PassThrough());
    const sent: Buffer[] = [];
    const send = (chunk: Buffer) => {
      sent.push(chunk);
      bytes.add(chunk);
    };
    for (let i = 0; i < 200_000; i++) send(Buffer.from([0x61 + (i % 26)]));
    send(Buffer.alloc(3000, 'L')); // a large one between small ones keeps its place
    for (let i = 0; i < 100_000; i++) send(Buffer.from([0x30 + (i % 10)]));
    const received = await bytes.finish();
    // in memory: 200,000 bytes in 13 chunks (12 blocks of 16 KiB and the rest, at the large
    // chunk), the large chunk, 3 blocks more and the start of a fourth, up to 256 KiB; then the file
    assert.equal(received.chunks.length, 18);
    assert.equal(Buffer.concat(received.chunks).length, 256 * 1024);
    assert.ok(received.spooled);
    const stored = Buffer.concat([...received.chunks, fs.readFileSync(received.spooled.file)]);
    assert.ok(stored.equals(Buffer.concat(sent)), 'the bytes as sent, in order');
    bytes.discard();
  });

  test('DATA is paused while the spool file\'s writes are behind, and resumed once they drained', async () => {
    const { bytes, data } = receiving('1A22AF1C0B4CA8658AC7');
    // far past the file stream's buffer (16 KiB): its write() asks for a drain
    const big = Buffer.alloc(256 * 1024, 'x');
    bytes.add(big);
    assert.equal(data.isPaused(), true, 'DATA kept flowing while the spool file was behind');
    await waitFor(() => !data.isPaused(), 10_000, 'DATA resumed after the drain');
    const received = await bytes.finish();
    assert.ok(received.spooled);
    assert.equal(received.spooled.bytes, big.length - SPOOL_AFTER);
    assert.equal(fs.statSync(received.spooled.file).size, big.length - SPOOL_AFTER);
    bytes.discard();
  });

  test('the first spoolAfter bytes stay in memory however the reads cut them: a first read past it is split', async () => {
    const { bytes } = receiving('1A22AF1C0B4CA8658AC9');
    // a client's whole message in one read, as a socket hands over up to 64 KiB at once
    const message = Buffer.from(`Subject: one read\r\n\r\n${'y'.repeat(78)}\r\n`.repeat(100));
    bytes.add(message);
    const received = await bytes.finish();
    const inMemory = Buffer.concat(received.chunks);
    assert.equal(inMemory.length, SPOOL_AFTER);
    assert.match(inMemory.toString(), /^Subject: one read\r\n/);
    assert.ok(received.spooled);
    assert.equal(received.spooled.bytes, message.length - SPOOL_AFTER);
    assert.ok(Buffer.concat([inMemory, fs.readFileSync(received.spooled.file)]).equals(message));
    bytes.discard();
  });

  test('a message discarded while its spool file is still being opened leaves no file behind', async (t) => {
    const { dir, bytes } = receiving('1A22AF1C0B4CA8658AC8');
    // a slow disk: the file's open is held until any removal of it has run (or long enough that
    // one would have), so the removal cannot come before the file exists by luck
    const realOpen = fs.open;
    const realRm = fs.rm;
    let removed!: () => void;
    const removal = new Promise<void>((resolve) => (removed = resolve));
    const opening = Promise.race([removal, new Promise<void>((resolve) => setTimeout(resolve, 500))]);
    t.mock.method(fs, 'open', (...args: Parameters<typeof fs.open>) => {
      if (String(args[0]).startsWith(dir)) void opening.then(() => realOpen(...args));
      else realOpen(...args);
    });
    t.mock.method(fs, 'rm', (file: fs.PathLike, options: fs.RmOptions, cb: fs.NoParamCallback) =>
      realRm(file, options, (err) => {
        cb(err);
        removed();
      }),
    );
    bytes.add(Buffer.alloc(SPOOL_AFTER + 1, 'x'));
    bytes.discard();
    // settles once the file's stream has closed, when its file exists
    await bytes.finish().catch(() => {});
    await waitFor(() => fs.readdirSync(dir).length === 0, 10_000, 'the spool file removed');
  });

  test('a message discarded while finish() waits for its file is no spool failure: /health is not degraded for it', async () => {
    const { dir, spool, bytes } = receiving('1A22AF1C0B4CA8658AC9');
    bytes.add(Buffer.alloc(SPOOL_AFTER + 1, 'x'));
    // bytes in the file: its stream is open (one still opening would finish its writes before closing)
    await waitFor(() => fs.readdirSync(dir).some((name) => fs.statSync(path.join(dir, name)).size > 0), 10_000, 'bytes in the spool file');
    bytes.add(Buffer.alloc(1024 * 1024, 'y'));
    const finishing = bytes.finish();
    bytes.discard();
    // the file's writes were cut short: this message is not stored, and that is all
    await assert.rejects(finishing);
    assert.equal(spool.fault(60_000), undefined, 'a discarded message counted as a spool failure');
    await waitFor(() => fs.readdirSync(dir).length === 0, 10_000, 'the spool file removed');
  });
});

test('a spool directory that another user owns: clear() says so as it is, not as a directory it cannot read', {
  skip: process.getuid?.() === 0 ? false : 'giving a directory another owner takes root',
}, () => {
  const config = testConfig();
  const dir = Spool.dirFor(config.databasePath);
  fs.mkdirSync(dir, { recursive: true });
  fs.chownSync(dir, 65534, 65534);
  assert.throws(() => new Spool(dir, 1024).clear(), {
    message: `${dir} belongs to another user (uid 65534); relayq will not empty it: remove it, or give it to relayq's user`,
  });
});
