import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { MIGRATION_NAMES } from '../../migrations/names.js';
import { kyselyFor, migrateToLatest } from '../../src/store/migrate.js';
import { tempDir } from '../helpers.js';

test('migrations that fill the disk fail with SQLite\'s own error, wherever it strikes, and leave nothing half applied', async () => {
  const dir = tempDir();
  // the file may grow to `pages` pages: SQLITE_FULL at every point of the migrations in turn
  // (past some points SQLite rolls the whole transaction back itself)
  const failures = new Set<string>();
  let pages = 1;
  for (; ; pages++) {
    const sqlite = new Database(path.join(dir, `relayq-${pages}.db`));
    try {
      sqlite.pragma('journal_mode = WAL');
      sqlite.pragma(`max_page_count = ${pages}`);
      const applied = await migrateToLatest(kyselyFor(sqlite)).catch((err: Error) => {
        failures.add(err.message);
        return undefined;
      });
      if (applied) {
        assert.deepEqual(applied, [...MIGRATION_NAMES]);
        break;
      }
      const tables = sqlite.prepare("SELECT count(*) AS n FROM sqlite_schema WHERE name = 'messages'").get() as { n: number };
      assert.equal(tables.n, 0, `${pages} pages: the schema is not half made`);
    } finally {
      sqlite.close();
    }
  }
  assert.ok(pages > 5, `the migrations fit in ${pages} pages`);
  assert.deepEqual([...failures], ['database or disk is full']);
});
