// `relayq show ID`: one message with its envelope, every recipient and every delivery attempt;
// `--raw` writes the stored message bytes instead (as GET /admin/messages/:id/raw does).
import { canonicalQueueId, typedId } from '../store/intake.js';
import { type AttemptRow, messageDetail, messageRaw, type RecipientRow } from '../store/queries.js';
import { CliError, type GlobalOptions, loadCliConfig, printJson, printText, withReader } from './context.js';
import { formatFields, formatTable, formatTime } from './table.js';

export async function showCommand(given: string, options: { raw?: boolean }, global: GlobalOptions): Promise<void> {
  if (options.raw && global.json) throw new CliError('--raw writes the message itself, not JSON: give one of --raw and --json');
  const config = loadCliConfig(global, process.env);
  const id = canonicalQueueId(given);
  if (options.raw) {
    const found = await withReader(config, (sqlite) => messageRaw(sqlite, id));
    if (!found) throw new CliError(`no message with id ${typedId(id)}`);
    if (!found.raw) throw new CliError(`message ${id} has no stored content (erased after delivery: security.logAllEmails is false)`);
    process.stdout.write(found.raw);
    return;
  }
  const detail = await withReader(config, (sqlite) => messageDetail(sqlite, id));
  if (!detail) throw new CliError(`no message with id ${typedId(id)}`);
  if (global.json) {
    printJson(detail);
    return;
  }
  const m = detail.message;
  printText(
    formatFields([
      ['id', m.id],
      ['state', m.state],
      ['from', `${m.mail_from === '' ? '<>' : m.mail_from}${m.smtputf8 ? ' (SMTPUTF8)' : ''}`],
      ['auth user', m.auth_user],
      ['client', `${m.client_ip}${m.helo ? ` helo ${m.helo}` : ''}`],
      ['size', `${m.size} bytes${m.raw_erased ? ' (content erased after delivery)' : ''}`],
      ['received', formatTime(m.received_at)],
      ['next attempt', formatTime(m.next_attempt_at)],
      ['lease until', m.state === 'sending' ? formatTime(m.lease_expires_at) : null],
      ['finished', formatTime(m.finished_at)],
      ['tries', m.claims],
      ['last error', m.last_error],
    ]),
  );
  printText('');
  printText(
    formatTable<RecipientRow>(detail.recipients, [
      { header: 'SEQ', value: (r) => r.seq, right: true },
      { header: 'RECIPIENT', value: (r) => r.address },
      { header: 'STATUS', value: (r) => r.status },
      { header: 'TRIES', value: (r) => r.attempts, right: true },
      { header: 'CODE', value: (r) => r.last_code },
      { header: 'LAST REPLY', value: (r) => r.last_reply, max: 80 },
    ]),
  );
  printText('');
  if (detail.attempts.length === 0) {
    // a try has a row once it ends: one released at a stop or cut off by a kill -9 has none
    printText(
      m.claims === 0
        ? 'no delivery attempts yet'
        : `no delivery attempt has ended yet: its ${m.claims === 1 ? 'try was' : `${m.claims} tries were`} released unfinished at a stop or cut off by a kill -9 (each may have reached the upstream), or one is in progress now`,
    );
    return;
  }
  printText(
    formatTable<AttemptRow>(detail.attempts, [
      { header: 'STARTED', value: (a) => formatTime(a.started_at) },
      { header: 'BATCH', value: (a) => a.batch, right: true },
      { header: 'RCPTS', value: (a) => a.recipients.length, right: true },
      { header: 'UPSTREAM', value: (a) => a.upstream },
      { header: 'MS', value: (a) => a.duration_ms, right: true },
      { header: 'OUTCOME', value: (a) => a.outcome },
      { header: 'CODE', value: (a) => a.code },
      { header: 'REPLY', value: (a) => a.reply, max: 80 },
    ]),
  );
}
