import assert from 'node:assert/strict';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, describe, type TestContext, test } from 'node:test';
import { ManualClock } from '../manual-clock.js';
import pino from 'pino';
import { startRelay } from '../../src/main.js';
import { removeStrayTempFiles, syncDirectory, writeFileAtomic } from '../../src/delivery/atomic-file.js';
import { DeliveryEngine } from '../../src/delivery/engine.js';
import { safeFileStem } from '../../src/delivery/local.js';
import { exportFailedMessage, failedExportDir } from '../../src/delivery/failed-export.js';
import { runCli } from '../cli/run-cli.js';
import { capturedLog, insertMessages, sendMail, startTestRelay, tempDir, testConfig, waitFor } from '../helpers.js';
import { attempts, message, queuedId, recipients } from './fixtures.js';

describe('local delivery (forwardSMTP=false)', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  test('one .eml per message with the stored bytes, also for two messages from one sender in the same millisecond', async () => {
    const clock = new ManualClock(); // never advanced: both messages arrive at the same instant
    const relay = await startTestRelay({ forwardSMTP: false, batchSize: 2 }, { clock, startDelivery: false });
    cleanup.push(() => relay.stop());
    const ids = [];
    for (const text of ['first', 'second']) {
      const info = await sendMail(relay.smtpPort, { from: 'app@example.com', to: ['a@example.com', 'b@example.com', 'c@example.com'], raw: `Subject: ${text}\r\n\r\n${text}\r\n` });
      ids.push(queuedId(info.response));
    }
    assert.notEqual(ids[0], ids[1]);
    assert.equal(message(relay, ids[0]).received_at, message(relay, ids[1]).received_at);

    const report = await relay.delivery.runOnce();
    assert.equal(report.attempts, 2, 'one write per message, whatever the batchSize');
    // (beside `failed`, created at the start for exports of failed mail)
    const files = fs.readdirSync(relay.config.emailsDir).filter((f) => f !== 'failed').sort();
    assert.deepEqual(files, ids.map((id) => `${id}.eml`).sort(), 'exactly one file per message and no temp files');
    for (const id of ids) {
      const stored = message(relay, id).raw!;
      assert.deepEqual(fs.readFileSync(path.join(relay.config.emailsDir, `${id}.eml`)), stored);
      assert.equal(message(relay, id).state, 'delivered');
      assert.ok(recipients(relay, id).every((r) => r.status === 'delivered' && r.attempts === 1));
      const [a] = attempts(relay, id);
      assert.equal(a.upstream, 'local');
      assert.equal(a.outcome, 'delivered');
      assert.equal(a.reply, `stored as ${id}.eml`);
    }
    assert.match(fs.readFileSync(path.join(relay.config.emailsDir, `${ids[0]}.eml`), 'utf8'), /first/);
    assert.match(fs.readFileSync(path.join(relay.config.emailsDir, `${ids[1]}.eml`), 'utf8'), /second/);
  });

  test('an emailsDir with `..` after a link: its files are where the kernel reaches (and the root check looked), not where the text points', async () => {
    const dir = tempDir('relayq-emails-link-');
    fs.mkdirSync(path.join(dir, 'deep', 'inner'), { recursive: true });
    fs.symlinkSync(path.join(dir, 'deep', 'inner'), path.join(dir, 'inner-link'));
    const relay = await startTestRelay({ forwardSMTP: false, emailsDir: `${dir}/inner-link/../emails` }, { startDelivery: false });
    cleanup.push(() => relay.stop());
    const real = path.join(dir, 'deep', 'emails');
    assert.equal(relay.config.emailsDir, real);
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
    await relay.delivery.runOnce();
    assert.ok(fs.existsSync(path.join(real, `${id}.eml`)));
    assert.ok(fs.existsSync(failedExportDir(real)));
    assert.equal(fs.existsSync(path.join(dir, 'emails')), false);
  });

  test('an emailsDir that is a link to a place that does not exist (a volume not mounted), or a loop of links: the start and the CLI refuse it, and make nothing', async () => {
    const dir = tempDir('relayq-emails-dangling-');
    const databasePath = path.join(dir, 'relayq.db');
    fs.mkdirSync(path.join(dir, 'mnt'));
    fs.symlinkSync('mnt/nas/relayq/emails', path.join(dir, 'emails'));
    fs.symlinkSync('loop', path.join(dir, 'loop'));
    await assert.rejects(startTestRelay({ forwardSMTP: false, databasePath, emailsDir: path.join(dir, 'emails') }, { startDelivery: false }), {
      message: `config error: emailsDir: ${path.join(dir, 'emails')} cannot hold deliveries and failed-mail exports: ${path.join(dir, 'emails')} is a symbolic link to mnt/nas/relayq/emails, which does not exist`,
    });
    await assert.rejects(startTestRelay({ forwardSMTP: false, databasePath, emailsDir: `${dir}/loop/../emails2` }, { startDelivery: false }), /too many levels of symbolic links/);
    assert.deepEqual(fs.readdirSync(path.join(dir, 'mnt')), []);
    await (await startTestRelay({ forwardSMTP: false, databasePath, emailsDir: path.join(dir, 'made') }, { startDelivery: false })).stop();
    const [exported, exportedByDefault, afterMissing, deleted, migrated, retried] = await Promise.all([
      runCli(['export-failed', path.join(dir, 'emails'), '--databasePath', databasePath]),
      runCli(['export-failed', '--databasePath', databasePath, '--emailsDir', path.join(dir, 'emails')]),
      // a `..` after a name that is not there: the kernel would not go back from it
      runCli(['export-failed', `${dir}/missing/../exports`, '--databasePath', databasePath]),
      runCli(['delete', '1A23BC3C88F4F86B3CCE', '--databasePath', databasePath, '--emailsDir', `${dir}/loop/../made`]),
      // the commands that do not write there do not look at it
      runCli(['migrate', '--databasePath', databasePath, '--emailsDir', path.join(dir, 'emails')]),
      runCli(['retry', '--queued', '--databasePath', databasePath, '--emailsDir', path.join(dir, 'emails')]),
    ]);
    assert.match(exported.stderr, /^relayq: cannot export into \S+emails: \S+emails is a symbolic link to mnt\/nas\/relayq\/emails, which does not exist\n$/);
    assert.match(exportedByDefault.stderr, /^relayq: cannot use emailsDir \S+emails: \S+emails is a symbolic link to mnt\/nas\/relayq\/emails, which does not exist\n$/);
    assert.match(afterMissing.stderr, /^relayq: cannot export into \S+missing\/\.\.\/exports: \S+missing does not exist \(a `\.\.` after it leads nowhere\)\n$/);
    assert.match(deleted.stderr, /^relayq: cannot use emailsDir \S+loop\/\.\.\/made: \S+: too many levels of symbolic links\n$/);
    assert.deepEqual([migrated.code, retried.code], [0, 0], migrated.stderr + retried.stderr);
    assert.deepEqual(fs.readdirSync(path.join(dir, 'mnt')), []);
    assert.deepEqual([fs.existsSync(path.join(dir, 'missing')), fs.existsSync(path.join(dir, 'exports'))], [false, false]);
  });

  test('a write that fails is deferred, not lost, and succeeds once the directory is writable', async () => {
    const clock = new ManualClock();
    const relay = await startTestRelay({ forwardSMTP: false, retry: { initialDelay: 5 } }, { clock, startDelivery: false, random: () => 0.5 });
    cleanup.push(() => relay.stop());
    // The directory made at the start is replaced by a file while the relay runs: mkdir and the
    // write fail with ENOTDIR / EEXIST.
    fs.rmSync(relay.config.emailsDir, { recursive: true });
    fs.writeFileSync(relay.config.emailsDir, 'not a directory');
    const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'] })).response);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'queued');
    const [r] = recipients(relay, id);
    assert.equal(r.status, 'pending');
    assert.match(r.last_reply!, /local delivery failed/);
    assert.equal(r.next_attempt_at, clock.now() + 5000);

    fs.rmSync(relay.config.emailsDir);
    clock.advance(5000);
    await relay.delivery.runOnce();
    assert.equal(message(relay, id).state, 'delivered');
    assert.ok(fs.existsSync(path.join(relay.config.emailsDir, `${id}.eml`)));
  });

  test('the running engine is woken by the commit of new mail, not only by its poll', async () => {
    const relay = await startTestRelay({ forwardSMTP: false }, { deliveryPollMs: 3_600_000 });
    cleanup.push(() => relay.stop());
    const ids = await Promise.all(
      Array.from({ length: 20 }, (_, i) => sendMail(relay.smtpPort, { from: 'same@example.com', to: [`r${i}@example.com`] }).then((info) => queuedId(info.response))),
    );
    await waitFor(() => ids.every((id) => message(relay, id).state === 'delivered'), 10_000, 'local delivery');
    assert.equal(fs.readdirSync(relay.config.emailsDir).filter((f) => f.endsWith('.eml')).length, 20);
    assert.equal(relay.delivery.status().upstream, 'local');
    // the read connection sees a commit before the engine has handled the writer's reply to it
    await waitFor(() => relay.delivery.status().inFlight === 0, 10_000, 'no attempt in flight');
  });
});

