// The CLI on the database of one running relay, shared by the tests of this file.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import type { Relay } from '../../src/main.js';
import { requireDatabaseFile, withReader } from '../../src/cli/context.js';
import { defaultConfig } from '../../src/config/schema.js';
import { openConnection, openStore } from '../../src/store/db.js';
import { ADMIN_STEP } from '../../src/store/admin.js';
import { lockDatabase } from '../../src/store/maintenance.js';
import { messageRaw, storeMetrics } from '../../src/store/queries.js';
import { databaseAtMigration, insertMessages, rollbackJournalCopy, sendMail, startTestRelay, startUpstream, tempDir, type Upstream, whileImmutable, writeDirect } from '../helpers.js';
import { assertOneLineError, CLI_CWD, queuedId, runCli, runCliJson, writeConfigFile } from './run-cli.js';

describe('relayq CLI on the database of a running relay', () => {
  let relay: Relay;
  let upstream: Upstream;
  let rejectRecipient: (address: string) => boolean = (a) => a.startsWith('bad');
  let configFile: string;
  let dir: string;
  const ids = { delivered: [] as string[], mixed: [] as string[], allBad: [] as string[], queued: [] as string[] };
  const cli = (...args: string[]) => runCli(['--config', configFile, ...args]);
  const cliJson = <T>(...args: string[]) => runCliJson<T>(['--config', configFile, ...args]);

  before(async () => {
    upstream = await startUpstream({
      onRcptTo(address, _session, cb) {
        if (rejectRecipient(address.address)) cb(Object.assign(new Error('5.1.1 no such user'), { responseCode: 550 }));
        else cb();
      },
    });
    relay = await startTestRelay(
      { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, batchDelay: 0 },
      { startDelivery: false, startRetention: false },
    );
    dir = tempDir('relayq-cli-');
    configFile = writeConfigFile(dir, { databasePath: relay.config.databasePath, emailsDir: relay.config.emailsDir });
    const send = (to: string[]) => sendMail(relay.smtpPort, { from: 'app@example.com', to }).then((i) => queuedId(i.response));
    ids.delivered = await Promise.all([1, 2, 3, 4].map((i) => send([`ok${i}@example.com`])));
    ids.mixed = await Promise.all([1, 2, 3].map((i) => send([`ok-mixed${i}@example.com`, `bad-mixed${i}@example.com`])));
    ids.allBad = await Promise.all([1, 2].map((i) => send([`bad${i}@example.com`])));
    await relay.delivery.runOnce();
    ids.queued = await Promise.all([1, 2].map((i) => send([`later${i}@example.com`])));
  });

  after(async () => {
    await relay.stop();
    await upstream.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('status --json reports the numbers of GET /metrics and of the rows themselves', async () => {
    const [status, metrics] = await Promise.all([
      cliJson<Record<string, unknown>>('status'),
      fetch(`http://127.0.0.1:${relay.httpPort}/metrics`).then((r) => r.json() as Promise<Record<string, unknown>>),
    ]);
    assert.deepEqual(status.queue, { queued: 2, sending: 0, delivered: 4, failed: 5 });
    const byState = Object.fromEntries(
      (relay.store.sqlite.prepare('SELECT state, COUNT(*) AS n FROM messages GROUP BY state').all() as Array<{ state: string; n: number }>).map(
        (r) => [r.state, r.n],
      ),
    );
    assert.deepEqual(status.queue, { queued: 0, sending: 0, delivered: 0, failed: 0, ...byState });
    for (const key of [
      'total_emails',
      'successful_emails',
      'failed_emails',
      'requeued_emails',
      'total_recipients',
      'total_bytes',
      'avg_processing_time_ms',
      'queue',
      'deferred_emails',
      'rate_limit_refusals',
      'queue_full_refusals',
      'disk_low_refusals',
      'attempts',
      'success_rate',
      'attempt_duration_ms',
    ]) {
      assert.deepEqual(status[key], metrics[key], `status.${key} equals /metrics ${key}`);
    }
    assert.equal(status.total_emails, 11);
    assert.equal(status.successful_emails, storeMetrics(relay.store.sqlite).messagesDelivered);

    // the files as they are (the relay is idle between tests)
    const database = status.database as { bytes: number; wal_bytes: number };
    assert.deepEqual(database, {
      ...database,
      bytes: fs.statSync(relay.config.databasePath).size,
      wal_bytes: fs.statSync(`${relay.config.databasePath}-wal`).size,
    });
    assert.ok(database.wal_bytes > 0, 'the relay has a -wal file to measure');
    // through a symbolic link: the -wal file is beside the real file, not beside the link
    const link = path.join(tempDir(), 'link.db');
    fs.symlinkSync(relay.config.databasePath, link);
    const linked = await cliJson<{ database: { bytes: number; wal_bytes: number } }>('status', '--databasePath', link);
    assert.deepEqual(
      [linked.database.bytes, linked.database.wal_bytes],
      [fs.statSync(relay.config.databasePath).size, fs.statSync(`${relay.config.databasePath}-wal`).size],
    );
    const text = await cli('status');
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /^queued: +2 \(0 tried before\)$/m);
    assert.match(text.stdout, /^failed: +5 \(kept until retried or deleted\)$/m);
    assert.match(text.stdout, /^finished: +4 delivered, 5 failed, 0 requeued after failing \(lifetime\)$/m);
    // one attempt per message so far: 4 delivered, 3 partly (ok-mixed* and bad-mixed*), 2 refused
    assert.deepEqual(status.attempts, { delivered: 4, partial: 3, deferred: 0, failed: 2, total: 9 });
    assert.match(text.stdout, /^attempts: +4 delivered, 3 partial, 0 deferred, 2 failed$/m);
  });

  test('queue lists and filters messages as an aligned table and as JSON', async () => {
    const [failed, bySender, table] = await Promise.all([
      cliJson<{ messages: Array<{ id: string; state: string }> }>('queue', '--state', 'failed'),
      cliJson<{ messages: Array<{ id: string; received_at: number }>; next_before: string | null }>('queue', '--sender', 'APP@example.com', '--limit', '10'),
      cli('queue', '--state', 'queued'),
    ]);
    assert.deepEqual(failed.messages.map((m) => m.id).sort(), [...ids.mixed, ...ids.allBad].sort());
    assert.ok(failed.messages.every((m) => m.state === 'failed'));
    assert.equal(bySender.messages.length, 10, 'all 11 are from app@example.com; the page stops at the limit');
    assert.equal(bySender.next_before, `${bySender.messages[9].received_at}-${bySender.messages[9].id}`);

    assert.equal(table.code, 0, table.stderr);
    const lines = table.stdout.trimEnd().split('\n');
    assert.equal(lines.length, 3, table.stdout);
    assert.match(lines[0], /^ID +STATE +FROM +RCPTS +SIZE +RECEIVED/);
    const stateColumn = lines[0].indexOf('STATE');
    for (const line of lines.slice(1)) {
      assert.equal(line.indexOf('queued'), stateColumn, `aligned: ${line}`);
      assert.ok(ids.queued.includes(line.slice(0, stateColumn).trim()));
    }
  });

  test("a full page ends with the command for the next one, which reads the same database", async () => {
    const first = await cli('queue', '--limit', '3');
    assert.equal(first.code, 0, first.stderr);
    const lines = first.stdout.trimEnd().split('\n');
    const more = /^more: relayq (.*)$/.exec(lines.at(-1) ?? '');
    assert.ok(more, first.stdout);
    assert.match(more[1], new RegExp(`^queue --config ${configFile.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} --limit 3 --before \\S+$`));
    const next = await runCli(more[1].split(' '));
    assert.equal(next.code, 0, next.stderr);
    const idsOf = (stdout: string) => stdout.split('\n').slice(1).filter((l) => /^[0-9A-F]{20} /.test(l)).map((l) => l.slice(0, 20));
    assert.equal(idsOf(next.stdout).length, 3);
    assert.deepEqual(idsOf(first.stdout).filter((id) => idsOf(next.stdout).includes(id)), [], 'the next page, not the first again');

    // the next page keeps the filters
    const filtered = await cli('queue', '--state', 'delivered', '--sender', 'app@example.com', '--limit', '1');
    assert.equal(filtered.code, 0, filtered.stderr);
    assert.match(filtered.stdout.trimEnd().split('\n').at(-1) ?? '', /^more: relayq queue .* --state delivered --sender app@example\.com --limit 1 --before \S+$/);
  });

  test('show prints envelope, recipients and attempts; export-failed writes the JSON copies', async () => {
    const id = ids.mixed[0];
    // with `..` after a link, into the directory the kernel reaches (the text alone names dir/export)
    fs.mkdirSync(path.join(dir, 'deep', 'inner'), { recursive: true });
    fs.symlinkSync(path.join(dir, 'deep', 'inner'), path.join(dir, 'inner-link'));
    const [detail, text, raw, exported, waiting] = await Promise.all([
      cliJson<{ message: { id: string; state: string }; recipients: Array<{ address: string; status: string }>; attempts: unknown[] }>(
        'show',
        id,
      ),
      cli('show', id),
      cli('show', id, '--raw'),
      cliJson<{ directory: string; exported: number; files: string[] }>('export-failed', `${dir}/inner-link/../export`),
      cli('show', ids.queued[0]),
    ]);
    assert.equal(detail.message.state, 'failed');
    assert.deepEqual(
      detail.recipients.map((r) => [r.address, r.status]),
      [
        ['ok-mixed1@example.com', 'delivered'],
        ['bad-mixed1@example.com', 'failed'],
      ],
    );
    assert.ok(detail.attempts.length >= 1);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /^state: +failed$/m);
    assert.match(text.stdout, /^next attempt: +-$/m);
    assert.match(text.stdout, /^tries: +1$/m);
    // no reverse lookup: the address alone, not followed by itself in brackets as a name
    assert.match(text.stdout, /^client: +127\.0\.0\.1 helo \S+$/m);
    // SEQ and TRIES, right-aligned under their headers
    assert.match(text.stdout, /^SEQ {2}RECIPIENT +STATUS +TRIES {2}CODE/m);
    assert.match(text.stdout, /^ {2}0 {2}ok-mixed1@example\.com +delivered +1 {2}250 /m);
    assert.match(text.stdout, /^ {2}1 {2}bad-mixed1@example\.com +failed +1 {2}550 /m);
    // so are BATCH, RCPTS and MS in the attempts: a duration of one digit stands under the S of MS;
    // a reply over 80 columns is cut to 80, the last of them an ellipsis
    await writeDirect(relay, (db) => db.prepare("UPDATE attempts SET duration_ms = 7, reply = ? WHERE message_id = ?").run(`250 2.0.0 ${'x'.repeat(90)}`, id));
    const attempts = (await cli('show', id)).stdout.split('\n');
    const header = attempts.findIndex((l) => l.startsWith('STARTED'));
    assert.match(attempts[header], /^STARTED {15}BATCH {2}RCPTS {2}UPSTREAM +MS {2}OUTCOME +CODE {2}REPLY$/);
    assert.match(attempts[header + 1], /^\S+ \S+ {6}0 {6}2 {2}\S+ +7 {2}partial {2}250 {3}250 2\.0\.0 x{69}…$/, attempts.join('\n'));
    // a message not tried yet: when it is due, and no attempts
    const due = relay.store.sqlite.prepare('SELECT next_attempt_at FROM messages WHERE id = ?').pluck().get(ids.queued[0]) as number;
    assert.equal(waiting.code, 0, waiting.stderr);
    assert.match(waiting.stdout, new RegExp(`^next attempt: ${new Date(due).toISOString().replace('T', ' ').replace(/\.\d{3}Z$/, 'Z')}$`, 'm'));
    assert.match(waiting.stdout, /^tries: +0$/m);
    assert.match(waiting.stdout, /\n\nno delivery attempts yet\n$/);
    // tried, and no attempt ended: released unfinished at a stop (or cut off by a kill -9), it may have reached the upstream
    const setClaims = (n: number) => writeDirect(relay, (db) => db.prepare('UPDATE messages SET claims = ? WHERE id = ?').run(n, ids.queued[0]));
    await setClaims(2);
    try {
      const released = await cli('show', ids.queued[0]);
      assert.match(released.stdout, /^tries: +2$/m);
      assert.match(released.stdout, /\n\nno delivery attempt has ended yet: its 2 tries were released unfinished at a stop or cut off by a kill -9 \(each may have reached the upstream\), or one is in progress now\n$/);
      // one try, the common case after a kill -9
      await setClaims(1);
      const once = await cli('show', ids.queued[0]);
      assert.match(once.stdout, /\n\nno delivery attempt has ended yet: its try was released unfinished at a stop or cut off by a kill -9 \(each may have reached the upstream\), or one is in progress now\n$/);
      assert.match(once.stdout, /^lease until: +-$/m, 'no lease while queued');
      // being sent: until when its worker holds it, and no next attempt
      const leaseUntil = Date.UTC(2031, 0, 2, 3, 4, 5);
      await writeDirect(relay, (db) => db.prepare("UPDATE messages SET state = 'sending', lease_expires_at = ? WHERE id = ?").run(leaseUntil, ids.queued[0]));
      const sending = await cli('show', ids.queued[0]);
      assert.match(sending.stdout, /^state: +sending$/m);
      assert.match(sending.stdout, /^lease until: +2031-01-02 03:04:05Z$/m);
      assert.match(sending.stdout, /^next attempt: +-$/m);
    } finally {
      await writeDirect(relay, (db) => db.prepare("UPDATE messages SET state = 'queued', lease_expires_at = NULL WHERE id = ?").run(ids.queued[0]));
      await setClaims(0);
    }
    const stored = messageRaw(relay.store.sqlite, id) as { raw: Buffer };
    assert.equal(raw.code, 0, raw.stderr);
    assert.equal(raw.stdout, stored.raw.toString('utf8'), 'show --raw writes the stored bytes');

    assert.equal(exported.exported, 5);
    assert.equal(exported.directory, path.join(dir, 'deep', 'export'));
    assert.equal(fs.existsSync(path.join(dir, 'export')), false);
    const doc = JSON.parse(fs.readFileSync(path.join(dir, 'deep', 'export', `${id}.json`), 'utf8'));
    assert.equal(doc.id, id);
    assert.match(Buffer.from(doc.raw, 'base64').toString(), new RegExp(`id ${id}`));
  });

  test('export-failed and backup into a directory that cannot be written name what they were writing', async (t) => {
    const locked = path.join(dir, 'locked');
    fs.mkdirSync(locked);
    // immutable: no one may write into it, root included (as on a full or read-only disk, the
    // write itself fails)
    await whileImmutable(t, locked, async () => {
      const [exported, backup] = await Promise.all([cli('export-failed', locked), cli('backup', path.join(locked, 'copy.db'))]);
      // found before the first file (also with nothing to export)
      assertOneLineError(exported, /^relayq: cannot export into .*locked: EPERM: operation not permitted, access /);
      assertOneLineError(backup, /^relayq: backup failed: cannot write .*locked\/copy\.db: EPERM/);
      assert.deepEqual(fs.readdirSync(locked), []);
    });
  });

  test('bad input exits non-zero with one line that says why, and changes nothing', async () => {
    const garbage = path.join(dir, 'not-a-database.db');
    fs.writeFileSync(garbage, 'this is not sqlite\n'.repeat(100));
    const badJson = path.join(dir, 'bad.json');
    fs.writeFileSync(badJson, '{"databasePath": ');
    const keep = ids.queued[0];
    const aFile = path.join(dir, 'a-file');
    fs.writeFileSync(aFile, 'not a directory\n');
    const exportTarget = path.join(dir, 'export-from-nowhere');
    // a database of an older schema (its messages table not there yet, as far as the query sees)
    const stale = path.join(dir, 'stale.db');
    const staleStore = await openStore(stale);
    staleStore.sqlite.exec('DROP TABLE messages');
    await staleStore.close();
    const staleTarget = path.join(dir, 'export-from-stale');
    const [unknownShow, unknownDelete, badState, unknownBefore, badBefore, noRecipient, spacedRecipient, nullRecipient, unreadable, missing, badConfig, exportIntoFile, exportMissing, rawAsJson] = await Promise.all([
      cli('show', 'NOSUCHID'),
      cli('delete', keep, 'NOSUCHID'),
      cli('queue', '--state', 'lost'),
      cli('queue', '--before', 'NOSUCHID'),
      cli('queue', '--before', '12-'),
      cli('queue', '--recipient', ''),
      cli('queue', '--recipient', 'a b@example.com'),
      cli('queue', '--recipient', '<>'),
      runCli(['status'], { env: { DATABASE_PATH: garbage } }),
      runCli(['queue'], { env: { DATABASE_PATH: path.join(dir, 'missing.db') } }),
      runCli(['status', '--config', badJson]),
      cli('export-failed', aFile),
      runCli(['export-failed', exportTarget], { env: { DATABASE_PATH: path.join(dir, 'missing.db') } }),
      cli('show', keep, '--raw', '--json'),
    ]);
    // an id pasted with a newline and an escape sequence in it: written as a JSON string, on one line
    for (const args of [['show'], ['retry'], ['delete'], ['queue', '--before']]) {
      const r = await cli(...args, '1A\x1b[31mX\nY');
      assertOneLineError(r, /no message with id "1A\\u001b\[31mX\\nY"/);
      assert.doesNotMatch(r.stderr, /\x1b/);
    }
    // an empty id is named as one; an empty path is not taken for the working directory
    for (const args of [['show'], ['retry'], ['delete'], ['queue', '--before']]) {
      assertOneLineError(await cli(...args, ''), /no message with id ""/);
    }
    const before = fs.readdirSync(CLI_CWD);
    for (const [command, argument] of [['export-failed', 'dir'], ['backup', 'file']]) {
      assertOneLineError(await cli(command, ''), new RegExp(`^relayq: command-argument value '' is invalid for argument '${argument}'\\. must be a path \\(not empty\\)$`));
    }
    assert.deepEqual(fs.readdirSync(CLI_CWD), before, 'nothing written into the working directory');
    // a From: line pasted, to the commands that write: refused, as queue refuses it
    for (const retry of await Promise.all([cli('retry', '--failed', '--sender', 'App Team <app@example.com>'), cli('retry', '--queued', '--sender', 'a b@example.com')])) {
      assertOneLineError(retry, /^relayq: --sender: an address has no space$/);
    }
    // a relative path is the working directory's, which the error shows
    const relative = await runCli(['status', '--databasePath', 'data/nowhere.db']);
    assertOneLineError(relative, /^relayq: no database at data\/nowhere\.db \(/);
    assert.ok(relative.stderr.includes(`(${path.join(CLI_CWD, 'data', 'nowhere.db')}: a relative databasePath is taken from the working directory)`), relative.stderr);
    assertOneLineError(await runCli(['status', '--databasePath', path.join(aFile, 'relayq.db')]), /^relayq: cannot open database \S+a-file\/relayq\.db: \S+a-file is not a directory$/);
    const dangling = path.join(dir, 'dangling.db');
    fs.symlinkSync('volume/relayq.db', dangling);
    assertOneLineError(await runCli(['status', '--databasePath', dangling]), /^relayq: no database at .*dangling\.db: it is a symbolic link to volume\/relayq\.db, which does not exist$/);
    const exportStale = await runCli(['export-failed', staleTarget], { env: { DATABASE_PATH: stale } });
    assertOneLineError(exportStale, /^relayq: database .*stale\.db needs migrations \(no such table: messages\)/);
    assert.ok(!fs.existsSync(staleTarget), 'export-failed on a database that needs migrating creates no directory');
    assertOneLineError(unknownShow, /^relayq: no message with id NOSUCHID$/);
    assertOneLineError(unknownDelete, /no message with id NOSUCHID; nothing deleted/);
    assertOneLineError(badState, /state.*lost.*queued, sending, delivered, failed/);
    assertOneLineError(unknownBefore, /^relayq: --before: no message with id NOSUCHID$/);
    assertOneLineError(badBefore, /^relayq: --before: 12- is not a cursor/);
    assertOneLineError(noRecipient, /^relayq: --recipient: must be an address \(a recipient is never empty; the null sender is a sender\)$/);
    assertOneLineError(spacedRecipient, /^relayq: --recipient: an address has no space$/);
    assertOneLineError(nullRecipient, /^relayq: --recipient: must be an address \(a recipient is never empty/);
    assertOneLineError(unreadable, /cannot read database .*not-a-database\.db: file is not a database/);
    assertOneLineError(missing, /no database at .*missing\.db/);
    assertOneLineError(badConfig, /bad\.json is not valid JSON/);
    // a key given before the command name is commander's unknown option: named without its value
    // (a relay that started anyway is killed at the time limit, and writes only under dir)
    const serveFlags = ['--smtpPort', '0', '--enableHealthCheck', 'false', '--databasePath', path.join(dir, 'serve.db'), '--emailsDir', path.join(dir, 'serve-emails')];
    const [beforeCommand, onOperatorCommand, mistypedOption, mistypedCommand, senderAlone, jsonServe, serveJson, configLeftOut] = await Promise.all([
      runCli(["--defaultPassword=Hun'ter2Secret", 'serve']),
      // a value over two lines is left out whole, not from its first line on
      runCli(['status', '--forwardPasword=Hunter2\nSecret']),
      runCli(['queue', '--stat', 'failed']),
      runCli(['stauts']),
      cli('retry', '--sender', 'x@example.com'),
      runCli(['--json', 'serve', ...serveFlags]),
      runCli(['serve', ...serveFlags, '--json']),
      // the value left out: the option took the command's name, and no command was left
      runCli(['--config', 'serve']),
    ]);
    // the value left out before another option: not taken as the value
    const [senderThenJson, senderThenConfig, configThenJson, senderThenRecipient, configThenSecret] = await Promise.all([
      cli('queue', '--sender', '--json'),
      cli('retry', '--failed', '--sender', '--config', 'x.json'),
      runCli(['--config', '--json', 'status']),
      cli('queue', '--sender', '--recipient=a@example.com'),
      runCli(['--config', '--defaultPassword=Hunter2\nSecret', 'status']),
    ]);
    assertOneLineError(senderThenRecipient, /^relayq: option '--sender <address>' argument '--recipient' is invalid\. --recipient is an option/);
    assertOneLineError(configThenSecret, /^relayq: option '--config <file>' argument '--defaultPassword' is invalid\. --defaultPassword is an option/);
    assert.doesNotMatch(configThenSecret.stderr, /Hunter2|Secret/, 'an option taken for a value is named without its own value');
    assertOneLineError(senderThenJson, /^relayq: option '--sender <address>' argument '--json' is invalid\. --json is an option: give the option its value first$/);
    assertOneLineError(senderThenConfig, /argument '--config' is invalid\. --config is an option/);
    // an address may start with --
    const dashes = await cli('queue', '--sender', '--bounce@example.com', '--json');
    assert.equal(dashes.code, 0, dashes.stderr);
    assert.deepEqual(JSON.parse(dashes.stdout).messages, []);
    assertOneLineError(configThenJson, /argument '--json' is invalid\. --json is an option: give the option its value first \(\.\/--json for a file of that name\)$/);
    for (const r of [jsonServe, serveJson]) {
      assertOneLineError(r, /^relayq: --json does not apply to serve: its log lines are JSON already$/);
      // bad input, not an invalid configuration (2)
      assert.equal(r.code, 1);
    }
    assertOneLineError(senderAlone, /^relayq: --sender goes with --failed or --queued$/);
    assertOneLineError(beforeCommand, /^relayq: unknown option '--defaultPassword' \(a config key goes after the command name\)$/);
    // a config key mistyped: the suggestion commander does not make, as serve's config error makes it
    assertOneLineError(onOperatorCommand, /^relayq: unknown option '--forwardPasword' \(did you mean --forwardPassword\?\)$/);
    assert.doesNotMatch(beforeCommand.stderr + onOperatorCommand.stderr, /Hun'?ter2|Secret/);
    // commander's suggestion, on the same line
    assertOneLineError(mistypedOption, /^relayq: unknown option '--stat' \(did you mean --state\?\)$/);
    assertOneLineError(mistypedCommand, /^relayq: unknown command 'stauts' \(did you mean status\?\)$/);
    // the help of a command that does not exist: not the whole usage
    assertOneLineError(await runCli(['help', 'stauts']), /^relayq: unknown command 'stauts': relayq --help lists the commands$/);
    const help = await runCli(['help', 'queue']);
    assert.deepEqual([help.code, help.stdout.split('\n')[0]], [0, 'Usage: relayq queue [options]']);
    assertOneLineError(configLeftOut, /^relayq: option '--config <file>' argument 'serve' is invalid\. serve is a command: give the option its value first \(\.\/serve for a file of that name\)$/);
    assertOneLineError(exportIntoFile, /^relayq: cannot export into .*a-file: ENOTDIR: not a directory, mkdir '.*a-file'$/);
    assert.equal(fs.readFileSync(aFile, 'utf8'), 'not a directory\n');
    assertOneLineError(exportMissing, /no database at .*missing\.db/);
    assertOneLineError(rawAsJson, /^relayq: --raw writes the message itself, not JSON: give one of --raw and --json$/);
    assert.ok(!fs.existsSync(exportTarget), 'export-failed without a database creates no directory');
    assert.equal(badConfig.code, 2);
    const twoBadKeys = path.join(dir, 'two-bad-keys.json');
    // two keys the commands read (of others, errors are warnings)
    fs.writeFileSync(twoBadKeys, JSON.stringify({ batchDelay: 'x', retention: { deliveredDays: -1 } }));
    const twoErrors = await runCli(['status', '--config', twoBadKeys]);
    assert.equal(twoErrors.code, 2);
    assert.deepEqual(
      twoErrors.stderr.trimEnd().split('\n').map((line) => /^relayq: config error \(file .*two-bad-keys\.json\): ([\w.]+):/.exec(line)?.[1]),
      ['batchDelay', 'retention.deliveredDays'],
      `every line of a config error says it is relayq's and names its key: ${twoErrors.stderr}`,
    );
    assert.ok(relay.store.sqlite.prepare('SELECT 1 FROM messages WHERE id = ?').get(keep), 'all-or-nothing delete kept the known id');
    assert.ok(!fs.existsSync(path.join(dir, 'missing.db')), 'a read command never creates a database');
  });

  test('a filter given twice is refused with one line, not narrowed to the last one given', async () => {
    const failedBefore = (await cliJson<{ queue: { failed: number } }>('status')).queue.failed;
    const runs = await Promise.all(
      [
        ['queue', '--state', 'failed', '--state', 'queued'],
        ['queue', '--sender', '', '--sender', 'app@example.com'],
        ['queue', '--recipient', 'a@example.com', '--recipient', 'a@example.com'],
        ['queue', '--limit', '5', '--limit', '6'],
        ['queue', '--before', ids.queued[0], '--before', ids.queued[0]],
        ['retry', '--failed', '--sender', 'a@example.com', '--sender', 'b@example.com'],
      ].map((args) => cli(...args)),
    );
    for (const r of runs) assertOneLineError(r, /^relayq: option '--(\w+) <\w+>' argument '[^']*' is invalid\. --\1 is given twice: give it once$/);
    assert.equal((await cliJson<{ queue: { failed: number } }>('status')).queue.failed, failedBefore, 'nothing was requeued');
  });


  test("a config key's value is not the next option, and an unquoted password's words are not a command's arguments", async () => {
    const keep = ids.queued[0];
    const backupTarget = path.join(dir, 'horse.db');
    const exportTarget = path.join(dir, 'horse');
    const [deleteWords, backupWords, exportWords, inlineWords, dashedWords, dashWord, otherOption, portThenJson, levelThenState, secretThenJson, tokenThenOption] = await Promise.all([
      cli('delete', keep, '--defaultPassword', 'correct', 'horse', 'battery'),
      cli('backup', '--forwardUsername', 'u', '--forwardPassword', 'correct', backupTarget),
      cli('export-failed', '--forwardPassword=correct', exportTarget),
      cli('retry', '--security.adminToken=correct', keep),
      cli('show', keep, '--defaultPassword', 'correct', '-horse', 'battery'),
      cli('backup', '--forwardPassword', 'correct', '-'),
      // a password that is another command's option (show's --raw): a value, and the words after it stray ones
      cli('delete', keep, '--defaultPassword', '--raw', ids.queued[1]),
      cli('status', '--smtpPort', '--json'),
      cli('queue', '--logLevel', '--state', 'failed'),
      cli('status', '--defaultPassword', '--json'),
      cli('status', '--security.adminToken', '--databasePath', relay.config.databasePath),
    ]);
    for (const [r, flag] of [
      [deleteWords, '--defaultPassword'],
      [backupWords, '--forwardPassword'],
      [exportWords, '--forwardPassword'],
      [inlineWords, '--security.adminToken'],
      [dashedWords, '--defaultPassword'],
      [dashWord, '--forwardPassword'],
      [otherOption, '--defaultPassword'],
    ] as const) {
      assertOneLineError(r, new RegExp(`^relayq: the words after ${flag}'s value are not arguments: quote a value that has spaces`));
      assert.equal(r.code, 2);
      assert.doesNotMatch(r.stderr, /correct|horse|battery/);
    }
    assert.ok(!fs.existsSync(path.join(CLI_CWD, '-')), 'no backup named -');
    for (const id of [keep, ids.queued[1]]) assert.ok(relay.store.sqlite.prepare('SELECT 1 FROM messages WHERE id = ?').get(id), 'nothing deleted');
    // help after a password, or before the command, is help; --help is no password
    for (const args of [['status', '--defaultPassword', 'pw', '-h'], ['-h', 'status', '--defaultPassword', 'pw', 'horse']]) {
      const help = await cli(...args);
      assert.equal(help.code, 0, help.stderr);
      assert.match(help.stdout, /^Usage: relayq /);
    }
    for (const option of ['--help', '-h']) {
      assertOneLineError(await cli('status', '--defaultPassword', option), new RegExp(`argument '${option}' is invalid\\. ${option} is an option: give the option its value first$`));
    }
    // nor is -h a password that lets the words after it through
    assertOneLineError(await cli('delete', keep, '--defaultPassword', '-h', ids.queued[1]), /argument '-h' is invalid\. -h is an option/);
    // a global option's value that looks like -h is no help: the words after the password are judged
    const valued = await cli('--emailsDir', '-h', 'show', keep, '--defaultPassword', 'correct', '-horse', 'battery');
    assertOneLineError(valued, /^relayq: the words after --defaultPassword's value are not arguments/);
    assert.doesNotMatch(valued.stderr, /horse|battery/);
    assert.ok(!fs.existsSync(backupTarget) && !fs.existsSync(exportTarget), 'no file named after the password');
    for (const [r, key, next] of [
      [portThenJson, 'smtpPort', 'json'],
      [levelThenState, 'logLevel', 'state'],
      [secretThenJson, 'defaultPassword', 'json'],
      [tokenThenOption, 'security.adminToken', 'databasePath'],
    ] as const) {
      assertOneLineError(r, new RegExp(`^relayq: option '--${key} <value>' argument '--${next}' is invalid\\. --${next} is an option: give the option its value first$`));
    }
    // a password may start with --, and the arguments go before it; one given with = may be an option's name
    for (const password of [['--defaultPassword', '--not-an-option'], ['--defaultPassword=--json']]) {
      const dashed = await cli('show', keep, ...password, '--json');
      assert.equal(dashed.code, 0, dashed.stderr);
      assert.equal(JSON.parse(dashed.stdout).message.id, keep);
    }
    // after a password's value, `--` still ends the options, and a mistyped option is still named as one
    const ended = await cli('show', '--forwardUsername', 'u', '--json', '--forwardPassword', 'correct', '--', keep);
    assert.equal(ended.code, 0, ended.stderr);
    assert.equal(JSON.parse(ended.stdout).message.id, keep);
    const mistyped = await cli('queue', '--forwardPassword', 'correct', '--stat', 'failed');
    assertOneLineError(mistyped, /^relayq: unknown option '--stat' \(did you mean --state\?\)$/);
    assert.equal(mistyped.code, 1);
    // PEM text where a path goes is refused as serve refuses it, without being shown
    const pem = '-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIHiddenKeyMaterialHiddenKeyMaterialAAAAAA\n-----END PRIVATE KEY-----\n';
    const pemFlag = await cli('status', '--tls.key', pem);
    assert.equal(pemFlag.code, 0, pemFlag.stderr);
    assert.match(pemFlag.stderr, /--tls\.key: must be the path of a PEM file, not its text/);
    assert.doesNotMatch(pemFlag.stderr, /HiddenKeyMaterial|BEGIN/);
  });
  test('a reader that goes away (relayq queue | head) ends a command quietly, without a stack trace', async () => {
    const gone = (...args: string[]) => runCli(['--config', configFile, ...args], { closeStdout: true });
    const results = await Promise.all([gone('queue'), gone('status'), gone('show', ids.mixed[0]), gone('show', ids.mixed[0], '--raw'), gone('status', '--json')]);
    for (const r of results) assert.deepEqual([r.code, r.stderr], [0, '']);
    // the status a command exits with stays its own: retrying a delivered message did nothing
    const retried = await gone('retry', ids.delivered[0]);
    assert.deepEqual([retried.code, retried.stderr], [1, '']);
  });

  test('output that cannot be written (a full disk) fails with one line that says so', async () => {
    const full = fs.openSync('/dev/full', 'w');
    try {
      const toFull = (...args: string[]) => runCli(['--config', configFile, ...args], { stdoutFd: full });
      const results = await Promise.all([toFull('status'), toFull('status', '--json'), toFull('show', ids.mixed[0], '--raw'), toFull('queue')]);
      for (const r of results) {
        assertOneLineError(r, /^relayq: cannot write the output: ENOSPC/);
        assert.equal(r.code, 1);
      }
    } finally {
      fs.closeSync(full);
    }
  });

  test('--databasePath names the file without a config, before or after the command name', async () => {
    const viaConfig = await cliJson<{ total_emails: number }>('status');
    const file = relay.config.databasePath;
    for (const args of [['status', '--databasePath', file, '--json'], ['--databasePath', file, 'status', '--json']]) {
      const r = await runCli(args, { env: { DATABASE_PATH: path.join(dir, 'elsewhere.db') } });
      assert.equal(r.code, 0, r.stderr);
      const status = JSON.parse(r.stdout) as { database: { path: string }; total_emails: number };
      assert.equal(status.database.path, file);
      assert.ok(status.total_emails > 0);
      assert.equal(status.total_emails, viaConfig.total_emails);
    }
    // given before the name and after it, the later one counts, as serve takes it
    const both = await runCli(['--databasePath', path.join(dir, 'elsewhere.db'), 'status', '--databasePath', file, '--json']);
    assert.equal(both.code, 0, both.stderr);
    assert.equal(JSON.parse(both.stdout).database.path, file);
    // any config key is a flag too; the next page's command repeats only where the page came from
    const page = await runCli(['queue', '--databasePath', file, '--retention.deliveredDays', '3', '--forwardPassword', 'Hunter2Secret', '--limit', '1']);
    assert.equal(page.code, 0, page.stderr);
    assert.match(page.stdout, new RegExp(`^more: relayq queue --databasePath ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} --limit 1 --before \\S+$`, 'm'));
    assert.ok(!page.stdout.includes('Hunter2Secret'));
    const kept = await runCli(['status', '--databasePath', file, '--retention.deliveredDays', '1']);
    assert.match(kept.stdout, /^delivered: +\d+ \(kept 1 day\)$/m);
    // a boolean key alone is true, as serve takes it, and the next flag keeps its own value
    const bare = await runCli(['status', '--databasePath', file, '--forwardSMTP', '--retention.deliveredDays', '1']);
    assert.deepEqual([bare.code, bare.stderr.trim().split('\n').length], [0, 1], bare.stderr);
    assert.match(bare.stderr, /^relayq: warning: config error \(flag\): forwardHost is required when forwardSMTP is true .*\(this command does not read it; serve refuses it\)$/m);
    assert.match(bare.stdout, /^delivered: +\d+ \(kept 1 day\)$/m);
    for (const flags of [['--forwardSMTP', '--forwardHost', 'smtp.example.com'], ['--forwardSMTP', 'false', '--json'], ['--json', '--security.logAllEmails']]) {
      const r = await runCli(['status', '--databasePath', file, ...flags]);
      assert.equal(r.code, 0, `${flags.join(' ')}: ${r.stderr}`);
    }
    // a boolean flag with nothing after = needs a value, in serve's words: a warning where the
    // command does not read the key, an error where it does
    const empty = await runCli(['status', '--databasePath', file, '--forwardSMTP=']);
    assert.deepEqual([empty.code, empty.stderr], [0, 'relayq: warning: config error (flag): --forwardSMTP needs a value (this command does not read it; serve refuses it)\n']);
    const emptyRead = await runCli(['delete', '1A2B3C4D5E6F7A8B9C0D', '--databasePath', file, '--security.logAllEmails=']);
    assert.deepEqual([emptyRead.code, emptyRead.stderr], [2, 'relayq: config error (flag): --security.logAllEmails needs a value\n']);
    // the word after a boolean flag is its value, so an id there is refused as one, not read as
    // the flag's value (and then "give one or more message ids")
    const swallowed = await runCli(['retry', '--databasePath', file, '--security.logAllEmails', '1A2B3C4D5E6F7A8B9C0D']);
    assert.equal(swallowed.code, 1);
    assertOneLineError(
      swallowed,
      /^relayq: option '--security\.logAllEmails \[value\]' argument '1A2B3C4D5E6F7A8B9C0D' is invalid\. must be true\/false\/1\/0\/yes\/no, got "1A2B3C4D5E6F7A8B9C0D" \(alone, a boolean flag goes after the other arguments, or give it as --key=true\)$/,
    );
  });

  test("a mistyped relayq environment variable gets a warning on stderr, and the command reads what it would without it", async () => {
    const file = relay.config.databasePath;
    const r = await runCli(['status', '--json'], { env: { DATABASE_PATH: file, DATABASE_PAHT: path.join(dir, 'elsewhere.db') } });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      r.stderr,
      'relayq: warning: DATABASE_PAHT: not an environment variable relayq reads, so it is ignored (did you mean DATABASE_PATH?)\n',
    );
    assert.equal((JSON.parse(r.stdout) as { database: { path: string } }).database.path, file);
  });

  test('retry --failed requeues failed mail; delivered recipients are never sent again', async () => {
    const sentToOk = () => upstream.received.flatMap((m) => m.to).filter((a) => a.startsWith('ok')).length;
    const okBefore = sentToOk();
    const result = await cliJson<{ requeued: number }>('retry', '--failed');
    assert.equal(result.requeued, 5);
    const states = relay.store.sqlite
      .prepare(`SELECT id, state FROM messages WHERE id IN (${[...ids.mixed, ...ids.allBad].map(() => '?').join(',')})`)
      .all(...ids.mixed, ...ids.allBad) as Array<{ state: string }>;
    assert.deepEqual(
      states.map((s) => s.state),
      Array(5).fill('queued'),
    );
    const rcpt = relay.store.sqlite.prepare('SELECT address, status, attempts FROM recipients WHERE message_id = ? ORDER BY seq').all(ids.mixed[1]);
    assert.deepEqual(rcpt, [
      { address: 'ok-mixed2@example.com', status: 'delivered', attempts: 1 },
      { address: 'bad-mixed2@example.com', status: 'pending', attempts: 0 },
    ]);

    rejectRecipient = () => false;
    await relay.delivery.runOnce();
    assert.equal(sentToOk(), okBefore, 'no delivered recipient got the message twice');
    const after = await cliJson<{ queue: Record<string, number>; requeued_emails: number }>('status');
    assert.deepEqual(after.queue, { queued: 0, sending: 0, delivered: 11, failed: 0 });
    assert.equal(after.requeued_emails, 5);
    // failed, net of the requeued: as /metrics counts it, not every failure there was
    const text = await cli('status');
    assert.match(text.stdout, /^finished: +11 delivered, 0 failed, 5 requeued after failing \(lifetime\)$/m);

    const again = await cli('retry', ids.delivered[0]);
    assert.equal(again.code, 1, 'nothing was retried, as the API says with 409');
    assert.match(again.stdout, /already delivered/);
  });

  test('delete removes messages with their recipients and attempts', async () => {
    const [a, b] = ids.delivered;
    const r = await cli('delete', a, b);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`deleted 2 messages: ${a} ${b}`));
    for (const table of ['messages', 'recipients', 'attempts']) {
      const column = table === 'messages' ? 'id' : 'message_id';
      const n = relay.store.sqlite.prepare(`SELECT COUNT(*) AS n FROM ${table} WHERE ${column} IN (?, ?)`).get(a, b) as { n: number };
      assert.equal(n.n, 0, `${table} rows gone`);
    }
    assert.equal(storeMetrics(relay.store.sqlite).queue.delivered, 9);
    assertOneLineError(await cli('show', a), /no message with id/);
  });

  test('a queue id typed in lower case names the same message', async () => {
    const id = await sendMail(relay.smtpPort, { from: 'lower@example.com', to: ['lower@example.com'] }).then((i) => queuedId(i.response));
    const lower = id.toLowerCase();
    assert.notEqual(lower, id);
    const shown = await cliJson<{ message: { id: string } }>('show', lower);
    assert.equal(shown.message.id, id);
    const page = (before: string) => cliJson<{ messages: Array<{ id: string }> }>('queue', '--before', before, '--limit', '2');
    const [byLower, byStored] = await Promise.all([page(lower), page(id)]);
    assert.equal(byStored.messages.length, 2);
    assert.deepEqual(byLower, byStored);
    const retried = await cliJson<{ results: Array<{ id: string; result: string }> }>('retry', lower);
    assert.deepEqual(retried.results.map((r) => r.id), [id]);
    const deleted = await cli('delete', lower);
    assert.equal(deleted.code, 0, deleted.stderr);
    assert.match(deleted.stdout, new RegExp(`^deleted 1 message: ${id}$`, 'm'));
    assert.equal(relay.store.sqlite.prepare('SELECT COUNT(*) AS n FROM messages WHERE id = ?').pluck().get(id), 0);
  });

  test('--emailsDir names where delete and export-failed find the failed-mail exports of a relay configured by flags', async () => {
    rejectRecipient = (a) => a.startsWith('bad');
    const id = await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['bad-flags@example.com'] }).then((i) => queuedId(i.response));
    await relay.delivery.runOnce();
    rejectRecipient = () => false;
    const serverExport = path.join(relay.config.emailsDir, 'failed', `${id}.json`);
    assert.ok(fs.existsSync(serverExport), 'the relay exported the failed message');
    const byFlags = ['--databasePath', relay.config.databasePath, '--emailsDir'];

    const otherDir = path.join(dir, 'flag-emails');
    const exported = await runCliJson<{ directory: string; exported: number }>(['export-failed', ...byFlags, otherDir]);
    assert.equal(exported.directory, path.join(otherDir, 'failed'));
    assert.equal(exported.exported, 1);
    assert.equal(JSON.parse(fs.readFileSync(path.join(otherDir, 'failed', `${id}.json`), 'utf8')).id, id);

    const deleted = await runCli(['delete', id, ...byFlags, relay.config.emailsDir]);
    assert.equal(deleted.code, 0, deleted.stderr);
    assert.equal(fs.existsSync(serverExport), false, "the relay's export went with the message");
  });

  test('delete deletes a message whose failed export cannot be removed, and warns about the file', async () => {
    rejectRecipient = (a) => a.startsWith('bad');
    const sent = await Promise.all(['bad-stuck1@example.com', 'bad-stuck2@example.com'].map((to) => sendMail(relay.smtpPort, { from: 'app@example.com', to: [to] })));
    const [first, second] = sent.map((i) => queuedId(i.response));
    await relay.delivery.runOnce();
    rejectRecipient = () => false;
    for (const id of [first, second]) {
      // a path unlink refuses (EISDIR) where the export was, as an unwritable directory would make
      const file = path.join(relay.config.emailsDir, 'failed', `${id}.json`);
      fs.rmSync(file);
      fs.mkdirSync(path.join(file, 'in-the-way'), { recursive: true });
    }
    const text = await cli('delete', first);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, new RegExp(`^deleted 1 message: ${first}$`, 'm'));
    assert.match(text.stderr, new RegExp(`^relayq: warning: message ${first} deleted, but its failed export could not be removed: EISDIR`, 'm'));
    const json = await cli('--json', 'delete', second);
    assert.equal(json.code, 0, json.stderr);
    const printed = JSON.parse(json.stdout) as { deleted: string[]; warnings: string[] };
    assert.deepEqual(printed.deleted, [second]);
    assert.equal(printed.warnings.length, 1);
    assert.match(printed.warnings[0], /EISDIR/);
    assert.equal(relay.store.sqlite.prepare('SELECT COUNT(*) FROM messages WHERE id IN (?, ?)').pluck().get(first, second), 0);
  });

  test('commands work while the relay accepts mail, without lock errors', async () => {
    const sends = Promise.all(
      Array.from({ length: 100 }, (_, i) => sendMail(relay.smtpPort, { from: 'load@example.com', to: [`load${i}@example.com`] })),
    );
    const commands = Promise.all([cli('status'), cli('retry', '--failed'), cli('retry', ids.queued[1])]);
    const [sent, [status, retryFailed, retryOne]] = await Promise.all([sends, commands]);
    assert.equal(sent.filter((s) => s.response.startsWith('250')).length, 100);
    for (const r of [status, retryFailed]) assert.equal(r.code, 0, r.stderr);
    // delivered by now: retry answers so (exit 1, like the API's 409), not with a lock error
    assert.equal(retryOne.stderr, '');
    assert.match(retryOne.stdout, /already delivered/);
    assert.equal(retryOne.code, 1);
  });

  test('a write command that another process keeps from the database past the busy timeout says so, and changes nothing', async () => {
    const id = ids.queued[0];
    const count = () => relay.store.sqlite.prepare('SELECT count(*) FROM messages WHERE id = ?').pluck().get(id);
    assert.equal(count(), 1);
    // a failed message for retry --failed to requeue, whatever the tests before left
    const [failed] = await insertMessages(relay, 1, 'failed');
    // and a restored backup, still in rollback-journal mode: its switch to WAL waits as a write does
    const restored = rollbackJournalCopy(relay.config.databasePath);
    const holders = [openConnection(relay.config.databasePath), new Database(restored)];
    for (const holder of holders) holder.exec('BEGIN IMMEDIATE');
    try {
      // --failed and --queued write in steps: refused at the first, they changed nothing either
      const results = await Promise.all([
        cli('delete', id),
        cli('retry', id),
        cli('retry', '--failed'),
        cli('retry', '--queued'),
        cli('--databasePath', restored, 'delete', id),
      ]);
      for (const r of results) {
        assertOneLineError(r, /^relayq: database .* is locked: another process \(the relay, a sqlite3 shell inside a transaction\) held its write lock for more than 5 s; nothing was changed, run the command again$/);
      }
    } finally {
      for (const holder of holders) {
        holder.exec('ROLLBACK');
        holder.close();
      }
    }
    assert.equal(count(), 1);
    const inRestored = new Database(restored, { readonly: true });
    try {
      assert.equal(inRestored.prepare('SELECT count(*) FROM messages WHERE id = ?').pluck().get(id), 1, 'not deleted from the restored copy');
    } finally {
      inRestored.close();
    }
    assert.equal(relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(failed), 'failed', 'not requeued');
  });
});

