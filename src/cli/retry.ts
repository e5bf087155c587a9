// `relayq retry ID...` puts messages back in the queue, due now (at the earliest batchDelay after
// their last batch, as the engine spaces batches); `relayq retry --failed` requeues every failed
// message; `relayq retry --queued` makes every queued one due now (postqueue -f). Only failed or
// pending recipients are tried again, never delivered ones. Every form writes in short
// transactions (500 messages each) so the running server barely waits; with ids, an unknown one
// and nothing is changed. Mail made due also ends a running relay's suspension of delivery to an
// upstream it found unreachable (see noteDeliveryRequest), as `postqueue -f` makes Postfix forget
// its dead hosts.
import { systemClock } from '../clock.js';
import { count } from '../count.js';
import { flushQueued, flushQueuedInSteps, HELD, holdOf, type RetryResult, requeueFailed, requeueFailedInSteps, retryMessage } from '../store/admin.js';
import { canonicalQueueId, typedId } from '../store/intake.js';
import { addressFilterProblem } from '../store/queries.js';
import { CliError, type GlobalOptions, loadCliConfig, printJson, printText, withWriter, writeEachInSteps, writeStep } from './context.js';
import { formatTable } from './table.js';

const EXPLAIN: Record<RetryResult, string> = {
  requeued: 'requeued: failed recipients will be tried again now',
  'due-now': 'due now',
  held: `${HELD}; nothing changed`,
  delivered: 'already delivered to every recipient; nothing to retry',
  // after the check that every id is a message: another command deleted it meanwhile
  'not-found': 'deleted meanwhile; nothing to retry',
};

export async function retryCommand(ids: string[], options: { failed?: boolean; queued?: boolean; sender?: string }, global: GlobalOptions): Promise<void> {
  if (options.failed && options.queued) throw new CliError('give --failed or --queued, not both');
  if ((options.failed || options.queued) && ids.length) throw new CliError(`give message ids or --${options.failed ? 'failed' : 'queued'}, not both`);
  if (options.sender !== undefined && !options.failed && !options.queued) throw new CliError('--sender goes with --failed or --queued');
  if (!options.failed && !options.queued && ids.length === 0) {
    throw new CliError('give one or more message ids, --failed to requeue every failed message, or --queued to make every queued one due now');
  }
  const problem = addressFilterProblem('sender', options.sender);
  if (problem) throw new CliError(`--${problem}`);
  const config = loadCliConfig(global, process.env);
  // one time for every step of the command: the time of its request (see noteDeliveryRequest)
  const now = systemClock.now();

  if (options.queued) {
    const flushed = await withWriter(config, (sqlite) =>
      flushQueuedInSteps(sqlite, options.sender, (ids) => writeStep(sqlite, () => flushQueued(sqlite, ids, now, config.batchDelay))),
    );
    if (global.json) printJson({ due_now: flushed });
    else printText(`${flushed} queued message${flushed === 1 ? ' is' : 's are'} due now`);
    return;
  }

  if (options.failed) {
    const requeued = await withWriter(config, (sqlite) => {
      return requeueFailedInSteps(sqlite, { sender: options.sender }, now, (step) => writeStep(sqlite, () => requeueFailed(sqlite, step, now, config.batchDelay).length));
    });
    if (global.json) printJson({ requeued });
    else printText(`requeued ${count(requeued, 'failed message')}`);
    return;
  }

  const unique = [...new Set(ids.map(canonicalQueueId))];
  const { results: outcomes, stopped } = await withWriter(config, (sqlite) => {
    // one unknown id and no message is touched
    for (const id of unique) if (holdOf(sqlite, id, now) === 'not-found') throw new CliError(`no message with id ${typedId(id)}; nothing changed`);
    return writeEachInSteps(sqlite, unique, (id) => retryMessage(sqlite, id, now, config.batchDelay), 'retried');
  });
  const results = outcomes.map((result, i) => ({ id: unique[i], result }));
  if (global.json) printJson({ results });
  else {
    printText(
      formatTable(results, [
        { header: 'ID', value: (r) => r.id },
        { header: 'RESULT', value: (r) => EXPLAIN[r.result] },
      ]),
    );
  }
  if (stopped) throw stopped;
  // like the API's 409: a message a worker holds, or one delivered already, was not retried
  if (results.some((r) => r.result !== 'requeued' && r.result !== 'due-now')) process.exitCode = 1;
}
