// The disk's durable-commit ceiling, measured in the directory the relay's database lives in:
// how many single-row SQLite commits per second WAL + synchronous=FULL allows, and how many
// write+fsync pairs per second the file system does. A relay that fsyncs once per message can
// accept no faster than this; group commit is what lets relayq go past it.
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import Database from 'better-sqlite3';

export interface FsyncCeiling {
  /** Single-row INSERT transactions per second, WAL, synchronous=FULL. */
  sqliteCommitsPerSecond: number;
  /** 512-byte write + fsync per second on one file. */
  fsyncsPerSecond: number;
}

export function measureFsyncCeiling(dir: string, durationMs: number): FsyncCeiling {
  fs.mkdirSync(dir, { recursive: true });
  const dbFile = path.join(dir, 'fsync-ceiling.db');
  const db = new Database(dbFile);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.exec('CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB)');
  const insert = db.prepare('INSERT INTO t (payload) VALUES (?)');
  const payload = Buffer.alloc(2048, 120);
  let commits = 0;
  let start = performance.now();
  while (performance.now() - start < durationMs) {
    insert.run(payload); // autocommit: one transaction, one WAL fsync
    commits++;
  }
  const sqliteCommitsPerSecond = (commits * 1000) / (performance.now() - start);
  db.close();
  for (const suffix of ['', '-wal', '-shm']) fs.rmSync(dbFile + suffix, { force: true });

  const file = path.join(dir, 'fsync-ceiling.bin');
  const fd = fs.openSync(file, 'w');
  const block = Buffer.alloc(512, 120);
  let fsyncs = 0;
  start = performance.now();
  while (performance.now() - start < durationMs) {
    fs.writeSync(fd, block, 0, block.length, (fsyncs % 64) * 512);
    fs.fsyncSync(fd);
    fsyncs++;
  }
  const fsyncsPerSecond = (fsyncs * 1000) / (performance.now() - start);
  fs.closeSync(fd);
  fs.rmSync(file, { force: true });
  return { sqliteCommitsPerSecond, fsyncsPerSecond };
}