test('temp files a crash left in emailsDir and emailsDir/failed are removed at start; nothing else is', async () => {
  const config = testConfig({ forwardSMTP: false });
  const failedDir = failedExportDir(config.emailsDir);
  fs.mkdirSync(failedDir, { recursive: true });
  const stray = [path.join(config.emailsDir, '.19CB2FAB2202390B919A.eml.0a1b2c3d4e5f.tmp'), path.join(failedDir, '.19CB2FAB2202390B919A.json.a1b2c3d4e5f6.tmp')];
  // (and names that only look like them: a suffix of other than 12 hex digits)
  const kept = [
    path.join(config.emailsDir, 'notes.tmp'),
    path.join(config.emailsDir, '.hidden'),
    path.join(failedDir, 'X.json'),
    path.join(config.emailsDir, '.a.eml.abc.tmp'),
    path.join(config.emailsDir, '.a.eml.0123456789abcdef.tmp'),
  ];
  const crashedAt = new Date(Date.now() - 120_000);
  for (const file of [...stray, ...kept]) {
    fs.writeFileSync(file, 'x');
    fs.utimesSync(file, crashedAt, crashedAt);
  }

  const relay = await startRelay(config, { logger: pino({ level: 'silent' }) });
  try {
    await waitFor(() => stray.every((file) => !fs.existsSync(file)), 10_000, 'the stray temp files to go');
    for (const file of kept) assert.ok(fs.existsSync(file), file);
  } finally {
    await relay.stop();
  }
});

