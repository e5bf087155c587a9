// No Docker engine runs the tests, so this checks what can be checked without one: the
// environment the Dockerfile and docker-compose.yml set is made of real configuration keys
// and loads, over config.example.json, into a valid configuration; the mounts, ports, user,
// health check and command are the ones the README promises.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { loadConfig } from '../../src/config/load.js';
import { CONFIG_KEYS, envName } from '../../src/config/schema.js';
import { closedPort, startTestRelay } from '../helpers.js';
import { REPO_ROOT } from '../cli/run-cli.js';

const read = (file: string) => fs.readFileSync(path.join(REPO_ROOT, file), 'utf8');
const KNOWN_ENV = new Set([...CONFIG_KEYS.map((k) => envName(k.path)), 'NODE_ENV', 'RELAYQ_CONFIG']);

/** KEY=value pairs of the runtime stage's ENV instructions (continuation lines joined). */
function dockerfileEnv(text: string): Record<string, string> {
  const runtime = text.slice(text.lastIndexOf('\nFROM '));
  const joined = runtime.replace(/\\\n\s*/g, ' ');
  const env: Record<string, string> = {};
  for (const line of joined.split('\n')) {
    const m = /^ENV\s+(.*)$/.exec(line.trim());
    if (!m) continue;
    for (const pair of m[1].trim().split(/\s+/)) {
      const [key, ...value] = pair.split('=');
      env[key] = value.join('=');
    }
  }
  return env;
}

/** The `environment:` map of the relayq service, with ${VAR:-default} and ${VAR:?msg} resolved. */
function composeEnv(text: string): Record<string, string> {
  const lines = text.split('\n');
  const start = lines.findIndex((l) => /^ {4}environment:\s*$/.test(l));
  assert.ok(start >= 0, 'docker-compose.yml has an environment map');
  const env: Record<string, string> = {};
  for (const line of lines.slice(start + 1)) {
    if (/^\s*#/.test(line) || line.trim() === '') continue;
    const m = /^ {6}([A-Z0-9_]+):\s*(.*)$/.exec(line);
    if (!m) break;
    const raw = m[2].replace(/^"(.*)"$/, '$1');
    env[m[1]] = raw.replace(/\$\{[A-Z0-9_]+(?::-([^}]*)|:\?[^}]*)?\}/g, (_all, fallback: string | undefined) => fallback ?? 'a-token-from-.env');
  }
  return env;
}

test('the Dockerfile and docker-compose.yml set only real config keys and load into a valid config', () => {
  const dockerfile = read('Dockerfile');
  const compose = read('docker-compose.yml');
  const imageEnv = dockerfileEnv(dockerfile);
  const serviceEnv = composeEnv(compose);
  assert.deepEqual(
    { SMTP_HOST: imageEnv.SMTP_HOST, SMTP_PORT: imageEnv.SMTP_PORT, HEALTH_CHECK_HOST: imageEnv.HEALTH_CHECK_HOST },
    { SMTP_HOST: '0.0.0.0', SMTP_PORT: '25', HEALTH_CHECK_HOST: '0.0.0.0' },
  );
  for (const name of [...Object.keys(imageEnv), ...Object.keys(serviceEnv)]) {
    assert.ok(KNOWN_ENV.has(name), `${name} is the environment variable of a config key`);
  }
  const loaded = loadConfig([], { ...imageEnv, ...serviceEnv }, { path: 'config.example.json', text: read('config.example.json') });
  assert.ok(loaded.ok, loaded.ok ? '' : JSON.stringify(loaded.errors));
  assert.equal(loaded.config.smtpPort, 25);
  assert.equal(loaded.config.smtpHost, '0.0.0.0');
  assert.equal(loaded.config.healthCheckHost, '0.0.0.0');
  assert.equal(loaded.config.databasePath, '/app/data/relayq.db');
  assert.equal(loaded.config.emailsDir, '/app/emails');
  assert.notEqual(loaded.config.security.adminToken, '', 'the host reaches the API with the admin token');
});

test("docker-compose.yml passes every variable of .env on, and overrides no key of config.json that .env leaves out", () => {
  const compose = read('docker-compose.yml');
  assert.match(compose, /^ {4}env_file: \.env$/m);
  // what the README's steps write to .env, and a variable the compose file does not name
  const dotEnv = { RELAYQ_ADMIN_TOKEN: 'a'.repeat(64), FORWARD_SMTP: 'true', FORWARD_HOST: 'smtp.example.com', FORWARD_SSL: 'true' };
  const file = JSON.stringify({ ...JSON.parse(read('config.example.json')), forwardPort: 465, logLevel: 'warn' });
  // precedence: the image's ENV, then env_file, then environment:
  const loaded = loadConfig([], { ...dockerfileEnv(read('Dockerfile')), ...dotEnv, ...composeEnv(compose) }, { path: 'config.json', text: file });
  assert.ok(loaded.ok, loaded.ok ? '' : JSON.stringify(loaded.errors));
  assert.equal(loaded.config.forwardSSL, true, 'FORWARD_SSL from .env');
  assert.equal(loaded.config.forwardHost, 'smtp.example.com');
  assert.equal(loaded.config.forwardPort, 465, "config.json's value, not a default of the compose file");
  assert.equal(loaded.config.logLevel, 'warn');
});

