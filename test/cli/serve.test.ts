import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { test } from 'node:test';
import { sendMail, tempDir } from '../helpers.js';
import { CLI_ENTRY, cleanEnv, REPO_ROOT, writeConfigFile } from './run-cli.js';

test('`relayq serve --config FILE --<key> value` starts the relay, accepts mail and exits 0 on SIGTERM', async () => {
  const dir = tempDir('relayq-serve-');
  const configFile = writeConfigFile(dir, { databasePath: path.join(dir, 'data', 'relayq.db'), emailsDir: path.join(dir, 'emails'), minFreeDiskMb: 0 });
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', CLI_ENTRY, 'serve', '--config', configFile, '--smtpPort', '0', '--healthCheckPort=0', '--logLevel', 'info'],
    { cwd: REPO_ROOT, env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
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
    const info = await sendMail(smtpPort);
    assert.match(info.response, /^250 2\.0\.0 Ok: queued as /);
    child.kill('SIGTERM');
    assert.equal(await exited, 0, stderr);
    assert.match(stdout, /"event":"relay.stopped"/);
  } finally {
    clearTimeout(kill);
    child.kill('SIGKILL');
  }
});
