import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import { openConnection, openStore } from '../../src/store/db.js';
import { lockDatabase } from '../../src/store/maintenance.js';
import { capturedLog, cliArgs, closedPort, REPO_ROOT, sendMail, spawnRelay, startTestRelay, tempDir, waitFor, whileImmutable } from '../helpers.js';
import { queuedId } from '../reliability/smtp-session.js';
import { CLI_CWD, cleanEnv, runCli, writeConfigFile } from './run-cli.js';

test('`relayq serve --config FILE --<key> value` starts the relay, accepts mail and exits 0 on SIGTERM', async () => {
  const dir = tempDir('relayq-serve-');
  const configFile = writeConfigFile(dir, {
    databasePath: path.join(dir, 'data', 'relayq.db'),
    emailsDir: path.join(dir, 'emails'),
    minFreeDiskMb: 0,
    security: { adminToken: 'a-token-for-this-test' },
  });
  fs.chmodSync(configFile, 0o644);
  const child = spawn(
    process.execPath,
    cliArgs('serve', '--config', configFile, '--smtpPort', '0', '--healthCheckPort=0', '--logLevel', 'info'),
    { cwd: CLI_CWD, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stdout = '';
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const kill = setTimeout(() => child.kill('SIGKILL'), 30_000);
  try {
    const smtpPort = await new Promise<number>((resolve, reject) => {
      child.stdout.setEncoding('utf8').on('data', (d: string) => {
        stdout += d;
        const started = stdout.split('\n').find((line) => line.includes('"event":"relay.started"'));
        if (started) resolve(Number(String(JSON.parse(started).smtp).split(':').pop()));
      });
      exited.then((code) => reject(new Error(`serve exited ${code} before starting: ${stderr}${stdout}`)));
    });
    assert.ok(smtpPort > 0);
    const warnings = stdout.split('\n').filter((line) => line.includes('"event":"config.warning"')).map((line) => JSON.parse(line).msg);
    assert.deepEqual(
      warnings.filter((w: string) => w.startsWith(configFile)),
      [`${configFile} sets security.adminToken, and every user of this machine may read it (mode 0644): chmod o-r it, or give the secrets in the environment`],
    );
    const info = await sendMail(smtpPort);
    assert.match(info.response, /^250 2\.0\.0 Ok: queued as /);
    child.kill('SIGTERM');
    assert.equal(await exited, 0, stderr);
    assert.match(stdout, /"event":"relay.stopped"/);
    // the WAL was checkpointed into the database file at the stop
    assert.doesNotMatch(stdout, /store\.wal_kept/);
    const wal = path.join(dir, 'data', 'relayq.db-wal');
    assert.equal(fs.existsSync(wal) ? fs.statSync(wal).size : 0, 0);
  } finally {
    clearTimeout(kill);
    child.kill('SIGKILL');
  }
});

test("store.wal_kept names the -wal file beside the database's real file when databasePath is a symbolic link", async () => {
  const dir = tempDir();
  fs.mkdirSync(path.join(dir, 'volume'));
  const real = path.join(dir, 'volume', 'relayq.db');
  const link = path.join(dir, 'relayq.db');
  fs.symlinkSync(real, link);
  const log = capturedLog();
  const relay = await startTestRelay({ databasePath: link }, { startDelivery: false, logger: log.logger });
  const reader = new Database(link, { readonly: true });
  try {
    await sendMail(relay.smtpPort);
    reader.exec('BEGIN');
    reader.prepare('SELECT count(*) FROM messages').get();
    await sendMail(relay.smtpPort);
    await relay.stop();
  } finally {
    reader.close();
  }
  const kept = log.entries().filter((e) => e.event === 'store.wal_kept');
  assert.deepEqual(kept.map((e) => e.walPath), [`${real}-wal`]);
  assert.equal(fs.existsSync(`${link}-wal`), false);
});

test('a stop whose checkpoint fails (the database file cannot be written) says so, not that a reader is in the way; the mail is in the WAL', async (t) => {
  const log = capturedLog();
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false, logger: log.logger });
  const databasePath = relay.config.databasePath;
  let stopped = false;
  try {
    await sendMail(relay.smtpPort);
    // the WAL still takes writes; the checkpoint's writes to the database file fail
    const ran = await whileImmutable(t, databasePath, async () => {
      await relay.stop();
      stopped = true;
    });
    if (!ran) return;
  } finally {
    if (!stopped) await relay.stop();
  }
  const kept = log.entries().filter((e) => e.event === 'store.wal_kept');
  assert.deepEqual(kept.map((e) => [e.level, e.walPath]), [[40, `${databasePath}-wal`]]);
  assert.match(String(kept[0].err), /I\/O error|readonly|permission/i);
  assert.doesNotMatch(String(kept[0].msg), /reader/);
  const store = await openStore(databasePath);
  try {
    assert.equal((store.sqlite.prepare('SELECT count(*) AS n FROM messages').get() as { n: number }).n, 1);
  } finally {
    await store.close();
  }
});

