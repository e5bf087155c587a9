// The directories relayq makes (the database's, emailsDir and emailsDir/failed, the spool, an
// export target): made with their parents and their mode, and a path where one cannot be made is
// an error at once. Node's own recursive mkdir never returns for a path under /proc.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { makeDirectory } from '../../src/make-dir.js';
import { openStore } from '../../src/store/db.js';
import { runCli } from '../cli/run-cli.js';
import { tempDir } from '../helpers.js';

const errorCode = (fn: () => void) => {
  try {
    fn();
    return 'made';
  } catch (err) {
    return (err as NodeJS.ErrnoException).code;
  }
};

describe('makeDirectory', () => {
  test('makes the missing parents with the mode given, accepts a directory that is there, and fails as mkdir -p does', () => {
    const dir = tempDir();
    const deep = path.join(dir, 'a', 'b', 'c');
    assert.deepEqual(makeDirectory(deep, 0o700), [path.join(dir, 'a'), path.join(dir, 'a', 'b'), deep], 'what it made, outermost first');
    for (const made of [path.join(dir, 'a'), path.join(dir, 'a', 'b'), deep]) {
      assert.equal(fs.statSync(made).mode & 0o777, 0o700, made);
    }
    assert.deepEqual(makeDirectory(deep, 0o700), []);
    makeDirectory(dir, 0o700);
    fs.writeFileSync(path.join(dir, 'file'), 'x');
    fs.symlinkSync(path.join(dir, 'nowhere'), path.join(dir, 'dangling'));
    assert.deepEqual(
      ['file', 'file/sub', 'dangling', 'dangling/sub/x'].map((name) => [name, errorCode(() => makeDirectory(path.join(dir, name), 0o700))]),
      [
        ['file', 'ENOTDIR'],
        ['file/sub', 'ENOTDIR'],
        ['dangling', 'ENOENT'],
        ['dangling/sub/x', 'ENOENT'],
      ],
    );
  });
});

describe('a start refused for its database', () => {
  test('takes back the directories it made for emailsDir, and only those', async () => {
    const dir = tempDir();
    const notSqlite = path.join(dir, 'notes.txt');
    fs.writeFileSync(notSqlite, 'not a database, a mistyped path\n');
    fs.mkdirSync(path.join(dir, 'there'));
    const r = await runCli(['serve', '--smtpPort', '0', '--enableHealthCheck', 'false', '--databasePath', notSqlite, '--emailsDir', path.join(dir, 'there', 'mail', 'out')]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^relayq: databasePath .*notes\.txt: file is not a database$/m);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['notes.txt', 'there']);
    assert.deepEqual(fs.readdirSync(path.join(dir, 'there')), []);
  });

  test('keeps an emailsDir that was there before', async () => {
    const dir = tempDir();
    const notSqlite = path.join(dir, 'notes.txt');
    fs.writeFileSync(notSqlite, 'not a database, a mistyped path\n');
    fs.mkdirSync(path.join(dir, 'emails'));
    const r = await runCli(['serve', '--smtpPort', '0', '--enableHealthCheck', 'false', '--databasePath', notSqlite, '--emailsDir', path.join(dir, 'emails')]);
    assert.equal(r.code, 1, r.stderr);
    // its failed/ was made by this start, and goes
    assert.deepEqual(fs.readdirSync(path.join(dir, 'emails')), []);
  });
});

// In child processes that are killed after a minute: a regression would hang in a synchronous
// loop, which no timer of this process could interrupt.
describe('a path under /proc', { skip: !fs.existsSync('/proc/self') && 'no /proc here' }, () => {
  const oneLine = (r: { code: number | null; stderr: string }, pattern: RegExp) => {
    assert.equal(r.code, 1, `exit code (a hang is killed: null): ${r.stderr}`);
    const lines = r.stderr.trimEnd().split('\n').filter((line) => line.startsWith('relayq: '));
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0], pattern);
  };

  test('as databasePath or emailsDir stops the start at once with the key and the directory, as an export target stops export-failed', async () => {
    const dir = tempDir();
    const database = path.join(dir, 'relayq.db');
    await (await openStore(database)).close();
    const serve = ['serve', '--smtpPort', '0', '--enableHealthCheck', 'false'];
    const [underProc, emailsUnderProc, exportUnderProc] = await Promise.all([
      runCli([...serve, '--databasePath', '/proc/relayq-test/relayq.db', '--emailsDir', path.join(dir, 'emails')], { timeoutMs: 60_000 }),
      runCli([...serve, '--databasePath', database, '--emailsDir', '/proc/relayq-test/emails'], { timeoutMs: 60_000 }),
      runCli(['export-failed', '/proc/relayq-test/failed', '--databasePath', database], { timeoutMs: 60_000 }),
    ]);
    oneLine(underProc, /^relayq: databasePath \/proc\/relayq-test\/relayq\.db: .*ENOENT: no such file or directory, mkdir '\/proc\/relayq-test'$/);
    assert.equal(fs.existsSync(path.join(dir, 'emails')), false, 'the refused start took back the emailsDir it made');
    oneLine(emailsUnderProc, /^relayq: config error: emailsDir: \/proc\/relayq-test\/emails cannot hold .*ENOENT: no such file or directory, mkdir '\/proc\/relayq-test'$/);
    oneLine(exportUnderProc, /^relayq: cannot export into \/proc\/relayq-test\/failed: ENOENT: no such file or directory, mkdir '\/proc\/relayq-test'$/);
  });
});
