// The one root pino logger. Components get `logger.child({ component })`. Secrets are kept
// out at the source: the config is logged through redactConfig, relayq's own lines log an error
// by its message, and smtp-server and nodemailer mask AUTH in their transcripts. As a second
// guard pino censors credentials under their usual names (also inside `auth` and `headers`) and
// every secret config key where a config dump puts it; a credential nested under another name
// (`{ upstream: { password } }`) is not covered, so log such objects by their fields. The paths
// are explicit on purpose: one wildcard path (`*.password`) makes pino walk the keys of every
// line, about 10 µs a line where the line itself costs 6, and every message logs a line when it
// is queued and one per attempt. A secret that is not set (empty) is shown as it is, so the
// startup dump tells an operator which ones are set.
import { format } from 'node:util';
import pino, { type Logger } from 'pino';
import { CONFIG_KEYS } from './config/schema.js';
import { escapeTerminalUnsafe } from './terminal-unsafe.js';

const SECRET_KEYS = CONFIG_KEYS.filter((key) => key.secret).map((key) => key.path);

const REDACT_PATHS = [
  'password',
  'pass',
  'authorization',
  'auth.password',
  'auth.pass',
  'headers.authorization',
  ...SECRET_KEYS.map((path) => path.slice(path.lastIndexOf('.') + 1)),
  ...SECRET_KEYS.map((path) => `config.${path}`),
];

/** Set values become `[redacted]`; an empty or missing one stays as it is. */
function censor(value: unknown): unknown {
  return value === '' || value === undefined || value === null ? value : '[redacted]';
}

export function createLogger(level: string, destination: pino.DestinationStream = stdoutLog()): Logger {
  return pino(
    {
      level,
      base: { service: 'relayq' },
      redact: { paths: REDACT_PATHS, censor },
      timestamp: pino.stdTimeFunctions.isoTime,
      hooks: { streamWrite: escapeTerminalUnsafe },
    },
    destination,
  );
}

/** Log not yet taken by stdout's reader that is kept; more is dropped (see stdoutLog). */
const MAX_BUFFERED_LOG_BYTES = 16 * 2 ** 20;
/** While stdout cannot be written, how often the write is tried again when no new line tries it. */
const LOG_RETRY_MS = 5000;

export type StdoutLog = ReturnType<typeof pino.destination> & {
  /**
   * Writes out what is buffered, waiting at most `ms` (then says on stderr what it dropped), and
   * then nothing more. Called again while it waits (an exit decided sooner), it waits at most `ms`
   * from then instead, if that is sooner.
   */
  closeWithin(ms: number): Promise<void>;
};

/**
 * stdout, written asynchronously. A write that fails (a full disk under a redirect, /dev/full)
 * pauses logging, with one line on stderr and `onFault` (a warning in /health, where stderr may
 * be lost with stdout), and mail goes on: a relay that stopped serving for want of a log would be
 * worse. Meanwhile lines wait in memory as for a slow reader (below), and the write is tried again
 * with each line and every few seconds; once one goes through, logging resumes and `onFault` is
 * told with `undefined`. A pipe whose reader has gone (EPIPE) ends logging for good. A stream
 * given up neither writes nor flushes: sonic-boom retries a failed synchronous flush (pino's, at
 * exit) every 100 ms for ever, which kept a relay whose stdout nobody read from exiting, signals
 * and all. So the exit does not flush synchronously either: closeWithin() writes what is left
 * asynchronously, for a while.
 */