test('the image runs the built CLI as `node`, exposes 25 and 8025 and checks /health without curl', () => {
  const dockerfile = read('Dockerfile');
  const pkg = JSON.parse(read('package.json')) as { bin: { relayq: string } };
  assert.match(dockerfile, /^FROM node:26-trixie-slim AS build$/m);
  assert.match(dockerfile, /npm run build && npm prune --omit=dev/);
  assert.match(dockerfile, /^USER node$/m);
  assert.match(dockerfile, /^EXPOSE 25 8025$/m);
  assert.match(dockerfile, /^HEALTHCHECK .*\n\s*CMD \["node", "-e", "fetch\('http:\/\/127\.0\.0\.1:'.*\/health'\)/m);
  const instructions = dockerfile
    .split('\n')
    .filter((l) => !l.trim().startsWith('#'))
    .join('\n');
  assert.doesNotMatch(instructions, /curl/);
  assert.ok(dockerfile.includes(`CMD ["node", "${pkg.bin.relayq}", "serve"]`), 'CMD runs the bin of package.json');
  assert.match(dockerfile, /chown node:node \/app\/data \/app\/emails/);
});

test('compose mounts config, data and emails, publishes on loopback only, restarts and checks health', () => {
  const compose = read('docker-compose.yml');
  for (const volume of ['./config.json:/app/config.json', './data:/app/data', './emails:/app/emails']) {
    assert.ok(compose.includes(`- ${volume}`), volume);
  }
  const ports = [...compose.matchAll(/^\s+- "([^"]+:\d+)"$/gm)].map((m) => m[1]);
  assert.deepEqual(ports, ['127.0.0.1:2525:25', '127.0.0.1:8025:8025']);
  assert.match(compose, /^ {4}restart: unless-stopped$/m);
  assert.match(compose, /^ {4}init: true$/m, 'signals reach relayq also before it listens for them');
  assert.match(compose, /^ {4}sysctls:\n {6}net\.ipv4\.ip_unprivileged_port_start: 0$/m, 'the non-root process may bind port 25');
  // the port the relay listens on, also when HEALTH_CHECK_PORT comes from .env
  assert.match(compose, /^ {4}healthcheck:\n {6}test: \["CMD", "node", "-e", "fetch\('http:\/\/127\.0\.0\.1:'\+\(process\.env\.HEALTH_CHECK_PORT\|\|8025\)\+'\/health'\)/m);
  const subnet = /subnet: (\S+)/.exec(compose)?.[1];
  assert.equal(composeEnv(compose).SECURITY_ALLOWED_NETWORKS, `127.0.0.0/8,::1/128,${subnet}`, 'SMTP is open to loopback and the compose network, not beyond');
});

test('git ignores the .env that the Docker steps write the admin token into, and local data', () => {
  const ignored = read('.gitignore').split('\n');
  for (const entry of ['.env', 'config.json', 'data/*', 'emails/', 'dist/']) assert.ok(ignored.includes(entry), entry);
});

test('.dockerignore keeps local data, secrets and build output out of the build context', () => {
  const ignored = read('.dockerignore')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  for (const entry of ['node_modules', 'dist', 'data', 'emails', 'config.json', '.env', '.git']) assert.ok(ignored.includes(entry), entry);
  assert.ok(!ignored.includes('src') && !ignored.includes('migrations') && !ignored.includes('package-lock.json'));
});

test("the image's and compose's health check is one script: exit 0 on an ok relay, 1 on one in error, saying why", async () => {
  const script = (text: string) => /"node", "-e", "([^"]+)"\]/.exec(text)?.[1];
  const inImage = script(read('Dockerfile'));
  assert.ok(inImage, 'the Dockerfile runs a node -e script');
  assert.equal(script(read('docker-compose.yml')), inImage);
  // not spawnSync: the relay runs in this process, and answers only while it is free to
  const check = (port: number | undefined) =>
    new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = execFile(process.execPath, ['-e', inImage], { env: { PATH: process.env.PATH, HEALTH_CHECK_PORT: String(port) }, timeout: 60_000 }, (_err, stdout, stderr) =>
        resolve({ status: child.exitCode, stdout, stderr }),
      );
    });
  const healthy = await startTestRelay({}, { startDelivery: false });
  try {
    const ok = await check(healthy.httpPort);
    assert.equal(ok.status, 0, ok.stdout + ok.stderr);
    assert.match(ok.stdout, /^200 \{"status":"ok"/);
  } finally {
    await healthy.stop();
  }
  // free disk below minFreeDiskMb: mail cannot be accepted
  const full = await startTestRelay({ minFreeDiskMb: 1_000_000_000 }, { startDelivery: false });
  try {
    const error = await check(full.httpPort);
    assert.equal(error.status, 1, error.stdout + error.stderr);
    assert.match(error.stdout, /^503 \{"status":"error".*minFreeDiskMb/);
  } finally {
    await full.stop();
  }
  const nothing = await check(await closedPort());
  assert.equal(nothing.status, 1);
  assert.match(nothing.stdout, /fetch failed/);
});