test('retry --failed kept from the database after a step says how many it requeued and that they stay so, not that nothing changed', async () => {
  const total = 6 * ADMIN_STEP;
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const file = relay.config.databasePath;
  try {
    await insertMessages(relay, total, 'failed');
  } finally {
    await relay.stop();
  }
  const holder = openConnection(file);
  try {
    holder.pragma('busy_timeout = 0');
    const requeued = holder.prepare("SELECT count(*) FROM messages WHERE state = 'queued'").pluck();
    const run = runCli(['retry', '--failed', '--databasePath', file]);
    // once a step has committed, the write lock is taken between two steps and held past the
    // command's busy timeout (this loop holds the test's event loop: the command is another process)
    const deadline = Date.now() + 30_000;
    for (;;) {
      assert.ok(Date.now() < deadline, 'no step committed');
      if (requeued.get() === 0) continue;
      try {
        holder.exec('BEGIN IMMEDIATE');
        break;
      } catch (err) {
        if ((err as { code?: string }).code !== 'SQLITE_BUSY') throw err;
      }
    }
    const r = await run;
    holder.exec('ROLLBACK');
    const n = requeued.get() as number;
    assert.ok(n > 0 && n < total && n % ADMIN_STEP === 0, `${n} requeued in whole steps, not all`);
    assertOneLineError(r, new RegExp(`^relayq: database is locked; ${n} failed messages were requeued before that and stay requeued \\(run it again for the rest\\)$`));
  } finally {
    if (holder.inTransaction) holder.exec('ROLLBACK');
    holder.close();
  }
});

