// "Passwords and tokens never appear in logs": a relay at debug level, which logs the SMTP
// transcripts of its clients and of its upstream sessions, authenticates a client (and refuses a
// wrong password), logs in to its upstream and serves an API call with the admin token.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { CONFIG_KEYS, defaultConfig, getPath, setPath } from '../../src/config/schema.js';
import { redactConfig } from '../../src/config/load.js';
import { createLogger, masker } from '../../src/logger.js';
import { capturedLog, SmtpClient, sendMail, spawnRelay, startTestRelay, startUpstream, tempDir, waitFor } from '../helpers.js';

const secret = (name: string) => `${name}-${crypto.randomBytes(6).toString('hex')}`;
const base64 = (text: string) => Buffer.from(text).toString('base64');

/** Every form in which `value` could leak: as is, in base64, and inside an AUTH PLAIN response. */
function leaks(output: string, value: string, user = ''): string[] {
  const forms = [value, base64(value), base64(`\0${user}\0${value}`), base64(`${user}\0${user}\0${value}`)];
  return forms.filter((form) => output.includes(form));
}

test('no password or token reaches the log of a relay at debug level', async () => {
  const smtpPassword = secret('smtp-pass');
  const wrongPassword = secret('wrong-pass');
  const forwardPassword = secret('forward-pass');
  const adminToken = secret('admin-token');
  const upstream = await startUpstream({
    authOptional: false,
    allowInsecureAuth: true,
    onAuth(auth, _session, cb) {
      if (auth.username === 'relay' && auth.password === forwardPassword) return cb(null, { user: 'relay' });
      cb(new Error('invalid credentials'));
    },
  });
  const relay = await spawnRelay(tempDir(), [
    '--logLevel', 'debug',
    '--defaultUsername', 'app',
    '--defaultPassword', smtpPassword,
    '--forwardSMTP', 'true',
    '--forwardHost', '127.0.0.1',
    '--forwardPort', String(upstream.port),
    '--forwardUsername', 'relay',
    '--forwardPassword', forwardPassword,
    '--security.adminToken', adminToken,
  ]);
  try {
    const refused = await SmtpClient.connect(relay.smtpPort);
    await refused.read();
    await refused.send('EHLO client.test');
    assert.match(await refused.send(`AUTH PLAIN ${base64(`\0app\0${wrongPassword}`)}`), /^535 /);
    await refused.send('QUIT');
    refused.close();

    const info = await sendMail(relay.smtpPort, { auth: { user: 'app', pass: smtpPassword } });
    assert.match(info.response, /^250 /);
    await waitFor(() => upstream.received.length === 1, 10_000, 'delivery with AUTH');

    await waitFor(() => relay.output().includes('"api.listening"'), 10_000, 'the HTTP API');
    const listening = JSON.parse(relay.output().split('\n').find((line) => line.includes('"api.listening"')) as string);
    const api = await fetch(`http://${listening.http}/metrics`, { headers: { authorization: `Bearer ${adminToken}` } });
    assert.equal(api.status, 200);
  } finally {
    await relay.kill('SIGTERM');
    await upstream.close();
  }
  const output = relay.output();
  // both transcripts are there, so the AUTH lines that could carry a credential were logged
  assert.ok(output.includes('"msg":"C: MAIL FROM:<sender@example.com>"'), 'the client session transcript');
  assert.equal(output.split('"msg":"C: AUTH PLAIN /* secured */"').length - 1, 2, 'both AUTH commands, masked');
  assert.match(output, /"tnx":"client","msg":"AUTH PLAIN [A-Za-z0-9+/=]+"/, 'the upstream session transcript');
  assert.match(output, /"tnx":"client","msg":"MAIL FROM:<sender@example.com>"/);
  assert.match(output, /"event":"relay.stopped"/);
  // the libraries' lines are marked by `lib`, and no line names two components
  assert.match(output, /"component":"smtp","lib":"smtp-server"/);
  assert.match(output, /"component":"delivery","lib":"nodemailer"/);
  const twice = output.split('\n').filter((line) => line.split('"component":').length > 2);
  assert.deepEqual(twice, []);
  // smtp-server's transcript gives its session as relayq's own lines do: a filter on `session` keeps it
  const lines = output.split('\n').filter((line) => line.startsWith('{')).map((line) => JSON.parse(line) as Record<string, unknown>);
  const sessions = lines.filter((l) => l.event === 'smtp.session').map((l) => l.session);
  const mail = lines.find((l) => l.lib === 'smtp-server' && l.msg === 'C: MAIL FROM:<sender@example.com>');
  assert.ok(mail && sessions.includes(mail.session) && !('cid' in mail), JSON.stringify(mail));
  const started = JSON.parse(output.split('\n').find((line) => line.includes('"relay.started"')) as string);
  assert.equal(started.config.defaultPassword, '[redacted]');
  assert.equal(started.config.forwardPassword, '[redacted]');
  assert.equal(started.config.security.adminToken, '[redacted]');
  assert.deepEqual(leaks(output, smtpPassword, 'app'), []);
  assert.deepEqual(leaks(output, wrongPassword, 'app'), []);
  assert.deepEqual(leaks(output, forwardPassword, 'relay'), []);
  assert.deepEqual(leaks(output, adminToken), []);
});

