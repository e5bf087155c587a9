import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import { openConnection, openStore, realDatabasePath, refuseHardLinks, shellWord } from '../../src/store/db.js';
import { lockDatabase } from '../../src/store/maintenance.js';
import { readRootsFile } from '../../src/root-guard.js';
import { runCli } from '../cli/run-cli.js';
import { sendMail, startTestRelay, tempDir, waitFor, whileImmutable } from '../helpers.js';

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
    const code = `const { openStore } = await import(${JSON.stringify(db)}); const store = await openStore(${JSON.stringify(file)}); store.sqlite.pragma('busy_timeout = 2147483647'); process.stdout.write(JSON.stringify(await store.close()));`;
    const child = spawn(process.execPath, [...process.execArgv, '--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
    try {
      await waitFor(() => child.exitCode !== null, 30_000, 'the close to end while the reader still reads');
    } finally {
      child.kill('SIGKILL');
    }
    assert.deepEqual([await exited, out], [0, '{"cause":"reader"}']);
  } finally {
    reader.close();
  }
});

test('a migration is checkpointed into the database file at once: the file holds the schema without its -wal', async () => {
  const dir = tempDir();
  const file = path.join(dir, 'relayq.db');
  const store = await openStore(file);
  // copied while open, as a running relay keeps it (its close checkpoints too)
  fs.copyFileSync(file, path.join(dir, 'alone.db'));
  await store.close();
  const alone = new Database(path.join(dir, 'alone.db'), { readonly: true });
  try {
    const tables = alone.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('messages', 'schema_migrations')").pluck().all();
    assert.deepEqual(tables.sort(), ['messages', 'schema_migrations']);
  } finally {
    alone.close();
  }
});

test('a databasePath that is a symbolic link to a file not made yet: the file is made where the link points, with its lock beside it', async () => {
  const dir = tempDir();
  fs.mkdirSync(path.join(dir, 'volume'));
  fs.mkdirSync(path.join(dir, 'conf'));
  const link = path.join(dir, 'conf', 'relayq.db');
  fs.symlinkSync('../volume/relayq.db', link); // relative, as ln -s makes it
  const lock = lockDatabase(link);
  try {
    await (await openStore(link)).close();
  } finally {
    lock.release();
  }
  assert.ok(fs.lstatSync(link).isSymbolicLink(), 'the link is left as it was');
  assert.deepEqual(fs.readdirSync(path.join(dir, 'conf')), ['relayq.db']);
  assert.deepEqual(fs.readdirSync(path.join(dir, 'volume')).sort(), ['relayq.db', 'relayq.db-lock']);
  assert.equal(fs.statSync(path.join(dir, 'volume', 'relayq.db')).mode & 0o777, 0o600);
});

test('a databasePath with `..` after a link names what the kernel opens: the lock, the spool and the database are beside it, as SQLite puts the -wal', async () => {
  const dir = tempDir();
  fs.mkdirSync(path.join(dir, 'data', 'sub'), { recursive: true });
  fs.symlinkSync(path.join(dir, 'data', 'sub'), path.join(dir, 'current'));
  const given = `${dir}/current/../relayq.db`;
  assert.equal(realDatabasePath(given), path.join(dir, 'data', 'relayq.db'));
  const relay = await startTestRelay({ databasePath: given, spoolAfter: 1024 }, { startDelivery: false, startRetention: false });
  try {
    // over spoolAfter: its bytes go through the spool, which must be where it was made
    const info = await sendMail(relay.smtpPort, { text: 'x'.repeat(4096) });
    assert.match(info.response, /^250 /);
  } finally {
    await relay.stop();
  }
  const backup = await runCli(['backup', `${dir}/current/../copy.db`, '--databasePath', given]);
  assert.equal(backup.code, 0, backup.stderr);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['current', 'data']);
  const made = fs.readdirSync(path.join(dir, 'data')).filter((name) => !/-(wal|shm)$/.test(name)); // a reader's, kept
  assert.deepEqual(made.sort(), ['copy.db', 'relayq.db', 'relayq.db-lock', 'relayq.db-spool', 'sub']);
});