test('a write command on a database file it may not write names the file and what must be writable, and changes nothing', async (t) => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const file = relay.config.databasePath;
  let ids: string[];
  try {
    ids = [...(await insertMessages(relay, 1, 'queued')), ...(await insertMessages(relay, 1, 'failed'))];
  } finally {
    await relay.stop();
  }
  // opened, SQLite falls back to reading it; the first write is refused
  await whileImmutable(t, file, async () => {
    const results = await Promise.all([
      runCli(['retry', '--queued', '--databasePath', file]),
      runCli(['retry', '--failed', '--databasePath', file]),
      runCli(['retry', ids[1], '--databasePath', file]),
      runCli(['delete', ids[0], '--databasePath', file]),
    ]);
    for (const r of results) {
      assertOneLineError(
        r,
        /^relayq: cannot write database \S+relayq\.db: cannot write to it \(attempt to write a readonly database\): the relay's user must be able to write the file, its -wal and -shm files and its directory$/,
      );
    }
  });
  const sqlite = openConnection(file);
  try {
    assert.deepEqual(sqlite.prepare('SELECT id, state FROM messages ORDER BY id').raw().all(), [
      [ids[1], 'failed'],
      [ids[0], 'queued'],
    ]);
  } finally {
    sqlite.close();
  }
});

