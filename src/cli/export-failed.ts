// `relayq export-failed [DIR]`: (re)writes the JSON export of every failed message, by default
// into emailsDir/failed where the delivery engine writes them, e.g. after a restore or to hand
// the failures to another tool. Same document, same atomic write as the automatic export.
import fs from 'node:fs';
import { systemClock } from '../clock.js';
import { count } from '../count.js';
import { EMAILS_DIR_MODE } from '../delivery/atomic-file.js';
import { exportFailedMessage, failedExportDir } from '../delivery/failed-export.js';
import { makeDirectory } from '../make-dir.js';
import { followedForUse } from '../root-guard.js';
import { listMessages } from '../store/queries.js';
import { CliError, emailsDirOf, type GlobalOptions, loadCliConfig, printJson, printText, requireCurrentSchema, withReader } from './context.js';

const PAGE = 500;

export async function exportFailedCommand(dir: string | undefined, global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  // as configured, for messages; the files go where the kernel reaches it (path.join would take a
  // `..` in emailsDir by its text)
  const given = dir ?? failedExportDir(config.emailsDir);
  const { target, files } = await withReader(config, async (sqlite) => {
    requireCurrentSchema(sqlite, config.databasePath);
    let page = listMessages(sqlite, { state: 'failed', limit: PAGE });
    // the database answered (one that needs migrating does not); now the target: a directory,
    // or one that can be made, followed once: where root's check looks is where the files go
    let target: string;
    try {
      target = dir === undefined ? failedExportDir(emailsDirOf(config)) : followedForUse(dir);
      makeDirectory(target, EMAILS_DIR_MODE);
      // one this user may not write fails now, also when there is nothing to export
      fs.accessSync(target, fs.constants.W_OK | fs.constants.X_OK);
    } catch (err) {
      if (err instanceof CliError) throw err;
      throw new CliError(`cannot export into ${given}: ${(err as Error).message}`);
    }
    const written: string[] = [];
    for (;;) {
      for (const { id } of page.messages) {
        let file: string | undefined;
        try {
          file = await exportFailedMessage(sqlite, target, id, systemClock.now());
        } catch (err) {
          // a file system error; the database's own (a schema that needs migrating) pass as they are
          if ((err as NodeJS.ErrnoException).syscall === undefined) throw err;
          throw new CliError(`cannot export ${id} into ${given} (${written.length} exported before it): ${(err as Error).message}`);
        }
        if (file) written.push(file);
      }
      if (page.nextBefore === null) return { target, files: written };
      page = listMessages(sqlite, { state: 'failed', limit: PAGE, before: page.nextBefore });
    }
  });
  if (global.json) printJson({ directory: target, exported: files.length, files });
  else printText(`exported ${count(files.length, 'failed message')} to ${given}`);
}
