// Prepared-statement cache per connection: the hot paths (intake, claims) prepare each SQL
// text once and reuse it.
import type Database from 'better-sqlite3';
import type { Sqlite } from './db.js';

const cache = new WeakMap<Sqlite, Map<string, Database.Statement>>();

export function prepared(sqlite: Sqlite, sql: string): Database.Statement {
  let byText = cache.get(sqlite);
  if (!byText) {
    byText = new Map();
    cache.set(sqlite, byText);
  }
  let statement = byText.get(sql);
  if (!statement) {
    statement = sqlite.prepare(sql);
    byText.set(sql, statement);
  }
  return statement;
}
