// The schema migrations, run with Kysely's migrator. Loaded only when a migration is pending
// (db.ts) or `relayq migrate` runs: the query builder takes longer to load than the rest of a
// CLI command takes to run.
import {
  CompiledQuery,
  type DatabaseConnection,
  type DialectAdapter,
  type Driver,
  Kysely,
  type Migration,
  Migrator,
  SqliteAdapter,
  SqliteDialect,
  type SqliteDialectConfig,
  SqliteDriver,
  sql,
} from 'kysely';
import { migrations } from '../../migrations/index.js';
import type { Sqlite } from './db.js';
import { currentMigrationName, refuseNewerSchema } from './maintenance.js';

/**
 * SQLite changes its schema inside transactions, but Kysely's adapter says it cannot, and its
 * migrator then commits every statement on its own: a crash in the middle of a migration would
 * leave half of it applied and unrecorded, and every later start would fail on it. Saying so
 * makes the migrator run the pending migrations and their bookkeeping in one transaction.
 */
class TransactionalDdlSqliteAdapter extends SqliteAdapter {
  override get supportsTransactionalDdl(): boolean {
    return true;
  }
}

/**
 * The migrations' transaction takes the write lock as it begins (`BEGIN IMMEDIATE`), waiting out
 * another process's write for the busy timeout: begun deferred, it would read first and then be
 * refused the lock at once (SQLite does not wait to turn a reader into the writer), so a start
 * after an upgrade failed whenever a relayq command or a sqlite3 shell wrote at that moment.
 */
class ImmediateSqliteDriver extends SqliteDriver {
  constructor(
    settings: SqliteDialectConfig,
    private readonly sqlite: Sqlite,
  ) {
    super(settings);
  }

  override async beginTransaction(connection: DatabaseConnection): Promise<void> {
    await connection.executeQuery(CompiledQuery.raw('begin immediate'));
  }

  /**
   * A full disk (SQLITE_FULL) or an I/O error may roll the whole transaction back: Kysely's
   * ROLLBACK would then fail, and its "no transaction is active" would be the error reported.
   */
  override async rollbackTransaction(connection: DatabaseConnection): Promise<void> {
    if (this.sqlite.inTransaction) await super.rollbackTransaction(connection);
  }
}

class RelayqSqliteDialect extends SqliteDialect {
  constructor(private readonly settings: SqliteDialectConfig & { database: Sqlite }) {
    super(settings);
  }

  override createAdapter(): DialectAdapter {
    return new TransactionalDdlSqliteAdapter();
  }

  override createDriver(): Driver {
    return new ImmediateSqliteDriver(this.settings, this.settings.database);
  }
}

/**
 * The query builder on a connection; its migrations run in one transaction (see above). Its
 * destroy() closes the connection: the connection's owner closes it instead.
 */
export function kyselyFor<T>(sqlite: Sqlite): Kysely<T> {
  const db = new Kysely<T>({ dialect: new RelayqSqliteDialect({ database: sqlite }) });
  connections.set(db, sqlite);
  return db;
}

/** The connection under each query builder kyselyFor made. */
const connections = new WeakMap<object, Sqlite>();

/** Applies pending migrations: all of relayq's, or (tests of an upgrade) the first few of them. */
export async function migrateToLatest<T>(db: Kysely<T>, set: Record<string, Migration> = migrations): Promise<string[]> {
  // (Kysely would call it "corrupted migrations: previously executed migration … is missing")
  const applied = await sql<{ name: string }>`SELECT name FROM schema_migrations`.execute(db).then(
    (r) => r.rows.map((row) => row.name),
    (err: Error) => {
      if (/^no such table/.test(err.message)) return []; // a new database
      throw err;
    },
  );
  refuseNewerSchema(applied.map(currentMigrationName), Object.keys(set));
  const sqlite = connections.get(db);
  if (!sqlite) throw new Error('migrateToLatest takes a query builder made by kyselyFor');
  const migrator = new Migrator({
    db,
    provider: {
      // read in the migrations' transaction, before the applied ones: a migration recorded under
      // an earlier name is renamed, so that the migrator knows it, in that transaction, so that an
      // upgrade that fails leaves the name the relayq that wrote it knows (and can start with)
      getMigrations: async () => {
        if (!sqlite.inTransaction) throw new Error('the migrations are read outside their transaction');
        for (const name of applied) {
          const now = currentMigrationName(name);
          if (now !== name) sqlite.prepare('UPDATE schema_migrations SET name = ? WHERE name = ?').run(now, name);
        }
        return set;
      },
    },
    migrationTableName: 'schema_migrations',
    migrationLockTableName: 'schema_migrations_lock',
  });
  const { error, results } = await migrator.migrateToLatest();
  if (error) throw error instanceof Error ? error : new Error(String(error));
  return (results ?? []).filter((r) => r.status === 'Success').map((r) => r.migrationName);
}