test("as root, the commands that read refuse a database in another user's directory too, before they open anything there", {
  skip: process.getuid?.() === 0 ? false : 'giving a directory another owner takes root',
}, async () => {
  const top = tempDir();
  fs.chmodSync(top, 0o755);
  const dir = path.join(top, 'data');
  const file = path.join(dir, 'relayq.db');
  await (await openStore(file)).close();
  fs.chownSync(dir, 1000, 1000);
  fs.chownSync(file, 1000, 1000);
  // a file of root's under the name a reader gives the -shm it makes (the directory's owner could
  // link it there where fs.protected_hardlinks is 0): SQLite would give it the database's owner
  const victim = path.join(top, 'root-only');
  fs.writeFileSync(victim, 'root\n', { mode: 0o600 });
  fs.linkSync(victim, `${file}-shm`);
  const refusal = `relayq: cannot open database ${file}: ${dir} may be changed by its owner, uid 1000: as root, relayq would follow the links put there to other files; run it as that user (sudo -u '#1000' relayq …)`;
  const results = await Promise.all([
    runCli(['status', '--databasePath', file]),
    runCli(['queue', '--databasePath', file]),
    runCli(['show', 'X', '--databasePath', file]),
    runCli(['backup', path.join(top, 'copy.db'), '--databasePath', file]),
    runCli(['export-failed', path.join(top, 'exports'), '--databasePath', file]),
  ]);
  for (const r of results) assert.deepEqual([r.code, r.stderr.trim()], [1, refusal]);
  assert.deepEqual([fs.readFileSync(victim, 'utf8'), fs.statSync(victim).uid], ['root\n', 0], 'the linked file is untouched');
  assert.deepEqual(fs.readdirSync(top).sort(), ['data', 'root-only']);

  // root's link to the database of another user in a sticky directory
  const sticky = path.join(top, 'scratch');
  fs.mkdirSync(sticky, { mode: 0o1777 });
  fs.chmodSync(sticky, 0o1777);
  const theirs = path.join(sticky, 'theirs.db');
  fs.copyFileSync(file, theirs);
  fs.chownSync(theirs, 1000, 1000);
  fs.linkSync(victim, `${theirs}-shm`);
  const link = path.join(tempDir(), 'relayq.db');
  fs.symlinkSync(theirs, link);
  const viaLink = await runCli(['status', '--databasePath', link]);
  assert.deepEqual([viaLink.code, viaLink.stderr.trim()], [1, `relayq: cannot open database ${link}: ${sticky} is shared (sticky, as /tmp is): as root, relayq does not make its files where other users may have made theirs first (files SQLite opens by name, links); use a directory of root's in it, or run it as the relay's user`]);
  assert.deepEqual([fs.readFileSync(victim, 'utf8'), fs.statSync(victim).uid], ['root\n', 0], 'the linked file is untouched');

  // links that lead to links: 40 followed in all, as the kernel allows, and then a refusal, at once
  const loops = path.join(tempDir(), 'loops');
  fs.mkdirSync(loops);
  fs.symlinkSync('.', path.join(loops, 'L0'));
  for (let i = 1; i <= 8; i++) fs.symlinkSync(`L${i - 1}/L${i - 1}/`, path.join(loops, `L${i}`));
  const deep = await runCli(['status', '--databasePath', path.join(loops, 'L8', 'relayq.db')], { timeoutMs: 20_000 });
  assert.equal(deep.signal, null, 'refused without walking the links for ever');
  assert.match(deep.stderr, /too many levels of symbolic links/);
  // a chain of exactly 40 links is followed, as the kernel follows it; one link more is refused
  const chain = tempDir();
  await (await openStore(path.join(chain, 'data', 'relayq.db'))).close();
  fs.symlinkSync('data', path.join(chain, 'l1'));
  for (let i = 2; i <= 41; i++) fs.symlinkSync(`l${i - 1}`, path.join(chain, `l${i}`));
  const forty = await runCli(['status', '--databasePath', path.join(chain, 'l40', 'relayq.db')]);
  assert.equal(forty.code, 0, forty.stderr);
  const fortyOne = await runCli(['status', '--databasePath', path.join(chain, 'l41', 'relayq.db')]);
  assert.deepEqual([fortyOne.code, fortyOne.stderr.match(/too many levels of symbolic links/)?.[0]], [1, 'too many levels of symbolic links'], fortyOne.stderr);

  // the STARTTLS key and certificate: a key of theirs would be the identity root serves
  const tlsDir = path.join(tempDir(), 'tls');
  fs.mkdirSync(tlsDir);
  fs.writeFileSync(path.join(tlsDir, 'key.pem'), '');
  fs.writeFileSync(path.join(tlsDir, 'cert.pem'), '');
  fs.chownSync(path.join(tlsDir, 'key.pem'), 1000, 1000);
  const tls = { cert: path.join(tlsDir, 'cert.pem'), key: path.join(tlsDir, 'key.pem') };
  await assert.rejects(startTestRelay({ tls }, { startDelivery: false }), /tls\.key: cannot read \S+key\.pem: \S+key\.pem may be changed by its owner, uid 1000: as root, relayq would serve the certificate or key put there/);
  fs.chownSync(tlsDir, 1000, 1000);
  await assert.rejects(startTestRelay({ tls }, { startDelivery: false }), new RegExp(`tls\\.cert: cannot read \\S+cert\\.pem: ${tlsDir} may be changed by its owner, uid 1000: as root, relayq would follow the links`));
});

