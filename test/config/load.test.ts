import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { clientFilter } from '../../src/access-control.js';
import { exposedSecretsWarning, formatErrors, loadConfig, loadConfigFromSources, parseFlags, readConfigFile } from '../../src/config/load.js';
import { CONFIG_KEYS, defaultConfig, envName, MAX_MESSAGE_SIZE_LIMIT } from '../../src/config/schema.js';
import { openStore } from '../../src/store/db.js';
import { runCli } from '../cli/run-cli.js';
import { capturedLog, cliArgs, closedPort, databaseAtMigration, REPO_ROOT, rollbackJournalCopy, SmtpClient, spawnRelay, startTestRelay, tempDir, whileImmutable } from '../helpers.js';

const file = (obj: unknown) => ({ path: 'config.json', text: JSON.stringify(obj) });

describe('loadConfig', () => {
  test('no file, no env, no flags → the built-in defaults', () => {
    const r = loadConfig([], {});
    assert.ok(r.ok);
    assert.deepEqual(r.config, defaultConfig());
    assert.equal(r.config.smtpHost, '127.0.0.1');
    assert.equal(r.config.smtpPort, 2525);
    assert.equal(r.config.healthCheckHost, '127.0.0.1');
  });

  test('reports every bad key at once, each with its source', () => {
    const r = loadConfig(['--workerCount', 'many'], { SMTP_PORT: '70000', RATE_LIMITS_ENABLED: 'maybe' }, file({
      smtpHost: 42,
      batchSize: 0,
      bogus: true,
      rateLimits: { maxPerHour: 1.5, nope: 1 },
      security: { allowedNetworks: 'x' },
    }));
    assert.equal(r.ok, false);
    if (r.ok) return;
    const seen = r.errors.map((e) => `${e.source}:${e.key}`).sort();
    assert.deepEqual(seen, [
      'env:rateLimits.enabled',
      'env:smtpPort',
      'file:batchSize',
      'file:bogus',
      'file:rateLimits.maxPerHour',
      'file:rateLimits.nope',
      'file:security.allowedNetworks',
      'file:smtpHost',
      'flag:workerCount',
    ]);
    for (const e of r.errors) assert.ok(e.message.length > 0);
    assert.match(r.errors.find((e) => e.key === 'smtpPort')!.message, /SMTP_PORT.*at most 65535/);
  });

  test('later sources win: defaults < file < env < flags', () => {
    const f = file({ smtpPort: 3000, batchSize: 7, rateLimits: { maxPerHour: 10 } });
    const fromFile = loadConfig([], {}, f);
    assert.ok(fromFile.ok);
    assert.equal(fromFile.config.smtpPort, 3000);
    const fromEnv = loadConfig([], { SMTP_PORT: '3001', RATE_LIMITS_MAX_PER_HOUR: '11' }, f);
    assert.ok(fromEnv.ok);
    assert.equal(fromEnv.config.smtpPort, 3001);
    assert.equal(fromEnv.config.rateLimits.maxPerHour, 11);
    assert.equal(fromEnv.config.batchSize, 7);
    const fromFlag = loadConfig(['--smtpPort=3002'], { SMTP_PORT: '3001' }, f);
    assert.ok(fromFlag.ok);
    assert.equal(fromFlag.config.smtpPort, 3002);
  });

  test('a bad value that a later source replaces is not used: a warning that names both, not an error', () => {
    const f = file({ smtpPort: 'x', batchSize: 0 });
    const r = loadConfig(['--smtpPort', '3002', '--workerCount=4'], { SMTP_PORT: 'y', BATCH_SIZE: '7', WORKER_COUNT: 'many' }, f);
    assert.ok(r.ok, JSON.stringify(r));
    assert.deepEqual([r.config.smtpPort, r.config.batchSize, r.config.workerCount], [3002, 7, 4]);
    assert.deepEqual(r.warnings.filter((w) => w.includes('not used')).sort(), [
      'SMTP_PORT (smtpPort): must be an integer, got "y" (not used: --smtpPort replaces it)',
      'WORKER_COUNT (workerCount): must be an integer, got "many" (not used: --workerCount replaces it)',
      'config.json: batchSize: must be at least 1, got 0 (not used: BATCH_SIZE replaces it)',
      'config.json: smtpPort: must be an integer (not used: --smtpPort replaces it)',
    ]);
    // replaced by a value that is bad too: both are errors
    const bad = loadConfig(['--smtpPort', 'z'], { SMTP_PORT: 'y' });
    assert.ok(!bad.ok);
    assert.deepEqual(bad.errors.map((e) => `${e.source}:${e.key}`), ['env:smtpPort', 'flag:smtpPort']);
  });

  test('booleans accept true/false/1/0/yes/no and lists are comma-separated in env', () => {
    for (const [text, value] of [['yes', true], ['0', false], ['TRUE', true], ['no', false]] as const) {
      const r = loadConfig([], { FORWARD_SSL: text });
      assert.ok(r.ok);
      assert.equal(r.config.forwardSSL, value);
    }
    const r = loadConfig([], {
      SECURITY_ALLOW_LOCAL_ONLY: 'false',
      SECURITY_ALLOWED_NETWORKS: '10.0.0.0/8, 192.168.1.0/24',
      DEFAULT_USERNAME: 'u',
      DEFAULT_PASSWORD: 'p',
    });
    assert.ok(r.ok, JSON.stringify(!r.ok && r.errors));
    assert.deepEqual(r.config.security.allowedNetworks, ['10.0.0.0/8', '192.168.1.0/24']);
  });

  test('an empty item in a list variable (a trailing comma, two commas) is skipped, not taken for an entry', () => {
    const r = loadConfig([], { SECURITY_ALLOW_LOCAL_ONLY: 'false', SECURITY_REQUIRE_AUTH: 'false', SECURITY_ALLOWED_NETWORKS: ' 10.0.0.0/8,,192.168.1.0/24, ,' });
    assert.ok(r.ok, JSON.stringify(!r.ok && r.errors));
    assert.deepEqual(r.config.security.allowedNetworks, ['10.0.0.0/8', '192.168.1.0/24']);
  });

  test('every key has an environment variable named after its path', () => {
    assert.equal(envName('rateLimits.maxPerHour'), 'RATE_LIMITS_MAX_PER_HOUR');
    assert.equal(envName('forwardSMTP'), 'FORWARD_SMTP');
    assert.equal(envName('security.allowLocalOnly'), 'SECURITY_ALLOW_LOCAL_ONLY');
    assert.equal(new Set(CONFIG_KEYS.map((k) => envName(k.path))).size, CONFIG_KEYS.length);
  });

  test('config.example.json loads and shows every key with its default', () => {
    const text = fs.readFileSync(path.join(import.meta.dirname, '..', '..', 'config.example.json'), 'utf8');
    const r = loadConfig([], {}, { path: 'config.example.json', text });
    assert.ok(r.ok, JSON.stringify(!r.ok && r.errors));
    const defaults = defaultConfig();
    for (const key of CONFIG_KEYS) {
      const parts = key.path.split('.');
      const get = (o: unknown) => parts.reduce((n: unknown, p) => (n as Record<string, unknown>)[p], o);
      assert.notEqual(get(JSON.parse(text)), undefined, `${key.path} missing from config.example.json`);
      if (key.path !== 'serverName') assert.deepEqual(get(r.config), get(defaults), key.path);
    }
    // its serverName is a placeholder: copied and left as it is, it is named at the start
    assert.ok(r.ok && r.warnings.some((w) => w.startsWith('serverName relay.example.com is a name reserved for examples')), JSON.stringify(r));
  });

  test('a serverName in a domain reserved for examples gets a warning; a real one does not', () => {
    const warned = (name: string) => {
      const r = loadConfig(['--serverName', name], { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' });
      assert.ok(r.ok);
      return r.warnings.some((w) => w.includes('reserved for examples'));
    };
    for (const name of ['relay.example.com', 'MX.Example.ORG', 'example.net', 'host.example', 'relay.example.com.']) assert.ok(warned(name), name);
    for (const name of ['relay.mycompany.com', 'example.community', 'myexample.com', 'relay.test', 'mail.example.co.uk']) assert.ok(!warned(name), name);
  });

  test('a serverName that is no fully qualified name gets a warning when it is the EHLO name sent upstream', () => {
    const warnings = (...flags: string[]) => {
      const r = loadConfig(flags, { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' });
      assert.ok(r.ok, JSON.stringify(r));
      return r.warnings;
    };
    const upstream = ['--forwardSMTP', '--forwardHost', 'smtp.mycompany.com'];
    assert.deepEqual(warnings(...upstream, '--serverName', 'mailhost'), [
      "serverName mailhost is not a fully qualified domain name: it is the EHLO name relayq sends to the upstream, and an upstream that requires one (Postfix's reject_non_fqdn_helo_hostname) fails every message for good; set serverName to this host's full name",
    ]);
    for (const name of ['relay.mycompany.com', '[192.0.2.25]']) assert.deepEqual(warnings(...upstream, '--serverName', name), [], name);
    // delivered into emailsDir, the name is only written into Received:
    assert.deepEqual(warnings('--serverName', 'mailhost'), []);
  });

  test('requireAuth without credentials: loopback-only mode with a warning', () => {
    const r = loadConfig([], {});
    assert.ok(r.ok);
    assert.equal(r.warnings.length, 1);
    assert.match(r.warnings[0], /loopback clients without AUTH/);
  });

  test('inFlowDelay given in seconds, as Postfix takes in_flow_delay, gets a warning; milliseconds do not', () => {
    const seconds = loadConfig(['--inFlowDelay', '2'], { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' });
    assert.ok(seconds.ok);
    assert.deepEqual(seconds.warnings, [
      "inFlowDelay is in milliseconds: 2 ms hardly slows intake while delivery is behind; Postfix's in_flow_delay = 1s is inFlowDelay 1000",
    ]);
    // Postfix's in_flow_delay is at most 10s: 10 is still taken for seconds, 11 is not
    const ten = loadConfig(['--inFlowDelay', '10'], { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' });
    assert.ok(ten.ok);
    assert.match(ten.warnings[0] ?? '', /^inFlowDelay is in milliseconds: 10 ms/);
    for (const ms of ['0', '11', '500', '1000']) {
      const r = loadConfig(['--inFlowDelay', ms], { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' });
      assert.ok(r.ok);
      assert.deepEqual(r.warnings, [], ms);
    }
  });

  test('a per-sender rate limit set above the global one gets a warning (it could never apply); left at its default, or the limits off, none', () => {
    const credentials = { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p', RATE_LIMITS_ENABLED: 'true' };
    const both = loadConfig(['--rateLimits.maxPerHour', '100', '--rateLimits.maxPerDay', '200', '--rateLimits.globalMaxPerHour', '10', '--rateLimits.globalMaxPerDay', '20'], credentials);
    assert.ok(both.ok);
    assert.deepEqual(both.warnings, [
      'rateLimits.maxPerHour 100 is above rateLimits.globalMaxPerHour 10: all senders together reach the global limit first, so the per-sender one never applies',
      'rateLimits.maxPerDay 200 is above rateLimits.globalMaxPerDay 20: all senders together reach the global limit first, so the per-sender one never applies',
    ]);
    const day = loadConfig([], { ...credentials, RATE_LIMITS_MAX_PER_DAY: '6000' });
    assert.ok(day.ok);
    assert.deepEqual(day.warnings, ['rateLimits.maxPerDay 6000 is above rateLimits.globalMaxPerDay 5000: all senders together reach the global limit first, so the per-sender one never applies']);
    // equal is a limit that applies; a global limit lowered under the default per-sender one is a
    // global cap; with the limits off (the default) none applies
    for (const [args, env] of [
      [['--rateLimits.maxPerHour', '1000'], credentials],
      [['--rateLimits.globalMaxPerHour', '100', '--rateLimits.globalMaxPerDay', '1000'], credentials],
      [['--rateLimits.maxPerHour', '900', '--rateLimits.globalMaxPerHour', '100'], { ...credentials, RATE_LIMITS_ENABLED: 'false' }],
      [['--rateLimits.maxPerHour', '900', '--rateLimits.globalMaxPerHour', '100'], { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' }],
    ] as const) {
      const r = loadConfig([...args], env);
      assert.ok(r.ok);
      assert.deepEqual(r.warnings, [], args.join(' '));
    }
  });

  test('a queueSize too small for failedRetryInterval to put anything back gets a warning', () => {
    const credentials = { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' };
    for (const size of ['1', '3']) {
      const r = loadConfig(['--queueSize', size], credentials);
      assert.ok(r.ok);
      assert.deepEqual(r.warnings, [
        `failedRetryInterval puts failed mail back only while less than half of queueSize is in use: with queueSize ${size} that is never; retry failed mail by hand (relayq retry --failed) or raise queueSize to 4 or more`,
      ]);
    }
    for (const args of [['--queueSize', '4'], ['--queueSize', '0'], ['--queueSize', '2', '--failedRetryInterval', '0']]) {
      const r = loadConfig(args, credentials);
      assert.ok(r.ok);
      assert.deepEqual(r.warnings, [], args.join(' '));
    }
  });

  test('requireAuth for remote clients without tls.*: a warning that they cannot authenticate; none with TLS or only loopback', () => {
    const credentials = { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'a-long-random-password' };
    const remote = loadConfig([], { ...credentials, SECURITY_ALLOW_LOCAL_ONLY: 'false', SECURITY_ALLOWED_NETWORKS: '10.0.0.0/8' });
    assert.ok(remote.ok);
    assert.equal(remote.warnings.length, 1);
    assert.match(remote.warnings[0], /^security\.requireAuth with security\.allowLocalOnly=false and no tls\.cert\/tls\.key: clients other than loopback cannot authenticate/);
    for (const env of [{ ...credentials }, { ...credentials, SECURITY_ALLOW_LOCAL_ONLY: 'false', TLS_CERT: 'c.pem', TLS_KEY: 'k.pem' }, { SECURITY_REQUIRE_AUTH: 'false', SECURITY_ALLOW_LOCAL_ONLY: 'false', SECURITY_ALLOWED_NETWORKS: '10.0.0.0/8' }]) {
      const r = loadConfig([], env);
      assert.ok(r.ok);
      assert.deepEqual(r.warnings, [], JSON.stringify(env));
    }
  });

  test('a defaultPassword of fewer than 12 characters that non-loopback clients may log in with gets a warning; a longer one, or one for loopback only, does not', () => {
    const remote = { DEFAULT_USERNAME: 'u', SECURITY_ALLOW_LOCAL_ONLY: 'false', TLS_CERT: 'c.pem', TLS_KEY: 'k.pem' };
    const warned = loadConfig([], { ...remote, DEFAULT_PASSWORD: 'ß'.repeat(11) });
    assert.ok(warned.ok);
    assert.deepEqual(warned.warnings, [
      'defaultPassword is shorter than 12 characters, and clients other than loopback may log in with it (security.allowLocalOnly=false): ' +
        'at about two guesses a second from each address, a short one is found; use a long random one (openssl rand -hex 16)',
    ]);
    assert.ok(!warned.warnings[0].includes('ß'), 'the password itself is not shown');
    // characters, not bytes: 12 of them, 24 bytes in UTF-8, are enough
    for (const env of [{ ...remote, DEFAULT_PASSWORD: 'ß'.repeat(12) }, { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p' }, { ...remote, DEFAULT_PASSWORD: 'p', SECURITY_REQUIRE_AUTH: 'false', SECURITY_ALLOWED_NETWORKS: '10.0.0.0/8' }]) {
      const r = loadConfig([], env);
      assert.ok(r.ok);
      assert.deepEqual(r.warnings, [], JSON.stringify(env));
    }
  });

  test('requireAuth without credentials and allowLocalOnly=false is refused, saying how to fix it', () => {
    // with TLS set too: STARTTLS would not make up for the missing credentials
    for (const tls of [{}, { TLS_CERT: 'cert.pem', TLS_KEY: 'key.pem' }]) {
      const r = loadConfig([], { SECURITY_ALLOW_LOCAL_ONLY: 'false', ...tls });
      assert.equal(r.ok, false);
      if (r.ok) return;
      assert.equal(r.errors.length, 1);
      assert.equal(r.errors[0].key, 'defaultUsername');
      assert.match(r.errors[0].message, /DEFAULT_USERNAME and DEFAULT_PASSWORD/);
      assert.match(r.errors[0].message, /open relay/);
    }
  });

  test('inconsistent combinations come with the other errors, name the key to change and where the values came from', () => {
    const r = loadConfig(['--forwardSMTP'], { TLS_CERT: 'cert.pem', RETRY_MAX_DELAY: '10', SMTP_PORT: 'x' }, file({ retry: { initialDelay: 100 } }));
    assert.equal(r.ok, false);
    if (r.ok) return;
    assert.deepEqual(r.errors.map((e) => `${e.source}:${e.key}`).sort(), ['env:smtpPort', 'env:tls.key', 'file:retry.initialDelay', 'flag:forwardHost']);
    const message = (key: string) => r.errors.find((e) => e.key === key)?.message;
    assert.match(message('forwardHost')!, /required when forwardSMTP is true \[forwardSMTP from flag, forwardHost by default\]$/);
    assert.match(message('tls.key')!, /\[tls\.cert from env TLS_CERT, tls\.key by default\]$/);
    assert.match(message('retry.initialDelay')!, /\[retry\.initialDelay from file, retry\.maxDelay from env RETRY_MAX_DELAY\]$/);
    // the error names both sources, first the first key's
    const retry = r.errors.find((e) => e.key === 'retry.initialDelay')!;
    assert.deepEqual([retry.source, retry.alsoFrom], ['file', ['env']]);
    assert.equal(r.errors.find((e) => e.key === 'tls.key')!.alsoFrom, undefined);
  });

  test('a choice is taken in any case and with spaces around it, and a config file may start with a byte order mark', () => {
    for (const level of ['INFO', ' Info ']) {
      const r = loadConfig([], { LOG_LEVEL: level });
      assert.ok(r.ok && r.config.logLevel === 'info', level);
    }
    assert.match(errorMessages(loadConfig([], { LOG_LEVEL: 'verbose' }))[0], /^LOG_LEVEL \(logLevel\): must be one of fatal, error, warn, info, debug, trace, silent, got "verbose"$/);
    const file = path.join(tempDir(), 'config.json');
    fs.writeFileSync(file, '\uFEFF{"smtpPort": 2600}\n');
    const withBom = loadConfig([], {}, readConfigFile(file));
    assert.ok(withBom.ok && withBom.config.smtpPort === 2600, JSON.stringify(!withBom.ok && withBom.errors));
  });

  test('a key given twice in the file is refused by name, at any depth; the same name in two objects is not', () => {
    const text = '{"workerCount": 3, "retry": {"maxAttempts": 2, "maxAttempts": 4}, "rateLimits": {"enabled": true}, "workerCount": 4, "enabled": false}';
    const twice = loadConfig([], {}, { path: 'c.json', text });
    assert.ok(!twice.ok);
    assert.equal(
      formatErrors(twice.errors, 'c.json'),
      [
        'config error (file c.json): enabled: unknown key (did you mean rateLimits.enabled?)',
        'config error (file c.json): retry.maxAttempts: given more than once in the file; keep one (JSON would take the last without a word)',
        'config error (file c.json): workerCount: given more than once in the file; keep one (JSON would take the last without a word)',
      ].join('\n'),
    );
    // an object given twice: refused as such, and none of its keys is then said to be missing
    const object = loadConfig([], {}, { path: 'c.json', text: '{"tls": {"cert": "a.pem"}, "tls": {"key": "b.pem"}}' });
    assert.ok(!object.ok);
    assert.equal(
      formatErrors(object.errors, 'c.json'),
      'config error (file c.json): tls: given more than once in the file; keep one (JSON would take the last without a word)',
    );
    const once = loadConfig([], {}, { path: 'c.json', text: '{"retry": {"maxAttempts": 2}, "rateLimits": {"enabled": true, "maxPerHour": 5}, "security": {"logAllEmails": true}}' });
    assert.ok(once.ok, JSON.stringify(!once.ok && once.errors));
  });

  test('a file that nests deeper than any config is refused as such', () => {
    const text = `{"smtpPort": 2600, "x": ${'['.repeat(10_000)}${']'.repeat(10_000)}}`;
    const deep = loadConfig([], {}, { path: 'c.json', text });
    assert.ok(!deep.ok);
    assert.equal(formatErrors(deep.errors, 'c.json'), 'config error (file): c.json nests objects or arrays more than 32 levels deep');
  });

  test('an error of the file names the file once', () => {
    const text = '{"smtpPort": "x"';
    const broken = loadConfig([], {}, { path: 'c.json', text });
    assert.ok(!broken.ok);
    assert.match(formatErrors(broken.errors, 'c.json'), /^config error \(file\): c\.json is not valid JSON/);
    const wrong = loadConfig([], {}, { path: 'c.json', text: `${text}}` });
    assert.ok(!wrong.ok);
    assert.equal(formatErrors(wrong.errors, 'c.json'), 'config error (file c.json): smtpPort: must be an integer');
    // a relative path says where it was looked for
    const missing = loadConfig([], {}, readConfigFile('../no-such-dir/config.json'));
    assert.ok(!missing.ok);
    assert.match(missing.errors[0].message, /^cannot read \.\.\/no-such-dir\/config\.json: ENOENT.* \(looked for from (.*)\)$/);
    assert.ok(missing.errors[0].message.endsWith(`(looked for from ${process.cwd()})`));
  });

  test('SMTP AUTH needs both defaultUsername and defaultPassword, or neither', () => {
    const userOnly = loadConfig(['--defaultUsername', 'app'], {});
    assert.equal(userOnly.ok, false);
    if (userOnly.ok) return;
    assert.deepEqual(userOnly.errors.map((e) => `${e.source}:${e.key}`), ['flag:defaultPassword']);
    assert.match(userOnly.errors[0].message, /must be set together .* \[defaultUsername from flag, defaultPassword by default\]$/);
    const passwordOnly = loadConfig([], { DEFAULT_PASSWORD: 'secret' });
    assert.equal(passwordOnly.ok, false);
    if (passwordOnly.ok) return;
    assert.deepEqual(passwordOnly.errors.map((e) => `${e.source}:${e.key}`), ['env:defaultUsername']);
  });

  test('allowedNetworks: refused while allowLocalOnly is on (it would not be used), and open to every address counts as no list', () => {
    const unused = loadConfig([], { SECURITY_ALLOWED_NETWORKS: '10.0.0.0/8' });
    assert.equal(unused.ok, false);
    if (unused.ok) return;
    assert.deepEqual(unused.errors.map((e) => `${e.source}:${e.key}`), ['env:security.allowedNetworks']);
    assert.match(unused.errors[0].message, /applies only with security\.allowLocalOnly=false .*\[security\.allowLocalOnly by default, security\.allowedNetworks from env SECURITY_ALLOWED_NETWORKS\]$/);
    // the networks' ranges merged: a quarter of IPv4 or of 2000::/3, however it is cut up, is too much
    const quarterInPieces = ['64.0.0.0/8', '1.0.0.0/8', '2.0.0.0/7', '4.0.0.0/6', '8.0.0.0/5', '16.0.0.0/4', '32.0.0.0/3'];
    const everyOne = ['0.0.0.0/0', '10.0.0.0/8, ::/0', '0.0.0.0/1,128.0.0.0/1', '::ffff:0.0.0.0/96', '2000::/3', '0.0.0.0/2', '2000::/5'];
    for (const everyone of [...everyOne, quarterInPieces.join(','), '::ffff:64.0.0.0/98', '2400::/6,2800::/6', '2000::/6,2000::/7,2400::/6']) {
      const open = loadConfig([], { SECURITY_ALLOW_LOCAL_ONLY: 'false', SECURITY_REQUIRE_AUTH: 'false', SECURITY_ALLOWED_NETWORKS: everyone });
      assert.equal(open.ok, false, everyone);
      if (open.ok) return;
      assert.match(open.errors[0].message, /would be an open relay/);
    }
    // below a quarter: the private networks (half a percent of IPv4 in all, though they reach all
    // four quarters of it), a piece short of one, the same network listed twice, the rest of IPv6
    const below = ['10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fc00::/7', quarterInPieces.slice(1).join(','), '0.0.0.0/3,0.0.0.0/3', '4000::/2,fe80::/10'];
    for (const some of below) {
      const r = loadConfig([], { SECURITY_ALLOW_LOCAL_ONLY: 'false', SECURITY_REQUIRE_AUTH: 'false', SECURITY_ALLOWED_NETWORKS: some });
      assert.ok(r.ok, `${some}: ${JSON.stringify(!r.ok && r.errors)}`);
    }
  });

  test('requireAuth over plain text with an allowedNetworks that leaves out loopback: the warning says no client can send', () => {
    const credentials = { DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'a-long-random-password', SECURITY_ALLOW_LOCAL_ONLY: 'false' };
    const none = loadConfig([], { ...credentials, SECURITY_ALLOWED_NETWORKS: '10.0.0.0/8' });
    assert.ok(none.ok);
    assert.match(none.warnings[0], /does not list loopback: no client can send/);
    const local = loadConfig([], { ...credentials, SECURITY_ALLOWED_NETWORKS: '10.0.0.0/8,127.0.0.0/8' });
    assert.ok(local.ok);
    assert.doesNotMatch(local.warnings[0], /no client can send/);
  });

  test('an allowedNetworks entry with host bits set is taken for its network, with a warning naming it (as Postfix warns of mynetworks)', () => {
    const base = { SECURITY_ALLOW_LOCAL_ONLY: 'false', SECURITY_REQUIRE_AUTH: 'false' };
    const r = loadConfig([], { ...base, SECURITY_ALLOWED_NETWORKS: '192.168.1.10/24,10.0.0.0/8,2001:db8:1::5/32,::1,127.0.0.1/8' });
    assert.ok(r.ok);
    assert.deepEqual(r.warnings, [
      'security.allowedNetworks: "192.168.1.10/24" has host bits set: it admits all of 192.168.1.0/24, not 192.168.1.10 alone',
      'security.allowedNetworks: "2001:db8:1::5/32" has host bits set: it admits all of 2001:db8::/32, not 2001:db8:1::5 alone',
      'security.allowedNetworks: "127.0.0.1/8" has host bits set: it admits all of 127.0.0.0/8, not 127.0.0.1 alone',
    ]);
    const admits = clientFilter(r.config.security);
    assert.deepEqual(['192.168.1.200', '192.168.2.1', '2001:db8:ffff::1', '2001:db9::1'].map(admits), [true, false, true, false]);
    // no address (a socket already gone), or none that is an IP: not admitted
    assert.deepEqual([undefined, '', 'unknown'].map(admits), [false, false, false]);
  });

  test('an allowedNetworks entry that is not a CIDR is refused and quoted: a prefix length out of range or not in digits, a second slash', () => {
    const base = { SECURITY_ALLOW_LOCAL_ONLY: 'false', DEFAULT_USERNAME: 'u', DEFAULT_PASSWORD: 'p', TLS_CERT: 'c.pem', TLS_KEY: 'k.pem' };
    // from the file, where no item is trimmed: "10.0.0.0/" is not /0, which would admit every address
    for (const bad of ['10.0.0.0/33', '2001:db8::/129', '10.0.0.0/', '10.0.0.0/0x8', '10.0.0.0/8.0', '10.0.0.0/+8', '10.0.0.0/-1', '10.0.0.0/8/9', '10.0.0.256/8', 'relay.internal/8']) {
      const messages = errorMessages(loadConfig([], base, file({ security: { allowedNetworks: ['192.168.0.0/16', bad] } })));
      assert.deepEqual(messages, [`security.allowedNetworks: ${JSON.stringify(bad)} is not a CIDR (e.g. 10.0.0.0/8) [security.allowedNetworks from file]`], bad);
    }
    // the longest prefixes, and an address alone, are one host each
    const hosts = loadConfig([], { ...base, SECURITY_ALLOWED_NETWORKS: '10.1.2.3/32,2001:db8::1/128,192.0.2.7' });
    assert.ok(hosts.ok, JSON.stringify(!hosts.ok && hosts.errors));
    const admits = clientFilter(hosts.config.security);
    assert.deepEqual(['10.1.2.3', '10.1.2.4', '2001:db8::1', '2001:db8::2', '192.0.2.7', '192.0.2.6'].map(admits), [true, false, true, false, true, false]);
  });

  test('upstream AUTH needs both forwardUsername and forwardPassword when forwarding, or neither', () => {
    const forwarding = { FORWARD_SMTP: 'true', FORWARD_HOST: 'smtp.example.com' };
    const userOnly = loadConfig([], { ...forwarding, FORWARD_USERNAME: 'relay' });
    assert.equal(userOnly.ok, false);
    if (userOnly.ok) return;
    assert.deepEqual(
      userOnly.errors.map((e) => `${e.source}:${e.key}`),
      ['env:forwardPassword'],
    );
    assert.match(userOnly.errors[0].message, /must be set together .* \[forwardUsername from env FORWARD_USERNAME, forwardPassword by default\]$/);
    const passwordOnly = loadConfig(['--forwardPassword=secret'], forwarding);
    assert.equal(passwordOnly.ok, false);
    if (passwordOnly.ok) return;
    assert.deepEqual(
      passwordOnly.errors.map((e) => `${e.source}:${e.key}`),
      ['flag:forwardUsername'],
    );
    assert.equal(loadConfig([], { ...forwarding, FORWARD_USERNAME: 'relay', FORWARD_PASSWORD: 'secret' }).ok, true);
    assert.equal(loadConfig([], forwarding).ok, true);
    // not forwarding: the credentials are not used, so a half-filled pair does not stop the start
    assert.equal(loadConfig([], { FORWARD_USERNAME: 'relay' }).ok, true);
  });

  test('forwardHost is a host name or an IP address: a port, [brackets] or a stray space is refused, naming the key', () => {
    for (const bad of ['smtp.example.com:587', '[smtp.example.com]', '127.0.0.1:2525', 'dead:beef:25', '[2001:db8::1]', 'smtp.example.com ', 'a b', '-x.example.com', 'bücher.example']) {
      const r = loadConfig([], { FORWARD_SMTP: 'true', FORWARD_HOST: bad });
      assert.equal(r.ok, false, bad);
      if (r.ok) continue;
      assert.deepEqual(r.errors.map((e) => e.key), ['forwardHost'], bad);
      assert.match(r.errors[0].message, /without a port \(that is forwardPort\)/);
    }
    for (const good of ['smtp.example.com', 'smtp.example.com.', 'localhost', 'mail_relay', 'email-smtp.eu-west-1.amazonaws.com', '192.0.2.1', '2001:db8::1', '::1', '::ffff:192.0.2.1', 'fe80::1%eth0', 'xn--bcher-kva.example']) {
      assert.equal(loadConfig([], { FORWARD_SMTP: 'true', FORWARD_HOST: good }).ok, true, good);
    }
    assert.equal(loadConfig([], { FORWARD_HOST: '' }).ok, true, 'empty when not forwarding');
  });

  test("forwarding to relayq's own listener, or SMTP and HTTP on one port, is refused before anything listens", () => {
    const keys = (r: ReturnType<typeof loadConfig>) => (r.ok ? [] : r.errors.map((e) => e.key));
    const forward = (host: string, port: string) => ({ FORWARD_SMTP: 'true', FORWARD_HOST: host, FORWARD_PORT: port });
    const loop = loadConfig([], forward('localhost', '2525'));
    assert.deepEqual(keys(loop), ['forwardPort']);
    assert.match(loop.ok ? '' : loop.errors[0].message, /localhost:2525 is relayq's own SMTP listener/);
    // the Docker image listens on every interface, port 25
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '0.0.0.0', SMTP_PORT: '25', ...forward('127.0.0.1', '25') })), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '0.0.0.0', SMTP_PORT: '25', ...forward('smtp.example.com', '25') })), []);
    assert.deepEqual(keys(loadConfig([], forward('localhost', '587'))), []);
    // no loop while nothing is forwarded (local delivery, the upstream set up ahead)
    assert.deepEqual(keys(loadConfig([], { ...forward('localhost', '2525'), FORWARD_SMTP: 'false' })), []);
    // another loopback address is another listener: relayq in front of a Postfix on 127.0.0.1:25
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '127.0.0.2', SMTP_PORT: '25', ...forward('127.0.0.1', '25') })), []);
    assert.deepEqual(keys(loadConfig([], forward('::1', '2525'))), []);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::', SMTP_PORT: '25', ...forward('::1', '25') })), ['forwardPort']);
    // other spellings of the same listener: localhost and its address, a final dot, an IPv4-mapped address, this machine's name
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: 'localhost', ...forward('127.0.0.1', '2525') })), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::1', ...forward('localhost', '2525') })), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], forward('LOCALHOST.', '2525'))), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], forward('::ffff:127.0.0.1', '2525'))), ['forwardPort']);
    // an IPv6 address written out in full, an IPv4-mapped one in hexadecimal
    const spelledOut = loadConfig([], { SMTP_HOST: '::1', ...forward('0:0:0:0:0:0:0:1', '2525') });
    assert.deepEqual(keys(spelledOut), ['forwardPort']);
    assert.match(spelledOut.ok ? '' : spelledOut.errors[0].message, /forwardHost:forwardPort \[0:0:0:0:0:0:0:1\]:2525 is relayq's own SMTP listener/);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '0000::0001', ...forward('::1', '2525') })), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], forward('::FFFF:7F00:1', '2525'))), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::ffff:7f00:1', ...forward('localhost', '2525') })), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], forward('::ffff:7f00:2', '2525'))), []);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::1', ...forward('0:0:0:0:0:0:0:0', '2525') })), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '0.0.0.0', SMTP_PORT: '25', ...forward(os.hostname(), '25') })), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: 'localhost', ...forward('127.0.0.2', '2525') })), []);
    // connecting to 0.0.0.0 or :: reaches this machine's loopback address
    assert.deepEqual(keys(loadConfig([], forward('0.0.0.0', '2525'))), ['forwardPort']);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::1', ...forward('::', '2525') })), ['forwardPort']);
    // an IPv4 listener on every interface is no IPv6 one: connecting to :: or ::1 reaches another
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '0.0.0.0', SMTP_PORT: '25', ...forward('::', '25') })), []);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '0.0.0.0', SMTP_PORT: '25', ...forward('::1', '25') })), []);
    assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::', SMTP_PORT: '25', ...forward('0.0.0.0', '25') })), ['forwardPort']);
    // a listener on every interface is reached at each interface's address, also with its zone
    for (const { address, family } of Object.values(os.networkInterfaces()).flatMap((a) => a ?? [])) {
      assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::', SMTP_PORT: '25', ...forward(address, '25') })), ['forwardPort'], address);
      if (family === 'IPv6') assert.deepEqual(keys(loadConfig([], { SMTP_HOST: '::', SMTP_PORT: '25', ...forward(`${address.toUpperCase()}%eth0`, '25') })), ['forwardPort'], address);
    }
    // the system would read these as addresses (127.0.0.1, 0.0.0.0): no host names
    for (const name of ['127.1', '0', '10.0.0.1.']) assert.deepEqual(keys(loadConfig([], forward(name, '2525'))), ['forwardHost'], name);

    assert.deepEqual(keys(loadConfig(['--smtpPort', '8025'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpPort', '8025', '--healthCheckHost', '0.0.0.0'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpPort', '8025', '--enableHealthCheck', 'false'], {})), []);
    assert.deepEqual(keys(loadConfig(['--smtpPort', '8025', '--healthCheckHost', '127.0.0.2'], {})), []);
    // the same spellings of one address as above
    assert.deepEqual(keys(loadConfig(['--smtpHost', 'localhost', '--smtpPort', '8025'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpHost', '::1', '--smtpPort', '8025', '--healthCheckHost', 'LOCALHOST.'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpPort', '8025', '--healthCheckHost', '::ffff:127.0.0.1'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpHost', '::1', '--smtpPort', '8025', '--healthCheckHost', '0:0:0:0:0:0:0:1'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpHost', '::1', '--smtpPort', '8025', '--healthCheckHost', '0:0:0:0:0:0:0:0'], {})), ['healthCheckPort']);
    // 0.0.0.0 and ::1 are two listeners that coexist; :: takes IPv4 too
    assert.deepEqual(keys(loadConfig(['--smtpHost', '0.0.0.0', '--smtpPort', '8025', '--healthCheckHost', '::1'], {})), []);
    assert.deepEqual(keys(loadConfig(['--smtpHost', '::ffff:0.0.0.0', '--smtpPort', '8025', '--healthCheckHost', '::1'], {})), []);
    assert.deepEqual(keys(loadConfig(['--smtpHost', '0.0.0.0', '--smtpPort', '8025', '--healthCheckHost', '127.0.0.2'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpHost', '::', '--smtpPort', '8025', '--healthCheckHost', '127.0.0.2'], {})), ['healthCheckPort']);
    assert.deepEqual(keys(loadConfig(['--smtpHost', 'localhost', '--smtpPort', '8025', '--healthCheckHost', '127.0.0.2'], {})), []);
    assert.deepEqual(keys(loadConfig(['--smtpPort', '0', '--healthCheckPort', '0'], {})), []);
  });

  test("an integer key with a unit says which, and what a Postfix-style value (5d, 1s, 25M) would be in it", () => {
    assert.deepEqual(errorMessages(loadConfig([], { RETRY_MAX_AGE: '5d', BATCH_DELAY: '1s', MAX_MESSAGE_SIZE: '25M', PROCESSING_TIMEOUT: '1500ms', WORKER_COUNT: '5x' })), [
      'BATCH_DELAY (batchDelay): must be an integer number of milliseconds, got "1s" (1s is 1000)',
      'WORKER_COUNT (workerCount): must be an integer, got "5x"',
      'PROCESSING_TIMEOUT (processingTimeout): must be an integer number of seconds, got "1500ms"',
      'MAX_MESSAGE_SIZE (maxMessageSize): must be an integer number of bytes, got "25M" (25M is 26214400)',
      'RETRY_MAX_AGE (retry.maxAge): must be an integer number of seconds, got "5d" (5d is 432000)',
    ]);
    const text = JSON.stringify({ retry: { maxAge: '5d', maxDelay: 'soon' }, spoolAfter: '256KiB' });
    assert.deepEqual(errorMessages(loadConfig([], {}, { path: 'c.json', text })), [
      'retry.maxAge: must be an integer number of seconds, got "5d" (5d is 432000)',
      'retry.maxDelay: must be an integer number of seconds',
      'spoolAfter: must be an integer number of bytes, got "256KiB" (256KiB is 262144)',
    ]);
  });

  test('a combination with a key whose own value was refused is not reported a second time', () => {
    const r = loadConfig([], { RETRY_INITIAL_DELAY: 'soon', RETRY_MAX_DELAY: '10' });
    assert.equal(r.ok, false);
    if (r.ok) return;
    assert.equal(r.errors.length, 1);
    assert.equal(r.errors[0].key, 'retry.initialDelay');
    assert.match(r.errors[0].message, /RETRY_INITIAL_DELAY \(retry\.initialDelay\): must be an integer/);
    // nor one that another key is named for: the credentials error assumed requireAuth's default
    assert.deepEqual(errorMessages(loadConfig([], { SECURITY_REQUIRE_AUTH: 'maybe', SECURITY_ALLOW_LOCAL_ONLY: 'false' })), [
      'SECURITY_REQUIRE_AUTH (security.requireAuth): must be true/false/1/0/yes/no, got "maybe"',
    ]);
  });

  test('a URL refused as forwardHost is shown without its password', () => {
    assert.deepEqual(errorMessages(loadConfig([], { FORWARD_SMTP: 'true', FORWARD_HOST: 'smtps://mailer:S3cr3t-pass@smtp.example.com:465' })), [
      'FORWARD_HOST (forwardHost): must be a host name (xn-- for an internationalized one) or an IP address, without a port (that is forwardPort) or [brackets], got "smtps://mailer:***@smtp.example.com:465"',
    ]);
    // a / or an @ in the password, and no scheme at all
    for (const [host, shown] of [
      ['smtp://u:pa/ss@mx.example.net', 'smtp://u:***@mx.example.net'],
      ['smtp://u:p@ss@mx.example.net', 'smtp://u:***@mx.example.net'],
      ['u:secret@mx.example.net', 'u:***@mx.example.net'],
    ]) {
      const [message] = errorMessages(loadConfig([], { FORWARD_SMTP: 'true', FORWARD_HOST: host }));
      assert.ok(message.endsWith(`got "${shown}"`), message);
    }
  });

  test('retry.initialDelay is at least 1 s: with 0 no retry would ever wait', () => {
    assert.deepEqual(errorMessages(loadConfig([], { RETRY_INITIAL_DELAY: '0' })), ['RETRY_INITIAL_DELAY (retry.initialDelay): must be at least 1, got 0']);
    const ok = loadConfig([], { RETRY_INITIAL_DELAY: '1' });
    assert.ok(ok.ok && ok.config.retry.initialDelay === 1);
    // and so is retry.maxDelay, which initialDelay may not exceed: its own range says so
    assert.deepEqual(errorMessages(loadConfig([], { RETRY_INITIAL_DELAY: '1', RETRY_MAX_DELAY: '0' })), ['RETRY_MAX_DELAY (retry.maxDelay): must be at least 1, got 0']);
  });

  test('an integer with anything after its digits is refused, not read as NaN or as a number in another notation', () => {
    assert.deepEqual(errorMessages(loadConfig(['--workerCount', '1e3'], { SMTP_PORT: '25x' })), [
      'SMTP_PORT (smtpPort): must be an integer, got "25x"',
      '--workerCount: must be an integer, got "1e3"',
    ]);
  });

  test('the largest maxMessageSize, with room for the Received header, fits in one SQLite value', async () => {
    const store = await openStore(path.join(tempDir(), 'limit.db'));
    try {
      const length = (n: number) => (store.sqlite.prepare('SELECT length(zeroblob(?)) AS n').get(n) as { n: number }).n;
      assert.equal(length(MAX_MESSAGE_SIZE_LIMIT + 65536), MAX_MESSAGE_SIZE_LIMIT + 65536);
      // the bound is not needlessly low either: twice it does not fit
      assert.throws(() => length(2 * MAX_MESSAGE_SIZE_LIMIT), /too big/);
    } finally {
      await store.close();
    }
    const r = loadConfig([`--maxMessageSize=${MAX_MESSAGE_SIZE_LIMIT + 1}`], {});
    assert.equal(r.ok, false);
    if (r.ok) return;
    assert.deepEqual(r.errors.map((e) => e.key), ['maxMessageSize']);
    assert.match(r.errors[0].message, /at most 524288000/);
  });

  test('a flag without its value is an error that says so, and an unknown flag is named without its value', () => {
    const r = loadConfig(['--serverName=relay.test', '--defaultPasword=TopSecret1', '--smtpPort'], {});
    assert.equal(r.ok, false);
    if (r.ok) return;
    assert.deepEqual(
      r.errors.map((e) => `${e.key}: ${e.message}`),
      ['--defaultPasword: unknown option --defaultPasword (did you mean --defaultPassword?)', 'smtpPort: --smtpPort needs a value'],
    );
    assert.doesNotMatch(JSON.stringify(r.errors), /TopSecret1/);
    // a boolean flag on its own means true
    const b = loadConfig(['--forwardSSL'], {});
    assert.ok(b.ok && b.config.forwardSSL);
  });

  test('serverName, written into Received: and sent in EHLO, is a host name or an address literal', () => {
    // a ( opens a comment in Received:, a ; ends its clauses, CR LF would inject a header
    const bad = ['evil\r\nX-Injected: yes', 'two words', '', 'relay;x(y', '-bad..name', 'relay.(primary)', '[2001:db8::1]', '[IPv6:192.0.2.1]', '[relay]'];
    for (const name of bad) {
      const r = loadConfig([], { SERVER_NAME: name });
      assert.equal(r.ok, false, JSON.stringify(name));
      if (r.ok) return;
      assert.deepEqual(r.errors.map((e) => e.key), ['serverName']);
      assert.match(r.errors[0].message, /^SERVER_NAME \(serverName\): must be a host name in ASCII .* or an address literal like \[192\.0\.2\.25\]/);
    }
    for (const name of ['mx-1.relay.example.com', 'mailhost', 'relay_1.internal.', '[192.0.2.25]', '[IPv6:2001:db8::25]']) {
      const ok = loadConfig(['--serverName', name], {});
      assert.ok(ok.ok && ok.config.serverName === name, name);
    }
  });

  test('listen addresses must be given: an empty one (an unset variable in a compose file) would mean every interface', () => {
    assert.deepEqual(errorMessages(loadConfig([], { SMTP_HOST: '', HEALTH_CHECK_HOST: ' ' })), [
      'SMTP_HOST (smtpHost): must be an IP address or host name, without [brackets] or a port (0.0.0.0 or :: for every interface), got ""',
      'HEALTH_CHECK_HOST (healthCheckHost): must be an IP address or host name, without [brackets] or a port (0.0.0.0 or :: for every interface), got " "',
    ]);
    // Postfix's inet_interfaces form, or a port: Node would look either up as a name, and fail at the start
    assert.deepEqual(errorMessages(loadConfig(['--smtpHost', '[::1]', '--healthCheckHost', '127.0.0.1:8025'], {})), [
      '--smtpHost: must be an IP address or host name, without [brackets] or a port (0.0.0.0 or :: for every interface), got "[::1]"',
      '--healthCheckHost: must be an IP address or host name, without [brackets] or a port (0.0.0.0 or :: for every interface), got "127.0.0.1:8025"',
    ]);
    for (const host of ['0.0.0.0', '::', '::1', 'relay.internal']) {
      const ok = loadConfig([], { SMTP_HOST: host, HEALTH_CHECK_HOST: host });
      assert.ok(ok.ok && ok.config.smtpHost === host && ok.config.healthCheckHost === host, host);
    }
  });

  test('the database and the emails directory must be named: an empty path (an unset variable in a compose file) and an in-memory database are refused', () => {
    const database = 'must be the path of a file (not empty, nor ":memory:", which keeps nothing)';
    assert.deepEqual(errorMessages(loadConfig([], { DATABASE_PATH: '', EMAILS_DIR: '' })), [
      `DATABASE_PATH (databasePath): ${database}, got ""`,
      'EMAILS_DIR (emailsDir): must be a path (not empty), got ""',
    ]);
    assert.deepEqual(errorMessages(loadConfig(['--databasePath', ''], {})), [`--databasePath: ${database}, got ""`]);
    assert.deepEqual(errorMessages(loadConfig(['--databasePath', ':memory:'], {})), [`--databasePath: ${database}, got ":memory:"`]);
    for (const file of ['q.db', './:memory:', ':memory:.db']) {
      const ok = loadConfig([], { DATABASE_PATH: file, EMAILS_DIR: 'mail' });
      assert.ok(ok.ok && ok.config.databasePath === file && ok.config.emailsDir === 'mail', file);
    }
  });

  test('an adminToken that is short, or has a space a Bearer header cannot carry, is refused without showing it', () => {
    const rule = 'must be empty, or at least 16 printable ASCII characters without spaces (openssl rand -hex 32 makes one)';
    for (const bad of ['open sesame and more', 'trailing-space-token ', 'tab\there-and-there', 'admin', '15-characters!!']) {
      assert.deepEqual(errorMessages(loadConfig([], { SECURITY_ADMIN_TOKEN: bad })), [`SECURITY_ADMIN_TOKEN (security.adminToken): ${rule}`], bad);
    }
    const file = loadConfig([], {}, { path: 'c.json', text: JSON.stringify({ security: { adminToken: 'two words, long enough' } }) });
    assert.deepEqual(errorMessages(file), [`security.adminToken: ${rule}`]);
    const ok = loadConfig([], { SECURITY_ADMIN_TOKEN: 'k9-Qx7mT2vLr8cWz' });
    assert.ok(ok.ok && ok.config.security.adminToken === 'k9-Qx7mT2vLr8cWz');
  });

  test('a config file that is not JSON is located by line and column, and none of its text is shown (it may be a password)', () => {
    const cases: Array<[string, RegExp]> = [
      ['{\n  "smtpPort": 25,\n  "defaultPassword": \'Tr0ub4dor&3\'\n}', /^c\.json is not valid JSON: unexpected character at line 3, column 22 \(strings must be in double quotes\)$/],
      ['{"defaultPassword": hunter2secret}', /^c\.json is not valid JSON: unexpected character at line 1, column 21 \(strings must be in double quotes\)$/],
      ['{"defaultPassword": "abc"Tr0ub4dor"}', /^c\.json is not valid JSON: .* at line 1, column 26$/],
      ['{"smtpPort": 25,}', /^c\.json is not valid JSON: (?!.*after the object).* at line 1, column 17$/],
      ['{"smtpPort": ', /^c\.json is not valid JSON: unexpected end of the file$/],
      ['{\n  // the relay\n  "smtpPort": 25\n}', /^c\.json is not valid JSON: .* at line 2, column 3 \(JSON takes no comments\)$/],
      ['{"smtpPort": 25, /* the port */ "forwardPort": 587}', /^c\.json is not valid JSON: .* at line 1, column 18 \(JSON takes no comments\)$/],
      ['{"smtpPort": /* the port */ 25}', /^c\.json is not valid JSON: .* at line 1, column 14 \(JSON takes no comments\)$/],
      // under 21 characters, which V8's message quotes whole, without a position
      ['{"smtpPort":x}\n', /^c\.json is not valid JSON: unexpected character at line 1, column 13 \(strings must be in double quotes\)$/],
      ['{"a":{}, "b":}', /^c\.json is not valid JSON: unexpected character at line 1, column 14$/],
      // in the first ten characters of a longer text, which V8 quotes with no leading "..."
      ['{"a":x, "bbbbbbbbbbbbbbbbbbbbbb": 2}', /^c\.json is not valid JSON: unexpected character at line 1, column 6 \(strings must be in double quotes\)$/],
      ['{"a": True, "smtpPort": 25}', /^c\.json is not valid JSON: unexpected character at line 1, column 7 \(JSON writes true, false and null in lower case\)$/],
      // text past the end of the object is said to be there
      ['{"a":1}\n\n}', /^c\.json is not valid JSON: .* after the object at line 3, column 1$/],
      // a word of Python's or YAML's
      ['{"forwardSMTP": True, "smtpPort": 2525}', /^c\.json is not valid JSON: unexpected character at line 1, column 17 \(JSON writes true, false and null in lower case\)$/],
      ['{"forwardSMTP": FALSE}', /^c\.json is not valid JSON: unexpected character at line 1, column 17 \(JSON writes true, false and null in lower case\)$/],
      // a colon missing before a lower-case one: not that hint
      // (V8 names what it expected since Node 22)
      ['{"smtpPort": 25, "forwardSMTP" false}', /^c\.json is not valid JSON: (unexpected character|Expected ':' after property name) at line 1, column 32$/],
    ];
    for (const [text, expected] of cases) {
      const messages = errorMessages(loadConfig([], {}, { path: 'c.json', text }));
      assert.equal(messages.length, 1);
      assert.match(messages[0], expected, text);
      assert.doesNotMatch(messages[0], /Tr0ub|hunter2|assword/, text);
    }
  });

  test('a password may start with --, another value may not; a word after a password that went unquoted is not shown', () => {
    const r = loadConfig(['--defaultUsername', 'app', '--defaultPassword', '--Sup3rSecret', '--forwardSMTP', '--forwardHost', 'smtp.example.com'], {});
    assert.ok(r.ok && r.config.defaultPassword === '--Sup3rSecret' && r.config.forwardSMTP && r.config.forwardHost === 'smtp.example.com');
    // an unset variable ($PORT, $UPSTREAM) leaves a flag without its value: said so, the next flag keeps its own
    assert.deepEqual(errorMessages(loadConfig(['--defaultUsername', 'app', '--smtpPort', '--defaultPassword', 'hunter2Secret'], {})), ['--smtpPort needs a value']);
    assert.deepEqual(errorMessages(loadConfig(['--defaultUsername', 'app', '--serverName', '--defaultPassword=hunter2Secret'], {})), ['--serverName needs a value']);
    assert.deepEqual(errorMessages(loadConfig(['--forwardHost', '--forwardSMTP'], {})), ['--forwardHost needs a value']);
    assert.deepEqual(errorMessages(loadConfig(['--defaultPassword', '--logLevel', 'debug'], {})), ['--defaultPassword needs a value']);
    const split = errorMessages(loadConfig(['--forwardPassword', 'correct', 'horse', 'battery', 'staple', '--serverName', 'a', 'stray'], {}));
    assert.deepEqual(split, [
      "unexpected argument: the words after --forwardPassword's value (quote a value that has spaces)",
      'unexpected argument: stray',
    ]);
  });

  test('the value of a mistyped password or token flag is not shown either, also when it starts with -- or has spaces', () => {
    const cases: Array<[string[], string[]]> = [
      [['--defaultPasword', '--x7Secret'], ['unknown option --defaultPasword (did you mean --defaultPassword?)']],
      [
        ['--defaultPasword', 'foo', 'barSecret', 'bazSecret'],
        ['unknown option --defaultPasword (did you mean --defaultPassword?)', "unexpected argument: the words after --defaultPasword's value (quote a value that has spaces)"],
      ],
      [['--security.adminToken=has', 'spaceSecret', 'andmoreSecret'], ["unexpected argument: the words after --security.adminToken's value (quote a value that has spaces)", '--security.adminToken: must be empty, or at least 16 printable ASCII characters without spaces (openssl rand -hex 32 makes one)']],
      // one dash, or the environment variable's name, given as a flag: named without the value
      [['-defaultPassword=hunter2Secret'], ['unexpected argument: -defaultPassword=…']],
      [['=hunter2Secret'], ['unexpected argument: =…']],
      [['DEFAULT_PASSWORD=hunter2Secret', '--smtpPort', '2600', 'x'], ['unexpected argument: DEFAULT_PASSWORD=…', 'unexpected argument: x']],
      [['DEFAULT_PASSWORD=correct', 'horseSecret', 'batterySecret'], ['unexpected argument: DEFAULT_PASSWORD=…', 'unexpected argument: the words after DEFAULT_PASSWORD=…']],
      [['-forwardPassword=partOne', 'partTwoSecret'], ['unexpected argument: -forwardPassword=…', 'unexpected argument: the words after -forwardPassword=…']],
      [['-forwardPassword', 'twoSecret', 'wordsSecret'], ['unexpected argument: -forwardPassword', 'unexpected argument: the words after -forwardPassword']],
      [['--forward-pass', '--hunter2Secret'], ['unknown option --forward-pass']],
      [['--security.admintoken', '--tokenSecret', '--smtpPort', '2600'], ['unknown option --security.admintoken (did you mean --security.adminToken?)']],
      // any other unknown flag takes no value that looks like a flag: both are named
      [['--smtpPrt', '--serverNam'], ['unknown option --smtpPrt (did you mean --smtpPort?)', 'unknown option --serverNam (did you mean --serverName?)']],
      // one dash too many: still a name
      [['---smtpPort', '2600'], ['unknown option ---smtpPort (did you mean --smtpPort?)']],
    ];
    for (const [argv, expected] of cases) {
      const r = loadConfig(argv, {});
      assert.deepEqual(errorMessages(r), expected, argv.join(' '));
      assert.doesNotMatch(JSON.stringify(r), /Secret/, argv.join(' '));
    }
  });

  test('an empty --config is an error, not a silent fallback to ./config.json', () => {
    assert.deepEqual(errorMessages(loadConfig(['--config', ''], {})), ['--config needs a value']);
    assert.deepEqual(errorMessages(loadConfig(['--config='], {})), ['--config needs a value']);
    // nothing after = for a number or a boolean; for a string it is the empty string
    assert.deepEqual(errorMessages(loadConfig(['--queueSize=', '--forwardSMTP='], {})), ['--queueSize needs a value', '--forwardSMTP needs a value']);
    const empty = loadConfig(['--forwardHost=', '--serverName=relay.example.com', '--defaultUsername='], {});
    assert.ok(empty.ok);
    assert.deepEqual([empty.config.forwardHost, empty.config.defaultUsername], ['', '']);
  });

  test('the config file is --config FILE, else RELAYQ_CONFIG, else ./config.json', () => {
    const dir = tempDir();
    for (const [name, smtpPort] of [['config.json', 2601], ['env.json', 2602], ['flag.json', 2603]] as const) {
      fs.writeFileSync(path.join(dir, name), JSON.stringify({ smtpPort }));
    }
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      const port = (argv: string[], env: NodeJS.ProcessEnv) => {
        const r = loadConfigFromSources(argv, env);
        assert.ok(r.ok, r.ok ? '' : r.message);
        return r.config.smtpPort;
      };
      assert.equal(port(['--config', 'flag.json'], { RELAYQ_CONFIG: 'env.json' }), 2603);
      assert.equal(port([], { RELAYQ_CONFIG: 'env.json' }), 2602);
      assert.equal(port([], {}), 2601);
    } finally {
      process.chdir(cwd);
    }
  });

  test('a password or token given as a flag gets a warning: every user may read it in ps; not in the environment', () => {
    const flags = loadConfig(['--defaultUsername', 'app', '--defaultPassword', 'pw-Secret', '--security.adminToken', 'token-Secret-0123456789'], {});
    assert.ok(flags.ok);
    const said = flags.warnings.filter((w) => w.includes('(ps)'));
    assert.deepEqual(said, ['--defaultPassword, --security.adminToken on the command line: every user of this machine may read them there (ps); give them in the environment or the config file']);
    assert.doesNotMatch(JSON.stringify(flags.warnings), /Secret/);
    const env = loadConfig(['--defaultUsername', 'app'], { DEFAULT_PASSWORD: 'pw-Secret' });
    assert.ok(env.ok);
    assert.deepEqual(env.warnings.filter((w) => w.includes('(ps)')), []);
  });

  test('a ./config.json that is a link to nothing is an error, not a start on the defaults', () => {
    const dir = tempDir();
    fs.symlinkSync(path.join(dir, 'provisioned', 'relayq.json'), path.join(dir, 'config.json'));
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      const r = loadConfigFromSources([], {});
      assert.equal(r.ok, false);
      assert.match(r.ok ? '' : r.message, /^config error \(file\): cannot read .*config\.json: ENOENT/);
    } finally {
      process.chdir(cwd);
    }
  });

  test('a file that cannot be read or parsed sets nothing: no combination is judged on a key it may set', () => {
    const broken = { path: 'c.json', text: '{"forwardHost": "smtp.example.net",}' };
    const r = loadConfig([], { FORWARD_SMTP: '1', SECURITY_ALLOW_LOCAL_ONLY: '0' }, broken);
    assert.deepEqual(
      errorMessages(r).map((m) => m.replace(/:.*/, '')),
      ['c.json is not valid JSON'],
    );
    const missing = loadConfig([], { FORWARD_SMTP: '1' }, readConfigFile('no-such-dir/config.json'));
    assert.equal(errorMessages(missing).length, 1);
    // what the environment and flags give on their own is judged all the same
    const both = loadConfig(['--forwardHost', '127.0.0.1', '--forwardPort', '2525', '--smtpHost', '127.0.0.1', '--smtpPort', '2525'], { FORWARD_SMTP: '1' }, broken);
    assert.equal(errorMessages(both).length, 2);
    assert.match(errorMessages(both)[1], /relayq's own SMTP listener/);
  });

  test('an empty RELAYQ_CONFIG (an unset variable in compose) is an error, not a silent fallback to ./config.json', () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ smtpPort: 2600 }));
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      const empty = loadConfigFromSources([], { RELAYQ_CONFIG: '' });
      assert.deepEqual(empty, { ok: false, message: "config error (env): RELAYQ_CONFIG is empty: set it to the config file's path, or unset it to read ./config.json" });
      // --config wins over it, and unset it falls back
      const named = loadConfigFromSources(['--config', 'config.json'], { RELAYQ_CONFIG: '' });
      assert.ok(named.ok && named.config.smtpPort === 2600);
      const unset = loadConfigFromSources([], {});
      assert.ok(unset.ok && unset.config.smtpPort === 2600);
    } finally {
      process.chdir(cwd);
    }
  });

  test('a start that fails also says which environment variables looked mistyped: they may be the reason', () => {
    const r = loadConfigFromSources(['--config', path.join(REPO_ROOT, 'config.example.json')], { FORWARD_SMTP: '1', FORWARD_HOSTT: 'smtp.example.com' });
    assert.ok(!r.ok);
    assert.deepEqual(r.message.split('\n'), [
      `config error (env, file ${path.join(REPO_ROOT, 'config.example.json')}): forwardHost is required when forwardSMTP is true [forwardSMTP from env FORWARD_SMTP, forwardHost from file]`,
      'warning: FORWARD_HOSTT: not an environment variable relayq reads, so it is ignored (did you mean FORWARD_HOST?)',
    ]);
  });

  test('a certificate or key given as PEM text instead of a path is refused and never shown', () => {
    const pem = '-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKeySecret\n-----END PRIVATE KEY-----\n';
    const fromEnv = loadConfig([], { TLS_CERT: 'cert.pem', TLS_KEY: pem });
    const fromFile = loadConfig([], {}, { path: 'c.json', text: JSON.stringify({ tls: { cert: pem.replace('PRIVATE KEY', 'CERTIFICATE'), key: 'key.pem' } }) });
    const oneLine = loadConfig(['--tls.cert', 'cert.pem', '--tls.key', '-----BEGIN PRIVATE KEY----- MC4CAQAwBQYDK2VwBCIEIKeySecret'], {});
    assert.deepEqual(errorMessages(fromEnv), ['TLS_KEY (tls.key): must be the path of a PEM file, not its text (write the text to a file and give its path)']);
    assert.deepEqual(errorMessages(fromFile), ['tls.cert: must be the path of a PEM file, not its text (write the text to a file and give its path)']);
    assert.deepEqual(errorMessages(oneLine), ['--tls.key: must be the path of a PEM file, not its text (write the text to a file and give its path)']);
    // nor taken for an option: it starts with --
    const stray = loadConfig(['--tls.cert', 'cert.pem', '--tls.key', 'key.pem', '-----BEGIN PRIVATE KEY----- MC4CAQAwBQYDK2VwBCIEIKeySecret'], {});
    assert.deepEqual(errorMessages(stray), ['unexpected argument: an argument that starts with -- but is no option name']);
    // unquoted (`--tls.key $(cat key.pem)`): its lines are words of their own, and none is shown
    const unquoted = loadConfig(['--tls.cert', 'cert.pem', '--tls.key', ...pem.split(/\s+/).filter(Boolean)], {});
    assert.deepEqual(errorMessages(unquoted), [
      "unexpected argument: the words after --tls.key's value (quote a value that has spaces)",
      'unexpected argument: an argument that starts with -- but is no option name',
      'unexpected argument: the words after it',
      '--tls.key: must be the path of a PEM file, not its text (write the text to a file and give its path)',
    ]);
    assert.doesNotMatch(JSON.stringify([fromEnv, fromFile, oneLine, stray, unquoted]), /KeySecret/);
  });

  test('the file nests its keys: a dotted name is an unknown key that says how to write it', () => {
    const text = JSON.stringify({ security: { requireAuth: true }, 'security.requireAuth': false, 'rateLimits.maxPerHour': 7 });
    assert.deepEqual(errorMessages(loadConfig([], {}, { path: 'c.json', text })), [
      'security.requireAuth: unknown key (write it nested: {"security": {"requireAuth": …})',
      'rateLimits.maxPerHour: unknown key (write it nested: {"rateLimits": {"maxPerHour": …})',
    ]);
  });

  test('an unknown key or flag that is a known one but for case, punctuation or a letter or two says which', () => {
    const text = JSON.stringify({
      workercount: 3,
      security: { requireauth: true },
      ratelimits: {},
      tls: { crt: 'a.pem' },
      retention: { x: 1, maxAge: 5 },
      forwardPrt: 25,
      maxmessagesze: 1,
      port: 1,
      zzz: 1,
      // the name of a section's key outside any section; in a section, not sent to another
      requireAuth: false,
      retry: { maxPerHour: 5 },
    });
    assert.deepEqual(errorMessages(loadConfig(['--worker_count=3', '--forwardhost', 'h', '--confg', 'c.json', '--rateLimits', '--nope', '--maxAttempts', '3'], {}, { path: 'c.json', text })), [
      'workercount: unknown key (did you mean workerCount?)',
      'security.requireauth: unknown key (did you mean security.requireAuth?)',
      'ratelimits: unknown key (did you mean rateLimits?)',
      'tls.crt: unknown key (did you mean tls.cert?)',
      // not the section it is in
      'retention.x: unknown key',
      'retention.maxAge: unknown key',
      'forwardPrt: unknown key (did you mean forwardPort?)',
      'maxmessagesze: unknown key (did you mean maxMessageSize?)',
      // a short name is not guessed at: smtpPort, healthCheckPort or forwardPort?
      'port: unknown key',
      'zzz: unknown key',
      'requireAuth: unknown key (did you mean security.requireAuth?)',
      'retry.maxPerHour: unknown key',
      'unknown option --worker_count (did you mean --workerCount?)',
      'unknown option --forwardhost (did you mean --forwardHost?)',
      'unknown option --confg (did you mean --config?)',
      // an object, not a flag: its keys are
      'unknown option --rateLimits',
      'unknown option --nope',
      'unknown option --maxAttempts (did you mean --retry.maxAttempts?)',
    ]);
  });

  test('a long unknown key three letters off a known one gets no guess: two letters off is the most that is said to be a typo', () => {
    // maxMessageSize with three letters replaced (two would be guessed, as maxmessagesze is)
    const text = JSON.stringify({ maxmassegesiza: 1, maxmassegesize: 1 });
    assert.deepEqual(errorMessages(loadConfig([], {}, { path: 'c.json', text })), [
      'maxmassegesiza: unknown key',
      'maxmassegesize: unknown key (did you mean maxMessageSize?)',
    ]);
  });

  test("an environment variable that is relayq's but for a letter or its underscores gets a warning and is ignored; other programs' are left alone", () => {
    const env = {
      DEFAULT_USERNAME: 'u',
      DEFAULT_PASSWORD: 'p',
      WORKER_CONT: '3',
      HEALTHCHECK_PORT: '9000',
      log_level: 'debug',
      // other programs' variables, some of them close to relayq's names, and the compose file's own
      RELAYQ_ADMIN_TOKEN: 'not-shown',
      PATH: '/usr/bin',
      HOSTNAME: 'h',
      PORT: '8080',
      MAIL_PORT: '25',
      SMTP_PASSWORD: 'x',
      KUBERNETES_SERVICE_HOST: '10.0.0.1',
      npm_config_loglevel: 'warn',
      NODE_ENV: 'production',
    };
    const r = loadConfig([], env);
    assert.ok(r.ok, JSON.stringify(r));
    assert.deepEqual(r.warnings, [
      'WORKER_CONT: not an environment variable relayq reads, so it is ignored (did you mean WORKER_COUNT?)',
      'HEALTHCHECK_PORT: not an environment variable relayq reads, so it is ignored (did you mean HEALTH_CHECK_PORT?)',
      'log_level: not an environment variable relayq reads, so it is ignored (did you mean LOG_LEVEL?)',
    ]);
    assert.deepEqual([r.config.workerCount, r.config.healthCheckPort, r.config.logLevel], [5, 8025, 'info']);
  });

  test('a number out of range is quoted as it was written', () => {
    assert.deepEqual(errorMessages(loadConfig([], { SMTP_PORT: '99999999999999999999999' })), ['SMTP_PORT (smtpPort): must be at most 65535, got 99999999999999999999999']);
  });

  test('a range includes its bounds: the lowest and highest value of a key are taken, one past either is refused', () => {
    const edges = loadConfig(['--smtpPort', '65535', '--forwardPort', '1', '--healthCheckPort', '65534', `--maxMessageSize=${MAX_MESSAGE_SIZE_LIMIT}`, '--batchSize', '10000'], {});
    assert.ok(edges.ok, JSON.stringify(!edges.ok && edges.errors));
    assert.deepEqual([edges.config.smtpPort, edges.config.forwardPort, edges.config.maxMessageSize, edges.config.batchSize], [65535, 1, MAX_MESSAGE_SIZE_LIMIT, 10000]);
    // port 0 is no upstream port (a listen port 0 is: the system picks one)
    assert.deepEqual(errorMessages(loadConfig([], { FORWARD_PORT: '0', BATCH_SIZE: '10001' })), ['FORWARD_PORT (forwardPort): must be at least 1, got 0', 'BATCH_SIZE (batchSize): must be at most 10000, got 10001']);
  });

  test('an hourly rate limit over the daily one is refused, per sender and for all senders; equal ones are taken, as is a retry delay that starts at its cap', () => {
    const r = loadConfig([], { RATE_LIMITS_MAX_PER_HOUR: '101', RATE_LIMITS_MAX_PER_DAY: '100', RATE_LIMITS_GLOBAL_MAX_PER_HOUR: '6000' });
    assert.equal(r.ok, false);
    if (r.ok) return;
    assert.deepEqual(
      r.errors.map((e) => `${e.source}:${e.key}: ${e.message}`),
      [
        'env:rateLimits.maxPerHour: rateLimits.maxPerHour must not exceed rateLimits.maxPerDay [rateLimits.maxPerHour from env RATE_LIMITS_MAX_PER_HOUR, rateLimits.maxPerDay from env RATE_LIMITS_MAX_PER_DAY]',
        'env:rateLimits.globalMaxPerHour: rateLimits.globalMaxPerHour must not exceed rateLimits.globalMaxPerDay [rateLimits.globalMaxPerHour from env RATE_LIMITS_GLOBAL_MAX_PER_HOUR, rateLimits.globalMaxPerDay by default]',
      ],
    );
    const equal = loadConfig([], {
      RATE_LIMITS_MAX_PER_HOUR: '100',
      RATE_LIMITS_MAX_PER_DAY: '100',
      RATE_LIMITS_GLOBAL_MAX_PER_HOUR: '5000',
      RETRY_INITIAL_DELAY: '3600',
      RETRY_MAX_DELAY: '3600',
    });
    assert.ok(equal.ok, JSON.stringify(!equal.ok && equal.errors));
  });

  test('unknown flags and malformed JSON are errors', () => {
    assert.deepEqual(parseFlags(['--nope', '1', 'stray']).unknown, ['--nope', 'stray']);
    const r = loadConfig([], {}, { path: 'c.json', text: '{ "smtpPort": ' });
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.errors[0].message, /not valid JSON/);
  });
});

