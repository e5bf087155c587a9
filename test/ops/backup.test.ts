import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import nodemailer from 'nodemailer';
import pino from 'pino';
import { ManualClock } from '../manual-clock.js';
import { type Relay, startRelay } from '../../src/main.js';
import { BackupError, backupDatabase } from '../../src/store/backup.js';
import { openStore } from '../../src/store/db.js';
import { openReadOnly } from '../../src/store/maintenance.js';
import { REPO_ROOT, sendMail, startTestRelay, tempDir, waitFor } from '../helpers.js';
import { runCli, writeConfigFile } from '../cli/run-cli.js';

const CLIENTS = 12;
const MIN_MESSAGES = 400;
/** The backup starts once this many messages have been acknowledged. */
const ACKED_BEFORE_BACKUP = 150;

describe('relayq backup while mail is accepted and delivered', () => {
  let relay: Relay;
  let dir: string;
  let configFile: string;

  before(async () => {
    relay = await startTestRelay({ queueSize: 0 });
    dir = tempDir('relayq-backup-');
    configFile = writeConfigFile(dir, { databasePath: relay.config.databasePath, emailsDir: relay.config.emailsDir });
  });
  after(async () => {
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the copy opens, passes integrity_check and holds every message acknowledged before it began', async () => {
    const acked: string[] = [];
    let backupDone = false;
    let startBackup: () => void = () => {};
    const backupMayStart = new Promise<void>((resolve) => (startBackup = resolve));
    const client = async (k: number) => {
      const transport = nodemailer.createTransport({ host: '127.0.0.1', port: relay.smtpPort, pool: true, maxConnections: 1, ignoreTLS: true });
      try {
        for (let i = 0; !backupDone || acked.length < MIN_MESSAGES; i++) {
          const info = await transport.sendMail({
            from: `load${k}@example.com`,
            to: [`rcpt${k}-${i}@example.com`, `copy${k}-${i}@example.com`],
            subject: `load ${k}/${i}`,
            text: `message ${i} of client ${k}\n${'x'.repeat(2000)}`,
          });
          const id = /queued as (\S+)/.exec(info.response)?.[1];
          assert.ok(id, info.response);
          acked.push(id);
          if (acked.length === ACKED_BEFORE_BACKUP) startBackup();
        }
      } finally {
        transport.close();
      }
    };
    const file = path.join(dir, 'relayq-backup.db');
    const backup = backupMayStart.then(async () => {
      const ackedBefore = [...acked];
      const result = await runCli(['--config', configFile, 'backup', file, '--json']);
      const ackedAfter = acked.length;
      backupDone = true;
      return { result, ackedBefore, ackedAfter };
    });
    const [{ result, ackedBefore, ackedAfter }] = await Promise.all([backup, ...Array.from({ length: CLIENTS }, (_, k) => client(k))]);

    assert.equal(result.code, 0, result.stderr);
    const report = JSON.parse(result.stdout) as { file: string; integrity: string; messages: number; bytes: number };
    assert.equal(report.integrity, 'ok');
    assert.equal(report.file, file);
    assert.ok(ackedAfter > ackedBefore.length, 'mail kept being accepted while the backup ran');
    assert.ok(acked.length >= MIN_MESSAGES);

    assert.deepEqual(
      fs.readdirSync(dir).filter((f) => f.startsWith('relayq-backup')),
      ['relayq-backup.db'],
      'no partial file or -wal next to the copy',
    );
    const copy = new Database(file, { readonly: true, fileMustExist: true });
    try {
      assert.deepEqual(copy.pragma('integrity_check'), [{ integrity_check: 'ok' }]);
      assert.deepEqual(copy.pragma('foreign_key_check'), []);
      const inCopy = new Set((copy.prepare('SELECT id FROM messages').all() as Array<{ id: string }>).map((r) => r.id));
      assert.equal(inCopy.size, report.messages);
      const missing = ackedBefore.filter((id) => !inCopy.has(id));
      assert.deepEqual(missing, [], 'every message acknowledged before the backup is in it');
      const rcpts = copy.prepare('SELECT COUNT(*) AS n FROM recipients WHERE message_id = ?');
      for (const id of ackedBefore) assert.equal((rcpts.get(id) as { n: number }).n, 2);
      // Counters are copied in the same snapshot as the rows they count.
      const counted = copy.prepare("SELECT SUM(value) AS n FROM counters WHERE name LIKE 'state_%'").get() as { n: number };
      assert.equal(counted.n, inCopy.size);
    } finally {
      copy.close();
    }
  });

  test('restoring the copy as the README says brings every message back and delivers what was pending', async () => {
    const file = path.join(dir, 'relayq-backup.db');
    const restoredDir = tempDir('relayq-restore-');
    const restored = path.join(restoredDir, 'data', 'relayq.db');
    fs.mkdirSync(path.dirname(restored));
    fs.copyFileSync(file, restored);
    const expected = (new Database(file, { readonly: true }).prepare('SELECT COUNT(*) AS n FROM messages').get() as { n: number }).n;
    const again = await startRelay(
      { ...relay.config, smtpPort: 0, healthCheckPort: 0, databasePath: restored, emailsDir: path.join(restoredDir, 'emails') },
      // Messages a worker had claimed when the copy was taken carry that worker's lease; they
      // are due again once it runs out (processingTimeout), which this clock has passed.
      { logger: pino({ level: 'silent' }), clock: new ManualClock(Date.now() + (relay.config.processingTimeout + 1) * 1000) },
    );
    try {
      const count = (sql: string) => (again.store.sqlite.prepare(sql).get() as { n: number }).n;
      assert.equal(count('SELECT COUNT(*) AS n FROM messages'), expected);
      assert.ok(count("SELECT COUNT(*) AS n FROM messages WHERE state IN ('queued', 'sending')") > 0, 'the copy was taken mid-delivery');
      await waitFor(() => count("SELECT COUNT(*) AS n FROM messages WHERE state IN ('queued', 'sending')") === 0, 20_000, 'restored queue to drain');
      assert.equal(count("SELECT COUNT(*) AS n FROM messages WHERE state = 'delivered'"), expected);
    } finally {
      await again.stop();
    }
  });

  test('refuses to overwrite without --force, replaces with it, and leaves nothing behind on failure', async () => {
    const target = path.join(dir, 'second.db');
    fs.writeFileSync(target, 'an older backup');
    const refused = await runCli(['--config', configFile, 'backup', target]);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /^relayq: backup failed: .*second\.db already exists \(use --force to replace it\)\n$/);
    assert.equal(fs.readFileSync(target, 'utf8'), 'an older backup');

    const sqlite = openReadOnly(relay.config.databasePath);
    try {
      const replaced = backupDatabase(sqlite, target, { overwrite: true });
      assert.equal(replaced.integrity, 'ok');
      assert.ok(replaced.messages >= MIN_MESSAGES);
      assert.throws(() => backupDatabase(sqlite, path.join(dir, 'no-such-dir', 'x.db')), BackupError);
      assert.throws(() => backupDatabase(sqlite, relay.config.databasePath, { overwrite: true }), /is the database or one of its files/);
      assert.deepEqual(
        fs.readdirSync(dir).filter((f) => f.includes('.partial-')),
        [],
      );
    } finally {
      sqlite.close();
    }
  });

  test('--json names the source and the copy with its size, messages and schema; the text says the same for people', async () => {
    const target = path.join(dir, 'reported.db');
    // how long the copy took lies within what the command took
    const within = async (args: string[]) => {
      const started = Date.now();
      const out = await runCli(args);
      return { out, took: Date.now() - started };
    };
    const { out: json, took } = await within(['--config', configFile, 'backup', target, '--json']);
    assert.equal(json.code, 0, json.stderr);
    const result = JSON.parse(json.stdout) as Record<string, unknown>;
    const copy = new Database(target, { readonly: true, fileMustExist: true });
    let messages: number;
    let migrations: string[];
    try {
      messages = copy.prepare('SELECT COUNT(*) FROM messages').pluck().get() as number;
      migrations = copy.prepare('SELECT name FROM schema_migrations ORDER BY name').pluck().all() as string[];
    } finally {
      copy.close();
    }
    assert.deepEqual(Object.keys(result).sort(), ['bytes', 'durationMs', 'file', 'integrity', 'messages', 'migrations', 'source'].sort());
    assert.deepEqual(
      { ...result, durationMs: 0 },
      { source: relay.config.databasePath, file: target, bytes: fs.statSync(target).size, messages, migrations, integrity: 'ok', durationMs: 0 },
    );
    assert.ok(Number(result.durationMs) >= 0 && Number(result.durationMs) <= took, `durationMs ${result.durationMs}; the command took ${took} ms`);
    const { out: text, took: textTook } = await within(['--config', configFile, 'backup', path.join(dir, 'reported-text.db')]);
    assert.equal(text.code, 0, text.stderr);
    const textMs = Number(/ in (\d+) ms;/.exec(text.stdout)?.[1]);
    assert.ok(textMs >= 0 && textMs <= textTook, `${text.stdout}; the command took ${textTook} ms`);
    assert.match(
      text.stdout,
      new RegExp(`^copied ${relay.config.databasePath.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} to .*reported-text\\.db \\([\\d.]+ [KM]iB, ${messages} messages, schema ${migrations.at(-1)}\\) in \\d+ ms; fsynced; integrity_check ok\\n$`),
    );
  });

  test('never replaces the database or its files, whatever the name, and refuses a name that is not a file', async () => {
    const db = relay.config.databasePath;
    const linkedDir = path.join(dir, 'linked-data');
    fs.symlinkSync(path.dirname(db), linkedDir);
    const linkToWal = path.join(dir, 'wal-link');
    fs.symlinkSync(`${db}-wal`, linkToWal);
    const before = fs.statSync(db).ino;
    const sqlite = openReadOnly(db);
    // made after the open, which refuses a database file with a second name
    const hardLink = path.join(dir, 'hard-link.db');
    fs.linkSync(db, hardLink);
    try {
      fs.mkdirSync(`${db}-spool`, { recursive: true });
      for (const target of [path.join(linkedDir, path.basename(db)), `${db}-wal`, `${db}-shm`, `${db}-lock`, hardLink, linkToWal, path.join(`${db}-spool`, 'copy.db')]) {
        assert.throws(() => backupDatabase(sqlite, target, { overwrite: true }), /is the database or one of its files/, target);
      }
      // a path the kernel would not follow (a loop of links): its text alone, with `..` taken
      // away, names the database's own -journal, which the next writer would take as a hot journal
      const loop = path.join(path.dirname(db), 'loop');
      fs.symlinkSync('loop', loop);
      const throughLoop = `${linkedDir}/loop/../${path.basename(db)}-journal`;
      assert.throws(() => backupDatabase(sqlite, throughLoop), /cannot follow .*too many levels of symbolic links/);
      assert.equal(fs.existsSync(`${db}-journal`), false);
      fs.unlinkSync(loop);
      assert.throws(() => backupDatabase(sqlite, `${dir}/missing/../copy-after-missing.db`), /does not exist \(a `\.\.` after it leads nowhere\)/);
      // a link to a file not made yet, in a directory that is there: the copy is made where it points
      const toMake = path.join(dir, 'link-to-copy.db');
      fs.symlinkSync('made-through-link.db', toMake);
      assert.equal(backupDatabase(sqlite, toMake).file, path.join(dir, 'made-through-link.db'));
      assert.ok(fs.lstatSync(toMake).isSymbolicLink() && fs.statSync(toMake).isFile());
      const newDir = path.join(dir, 'new-dir');
      assert.throws(() => backupDatabase(sqlite, `${newDir}/`), /names a directory, not a file/);
      assert.equal(fs.existsSync(newDir), false);
      assert.throws(() => backupDatabase(sqlite, dir), /is not a regular file/, 'not "already exists": --force would not help');
    } finally {
      sqlite.close();
      fs.unlinkSync(hardLink);
    }
    assert.equal(fs.statSync(db).ino, before, 'the database file is the one the relay opened');
    const info = await nodemailer.createTransport({ host: '127.0.0.1', port: relay.smtpPort, ignoreTLS: true }).sendMail({
      from: 'after@example.com',
      to: 'rcpt@example.com',
      text: 'still stored',
    });
    const id = /queued as (\S+)/.exec(info.response)?.[1];
    const reader = openReadOnly(db);
    try {
      assert.ok(reader.prepare('SELECT 1 FROM messages WHERE id = ?').get(id), 'a new connection reads the live database');
    } finally {
      reader.close();
    }
  });
});