export function stdoutLog(maxBufferedBytes = MAX_BUFFERED_LOG_BYTES, onFault: (why: string | undefined) => void = () => {}): StdoutLog {
  const stream = pino.destination({ fd: 1, sync: false, maxLength: maxBufferedBytes });
  // A reader that stopped reading (a paused pager, a hung log shipper) would have the lines wait
  // in memory without end: past maxBufferedBytes they are dropped, as syslog drops what it cannot
  // pass on, and stderr says so once, and again with how many when the reader takes them again.
  let dropped = 0;
  stream.on('drop', () => {
    if (dropped++ > 0) return;
    process.stderr.write(`relayq: stdout has taken no log while ${maxBufferedBytes} bytes of it waited; log lines are dropped until it reads again\n`);
  });
  stream.on('drain', () => {
    if (dropped === 0) return;
    process.stderr.write(`relayq: stdout reads the log again; ${dropped} log line${dropped === 1 ? ' was' : 's were'} dropped\n`);
    dropped = 0;
  });
  let abandoned = false;
  const abandon = () => {
    abandoned = true;
    Object.assign(stream, {
      write: () => true,
      flush: (cb?: (err?: Error) => void) => cb?.(),
      flushSync: () => {},
      end: () => {},
    });
  };
  /** While writes to stdout fail: since when, why, and the timer that tries again. */
  let failing: { since: string; cause: string; retry: NodeJS.Timeout } | undefined;
  const flushSync = stream.flushSync.bind(stream);
  stream.flushSync = () => {
    if (!failing) flushSync();
  };
  const bytesLeft = () => (stream as unknown as { _len?: number })._len ?? 'few';
  stream.on('error', (err: NodeJS.ErrnoException) => {
    const cause = err.code ?? err.message;
    // the last lines cannot be written: no use waiting for them
    if (closing) return closing.finish(`relayq: exiting without the last ${bytesLeft()} bytes of the log: stdout cannot be written (${cause})`);
    if (abandoned || failing) return;
    if (err.code === 'EPIPE') {
      abandon();
      process.stderr.write(`relayq: the log cannot be written to stdout (${cause}): its reader has gone; logging stops, mail is still served\n`);
      onFault(`logging stopped at ${new Date().toISOString()}: stdout's reader has gone (${cause}); restart relayq to log again`);
      return;
    }
    // sonic-boom keeps the line that failed and writes it first when it is given the next one
    failing = { since: new Date().toISOString(), cause, retry: setInterval(() => stream.write(''), LOG_RETRY_MS).unref() };
    process.stderr.write(`relayq: the log cannot be written to stdout (${cause}); log lines wait until it can, mail is still served\n`);
    onFault(`logging paused since ${failing.since}: stdout cannot be written (${cause}); lines wait in memory (up to ${maxBufferedBytes} bytes, then they are dropped) and are written once it can be`);
  });
  stream.on('write', () => {
    if (!failing) return;
    clearInterval(failing.retry);
    process.stderr.write(`relayq: stdout takes the log again (it could not since ${failing.since})\n`);
    failing = undefined;
    onFault(undefined);
  });
  let closing: { startedAt: number; deadline: number; timer?: NodeJS.Timeout; done: Promise<void>; finish(line?: string): void } | undefined;
  const giveUpAt = (deadline: number) => {
    if (!closing || deadline >= closing.deadline) return;
    const c = closing;
    c.deadline = deadline;
    clearTimeout(c.timer);
    c.timer = setTimeout(() => {
      const waited = Math.round((performance.now() - c.startedAt) / 100) / 10;
      c.finish(`relayq: stdout took no log for ${waited} s; exiting without the last ${bytesLeft()} bytes of it`);
    }, deadline - performance.now());
  };
  const closeWithin = (ms: number): Promise<void> => {
    if (closing) {
      giveUpAt(performance.now() + ms);
      return closing.done;
    }
    if (abandoned) return Promise.resolve();
    if (failing) {
      clearInterval(failing.retry);
      process.stderr.write(`relayq: exiting without the last ${bytesLeft()} bytes of the log: stdout could not be written since ${failing.since}\n`);
      abandon();
      return Promise.resolve();
    }
    let resolve = () => {};
    const done = new Promise<void>((r) => {
      resolve = r;
    });
    let finished = false;
    const finish = (line?: string) => {
      if (finished) return;
      finished = true;
      clearTimeout(closing?.timer);
      if (line) process.stderr.write(`${line}\n`);
      resolve();
    };
    closing = { startedAt: performance.now(), deadline: Number.POSITIVE_INFINITY, done, finish };
    giveUpAt(performance.now() + ms);
    stream.once('close', () => finish());
    stream.end();
    abandon();
    return done;
  };
  return Object.assign(stream, { closeWithin });
}

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] as const;

type LogMethod = (entry?: object, message?: string, ...args: unknown[]) => void;
/** The logger interface smtp-server and nodemailer take: bunyan's methods. */
export type LibraryLogger = Record<(typeof LEVELS)[number], LogMethod>;