describe('relayq serve with a bad config', () => {
  test('exits non-zero before listening and names every bad key', () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ smtpPort: 'x', unknownKey: 1 }));
    const r = spawnSync(process.execPath, cliArgs('serve'), {
      cwd: dir,
      env: { ...process.env, BATCH_SIZE: '-3' },
      encoding: 'utf8',
      timeout: 30_000,
    });
    assert.equal(r.status, 2, r.stderr);
    // ./config.json, found in the working directory: the error says which file it read
    // one line each, marked as relayq's as every command's errors are
    const lines = r.stderr.trimEnd().split('\n');
    assert.equal(lines.length, 3, r.stderr);
    assert.match(lines.join('\n'), /^relayq: config error \(file \S*config\.json\): smtpPort: must be an integer$/m);
    assert.match(lines.join('\n'), /^relayq: config error \(file \S*config\.json\): unknownKey: unknown key/m);
    assert.match(lines.join('\n'), /^relayq: config error \(env\): BATCH_SIZE \(batchSize\): must be at least 1/m);
    assert.equal(fs.existsSync(path.join(dir, 'data', 'relayq.db')), false, 'nothing was created');
  });
});

describe('what only the start can find out names the key to fix', () => {
  test('unreadable or non-PEM tls.cert / tls.key', async () => {
    const dir = tempDir();
    const notPem = path.join(dir, 'not.pem');
    fs.writeFileSync(notPem, 'this is not a certificate\n');
    await assert.rejects(
      startTestRelay({ tls: { cert: path.join(dir, 'missing.pem'), key: notPem } }),
      /^Error: config error: tls\.cert: cannot read .*missing\.pem: ENOENT/,
    );
    await assert.rejects(startTestRelay({ tls: { cert: notPem, key: notPem } }), /^Error: config error: tls\.cert, tls\.key: .*not\.pem and .*not\.pem are not a PEM certificate and its key/);
    // neither readable: both named at once, one line each, not one per start
    await assert.rejects(startTestRelay({ tls: { cert: path.join(dir, 'missing.pem'), key: path.join(dir, 'missing-key.pem') } }), (err: Error) => {
      const lines = err.message.split('\n');
      assert.equal(lines.length, 2, err.message);
      assert.match(lines[0], /^config error: tls\.cert: cannot read .*missing\.pem: ENOENT/);
      assert.match(lines[1], /^config error: tls\.key: cannot read .*missing-key\.pem: ENOENT/);
      return true;
    });
  });

  test('an unreadable tls.key is named as tls.key, whatever the certificate', async () => {
    const dir = tempDir();
    const notPem = path.join(dir, 'not.pem');
    fs.writeFileSync(notPem, 'this is not a certificate\n');
    await assert.rejects(
      startTestRelay({ tls: { cert: notPem, key: path.join(dir, 'missing-key.pem') } }, { startDelivery: false }),
      /^Error: config error: tls\.key: cannot read .*missing-key\.pem: ENOENT/,
    );
  });

  test('a key encrypted with a passphrase is named as such, in either PEM form; the same key unencrypted starts', async () => {
    const dir = tempDir();
    const { default: tlsOptions } = await import('smtp-server/lib/tls-options.js');
    const { key, cert } = tlsOptions({}) as { key: string; cert: string };
    const files = { cert: path.join(dir, 'cert.pem'), key: path.join(dir, 'key.pem') };
    fs.writeFileSync(files.cert, cert);
    const privateKey = crypto.createPrivateKey(key);
    const encrypted = {
      pkcs8: privateKey.export({ type: 'pkcs8', format: 'pem', cipher: 'aes-256-cbc', passphrase: 'secret' }),
      traditional: privateKey.export({ type: 'pkcs1', format: 'pem', cipher: 'aes-256-cbc', passphrase: 'secret' }),
    };
    // found before anything is made, as a config error is
    const paths = { databasePath: path.join(dir, 'data', 'relayq.db'), emailsDir: path.join(dir, 'emails') };
    for (const [form, pem] of Object.entries(encrypted)) {
      fs.writeFileSync(files.key, pem);
      await assert.rejects(
        startTestRelay({ tls: files, ...paths }, { startDelivery: false }),
        /^Error: config error: tls\.key: \S*key\.pem is encrypted with a passphrase, which relayq cannot be given: write it out unencrypted \(openssl pkey/,
        form,
      );
      assert.deepEqual(fs.readdirSync(dir).sort(), ['cert.pem', 'key.pem'], form);
    }
    fs.writeFileSync(files.key, key);
    const relay = await startTestRelay({ tls: files, ...paths }, { startDelivery: false });
    await relay.stop();
    assert.ok(fs.existsSync(paths.databasePath));
  });

  /** 'connected', or why a connection to 127.0.0.1:`port` failed ('ECONNREFUSED': nothing listens). */
  const connectTo = (port: number) =>
    new Promise<string>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => {
        socket.destroy();
        resolve('connected');
      });
      socket.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
    });

  test('an SMTP port in use: the start fails saying so, with no smtp.error line before it, and the HTTP API it opened first is closed again', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    const httpPort = await closedPort();
    const log = capturedLog('info');
    try {
      await assert.rejects(
        startTestRelay({ smtpPort: relay.smtpPort, healthCheckPort: httpPort }, { startDelivery: false, logger: log.logger }),
        new RegExp(`^Error: smtpHost, smtpPort: cannot listen on 127\\.0\\.0\\.1:${relay.smtpPort}: .*EADDRINUSE`),
      );
      assert.deepEqual(log.entries().filter((e) => e.event === 'smtp.error'), []);
      assert.equal(await connectTo(httpPort), 'ECONNREFUSED', 'nothing listens on the HTTP port any more');
    } finally {
      await relay.stop();
    }
  });

  test('an HTTP port in use stops the start before SMTP listens', async () => {
    const relay = await startTestRelay({}, { startDelivery: false });
    const smtpPort = await closedPort();
    const log = capturedLog('info');
    try {
      await assert.rejects(
        startTestRelay({ smtpPort, healthCheckPort: relay.httpPort }, { logger: log.logger }),
        new RegExp(`^Error: healthCheckHost, healthCheckPort: cannot listen on 127\\.0\\.0\\.1:${relay.httpPort}: .*EADDRINUSE`),
      );
      assert.equal(await connectTo(smtpPort), 'ECONNREFUSED', 'SMTP does not listen');
      assert.deepEqual(log.entries().filter((e) => e.event === 'relay.started'), [], 'the relay never started: SMTP never listened');
    } finally {
      await relay.stop();
    }
  });

  test('an emailsDir that cannot be a directory (a regular file on its path)', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'a-file');
    fs.writeFileSync(file, 'not a directory\n');
    await assert.rejects(
      startTestRelay({ emailsDir: path.join(file, 'emails'), databasePath: path.join(dir, 'relayq.db') }, { startDelivery: false }),
      /^Error: config error: emailsDir: .*a-file\/emails cannot hold deliveries and failed-mail exports: \S+a-file is not a directory$/,
    );
    // a relative one says where it was looked for: from the working directory
    const relative = path.relative(process.cwd(), path.join(file, 'emails'));
    await assert.rejects(startTestRelay({ emailsDir: relative, databasePath: path.join(dir, 'relayq.db') }, { startDelivery: false }), {
      message: new RegExp(`^config error: emailsDir: ${relative} \\(${path.join(file, 'emails')}: a relative emailsDir is taken from the working directory\\) cannot hold .*a-file is not a directory$`),
    });
    // nothing was started or created: not even the database
    assert.deepEqual(fs.readdirSync(dir), ['a-file']);
  });

  test('a database file the relay may not write (SQLite would open it read-only) stops the start', async (t) => {
    const relay = await startTestRelay({}, { startDelivery: false });
    const file = relay.config.databasePath;
    await relay.stop();
    const ran = await whileImmutable(t, file, async () => {
      await assert.rejects(
        startTestRelay({ databasePath: file }, { startDelivery: false }),
        /^Error: databasePath \S+: cannot write to it \(attempt to write a readonly database\): the relay's user must be able to write the file/,
      );
    });
    if (!ran) return;
    const again = await startTestRelay({ databasePath: file }, { startDelivery: false });
    await again.stop();
  });

  test('a database whose directory the relay may not write (its -wal and -shm cannot be made, as on a read-only file system) stops the start, saying so', async (t) => {
    const relay = await startTestRelay({}, { startDelivery: false });
    const file = relay.config.databasePath;
    await relay.stop();
    await whileImmutable(t, path.dirname(file), async () => {
      await assert.rejects(
        startTestRelay({ databasePath: file }, { startDelivery: false }),
        /^Error: databasePath \S+: cannot write to it \(unable to open database file\): the relay's user must be able to write the file, its -wal and -shm files and its directory$/,
      );
    });
    // without its lock file (made by the first start), the lock file is what cannot be made
    fs.rmSync(`${file}-lock`);
    await whileImmutable(t, path.dirname(file), async () => {
      await assert.rejects(
        startTestRelay({ databasePath: file }, { startDelivery: false }),
        /^Error: databasePath \S+: \S+relayq\.db-lock: EPERM: operation not permitted, open '\S+': the relay's user must be able to write it and the database's directory$/,
      );
    });
  });

  test('a database another process keeps write-locked past the busy timeout stops the start, saying so (not as a permission problem), one with a migration to apply too, and one not yet in WAL mode', async () => {
    const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
    const current = relay.config.databasePath;
    await relay.stop();
    const behind = await databaseAtMigration('011_address_keys');
    const restored = rollbackJournalCopy(current);
    await Promise.all(
      [current, behind, restored].map(async (file) => {
        const holder = new Database(file);
        holder.exec('BEGIN IMMEDIATE');
        try {
          await assert.rejects(
            startTestRelay({ databasePath: file }, { startDelivery: false }),
            /^Error: databasePath \S+: it is locked: another process \(a sqlite3 shell inside a transaction, a relayq command\) held its write lock for more than 5 s; start again once it is done$/,
          );
        } finally {
          holder.exec('ROLLBACK');
          holder.close();
        }
        const again = await startTestRelay({ databasePath: file }, { startDelivery: false });
        await again.stop();
      }),
    );
  });

  test('a start on a database not yet in WAL mode (a restored backup) waits for a write of another process, as any write does', async () => {
    const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
    const file = rollbackJournalCopy(relay.config.databasePath);
    await relay.stop();
    // SQLite refuses the switch to WAL at once while another connection writes to such a file:
    // the start tries it again until the write is done (1 s here)
    const holder = await writeFromAnotherProcess(file, 1000);
    const again = await startTestRelay({ databasePath: file }, { startDelivery: false, startRetention: false });
    try {
      assert.equal(again.store.sqlite.pragma('journal_mode', { simple: true }), 'wal');
    } finally {
      await again.stop();
    }
    await holder.ended;
  });

  test('a start with migrations to apply waits for a write of another process, as any write does', async () => {
    const file = await databaseAtMigration('001_initial');
    // another process writes for 1 s: the migrations wait for it (begun deferred, they were refused at once)
    const holder = await writeFromAnotherProcess(file, 1000);
    const log = capturedLog('info');
    const relay = await startTestRelay({ databasePath: file }, { startDelivery: false, logger: log.logger });
    await relay.stop();
    assert.ok(log.entries().some((e) => e.event === 'store.migrated'));
    await holder.ended;
  });

  test('a file that is no SQLite database as databasePath is refused by serve and by migrate, and gets no lock file beside it', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'notes.txt');
    fs.writeFileSync(file, 'not a database\n');
    await assert.rejects(startTestRelay({ databasePath: file }), /^Error: databasePath .*notes\.txt: file is not a database$/);
    const migrate = await runCli(['migrate', '--databasePath', file]);
    assert.equal(migrate.code, 1);
    assert.match(migrate.stderr.trim(), /^relayq: .*notes\.txt: file is not a database$/);
    assert.deepEqual(fs.readdirSync(dir), ['notes.txt']);
    assert.equal(fs.readFileSync(file, 'utf8'), 'not a database\n');
  });

  test("another program's SQLite file as databasePath is refused and left as it was, by serve and by migrate", async () => {
    const dir = tempDir();
    const file = path.join(dir, 'other.db');
    const other = new Database(file);
    other.exec('CREATE TABLE foo (x); INSERT INTO foo VALUES (1)');
    other.close();
    const tables = () => {
      const db = new Database(file, { readonly: true });
      try {
        return (db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all() as Array<{ name: string }>).map((r) => r.name);
      } finally {
        db.close();
      }
    };
    await assert.rejects(
      startTestRelay({ databasePath: file }),
      /^Error: databasePath .*other\.db: not a relayq database: it holds tables relayq did not create \(foo\) and no schema_migrations$/,
    );
    const [migrate, status] = await Promise.all([runCli(['migrate', '--databasePath', file]), runCli(['status', '--databasePath', file])]);
    assert.notEqual(migrate.code, 0);
    assert.match(migrate.stderr, /not a relayq database: it holds tables relayq did not create \(foo\)/);
    assert.notEqual(status.code, 0);
    assert.match(status.stderr, /^relayq: cannot read database .*other\.db: not a relayq database: it holds tables relayq did not create \(foo\)/);
    assert.deepEqual(tables(), ['foo']);
    // not even its journal mode was changed
    const after = new Database(file, { readonly: true });
    assert.equal(after.pragma('journal_mode', { simple: true }), 'delete');
    after.close();
    // nor anything beside it: no WAL, no lock file, no spool
    assert.deepEqual(fs.readdirSync(dir), ['other.db']);
  });
});

