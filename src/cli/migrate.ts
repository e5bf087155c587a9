// `relayq migrate`: applies pending schema migrations (the server also does this at start), so an
// upgrade can be prepared, or a restored backup brought up to date, before the server runs.
import type { Sqlite } from '../store/db.js';
import { lockDatabase } from '../store/maintenance.js';
import { kyselyFor, migrateToLatest } from '../store/migrate.js';
import { CliError, type GlobalOptions, loadCliConfig, openWriterForCli, printJson, printText, refuseOthersPathsForCli, requireDatabaseFile } from './context.js';

export async function migrateCommand(global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const file = config.databasePath;
  refuseOthersPathsForCli(file);
  // an upgrade of a database that is not there would create an empty one and call it a success
  requireDatabaseFile(file);
  // not under a running relay: it would go on with the schema it started with
  let lock: { release(): void };
  try {
    lock = lockDatabase(file);
  } catch (err) {
    const running = (err as { code?: unknown }).code === 'SQLITE_BUSY';
    const hint = running ? '; stop it first, then run migrate again (or start the new relayq: it applies pending migrations at its start)' : '';
    throw new CliError(`${file}: ${(err as Error).message}${hint}`);
  }
  let sqlite: Sqlite;
  try {
    sqlite = openWriterForCli(config);
  } catch (err) {
    lock.release();
    throw err;
  }
  try {
    const applied = await migrateToLatest(kyselyFor(sqlite)).catch((err: Error) => {
      throw new CliError(`migration failed on ${file}: ${err.message}`);
    });
    if (global.json) {
      printJson({ database: file, applied });
    } else if (applied.length) {
      printText(`applied ${applied.join(', ')} to ${file}`);
    } else {
      printText(`${file} is up to date`);
    }
  } finally {
    sqlite.close();
    lock.release();
  }
}