test("a restart right after a crash removes that crash's temp files once they are old enough to tell", async () => {
  const relay = await startTestRelay({ forwardSMTP: false }, { startDelivery: false });
  const stray = path.join(relay.config.emailsDir, '.19CB2FAB2202390B919A.eml.0a1b2c3d4e5f.tmp');
  fs.writeFileSync(stray, 'cut off by a kill -9 a moment ago');
  const crashedAt = new Date(Date.now() - 100);
  fs.utimesSync(stray, crashedAt, crashedAt);
  const log = capturedLog('info');
  const engine = new DeliveryEngine({
    config: relay.config,
    sqlite: relay.store.sqlite,
    writer: relay.writer,
    clock: relay.clock,
    logger: log.logger,
    tempFileMinAgeMs: 500,
  });
  try {
    engine.start();
    assert.ok(fs.existsSync(stray), "too young at the start: it might be another process's");
    await waitFor(() => !fs.existsSync(stray), 10_000, 'the temp file to go once it has aged');
  } finally {
    await engine.stop(1000);
    await relay.stop();
  }
  // one line for the one file removed: none for a sweep, or a directory, that found nothing
  const removed = log.entries().filter((e) => e.event === 'delivery.temp_files_removed');
  assert.deepEqual(
    removed.map((e) => [e.dir, e.files]),
    [[relay.config.emailsDir, [path.basename(stray)]]],
  );
});

test("only temp files written before the given time are taken for a crash's", async () => {
  const dir = tempDir();
  const old = path.join(dir, '.A.eml.0a1b2c3d4e5f.tmp');
  const fresh = path.join(dir, '.B.eml.0a1b2c3d4e60.tmp');
  const before = Date.now() - 60_000;
  for (const [file, at] of [[old, before - 1000], [fresh, before + 1000]] as const) {
    fs.writeFileSync(file, 'x');
    fs.utimesSync(file, new Date(at), new Date(at));
  }
  assert.deepEqual(await removeStrayTempFiles(dir, before), ['.A.eml.0a1b2c3d4e5f.tmp']);
  assert.ok(fs.existsSync(fresh), 'a younger temp file, maybe of a write in progress, is kept');
  assert.deepEqual(await removeStrayTempFiles(path.join(dir, 'missing'), before), []);
});

test('only a queue id becomes a file name: no dot, slash or leading dash', () => {
  assert.equal(safeFileStem('1A248F51EE1264D5FA2C'), '1A248F51EE1264D5FA2C');
  for (const id of ['a.b', '..', '../x', 'a/b', '-a', '', 'a b']) assert.throws(() => safeFileStem(id), /unsafe message id/, id);
});

test('a directory that cannot be opened to make a rename durable (gone, EMFILE, EACCES) is an error', async (t) => {
  const dir = tempDir();
  await syncDirectory(dir);
  await assert.rejects(syncDirectory(path.join(dir, 'gone')), { code: 'ENOENT' });
  // no file descriptor left: an error (the delivery is deferred), where a file system that cannot
  // sync a directory (EINVAL) is not
  const openFails = (code: string) => t.mock.method(fsp, 'open', async () => Promise.reject(Object.assign(new Error(code), { code })));
  let open = openFails('EMFILE');
  await assert.rejects(syncDirectory(dir), { code: 'EMFILE' });
  open.mock.restore();
  open = openFails('EINVAL');
  await syncDirectory(dir);
  open.mock.restore();
});

