// Prepared-statement cache per connection: the hot paths (intake, claims) prepare each SQL
// text once and reuse it.
//
// A bound LIMIT is written `LIMIT CAST(? AS INTEGER)`. SQLite's planner reads the value of a
// plain `LIMIT ?`, so binding it again expires the statement: it was compiled anew at every run
// (about 10 µs each, on every claim of due work). prepared() refuses the plain form.
import type Database from 'better-sqlite3';
import type { Sqlite } from './db.js';

const cache = new WeakMap<Sqlite, Map<string, Database.Statement>>();

const PLAIN_BOUND_LIMIT = /\b(LIMIT|OFFSET)\s+[?@:$]/i;

export function prepared(sqlite: Sqlite, sql: string): Database.Statement {
  let byText = cache.get(sqlite);
  if (!byText) {
    byText = new Map();
    cache.set(sqlite, byText);
  }
  let statement = byText.get(sql);
  if (!statement) {
    if (PLAIN_BOUND_LIMIT.test(sql)) throw new Error(`a bound LIMIT or OFFSET must be CAST(? AS INTEGER), or SQLite prepares the statement again at every run: ${sql}`);
    statement = sqlite.prepare(sql);
    byText.set(sql, statement);
  }
  return statement;
}
