// The `relayq` command, which index.ts loads. `serve` runs the relay; the other commands work on
// the same database file while it runs. Every command takes --config FILE, --databasePath FILE,
// --emailsDir DIR and --json (before or after its name) and, after its name, any other config key
// as a flag; it prints a table for people or JSON for scripts, and on bad input exits non-zero
// with one line. Each command's module is loaded only when it runs, so a quick `relayq status`
// starts quickly.
import { Command, InvalidArgumentError, Option } from 'commander';
import { didYouMean } from '../config/names.js';
import { CONFIG_KEYS } from '../config/schema.js';
import { isMessageState, MESSAGE_STATES, type MessageState } from '../store/schema.js';
import { VERSION } from '../version.js';
import { CliError, configFlags, type GlobalOptions, ourLines } from './context.js';
import { commandIndex, VALUED_GLOBAL_OPTIONS } from './early-signals.js';

/**
 * A value, not the next option: commander takes whatever follows an option as its value, so
 * `relayq queue --sender --json` would list the mail of a sender named `--json`, as text. As for
 * config keys given as flags, a value does not start with `--`; an address may (`--x@example.com`).
 */
function notAnOption(value: string, forFile = false): string {
  if (/^--[^=@]*(=|$)/.test(value)) throw optionAsValue(value, forFile);
  return value;
}

/** The error for an option taken as another's value: named without its own value, which may be a secret (--defaultPassword=…). */
function optionAsValue(option: string, forFile = false): InvalidArgumentError {
  const name = option.split('=')[0];
  return new InvalidArgumentError(`${name} is an option: give the option its value first${forFile ? ` (./${name} for a file of that name)` : ''}`);
}

/**
 * A path, not the name of a command or an option: `relayq --config serve`, its value left out,
 * would otherwise read a file named serve, or with no command left print the help. `./serve` is
 * such a file.
 */
function pathValue(value: string): string {
  if (program.commands.some((cmd) => cmd.name() === value)) throw new InvalidArgumentError(`${value} is a command: give the option its value first (./${value} for a file of that name)`);
  return notAnOption(value, true);
}

/** A path given as an argument: an empty one would be the working directory, or no file at all. */
function pathArgument(value: string): string {
  if (value === '') throw new InvalidArgumentError('must be a path (not empty)');
  return value;
}

/** --config, --databasePath, --emailsDir and --json: taken before a command's name and after it. */
function withGlobalOptions(cmd: Command): Command {
  return cmd
    .option('--config <file>', 'config file (default: RELAYQ_CONFIG, else ./config.json if present)', pathValue)
    .option('--databasePath <file>', 'the database file (default: databasePath from the config)', pathValue)
    .option('--emailsDir <dir>', 'the directory of local deliveries and failed-mail exports (default: emailsDir from the config)', pathValue)
    .option('--json', 'machine-readable JSON output');
}

const CONFIG_PATHS = CONFIG_KEYS.map((k) => k.path);

const program = new Command();
program
  .name('relayq')
  .description('Durable SMTP store-and-forward relay')
  .version(VERSION, '-V, --version', 'print the version')
  // Usage errors (bad option value, unknown command) are one line like every other failure. An
  // unknown option, or one taken for another's value, is named without its value: `relayq
  // --defaultPassword=… serve` (a key given before the command name) must not print the password.
  .configureOutput({
    // one line: commander puts its suggestion for an unknown command or option on a second one
    outputError: (text, write) =>
      write(
        `relayq: ${text
          .replace(/^error: /, '')
          .replace(/(unknown option '-[^'=]*)=[\s\S]*'/, "$1'")
          .replace(/(argument '--[^'=]*)=[\s\S]*?(' is invalid)/, '$1$2')
          .replace(/\n\(Did you mean (.*)\?\)/, ' (did you mean $1?)')
          // commander suggests only the options --help shows: config keys are hidden ones
          .replace(/unknown option '--([^'=]*)'(?=\n|$)/, (unknown, name: string) =>
            CONFIG_PATHS.includes(name) ? `${unknown} (a config key goes after the command name)` : unknown + didYouMean(name, CONFIG_PATHS, '--'),
          )}`,
      ),
  })
  // Options after a command name belong to that command, so `serve` receives its
  // `--config` and `--<key> value` flags untouched.
  .enablePositionalOptions();
