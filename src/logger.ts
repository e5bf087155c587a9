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
import pino, { type Logger } from 'pino';
import { CONFIG_KEYS } from './config/schema.js';

const SECRET_KEYS = CONFIG_KEYS.filter((key) => key.secret).map((key) => key.path);

export const REDACT_PATHS = [
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

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'relayq' },
      redact: { paths: REDACT_PATHS, censor },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
