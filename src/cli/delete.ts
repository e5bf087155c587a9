// `relayq delete ID...`: removes messages with their recipients, attempts and failed-mail
// export. All or nothing: an unknown id, or a message a worker is delivering right now, and
// nothing is deleted.
import { systemClock } from '../clock.js';
import { count } from '../count.js';
import { removeFailedExport } from '../delivery/failed-export.js';
import { deleteMessage, HELD } from '../store/admin.js';
import { canonicalQueueId } from '../store/intake.js';
import { CliError, type GlobalOptions, loadCliConfig, printJson, printText, withWriter } from './context.js';

export async function deleteCommand(ids: string[], global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const unique = [...new Set(ids.map(canonicalQueueId))];
  await withWriter(config, (sqlite) =>
    sqlite
      .transaction(() => {
        for (const id of unique) {
          const result = deleteMessage(sqlite, id, systemClock.now());
          if (result === 'not-found') throw new CliError(`no message with id ${id}; nothing deleted`);
          if (result === 'held') throw new CliError(`message ${id}: ${HELD}; nothing deleted, try again later`);
        }
      })
      .immediate(),
  );
  // failed messages' exports go with them: they would describe mail that is no longer there
  const warnings: string[] = [];
  for (const id of unique) {
    try {
      await removeFailedExport(config.emailsDir, id);
    } catch (err) {
      warnings.push(`message ${id} deleted, but its failed export could not be removed: ${(err as Error).message}`);
    }
  }
  if (global.json) printJson(warnings.length > 0 ? { deleted: unique, warnings } : { deleted: unique });
  else printText(`deleted ${count(unique.length, 'message')}: ${unique.join(' ')}`);
  for (const warning of warnings) process.stderr.write(`relayq: warning: ${warning}\n`);
}