test('a stop while a reader (sqlite3 -readonly, the CLI) reads older frames leaves the WAL to the next start, saying so', async () => {
  const log = capturedLog();
  const relay = await startTestRelay({}, { startDelivery: false, logger: log.logger });
  const reader = new Database(relay.config.databasePath, { readonly: true });
  try {
    await sendMail(relay.smtpPort);
    reader.exec('BEGIN');
    reader.prepare('SELECT count(*) FROM messages').get();
    await sendMail(relay.smtpPort); // a frame the reader's snapshot does not have
    await relay.stop();
    const kept = log.entries().filter((e) => e.event === 'store.wal_kept');
    assert.deepEqual(kept.map((e) => [e.level, e.walPath, e.err]), [[30, `${relay.config.databasePath}-wal`, undefined]]);
    assert.match(String(kept[0].msg), /a reader \(sqlite3, the CLI, a backup\) still reads older frames/);
    assert.ok(fs.statSync(`${relay.config.databasePath}-wal`).size > 0);
    assert.ok(log.entries().some((e) => e.event === 'relay.stopped'));
  } finally {
    reader.close();
  }
  // the next open checkpoints it; both messages are there (and a reader of the newest frames
  // keeps only the WAL file: nothing to say)
  const store = await openStore(relay.config.databasePath);
  const newest = new Database(relay.config.databasePath, { readonly: true });
  try {
    assert.equal((store.sqlite.prepare('SELECT count(*) AS n FROM messages').get() as { n: number }).n, 2);
    newest.exec('BEGIN');
    newest.prepare('SELECT count(*) FROM messages').get();
    assert.equal(await store.close(), undefined);
  } finally {
    newest.close();
    await store.close();
  }
});

/** A relay started as `relayq serve` on ports known beforehand, its stdout given by the caller. */
/** Starts `relayq serve` in a child process; `maxFileKb` limits the size of every file it writes (`ulimit -f`). */
async function serveWith(dir: string, stdout: number | 'pipe', databasePath = path.join(dir, 'data', 'relayq.db'), stderr: number | 'pipe' = 'pipe', maxFileKb?: number) {
  const smtpPort = await closedPort();
  let httpPort = await closedPort();
  while (httpPort === smtpPort) httpPort = await closedPort();
  const configFile = writeConfigFile(dir, { databasePath, emailsDir: path.join(dir, 'emails'), minFreeDiskMb: 0, smtpPort, healthCheckPort: httpPort });
  const command = [process.execPath, ...cliArgs('serve', '--config', configFile)];
  const limited = maxFileKb === undefined ? command : ['bash', '-c', `ulimit -f ${maxFileKb} && exec "$@"`, 'bash', ...command];
  const child = spawn(limited[0], limited.slice(1), {
    cwd: CLI_CWD,
    env: cleanEnv(),
    stdio: ['ignore', stdout, stderr],
  });
  let stderrText = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderrText += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const accepting = async () => {
    let exitCode: number | null | undefined;
    exited.then((code) => (exitCode = code));
    await waitFor(
      () => {
        // a relay that stopped at its start (a port taken meanwhile) says so, not a timeout
        if (exitCode !== undefined) throw new Error(`the relay exited ${exitCode} before it accepted mail: ${stderrText}`);
        return new Promise<boolean>((resolve) => net.connect(smtpPort, '127.0.0.1').on('connect', function (this: net.Socket) { this.destroy(); resolve(true); }).on('error', () => resolve(false)));
      },
      30_000,
      'the relay to accept SMTP connections',
      100,
    );
  };
  /** /health's warnings, over HTTP. */
  const healthWarnings = async () => ((await (await fetch(`http://127.0.0.1:${httpPort}/health`)).json()) as { details: { warnings: string[] } }).details.warnings;
  return { child, smtpPort, httpPort, exited, accepting, healthWarnings, stderr: () => stderrText };
}

/** Resolves with the exit code, or with 'still running' after `ms`. */
function exitWithin(exited: Promise<number | null>, ms: number): Promise<number | null | 'still running'> {
  return Promise.race([exited, new Promise<'still running'>((resolve) => setTimeout(() => resolve('still running'), ms).unref())]);
}

