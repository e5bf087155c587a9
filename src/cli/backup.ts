// `relayq backup FILE`: a consistent, fsynced, verified copy of the live database.
import { count } from '../count.js';
import { BackupError, backupDatabase } from '../store/backup.js';
import { CliError, type GlobalOptions, loadCliConfig, printJson, printText, withReader } from './context.js';
import { formatBytes } from './table.js';

export async function backupCommand(file: string, options: { force?: boolean }, global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const result = await withReader(config, (sqlite) => {
    try {
      return backupDatabase(sqlite, file, { overwrite: options.force });
    } catch (err) {
      if (err instanceof BackupError) throw new CliError(`backup failed: ${err.message}`);
      throw err;
    }
  });
  if (global.json) {
    printJson({ source: config.databasePath, ...result });
    return;
  }
  printText(
    `copied ${config.databasePath} to ${result.file} (${formatBytes(result.bytes)}, ${count(result.messages, 'message')}, ` +
      `schema ${result.migrations.at(-1) ?? 'none'}) in ${result.durationMs} ms; fsynced; integrity_check ok`,
  );
}
