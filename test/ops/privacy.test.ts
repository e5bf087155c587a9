import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { writeFileAtomic } from '../../src/delivery/atomic-file.js';
import { permissionWarnings, type Relay } from '../../src/main.js';
import { backupDatabase } from '../../src/store/backup.js';
import { openReadOnly } from '../../src/store/maintenance.js';
import { ERASE_SCAN_SQL, type EraseCursor, eraseDeliveredContent } from '../../src/store/retention.js';
import { capturedLog, REPO_ROOT, SmtpClient, sendMail, startTestRelay, tempDir, writeDirect } from '../helpers.js';

/** Delivers a few messages carrying `marker` (one small, two spanning overflow pages), then stops. */
async function deliverAndStop(logAllEmails: boolean, marker: string) {
  const log = capturedLog('debug');
  const relay = await startTestRelay({ security: { logAllEmails } }, { startDelivery: false, startRetention: false, logger: log.logger });
  const bodies = [`short ${marker}`, `${marker}\n${'a'.repeat(30_000)}\n${marker}`, `${'b'.repeat(70_000)} ${marker}`];
  for (const text of bodies) await sendMail(relay.smtpPort, { text, subject: `private ${marker}` });
  await relay.delivery.runOnce();
  const rows = relay.store.sqlite.prepare('SELECT state, body_id IS NULL AS erased FROM messages').all() as Array<{ state: string; erased: number }>;
  const file = relay.config.databasePath;
  await relay.stop();
  const onDisk = [file, `${file}-wal`].filter((f) => fs.existsSync(f)).map((f) => fs.readFileSync(f));
  return { rows, onDisk, log };
}

/** Which of the database file and its WAL hold `text`. */
function filesHolding(file: string, text: string): string[] {
  return [file, `${file}-wal`].filter((f) => fs.existsSync(f) && fs.readFileSync(f).indexOf(text) >= 0);
}

