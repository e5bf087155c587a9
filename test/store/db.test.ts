import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { openConnection, refuseHardLinks, shellWord } from '../../src/store/db.js';
import { startTestRelay, tempDir } from '../helpers.js';

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
