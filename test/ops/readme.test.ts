import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { readmeConfigTable, renderConfigTable } from '../../src/config/docs.js';
import { CONFIG_KEYS, envName } from '../../src/config/schema.js';
import { ManualClock } from '../manual-clock.js';
import { sendMail, startTestRelay, tempDir, writeDirect } from '../helpers.js';
import { REPO_ROOT } from '../cli/run-cli.js';

const readme = fs.readFileSync(path.join(REPO_ROOT, 'README.md'), 'utf8');

function section(title: string): string {
  const start = readme.indexOf(`\n## ${title}\n`);
  assert.ok(start >= 0, `README has a "## ${title}" section`);
  const end = readme.indexOf('\n## ', start + 1);
  return readme.slice(start, end < 0 ? undefined : end);
}

test('`npm test` runs every test file: its shell pattern, test/*/*.test.ts, matches all of them', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { scripts: { test: string } };
  assert.ok(pkg.scripts.test.endsWith(' test/*/*.test.ts'), pkg.scripts.test);
  const all = (fs.readdirSync(path.join(REPO_ROOT, 'test'), { recursive: true }) as string[]).filter((f) => f.endsWith('.test.ts'));
  assert.ok(all.length > 40, `${all.length} test files`);
  assert.deepEqual(all.filter((f) => f.split(path.sep).length !== 2), [], 'a test file nested otherwise than in a folder of test/ would not run');
});

test("README's configuration table is the one the schema renders (run `npm run docs` to update it)", () => {
  const inReadme = readmeConfigTable(readme);
  assert.ok(inReadme, 'README has the config-table markers');
  assert.equal(inReadme, renderConfigTable());

  // The same, read the other way: one row per key, with its environment variable.
  const rows = inReadme
    .split('\n')
    .slice(2)
    .map((line) => line.split(' | ').map((c) => c.replace(/^\|? ?`?|`? ?\|?$/g, '')));
  assert.deepEqual(
    rows.map(([key, env]) => [key, env]),
    CONFIG_KEYS.map((k) => [k.path, envName(k.path)]),
  );
});

