// The CLI commands one at a time, each on a relay or a database of its own.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { ManualClock } from '../manual-clock.js';
import { failedExportPath } from '../../src/delivery/failed-export.js';
import { ADMIN_STEP, flushQueuedInSteps, HELD, queuedDueNow } from '../../src/store/admin.js';
import { CLI_READS } from '../../src/cli/context.js';
import { CONFIG_KEYS } from '../../src/config/schema.js';
import { openConnection, openStore } from '../../src/store/db.js';
import { insertMessage } from '../../src/store/intake.js';
import { messageRaw, storeMetrics } from '../../src/store/queries.js';
import { startScriptedUpstream } from '../delivery/fixtures.js';
import { cliArgs, insertMessages, NO_LIMITS, newMessage, sendMail, startTestRelay, startUpstream, tempDir, waitFor, writeDirect } from '../helpers.js';
import { assertOneLineError, CLI_CWD, cleanEnv, queuedId, REPO_ROOT, runCli, runCliJson, writeConfigFile } from './run-cli.js';

test('export-failed writes a large message a slice at a time: 20 MB in a 48 MB heap', async () => {
  const upstream = await startUpstream({ onRcptTo: (_address, _session, cb) => cb(Object.assign(new Error('5.1.1 no such user'), { responseCode: 550 })) });
  const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port }, { startDelivery: false, startRetention: false });
  const dir = tempDir('relayq-cli-');
  try {
    const line = `${'a'.repeat(76)}\r\n`;
    const raw = Buffer.from(`Subject: large\r\n\r\n${line.repeat(Math.ceil((20 * 1024 * 1024) / line.length))}`);
    const id = queuedId((await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['nobody@example.com'], raw })).response);
    await relay.delivery.runOnce();
    const stored = messageRaw(relay.store.sqlite, id) as { raw: Buffer };
    await relay.stop();
    // as one string, and then inside the document's, the base64 alone would take 2 × 28 MB of heap
    const target = path.join(dir, 'export');
    const r = await runCli(['export-failed', target, '--json'], {
      env: { DATABASE_PATH: relay.config.databasePath, EMAILS_DIR: relay.config.emailsDir, NODE_OPTIONS: '--max-old-space-size=48' },
      timeoutMs: 60_000,
    });
    assert.equal(r.code, 0, r.stderr.slice(0, 2000));
    assert.equal(JSON.parse(r.stdout).exported, 1);
    const text = fs.readFileSync(path.join(target, `${id}.json`), 'utf8');
    const doc = JSON.parse(text);
    assert.ok(Buffer.from(doc.raw, 'base64').equals(stored.raw), 'the stored bytes');
    // the same document JSON.stringify would have written in one piece
    assert.equal(text, `${JSON.stringify(doc, null, 2)}\n`);
    assert.deepEqual(Object.keys(doc).slice(-2), ['exportedAt', 'raw']);
  } finally {
    await relay.stop();
    await upstream.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('delete and retry leave alone a message a delivery worker holds (exit 1, nothing changed)', async () => {
  const upstream = await startScriptedUpstream();
  upstream.hold = () => true; // DATA is never answered: the attempt holds its claim until its deadline
  // a lease long enough for two CLI processes to start on a busy machine; the stop ends the attempt
  const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, processingTimeout: 300 }, { startDelivery: false, startRetention: false });
  let attempt: Promise<unknown> = Promise.resolve();
  try {
    const id = queuedId((await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['held@example.com'] })).response);
    attempt = relay.delivery.runOnce();
    await waitFor(() => upstream.held.length === 1, 10_000, 'the attempt in DATA');
    const env = { DATABASE_PATH: relay.config.databasePath, EMAILS_DIR: relay.config.emailsDir };
    const [deleted, retried] = await Promise.all([runCli(['delete', id], { env }), runCli(['retry', id], { env })]);
    assertOneLineError(deleted, /^relayq: message \S+: a delivery worker holds it: .*; nothing deleted, try again later$/);
    assert.equal(retried.code, 1, retried.stderr);
    assert.match(retried.stdout, /a delivery worker holds it: .*; nothing changed/);
    const row = relay.store.sqlite.prepare('SELECT state, lease_token IS NOT NULL AS leased FROM messages WHERE id = ?').get(id);
    assert.deepEqual(row, { state: 'sending', leased: 1 });
  } finally {
    await relay.stop();
    await attempt;
    await upstream.close();
  }
});

