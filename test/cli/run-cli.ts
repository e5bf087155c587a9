// Runs the relayq CLI (the build) as a real child process, with a config file of its own, none
// of the caller's relayq environment variables, and an empty working directory.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { CONFIG_KEYS, envName } from '../../src/config/schema.js';
import { cliArgs, tempDir } from '../helpers.js';

export { queuedId } from '../delivery/fixtures.js';
export { REPO_ROOT } from '../helpers.js';

/**
 * The working directory of the CLI processes the tests start: an empty directory, so that a
 * `./config.json` or `data/relayq.db` of the checkout's own (an operator's, or a trial run's) is
 * neither read nor touched by a test.
 */
export const CLI_CWD = tempDir('relayq-cli-cwd-');

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** The environment without RELAYQ_CONFIG or any config key's variable, plus `extra`. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = { ...process.env };
  delete env.RELAYQ_CONFIG;
  for (const key of CONFIG_KEYS) delete env[envName(key.path)];
  return { ...env, ...extra };
}

/** Writes a JSON config file into `dir` and returns its path. */
export function writeConfigFile(dir: string, values: Record<string, unknown>): string {
  const file = path.join(dir, 'cli-config.json');
  fs.writeFileSync(file, JSON.stringify(values));
  return file;
}

/**
 * `closeStdout`: the reading end goes away at once, as `relayq … | head -1` does once it has its
 * line. `stdoutFd`: the command writes to this file descriptor instead (`/dev/full`: a full disk).
 */
export function runCli(
  args: string[],
  options: { env?: Record<string, string>; timeoutMs?: number; closeStdout?: boolean; stdoutFd?: number } = {},
): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, cliArgs(...args), {
      cwd: CLI_CWD,
      env: cleanEnv(options.env),
      stdio: ['ignore', options.stdoutFd ?? 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    if (options.closeStdout) child.stdout?.destroy();
    else child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    // generous: a busy machine starting a dozen of them at once is slow
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Runs a command that must succeed with --json and returns the parsed output. */
export async function runCliJson<T = unknown>(args: string[], options?: { env?: Record<string, string> }): Promise<T> {
  const r = await runCli([...args, '--json'], options);
  if (r.code !== 0) throw new Error(`relayq ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}


/** stderr must be exactly one line that says why. */
export function assertOneLineError(r: { code: number | null; signal: NodeJS.Signals | null; stderr: string; stdout: string }, reason: RegExp) {
  assert.equal(r.signal, null, 'the command was killed: it ran past its time limit');
  assert.notEqual(r.code, 0, `expected a failure, got stdout ${r.stdout}`);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line of stderr, got: ${r.stderr}`);
  assert.match(lines[0], reason);
}