test('serve --help says how to give the config file and any config key', async () => {
  const r = await runCli(['serve', '--help']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^Usage: relayq serve \[--config FILE\] \[--<key> value \.\.\.\]$/m);
  assert.match(r.stdout, /^Any config key is a flag: --smtpPort 2526, --databasePath FILE/m);
});

test('a log that cannot be written (stdout on /dev/full) pauses logging, says so on stderr and in /health, mail is still served, and a stop does not wait for it', async () => {
  const dir = tempDir('relayq-serve-');
  const full = fs.openSync('/dev/full', 'w');
  const relay = await serveWith(dir, full);
  fs.closeSync(full);
  try {
    await relay.accepting();
    const info = await sendMail(relay.smtpPort);
    assert.match(info.response, /^250 2\.0\.0 Ok: queued as /);
    assert.match(relay.stderr(), /^relayq: the log cannot be written to stdout \(ENOSPC\); log lines wait until it can, mail is still served$/m);
    const warnings = await relay.healthWarnings();
    const paused = warnings.filter((w) => w.startsWith('logging paused'));
    assert.equal(paused.length, 1, JSON.stringify(warnings));
    assert.match(paused[0], /^logging paused since \d{4}-\d\d-\d\dT[\d:.]+Z: stdout cannot be written \(ENOSPC\); lines wait in memory \(up to 16777216 bytes, then they are dropped\) and are written once it can be$/);
    relay.child.kill('SIGTERM');
    assert.equal(await exitWithin(relay.exited, 20_000), 0, relay.stderr());
    // said once: the log was given up when the stop began, and no later write is tried or reported
    const leaving = relay.stderr().split('\n').filter((line) => line.includes('exiting without'));
    assert.equal(leaving.length, 1, relay.stderr());
    assert.match(leaving[0]!, /^relayq: exiting without the last \d+ bytes of the log: stdout could not be written since \d{4}-/);
    assert.doesNotMatch(relay.stderr(), /took no log for/, 'no wait for a write that cannot be made');
  } finally {
    relay.child.kill('SIGKILL');
  }
});

test('logging paused by a full log file resumes once the file has room: the lines that waited are written, /health drops its warning', async () => {
  const dir = tempDir('relayq-serve-');
  const logFile = path.join(dir, 'relay.log');
  // the relay may write files of at most 4 MiB (ulimit -f), and its log is 1 KiB short of that
  const maxFileKb = 4096;
  fs.writeFileSync(logFile, Buffer.alloc(maxFileKb * 1024 - 1024, 'x'));
  const out = fs.openSync(logFile, 'a');
  const relay = await serveWith(dir, out, undefined, 'pipe', maxFileKb);
  fs.closeSync(out);
  try {
    await relay.accepting();
    const first = queuedId((await sendMail(relay.smtpPort)).response) ?? assert.fail('not queued');
    assert.match(relay.stderr(), /^relayq: the log cannot be written to stdout \(EFBIG\); log lines wait until it can, mail is still served$/m);
    assert.equal((await relay.healthWarnings()).filter((w) => w.startsWith('logging paused since')).length, 1);
    fs.truncateSync(logFile, 0);
    // with no new line to write, the write is tried again within 5 s
    await waitFor(() => relay.stderr().includes('relayq: stdout takes the log again (it could not since '), 15_000, 'logging to resume');
    const second = queuedId((await sendMail(relay.smtpPort)).response) ?? assert.fail('not queued');
    assert.deepEqual((await relay.healthWarnings()).filter((w) => w.startsWith('logging')), []);
    await waitFor(() => fs.readFileSync(logFile, 'utf8').includes(second), 10_000, "the second message's line in the log");
    const lines = fs.readFileSync(logFile, 'utf8').split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { event?: string; queueId?: string; paused?: string });
    assert.ok(lines.some((l) => l.event === 'smtp.accepted' && l.queueId === first), 'the line that waited while the file was full');
    assert.match(lines.find((l) => l.event === 'relay.log_resumed')?.paused ?? '', /^logging paused since .*\(EFBIG\)/);
    relay.child.kill('SIGTERM');
    assert.equal(await exitWithin(relay.exited, 20_000), 0, relay.stderr());
  } finally {
    relay.child.kill('SIGKILL');
  }
});

