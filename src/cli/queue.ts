// `relayq queue`: a page of messages, newest first, filtered like GET /admin/messages.
import { BadFilter, listMessages, type MessageSummary } from '../store/queries.js';
import type { MessageState } from '../store/schema.js';
import { CliError, configFlags, type GlobalOptions, loadCliConfig, printJson, printText, withReader } from './context.js';
import { formatTable, formatTime } from './table.js';

export interface QueueOptions {
  state?: MessageState;
  sender?: string;
  recipient?: string;
  limit: number;
  before?: string;
}

export async function queueCommand(options: QueueOptions, global: GlobalOptions): Promise<void> {
  const config = loadCliConfig(global, process.env);
  const page = await withReader(config, (sqlite) => {
    try {
      return listMessages(sqlite, options);
    } catch (err) {
      if (err instanceof BadFilter) throw new CliError(`--${err.message}`);
      throw err;
    }
  });
  if (global.json) {
    // the shape of GET /admin/messages, so a script reads both alike
    printJson({ messages: page.messages, next_before: page.nextBefore });
    return;
  }
  if (page.messages.length === 0) {
    printText('no messages');
    return;
  }
  printText(
    formatTable<MessageSummary>(page.messages, [
      { header: 'ID', value: (m) => m.id },
      { header: 'STATE', value: (m) => m.state },
      { header: 'FROM', value: (m) => (m.mail_from === '' ? '<>' : m.mail_from), max: 40 },
      { header: 'RCPTS', value: (m) => m.recipient_count, right: true },
      { header: 'SIZE', value: (m) => m.size, right: true },
      { header: 'RECEIVED', value: (m) => formatTime(m.received_at) },
      { header: 'NEXT ATTEMPT', value: (m) => formatTime(m.next_attempt_at) },
      { header: 'TRIES', value: (m) => m.claims, right: true },
      { header: 'LAST ERROR', value: (m) => m.last_error, max: 60 },
    ]),
  );
  if (page.nextBefore) printText(`more: ${nextPageCommand(options, global, page.nextBefore)}`);
}

/** The command that lists the next page of the same database with the same filters. */
function nextPageCommand(options: QueueOptions, global: GlobalOptions, before: string): string {
  const quote = (value: string) => (/^[\w@.+/-]+$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`);
  // the file this page came from; no other config flag (one may be a password)
  const args = ['relayq', 'queue', ...configFlags({ config: global.config, databasePath: global.databasePath }).map(quote)];
  if (options.state) args.push('--state', options.state);
  if (options.sender !== undefined) args.push('--sender', quote(options.sender));
  if (options.recipient !== undefined) args.push('--recipient', quote(options.recipient));
  args.push('--limit', String(options.limit), '--before', before);
  return args.join(' ');
}