test('the logger itself censors every secret config key, and credentials logged under their own names', () => {
  const { logger, lines } = capturedLog('info', createLogger);
  const config = defaultConfig() as unknown as Record<string, unknown>;
  const secrets = CONFIG_KEYS.filter((key) => key.secret).map((key) => {
    const value = secret(key.path);
    setPath(config, key.path, value);
    return { key, value };
  });
  assert.ok(secrets.length >= 3);
  // a config dump that skipped redactConfig
  logger.info({ config }, 'config');
  for (const { key, value } of secrets) {
    const name = key.path.slice(key.path.lastIndexOf('.') + 1);
    logger.info({ [name]: value }, key.path);
  }
  // credentials under their usual names, alone or in the objects that usually carry them
  logger.info({ password: secret('password'), pass: secret('pass'), authorization: secret('authorization') }, 'credentials');
  logger.info({ auth: { user: 'u', pass: secret('pass'), password: secret('password') }, headers: { authorization: secret('authorization') } }, 'nested');
  const output = lines.join('\n');
  assert.equal(lines.length, secrets.length + 3);
  for (const { value } of secrets) assert.equal(output.includes(value), false, `${value} is in the log`);
  assert.doesNotMatch(output, /password-|pass-|authorization-/);
  assert.equal(output.split('[redacted]').length - 1, secrets.length * 2 + 6);
});

test('a secret that is not set is logged empty, not as [redacted]', () => {
  const { logger, lines } = capturedLog('info', createLogger);
  const config = defaultConfig();
  logger.info({ config, password: '' }, 'config');
  const line = JSON.parse(lines[0]);
  for (const key of CONFIG_KEYS.filter((k) => k.secret)) assert.equal(getPath(line.config, key.path), '', key.path);
  assert.equal(line.password, '');
});