/** The Operations section's sqlite3 queries; `writefile` is the sqlite3 shell's own function. */
function operationsQueries(): { queries: string[]; shellOnly: string[] } {
  const all = [...section('Operations').matchAll(/sqlite3 [^"\n]*"([^"]+)"/g)].map((m) => m[1]);
  return { queries: all.filter((q) => !q.includes('writefile(')), shellOnly: all.filter((q) => q.includes('writefile(')) };
}

function sqlite3Available(): boolean {
  return spawnSync('sqlite3', ['-version'], { stdio: 'ignore' }).status === 0;
}

test("the Operations section's sqlite3 query that writes a stored message to a file writes its bytes", { skip: sqlite3Available() ? false : 'the sqlite3 shell is not installed (apt-get install sqlite3)' }, async () => {
  const [query] = operationsQueries().shellOnly;
  assert.ok(query, 'the README shows a writefile query');
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const dir = tempDir('relayq-readme-');
  try {
    const info = await sendMail(relay.smtpPort, { raw: 'Subject: bytes\r\n\r\nno final line break' });
    const id = /queued as (\S+)/.exec(info.response)?.[1] as string;
    const run = spawnSync('sqlite3', ['-readonly', relay.config.databasePath, query.replaceAll('QUEUE_ID', id)], { cwd: dir, encoding: 'utf8' });
    assert.equal(run.status, 0, run.stderr);
    const stored = relay.store.sqlite.prepare('SELECT raw FROM message_bodies WHERE id = (SELECT body_id FROM messages WHERE id = ?)').get(id) as { raw: Buffer };
    assert.deepEqual(fs.readFileSync(path.join(dir, `${id}.eml`)), stored.raw);
  } finally {
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("the Operations section's sqlite3 queries run against a relayq database", async () => {
  const { queries } = operationsQueries();
  assert.ok(queries.length >= 6, `found ${queries.length} queries`);
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    const info = await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'] });
    await sendMail(relay.smtpPort);
    const refused = await sendMail(relay.smtpPort, { to: ['x@example.com', 'y@example.com', 'z@example.com'] });
    const ownRefusal = await sendMail(relay.smtpPort, { to: ['jörg@example.com'] });
    await relay.delivery.runOnce();
    const id = /queued as (\S+)/.exec(info.response)?.[1] as string;
    // failures as the upstream words them: two for one reason, each naming its recipient, and one other
    await writeDirect(relay, (db) => {
      const fail = db.prepare("UPDATE recipients SET status = 'failed', last_code = ?, last_reply = ? WHERE message_id = ? AND address = ?");
      const refusedId = /queued as (\S+)/.exec(refused.response)?.[1];
      fail.run(550, '550 5.1.1 <x@example.com>: Recipient address rejected: User unknown', refusedId, 'x@example.com');
      fail.run(550, '550 5.1.1 <y@example.com>: Recipient address rejected: User unknown', refusedId, 'y@example.com');
      fail.run(550, '550 5.7.1 Relaying denied', refusedId, 'z@example.com');
      // relayq's own: an enhanced code, no reply code
      fail.run(null, '5.6.7 SMTPUTF8 is required, but was not offered by 127.0.0.1:25', /queued as (\S+)/.exec(ownRefusal.response)?.[1], 'jörg@example.com');
    });
    const results = queries.map((sql) => relay.store.sqlite.prepare(sql.replaceAll('QUEUE_ID', id)).all());
    assert.deepEqual(results[0], [{ state: 'delivered', messages: 4, recipients: 7 }]);
    const byReply = queries.findIndex((q) => q.includes("where status = 'failed' group by"));
    const [most, ...others] = (results[byReply] as Array<Record<string, unknown>>).map((r) => [r.code, r.enhanced_code, r.recipients, r.messages]);
    assert.deepEqual(most, [550, '5.1.1', 2, 1]);
    assert.deepEqual(others.sort(), [
      [550, '5.7.1', 1, 1],
      [null, '5.6.7', 1, 1],
    ].sort());
    const perMessage = queries.findIndex((q) => q.includes('from recipients where message_id'));
    assert.deepEqual(
      (results[perMessage] as Array<{ address: string }>).map((r) => r.address),
      ['a@example.com', 'b@example.com'],
    );
  } finally {
    await relay.stop();
  }
});

test("the rate-limit section's sqlite3 queries count what maxPerHour counts", async () => {
  const queries = [...section('Rate limits and backpressure').matchAll(/sqlite3 [^"\n]*"([^"]+)"/g)].map((m) => m[1]);
  assert.equal(queries.length, 3);
  // the relay's clock stands still, so the three messages fall in one hour even at hh:59:59
  const clock = new ManualClock(Date.now());
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false, clock });
  try {
    await sendMail(relay.smtpPort, { from: 'App@Example.com' });
    await sendMail(relay.smtpPort, { from: 'app@example.com' });
    await sendMail(relay.smtpPort, { from: 'other@example.com' });
    const [perSender, busiest, hourly] = queries.map((sql) => relay.store.sqlite.prepare(sql).all());
    assert.deepEqual(Object.values(perSender[0] as object), [2]);
    assert.deepEqual(busiest, [
      { sender_key: 'app@example.com', n: 2 },
      { sender_key: 'other@example.com', n: 1 },
    ]);
    const hour = new Date(Math.floor(clock.now() / 3_600_000) * 3_600_000).toISOString().slice(0, 19).replace('T', ' ');
    assert.deepEqual(hourly, [{ hour, count: 3 }]);
  } finally {
    await relay.stop();
  }
});

test("the alert rules in the HTTP API section name only metrics a relay exposes", async () => {
  const api = section('HTTP API');
  const rules = /\*\*Alerting\.\*\*[\s\S]*?```yaml\n([\s\S]*?)```/.exec(api)?.[1];
  assert.ok(rules, 'the section has its alert rules');
  const named = new Set(rules.match(/\brelayq_\w+/g));
  assert.ok(named.size >= 8, [...named].join(' '));
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  try {
    const exposition = await (await fetch(`http://127.0.0.1:${relay.httpPort}/metrics?format=prometheus`)).text();
    const exposed = new Set([...exposition.matchAll(/^# TYPE (\w+) /gm)].map((m) => m[1]));
    assert.deepEqual([...named].filter((name) => !exposed.has(name)), []);
  } finally {
    await relay.stop();
  }
});