test('migrate waits out another process\'s write for the busy timeout, then says the database is locked, and applies nothing', async () => {
  const file = await databaseAtMigration('001_initial');
  const holder = openConnection(file);
  holder.exec('BEGIN IMMEDIATE');
  try {
    assertOneLineError(
      await runCli(['migrate', '--databasePath', file]),
      /^relayq: migration failed on \S+relayq\.db: it is locked: another process \(a sqlite3 shell inside a transaction, a relayq command\) held its write lock for more than 5 s; nothing was applied, run migrate again once it is done$/,
    );
  } finally {
    holder.exec('ROLLBACK');
    holder.close();
  }
  const migrated = await runCli(['migrate', '--databasePath', file]);
  assert.equal(migrated.code, 0, migrated.stderr);
});

test('a database this user may not read, or whose -shm it may not make beside it, is named with what to do', async (t) => {
  const dir = tempDir();
  const file = path.join(dir, 'relayq.db');
  await (await openStore(file)).close();
  assert.ok(!fs.existsSync(`${file}-shm`), 'a closed store leaves no -shm');
  // a FIFO, whose open would wait for a writer, and a directory
  const fifo = path.join(dir, 'fifo.db');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  assertOneLineError(await runCli(['status', '--databasePath', fifo]), /^relayq: cannot open database \S+fifo\.db: it is not a regular file$/);
  assert.throws(() => lockDatabase(fifo), { message: `${fifo} is not a regular file` });
  assert.equal(spawnSync('mkfifo', [`${file}-lock`]).status, 0);
  assert.throws(() => lockDatabase(file), { message: `${file}-lock: ${file}-lock is not a regular file` });
  // no relay runs: nothing to stop
  assertOneLineError(await runCli(['migrate', '--databasePath', file]), /^relayq: \S+relayq\.db: \S+-lock: \S+-lock is not a regular file$/);
  fs.rmSync(`${file}-lock`);
  assertOneLineError(await runCli(['queue', '--databasePath', dir]), /^relayq: cannot open database \S+: it is a directory \(databasePath names the database file\)$/);
  fs.rmSync(fifo);
  const shm = /cannot read database \S+relayq\.db: .* \(to read a database in WAL mode SQLite needs relayq\.db-shm beside it, and this user may not make it in \S+, or not write it\); run the command as a user who may, such as the relay's$/;
  // a read command makes the -shm of a database no relay has open: not in a directory no one may write
  const immutable = await whileImmutable(t, dir, async () => assertOneLineError(await runCli(['status', '--databasePath', file]), new RegExp(`^relayq: ${shm.source}`)));
  if (!immutable || process.getuid?.() !== 0) return;
  // as another user (only root may become one for a moment): a file it may not read, and one
  // whose directory it may not look into, in a process of its own the CLI's checks run in
  const other = 1000;
  const asOther = <T>(fn: () => T): T => {
    process.seteuid?.(other);
    try {
      return fn();
    } finally {
      process.seteuid?.(0);
    }
  };
  fs.chmodSync(file, 0o600);
  fs.chmodSync(dir, 0o755);
  assert.throws(() => asOther(() => requireDatabaseFile(file)), { message: `cannot open database ${file}: permission denied (owner uid 0, mode 0600); run the command as the relay's user` });
  fs.chmodSync(dir, 0o700);
  assert.throws(() => asOther(() => requireDatabaseFile(file)), {
    message: `cannot open database ${file}: permission denied (this user may not look into a directory on its path); run the command as the relay's user`,
  });
  // a relative path, from a working directory this user may not look into (root's, after sudo -u)
  const cwd = process.cwd();
  process.chdir(dir);
  try {
    assert.throws(() => asOther(() => requireDatabaseFile('relayq.db')), {
      message: `cannot open database relayq.db (${file}: a relative databasePath is taken from the working directory): permission denied (this user may not look into a directory on its path); run the command as the relay's user`,
    });
  } finally {
    process.chdir(cwd);
  }
  fs.chmodSync(dir, 0o755);
  fs.chmodSync(file, 0o644);
  // readable, in a directory it may not write: SQLite cannot make the -shm
  await assert.rejects(asOther(() => withReader({ ...defaultConfig(), databasePath: file }, () => 0)), { message: shm });
  // a -wal it may not read
  fs.writeFileSync(`${file}-wal`, '', { mode: 0o600 });
  await assert.rejects(asOther(() => withReader({ ...defaultConfig(), databasePath: file }, () => 0)), {
    message: new RegExp(`^cannot read database ${file}: .* \\(this user may not read relayq\\.db-wal\\); run the command as the relay's user$`),
  });
  fs.rmSync(`${file}-wal`);
});