test("a log whose pipe's reader has gone (EPIPE) stops logging for good, says so, and mail is still served", async () => {
  const dir = tempDir('relayq-serve-');
  const relay = await serveWith(dir, 'pipe');
  relay.child.stdout?.destroy();
  try {
    await relay.accepting();
    assert.match((await sendMail(relay.smtpPort)).response, /^250 2\.0\.0 Ok: queued as /);
    await waitFor(() => /^relayq: the log cannot be written to stdout \(EPIPE\): its reader has gone; logging stops, mail is still served$/m.test(relay.stderr()), 10_000, 'the line on stderr');
    const warnings = await relay.healthWarnings();
    assert.equal(warnings.filter((w) => /^logging stopped at .*\(EPIPE\); restart relayq to log again$/.test(w)).length, 1, JSON.stringify(warnings));
    relay.child.kill('SIGTERM');
    assert.equal(await exitWithin(relay.exited, 20_000), 0, relay.stderr());
    // the log was given up: the stop does not wait for stdout to take it, nor say it dropped any
    assert.doesNotMatch(relay.stderr(), /took no log|exiting without/);
  } finally {
    relay.child.kill('SIGKILL');
  }
});

test('a log that cannot be written, with stderr on the same full disk (`> log 2>&1`), still does not stop the relay', async () => {
  const dir = tempDir('relayq-serve-');
  const full = fs.openSync('/dev/full', 'w');
  const relay = await serveWith(dir, full, undefined, full);
  fs.closeSync(full);
  try {
    await relay.accepting();
    // the relay has written its log by now, and the line on stderr that says it cannot
    for (let i = 0; i < 3; i++) assert.match((await sendMail(relay.smtpPort)).response, /^250 2\.0\.0 Ok: queued as /);
    assert.equal(await exitWithin(relay.exited, 0), 'still running');
    relay.child.kill('SIGTERM');
    assert.equal(await exitWithin(relay.exited, 20_000), 0);
  } finally {
    relay.child.kill('SIGKILL');
  }
});

/**
 * A relay whose stdout is a pipe nobody reads, full after the 150 messages it has accepted (about
 * 1 KB of log lines each at info: far more than the pipe holds). `stop` kills it and closes the pipe.
 */
async function relayWithUnreadLog(dir: string) {
  const fifo = path.join(dir, 'stdout');
  execFileSync('mkfifo', [fifo]);
  const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK); // held, never read
  const writer = fs.openSync(fifo, fs.constants.O_WRONLY);
  const relay = await serveWith(dir, writer);
  fs.closeSync(writer);
  const stop = () => {
    relay.child.kill('SIGKILL');
    fs.closeSync(reader);
  };
  try {
    await relay.accepting();
    for (let i = 0; i < 150; i++) assert.match((await sendMail(relay.smtpPort)).response, /^250 /);
  } catch (err) {
    stop();
    throw err;
  }
  return { ...relay, stop };
}

