import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { CommitQueue } from '../../src/store/commit-queue.js';
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

test('a heavy write commits on its own, after the writes queued with it, and their results are out before it begins', async () => {
  const { sqlite, queue, events, op } = queueOnFile();
  try {
    let smallDone = false;
    const heavy = queue.write((db) => {
      op('heavy')(db);
      events.push(`small already answered: ${smallDone}`);
    }, { heavy: true });
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

test('heavy writes go one per transaction, and a small write that arrives meanwhile goes before the next one', async () => {
  const { sqlite, queue, events, op } = queueOnFile();
  try {
    const first = queue.write(op('heavy 1'), { heavy: true });
    const second = queue.write(op('heavy 2'), { heavy: true });
    await first;
    await queue.write(op('small'));
    await second;
    assert.deepEqual(events, ['heavy 1', 'commit', 'small', 'commit', 'heavy 2', 'commit']);
  } finally {
    sqlite.close();
  }
});

test('close commits what is queued, heavy writes included, and refuses what comes after', async () => {
  const { sqlite, queue, events, op } = queueOnFile();
  try {
    const written = [queue.write(op('heavy'), { heavy: true }), queue.write(op('small'))];
    queue.close();
    await Promise.all(written);
    assert.deepEqual(events, ['small', 'commit', 'heavy', 'commit']);
    await assert.rejects(queue.write(op('late')), /store is closed/);
  } finally {
    sqlite.close();
  }
});
