// `relayq delete ID...`: removes messages with their recipients, attempts and failed-mail
// export. An unknown id, or a message a worker is delivering right now, and nothing is deleted.
// Many ids are deleted in writes of ADMIN_STEP messages each, so that the running relay's commits
// never wait long; a message a worker claims after that check, while the steps run, is left
// alone and named (exit 1). A step that fails after others committed ends the command there,
// after it has said what those did.
import { systemClock } from '../clock.js';
import { count } from '../count.js';
import { removeFailedExport } from '../delivery/failed-export.js';
import { deleteMessage, HELD, holdOf } from '../store/admin.js';
import { canonicalQueueId, typedId } from '../store/intake.js';
import { CliError, emailsDirOf, type GlobalOptions, loadCliConfig, printJson, printText, withWriter, writeEachInSteps } from './context.js';

export async function deleteCommand(ids: string[], global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const unique = [...new Set(ids.map(canonicalQueueId))];
  // before the database is opened: the exports of the deleted messages are removed there
  const emailsDir = emailsDirOf(config);
  const { results, stopped } = await withWriter(config, (sqlite) => {
    for (const id of unique) {
      const hold = holdOf(sqlite, id, systemClock.now());
      if (hold === 'not-found') throw new CliError(`no message with id ${typedId(id)}; nothing deleted`);
      if (hold === 'held') throw new CliError(`message ${id}: ${HELD}; nothing deleted, try again later`);
    }
    return writeEachInSteps(sqlite, unique, (id) => deleteMessage(sqlite, id, systemClock.now()), 'deleted');
  });
  // one deleted meanwhile (by another command) is gone, as asked
  const deleted = unique.filter((_, i) => i < results.length && results[i] !== 'held');
  const held = unique.filter((_, i) => results[i] === 'held');
  // failed messages' exports go with them: they would describe mail that is no longer there
  const warnings: string[] = [];
  for (const id of deleted) {
    try {
      await removeFailedExport(emailsDir, id);
    } catch (err) {
      warnings.push(`message ${id} deleted, but its failed export could not be removed: ${(err as Error).message}`);
    }
  }
  for (const id of held) warnings.push(`message ${id}: ${HELD}; not deleted, try again later`);
  if (global.json) printJson(warnings.length > 0 ? { deleted, warnings } : { deleted });
  else printText(`deleted ${count(deleted.length, 'message')}: ${deleted.join(' ')}`);
  for (const warning of warnings) process.stderr.write(`relayq: warning: ${warning}\n`);
  if (stopped) throw stopped;
  if (held.length > 0) process.exitCode = 1;
}