withGlobalOptions(program);

program
  .command('serve')
  .description('run the relay (SMTP intake, delivery workers, HTTP API); config keys may be given as --key value')
  .allowUnknownOption(true)
  .helpOption('-h, --help')
  .usage('[--config FILE] [--<key> value ...]')
  .argument('[options...]')
  .addHelpText(
    'after',
    '\nAny config key is a flag: --smtpPort 2526, --databasePath FILE, --security.requireAuth false.\n' +
      'They override the config file (--config FILE, RELAYQ_CONFIG, ./config.json) and the environment (SMTP_PORT, ...).',
  )
  .action(async (_args: string[], _opts: unknown, cmd: Command) => {
    // before the command name or after it
    if (program.opts<GlobalOptions>().json || cmd.args.includes('--json')) {
      throw new CliError('--json does not apply to serve: its log lines are JSON already');
    }
    const { serve } = await import('./serve.js');
    await serve([...configFlags(program.opts<GlobalOptions>()), ...cmd.args], process.env);
  });

/**
 * A subcommand that also accepts the global options after its name, and every config key as a
 * flag, as `serve` does (a relay configured by flags alone: `--security.logAllEmails false` makes
 * `delete` overwrite what it frees). Only --databasePath and --emailsDir show in --help.
 */
function operatorCommand(name: string, description: string): Command {
  const cmd = withGlobalOptions(program.command(name).description(description));
  for (const { path, type, secret } of CONFIG_KEYS) {
    if (path === 'databasePath' || path === 'emailsDir') continue;
    // a boolean alone is true, as serve takes it: `--forwardSMTP --forwardHost h`
    if (type === 'bool') cmd.addOption(new Option(`--${path} [value]`).hideHelp().argParser(booleanWord));
    else cmd.addOption(new Option(`--${path} <value>`).hideHelp().argParser((value: string) => configValue(cmd, path, value, secret === true)));
  }
  return cmd;
}

/**
 * A config key's value, as serve takes it: not the next option (`--smtpPort $PORT --json` with PORT
 * unset). A password or token may start with `--`, unless it is one of the command's options
 * (`--defaultPassword --json` would be a password of `--json`, and no JSON; `-h` would be no
 * help) given apart from its flag; PEM text may too, and is refused as a path later without being
 * shown.
 */
function configValue(cmd: Command, path: string, value: string, secret: boolean): string {
  if (value.startsWith('-----BEGIN')) return value;
  if (secret && process.argv.includes(`--${path}=${value}`)) return value;
  if (isOptionOf(cmd, value)) throw optionAsValue(value);
  return secret ? value : notAnOption(value);
}

/** Whether `word` is one of `cmd`'s options (`--json`, `--smtpPort=25`, `-h`), its help included. */
function isOptionOf(cmd: Command, word: string | undefined): boolean {
  const name = word?.split('=')[0];
  return name === '--help' || name === '-h' || cmd.options.some((option) => option.long === name || option.short === name);
}

/**
 * An unquoted password with spaces (`--defaultPassword correct horse`) leaves its next words where a
 * command's arguments and options go: `delete` would look for a message named horse, `backup`
 * write a file of that name, and `-horse` would be shown as an unknown option. As serve does, the
 * words after a secret's value, up to the next `--` option, are refused and not shown; the
 * arguments go before such a flag. Run before commander parses the command's words (`args`, after
 * its name).
 */