test('as root, relayq refuses a database directory another user may write: links put there would lead root to other files', {
  skip: process.getuid?.() === 0 ? false : 'giving a directory another owner takes root',
}, async () => {
  const dir = path.join(tempDir(), 'data');
  const file = path.join(dir, 'relayq.db');
  await (await openStore(file)).close();
  const victim = path.join(tempDir(), 'root-only');
  fs.writeFileSync(victim, '', { mode: 0o600 });
  fs.rmSync(`${file}-lock`, { force: true });
  fs.symlinkSync(victim, `${file}-lock`); // as the owner of the directory could
  fs.chownSync(dir, 1000, 1000);
  const refusal = `${dir} may be changed by its owner, uid 1000: as root, relayq would follow the links put there to other files; run it as that user (sudo -u '#1000' relayq …)`;
  assert.throws(() => lockDatabase(file), { message: refusal });
  const migrate = await runCli(['migrate', '--databasePath', file]);
  assert.deepEqual([migrate.code, migrate.stderr.trim()], [1, `relayq: cannot open database ${file}: ${refusal}`]);
  await assert.rejects(startTestRelay({ databasePath: file }, { startDelivery: false }), { message: `databasePath ${file}: ${refusal}` });
  assert.equal(fs.readFileSync(victim, 'utf8'), '', 'what the link points to is untouched');
  // a directory root owns that others may write is refused too; a sticky one (/tmp) may be on
  // the way, but does not hold relayq's files: others may have made a name there first (the
  // -shm, a hard link to a file of root's that SQLite would give the database's owner)
  fs.chownSync(dir, 0, 0);
  fs.chmodSync(dir, 0o777);
  assert.throws(() => lockDatabase(file), /may be changed by users other than root: .*run it as the relay's user$/);
  fs.chmodSync(dir, 0o1777);
  fs.rmSync(`${file}-lock`);
  const shared = `${dir} is shared (sticky, as /tmp is): as root, relayq does not make its files where other users may have made theirs first (files SQLite opens by name, links); use a directory of root's in it, or run it as the relay's user`;
  assert.throws(() => lockDatabase(file), { message: shared });
  const inside = path.join(dir, 'root-only');
  fs.mkdirSync(inside, { mode: 0o700 });
  lockDatabase(path.join(inside, 'relayq.db')).release();
  fs.rmSync(inside, { recursive: true });
  fs.chmodSync(dir, 0o700);
  lockDatabase(file).release();
  // nor a directory made there: the check cannot see who makes a name first
  const sticky = tempDir();
  fs.chmodSync(sticky, 0o1777);
  const exportedToShared = await runCli(['export-failed', path.join(sticky, 'not-yet', 'exports'), '--databasePath', file]);
  assert.match(exportedToShared.stderr, new RegExp(`^relayq: cannot export into \\S+exports: ${sticky} is shared \\(sticky`));
  const backupToShared = await runCli(['backup', path.join(sticky, 'copy.db'), '--databasePath', file]);
  assert.match(backupToShared.stderr, new RegExp(`^relayq: backup failed: ${sticky} is shared \\(sticky`));
  assert.deepEqual(fs.readdirSync(sticky), []);
  // another user's file there, with `..` after it, on the way to a directory of root's: the kernel
  // does not go back from a file, and that user could swap it for a link between check and open
  fs.mkdirSync(path.join(sticky, 'x'), { mode: 0o700 });
  fs.copyFileSync(file, path.join(sticky, 'x', 'relayq.db'));
  fs.writeFileSync(path.join(sticky, 'F'), '');
  fs.chownSync(path.join(sticky, 'F'), 1000, 1000);
  const throughFile = await runCli(['status', '--databasePath', `${sticky}/F/../x/relayq.db`]);
  assert.equal(throughFile.stderr, `relayq: cannot open database ${sticky}/F/../x/relayq.db: ${sticky}/F is not a directory\n`);
  fs.rmSync(path.join(sticky, 'x'), { recursive: true });
  fs.rmSync(path.join(sticky, 'F'));
  // a link of another user's in the middle of a chain of links: root's link leads to it
  const chain = path.join(tempDir(), 'chain.db');
  const middle = path.join(tempDir(), 'middle.lnk');
  fs.symlinkSync(file, middle);
  fs.lchownSync(middle, 1000, 1000);
  fs.symlinkSync(middle, chain);
  assert.throws(() => lockDatabase(chain), { message: new RegExp(`^${middle} may be changed by its owner, uid 1000 \\(a symbolic link\\): `) });
  // `..` after a link is the parent of the link's target, not the link's: a directory of theirs
  const theirs = path.join(tempDir(), 'theirs');
  fs.mkdirSync(path.join(theirs, 'sub'), { recursive: true });
  fs.chownSync(theirs, 1000, 1000);
  const current = path.join(dir, 'current');
  fs.symlinkSync(path.join(theirs, 'sub'), current);
  assert.throws(() => lockDatabase(`${current}/../relayq.db`), { message: `${theirs} may be changed by its owner, uid 1000: as root, relayq would follow the links put there to other files; run it as that user (sudo -u '#1000' relayq …)` });
  assert.deepEqual(fs.readdirSync(theirs), ['sub']);
  fs.rmSync(current);
  // a config file another user may change would choose the paths root writes
  const config = path.join(dir, 'config.json');
  fs.writeFileSync(config, JSON.stringify({ databasePath: file }));
  fs.chownSync(config, 1000, 1000);
  const configured = await runCli(['migrate', '--config', config]);
  assert.equal(configured.code, 2, configured.stdout);
  assert.match(configured.stderr, new RegExp(`${config} may be changed by its owner, uid 1000: as root, relayq would take paths and settings from it; run it as that user`));
  fs.chownSync(config, 0, 0);
  fs.chmodSync(config, 0o666);
  assert.match((await runCli(['status', '--config', config])).stderr, /config\.json may be changed by users other than root: as root, relayq would take paths and settings from it; run it as the relay's user/);
  // sticky does nothing for a file; a second name could be a file whose content another user chose
  fs.chmodSync(config, 0o1666);
  assert.match((await runCli(['status', '--config', config])).stderr, /config\.json may be changed by users other than root/);
  fs.chmodSync(config, 0o644);
  fs.linkSync(config, path.join(dir, 'second-name.json'));
  assert.match((await runCli(['status', '--config', config])).stderr, /config\.json has 2 hard links: as root, relayq reads a file it takes settings from by one name only/);
  fs.rmSync(path.join(dir, 'second-name.json'));
  assert.equal((await runCli(['status', '--config', config])).code, 0);
  // the spool, which a start empties, as a link into a directory of theirs
  const theirSpool = path.join(theirs, 'spool');
  fs.mkdirSync(theirSpool);
  fs.symlinkSync(theirSpool, `${file}-spool`);
  assert.throws(() => lockDatabase(file), { message: `${theirs} may be changed by its owner, uid 1000: as root, relayq would follow the links put there to other files; run it as that user (sudo -u '#1000' relayq …)` });
  fs.rmSync(`${file}-spool`);
  // nor a FIFO of theirs, whose owner is seen once it is opened (it waits for its writer)
  const fifo = path.join(dir, 'fifo.json');
  execFileSync('mkfifo', [fifo]);
  fs.chownSync(fifo, 1000, 1000);
  const writer = spawn('sh', ['-c', `echo '{"databasePath": "${file}"}' > ${fifo}`]);
  const piped = await runCli(['status', '--config', fifo]);
  writer.kill();
  assert.equal(piped.code, 2, piped.stdout);
  assert.match(piped.stderr, /fifo\.json may be changed by its owner, uid 1000: as root, relayq would take paths and settings from it/);
  // a directory of root's in one its owner may change (it could put a link in its place), and a
  // link of another user's in a sticky directory, as a database path
  const parent = path.dirname(dir);
  fs.chmodSync(dir, 0o700);
  fs.chownSync(parent, 1000, 1000);
  assert.throws(() => lockDatabase(file), { message: refusal.replace(dir, parent) });
  fs.chownSync(parent, 0, 0);
  fs.chmodSync(parent, 0o1777);
  const planted = path.join(parent, 'planted.db');
  fs.symlinkSync(path.join(tempDir(), 'new.db'), planted);
  fs.lchownSync(planted, 1000, 1000);
  assert.throws(() => lockDatabase(planted), /^Error: \S+planted\.db may be changed by its owner, uid 1000 \(a symbolic link\): /);
  fs.chmodSync(parent, 0o700);
  // export-failed into emailsDir/failed, which its owner made a link to a directory of root's
  const emails = path.join(tempDir(), 'emails');
  const rootsDir = tempDir();
  fs.mkdirSync(emails);
  fs.symlinkSync(rootsDir, path.join(emails, 'failed'));
  fs.chownSync(emails, 1000, 1000);
  const exported = await runCli(['export-failed', '--databasePath', file, '--emailsDir', emails]);
  assert.equal(exported.code, 1, exported.stdout);
  assert.match(exported.stderr, /^relayq: cannot use emailsDir \S+emails: \S+emails may be changed by its owner, uid 1000: /);
  // a command that writes names the key that is refused, not the database
  const deleted = await runCli(['delete', '1A23BC3C88F4F86B3CCE', '--databasePath', file, '--emailsDir', emails]);
  assert.equal(deleted.code, 1, deleted.stdout);
  assert.match(deleted.stderr, /^relayq: cannot use emailsDir \S+emails: \S+emails may be changed by its owner, uid 1000: /);
  // an emailsDir with `..` after a link: its failed/ is checked where the kernel reaches it, where
  // the exports go (the path's text names another one)
  const base = tempDir();
  fs.mkdirSync(path.join(base, 'a'));
  fs.mkdirSync(path.join(base, 'P', 'sub'), { recursive: true });
  fs.symlinkSync('../P/sub', path.join(base, 'a', 'l'));
  fs.mkdirSync(path.join(base, 'P', 'failed'));
  fs.chownSync(path.join(base, 'P', 'failed'), 1000, 1000);
  await assert.rejects(startTestRelay({ databasePath: path.join(tempDir(), 'relayq.db'), emailsDir: `${base}/a/l/..` }, { startDelivery: false }), {
    message: new RegExp(`^config error: emailsDir: \\S+ cannot hold deliveries and failed-mail exports: ${path.join(base, 'P', 'failed')} may be changed by its owner, uid 1000`),
  });
});

test('as root, a config file another user makes between the look at its name and the open is refused, not read', {
  skip: process.getuid?.() === 0 ? false : 'a file of another user, made as that user, takes root',
}, async () => {
  // a sticky directory of root's that everyone may write in, as /tmp is, may be on the way
  const dir = tempDir();
  fs.chmodSync(dir, 0o1777);
  const file = path.join(dir, 'relayq.json');
  // another user makes the file and removes it again, over and over: now and then it appears after
  // the look found no file and before the open, where only the owner of what was opened tells
  const racer = spawn(process.execPath, ['-e', 'const fs = require("fs"); const f = process.argv[1]; for (;;) { try { fs.writeFileSync(f, "{}"); fs.unlinkSync(f); } catch {} }', file], {
    uid: 65534,
    gid: 65534,
    stdio: 'ignore',
  });
  try {
    await waitFor(() => fs.existsSync(file), 10_000, "the other user's file");
    const outcomes: Record<string, number> = {};
    const until = performance.now() + 2000;
    while (performance.now() < until && !outcomes.read) {
      let outcome: string;
      try {
        readRootsFile(file);
        outcome = 'read';
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        outcome = e.code ?? (/may be changed by its owner, uid 65534: as root, relayq would take paths and settings from it/.test(e.message) ? 'refused' : e.message);
      }
      outcomes[outcome] = (outcomes[outcome] ?? 0) + 1;
    }
    assert.equal(outcomes.read, undefined, JSON.stringify(outcomes));
    assert.ok(outcomes.refused > 0, JSON.stringify(outcomes));
    assert.deepEqual(Object.keys(outcomes).filter((o) => o !== 'ENOENT' && o !== 'refused'), [], JSON.stringify(outcomes));
  } finally {
    racer.kill('SIGKILL');
  }
});

test('a lock file the relay may not write is refused: opened read-only, it would lock nothing and a second relay would run beside the first', async (t) => {
  const file = path.join(tempDir(), 'relayq.db');
  lockDatabase(file).release();
  const lockFile = `${file}-lock`;
  const refusal = new RegExp(`^${lockFile}: (EACCES|EPERM)[^\\n]*: the relay's user must be able to write it and the database's directory$`);
  const bothRefused = async () => {
    assert.throws(() => lockDatabase(file), { message: refusal });
    assert.throws(() => lockDatabase(file), { message: refusal });
  };
  // root writes a file of mode 0444 (as a relay's user one of root's 0644 that an older build made)
  if (process.getuid?.() === 0) {
    if (!(await whileImmutable(t, lockFile, bothRefused))) return;
  } else {
    fs.chmodSync(lockFile, 0o444);
    await bothRefused();
    fs.chmodSync(lockFile, 0o600);
  }
  lockDatabase(file).release();
});