/** Those that still hold `text` once neither does, or 15 s have passed. */
async function filesHoldingAfterWait(file: string, text: string): Promise<string[]> {
  const deadline = Date.now() + 15_000;
  while (filesHolding(file, text).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  return filesHolding(file, text);
}

describe('security.logAllEmails', () => {
  test('false: delivered mail leaves no raw bytes in the database, not even in freed pages', async () => {
    const marker = `PRIVATE-${crypto.randomBytes(8).toString('hex')}`;
    const { rows, onDisk, log } = await deliverAndStop(false, marker);
    assert.equal(rows.length, 3);
    assert.deepEqual(rows, Array(3).fill({ state: 'delivered', erased: 1 }));
    for (const bytes of onDisk) assert.equal(bytes.indexOf(marker), -1, 'the marker is nowhere in the database files');
    // the log has the envelope only: not the subject, at any level
    assert.equal(log.entries().filter((e) => e.event === 'smtp.accepted').length, 3);
    assert.deepEqual(log.lines.filter((line) => line.includes(marker)), []);
  });

  test('true (control): the content is kept after delivery, so the search above can find it', async () => {
    const marker = `KEPT-${crypto.randomBytes(8).toString('hex')}`;
    const { rows, onDisk, log } = await deliverAndStop(true, marker);
    assert.deepEqual(rows, Array(3).fill({ state: 'delivered', erased: 0 }));
    assert.ok(onDisk.some((bytes) => bytes.indexOf(marker) >= 0));
    assert.deepEqual(
      log.entries().filter((e) => e.event === 'smtp.accepted').map((e) => e.subject),
      Array(3).fill(`private ${marker}`),
    );
  });
});

test('logAllEmails switched to false: the content of mail delivered before is erased at the next start; queued mail keeps its own', async () => {
  const delivered = `KEPT-THEN-ERASED-${crypto.randomBytes(8).toString('hex')}`;
  const waiting = `STILL-QUEUED-${crypto.randomBytes(8).toString('hex')}`;
  const before = await startTestRelay({ security: { logAllEmails: true } }, { startDelivery: false, startRetention: false });
  const files = { databasePath: before.config.databasePath, emailsDir: before.config.emailsDir };
  try {
    // the marker (after a space) in the overflow pages of the two larger ones; see the end
    for (const text of [`short:${delivered}`, `${'a'.repeat(30_000)} ${delivered}`, `${'b'.repeat(70_000)} ${delivered}`]) await sendMail(before.smtpPort, { text });
    await before.delivery.runOnce();
    await sendMail(before.smtpPort, { text: waiting });
  } finally {
    await before.stop();
  }
  const log = capturedLog('info');
  const after = await startTestRelay({ ...files, security: { logAllEmails: false } }, { startDelivery: false, startRetention: false, logger: log.logger });
  const stored = (marker: string) => after.store.sqlite.prepare('SELECT COUNT(*) AS n FROM message_bodies WHERE instr(raw, ?) > 0').get(Buffer.from(marker)) as { n: number };
  try {
    assert.deepEqual(stored(delivered), { n: 3 }, 'control: the content of the delivered mail is there before');
    await after.retention.runOnce();
    const rows = after.store.sqlite.prepare('SELECT state, body_id IS NULL AS erased FROM messages ORDER BY received_at').all();
    assert.deepEqual(rows, [...Array(3).fill({ state: 'delivered', erased: 1 }), { state: 'queued', erased: 0 }]);
    assert.deepEqual(stored(delivered), { n: 0 });
    assert.deepEqual(stored(waiting), { n: 1 });
    assert.deepEqual(
      log.entries().filter((e) => e.event === 'retention.content_erased').map((e) => [e.messages, /VACUUM the database file while relayq is stopped/.test(String(e.msg))]),
      [[3, true]],
    );
    // the pass is over: the next sweeps erase nothing more, and say nothing of it
    await after.retention.runOnce();
    assert.equal(log.entries().filter((e) => e.event === 'retention.content_erased').length, 1);
  } finally {
    await after.stop();
  }
  // The pages the erasure freed were overwritten (secure_delete), and the WAL checkpointed at the
  // stop. (What the file kept in the unused space of pages while logAllEmails was true, as the
  // short message's cell where rows moved, only a VACUUM clears: the README says so.)
  assert.deepEqual(filesHolding(files.databasePath, ` ${delivered}`), []);
});

/** The erasure pass from the first delivered message to its end, a step at a time: what each step erased. */
async function erasePass(relay: Relay, options: { limit: number; maxBytes?: number; scan: number }): Promise<number[]> {
  const erased: number[] = [];
  for (let at: EraseCursor | null = { finishedAt: Number.MIN_SAFE_INTEGER, rowid: 0 }; at && erased.length < 20; ) {
    const step = await writeDirect(relay, (db) => eraseDeliveredContent(db, { ...options, after: at as EraseCursor }));
    erased.push(step.erased);
    at = step.next;
  }
  return erased;
}

test('the erasure pass goes through delivered mail in steps of at most `limit` messages and `maxBytes` of content, to the end', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    for (let i = 0; i < 5; i++) await sendMail(relay.smtpPort, { text: `message ${i}` });
    await relay.delivery.runOnce();
    await sendMail(relay.smtpPort, { text: 'queued' });
    // delivered in one millisecond: the cursor tells them apart by rowid
    await writeDirect(relay, (db) => db.prepare("UPDATE messages SET finished_at = 1 WHERE state = 'delivered'").run());
    // one message a step for want of bytes (each is erased alone); the step that reads fewer than
    // `scan` has read to the end
    assert.deepEqual(await erasePass(relay, { limit: 3, maxBytes: 1, scan: 3 }), [1, 1, 1, 1, 1]);
    assert.deepEqual(await writeDirect(relay, (db) => db.prepare("SELECT COUNT(body_id) AS n FROM messages WHERE state = 'queued'").get()), { n: 1 });
    // and at most `limit` a step, however many it reads: the queued one and five more delivered
    for (let i = 5; i < 10; i++) await sendMail(relay.smtpPort, { text: `message ${i}` });
    await relay.delivery.runOnce();
    assert.deepEqual(await erasePass(relay, { limit: 2, scan: 100 }), [2, 2, 2]);
    const left = relay.store.sqlite.prepare('SELECT state, COUNT(*) AS n, COUNT(body_id) AS kept FROM messages GROUP BY state').all();
    assert.deepEqual(left, [{ state: 'delivered', n: 11, kept: 0 }]);
    const plan = relay.store.sqlite.prepare(`EXPLAIN QUERY PLAN ${ERASE_SCAN_SQL}`).all(0, 0, 3) as Array<{ detail: string }>;
    assert.deepEqual(plan.map((p) => p.detail), ['SEARCH messages USING INDEX messages_finished (state=? AND finished_at>?)'], 'read through the index, from the cursor on');
  } finally {
    await relay.stop();
  }
});