test('credentials a client sends after its AUTH was refused (538, 503, 504) or cancelled are masked at debug', async () => {
  const password = secret('after-refusal');
  const { logger, lines } = capturedLog('debug', createLogger);
  const relay = await startTestRelay(
    { defaultUsername: 'app', defaultPassword: password, security: { allowLocalOnly: false, allowedNetworks: ['198.51.100.0/24'], requireAuth: false } },
    { logger, smtpPeerAddress: () => '198.51.100.7', startDelivery: false, startRetention: false },
  );
  try {
    const c = await SmtpClient.connect(relay.smtpPort);
    await c.read();
    await c.send('EHLO client.test');
    // LOGIN refused before TLS; the client sends its two lines anyway
    assert.match(await c.send('AUTH LOGIN'), /^538 /);
    assert.match(await c.send(base64('app')), /^5/);
    assert.match(await c.send(base64(password)), /^5/);
    // PLAIN refused inside a transaction; the response follows on its own line
    assert.match(await c.send('MAIL FROM:<a@example.com>'), /^250 /);
    assert.match(await c.send('AUTH PLAIN'), /^503 /);
    assert.match(await c.send(base64(`\0app\0${password}`)), /^5/);
    // masking stops at the next command
    assert.match(await c.send('NOOP'), /^250 /);
    await c.send('QUIT');
    c.close();
  } finally {
    await relay.stop();
  }
  // smtp-server's own refusals, on loopback: AUTH before EHLO, an unknown mechanism, a second AUTH
  const local = await startTestRelay({ defaultUsername: 'app', defaultPassword: password }, { logger, startDelivery: false, startRetention: false });
  try {
    const c = await SmtpClient.connect(local.smtpPort);
    await c.read();
    assert.match(await c.send('AUTH LOGIN'), /^503 /);
    assert.match(await c.send(base64(password)), /^5/);
    await c.send('EHLO client.test');
    assert.match(await c.send('AUTH XOAUTH2'), /^504 /);
    assert.match(await c.send(base64(password)), /^5/);
    // a response without the mechanism before it: its one word is the credential
    assert.match(await c.send(`AUTH ${base64(`\0app\0${password}`)}`), /^504 /);
    assert.match(await c.send(`AUTH ${base64(password)}`), /^504 /);
    // a LOGIN cancelled with `*`, then both lines sent all the same
    assert.match(await c.send('AUTH LOGIN'), /^334 /);
    assert.match(await c.send('*'), /^501 /);
    assert.match(await c.send(base64('app')), /^5/);
    assert.match(await c.send(base64(password)), /^5/);
    assert.match(await c.send(`AUTH PLAIN ${base64(`\0app\0${password}`)}`), /^235 /);
    assert.match(await c.send('AUTH LOGIN'), /^503 /);
    assert.match(await c.send(base64(password)), /^5/);
    // AUTH that smtp-server does not read as a command (500): a tab after the word, a space
    // before it; each after a command that ended the masking of the lines before
    for (const auth of ['AUTH\tPLAIN', ' AUTH PLAIN', 'AUTH=PLAIN']) {
      assert.match(await c.send('NOOP'), /^250 /);
      assert.match(await c.send(`${auth} ${base64(`\0app\0${password}`)}`), /^500 /);
    }
    assert.match(await c.send(base64(password)), /^5/);
    await c.send('QUIT');
    c.close();
  } finally {
    await local.stop();
  }
  const output = lines.join('\n');
  assert.deepEqual(leaks(output, password, 'app'), []);
  assert.deepEqual(leaks(output.toUpperCase(), base64(password).toUpperCase()), [], 'nor upper-cased as a command name');
  assert.equal(output.split('"msg":"C: /* secured */"').length - 1, 10, 'the ten lines after AUTH commands, masked');
  assert.equal(output.split('"msg":"C: AUTH /* secured */"').length - 1, 5, 'AUTH lines without a mechanism, or that smtp-server does not read as AUTH');
  assert.ok(output.includes('"msg":"C: AUTH XOAUTH2"'), 'a mechanism alone is logged as sent');
  assert.ok(output.includes('"msg":"C: NOOP"'), 'the command after them is logged as usual');
});