test('log lines that come faster than stdout takes them wait in memory up to a bound: past it they are dropped, and stderr says so and how many, each time', async () => {
  // the logger of the build, in a process that writes its lines at once: the first is being
  // written when the others come, so past the bound they are dropped whoever reads stdout
  const logger = path.join(REPO_ROOT, 'dist', 'src', 'logger.js');
  const script = `
    import { stdoutLog } from ${JSON.stringify(logger)};
    const log = stdoutLog(256 * 1024);
    const burst = (from) => { for (let i = from; i < from + 2000; i++) log.write(JSON.stringify({ i, pad: 'x'.repeat(1000) }) + '\\n'); };
    burst(0);
    process.stderr.write('waiting ' + log._len + '\\n');
    // once stdout has taken the log again, a second burst
    log.once('drain', () => setImmediate(() => {
      burst(2000);
      log.once('drain', () => setImmediate(() => log.flush(() => process.exit(0))));
    }));
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  // read from the start: what the child wrote before its exit may fit in the socket's buffers, and
  // Node discards the output of an exited child that nobody listens to
  let read = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (read += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
  try {
    await waitFor(() => stderr.includes('waiting '), 20_000, 'the lines written');
    const waiting = Number(/waiting (\d+)/.exec(stderr)?.[1]);
    assert.ok(waiting <= 256 * 1024, `at most the bound waits: ${waiting}`);
    assert.match(stderr, /^relayq: stdout has taken no log while 262144 bytes of it waited; log lines are dropped until it reads again$/m);
    assert.equal(await exited, 0, stderr);
    // each time stdout stops taking the log is said, and each time it takes it again with the lines dropped since
    assert.equal(stderr.match(/^relayq: stdout has taken no log while/gm)?.length, 2, stderr);
    const counts = [...stderr.matchAll(/^relayq: stdout reads the log again; (\d+) log lines were dropped$/gm)].map((m) => Number(m[1]));
    assert.equal(counts.length, 2, stderr);
    const dropped = counts[0] + counts[1];
    const lines = read.split('\n').filter(Boolean);
    assert.ok(counts.every((n) => n > 0), stderr);
    assert.equal(lines.length + dropped, 4000, `every line is written or counted as dropped: ${lines.length} written, ${dropped} dropped: ${stderr}`);
    assert.deepEqual(JSON.parse(lines[0]).i, 0, 'the first lines are kept, the later ones dropped');
  } finally {
    child.kill('SIGKILL');
  }
});

test('a log that stops being writable while a stop writes it out ends the wait at once, saying what it leaves', async () => {
  // the logger of the build, in a process whose files may hold 1 KiB (ulimit -f): its last line does not fit
  const logger = path.join(REPO_ROOT, 'dist', 'src', 'logger.js');
  const script = `
    import { stdoutLog } from ${JSON.stringify(logger)};
    const log = stdoutLog();
    log.write('x'.repeat(3000) + '\\n');
    log.closeWithin(60_000).then(() => process.exit(0));
  `;
  const dir = tempDir('relayq-serve-');
  const out = fs.openSync(path.join(dir, 'log'), 'a');
  const child = spawn('bash', ['-c', 'ulimit -f 1 && exec "$@"', 'bash', process.execPath, '--input-type=module', '-e', script], { stdio: ['ignore', out, 'pipe'] });
  fs.closeSync(out);
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  try {
    assert.equal(await exitWithin(new Promise((resolve) => child.on('close', resolve)), 30_000), 0, stderr);
    assert.match(stderr, /^relayq: exiting without the last \d+ bytes of the log: stdout cannot be written \(EFBIG\)$/m);
    assert.equal(fs.statSync(path.join(dir, 'log')).size, 1024, 'what fitted was written');
  } finally {
    child.kill('SIGKILL');
  }
});

test('a stop whose log nobody reads (a full pipe) still exits, and keeps every message', async () => {
  const dir = tempDir('relayq-serve-');
  const relay = await relayWithUnreadLog(dir);
  try {
    relay.child.kill('SIGTERM');
    assert.equal(await exitWithin(relay.exited, 20_000), 0, relay.stderr());
    assert.match(relay.stderr(), /^relayq: stdout took no log for 5(\.\d)? s; exiting without the last \d+ bytes of it$/m);
    const db = openConnection(path.join(dir, 'data', 'relayq.db'));
    assert.equal(db.prepare('SELECT count(*) FROM messages').pluck().get(), 150);
    db.close();
  } finally {
    relay.stop();
  }
});

test('the same signal again, past the window of a repeated delivery, while the stop waits for a log nobody reads exits within a second with code 1, saying what it dropped', async () => {
  const dir = tempDir('relayq-serve-');
  const relay = await relayWithUnreadLog(dir);
  try {
    const firstAt = performance.now();
    relay.child.kill('SIGTERM');
    // the stop is over once the store is closed (its -wal file goes with the last connection);
    // what is left is the wait of up to 5 s for the log
    const wal = path.join(dir, 'data', 'relayq.db-wal');
    await waitFor(() => !fs.existsSync(wal), 20_000, 'the stop to close the store');
    // an operator's second SIGTERM, not the pair `timeout` sends within the second
    await sleep(Math.max(0, 1500 - (performance.now() - firstAt)));
    relay.child.kill('SIGTERM');
    assert.equal(await exitWithin(relay.exited, 20_000), 1, relay.stderr());
    assert.match(relay.stderr(), /^relayq: stdout took no log for \d+(\.\d)? s; exiting without the last \d+ bytes of it$/m);
  } finally {
    relay.stop();
  }
});

/**
 * A relay whose config file is a FIFO: its start waits in reading it (with only the CLI's first
 * module loaded) until `feed` writes the config.
 */
async function serveFromFifo(dir: string) {
  const fifo = path.join(dir, 'config.json');
  execFileSync('mkfifo', [fifo]);
  const smtpPort = await closedPort();
  let httpPort = await closedPort();
  while (httpPort === smtpPort) httpPort = await closedPort();
  const child = spawn(process.execPath, cliArgs('serve', '--config', fifo), { cwd: CLI_CWD, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  let writer: number | undefined;
  // a non-blocking open for writing succeeds once the relay has the FIFO open for reading
  await waitFor(() => {
    try {
      writer = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
      return true;
    } catch {
      return false;
    }
  }, 20_000, 'the relay to open its config file').catch((err: Error) => {
    child.kill('SIGKILL');
    throw err;
  });
  return {
    child,
    exited,
    stdout: () => stdout,
    stderr: () => stderr,
    events: () => stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { event?: string; starting?: boolean; signal?: string }),
    feed() {
      const config = { databasePath: path.join(dir, 'relayq.db'), emailsDir: path.join(dir, 'emails'), minFreeDiskMb: 0, smtpPort, healthCheckPort: httpPort };
      fs.writeSync(writer as number, JSON.stringify(config));
      fs.closeSync(writer as number);
      writer = undefined;
    },
    end() {
      if (writer !== undefined) fs.closeSync(writer);
      child.kill('SIGKILL');
    },
  };
}

test('a SIGTERM that comes while the CLI still loads (here: reading its config file from a pipe) stops the relay once started, not killing it', async () => {
  const relay = await serveFromFifo(tempDir('relayq-serve-'));
  try {
    relay.child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 100));
    relay.feed();
    assert.equal(await exitWithin(relay.exited, 20_000), 0, `${relay.stderr()} (null: killed by the signal)`);
    const events = relay.events();
    assert.deepEqual(events.find((e) => e.event === 'relay.signal')?.starting, true, relay.stdout());
    assert.deepEqual(events.filter((e) => e.event?.startsWith('relay.')).slice(-2).map((e) => e.event), ['relay.stopping', 'relay.stopped']);
  } finally {
    relay.end();
  }
});

test('SIGUSR1 and SIGUSR2 that come while the CLI still loads are ignored too: no debugger opens, the relay starts', async () => {
  const relay = await serveFromFifo(tempDir('relayq-serve-'));
  try {
    relay.child.kill('SIGUSR1');
    relay.child.kill('SIGUSR2');
    await new Promise((r) => setTimeout(r, 100));
    relay.feed();
    await waitFor(() => relay.events().some((e) => e.event === 'relay.started'), 20_000, 'the relay to start');
    assert.deepEqual(relay.events().filter((e) => e.event === 'relay.signal_ignored').map((e) => e.signal).sort(), ['SIGUSR1', 'SIGUSR2']);
    relay.child.kill('SIGTERM');
    assert.equal(await exitWithin(relay.exited, 20_000), 0, relay.stderr());
    assert.doesNotMatch(relay.stderr(), /Debugger listening/);
  } finally {
    relay.end();
  }
});

/**
 * Sends `signals` to a relay while its start waits for a database another connection keeps
 * locked (busy_timeout), then lets it go on; resolves with its exit code and its log's relay.*
 * events.
 */
async function signalWhileStarting(signals: NodeJS.Signals[]) {
  const dir = tempDir('relayq-serve-');
  const databasePath = path.join(dir, 'relayq.db');
  await (await openStore(databasePath)).close();
  const holder = openConnection(databasePath);
  holder.pragma('locking_mode = EXCLUSIVE');
  holder.exec('BEGIN EXCLUSIVE');
  const relay = await serveWith(dir, 'pipe', databasePath);
  let stdout = '';
  relay.child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  try {
    // it has opened the database: its signal handlers are in place, and it waits for the lock
    const fds = `/proc/${relay.child.pid}/fd`;
    const target = (fd: string) => {
      try {
        return fs.readlinkSync(path.join(fds, fd));
      } catch {
        return undefined; // closed meanwhile
      }
    };
    await waitFor(() => fs.readdirSync(fds).some((fd) => target(fd) === databasePath), 20_000, 'the relay to open its database');
    for (const signal of signals) {
      relay.child.kill(signal);
      await new Promise((r) => setTimeout(r, 100));
    }
    // SQLite's busy wait holds the relay's main thread: the signals are handled once the lock goes
    holder.exec('COMMIT');
    holder.close();
    const code = await exitWithin(relay.exited, 20_000);
    const events = stdout.split('\n').filter(Boolean).map((l) => (JSON.parse(l) as { event?: string }).event);
    return { code, events: events.filter((e) => e?.startsWith('relay.')), stderr: relay.stderr() };
  } finally {
    if (holder.open) holder.close();
    relay.child.kill('SIGKILL');
  }
}

test('a SIGTERM while the relay starts (here: waiting for a locked database) stops it in order instead of killing it', async () => {
  const { code, events, stderr } = await signalWhileStarting(['SIGTERM']);
  assert.equal(code, 0, stderr);
  // handled once the start had gone far enough to run it: before or after relay.started
  assert.deepEqual(new Set(events), new Set(['relay.signal', 'relay.started', 'relay.stopping', 'relay.stopped']), events.join());
  assert.deepEqual(events.slice(-2), ['relay.stopping', 'relay.stopped']);
});

test('the same signal twice at once (as `timeout` sends it, to the process and to its group) is one request: the stop is orderly', async () => {
  // both are handled together once the start lets go of the main thread
  const { code, events, stderr } = await signalWhileStarting(['SIGTERM', 'SIGTERM']);
  assert.equal(code, 0, stderr);
  assert.ok(!events.includes('relay.forced_exit'), events.join());
  assert.deepEqual(events.slice(-2), ['relay.stopping', 'relay.stopped']);
});

test('a second signal exits at once with code 1; SIGHUP stops the relay as SIGTERM does', async () => {
  const forced = await signalWhileStarting(['SIGHUP', 'SIGINT']);
  assert.equal(forced.code, 1, forced.stderr);
  assert.ok(forced.events.includes('relay.forced_exit'), forced.events.join());
  assert.ok(!forced.events.includes('relay.stopped'), forced.events.join());
  const hangup = await signalWhileStarting(['SIGHUP']);
  assert.equal(hangup.code, 0, hangup.stderr);
  assert.deepEqual(hangup.events.slice(-2), ['relay.stopping', 'relay.stopped']);
});

test('relayq migrate with migrations to apply is refused while a relayq holds the lock, and applies them once it is gone', async () => {
  const file = path.join(tempDir('relayq-serve-'), 'relayq.db');
  const store = await openStore(file);
  // as an older relayq leaves it: its last migration not applied
  store.sqlite.exec('DROP INDEX messages_new');
  store.sqlite.prepare('DELETE FROM schema_migrations WHERE name = ?').run('012_new_mail_index');
  await store.close();
  const lock = lockDatabase(file);
  let released = false;
  try {
    const refused = await runCli(['migrate', '--databasePath', file]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(refused.stderr, /^relayq: \S+relayq\.db: another relayq is running on this database: .*; stop it first, then run migrate again \(or start the new relayq: it applies pending migrations at its start\)$/m);
    lock.release();
    released = true;
    const applied = await runCli(['migrate', '--databasePath', file]);
    assert.deepEqual([applied.code, applied.stdout], [0, `applied 012_new_mail_index to ${file}\n`], applied.stderr);
  } finally {
    if (!released) lock.release();
  }
});

test('relayq migrate refuses a database a newer relayq migrated, in the same words with or without a relayq holding the lock', async () => {
  const file = path.join(tempDir('relayq-serve-'), 'relayq.db');
  const store = await openStore(file);
  store.sqlite.prepare('INSERT INTO schema_migrations (name, timestamp) VALUES (?, ?)').run('099_from_a_newer_relayq', new Date().toISOString());
  await store.close();
  const refusal = `relayq: migration failed on ${file}: it was migrated by a newer relayq (099_from_a_newer_relayq): run that version, or restore the backup taken before the upgrade\n`;
  const alone = await runCli(['migrate', '--databasePath', file]);
  assert.deepEqual([alone.code, alone.stdout, alone.stderr], [1, '', refusal]);
  const lock = lockDatabase(file);
  try {
    const beside = await runCli(['migrate', '--databasePath', file]);
    assert.deepEqual([beside.code, beside.stdout, beside.stderr], [1, '', refusal]);
  } finally {
    lock.release();
  }
});

test('SIGUSR1 and SIGUSR2 are ignored and logged: no debugger opens, and the relay serves on', async () => {
  const dir = tempDir('relayq-serve-');
  // were the inspector opened, on a port of the system's choosing
  const relay = await spawnRelay(dir, [], { NODE_OPTIONS: '--inspect-port=127.0.0.1:0' });
  try {
    const ignored = () => relay.output().split('\n').filter((line) => line.includes('"relay.signal_ignored"')).map((line) => JSON.parse(line).signal);
    relay.child.kill('SIGUSR1');
    await waitFor(() => ignored().length === 1, 30_000, 'SIGUSR1 logged');
    relay.child.kill('SIGUSR2');
    await waitFor(() => ignored().length === 2, 30_000, 'SIGUSR2 logged');
    assert.deepEqual(ignored(), ['SIGUSR1', 'SIGUSR2']);
    assert.match((await sendMail(relay.smtpPort)).response, /^250 /);
    assert.doesNotMatch(relay.output(), /Debugger listening/);
    assert.equal(await relay.kill('SIGTERM'), 0, relay.output());
  } finally {
    await relay.kill();
  }
});

test('a writer thread that dies stops relayq serve with exit code 1 for its supervisor, and what was stored stays', async () => {
  const dir = tempDir('relayq-serve-');
  const endWorkers = path.join(REPO_ROOT, 'test', 'cli', 'end-worker-threads.mjs');
  const relay = await spawnRelay(dir, [], { NODE_OPTIONS: `--import ${JSON.stringify(endWorkers)}` });
  try {
    const info = await sendMail(relay.smtpPort);
    const id = /queued as (\S+)/.exec(info.response)?.[1];
    // a relay that went on running without its writer would answer every message 451 for ever
    const exited = await Promise.race([relay.kill('SIGUSR2'), sleep(60_000, 'still running', { ref: false })]);
    assert.equal(exited, 1, relay.output());
    const events = relay.output().split('\n').flatMap((line) => (line.startsWith('{') ? [JSON.parse(line).event] : []));
    assert.ok(events.includes('relay.writer_failed'), relay.output());
    assert.equal(events.at(-1), 'relay.stopped', 'an orderly stop, to its last line');
    const db = new Database(path.join(dir, 'data', 'relayq.db'), { readonly: true });
    try {
      assert.deepEqual(db.prepare('SELECT id FROM messages').all(), [{ id }]);
    } finally {
      db.close();
    }
  } finally {
    await relay.kill();
  }
});

test('a second relay on the same database is refused before it touches anything, until the first is gone (kill -9 included)', async () => {
  const dir = tempDir('relayq-serve-');
  const first = await spawnRelay(dir);
  try {
    const databasePath = path.join(dir, 'data', 'relayq.db');
    const second = await runCli(['serve', '--smtpPort', '0', '--healthCheckPort', '0', '--minFreeDiskMb', '0', '--databasePath', databasePath, '--emailsDir', path.join(dir, 'emails2')]);
    assert.equal(second.code, 1, second.stderr);
    assert.match(second.stdout + second.stderr, /databasePath \S+relayq\.db: another relayq is running on this database: \S+relayq\.db-lock is locked/);
    // nor by another path to it, nor a migration under it
    const link = path.join(dir, 'link.db');
    fs.symlinkSync(databasePath, link);
    const [viaLink, migrate] = await Promise.all([
      runCli(['serve', '--smtpPort', '0', '--healthCheckPort', '0', '--minFreeDiskMb', '0', '--databasePath', link, '--emailsDir', path.join(dir, 'emails3')]),
      runCli(['migrate', '--databasePath', databasePath]),
    ]);
    assert.equal(viaLink.code, 1, viaLink.stderr);
    assert.match(viaLink.stderr, /another relayq is running on this database/);
    // up to date, as a relay of this version leaves it: said as when none runs
    assert.deepEqual([migrate.code, migrate.stdout], [0, `${databasePath} is up to date\n`], migrate.stderr);
    assert.deepEqual(
      fs.readdirSync(path.dirname(databasePath)).filter((f) => f.includes('-lock')),
      ['relayq.db-lock'],
      'one empty lock file: no journal beside it',
    );
    assert.equal(fs.statSync(`${databasePath}-lock`).size, 0);
    // nor through a second name of the file (a hard link has a lock file and a WAL of its own):
    // refused, and so is every command on it, while the relay on the first name serves on
    const hardLink = path.join(dir, 'hard.db');
    fs.linkSync(databasePath, hardLink);
    const [viaHardLink, status] = await Promise.all([
      runCli(['serve', '--smtpPort', '0', '--healthCheckPort', '0', '--minFreeDiskMb', '0', '--databasePath', hardLink, '--emailsDir', path.join(dir, 'emails4')]),
      runCli(['status', '--databasePath', hardLink]),
    ]);
    for (const refused of [viaHardLink, status]) {
      assert.equal(refused.code, 1, refused.stderr);
      assert.match(refused.stderr, /hard\.db has 2 hard links: SQLite keeps a WAL beside each name/);
    }
    assert.deepEqual(fs.readdirSync(dir).filter((f) => f.startsWith('hard.db')), ['hard.db'], 'nothing made beside the second name: no lock, no WAL');
    fs.unlinkSync(hardLink);
    await sendMail(first.smtpPort);
    assert.equal(await first.kill('SIGKILL'), null);
    // the kernel let go of the lock with the process
    const next = await spawnRelay(dir);
    assert.equal(await next.kill('SIGTERM'), 0);
  } finally {
    await first.kill();
  }
});