test('the erasure pass goes on past a scan window that found no content to erase (mail delivered while logAllEmails was false)', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    for (let i = 0; i < 4; i++) await sendMail(relay.smtpPort, { text: `message ${i}` });
    await relay.delivery.runOnce();
    await writeDirect(relay, (db) => {
      db.prepare("UPDATE messages SET finished_at = 1 WHERE state = 'delivered'").run();
      // the three oldest were delivered while logAllEmails was false: their content is gone
      const first = db.prepare("SELECT rowid, body_id FROM messages WHERE state = 'delivered' ORDER BY rowid LIMIT 3").all() as Array<{ rowid: number; body_id: number }>;
      for (const r of first) {
        db.prepare('UPDATE messages SET body_id = NULL WHERE rowid = ?').run(r.rowid);
        db.prepare('DELETE FROM message_bodies WHERE id = ?').run(r.body_id);
      }
    });
    // a full window of two erased nothing; the next one found the fourth message's content
    assert.deepEqual(await erasePass(relay, { limit: 1, scan: 2 }), [0, 1, 0]);
    assert.deepEqual(relay.store.sqlite.prepare("SELECT COUNT(*) AS n, COUNT(body_id) AS kept FROM messages WHERE state = 'delivered'").get(), { n: 4, kept: 0 });
  } finally {
    await relay.stop();
  }
});

test('logAllEmails=false: content already checkpointed into the database file is gone from both files soon after delivery, while the relay runs', async () => {
  const marker = `PRIVATE-${crypto.randomBytes(8).toString('hex')}`;
  const relay = await startTestRelay({ security: { logAllEmails: false } }, { startDelivery: false, startRetention: false });
  try {
    await sendMail(relay.smtpPort, { text: `${marker}\n${'d'.repeat(10_000)}`, subject: 'private' });
    // as happens to mail that waits (deferred, a backlog): a checkpoint copies it into the file
    await relay.writer.pragma('wal_checkpoint(TRUNCATE)');
    const file = relay.config.databasePath;
    assert.deepEqual(filesHolding(file, marker), [file], 'control: the content is in the database file before delivery');
    await relay.delivery.runOnce();
    assert.equal((relay.store.sqlite.prepare('SELECT state FROM messages').get() as { state: string }).state, 'delivered');
    assert.deepEqual(await filesHoldingAfterWait(file, marker), [], 'neither the database file nor the WAL holds the content');
  } finally {
    await relay.stop();
  }
});

test('logAllEmails=false from the start: the erasure pass finds no content to erase, and logs no retention.content_erased (nor its VACUUM advice)', async () => {
  const log = capturedLog('info');
  const relay = await startTestRelay({ security: { logAllEmails: false } }, { startDelivery: false, startRetention: false, logger: log.logger });
  try {
    await sendMail(relay.smtpPort, { text: 'delivered: its content is erased by the delivery itself' });
    await relay.delivery.runOnce();
    await relay.retention.runOnce();
    await relay.retention.runOnce();
    assert.ok(log.entries().some((e) => e.event === 'delivery.attempt' && e.outcome === 'delivered'));
    assert.deepEqual(log.entries().filter((e) => e.event === 'retention.content_erased'), []);
  } finally {
    await relay.stop();
  }
});