test('status: the oldest waiting message with its age; a queue page of bounces keeps --sender \'\' in its next-page command', async () => {
  // received three hours ago by the relay's clock
  const relay = await startTestRelay({}, { clock: new ManualClock(Date.now() - 3 * 3600_000), startDelivery: false, startRetention: false });
  try {
    const bounces: string[] = [];
    for (let i = 0; i < 2; i++) bounces.push(queuedId((await sendMail(relay.smtpPort, { from: '', to: [`postmaster${i}@example.com`] })).response));
    await sendMail(relay.smtpPort, { from: 'app@example.com' });
    const db = ['--databasePath', relay.config.databasePath];
    const status = await runCli(['status', ...db]);
    assert.equal(status.code, 0, status.stderr);
    assert.match(status.stdout, /^oldest waiting: .* \(3h ago\)$/m);
    // nothing finished, nothing attempted yet
    assert.match(status.stdout, /^avg processing: -$/m);
    assert.match(status.stdout, /^upstream ok: +-$/m);
    const first = await runCli(['queue', '--sender', '', '--limit', '1', ...db]);
    assert.equal(first.code, 0, first.stderr);
    const more = /^more: relayq (.*)$/m.exec(first.stdout);
    assert.ok(more, first.stdout);
    assert.match(more[1], / --sender '' /);
    const next = await runCli(more[1].split(' ').map((arg) => (arg === "''" ? '' : arg)));
    assert.equal(next.code, 0, next.stderr);
    const listed = [first.stdout, next.stdout].map((out) => bounces.find((id) => out.includes(id)));
    assert.deepEqual(listed.sort(), [...bounces].sort(), 'each page one bounce, and no other sender');
    assert.ok(!next.stdout.includes('app@example.com'));
  } finally {
    await relay.stop();
  }
});