/**
 * The steps that make a write in `dir` durable, in order, as they happen: `sync temp file`,
 * `rename`, `sync directory` (a file written in place would show none of them).
 */
async function durableSteps(t: TestContext, dir: string): Promise<string[]> {
  const events: string[] = [];
  const openedOn = new Map<object, string>();
  const open = fsp.open;
  t.mock.method(fsp, 'open', async (file: string, ...rest: [string?, number?]) => {
    const handle = await open(file, ...rest);
    if (file === dir) openedOn.set(handle, 'directory');
    else if (path.dirname(file) === dir) openedOn.set(handle, path.basename(file).endsWith('.tmp') ? 'temp file' : file);
    return handle;
  });
  const probe = await open(path.join(tempDir(), 'probe'), 'w');
  const handles = Object.getPrototypeOf(probe) as { sync(): Promise<void> };
  await probe.close();
  const sync = handles.sync;
  t.mock.method(handles, 'sync', function (this: object) {
    if (openedOn.has(this)) events.push(`sync ${openedOn.get(this)}`);
    return sync.call(this);
  });
  const rename = fsp.rename;
  t.mock.method(fsp, 'rename', async (from: string, to: string) => {
    if (path.dirname(to) === dir) events.push('rename');
    return rename(from, to);
  });
  return events;
}

test('a message file is fsynced before its rename, and its directory after it', async (t) => {
  const dir = tempDir();
  const events = await durableSteps(t, dir);
  await writeFileAtomic(path.join(dir, 'A.eml'), 'Subject: x\r\n\r\nbody\r\n');
  assert.deepEqual(events, ['sync temp file', 'rename', 'sync directory']);
  assert.equal(fs.readFileSync(path.join(dir, 'A.eml'), 'utf8'), 'Subject: x\r\n\r\nbody\r\n');
});

test('a write that fails halfway removes its temp file and closes it (a removed file open keeps its blocks in use)', { skip: !fs.existsSync('/proc/self/fd') && 'no /proc here' }, async () => {
  const dir = tempDir();
  function* pieces(): Generator<string> {
    yield 'Subject: first piece\r\n\r\n';
    throw new Error('the source failed halfway');
  }
  await assert.rejects(writeFileAtomic(path.join(dir, 'A.eml'), pieces()), /the source failed halfway/);
  assert.deepEqual(fs.readdirSync(dir), [], 'no file and no temp file');
  // what this process still holds open there: a removed file reads "<path> (deleted)"
  const held = fs
    .readdirSync('/proc/self/fd')
    .map((fd) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`);
      } catch {
        return ''; // the descriptor readdir itself used, closed since
      }
    })
    .filter((target) => target.startsWith(`${dir}${path.sep}`));
  assert.deepEqual(held, []);
});

test('a rename that fails (a directory where the file goes) removes its temp file: no copy of the message stays behind', async () => {
  const dir = tempDir();
  fs.mkdirSync(path.join(dir, 'A.eml'));
  await assert.rejects(writeFileAtomic(path.join(dir, 'A.eml'), 'Subject: x\r\n\r\nbody\r\n'), { code: 'EISDIR' });
  assert.deepEqual(fs.readdirSync(dir), ['A.eml'], 'no temp file: only the sweep at the next start would remove it');
});

test('local delivery and the failed-mail export write their files that way', async (t) => {
  const relay = await startTestRelay({ forwardSMTP: false }, { startDelivery: false, startRetention: false });
  t.after(() => relay.stop());
  const delivered = await durableSteps(t, relay.config.emailsDir);
  const id = queuedId((await sendMail(relay.smtpPort, { to: ['a@example.com'], raw: 'Subject: x\r\n\r\nbody\r\n' })).response);
  await relay.delivery.runOnce();
  assert.equal(message(relay, id).state, 'delivered');
  assert.deepEqual(delivered, ['sync temp file', 'rename', 'sync directory'], 'local delivery');
  t.mock.restoreAll();

  const exportDir = failedExportDir(relay.config.emailsDir);
  const exported = await durableSteps(t, exportDir);
  const [failed] = await insertMessages(relay, 1, 'failed');
  const file = await exportFailedMessage(relay.store.sqlite, exportDir, failed, Date.now());
  assert.equal(file, path.join(exportDir, `${failed}.json`));
  assert.deepEqual(exported, ['sync temp file', 'rename', 'sync directory'], 'failed-mail export');
});
