// `relayq serve` takes its signals from its first moment. Without a listener Node ends the
// process at once, so a stop that came while the CLI's modules loaded (some hundreds of
// milliseconds on a busy machine) killed the relay mid-start, and as PID 1 in a container the
// signal was ignored. The CLI loads this module before any other; serve takes over what it kept.

export const STOP_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const;

/**
 * Signals serve ignores and logs: without a listener, SIGUSR1 opens Node's inspector (a debugger
 * that every local user could reach on 127.0.0.1:9229, and run code as the relay) and SIGUSR2
 * ends the process with no stop in order. Operators send them to ask for a log to be reopened,
 * which a log on stdout does not need.
 */
export const IGNORED_SIGNALS = ['SIGUSR1', 'SIGUSR2'] as const;

export interface EarlySignal {
  signal: NodeJS.Signals;
  /** performance.now() when it came. */
  at: number;
}

/** The global options that take a value: the word after one is not the command's name. */
export const VALUED_GLOBAL_OPTIONS: ReadonlySet<string> = new Set(['--config', '--databasePath', '--emailsDir']);

/** Where in `args` the command's name is (the first word that is neither an option nor a global option's value), as commander will read it; -1 when none is. */
export function commandIndex(args: readonly string[]): number {
  for (let i = 0; i < args.length; i++) {
    if (VALUED_GLOBAL_OPTIONS.has(args[i])) i++;
    else if (!args[i].startsWith('-')) return i;
  }
  return -1;
}

/** The command `args` name, if they name one. */
export function commandName(args: readonly string[]): string | undefined {
  const i = commandIndex(args);
  return i < 0 ? undefined : args[i];
}

const kept: EarlySignal[] = [];
const keep = (signal: NodeJS.Signals) => kept.push({ signal, at: performance.now() });
const KEPT = [...STOP_SIGNALS, ...IGNORED_SIGNALS];
if (commandName(process.argv.slice(2)) === 'serve') for (const signal of KEPT) process.on(signal, keep);

/** The signals that came before serve listened for them; they are no longer kept from now on. */
export function takeEarlySignals(): EarlySignal[] {
  for (const signal of KEPT) process.off(signal, keep);
  return kept.splice(0);
}