test('status: each line shows its own numbers, the upstream\'s last success and failure and the refusals by reason, aligned', async () => {
  const upstream = await startScriptedUpstream();
  upstream.rcptReply = (address) => (address.startsWith('later') ? { code: 451, message: '4.3.0 try again later' } : undefined);
  const clock = new ManualClock(Date.now() - 2 * 3600_000);
  const relay = await startTestRelay(
    {
      forwardSMTP: true,
      forwardHost: '127.0.0.1',
      forwardPort: upstream.port,
      failedRetryInterval: 0,
      inFlowDelay: 0,
      queueSize: 1,
      rateLimits: { enabled: true, maxPerHour: 1 },
    },
    { clock, startDelivery: false, startRetention: false },
  );
  try {
    // delivered 1.5 s after it came, so the upstream's last success
    await sendMail(relay.smtpPort, { from: 'a@example.com', to: ['ok@example.com'] });
    clock.advance(1500);
    await relay.delivery.runOnce();
    for (let i = 0; i < 2; i++) await assert.rejects(sendMail(relay.smtpPort, { from: 'a@example.com' }), /451/);
    // a minute later: two recipients deferred, the last failure; the queue is full with it
    clock.advance(60_000);
    const waiting = queuedId((await sendMail(relay.smtpPort, { from: 'b@example.com', to: ['later1@example.com', 'later2@example.com'] })).response);
    await assert.rejects(sendMail(relay.smtpPort, { from: 'c@example.com' }), /452/);
    await relay.delivery.runOnce();
    // refusals are counted in a write of their own, after the reply
    await waitFor(
      () => {
        const m = storeMetrics(relay.store.sqlite);
        return m.rateLimitRefusals === 2 && m.queueFullRefusals === 1;
      },
      10_000,
      'the refusals counted',
    );
    const db = ['--databasePath', relay.config.databasePath];
    const [json, text, forever] = await Promise.all([
      runCliJson<{ total_bytes: number; upstream: { last_success: string; last_failure: string; consecutive_failures: number } }>(['status', ...db]),
      runCli(['status', ...db]),
      runCli(['status', ...db, '--retention.deliveredDays', '0']),
    ]);
    assert.equal(text.code, 0, text.stderr);
    const time = (iso: string) => iso.replace('T', ' ').replace(/\.\d{3}Z$/, 'Z');
    const received = relay.store.sqlite.prepare('SELECT received_at FROM messages WHERE id = ?').pluck().get(waiting) as number;
    assert.notEqual(json.upstream.last_success, json.upstream.last_failure);
    const lines = text.stdout.trimEnd().split('\n');
    assert.match(lines[0], /^database: {7}\S+relayq\.db \(\d+(\.\d)? [KM]?i?B, WAL \d+(\.\d)? [KM]?i?B\)$/);
    assert.match(lines[5], new RegExp(`^oldest waiting: ${time(new Date(received).toISOString())} \\(\\d+[smhd] ago\\)$`));
    assert.deepEqual(
      [...lines.slice(1, 5), ...lines.slice(6)],
      [
        'queued:         1 (1 tried before)',
        'sending:        0',
        'delivered:      1 (kept 7 days)',
        'failed:         0 (kept until retried or deleted)',
        `accepted:       2 messages, 3 recipients, ${json.total_bytes} B`,
        'finished:       1 delivered, 0 failed, 0 requeued after failing (lifetime)',
        'avg processing: 1500 ms',
        'attempts:       1 delivered, 0 partial, 1 deferred, 0 failed',
        `upstream ok:    ${time(json.upstream.last_success)}`,
        `upstream error: ${time(json.upstream.last_failure)} (1 failed attempt in a row)`,
        'refused:        2 over a rate limit, 1 queue full, 0 disk low',
      ],
    );
    assert.match(forever.stdout, /^delivered: +1 \(kept forever\)$/m);

    // the deferred message goes out at its retry: nothing waits, and the failures in a row are over
    upstream.rcptReply = () => undefined;
    clock.advance(3600_000);
    await relay.delivery.runOnce();
    const idle = await runCli(['status', ...db]);
    assert.equal(idle.code, 0, idle.stderr);
    assert.match(idle.stdout, /^oldest waiting: none$/m);
    assert.match(idle.stdout, /^upstream error: .* \(0 failed attempts in a row\)$/m);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('queue: numbers right-aligned under their headers, a sender past 40 and an error past 60 characters cut with …, a next attempt for queued mail only, <> for the null sender', async () => {
  const upstream = await startScriptedUpstream();
  upstream.rcptReply = (address) => (address.startsWith('refused') ? { code: 550, message: `5.1.1 ${'this mailbox is unknown here; '.repeat(3)}` } : undefined);
  const relay = await startTestRelay({ forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port }, { startDelivery: false, startRetention: false });
  try {
    // 41 characters: one more than the column shows
    const longSender = `${'s'.repeat(29)}@example.com`;
    const send = (from: string, to: string[]) => sendMail(relay.smtpPort, { from, to }).then((i) => queuedId(i.response));
    const failed = await send(longSender, Array.from({ length: 10 }, (_, i) => `refused${i}@example.com`));
    const delivered = await send('', ['postmaster@example.com']);
    await relay.delivery.runOnce();
    const queued = await send('', ['postmaster@example.com']);
    const db = ['--databasePath', relay.config.databasePath];
    const [table, firstPage, none] = await Promise.all([
      runCli(['queue', ...db]),
      runCli(['queue', ...db, '--recipient', 'postmaster@example.com', '--limit', '1']),
      runCli(['queue', ...db, '--state', 'sending']),
    ]);
    assert.equal(table.code, 0, table.stderr);
    assert.deepEqual([none.code, none.stdout], [0, 'no messages\n']);

    const [header, ...rows] = table.stdout.trimEnd().split('\n');
    const headers = ['ID', 'STATE', 'FROM', 'RCPTS', 'SIZE', 'RECEIVED', 'NEXT ATTEMPT', 'TRIES', 'LAST ERROR'];
    assert.match(header, new RegExp(`^${headers.join(' +')}$`));
    // each cell under its header: from where the header starts to where the next one does
    const cells = (line: string) =>
      Object.fromEntries(headers.map((h, i) => [h, line.slice(header.indexOf(h), i + 1 < headers.length ? header.indexOf(headers[i + 1]) : undefined).trimEnd()]));
    const row = (id: string) => {
      const line = rows.find((l) => l.startsWith(`${id} `));
      assert.ok(line, `${id} in\n${table.stdout}`);
      return cells(line);
    };
    const stored = (id: string) =>
      relay.store.sqlite.prepare('SELECT size, received_at, next_attempt_at, last_error FROM messages WHERE id = ?').get(id) as {
        size: number;
        received_at: number;
        next_attempt_at: number;
        last_error: string | null;
      };
    const time = (ms: number) => new Date(ms).toISOString().replace('T', ' ').replace(/\.\d{3}Z$/, 'Z');
    const lastError = stored(failed).last_error ?? '';
    assert.ok(lastError.length > 60, lastError);
    assert.ok(Math.max(...[failed, delivered, queued].map((id) => stored(id).size)) < 10_000, 'sizes fit under SIZE');
    // numbers narrower than their header end where the header ends
    assert.deepEqual(row(failed), {
      ID: failed,
      STATE: 'failed',
      FROM: `${longSender.slice(0, 39)}…`,
      RCPTS: '   10',
      SIZE: String(stored(failed).size).padStart(4),
      RECEIVED: time(stored(failed).received_at),
      'NEXT ATTEMPT': '-',
      TRIES: '    1',
      'LAST ERROR': `${lastError.slice(0, 59)}…`,
    });
    assert.deepEqual(row(delivered), {
      ID: delivered,
      STATE: 'delivered',
      FROM: '<>',
      RCPTS: '    1',
      SIZE: String(stored(delivered).size).padStart(4),
      RECEIVED: time(stored(delivered).received_at),
      'NEXT ATTEMPT': '-',
      TRIES: '    1',
      'LAST ERROR': '-',
    });
    assert.deepEqual(row(queued), {
      ID: queued,
      STATE: 'queued',
      FROM: '<>',
      RCPTS: '    1',
      SIZE: String(stored(queued).size).padStart(4),
      RECEIVED: time(stored(queued).received_at),
      'NEXT ATTEMPT': time(stored(queued).next_attempt_at),
      TRIES: '    0',
      'LAST ERROR': '-',
    });

    // the next page keeps --recipient, and lists the other message to that address
    assert.equal(firstPage.code, 0, firstPage.stderr);
    const more = /^more: relayq (.*)$/m.exec(firstPage.stdout);
    assert.ok(more, firstPage.stdout);
    assert.match(more[1], / --recipient postmaster@example\.com --limit 1 --before \S+$/);
    const next = await runCli(more[1].split(' '));
    assert.equal(next.code, 0, next.stderr);
    const listed = [firstPage.stdout, next.stdout].map((out) => [delivered, queued].filter((id) => out.includes(id)));
    assert.deepEqual(listed, [[queued], [delivered]]);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('export-failed writes every failed message past the first 500, and --json names each file; queue shows 50 by default and takes --limit up to 100000', async () => {
  const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false, startRetention: false });
  try {
    // one more than a page of the export's reads, written straight into the database
    const ids = await writeDirect(relay, (db) => {
      const made: string[] = [];
      for (let i = 0; i < 501; i++) {
        const id = `FAILED${String(i).padStart(14, '0')}`;
        insertMessage(db, newMessage({ id, raw: Buffer.from(`Subject: ${i}\r\n\r\nfailed\r\n`), receivedAt: 1000 + i }), NO_LIMITS);
        made.push(id);
      }
      db.prepare("UPDATE messages SET state = 'failed', finished_at = received_at").run();
      return made;
    });
    const db = ['--databasePath', relay.config.databasePath];
    const target = path.join(tempDir('relayq-cli-'), 'export');
    const [exported, page, limits] = await Promise.all([
      runCliJson<{ directory: string; exported: number; files: string[] }>(['export-failed', target, ...db]),
      runCli(['queue', ...db]),
      Promise.all(['0', '100001', '1.5'].map((n) => runCli(['queue', ...db, '--limit', n]))),
    ]);
    const files = ids.map((id) => path.join(target, `${id}.json`));
    assert.deepEqual({ ...exported, files: [...exported.files].sort() }, { directory: target, exported: 501, files });
    assert.deepEqual(fs.readdirSync(target).sort(), ids.map((id) => `${id}.json`));
    assert.equal(JSON.parse(fs.readFileSync(files[0], 'utf8')).id, ids[0], 'the oldest, on the second page, too');

    assert.equal(page.code, 0, page.stderr);
    const lines = page.stdout.trimEnd().split('\n');
    assert.deepEqual(
      lines.slice(1, -1).map((l) => l.slice(0, 20)),
      ids.slice(-50).reverse(),
      'the newest 50',
    );
    assert.match(lines.at(-1) ?? '', / --limit 50 --before \S+$/);
    for (const [i, n] of ['0', '100001', '1.5'].entries()) {
      assertOneLineError(limits[i], new RegExp(`^relayq: option '--limit <n>' argument '${n.replace('.', '\\.')}' is invalid\\. must be an integer from 1 to 100000$`));
    }
    const all = await runCliJson<{ messages: unknown[]; next_before: string | null }>(['queue', ...db, '--limit', '100000']);
    assert.deepEqual([all.messages.length, all.next_before], [501, null]);
  } finally {
    await relay.stop();
  }
});

test('retry ID... with an unknown id changes nothing; retry and delete --json answer each id once; retry says what it did in words', async () => {
  const upstream = await startScriptedUpstream();
  upstream.rcptReply = () => ({ code: 550, message: '5.1.1 no such user' });
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, failedRetryInterval: 0 },
    { startDelivery: false, startRetention: false },
  );
  try {
    const send = () => sendMail(relay.smtpPort, { from: 'app@example.com', to: ['nobody@example.com'] }).then((i) => queuedId(i.response));
    const failed = [await send(), await send()];
    await relay.delivery.runOnce();
    const queued = await send();
    const state = (id: string) => relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(id);
    assert.deepEqual(failed.map(state), ['failed', 'failed']);
    const db = ['--databasePath', relay.config.databasePath];

    // all or nothing: the known id before the unknown one is left failed
    assertOneLineError(await runCli(['retry', failed[0], 'NOSUCHID', ...db]), /^relayq: no message with id NOSUCHID; nothing changed$/);
    assert.equal(state(failed[0]), 'failed');
    const nothing = await runCli(['retry', ...db]);
    assertOneLineError(nothing, /^relayq: give one or more message ids, --failed to requeue every failed message, or --queued to make every queued one due now$/);
    assert.deepEqual([nothing.code, nothing.stdout], [1, '']);

    const retried = await runCliJson(['retry', failed[0], queued, failed[0], ...db]);
    assert.deepEqual(retried, {
      results: [
        { id: failed[0], result: 'requeued' },
        { id: queued, result: 'due-now' },
      ],
    });
    assert.equal(state(failed[0]), 'queued');
    const [table, rest] = await Promise.all([runCli(['retry', queued, ...db]), runCli(['retry', '--failed', ...db])]);
    assert.deepEqual([table.code, table.stdout], [0, `ID                    RESULT\n${queued}  due now\n`]);
    assert.deepEqual([rest.code, rest.stdout], [0, 'requeued 1 failed message\n']);

    const deleted = await runCliJson(['delete', queued, failed[1], queued, ...db]);
    assert.deepEqual(deleted, { deleted: [queued, failed[1]] });
    assert.deepEqual([queued, failed[1]].map(state), [undefined, undefined]);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('show of a message whose content was erased after delivery says so, and show --raw refuses it in one line; show names a client\'s SMTPUTF8', async () => {
  const relay = await startTestRelay({ security: { logAllEmails: false } }, { startRetention: false });
  try {
    const id = queuedId((await sendMail(relay.smtpPort)).response);
    // nodemailer asks for SMTPUTF8 for a UTF-8 address
    const utf8 = queuedId((await sendMail(relay.smtpPort, { from: 'jörg@example.com' })).response);
    await waitFor(() => relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(id) === 'delivered', 10_000, 'the local delivery');
    const db = ['--databasePath', relay.config.databasePath];
    const [text, raw, utf8Text] = await Promise.all([runCli(['show', id, ...db]), runCli(['show', id, '--raw', ...db]), runCli(['show', utf8, ...db])]);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /^from: +sender@example\.com$/m);
    assert.match(utf8Text.stdout, /^from: +jörg@example\.com \(SMTPUTF8\)$/m);
    assert.match(text.stdout, /^size: +\d+ bytes \(content erased after delivery\)$/m);
    assertOneLineError(raw, new RegExp(`^relayq: message ${id} has no stored content \\(erased after delivery: security\\.logAllEmails is false\\)$`));
    assert.equal(raw.stdout, '');
  } finally {
    await relay.stop();
  }
});

test('a read command waits for a lock another connection holds on the database (busy timeout), instead of failing at once', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const file = relay.config.databasePath;
  await sendMail(relay.smtpPort);
  await relay.stop();
  // a connection in exclusive locking mode keeps every other one out once it has written
  const holder = openConnection(file);
  holder.pragma('locking_mode = EXCLUSIVE');
  holder.exec('BEGIN IMMEDIATE; UPDATE counters SET value = value WHERE 0; COMMIT');
  const child = spawn(process.execPath, cliArgs('status', '--json', '--databasePath', file), { cwd: CLI_CWD, env: cleanEnv() });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  try {
    // it has opened the database and is waiting for the lock (or failed on it)
    const fds = `/proc/${child.pid}/fd`;
    const opened = () => {
      try {
        return fs.readdirSync(fds).some((fd) => fs.readlinkSync(path.join(fds, fd)) === file);
      } catch {
        return child.exitCode !== null;
      }
    };
    await waitFor(opened, 60_000, 'the command to open the database');
    await new Promise((r) => setTimeout(r, 300));
  } finally {
    holder.pragma('locking_mode = NORMAL');
    holder.prepare('SELECT count(*) FROM messages').get(); // a read lets the exclusive lock go
    holder.close();
  }
  assert.equal(await exited, 0, stderr);
  assert.equal((JSON.parse(stdout) as { total_emails: number }).total_emails, 1);
});

test('retry --queued makes queued mail due now, past its backoff (postqueue -f); --sender narrows it', async () => {
  const upstream = await startScriptedUpstream();
  upstream.rcptReply = () => ({ code: 451, message: '4.3.0 try again later' });
  const clock = new ManualClock(Date.now());
  const relay = await startTestRelay(
    // batchDelay 0 (the CLI's too, below): due at the CLI's now, however soon after the attempt it runs
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchDelay: 0, retry: { initialDelay: 3600 } },
    { clock, startDelivery: false, startRetention: false },
  );
  try {
    const from = (sender: string) => sendMail(relay.smtpPort, { from: sender, to: [`rcpt@${sender.split('@')[1]}`] }).then((i) => queuedId(i.response));
    const fromA = [await from('a@one.example'), await from('A@one.example')];
    const fromB = await from('b@two.example');
    await relay.delivery.runOnce();
    const dueAt = (id: string) => relay.store.sqlite.prepare('SELECT next_attempt_at FROM messages WHERE id = ?').pluck().get(id) as number;
    for (const id of [...fromA, fromB]) assert.ok(dueAt(id) > Date.now() + 3000_000, 'deferred for about an hour');
    const db = ['--databasePath', relay.config.databasePath, '--batchDelay', '0'];

    const some = await runCli(['retry', '--queued', '--sender', 'a@ONE.example', ...db]);
    assert.equal(some.code, 0, some.stderr);
    assert.equal(some.stdout.trim(), '2 queued messages are due now');
    for (const id of fromA) assert.ok(dueAt(id) <= Date.now(), 'due now');
    assert.ok(dueAt(fromB) > Date.now() + 3000_000, 'another sender still waits');

    const all = await runCliJson<{ due_now: number }>(['retry', '--queued', ...db]);
    assert.equal(all.due_now, 3);
    assert.ok(dueAt(fromB) <= Date.now());

    // a message that fails between the read of its page and the write is left failed, attempts and all
    const failing = await from('c@three.example');
    await relay.delivery.runOnce();
    const flushed = await flushQueuedInSteps(relay.store.sqlite, 'c@three.example', async (ids) => {
      assert.deepEqual(ids, [failing]);
      await writeDirect(relay, (sqlite) => {
        sqlite.prepare("UPDATE messages SET state = 'failed', finished_at = ? WHERE id = ?").run(Date.now(), failing);
        sqlite.prepare("UPDATE recipients SET status = 'failed' WHERE message_id = ?").run(failing);
      });
      return writeDirect(relay, (sqlite) => ids.filter((id) => queuedDueNow(sqlite, id, Date.now(), 0)).length);
    });
    assert.equal(flushed, 0);
    assert.deepEqual(relay.store.sqlite.prepare('SELECT m.state, r.status, r.attempts FROM messages m JOIN recipients r ON r.message_id = m.id WHERE m.id = ?').get(failing), {
      state: 'failed',
      status: 'failed',
      attempts: 1,
    });
    // the relay's clock catches up with the CLI's: every message goes out at the next run
    upstream.rcptReply = () => undefined;
    clock.set(Date.now());
    await relay.delivery.runOnce();
    assert.deepEqual(upstream.accepted.map((t) => t.to[0]).sort(), ['rcpt@one.example', 'rcpt@one.example', 'rcpt@two.example'], 'not the failed one');

    const both = await runCli(['retry', '--queued', '--failed', ...db]);
    assertOneLineError(both, /^relayq: give --failed or --queued, not both$/);
    const withIds = await runCli(['retry', '--queued', fromB, ...db]);
    assertOneLineError(withIds, /^relayq: give message ids or --queued, not both$/);
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test("the package's bin runs as a command of its own (what npm link puts on the PATH), also after a fresh build", () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string; bin: { relayq: string } };
  const out = execFileSync(path.join(REPO_ROOT, pkg.bin.relayq), ['--version'], { cwd: CLI_CWD, env: cleanEnv(), encoding: 'utf8' });
  assert.equal(out.trim(), pkg.version);
});

test('retry and delete of more ids than one write takes go in steps; a step that fails ends them there, after they have said what the steps before did', async () => {
  const relay = await startTestRelay({ queueSize: 0 }, { startDelivery: false, startRetention: false });
  const env = { DATABASE_PATH: relay.config.databasePath, EMAILS_DIR: relay.config.emailsDir };
  try {
    const ids = await insertMessages(relay, 4 * ADMIN_STEP, 'failed');
    // one delivered meanwhile, which retry leaves (exit 1)
    await writeDirect(relay, (db) => db.prepare("UPDATE messages SET state = 'delivered' WHERE id = ?").run(ids[7]));
    fs.mkdirSync(path.dirname(failedExportPath(relay.config.emailsDir, ids[0])), { recursive: true });
    for (const id of ids) fs.writeFileSync(failedExportPath(relay.config.emailsDir, id), '{}');
    const state = (id: string) => relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(id);
    const stored = () => relay.store.sqlite.prepare('SELECT count(*) FROM messages').pluck().get() as number;
    // the third step's write fails, as one that meets a full disk would
    const third = ids[2 * ADMIN_STEP];
    const failThirdStep = (action: 'UPDATE' | 'DELETE', row: 'NEW' | 'OLD') =>
      writeDirect(relay, (db) =>
        db.exec(`DROP TRIGGER IF EXISTS fail_third_step; CREATE TRIGGER fail_third_step BEFORE ${action} ON messages WHEN ${row}.id = '${third}' BEGIN
          SELECT RAISE(ABORT, 'no room left'); END`),
      );
    const stoppedThere = (done: string) =>
      new RegExp(`^relayq: no room left; stopped at ${third}: it and the ids after it were not ${done} \\(what was done before it is listed above\\)$`, 'm');

    await failThirdStep('UPDATE', 'NEW');
    const stopped = await runCli(['--json', 'retry', ...ids], { env });
    assert.equal(stopped.code, 1);
    assert.match(stopped.stderr, stoppedThere('retried'));
    assert.deepEqual(
      (JSON.parse(stopped.stdout) as { results: unknown[] }).results,
      ids.slice(0, 2 * ADMIN_STEP).map((id, i) => ({ id, result: i === 7 ? 'delivered' : 'requeued' })),
    );
    assert.deepEqual([state(ids[2 * ADMIN_STEP - 1]), state(third)], ['queued', 'failed']);
    await writeDirect(relay, (db) => db.exec('DROP TRIGGER fail_third_step'));
    const retried = await runCli(['--json', 'retry', ...ids], { env });
    assert.equal(retried.code, 1, retried.stderr);
    assert.deepEqual(
      (JSON.parse(retried.stdout) as { results: unknown[] }).results,
      ids.map((id, i) => ({ id, result: i === 7 ? 'delivered' : i < 2 * ADMIN_STEP ? 'due-now' : 'requeued' })),
    );
    assert.deepEqual([...new Set(ids.filter((_, i) => i !== 7).map(state))], ['queued']);

    // a worker claims ids[5] after delete has checked the list, while its first step runs
    await writeDirect(relay, (db) =>
      db.exec(`CREATE TRIGGER claim_meanwhile AFTER DELETE ON messages WHEN OLD.id = '${ids[0]}' BEGIN
        UPDATE messages SET state = 'sending', lease_expires_at = ${Date.now() + 3600_000} WHERE id = '${ids[5]}'; END`),
    );
    await failThirdStep('DELETE', 'OLD');
    const r = await runCli(['--json', 'delete', ...ids], { env });
    assert.equal(r.code, 1);
    assert.match(r.stderr, stoppedThere('deleted'));
    // what the steps before did, as the command says at its end: all deleted but the one claimed
    const said = JSON.parse(r.stdout) as { deleted: string[]; warnings: string[] };
    assert.deepEqual(said.deleted, ids.slice(0, 2 * ADMIN_STEP).filter((id) => id !== ids[5]));
    assert.deepEqual(said.warnings, [`message ${ids[5]}: ${HELD}; not deleted, try again later`]);
    assert.match(r.stderr, new RegExp(`^relayq: warning: message ${ids[5]}: a delivery worker holds it`, 'm'));
    assert.equal(stored(), ids.length - 2 * ADMIN_STEP + 1);
    assert.deepEqual([state(ids[5]), state(ids[2 * ADMIN_STEP - 1]), state(third)], ['sending', undefined, 'queued']);
    // the exports of the messages deleted went with them; the others stay
    const exported = (id: string) => fs.existsSync(failedExportPath(relay.config.emailsDir, id));
    assert.deepEqual(
      ids.filter(exported),
      ids.filter((id, i) => i >= 2 * ADMIN_STEP || id === ids[5]),
    );

    // claimed meanwhile with every step written: the others are deleted, and still exit 1
    const last = ids[ids.length - 1];
    await writeDirect(relay, (db) =>
      db.exec(`DROP TRIGGER fail_third_step; DROP TRIGGER claim_meanwhile;
        CREATE TRIGGER claim_meanwhile AFTER DELETE ON messages WHEN OLD.id = '${third}' BEGIN
        UPDATE messages SET state = 'sending', lease_expires_at = ${Date.now() + 3600_000} WHERE id = '${last}'; END`),
    );
    const rest = await runCli(['--json', 'delete', ...ids.slice(2 * ADMIN_STEP)], { env });
    assert.equal(rest.code, 1, rest.stderr);
    assert.deepEqual(JSON.parse(rest.stdout), { deleted: ids.slice(2 * ADMIN_STEP, -1), warnings: [`message ${last}: ${HELD}; not deleted, try again later`] });
    assert.equal(stored(), 2);
  } finally {
    await relay.stop();
  }
});

test("a bad value in a key the CLI does not read is a warning to its commands, which still work; serve and a key they read still refuse it", async () => {
  const dir = tempDir();
  const databasePath = path.join(dir, 'relayq.db');
  await (await openStore(databasePath)).close();
  // as an operator edits the config for the next restart, and takes a backup first
  const config = writeConfigFile(dir, { databasePath, emailsDir: path.join(dir, 'emails'), forwardSMTP: true, forwardHost: 'smtp.example.com:587' });
  const bad = 'forwardHost: must be a host name';
  const status = await runCli(['status', '--config', config]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stderr, new RegExp(`^relayq: warning: config error \\(file ${config}\\): ${bad}.* \\(this command does not read it; serve refuses it\\)\\n$`));
  const backup = await runCli(['backup', path.join(dir, 'copy.db'), '--config', config]);
  assert.equal(backup.code, 0, backup.stderr);
  assert.ok(fs.existsSync(path.join(dir, 'copy.db')));
  const serve = await runCli(['serve', '--config', config, '--smtpPort', '0', '--healthCheckPort', '0']);
  assert.equal(serve.code, 2);
  assert.match(serve.stderr, new RegExp(bad));
  // so is a name the file misspells in a section the commands read nothing of
  const sections = writeConfigFile(dir, { databasePath, tls: { crt: 'x' }, rateLimits: 'on' });
  const inSections = await runCli(['status', '--config', sections]);
  assert.equal(inSections.code, 0, inSections.stderr);
  assert.deepEqual(
    inSections.stderr.trimEnd().split('\n').map((line) => /^relayq: warning: config error \(file .*\): ([\w.]+): .*\(this command does not read it; serve refuses it\)$/.exec(line)?.[1]),
    ['tls.crt', 'rateLimits'],
  );
  // a key the commands read, or a name the file misspells where it may be one (databasePath, or
  // in a section they read), still stops them
  const misspelt = writeConfigFile(dir, { databasPath: databasePath });
  assertOneLineError(await runCli(['status', '--config', misspelt]), /databasPath.*did you mean databasePath/);
  const inRead = writeConfigFile(dir, { databasePath, retention: { deliverdDays: 3 } });
  assertOneLineError(await runCli(['status', '--config', inRead]), /retention\.deliverdDays: unknown key/);
  const badDelay = writeConfigFile(dir, { databasePath, batchDelay: 'soon' });
  assertOneLineError(await runCli(['retry', '--queued', '--config', badDelay]), /batchDelay: must be an integer/);
  // stopped by a key it reads, a command lists every bad key, as serve does
  const both = await runCli(['retry', '--queued', '--config', writeConfigFile(dir, { databasePath, batchDelay: 'soon', workerCount: 0 })]);
  assert.equal(both.code, 2);
  assert.deepEqual(
    both.stderr.trimEnd().split('\n').map((line) => /^relayq: config error \(file .*\): (\w+): /.exec(line)?.[1]),
    ['batchDelay', 'workerCount'],
  );
  for (const key of CLI_READS) assert.ok(CONFIG_KEYS.some((k) => k.path === key), key);
});

test('a write command on a stopped relay\'s database closes it, refused or not: no -wal or -shm is left behind', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const ids: string[] = [];
  try {
    for (let i = 0; i < 2; i++) ids.push(queuedId((await sendMail(relay.smtpPort, { from: 'app@example.com', to: [`r${i}@example.com`] })).response));
  } finally {
    await relay.stop();
  }
  const db = relay.config.databasePath;
  const sideFiles = () => [fs.existsSync(`${db}-wal`), fs.existsSync(`${db}-shm`)];
  assert.deepEqual(sideFiles(), [false, false], "the relay's stop removed them");
  const env = { DATABASE_PATH: db, EMAILS_DIR: relay.config.emailsDir };
  // the refused ones exit 1 after the connection's close, which checkpoints the WAL into the file
  const commands: Array<[string[], number]> = [
    [['delete', ids[0]], 0],
    [['retry', '--queued'], 0],
    [['delete', '1A22AF1C0B4CA8658AC5'], 1],
    [['retry', ids[0]], 1],
  ];
  for (const [args, code] of commands) {
    const run = await runCli(args, { env });
    assert.equal(run.code, code, run.stderr);
    assert.deepEqual(sideFiles(), [false, false], args.join(' '));
  }
});

test('a write command given a second hard link of a running relay\'s database is refused before it opens it: nothing changed, no WAL beside that name', async () => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const dir = tempDir('relayq-hard-link-cli-');
  const hardLink = path.join(dir, 'hard.db');
  try {
    const id = queuedId((await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['a@example.com'] })).response);
    fs.linkSync(relay.config.databasePath, hardLink);
    for (const args of [['retry', '--queued'], ['delete', id]]) {
      const run = await runCli([...args, '--databasePath', hardLink]);
      assertOneLineError(run, /hard\.db has 2 hard links: SQLite keeps a WAL beside each name/);
    }
    assert.deepEqual(fs.readdirSync(dir), ['hard.db'], 'nothing made beside the second name: no -wal, no -shm');
    assert.equal(relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(id), 'queued');
  } finally {
    fs.rmSync(hardLink, { force: true });
    await relay.stop();
  }
});
