// `relayq migrate`: applies pending schema migrations (the server also does this at start), so an
// upgrade can be prepared, or a restored backup brought up to date, before the server runs.
import { MIGRATION_NAMES } from '../../migrations/names.js';
import { LOCK_HELD_TOO_LONG, type Sqlite } from '../store/db.js';
import { appliedMigrations, type DatabaseLock, lockDatabase, openReadOnly, pendingMigrations, refuseNewerSchema } from '../store/maintenance.js';
import { kyselyFor, migrateToLatest } from '../store/migrate.js';
import { CliError, type GlobalOptions, loadCliConfig, openWriterForCli, printJson, printText, refuseOthersPathsForCli, requireDatabaseFile } from './context.js';

export async function migrateCommand(global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const file = config.databasePath;
  refuseOthersPathsForCli(file);
  // an upgrade of a database that is not there would create an empty one and call it a success
  requireDatabaseFile(file);
  // not under a running relay: it would go on with the schema it started with
  let lock: DatabaseLock;
  try {
    lock = lockDatabase(file);
  } catch (err) {
    const running = (err as { code?: unknown }).code === 'SQLITE_BUSY';
    // with nothing to apply there is nothing to stop the relay for (a check before an upgrade);
    // a schema a newer relayq made is refused in the same words as without a relay
    if (running && upToDate(file)) return report(file, [], global);
    const hint = running ? '; stop it first, then run migrate again (or start the new relayq: it applies pending migrations at its start)' : '';
    throw new CliError(`${file}: ${(err as Error).message}${hint}`);
  }
  let sqlite: Sqlite;
  try {
    sqlite = openWriterForCli(config);
  } catch (err) {
    lock.releaseAfter(err);
    throw err;
  }
  try {
    const applied = await migrateToLatest(kyselyFor(sqlite)).catch((err: Error) => {
      // (a sqlite3 shell or a relayq command inside a transaction; a relay holds the -lock file)
      const locked = (err as { code?: unknown }).code === 'SQLITE_BUSY';
      const why = locked ? `it is locked: ${LOCK_HELD_TOO_LONG}; nothing was applied, run migrate again once it is done` : err.message;
      throw new CliError(`migration failed on ${file}: ${why}`);
    });
    report(file, applied, global);
  } finally {
    sqlite.close();
    lock.release();
  }
}

/** Whether every migration of this relayq is applied (read without a lock); refuses those of a newer relayq. */
function upToDate(file: string): boolean {
  let applied: string[];
  let sqlite: Sqlite | undefined;
  try {
    sqlite = openReadOnly(file);
    applied = appliedMigrations(sqlite);
  } catch {
    return false;
  } finally {
    sqlite?.close();
  }
  try {
    refuseNewerSchema(applied, MIGRATION_NAMES);
  } catch (err) {
    throw new CliError(`migration failed on ${file}: ${(err as Error).message}`);
  }
  return pendingMigrations(applied).length === 0;
}

function report(file: string, applied: string[], global: GlobalOptions): void {
  if (global.json) {
    printJson({ database: file, applied });
  } else if (applied.length) {
    printText(`applied ${applied.join(', ')} to ${file}`);
  } else {
    printText(`${file} is up to date`);
  }
}