/** A relay's database in a new directory, with its last page overwritten so that reading it fails. */
async function damagedDatabase(): Promise<{ dir: string; db: string }> {
  const dir = tempDir('relayq-damaged-');
  const db = path.join(dir, 'relayq.db');
  const relay = await startTestRelay({ databasePath: db }, { startDelivery: false, startRetention: false });
  await relay.stop();
  // the root page of the messages table, which every backup reads; 0xFF is no b-tree page type
  const reader = openReadOnly(db);
  const { rootpage } = reader.prepare("SELECT rootpage FROM sqlite_schema WHERE name = 'messages'").get() as { rootpage: number };
  const pageSize = reader.pragma('page_size', { simple: true }) as number;
  reader.close();
  const fd = fs.openSync(db, 'r+');
  fs.writeSync(fd, Buffer.alloc(16, 0xff), 0, 16, (rootpage - 1) * pageSize);
  fs.closeSync(fd);
  return { dir, db };
}

test('a damaged live database: the error names it, not the target', async () => {
  const { dir, db } = await damagedDatabase();
  const sqlite = openReadOnly(db);
  try {
    assert.throws(() => backupDatabase(sqlite, path.join(dir, 'copy.db')), (err: Error) => {
      assert.ok(err instanceof BackupError);
      assert.match(err.message, /^copying .*relayq\.db to .*copy\.db failed: database disk image is malformed$/);
      return true;
    });
  } finally {
    sqlite.close();
  }
});