test('redactConfig replaces every secret that is set, leaves empty ones and the rest as they are, and does not touch the config it copies', () => {
  const config = defaultConfig();
  const secrets = CONFIG_KEYS.filter((key) => key.secret);
  const [unset, ...set] = secrets;
  for (const key of set) setPath(config as unknown as Record<string, unknown>, key.path, secret(key.path));
  const before = structuredClone(config);
  const redacted = redactConfig(config) as unknown as Record<string, unknown>;
  assert.deepEqual(config, before);
  for (const key of set) assert.equal(getPath(redacted, key.path), '[redacted]', key.path);
  assert.equal(getPath(redacted, unset.path), '', `${unset.path} is not set, and shown so`);
  for (const key of CONFIG_KEYS.filter((k) => !k.secret)) assert.deepEqual(getPath(redacted, key.path), getPath(config as unknown as Record<string, unknown>, key.path), key.path);
  // a provider's API token given as both user name and password (Postmark's server tokens)
  const token = { ...defaultConfig(), forwardUsername: 'token-f00d', forwardPassword: 'token-f00d', defaultUsername: 'token-beef', defaultPassword: 'token-beef' };
  assert.deepEqual([redactConfig(token).forwardUsername, redactConfig({ ...token, forwardPassword: 'other' }).forwardUsername], ['[redacted]', 'token-f00d']);
  assert.deepEqual([redactConfig(token).defaultUsername, redactConfig({ ...token, defaultPassword: 'other' }).defaultUsername], ['[redacted]', 'token-beef']);
  // or a user name that holds its password
  const holds = { ...token, forwardUsername: 'relay-token-f00d', defaultUsername: 'app:token-beef' };
  assert.deepEqual([redactConfig(holds).forwardUsername, redactConfig(holds).defaultUsername], ['[redacted]', '[redacted]']);
});

/**
 * Where any 6 characters of a random `value` are in `output`: as is, JSON-escaped, or inside any
 * run of base64 (decoded at each of its four character offsets).
 */
function decodedLeaks(output: string, value: string): string[] {
  const windows = (text: string) => Array.from({ length: Math.max(1, text.length - 5) }, (_, i) => text.slice(i, i + 6));
  const pieces = [...windows(value), ...windows(JSON.stringify(value).slice(1, -1))];
  const found = pieces.filter((piece) => output.includes(piece));
  for (const [run] of output.matchAll(/[A-Za-z0-9+/]{4,}={0,2}/g)) {
    for (const skip of [0, 1, 2, 3]) {
      const decoded = Buffer.from(run.slice(skip), 'base64').toString('latin1');
      if (pieces.some((piece) => decoded.includes(Buffer.from(piece).toString('latin1')))) found.push(run);
    }
  }
  return found;
}

for (const [shape, userOf] of [
  ['is also the password (a token used as both)', (password: string) => password],
  ['holds the password', (password: string) => `app-${password}`],
] as const) {
  test(`a user name that ${shape} is not logged or stored, plain or in base64`, async () => {
    // quotes, a backslash and non-ASCII: JSON escapes them, and the escaped form is masked too
    const token = () => `${crypto.randomBytes(15).toString('base64url')}"\\é`;
    const intakeToken = token();
    const forwardToken = token();
    const [intakeUser, forwardUser] = [userOf(intakeToken), userOf(forwardToken)];
    const upstream = await startUpstream({
      authOptional: false,
      allowInsecureAuth: true,
      authMethods: ['LOGIN'],
      onAuth(auth, _session, cb) {
        if (auth.username === forwardUser && auth.password === forwardToken) return cb(null, { user: auth.username });
        cb(new Error('invalid credentials'));
      },
    });
    const dir = tempDir();
    const relay = await spawnRelay(dir, [
      '--logLevel', 'debug',
      '--defaultUsername', intakeUser,
      '--defaultPassword', intakeToken,
      '--forwardSMTP', 'true',
      '--forwardHost', '127.0.0.1',
      '--forwardPort', String(upstream.port),
      '--forwardUsername', forwardUser,
      '--forwardPassword', forwardToken,
    ]);
    try {
      // a failed login names the user name it tried
      await assert.rejects(sendMail(relay.smtpPort, { auth: { user: intakeUser, pass: 'wrong' } }), /535/);
      const info = await sendMail(relay.smtpPort, { auth: { user: intakeUser, pass: intakeToken } });
      assert.match(info.response, /^250 /);
      await waitFor(() => upstream.received.length === 1, 10_000, 'delivery with AUTH LOGIN');
    } finally {
      await relay.kill('SIGTERM');
      await upstream.close();
    }
    const output = relay.output();
    // the lines that would name the user are there, with the name masked
    assert.match(output, /"event":"smtp.auth_failed"[^\n]*"user":"\[redacted\]"/);
    assert.match(output, /"event":"smtp.accepted"[^\n]*"user":"\[redacted\]"/);
    assert.match(output, /"lib":"smtp-server"[^\n]*"msg":"\[redacted\] authenticated using PLAIN"/);
    assert.match(output, /"lib":"nodemailer"[^\n]*"msg":"User \\"\[redacted\]\\" authenticated"/);
    assert.match(output, /"tnx":"client","msg":"AUTH LOGIN"/, 'the upstream AUTH exchange was logged');
    const started = JSON.parse(output.split('\n').find((line) => line.includes('"relay.started"')) as string);
    assert.deepEqual([started.config.defaultUsername, started.config.forwardUsername], ['[redacted]', '[redacted]']);
    assert.deepEqual(decodedLeaks(output, intakeToken), []);
    assert.deepEqual(decodedLeaks(output, forwardToken), []);
    // nor is it kept as the message's AUTH user (shown by the API, `relayq show` and exports)
    const db = new Database(path.join(dir, 'data', 'relayq.db'), { readonly: true });
    try {
      assert.deepEqual(db.prepare('SELECT auth_user FROM messages').pluck().all(), ['[redacted]']);
    } finally {
      db.close();
    }
  });
}

