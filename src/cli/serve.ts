// `relayq serve`: load the configuration (every error at once, before anything listens),
// start the relay, and shut down in order on SIGTERM/SIGINT (a second signal forces exit).
import { findConfigFile, formatErrors, loadConfig, readConfigFile } from '../config/load.js';
import { createLogger } from '../logger.js';
import { startRelay } from '../main.js';

export async function serve(argv: readonly string[], env: NodeJS.ProcessEnv): Promise<void> {
  const file = readConfigFile(findConfigFile(argv, env));
  const loaded = loadConfig(argv, env, file);
  if (!loaded.ok) {
    process.stderr.write(`${formatErrors(loaded.errors, file?.path)}\n`);
    process.exit(2);
  }
  const logger = createLogger(loaded.config.logLevel);
  let relay: Awaited<ReturnType<typeof startRelay>> | undefined;
  // the relay cannot store mail any more: stop, and exit non-zero for the supervisor to restart it
  const onFatal = () => {
    if (!relay) return exitAfterFlush(logger, 1);
    relay
      .stop()
      .catch((err) => logger.error({ event: 'relay.stop_failed', err: (err as Error).message }, 'shutdown failed'))
      .finally(() => exitAfterFlush(logger, 1));
  };
  try {
    relay = await startRelay(loaded.config, { logger, warnings: loaded.warnings, onFatal });
  } catch (err) {
    logger.fatal({ event: 'relay.start_failed', err: (err as Error).message }, 'relayq could not start');
    process.stderr.write(`relayq: ${(err as Error).message}\n`);
    exitAfterFlush(logger, 1);
    return;
  }
  const running = relay;
  let signals = 0;
  const onSignal = (signal: string) => {
    signals++;
    if (signals > 1) {
      logger.warn({ event: 'relay.forced_exit', signal }, 'second signal: exiting now');
      exitAfterFlush(logger, 1);
      return;
    }
    logger.info({ event: 'relay.signal', signal }, 'signal received');
    running.stop().then(
      () => {
        exitAfterFlush(logger, 0);
      },
      (err) => {
        logger.error({ event: 'relay.stop_failed', err: (err as Error).message }, 'shutdown failed');
        exitAfterFlush(logger, 1);
      },
    );
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
}

/** The log destination is asynchronous: write out what is buffered, then exit. */
function exitAfterFlush(logger: ReturnType<typeof createLogger>, code: number): void {
  logger.flush(() => process.exit(code));
  // never hang on a stuck destination
  setTimeout(() => process.exit(code), 1000).unref();
}
