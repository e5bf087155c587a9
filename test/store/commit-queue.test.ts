import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { CommitQueue, HEAVY_GROUP_BYTES } from '../../src/store/commit-queue.js';

const MB = 1024 * 1024;
import { tempDir } from '../helpers.js';

function queueOnFile() {
  const sqlite = new Database(path.join(tempDir(), 'q.db'));
  sqlite.pragma('journal_mode = WAL');
  sqlite.exec('CREATE TABLE t (name TEXT)');
  const events: string[] = [];
  const queue = new CommitQueue(sqlite);
  queue.onCommitted = () => events.push('commit');
  const op = (name: string) => (db: Database.Database) => {
    db.prepare('INSERT INTO t (name) VALUES (?)').run(name);
    events.push(name);
  };
  return { sqlite, queue, events, op };
}

test('a large write commits apart, after the small writes queued with it, and their results are out before it begins', async () => {
  const { sqlite, queue, events, op } = queueOnFile();
  try {
    let smallDone = false;
    const heavy = queue.write((db) => {
      op('heavy')(db);
      events.push(`small already answered: ${smallDone}`);
    }, MB);
    const small = queue.write(op('small')).then(() => {
      smallDone = true;
    });
    const other = queue.write(op('other'));
    await Promise.all([heavy, small, other]);
    assert.deepEqual(events, ['small', 'other', 'commit', 'heavy', 'small already answered: true', 'commit']);
    assert.equal(queue.stats.commits, 2);
    assert.deepEqual(sqlite.prepare('SELECT name FROM t ORDER BY rowid').pluck().all(), ['small', 'other', 'heavy']);
  } finally {
    sqlite.close();
  }
});

test('large writes go up to HEAVY_GROUP_BYTES a transaction, and a small write that arrives meanwhile goes before the next group', async () => {
  const { sqlite, queue, events, op } = queueOnFile();
  try {
    const half = HEAVY_GROUP_BYTES / 2;
    const written = [queue.write(op('large 1'), half), queue.write(op('large 2'), half), queue.write(op('large 3'), 1)];
    // one over the limit on its own still goes, alone
    written.push(queue.write(op('huge'), 8 * HEAVY_GROUP_BYTES));
    await written[1];
    await queue.write(op('small'));
    await Promise.all(written);
    assert.deepEqual(events, ['large 1', 'large 2', 'commit', 'small', 'commit', 'large 3', 'commit', 'huge', 'commit']);
  } finally {
    sqlite.close();
  }
});

test('close commits what is queued, large writes included, and refuses what comes after', async () => {
  const { sqlite, queue, events, op } = queueOnFile();
  try {
    // two groups of large writes: the last one too
    const written = [queue.write(op('heavy 1'), 3 * MB), queue.write(op('small')), queue.write(op('heavy 2'), 3 * MB)];
    queue.close();
    assert.deepEqual(events, ['small', 'commit', 'heavy 1', 'commit', 'heavy 2', 'commit']);
    await Promise.all(written);
    await assert.rejects(queue.write(op('late')), /store is closed/);
  } finally {
    sqlite.close();
  }
});

test('a write that fails after writing is rolled back alone: the others of its commit stay', async () => {
  const { sqlite, queue, op } = queueOnFile();
  try {
    const failing = queue.write((db) => {
      op('half')(db);
      throw new Error('after its insert');
    });
    const other = queue.write(op('other'));
    await assert.rejects(failing, /after its insert/);
    await other;
    assert.equal(queue.stats.commits, 1);
    assert.deepEqual(sqlite.prepare('SELECT name FROM t ORDER BY rowid').pluck().all(), ['other']);
  } finally {
    sqlite.close();
  }
});