test("a failed login whose user name holds the password, or another of the relay's secrets, logs that name as [redacted]", async () => {
  const password = secret('typed-into-user');
  const token = secret('admin-token-pasted');
  const forward = secret('forward-pasted');
  // smtp-server's own line of the failure too, at debug
  const { logger, lines } = capturedLog('debug', createLogger);
  const relay = await startTestRelay(
    { defaultUsername: 'app', defaultPassword: password, security: { adminToken: token }, forwardUsername: 'up', forwardPassword: forward },
    { logger, startDelivery: false, startRetention: false },
  );
  try {
    for (const user of [`${password} `, `app:${password}`, token, forward, 'someone']) {
      await assert.rejects(sendMail(relay.smtpPort, { auth: { user, pass: 'wrong' } }), /535/);
    }
  } finally {
    await relay.stop();
  }
  const failed = lines.filter((l) => l.includes('"smtp.auth_failed"')).map((l) => JSON.parse(l).user);
  assert.deepEqual(failed, ['[redacted]', '[redacted]', '[redacted]', '[redacted]', 'someone']);
  for (const s of [password, token, forward]) assert.ok(!lines.some((l) => l.includes(s)), `${s} is in no line`);

  // a configured user name that holds the upstream's password, long or short: its logins go by
  // [redacted] too, and smtp-server's transcript at debug does not show it
  for (const upstreamPassword of [forward, 'q7z']) {
    const user = `svc-${upstreamPassword}`;
    const named = capturedLog('debug', createLogger);
    const relay2 = await startTestRelay(
      { defaultUsername: user, defaultPassword: password, forwardUsername: 'up', forwardPassword: upstreamPassword },
      { logger: named.logger, startDelivery: false, startRetention: false },
    );
    try {
      await sendMail(relay2.smtpPort, { auth: { user, pass: password } });
    } finally {
      await relay2.stop();
    }
    const accepted = named.lines.filter((l) => l.includes('"smtp.accepted"')).map((l) => JSON.parse(l).user);
    assert.deepEqual(accepted, ['[redacted]'], user);
    assert.ok(named.lines.some((l) => l.includes('authenticated')), "smtp-server's line of the login is there");
    const leaks = named.lines.filter((l) => l.includes(user) || (upstreamPassword.length >= 4 && l.includes(upstreamPassword)));
    assert.deepEqual(leaks, [], `${user} is in no line`);
  }
});