describe('listen and upstream addresses as logged and recorded', () => {
  /** Whether this host can listen on ::1 (IPv6 may be off). */
  async function ipv6Loopback(): Promise<boolean> {
    const server = net.createServer();
    return new Promise((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(0, '::1', () => server.close(() => resolve(true)));
    });
  }

  test('a host name is logged as the address it listens on, with the version that runs', async () => {
    const log = capturedLog('info');
    const relay = await startTestRelay({ smtpHost: 'localhost', healthCheckHost: 'localhost' }, { startDelivery: false, logger: log.logger });
    try {
      const [started] = log.entries().filter((e) => e.event === 'relay.started');
      const [api] = log.entries().filter((e) => e.event === 'api.listening');
      // localhost's first address: 127.0.0.1, or ::1 where the resolver puts it first
      assert.match(String(started.smtp), new RegExp(`^(127\\.0\\.0\\.1|\\[::1\\]):${relay.smtpPort}$`));
      assert.match(String(api.http), new RegExp(`^(127\\.0\\.0\\.1|\\[::1\\]):${relay.httpPort}$`));
      // which relayq this is: package.json's version, as `relayq --version` prints it
      const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };
      assert.equal(started.version, pkg.version);
      const printed = spawnSync(process.execPath, cliArgs('--version'), { encoding: 'utf8', timeout: 30_000 });
      assert.deepEqual([printed.status, printed.stdout, printed.stderr], [0, `${pkg.version}\n`, '']);
    } finally {
      await relay.stop();
    }
  });

  test('an IPv6 address is written in brackets, [::1]:port, in the log and as the upstream of an attempt', async (t) => {
    const upstreamPort = await closedPort();
    const ipv6 = await ipv6Loopback();
    const log = capturedLog('info');
    const listen = ipv6 ? { smtpHost: '::1', healthCheckHost: '::1' } : {};
    const relay = await startTestRelay(
      { ...listen, forwardSMTP: true, forwardHost: '::1', forwardPort: upstreamPort },
      { startDelivery: false, logger: log.logger },
    );
    try {
      if (ipv6) {
        assert.equal(log.entries().find((e) => e.event === 'relay.started')?.smtp, `[::1]:${relay.smtpPort}`);
        assert.equal(log.entries().find((e) => e.event === 'api.listening')?.http, `[::1]:${relay.httpPort}`);
      } else {
        t.diagnostic('no IPv6 loopback here: only the upstream is checked');
      }
      const client = await SmtpClient.connect(relay.smtpPort, ipv6 ? '::1' : '127.0.0.1');
      // generous waits: other test files may be loading the machine
      const say = (line: string) => {
        client.write(`${line}\r\n`);
        return client.read(30_000);
      };
      await client.read(30_000);
      await say('EHLO client.test');
      await say('MAIL FROM:<a@example.com>');
      await say('RCPT TO:<b@example.com>');
      await say('DATA');
      assert.match(await say('Subject: v6\r\n\r\nbody\r\n.'), /^250 /);
      client.close();
      await relay.delivery.runOnce();
      const attempts = relay.store.sqlite.prepare('SELECT upstream, outcome FROM attempts').all();
      assert.deepEqual(attempts, [{ upstream: `[::1]:${upstreamPort}`, outcome: 'deferred' }]);
      const health = (await (await fetch(`http://${ipv6 ? '[::1]' : '127.0.0.1'}:${relay.httpPort}/health`)).json()) as { details: { upstream: { target: string } } };
      assert.equal(health.details.upstream.target, `[::1]:${upstreamPort}`);
    } finally {
      await relay.stop();
    }
  });
});