function refuseWordsAfterSecret(cmd: Command, args: readonly string[]): void {
  for (let i = 0; i < args.length; i++) {
    const [flag, ...inline] = args[i].split('=');
    const key = flag.startsWith('--') ? CONFIG_KEYS.find((k) => `--${k.path}` === flag) : undefined;
    if (!key?.secret) continue;
    // no value: the option after it (commander says so)
    if (inline.length === 0 && isOptionOf(cmd, args[i + 1])) continue;
    const after = args[i + (inline.length > 0 ? 1 : 2)];
    if (after !== undefined && !after.startsWith('--') && !isOptionOf(cmd, after)) {
      throw new CliError(`the words after ${flag}'s value are not arguments: quote a value that has spaces, and give a command's arguments before its config keys`, 2);
    }
  }
}

/**
 * A boolean flag's value: commander takes the word after it, so `retry --security.logAllEmails ID`
 * would read the id as the flag's value, and then find no id.
 */
function booleanWord(value: string): string {
  // empty (--key=): the config check says it needs a value, as for any other key
  if (value === '' || /^(true|false|1|0|yes|no)$/i.test(value.trim())) return value;
  throw new InvalidArgumentError(`must be true/false/1/0/yes/no, got ${JSON.stringify(value)} (alone, a boolean flag goes after the other arguments, or give it as --key=true)`);
}

/**
 * The global options, those after the command name over those before it: as `serve` takes them,
 * the later one wins (commander's optsWithGlobals() would give the earlier one).
 */
function globals(cmd: Command): GlobalOptions {
  return { ...program.opts<GlobalOptions>(), ...cmd.opts<GlobalOptions>() };
}

/**
 * An option that narrows what a command works on, refused when given twice: `--state failed
 * --state queued` would otherwise list only the queued ones, where the user may well expect both
 * (the API answers a parameter given twice with a 400 too).
 */
function once<T>(name: string, parse: (value: string) => T = (value) => value as T): (value: string, previous: T | undefined) => T {
  return (value, previous) => {
    if (previous !== undefined) throw new InvalidArgumentError(`${name} is given twice: give it once`);
    return parse(notAnOption(value));
  };
}

function positiveInt(value: string): number {
  if (!/^\d+$/.test(value) || Number(value) < 1 || Number(value) > 100_000) {
    throw new InvalidArgumentError('must be an integer from 1 to 100000');
  }
  return Number(value);
}

function parseStateOption(value: string): MessageState {
  if (!isMessageState(value)) throw new InvalidArgumentError(`must be one of ${MESSAGE_STATES.join(', ')}`);
  return value;
}

operatorCommand('status', 'queue counts, lifetime totals (the numbers /metrics reports) and database size').action(
  async (_opts: unknown, cmd: Command) => (await import('./status.js')).statusCommand(globals(cmd)),
);

operatorCommand('queue', 'list messages, newest first')
  .option('--state <state>', `only messages in this state (${MESSAGE_STATES.join(', ')})`, once('--state', parseStateOption))
  .option('--sender <address>', 'only mail from this envelope sender (case-insensitive; "<>" or "" = the null sender)', once('--sender'))
  .option('--recipient <address>', 'only mail to this recipient', once('--recipient'))
  .option('--limit <n>', 'at most this many messages (default: 50)', once('--limit', positiveInt))
  .option('--before <cursor>', 'the page after this one (the cursor printed at the end of a full page, or a message id)', once('--before'))
  .action(async (opts, cmd: Command) =>
    (await import('./queue.js')).queueCommand({ state: opts.state, sender: opts.sender, recipient: opts.recipient, limit: opts.limit ?? 50, before: opts.before }, globals(cmd)),
  );

operatorCommand('show', 'one message: envelope, recipients and delivery attempts')
  .argument('<id>', 'queue id')
  .option('--raw', 'write the stored message (RFC 5322 bytes) to stdout instead (not with --json)')
  .action(async (id: string, opts: { raw?: boolean }, cmd: Command) => (await import('./show.js')).showCommand(id, opts, globals(cmd)));