test('on a file system without hard links the copy is renamed into place: no name ever holds a copy cut short', async (t) => {
  const relay = await startTestRelay({}, { startDelivery: false });
  const dir = tempDir('relayq-nolink-');
  try {
    await sendMail(relay.smtpPort, { to: ['a@example.com'] });
    // vfat refuses link() with EPERM; a copy under the final name that a full disk cuts short
    // would stay there, as one a kill cuts short would
    const noLinks = t.mock.method(fs, 'linkSync', () => {
      throw Object.assign(new Error('EPERM: operation not permitted, link'), { code: 'EPERM', syscall: 'link' });
    });
    t.mock.method(fs, 'copyFileSync', (from: string, to: string) => {
      fs.writeFileSync(to, fs.readFileSync(from).subarray(0, 4096));
      throw Object.assign(new Error('ENOSPC: no space left on device, copyfile'), { code: 'ENOSPC', syscall: 'copyfile' });
    });
    const target = path.join(dir, 'copy.db');
    const done = backupDatabase(relay.store.sqlite, target);
    assert.deepEqual([done.integrity, done.messages], ['ok', 1]);
    const copy = new Database(target, { readonly: true });
    try {
      assert.equal(copy.prepare('SELECT COUNT(*) FROM messages').pluck().get(), 1);
    } finally {
      copy.close();
    }
    // the name taken: refused, and what holds it is left as it was
    fs.writeFileSync(path.join(dir, 'taken.db'), 'an older backup');
    assert.throws(() => backupDatabase(relay.store.sqlite, path.join(dir, 'taken.db')), /taken\.db already exists \(use --force to replace it\)/);
    assert.equal(fs.readFileSync(path.join(dir, 'taken.db'), 'utf8'), 'an older backup');
    // taken while the copy was made (another backup to the same name): refused all the same
    const raced = path.join(dir, 'raced.db');
    noLinks.mock.mockImplementation((_from: fs.PathLike, to: fs.PathLike) => {
      if (to === raced) fs.writeFileSync(raced, 'the other backup');
      throw Object.assign(new Error('EPERM: operation not permitted, link'), { code: 'EPERM', syscall: 'link' });
    });
    assert.throws(() => backupDatabase(relay.store.sqlite, raced), /raced\.db already exists \(use --force to replace it\)/);
    assert.equal(fs.readFileSync(raced, 'utf8'), 'the other backup');
    assert.deepEqual(fs.readdirSync(dir).sort(), ['copy.db', 'raced.db', 'taken.db']);
  } finally {
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a copy that does not pass integrity_check (damaged on its way to the disk) never takes the name, and leaves nothing behind', async (t) => {
  const relay = await startTestRelay({}, { startDelivery: false });
  const dir = tempDir('relayq-damaged-');
  try {
    await sendMail(relay.smtpPort, { to: ['a@example.com'] });
    const { fsyncSync } = fs;
    let damaged = false;
    // as the copy is fsynced, its second page is overwritten: what a bad disk or cable would do
    t.mock.method(fs, 'fsyncSync', (fd: number) => {
      const partial = fs.readdirSync(dir).find((f) => f.includes('.partial-'));
      if (!damaged && partial) {
        damaged = true;
        const file = path.join(dir, partial);
        const handle = fs.openSync(file, 'r+');
        fs.writeSync(handle, Buffer.alloc(4096, 0xa5), 0, 4096, 4096);
        fs.closeSync(handle);
      }
      return fsyncSync(fd);
    });
    const target = path.join(dir, 'copy.db');
    assert.throws(() => backupDatabase(relay.store.sqlite, target), (err: Error) => err instanceof BackupError && /integrity_check failed on the copy|malformed/.test(err.message));
    assert.ok(damaged, 'control: the copy was damaged');
    assert.deepEqual(fs.readdirSync(dir), [], 'no copy.db and no partial copy');
  } finally {
    t.mock.restoreAll();
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a copy whose integrity_check finds a single problem (a NULL where the schema forbids it) is refused too', async () => {
  const dir = tempDir('relayq-one-problem-');
  const file = path.join(dir, 'relayq.db');
  await (await openStore(file)).close();
  // one row damaged as a foreign tool could: with the NOT NULL lifted from the schema a NULL goes
  // in, then the NOT NULL is put back; VACUUM INTO copies the row as it is
  const withDatabase = <T>(fn: (db: Database.Database) => T): T => {
    const db = new Database(file);
    try {
      return fn(db);
    } finally {
      db.close();
    }
  };
  const setSchema = (sql: string) =>
    withDatabase((db) => {
      db.unsafeMode(true);
      db.pragma('writable_schema = ON');
      db.prepare("UPDATE sqlite_schema SET sql = ? WHERE name = 'counters'").run(sql);
    });
  const schema = withDatabase((db) => db.prepare("SELECT sql FROM sqlite_schema WHERE name = 'counters'").pluck().get() as string);
  assert.match(schema, /value INTEGER NOT NULL/);
  setSchema(schema.replace('value INTEGER NOT NULL', 'value INTEGER'));
  withDatabase((db) => db.prepare("INSERT INTO counters (name, value) VALUES ('damaged', NULL)").run());
  setSchema(schema);
  const sqlite = openReadOnly(file);
  try {
    assert.deepEqual(sqlite.pragma('integrity_check'), [{ integrity_check: 'NULL value in counters.value' }], 'control: one problem');
    assert.throws(
      () => backupDatabase(sqlite, path.join(dir, 'copy.db')),
      // in those words alone: not as a copy of the live database that failed
      (err: Error) => err instanceof BackupError && err.message === 'integrity_check failed on the copy: NULL value in counters.value',
    );
    assert.deepEqual(fs.readdirSync(dir).filter((f) => f.startsWith('copy.db')), [], 'no copy.db and no partial copy');
  } finally {
    sqlite.close();
  }
});

test('the copy is fsynced before it takes its name, and its directory after', async (t) => {
  const relay = await startTestRelay({}, { startDelivery: false });
  const dir = tempDir('relayq-fsync-');
  try {
    await sendMail(relay.smtpPort, { to: ['a@example.com'] });
    const target = path.join(dir, 'copy.db');
    const events: string[] = [];
    const openedOn = new Map<number, string>();
    const { openSync, fsyncSync, linkSync, renameSync } = fs;
    t.mock.method(fs, 'openSync', (file: string, flags: fs.OpenMode, mode?: fs.Mode) => {
      const fd = openSync(file, flags, mode);
      openedOn.set(fd, file === dir ? 'directory' : file.startsWith(`${target}.partial-`) ? 'copy' : file);
      return fd;
    });
    t.mock.method(fs, 'fsyncSync', (fd: number) => {
      events.push(`fsync ${openedOn.get(fd)}`);
      fsyncSync(fd);
    });
    t.mock.method(fs, 'linkSync', (from: string, to: string) => {
      events.push('name');
      linkSync(from, to);
    });
    t.mock.method(fs, 'renameSync', (from: string, to: string) => {
      events.push('name');
      renameSync(from, to);
    });
    assert.equal(backupDatabase(relay.store.sqlite, target).messages, 1);
    assert.deepEqual(events, ['fsync copy', 'name', 'fsync directory']);
  } finally {
    await relay.stop();
  }
});

test('a copy that fails halfway leaves no partial file next to the target', async () => {
  const { dir, db } = await damagedDatabase();
  const targetDir = path.join(dir, 'backups');
  fs.mkdirSync(targetDir);
  const sqlite = openReadOnly(db);
  try {
    assert.throws(() => backupDatabase(sqlite, path.join(targetDir, 'copy.db')), BackupError);
  } finally {
    sqlite.close();
  }
  assert.deepEqual(fs.readdirSync(targetDir), [], 'no copy.db and no copy.db.partial-<pid>');
});

test('the unfinished copies of killed backups, an hour old, are removed by the next backup to that name; one that may be under way, or cannot be removed, stays', async (t) => {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const dir = tempDir('relayq-backup-left-');
  const running = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60_000)'], { stdio: 'ignore' });
  try {
    const ended = spawn(process.execPath, ['-e', '']);
    await once(ended, 'exit');
    const [gone, other] = [ended.pid, Number(ended.pid) + 1_000_000];
    const left = [`copy.db.partial-${gone}`, `copy.db.partial-${gone}-journal`, `copy.db.partial-${process.pid}`];
    // a running process's; one changed in the last hour (its process may run unseen, in another
    // container; half a minute within it, while the others changed half a minute past it);
    // another user's process, which this one may not signal (EPERM); other names; a directory,
    // which is not removed
    const otherUsers = other + 2;
    const kept = [`copy.db.partial-${running.pid}`, `copy.db.partial-${other}`, `copy.db.partial-${otherUsers}`, `other.db.partial-${gone}`, `copy.db.partial-${gone}.txt`];
    const hourAgo = new Date(Date.now() - 60.5 * 60_000);
    const withinTheHour = new Date(Date.now() - 59.5 * 60_000);
    for (const name of [...left, ...kept]) {
      fs.writeFileSync(path.join(dir, name), 'x'.repeat(1000));
      const changed = name === `copy.db.partial-${other}` ? withinTheHour : hourAgo;
      fs.utimesSync(path.join(dir, name), changed, changed);
    }
    const kill = process.kill.bind(process);
    t.mock.method(process, 'kill', (pid: number, signal?: string | number) => {
      if (pid === otherUsers) throw Object.assign(new Error('kill EPERM'), { code: 'EPERM' });
      return kill(pid, signal);
    });
    fs.mkdirSync(path.join(dir, `copy.db.partial-${other + 1}`));
    fs.utimesSync(path.join(dir, `copy.db.partial-${other + 1}`), hourAgo, hourAgo);
    kept.push(`copy.db.partial-${other + 1}`);
    backupDatabase(relay.store.sqlite, path.join(dir, 'copy.db'));
    t.mock.restoreAll();
    assert.deepEqual(fs.readdirSync(dir).sort(), ['copy.db', ...kept].sort());
  } finally {
    t.mock.restoreAll();
    running.kill();
    await relay.stop();
  }
});

test('a database opened through a symlink: its WAL and shared memory beside the real file are its own too', async () => {
  const dir = tempDir('relayq-linked-db-');
  const real = path.join(dir, 'real', 'relayq.db');
  fs.mkdirSync(path.dirname(real));
  await (await startTestRelay({ databasePath: real }, { startDelivery: false, startRetention: false })).stop();
  const link = path.join(dir, 'relayq-link.db');
  fs.symlinkSync(real, link);
  const relay = await startTestRelay({ databasePath: link }, { startDelivery: false, startRetention: false });
  try {
    await sendMail(relay.smtpPort, { to: ['rcpt@example.com'] });
    // SQLite resolves the link: the WAL and -shm are the real file's, none is beside the link
    assert.ok(fs.existsSync(`${real}-wal`) && fs.existsSync(`${real}-shm`));
    assert.equal(fs.existsSync(`${link}-wal`), false);
    const walBefore = fs.statSync(`${real}-wal`).ino;
    const sqlite = openReadOnly(link);
    try {
      for (const target of [`${real}-wal`, `${real}-shm`]) {
        assert.throws(() => backupDatabase(sqlite, target, { overwrite: true }), /is the database or one of its files/, target);
      }
    } finally {
      sqlite.close();
    }
    assert.equal(fs.statSync(`${real}-wal`).ino, walBefore, 'the live WAL is the one SQLite opened');
  } finally {
    await relay.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a backup restored beside the -wal of the database it replaced is refused, by the relay and the CLI, until that -wal is removed', async () => {
  const dir = tempDir('relayq-stale-wal-');
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  const copy = path.join(dir, 'copy.db');
  try {
    await sendMail(relay.smtpPort, { to: ['rcpt@example.com'] });
    const sqlite = openReadOnly(relay.config.databasePath);
    try {
      backupDatabase(sqlite, copy);
    } finally {
      sqlite.close();
    }
  } finally {
    await relay.stop();
  }
  // the restore of step 2, with step 3 forgotten: the WAL that a crash left of the replaced
  // database (a process that ends without closing it) is still there
  const restored = path.join(dir, 'relayq.db');
  const crashed = spawnSync(
    process.execPath,
    ['-e', `const db = new (require('better-sqlite3'))(${JSON.stringify(restored)}); db.pragma('journal_mode = WAL'); db.exec("CREATE TABLE t (x); INSERT INTO t VALUES (zeroblob(20000))"); process.exit(0)`],
    { cwd: REPO_ROOT, encoding: 'utf8' },
  );
  assert.equal(crashed.status, 0, crashed.stderr);
  assert.ok(fs.statSync(`${restored}-wal`).size > 0);
  fs.copyFileSync(copy, restored);
  const config = { ...relay.config, smtpPort: 0, healthCheckPort: 0, databasePath: restored, emailsDir: path.join(dir, 'emails') };
  const refusal = new RegExp(`relayq\\.db-wal does not belong to .*relayq\\.db: .*remove ${restored}-wal and ${restored}-shm`);
  // (a relay that started after all is stopped, so that the test fails instead of hanging)
  await assert.rejects(startRelay(config, { logger: pino({ level: 'silent' }) }).then((started) => started.stop()), refusal);
  const status = await runCli(['status', '--databasePath', restored]);
  assert.equal(status.code, 1, status.stderr);
  assert.match(status.stderr, refusal);
  assert.deepEqual(fs.readFileSync(restored), fs.readFileSync(copy), 'the restored copy is untouched');
  fs.rmSync(`${restored}-wal`);
  const again = await startRelay(config, { logger: pino({ level: 'silent' }), startDelivery: false });
  try {
    assert.equal((again.store.sqlite.prepare('SELECT COUNT(*) AS n FROM messages').get() as { n: number }).n, 1);
  } finally {
    await again.stop();
  }
});