test('an empty database file gets a command to say so, and stays empty; migrate does not create a database that is not there', async () => {
  const dir = tempDir();
  const empty = path.join(dir, 'empty.db');
  fs.writeFileSync(empty, '');
  const missing = path.join(dir, 'typo', 'relayq.db');
  const [status, del, retry, migrate] = await Promise.all([
    runCli(['status', '--databasePath', empty]),
    runCli(['delete', '1A23BC3C88F4F86B3CCE', '--databasePath', empty]),
    runCli(['retry', '--failed', '--databasePath', empty]),
    runCli(['migrate', '--databasePath', missing]),
  ]);
  for (const r of [status, del, retry]) {
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^relayq: cannot read database .*empty\.db: no schema: an empty database \(start the server on it, or run `relayq migrate`\)\n$/);
  }
  assert.equal(migrate.code, 1);
  assert.match(migrate.stderr, /^relayq: no database at .*typo\/relayq\.db; /);
  assert.deepEqual(fs.readdirSync(dir), ['empty.db'], 'nothing was created');
  assert.equal(fs.statSync(empty).size, 0, 'the empty file was not made a database');
});

test('a database path that is a directory is named as one by every command, and nothing is created beside it', async () => {
  const dir = tempDir();
  const database = path.join(dir, 'relayq.db');
  fs.mkdirSync(database);
  const commands = [['status'], ['queue'], ['show', '1A23BC3C88F4F86B3CCE'], ['backup', path.join(dir, 'copy.db')], ['export-failed', path.join(dir, 'out')], ['delete', '1A23BC3C88F4F86B3CCE'], ['migrate']];
  const results = await Promise.all(commands.map((args) => runCli([...args, '--databasePath', database])));
  for (const [i, r] of results.entries()) {
    assert.equal(r.code, 1, commands[i].join(' '));
    assert.match(r.stderr, /^relayq: cannot open database .*relayq\.db: it is a directory \(databasePath names the database file\)\n$/, commands[i].join(' '));
  }
  assert.deepEqual(fs.readdirSync(dir), ['relayq.db'], 'no lock file, copy or export beside it');
});