/**
 * `log` for a library written for bunyan (smtp-server, nodemailer), its lines marked
 * `"lib": name`:
 *   - the levels that are off are no-ops: the libraries build an entry for every command and
 *     reply before the level is looked at;
 *   - arguments after the message are formatted as bunyan does: pino drops those without a
 *     placeholder, as in smtp-server's `debug(entry, 'C:', line)`, and with them the command;
 *   - the `component` the library puts in each entry is dropped: the line already has relayq's
 *     own, and JSON tools keep only the last of two keys with one name;
 *   - `secrets` are masked (see masker) in the message and the entry's text fields. The libraries
 *     mask a password themselves but log the user name, plain and in AUTH's base64, and a user
 *     name may be the password too (an API token some providers take as both);
 *   - with `idKey`, the connection id the library calls `cid` is under that key (smtp-server's is
 *     the session id that relayq's own lines give as `session`).
 */
export function libraryLogger(log: Logger, name: string, secrets: readonly string[] = [], idKey = 'cid'): LibraryLogger {
  const lib = log.child({ lib: name });
  const mask = masker(secrets);
  const noop: LogMethod = () => {};
  const method = (level: (typeof LEVELS)[number]): LogMethod => {
    const write = lib[level].bind(lib) as (entry: object, message?: string) => void;
    return (given, message, ...args) => {
      const text = args.length ? format(message, ...args) : message;
      const entry = idKey !== 'cid' && given && 'cid' in given ? { ...given, cid: undefined, [idKey]: given.cid } : given;
      if (!mask) return write({ ...entry, component: undefined }, text);
      const fields = Object.entries(entry ?? {}).map(([key, value]) => [key, typeof value === 'string' ? mask(value) : value]);
      write({ ...Object.fromEntries(fields), component: undefined }, text === undefined ? text : mask(text));
    };
  };
  return Object.fromEntries(LEVELS.map((level) => [level, log.isLevelEnabled(level) ? method(level) : noop])) as LibraryLogger;
}

/**
 * Whether a user name holds one of the (non-empty) `secrets`: is it, as an API token taken as
 * user name and password may be, or contains it. Such a name is a secret too.
 */
export function holdsSecret(username: string, secrets: readonly string[]): boolean {
  return secrets.some((secret) => secret !== '' && username.includes(secret));
}

/** `secrets`, and the user name when it holds one of them: what a log masks of a credential. */
export function credentialSecrets(username: string, secrets: readonly string[]): string[] {
  return holdsSecret(username, secrets) ? [...secrets, username] : [...secrets];
}

/**
 * A function that hides the non-empty `secrets` in a line of a library's transcript: a secret
 * that stands as a word of its own (between spaces, quotes or the ends of the text, as in `User
 * "token" authenticated`, also as JSON escapes it), and, for a secret of 4 bytes or more, every
 * word that holds it (a client's user name `app:secret`, an address) and every base64 word whose
 * bytes hold it (the AUTH responses: the user name alone, `\0user\0…`, `user …`), each replaced
 * whole by `[redacted]`. A shorter secret inside a longer word is left as it is: masking every
 * word that holds it would garble the transcript. Undefined when there is nothing to mask.
 */
export function masker(secrets: readonly string[]): ((text: string) => string) | undefined {
  const list = [...new Set(secrets.filter(Boolean))];
  if (list.length === 0) return undefined;
  const spellings = (secret: string) => [secret, JSON.stringify(secret).slice(1, -1)];
  // the longest first, so that a secret inside another does not leave the rest of that one
  const alternatives = (texts: string[]) => [...new Set(texts)].sort((a, b) => b.length - a.length).map(escapeRegExp).join('|');
  const long = list.filter((secret) => Buffer.byteLength(secret) >= 4);
  const short = list.filter((secret) => Buffer.byteLength(secret) < 4);
  const patterns = [
    ...(long.length ? [`[^\\s"']*?(?:${alternatives(long.flatMap(spellings))})[^\\s"']*`] : []),
    ...(short.length ? [`(?:${alternatives(short.flatMap(spellings))})`] : []),
  ];
  const words = new RegExp(`(?<=^|[\\s"'])(?:${patterns.join('|')})(?=$|[\\s"'])`, 'g');
  const encoded = long.map((secret) => Buffer.from(secret));
  const mask = (text: string) => text.replace(words, '[redacted]');
  if (encoded.length === 0) return mask;
  return (text) =>
    mask(text).replace(BASE64_WORD, (word) => {
      const decoded = Buffer.from(word, 'base64');
      return encoded.some((bytes) => decoded.includes(bytes)) ? '[redacted]' : word;
    });
}

const BASE64_WORD = /(?<=^|\s)[A-Za-z0-9+/]{4,}={0,2}(?=$|\s)/g;

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