test('logAllEmails=false: a reader holding an old snapshot delays the erasure of checkpointed content; it happens once the reader is gone, with no commit after it', async () => {
  const marker = `PRIVATE-${crypto.randomBytes(8).toString('hex')}`;
  const relay = await startTestRelay({ security: { logAllEmails: false } }, { startDelivery: false, startRetention: false });
  const reader = openReadOnly(relay.config.databasePath);
  try {
    await sendMail(relay.smtpPort, { text: `${marker}\n${'e'.repeat(10_000)}`, subject: 'private' });
    await relay.writer.pragma('wal_checkpoint(TRUNCATE)');
    const file = relay.config.databasePath;
    // a CLI command or a backup in the middle of its read: the checkpoint may not copy past its snapshot
    reader.prepare('BEGIN').run();
    reader.prepare('SELECT count(*) FROM messages').get();
    await relay.delivery.runOnce();
    await new Promise((r) => setTimeout(r, 2500)); // past the first truncation, and its first retry
    assert.deepEqual(filesHolding(file, marker), [file], 'control: the reader keeps the checkpoint from overwriting the file');
    reader.prepare('COMMIT').run();
    assert.deepEqual(await filesHoldingAfterWait(file, marker), [], 'the truncation was tried again after the reader left');
  } finally {
    reader.close();
    await relay.stop();
  }
});

test('logAllEmails=false: a truncation of the WAL that fails is tried again, with no commit after it', async (t) => {
  const marker = `PRIVATE-${crypto.randomBytes(8).toString('hex')}`;
  const relay = await startTestRelay({ security: { logAllEmails: false } }, { startDelivery: false, startRetention: false });
  const file = relay.config.databasePath;
  const wal = `${file}-wal`;
  try {
    // append-only: SQLite still writes its frames through the descriptor it has open, but the
    // truncation fails (SQLITE_IOERR_TRUNCATE), as on a file system that refuses it for a while
    if (spawnSync('chattr', ['+a', wal]).status !== 0) {
      t.skip('chattr +a is not available here (needs root and ext4)');
      return;
    }
    try {
      await sendMail(relay.smtpPort, { text: `${marker}\n${'g'.repeat(10_000)}`, subject: 'private' });
      await relay.delivery.runOnce();
      assert.equal((relay.store.sqlite.prepare('SELECT state FROM messages').get() as { state: string }).state, 'delivered');
      await new Promise((r) => setTimeout(r, 2500)); // past the first truncation, and its first retry
    } finally {
      spawnSync('chattr', ['-a', wal]);
    }
    // the checkpoint copied the erased pages into the file; the WAL's earlier frames still hold the content
    assert.deepEqual(filesHolding(file, marker), [wal], 'control: the truncation failed');
    assert.deepEqual(await filesHoldingAfterWait(file, marker), [], 'the truncation was tried again once it could succeed');
    assert.equal(fs.statSync(wal).size, 0);
  } finally {
    await relay.stop();
  }
});

test('logAllEmails=false: an erasure a kill -9 left in the WAL reaches the database file after the next start, with no commit of its own', async () => {
  const marker = `PRIVATE-${crypto.randomBytes(8).toString('hex')}`;
  const first = await startTestRelay({ security: { logAllEmails: false } }, { startDelivery: false, startRetention: false });
  const file = first.config.databasePath;
  await sendMail(first.smtpPort, { text: `${marker}\n${'f'.repeat(10_000)}`, subject: 'private' });
  await first.stop(); // checkpoints: the content is in the database file
  // a process erases it as a delivery does, and is killed before any checkpoint
  const erase = spawnSync(
    process.execPath,
    [
      '-e',
      `const db = require('better-sqlite3')(process.argv[1]);
       db.pragma('secure_delete = ON');
       db.exec('UPDATE messages SET body_id = NULL; DELETE FROM message_bodies;');
       process.kill(process.pid, 'SIGKILL');`,
      file,
    ],
    { cwd: REPO_ROOT },
  );
  assert.equal(erase.signal, 'SIGKILL', String(erase.stderr));
  assert.deepEqual(filesHolding(file, marker), [file], 'control: the erasure is in the WAL only');
  const relay = await startTestRelay({ databasePath: file, security: { logAllEmails: false } }, { startDelivery: false, startRetention: false });
  try {
    assert.deepEqual(await filesHoldingAfterWait(file, marker), [], 'the start checkpointed the erasure into the file');
  } finally {
    await relay.stop();
  }
});