test("an upstream's reply that repeats a user name holding the password is stored and logged masked", async () => {
  const password = secret('fw');
  const username = `relay-${password}`;
  const upstream = await startUpstream({
    authOptional: false,
    allowInsecureAuth: true,
    onAuth(auth, _session, cb) {
      cb(Object.assign(new Error(`Invalid username or password for ${auth.username}`), { responseCode: 535 }));
    },
  });
  const { logger, lines } = capturedLog('info', createLogger);
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, forwardUsername: username, forwardPassword: password },
    { logger, startDelivery: false, startRetention: false },
  );
  try {
    await sendMail(relay.smtpPort, { to: ['a@example.com'] });
    await relay.delivery.runOnce();
    const [reply] = relay.store.sqlite.prepare('SELECT last_reply FROM recipients').pluck().all() as string[];
    assert.equal(reply, '535 Invalid username or password for [redacted]');
  } finally {
    await relay.stop();
    await upstream.close();
  }
  assert.ok(lines.some((l) => l.includes('"delivery.attempt"') && l.includes('for [redacted]')), 'the attempt is logged');
  assert.ok(!lines.some((l) => l.includes(password)), 'the password is in no line');
});

test("masking an upstream's replies keeps their codes, which judge them: a password that reads as one changes nothing", async () => {
  const upstream = await startUpstream({
    authOptional: false,
    allowInsecureAuth: true,
    onAuth: (auth, _session, cb) => cb(null, { user: auth.username }),
    onRcptTo: (address, _session, cb) => cb(Object.assign(new Error(`5.7.1 <${address.address}>: Relay access denied`), { responseCode: 554 })),
  });
  const relay = await startTestRelay(
    { forwardSMTP: true, forwardHost: '127.0.0.1', forwardPort: upstream.port, forwardUsername: 'relay', forwardPassword: '5.7.1' },
    { startDelivery: false, startRetention: false },
  );
  try {
    await sendMail(relay.smtpPort, { to: ['a@example.com'] });
    await relay.delivery.runOnce();
    const [reply] = relay.store.sqlite.prepare('SELECT last_reply FROM recipients').pluck().all() as string[];
    // the refusal of relaying (5.7.x) that /health counts as the upstream's failure
    assert.equal(reply, '554 5.7.1 <a@example.com>: Relay access denied');
  } finally {
    await relay.stop();
    await upstream.close();
  }
});

test('masker hides a secret standing as a word and any base64 word that holds it, whole, and leaves the rest', () => {
  const token = 'token-5ecret';
  const mask = masker(['', token]) as (text: string) => string;
  for (const before of ['', '\0', '\0\0', 'user\0', 'x']) {
    for (const after of ['', '\0/* secret */', ' /* secret */', '!']) {
      const line = `AUTH PLAIN ${base64(before + token + after)}`;
      assert.equal(mask(line), 'AUTH PLAIN [redacted]', JSON.stringify(before + token + after));
    }
  }
  assert.equal(mask(`User "${token}" authenticated`), 'User "[redacted]" authenticated');
  assert.equal(mask(`${token} authenticated using PLAIN`), '[redacted] authenticated using PLAIN');
  assert.equal(mask(base64(token)), '[redacted]');
  // JSON's escapes of a token with a quote and a backslash
  const quoted = 'tok"en\\1';
  assert.equal((masker([quoted]) as (text: string) => string)(`User ${JSON.stringify(quoted)} authenticated`), 'User "[redacted]" authenticated');
  // a secret of 4 bytes or more is masked with the word that holds it: a typed user name, an address
  assert.equal(mask(`Authentication error for app:${token} using PLAIN`), 'Authentication error for [redacted] using PLAIN');
  assert.equal(mask(`MAIL FROM:<x-${token}@example.com> SIZE=10`), 'MAIL [redacted] SIZE=10');
  // a shorter one inside a longer word stays: masking every word that holds it would garble the line
  const short = masker(['a']) as (text: string) => string;
  for (const line of ['C: MAIL FROM:<alice@example.com>', 'S: 220 mail.example.com ESMTP relayq', 'S: 354 End data with <CR><LF>.<CR><LF>', 'DATA']) {
    assert.equal(short(line), line);
  }
  assert.equal(mask('MAIL FROM:<a@example.com>'), 'MAIL FROM:<a@example.com>');
  assert.equal(masker(['', '']), undefined);
});
