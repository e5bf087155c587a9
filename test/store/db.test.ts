import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import { openConnection, openStore, refuseHardLinks, shellWord } from '../../src/store/db.js';
import { sendMail, startTestRelay, tempDir, waitFor } from '../helpers.js';

test('shellWord leaves plain words alone and quotes the rest so that a shell reads them back', () => {
  assert.equal(shellWord('/var/lib/relayq/relayq.db'), '/var/lib/relayq/relayq.db');
  for (const word of ['my mail/relayq.db', "it's.db", '$(touch x).db', 'a;b', '']) {
    assert.equal(execFileSync('sh', ['-c', `printf %s ${shellWord(word)}`], { encoding: 'utf8' }), word);
  }
});

test('a hard-linked database is refused with a command that lists its names, however they are spelt', () => {
  const dir = path.join(tempDir(), "the mail's $HOME");
  fs.mkdirSync(dir);
  const file = path.join(dir, 'relayq.db');
  fs.writeFileSync(file, '');
  refuseHardLinks(file); // one name: nothing to refuse
  fs.linkSync(file, path.join(dir, 'second name.db'));
  const err = (() => {
    try {
      refuseHardLinks(file);
    } catch (e) {
      return e as Error;
    }
    assert.fail('a second name was not refused');
  })();
  const command = /\((find .*) lists them\)$/.exec(err.message)?.[1];
  assert.ok(command, err.message);
  // find says so of the directories it may not read, and exits 1 for them
  const listed = execFileSync('sh', ['-c', `${command} 2>/dev/null || true`], { encoding: 'utf8' }).trim().split('\n').sort();
  assert.deepEqual(listed, [file, path.join(dir, 'second name.db')].sort());
});

test('every connection of a relay, and the CLI\'s, is in WAL mode with synchronous=FULL: a commit is on the disk before its 250', async () => {
  // SQLite's numbers: synchronous 2 is FULL (NORMAL, 1, would not fsync the WAL at each commit)
  const relay = await startTestRelay({}, { startDelivery: false });
  try {
    assert.equal(relay.store.sqlite.pragma('synchronous', { simple: true }), 2, 'the main thread\'s connection');
    assert.equal(await relay.writer.pragma('synchronous'), 2, 'the writer thread\'s connection, which commits the mail');
    assert.equal(await relay.writer.pragma('journal_mode'), 'wal');
    const cli = openConnection(relay.config.databasePath);
    try {
      assert.deepEqual([cli.pragma('synchronous', { simple: true }), cli.pragma('journal_mode', { simple: true })], [2, 'wal']);
    } finally {
      cli.close();
    }
  } finally {
    await relay.stop();
  }
});

test('closing a store does not wait for a reader of older frames, however long its busy timeout: those frames stay in the WAL', async () => {
  const file = path.join(tempDir(), 'relayq.db');
  const store = await openStore(file);
  const bump = () => store.sqlite.prepare("UPDATE counters SET value = value + 1 WHERE name = 'upstream_consecutive_failures'").run();
  bump();
  const reader = new Database(file, { readonly: true });
  try {
    reader.exec('BEGIN');
    reader.prepare('SELECT count(*) FROM messages').get();
    bump(); // a frame the reader's snapshot does not have
    store.sqlite.close();
    // In another process, as a close that waited would block its event loop: with a busy timeout
    // of 24 days, it ends only if the close does not wait for the reader.
    const db = pathToFileURL(path.resolve('src/store/db.ts')).href;
    const code = `const { openStore } = await import(${JSON.stringify(db)}); const store = await openStore(${JSON.stringify(file)}); store.sqlite.pragma('busy_timeout = 2147483647'); process.stdout.write(String(await store.close()));`;
    const child = spawn(process.execPath, [...process.execArgv, '--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
    try {
      await waitFor(() => child.exitCode !== null, 30_000, 'the close to end while the reader still reads');
    } finally {
      child.kill('SIGKILL');
    }
    assert.deepEqual([await exited, out], [0, 'false']);
  } finally {
    reader.close();
  }
});

test('the -wal file a reader kept growing is cut back to 16 MiB once that reader is gone (journal_size_limit)', async () => {
  const relay = await startTestRelay({ maxMessageSize: 2 * 2 ** 20 }, { startDelivery: false, startRetention: false });
  const wal = `${relay.config.databasePath}-wal`;
  const reader = new Database(relay.config.databasePath, { readonly: true });
  try {
    // a snapshot held open (a long sqlite3 session, a backup) keeps the WAL from being reused
    reader.exec('BEGIN');
    reader.prepare('SELECT count(*) FROM messages').get();
    const text = 'x'.repeat(1000).concat('\r\n').repeat(1000); // 1 MB
    for (let i = 0; i < 20; i++) await sendMail(relay.smtpPort, { text });
    assert.ok(fs.statSync(wal).size > 16 * 2 ** 20, `the WAL grew past 16 MiB: ${fs.statSync(wal).size}`);
    reader.exec('COMMIT');
    reader.close();
    // a checkpoint, then a commit that starts the WAL over and cuts it back
    await waitFor(
      async () => {
        await sendMail(relay.smtpPort);
        return fs.statSync(wal).size <= 16 * 2 ** 20;
      },
      20_000,
      `the WAL cut back: ${fs.statSync(wal).size}`,
    );
  } finally {
    if (reader.open) reader.close();
    await relay.stop();
  }
});