test('a backup holds each message\'s content once: no stale copy in free space that a restored relay with logAllEmails=false would keep after delivery', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const tag = crypto.randomBytes(6).toString('hex');
  const markers = Array.from({ length: 40 }, (_, i) => `MARK${String(i).padStart(3, '0')}-${tag}`);
  try {
    for (const marker of markers) await sendMail(relay.smtpPort, { text: `${marker}\n${'x'.repeat(1500)}`, subject: 'private' });
    const copy = path.join(tempDir(), 'backup.db');
    backupDatabase(relay.store.sqlite, copy);
    const bytes = fs.readFileSync(copy).toString('latin1');
    const counts = markers.map((m) => bytes.split(m).length - 1);
    assert.deepEqual(counts, Array(markers.length).fill(1));
  } finally {
    await relay.stop();
  }
});

test('a message sent behind a refused DATA, once its 503 came, runs as commands: none of its lines is logged, also at debug', async () => {
  const marker = `PRIVATE-${crypto.randomBytes(8).toString('hex')}`;
  const log = capturedLog('debug');
  const relay = await startTestRelay({ security: { logAllEmails: false } }, { logger: log.logger, startDelivery: false, startRetention: false });
  try {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO client.test');
    assert.match(await c.send('MAIL FROM:<app@example.com>'), /^250 /);
    assert.match(await c.send('RCPT TO:<no-at-sign>'), /^501 /);
    assert.match(await c.send('DATA'), /^503 /);
    for (const line of [`Subject: ${marker}`, '', `Body: ${marker}`]) assert.match(await c.send(line), /^500 /);
    assert.match(await c.send('NOOP'), /^250 /);
    c.close();
  } finally {
    await relay.stop();
  }
  assert.deepEqual(log.lines.filter((line) => line.includes(marker)), []);
  assert.equal(log.lines.filter((line) => line.includes('"msg":"C: /* not a command: ')).length, 3);
  assert.ok(log.lines.some((line) => line.includes('"msg":"C: NOOP"')), 'commands are logged as usual');
});

describe('security.logAllEmails=false and the CLI', () => {
  /**
   * Queues a message carrying `marker`, stops the relay, deletes the message with the CLI (given
   * the setting in a config file, or as flags), checkpoints.
   */
  async function deleteWithCli(logAllEmails: boolean, marker: string, via: 'config' | 'flags' = 'config'): Promise<Buffer> {
    const { runCli, writeConfigFile } = await import('../cli/run-cli.js');
    const path = await import('node:path');
    const { default: Database } = await import('better-sqlite3');
    const relay = await startTestRelay({ security: { logAllEmails } }, { startDelivery: false, startRetention: false });
    const info = await sendMail(relay.smtpPort, { text: `${marker}\n${'c'.repeat(20_000)}`, subject: 'private' });
    const id = info.response.split(' ').pop() as string;
    const file = relay.config.databasePath;
    await relay.stop();
    const config = writeConfigFile(path.dirname(file), { databasePath: file, security: { logAllEmails } });
    const flags = via === 'config' ? ['--config', config] : ['--databasePath', file, '--security.logAllEmails', String(logAllEmails)];
    const r = await runCli(['delete', id, ...flags]);
    assert.equal(r.code, 0, r.stderr);
    const db = new Database(file);
    db.pragma('wal_checkpoint(TRUNCATE)');
    db.close();
    return fs.readFileSync(file);
  }

  test('relayq delete overwrites the pages it frees, as the server does', async () => {
    const marker = `PRIVATE-${crypto.randomBytes(8).toString('hex')}`;
    assert.equal((await deleteWithCli(false, marker)).indexOf(marker), -1);
    const kept = `KEPT-${crypto.randomBytes(8).toString('hex')}`;
    assert.ok((await deleteWithCli(true, kept)).indexOf(kept) >= 0, 'control: without it the freed pages keep the bytes');
    // a relay configured by flags alone: the CLI takes the same flags
    const flagged = `FLAGGED-${crypto.randomBytes(8).toString('hex')}`;
    assert.equal((await deleteWithCli(false, flagged, 'flags')).indexOf(flagged), -1);
  });
});

