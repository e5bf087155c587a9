// The one root pino logger. Components get `logger.child({ component })`; secrets are redacted
// by path so that a config dump or an error object can never print them.
import pino, { type Logger } from 'pino';

export const REDACT_PATHS = [
  'password',
  '*.password',
  'pass',
  '*.pass',
  'defaultPassword',
  '*.defaultPassword',
  'forwardPassword',
  '*.forwardPassword',
  'adminToken',
  '*.adminToken',
  '*.*.adminToken',
  'authorization',
  '*.authorization',
  '*.headers.authorization',
];

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'relayq' },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    destination ?? pino.destination({ fd: 1, sync: false }),
  );
}
