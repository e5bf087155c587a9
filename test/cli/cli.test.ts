import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ManualClock } from '../manual-clock.js';
import type { Relay } from '../../src/main.js';
import { failedExportPath } from '../../src/delivery/failed-export.js';
import { ADMIN_STEP, flushQueuedInSteps, HELD, queuedDueNow } from '../../src/store/admin.js';
import { openConnection, openStore } from '../../src/store/db.js';
import { insertMessage } from '../../src/store/intake.js';
import { messageRaw, storeMetrics } from '../../src/store/queries.js';
import { startScriptedUpstream } from '../delivery/fixtures.js';
import { cliArgs, insertMessages, NO_LIMITS, newMessage, sendMail, startTestRelay, startUpstream, tempDir, type Upstream, waitFor, whileImmutable, writeDirect } from '../helpers.js';
import { CLI_CWD, cleanEnv, REPO_ROOT, runCli, runCliJson, writeConfigFile } from './run-cli.js';

const queuedId = (response: string) => {
  const m = /queued as (\S+)/.exec(response);
  assert.ok(m, response);
  return m[1];
};

/** stderr must be exactly one line that says why. */
function assertOneLineError(r: { code: number | null; signal: NodeJS.Signals | null; stderr: string; stdout: string }, reason: RegExp) {
  assert.equal(r.signal, null, 'the command was killed: it ran past its time limit');
  assert.notEqual(r.code, 0, `expected a failure, got stdout ${r.stdout}`);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line of stderr, got: ${r.stderr}`);
  assert.match(lines[0], reason);
}

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
    const [detail, text, raw, exported, waiting] = await Promise.all([
      cliJson<{ message: { id: string; state: string }; recipients: Array<{ address: string; status: string }>; attempts: unknown[] }>(
        'show',
        id,
      ),
      cli('show', id),
      cli('show', id, '--raw'),
      cliJson<{ exported: number; files: string[] }>('export-failed', path.join(dir, 'export')),
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
    } finally {
      await setClaims(0);
    }
    const stored = messageRaw(relay.store.sqlite, id) as { raw: Buffer };
    assert.equal(raw.code, 0, raw.stderr);
    assert.equal(raw.stdout, stored.raw.toString('utf8'), 'show --raw writes the stored bytes');

    assert.equal(exported.exported, 5);
    const doc = JSON.parse(fs.readFileSync(path.join(dir, 'export', `${id}.json`), 'utf8'));
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
      assertOneLineError(exported, /^relayq: cannot export [0-9A-F]+ into .*locked \(0 exported before it\): EPERM/);
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
    // a From: line pasted, to the commands that write: refused, as queue refuses it
    for (const retry of await Promise.all([cli('retry', '--failed', '--sender', 'App Team <app@example.com>'), cli('retry', '--queued', '--sender', 'a b@example.com')])) {
      assertOneLineError(retry, /^relayq: --sender: an address has no space$/);
    }
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
    assertOneLineError(configLeftOut, /^relayq: option '--config <file>' argument 'serve' is invalid\. serve is a command: give the option its value first \(\.\/serve for a file of that name\)$/);
    assertOneLineError(exportIntoFile, /^relayq: cannot export into .*a-file: ENOTDIR: not a directory, mkdir '.*a-file'$/);
    assert.equal(fs.readFileSync(aFile, 'utf8'), 'not a directory\n');
    assertOneLineError(exportMissing, /no database at .*missing\.db/);
    assertOneLineError(rawAsJson, /^relayq: --raw writes the message itself, not JSON: give one of --raw and --json$/);
    assert.ok(!fs.existsSync(exportTarget), 'export-failed without a database creates no directory');
    assert.equal(badConfig.code, 2);
    const twoBadKeys = path.join(dir, 'two-bad-keys.json');
    fs.writeFileSync(twoBadKeys, JSON.stringify({ smtpPort: 'x', batchSize: 0 }));
    const twoErrors = await runCli(['status', '--config', twoBadKeys]);
    assert.equal(twoErrors.code, 2);
    assert.deepEqual(
      twoErrors.stderr.trimEnd().split('\n').map((line) => /^relayq: config error \(file .*two-bad-keys\.json\): (\w+):/.exec(line)?.[1]),
      ['smtpPort', 'batchSize'],
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
    assert.deepEqual([bare.code, bare.stderr.trim().split('\n').length], [2, 1], bare.stderr);
    assert.match(bare.stderr, /forwardHost is required when forwardSMTP is true/);
    for (const flags of [['--forwardSMTP', '--forwardHost', 'smtp.example.com'], ['--forwardSMTP', 'false', '--json'], ['--json', '--security.logAllEmails']]) {
      const r = await runCli(['status', '--databasePath', file, ...flags]);
      assert.equal(r.code, 0, `${flags.join(' ')}: ${r.stderr}`);
    }
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
    const holder = openConnection(relay.config.databasePath);
    holder.exec('BEGIN IMMEDIATE');
    try {
      const results = await Promise.all([cli('delete', id), cli('retry', id)]);
      for (const r of results) {
        assertOneLineError(r, /^relayq: database .* is locked: another process \(the relay, a sqlite3 shell inside a transaction\) held its write lock for more than 5 s; nothing was changed, run the command again$/);
      }
    } finally {
      holder.exec('ROLLBACK');
      holder.close();
    }
    assert.equal(count(), 1);
  });
});

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
        'refused:        2 over a rate limit, 1 queue full',
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

test('show of a message whose content was erased after delivery says so, and show --raw refuses it in one line', async () => {
  const relay = await startTestRelay({ security: { logAllEmails: false } }, { startRetention: false });
  try {
    const id = queuedId((await sendMail(relay.smtpPort)).response);
    await waitFor(() => relay.store.sqlite.prepare('SELECT state FROM messages WHERE id = ?').pluck().get(id) === 'delivered', 10_000, 'the local delivery');
    const db = ['--databasePath', relay.config.databasePath];
    const [text, raw] = await Promise.all([runCli(['show', id, ...db]), runCli(['show', id, '--raw', ...db])]);
    assert.equal(text.code, 0, text.stderr);
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
  } finally {
    await relay.stop();
  }
});