/** The error messages of a load that must have failed. */
/** Another process holds the write lock of `file` for `ms` (resolves once it has it); `ended` settles when that process has ended. */
async function writeFromAnotherProcess(file: string, ms: number): Promise<{ ended: Promise<void> }> {
  const holder = spawn(
    process.execPath,
    ['-e', "const d = new (require('better-sqlite3'))(process.argv[1]); d.exec('BEGIN IMMEDIATE'); console.log('held'); setTimeout(() => { d.exec('ROLLBACK'); d.close(); }, Number(process.argv[2]));", file, String(ms)],
    { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const ended = new Promise<void>((resolve) => holder.once('exit', () => resolve()));
  await new Promise((resolve) => holder.stdout.once('data', resolve));
  return { ended };
}

function errorMessages(result: ReturnType<typeof loadConfig>): string[] {
  assert.equal(result.ok, false, 'the config was accepted');
  return result.ok ? [] : result.errors.map((e) => e.message);
}

test('relay.started names the config file it read, as a full path, or null when there was none, and where the relative paths led', async () => {
  const withFile = tempDir();
  fs.writeFileSync(path.join(withFile, 'config.json'), JSON.stringify({ workerCount: 3, emailsDir: 'mail/out' }));
  const without = tempDir();
  for (const [dir, expected] of [[withFile, path.join(withFile, 'config.json')], [without, null]] as const) {
    const relay = await spawnRelay(dir);
    try {
      const started = JSON.parse(relay.output().split('\n').find((line) => line.includes('"relay.started"')) as string);
      assert.equal(started.configFile, expected);
      assert.equal(started.config.workerCount, expected ? 3 : 5);
      assert.equal(started.config.databasePath, 'data/relayq.db');
      assert.deepEqual(started.paths, { databasePath: path.join(dir, 'data', 'relayq.db'), emailsDir: path.join(dir, expected ? 'mail/out' : 'emails') });
    } finally {
      await relay.kill('SIGTERM');
    }
  }
});

test('a config file reached through `..` after a link: the file read is the one named in the log and judged for its secrets', () => {
  const dir = tempDir();
  fs.mkdirSync(path.join(dir, 'deep', 'inner'), { recursive: true });
  fs.symlinkSync(path.join(dir, 'deep', 'inner'), path.join(dir, 'inner-link'));
  const read = path.join(dir, 'deep', 'config.json');
  fs.writeFileSync(read, '{"smtpPort": 2601, "forwardPassword": "pw"}', { mode: 0o644 });
  fs.chmodSync(read, 0o644);
  // where the path's text points: not read
  fs.writeFileSync(path.join(dir, 'config.json'), '{"smtpPort": 2602}', { mode: 0o600 });
  const loaded = loadConfigFromSources(['--config', `${dir}/inner-link/../config.json`], {});
  assert.ok(loaded.ok, loaded.ok ? '' : loaded.message);
  assert.equal(loaded.config.smtpPort, 2601);
  assert.equal(loaded.file, read);
  assert.ok(loaded.warnings.some((w) => /sets forwardPassword, and every user of this machine may read it \(mode 0644\)/.test(w)), loaded.warnings.join('\n'));
});

test('a config file that sets a secret is a warning when every user may read it; a group that may read it is taken as meant', () => {
  const dir = tempDir();
  const file = path.join(dir, 'config.json');
  fs.writeFileSync(file, '\uFEFF{"forwardPassword": "pw", "security": {"adminToken": "a-token-for-this-test"}}');
  const warningAt = (mode: number) => {
    fs.chmodSync(file, mode);
    const read = readConfigFile(file);
    assert.ok(read && 'text' in read);
    return exposedSecretsWarning(read);
  };
  assert.equal(
    warningAt(0o604),
    `${file} sets forwardPassword, security.adminToken, and every user of this machine may read it (mode 0604): chmod o-r it, or give the secrets in the environment`,
  );
  assert.deepEqual([warningAt(0o640), warningAt(0o600)], [undefined, undefined]);
  fs.writeFileSync(file, '{"forwardPassword": "", "smtpPort": 2526}');
  assert.equal(warningAt(0o644), undefined, 'no secret set in it');
  // a pipe (`--config <(…)`, a FIFO) has no mode to judge: it is its writer's
  assert.equal(exposedSecretsWarning({ path: '/dev/fd/63', text: '{"forwardPassword": "pw"}' }), undefined);
});

test('an emailsDir the relay may not write stops the start, even with a failed/ in it that it may write: a local delivery goes into emailsDir itself', async (t) => {
  const dir = tempDir();
  const emailsDir = path.join(dir, 'emails');
  fs.mkdirSync(path.join(emailsDir, 'failed'), { recursive: true, mode: 0o700 });
  const config = { emailsDir, databasePath: path.join(dir, 'relayq.db') };
  const ran = await whileImmutable(t, emailsDir, async () => {
    // a relay that does start is stopped before the assertion, so a failing probe leaves nothing running
    const outcome = await startTestRelay(config, { startDelivery: false }).then(
      async (relay) => {
        await relay.stop();
        return 'started';
      },
      (err: Error) => err.message,
    );
    assert.match(outcome, /^config error: emailsDir: \S+emails cannot hold deliveries and failed-mail exports: EPERM: operation not permitted, access '\S+emails'$/);
  });
  if (!ran) return;
  const again = await startTestRelay(config, { startDelivery: false });
  await again.stop();
});
