// The relay runs as a child process and is killed with SIGKILL while the upstream holds a batch
// in DATA. A restart on the same database delivers everything once the lease expires: nothing
// acknowledged is lost, and only the batch that was in flight can reach the upstream twice.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ManualClock } from '../manual-clock.js';
import { capturedLog, cliArgs, sendMail, startTestRelay, tempDir, testConfig, waitFor } from '../helpers.js';
import { message, queuedId, recipients, startScriptedUpstream } from './fixtures.js';

interface Child {
  process: ChildProcess;
  smtpPort: number;
  exited: Promise<NodeJS.Signals | number | null>;
  output: () => string;
}

async function spawnRelay(args: string[], cwd: string): Promise<Child> {
  const env = { ...process.env };
  for (const key of Object.keys(env)) if (key.startsWith('RELAYQ_')) delete env[key];
  const child = spawn(process.execPath, cliArgs('serve', ...args), { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr.on('data', (d: Buffer) => (output += d.toString()));
  const exited = new Promise<NodeJS.Signals | number | null>((resolve) => child.once('exit', (code, signal) => resolve(signal ?? code)));
  let smtpPort = 0;
  try {
    await waitFor(
      () => {
        const line = output.split('\n').find((l) => l.includes('"relay.started"'));
        if (line) smtpPort = Number(/"smtp":"[^"]*:(\d+)"/.exec(line)?.[1]);
        if (child.exitCode !== null) throw new Error(`relay exited early:\n${output}`);
        return smtpPort > 0;
      },
      20_000,
      'the relay to start',
    );
  } catch (err) {
    child.kill('SIGKILL'); // it would hold its database and ports after the test
    throw err;
  }
  return { process: child, smtpPort, exited, output: () => output };
}

describe('crash safety', () => {
  const cleanup: Array<() => Promise<unknown>> = [];
  after(async () => {
    for (const c of cleanup.reverse()) await c();
  });

  test('SIGKILL during a delivery: after a restart everything is delivered, duplicates only from the batch in flight', async () => {
    const upstream = await startScriptedUpstream();
    cleanup.push(() => upstream.close());
    // The second transaction is read completely and never answered: the relay is in the
    // at-least-once window (it cannot know whether the upstream took it) when it dies.
    upstream.hold = () => upstream.accepted.length + upstream.held.length === 1;

    const dir = tempDir('relayq-crash-');
    const config = testConfig(
      {
        forwardSMTP: true,
        forwardHost: '127.0.0.1',
        forwardPort: upstream.port,
        batchSize: 2,
        batchDelay: 0,
        workerCount: 1,
        processingTimeout: 5,
      },
      dir,
    );
    const child = await spawnRelay(
      [
        '--databasePath', config.databasePath,
        '--emailsDir', config.emailsDir,
        '--smtpPort', '0',
        '--enableHealthCheck', 'false',
        '--healthCheckPort', '0',
        '--minFreeDiskMb', '0',
        '--forwardSMTP', 'true',
        '--forwardHost', '127.0.0.1',
        '--forwardPort', String(upstream.port),
        '--batchSize', '2',
        '--batchDelay', '0',
        '--workerCount', '1',
        '--processingTimeout', '5',
        '--logLevel', 'info',
      ],
      dir,
    );
    cleanup.push(async () => {
      if (child.process.exitCode === null && child.process.signalCode === null) child.process.kill('SIGKILL');
    });

    const big = ['a', 'b', 'c', 'd', 'e', 'f'].map((l) => `${l}@example.com`);
    const small = ['x@example.com', 'y@example.com'];
    const ids = [
      queuedId((await sendMail(child.smtpPort, { to: big, raw: 'Subject: big\r\n\r\nsix recipients\r\n' })).response),
      queuedId((await sendMail(child.smtpPort, { to: small, raw: 'Subject: small\r\n\r\ntwo recipients\r\n' })).response),
    ];
    await waitFor(() => upstream.held.length === 1, 15_000, 'a batch held in DATA');
    // the first batch's attempt line (the log is written asynchronously; a kill drops what is not out yet)
    await waitFor(() => /"event":"delivery.attempt"/.test(child.output()), 15_000, 'the first attempt logged');
    child.process.kill('SIGKILL');
    assert.equal(await child.exited, 'SIGKILL');
    const inFlight = upstream.held[0].to;
    assert.equal(upstream.accepted.length, 1, 'one batch was delivered before the crash');

    // Restart on the same files. The crashed claim is given back at the start, due at once: the
    // clock stands still, so nothing waits for its lease (processingTimeout) to run out.
    const clock = new ManualClock(Date.now());
    const log = capturedLog('info');
    const relay = await startTestRelay(config, { clock, startDelivery: false, logger: log.logger });
    cleanup.push(() => relay.stop());
    for (const id of ids) assert.ok(message(relay, id), 'every acknowledged message survived the kill');
    assert.deepEqual(
      ids.map((id) => message(relay, id).state),
      ['queued', 'queued'],
      'no claim is left held',
    );
    const recovered = log.entries().filter((e) => e.event === 'delivery.claims_recovered');
    assert.deepEqual(
      recovered.map((e) => [e.level, e.count, e.ids]),
      [[40, 1, ids.filter((id) => recipients(relay, id).some((r) => inFlight.includes(r.address)))]],
    );

    upstream.hold = () => false;
    while ((await relay.delivery.runOnce()).attempts > 0) clock.advance(1);
    for (const id of ids) {
      assert.equal(message(relay, id).state, 'delivered', id);
      assert.ok(recipients(relay, id).every((r) => r.status === 'delivered'));
    }

    // Count every copy the upstream got, including the held one it may have delivered.
    const copies = new Map<string, number>();
    for (const t of [...upstream.accepted, ...upstream.held]) for (const a of t.to) copies.set(a, (copies.get(a) ?? 0) + 1);
    for (const a of [...big, ...small]) assert.ok((copies.get(a) ?? 0) >= 1, `${a} reached the upstream`);
    const duplicated = [...copies].filter(([, n]) => n > 1).map(([a]) => a);
    assert.deepEqual(duplicated.sort(), [...inFlight].sort(), 'duplicates are exactly the batch that was in flight');
    assert.ok([...copies.values()].every((n) => n <= 2));
    assert.ok(path.isAbsolute(config.databasePath));
  });
});