operatorCommand('retry', 'make messages due now (at the earliest batchDelay after their last batch); failed recipients get a fresh set of attempts')
  .argument('[ids...]', 'queue ids')
  .option('--failed', 'requeue every failed message')
  .option('--queued', 'make every queued message due now, retries waiting for their backoff included (postqueue -f)')
  .option('--sender <address>', 'with --failed or --queued: only mail from this envelope sender', once('--sender'))
  .action(async (ids: string[], opts: { failed?: boolean; queued?: boolean; sender?: string }, cmd: Command) =>
    (await import('./retry.js')).retryCommand(ids, opts, globals(cmd)),
  );

operatorCommand('delete', 'delete messages with their recipients, attempts and failed-mail exports (refused while a worker delivers one)')
  .argument('<ids...>', 'queue ids')
  .action(async (ids: string[], _opts: unknown, cmd: Command) => (await import('./delete.js')).deleteCommand(ids, globals(cmd)));

operatorCommand('backup', 'write a consistent, fsynced, verified copy of the database while the server runs')
  .argument('<file>', 'where to write the copy', pathArgument)
  .option('--force', 'replace FILE if it exists')
  .action(async (file: string, opts: { force?: boolean }, cmd: Command) => (await import('./backup.js')).backupCommand(file, opts, globals(cmd)));

operatorCommand('export-failed', 'write the JSON export of every failed message')
  .argument('[dir]', 'target directory (default: emailsDir/failed)', pathArgument)
  .action(async (dir: string | undefined, _opts: unknown, cmd: Command) => (await import('./export-failed.js')).exportFailedCommand(dir, globals(cmd)));

operatorCommand('migrate', 'apply pending database migrations (the server also does this at start)').action(
  async (_opts: unknown, cmd: Command) => (await import('./migrate.js')).migrateCommand(globals(cmd)),
);

// `relayq queue | head`: once the reader has gone, the rest of the output has nowhere to go. A
// command stops there quietly, as Unix tools do, instead of with a stack trace. Output that
// cannot be written otherwise (`show --raw > msg.eml` on a full disk) is a failure of one line.
// (Not `serve`: its log has its own handling.)
program.hook('preAction', (_program, command) => {
  if (command.name() === 'serve') return;
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    // the reader went away: the command's own status (1 for a retry that did nothing), else 0
    if (err.code === 'EPIPE') process.exit();
    process.stderr.write(`relayq: cannot write the output: ${err.message}\n`);
    process.exit(1);
  });
});

// stderr is where a command says what went wrong. When it cannot be written either (`2>&1` into a
// full disk, a pipe whose reader has gone), there is nowhere left to say so: the command goes on
// as it would have (serve goes on serving mail) instead of dying of the unhandled write error.
process.stderr.on('error', () => {});

const args = process.argv.slice(2);
const named = commandIndex(args);
// (a command not known, or serve, is commander's or serve's to judge)
const operator = named >= 0 && args[named] !== 'serve' ? program.commands.find((cmd) => cmd.name() === args[named]) : undefined;
Promise.resolve()
  .then(() => {
    // `relayq -h queue …` and `relayq -V …` print the help or the version, whatever follows
    const helpOrVersion = args.slice(0, named).some((arg, i) => ['-h', '--help', '-V', '--version'].includes(arg) && !VALUED_GLOBAL_OPTIONS.has(args[i - 1]));
    if (operator && !helpOrVersion) refuseWordsAfterSecret(operator, args.slice(named + 1));
    // (commander prints the whole usage for the help of a command it does not know)
    const asked = args[named] === 'help' ? args[named + 1] : undefined;
    if (asked !== undefined && asked !== 'help' && !asked.startsWith('-') && !program.commands.some((cmd) => cmd.name() === asked)) {
      throw new CliError(`unknown command '${asked}': relayq --help lists the commands`);
    }
    return program.parseAsync(process.argv);
  })
  .catch((err: Error) => {
    // The reason, not a stack: one line, or one per bad key of a config error, each marked as ours.
    process.stderr.write(ourLines(err.message));
    process.exit(err instanceof CliError ? err.exitCode : 1);
  });
