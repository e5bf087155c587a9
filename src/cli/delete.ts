// `relayq delete ID...`: removes messages with their recipients, attempts and failed-mail
// export. An unknown id, or a message a worker is delivering right now, and nothing is deleted.
// Many ids are deleted in writes of ADMIN_STEP messages each, so that the running relay's commits
// never wait long; a message a worker claims after that check, while the steps run, is left
// alone and named (exit 1). A step that fails after others committed ends the command there,
// after it has said what those did.
import { systemClock } from '../clock.js';
import { count } from '../count.js';
import { removeFailedExport } from '../delivery/failed-export.js';
import { deleteMessage, HELD, holdOf, idSlices } from '../store/admin.js';
import { canonicalQueueId } from '../store/intake.js';
import { CliError, type GlobalOptions, loadCliConfig, printJson, printText, stoppedAt, withWriter, writeStep } from './context.js';

export async function deleteCommand(ids: string[], global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const unique = [...new Set(ids.map(canonicalQueueId))];
  const deleted: string[] = [];
  const held: string[] = [];
  const warnings: string[] = [];
  let stopped: CliError | undefined;
  await withWriter(config, async (sqlite) => {
    for (const id of unique) {
      const hold = holdOf(sqlite, id, systemClock.now());
      if (hold === 'not-found') throw new CliError(`no message with id ${id}; nothing deleted`);
      if (hold === 'held') throw new CliError(`message ${id}: ${HELD}; nothing deleted, try again later`);
    }
    for (const step of idSlices(unique)) {
      let results: ReturnType<typeof deleteMessage>[];
      try {
        results = await writeStep(sqlite, () => step.map((id) => deleteMessage(sqlite, id, systemClock.now())));
      } catch (err) {
        if (deleted.length + held.length === 0) throw err;
        stopped = stoppedAt(err, step[0], 'deleted');
        break;
      }
      for (const [i, id] of step.entries()) {
        // one deleted meanwhile (by another command) is gone, as asked
        if (results[i] === 'held') held.push(id);
        else deleted.push(id);
      }
      // failed messages' exports go with them: they would describe mail that is no longer there
      for (const id of step.filter((_, i) => results[i] !== 'held')) {
        try {
          await removeFailedExport(config.emailsDir, id);
        } catch (err) {
          warnings.push(`message ${id} deleted, but its failed export could not be removed: ${(err as Error).message}`);
        }
      }
    }
  });
  for (const id of held) warnings.push(`message ${id}: ${HELD}; not deleted, try again later`);
  if (global.json) printJson(warnings.length > 0 ? { deleted, warnings } : { deleted });
  else printText(`deleted ${count(deleted.length, 'message')}: ${deleted.join(' ')}`);
  for (const warning of warnings) process.stderr.write(`relayq: warning: ${warning}\n`);
  if (stopped) throw stopped;
  if (held.length > 0) process.exitCode = 1;
}
