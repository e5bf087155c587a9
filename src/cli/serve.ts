// `relayq serve`: load the configuration (every error at once, before anything listens),
// start the relay, and shut down in order on SIGTERM, SIGINT or SIGHUP (a second signal forces
// exit; the first one repeated within a second does not). The signals are taken from the first
// moment: one that comes while the relay starts (a long migration) stops it once it has started,
// rather than killing it mid-start or, as PID 1 in a container, being ignored (early-signals.ts
// keeps those that come before this module runs).
import { loadConfigFromSources } from '../config/load.js';
import { createLogger, type StdoutLog, stdoutLog } from '../logger.js';
import { type Relay, startRelay } from '../main.js';
import { ourLines } from './context.js';
import { IGNORED_SIGNALS, STOP_SIGNALS, takeEarlySignals } from './early-signals.js';

/** The first signal again within this long is the same request delivered twice, not a second one. */
const REPEAT_WINDOW_MS = 1000;

export async function serve(argv: readonly string[], env: NodeJS.ProcessEnv): Promise<void> {
  const loaded = loadConfigFromSources(argv, env);
  if (!loaded.ok) {
    // one line per bad key, each marked as ours, as every other command writes its errors
    process.stderr.write(ourLines(loaded.message));
    process.exit(2);
  }
  // /health shows these, also those added while the relay runs
  const warnings = [...loaded.warnings];
  let logFault: string | undefined;
  const out = stdoutLog(undefined, (why) => {
    if (logFault) warnings.splice(warnings.indexOf(logFault), 1);
    if (why) warnings.push(why);
    else logger.warn({ event: 'relay.log_resumed', paused: logFault }, 'logging resumed: stdout takes the log again');
    logFault = why;
  });
  const logger = createLogger(loaded.config.logLevel, out);
  let relay: Relay | undefined;
  let exitCode = 0;
  let stopping = false;
  /** Stops once, and exits with the highest code asked for meanwhile. */
  const stop = (running: Relay, code: number) => {
    exitCode = Math.max(exitCode, code);
    if (stopping) return;
    stopping = true;
    running.stop().then(
      () => exitAfterFlush(out, exitCode),
      (err) => {
        logger.error({ event: 'relay.stop_failed', err: (err as Error).message }, 'shutdown failed');
        exitAfterFlush(out, 1);
      },
    );
  };
  let signals = 0;
  let first: { signal: string; at: number } | undefined;
  const onSignal = (signal: string, at = performance.now()) => {
    // `timeout` sends its signal to the process and then to its process group: one request, twice
    if (first?.signal === signal && at - first.at < REPEAT_WINDOW_MS) return;
    first ??= { signal, at };
    signals++;
    if (signals > 1) {
      logger.warn({ event: 'relay.forced_exit', signal }, 'second signal: exiting now');
      exitAfterFlush(out, 1, 1000);
      return;
    }
    logger.info({ event: 'relay.signal', signal, ...(relay ? {} : { starting: true }) }, relay ? 'signal received' : 'signal received while starting: stopping once started');
    if (relay) stop(relay, 0);
  };
  const ignore = (signal: string) => logger.warn({ event: 'relay.signal_ignored', signal }, `${signal} ignored: relayq stops on SIGTERM, SIGINT or SIGHUP, and its log on stdout needs no reopening`);
  for (const signal of STOP_SIGNALS) process.on(signal, () => onSignal(signal));
  for (const signal of IGNORED_SIGNALS) process.on(signal, () => ignore(signal));
  for (const early of takeEarlySignals()) {
    if ((IGNORED_SIGNALS as readonly string[]).includes(early.signal)) ignore(early.signal);
    else onSignal(early.signal, early.at);
  }
  // the relay cannot store mail any more: stop, and exit non-zero for the supervisor to restart it
  const onFatal = () => (relay ? stop(relay, 1) : exitAfterFlush(out, 1));
  try {
    relay = await startRelay(loaded.config, { logger, warnings, configFile: loaded.file, onFatal });
  } catch (err) {
    logger.fatal({ event: 'relay.start_failed', err: (err as Error).message }, 'relayq could not start');
    process.stderr.write(ourLines((err as Error).message));
    exitAfterFlush(out, 1);
    return;
  }
  if (signals === 1) stop(relay, 0);
}

/** The code of the exit decided, once one is. */
let exiting: number | undefined;

/**
 * The log is written asynchronously: write out what is left, for `ms` at most (a reader that is
 * slow, not gone, gets its lines), then exit. An exit decided again, by a second signal while the
 * log is being written out after the stop or during it, shortens the wait to its own and exits
 * with the higher code (1 over a stop's 0).
 */
function exitAfterFlush(out: StdoutLog, code: number, ms = 5000): void {
  if (exiting !== undefined) {
    exiting = Math.max(exiting, code);
    // the wait in progress ends sooner, with its line on stderr if the log was not all written
    void out.closeWithin(ms);
    return;
  }
  exiting = code;
  out.closeWithin(ms).then(() => process.exit(exiting));
}