describe('file permissions', () => {
  const mode = (file: string) => fs.statSync(file).mode & 0o777;

  test('a database relayq creates, its -wal and -shm and a backup are readable by the relay user alone', async () => {
    const dir = tempDir();
    const databasePath = path.join(dir, 'new', 'relayq.db');
    const log = capturedLog('info');
    const relay = await startTestRelay({ databasePath }, { logger: log.logger, startDelivery: false, startRetention: false });
    try {
      await sendMail(relay.smtpPort, { text: 'private' });
      assert.equal(mode(path.dirname(databasePath)), 0o700, 'the directory it made');
      for (const file of [databasePath, `${databasePath}-wal`, `${databasePath}-shm`]) assert.equal(mode(file), 0o600, file);
      const copy = path.join(dir, 'backup.db');
      backupDatabase(relay.store.sqlite, copy);
      assert.equal(mode(copy), 0o600, 'the backup');
      assert.ok(!log.entries().some((e) => e.event === 'store.permissions'), 'no warning for its own file');
    } finally {
      await relay.stop();
    }
  });

  test('the directories relayq makes for message files are not writable by others, even under umask 000', async () => {
    const dir = tempDir();
    const emailsDir = path.join(dir, 'new', 'emails');
    const umask = process.umask(0);
    try {
      const relay = await startTestRelay({ emailsDir }, { startDelivery: false, startRetention: false });
      await relay.stop();
      // writeFileAtomic makes a missing directory the same way (a local delivery, an export)
      const nested = path.join(dir, 'elsewhere', 'failed');
      await writeFileAtomic(path.join(nested, 'X.json'), '{}\n');
      for (const made of [emailsDir, path.join(emailsDir, 'failed'), nested]) assert.equal(mode(made), 0o750, made);
      assert.equal(mode(path.join(nested, 'X.json')), 0o640);
      // and a file written into a directory that is there already
      await writeFileAtomic(path.join(emailsDir, 'Y.eml'), 'x');
      assert.equal(mode(path.join(emailsDir, 'Y.eml')), 0o640);
    } finally {
      process.umask(umask);
    }
  });

  test('a database others may read (made before, or by hand) gets a warning at start', async () => {
    const dir = tempDir();
    const databasePath = path.join(dir, 'relayq.db');
    await (await startTestRelay({ databasePath }, { startDelivery: false, startRetention: false })).stop();
    fs.chmodSync(databasePath, 0o644);
    const log = capturedLog('info');
    const relay = await startTestRelay({ databasePath }, { logger: log.logger, startDelivery: false, startRetention: false });
    const health = (await (await fetch(`http://127.0.0.1:${relay.httpPort}/health`)).json()) as { details: { warnings: string[] } };
    await relay.stop();
    const warning = log.entries().find((e) => e.event === 'store.permissions');
    assert.ok(warning, 'a store.permissions warning');
    assert.equal(warning.mode, '0644');
    assert.match(String(warning.msg), /chmod 600/);
    assert.ok(health.details.warnings.includes(String(warning.msg)), 'in /health too');
  });

  test('a directory of its files that every user may write, not sticky, gets a warning at start: they could remove the -wal', () => {
    const dir = tempDir();
    const databasePath = path.join(dir, 'data', 'relayq.db');
    const emailsDir = path.join(dir, 'emails');
    for (const made of [path.dirname(databasePath), path.join(emailsDir, 'failed')]) fs.mkdirSync(made, { recursive: true, mode: 0o700 });
    fs.writeFileSync(databasePath, '', { mode: 0o600 });
    assert.deepEqual(permissionWarnings(databasePath, emailsDir), []);
    // a group that may write is taken as meant; a sticky directory keeps others from removing files
    fs.chmodSync(path.dirname(databasePath), 0o770);
    fs.chmodSync(emailsDir, 0o1777);
    assert.deepEqual(permissionWarnings(databasePath, emailsDir), []);
    fs.chmodSync(path.dirname(databasePath), 0o777);
    fs.chmodSync(path.join(emailsDir, 'failed'), 0o757);
    assert.deepEqual(
      permissionWarnings(databasePath, emailsDir).map((w) => [w.path, w.mode, w.message]),
      [
        [path.dirname(databasePath), '0777', `other users may remove or replace the files in ${path.dirname(databasePath)} (mode 0777), the database's -wal, with mail acknowledged and not yet in the database file among them: chmod o-w it`],
        [path.join(emailsDir, 'failed'), '0757', `other users may remove or replace the files in ${path.join(emailsDir, 'failed')} (mode 0757), the exports of failed mail among them: chmod o-w it`],
      ],
    );
  });
});
