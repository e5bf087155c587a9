// The configuration schema: every key relayq understands, with its type, default, bounds
// and meaning. The loader, the README's configuration table and its test all read this list.
import net from 'node:net';
import os from 'node:os';

export type KeyType = 'string' | 'int' | 'bool' | 'list';

export interface KeyDef {
  /** Dotted path, e.g. "rateLimits.maxPerHour". */
  path: string;
  type: KeyType;
  default: string | number | boolean | string[];
  min?: number;
  max?: number;
  /** Allowed values for a string key. */
  values?: readonly string[];
  /** A string key's value must match this (a RegExp, or a test of its own), or the error says `must be <what>`. */
  pattern?: { match: { test(value: string): boolean }; what: string };
  /** Never logged. */
  secret?: boolean;
  /** Unit shown in the docs. */
  unit?: string;
  doc: string;
}

const PORT = { min: 0, max: 65535 };

/**
 * The largest maxMessageSize: a stored message (its bytes and the Received header) is one SQLite
 * value, and the SQLite that better-sqlite3 builds stores values up to about 512 MiB. A larger
 * message would be received in full and then refused with a 451 at every attempt.
 */
export const MAX_MESSAGE_SIZE_LIMIT = 500 * 1024 * 1024;
/** The smallest maxMessageSize: a message of a few headers and lines. */
export const MIN_MESSAGE_SIZE_LIMIT = 1024;

/** Labels of letters, digits, '-' and '_', a hyphen at neither end; a trailing dot allowed. */
const HOST_NAME = /^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$/;

/**
 * An IP address or a host name in ASCII: no brackets, no port. A name whose last label is all
 * digits is none (RFC 3696 §2): the system would read `127.1` or `0` as an address.
 */
function isHost(host: string): boolean {
  return net.isIP(host) !== 0 || (HOST_NAME.test(host) && !/(^|\.)[0-9]+\.?$/.test(host));
}

/**
 * A name relayq gives itself in its greeting, in EHLO and in every `Received:` header: a host name
 * in ASCII or an address literal (`[192.0.2.25]`, `[IPv6:2001:db8::25]`, RFC 5321 §4.1.3). Not
 * merely printable: a `(` or `;` there would open a comment or end a clause of `Received:`.
 */
function isServerName(name: string): boolean {
  const literal = /^\[(IPv6:)?([^\]]+)\]$/i.exec(name);
  if (literal) return net.isIP(literal[2]) === (literal[1] ? 6 : 4);
  return HOST_NAME.test(name);
}

/**
 * A listen address must be given: Node would take an empty one (an unset `${VAR}` in compose) as
 * every interface. 0.0.0.0 or :: says that on purpose. Not Postfix's `[::1]` (Node would look it
 * up as a name), nor `host:port` (the port has its own key).
 */
const LISTEN_ADDRESS = {
  match: { test: isHost },
  what: 'an IP address or host name, without [brackets] or a port (0.0.0.0 or :: for every interface)',
};

/**
 * A file or directory relayq writes must be named: an empty path (an unset `${VAR}` in compose)
 * fails at the start with "ENOENT … ''", and not before it has made directories of its own in
 * the working directory.
 */
const PATH = { match: /./, what: 'a path (not empty)' };

/**
 * Text of several lines, or a PEM block: no path, name or address is, and it may be a private key
 * (TLS_KEY="$(cat key.pem)", as some platforms pass certificates), so a refusal never shows it.
 */
export const PEM_OR_LINES = /[\r\n]|-----BEGIN/;

/** A PEM file's path, or empty: its text given instead is refused at once. */
const PEM_FILE = { match: { test: (v: string) => !PEM_OR_LINES.test(v) }, what: 'the path of a PEM file, not its text (write the text to a file and give its path)' };

/** The one file that keeps the mail: not SQLite's `:memory:`, a database that is gone at the exit. */
const DATABASE_PATH = { match: /^(?!:memory:$)./, what: 'the path of a file (not empty, nor ":memory:", which keeps nothing)' };

/**
 * An upstream host: a host name in ASCII or an IP address. Not `host:port`, nor Postfix's
 * `[host]`: the port is forwardPort, and either would be looked up as a name and every message
 * deferred (as would a name in Unicode: the lookup takes its xn-- form). Empty: not forwarding.
 */
const UPSTREAM_HOST = {
  match: { test: (host: string) => host === '' || isHost(host) },
  what: 'a host name (xn-- for an internationalized one) or an IP address, without a port (that is forwardPort) or [brackets]',
};

export const CONFIG_KEYS: readonly KeyDef[] = [
  { path: 'smtpHost', type: 'string', default: '127.0.0.1', pattern: LISTEN_ADDRESS, doc: 'SMTP listen address' },
  { path: 'smtpPort', type: 'int', default: 2525, ...PORT, doc: 'SMTP listen port (the Docker image sets 25)' },
  {
    path: 'serverName',
    type: 'string',
    default: os.hostname(),
    pattern: { match: { test: isServerName }, what: 'a host name in ASCII (letters, digits, - and _ between dots) or an address literal like [192.0.2.25]' },
    doc: 'name in the greeting and in `Received:` (default: the host name)',
  },
  { path: 'defaultUsername', type: 'string', default: '', doc: 'SMTP AUTH user name' },
  { path: 'defaultPassword', type: 'string', default: '', secret: true, doc: 'SMTP AUTH password' },
  { path: 'forwardSMTP', type: 'bool', default: false, doc: 'forward to the upstream; false = deliver locally into `emailsDir`' },
  { path: 'forwardHost', type: 'string', default: '', pattern: UPSTREAM_HOST, doc: 'upstream host (required when forwardSMTP)' },
  { path: 'forwardPort', type: 'int', default: 587, min: 1, max: 65535, doc: 'upstream port' },
  { path: 'forwardUsername', type: 'string', default: '', doc: 'upstream AUTH user (no AUTH when empty; set it with `forwardPassword`)' },
  { path: 'forwardPassword', type: 'string', default: '', secret: true, doc: 'upstream AUTH password (set it with `forwardUsername`)' },
  { path: 'forwardSSL', type: 'bool', default: false, doc: 'implicit TLS (port 465 style); false = STARTTLS when offered' },
  {
    path: 'forwardRequireTLS',
    type: 'bool',
    default: false,
    doc: 'send only over TLS with a certificate that verifies: an upstream that offers no STARTTLS, whose STARTTLS fails, or whose certificate does not verify gets no mail, the attempts are deferred (Postfix `smtp_tls_security_level = secure`)',
  },
  { path: 'batchSize', type: 'int', default: 20, min: 1, max: 10000, doc: 'max recipients per upstream SMTP transaction' },
  { path: 'batchDelay', type: 'int', default: 1000, min: 0, max: 3600000, unit: 'ms', doc: 'pause between two batches of the same message' },
  { path: 'continueOnError', type: 'bool', default: true, doc: "a failed batch does not stop the message's other batches" },
  { path: 'workerCount', type: 'int', default: 5, min: 1, max: 1000, doc: "concurrent deliveries; with forwardSMTP each has its own upstream connection, so best at most the upstream's limit of connections per client" },
  { path: 'queueSize', type: 'int', default: 1000, min: 0, max: 100000000, doc: 'max messages not yet final (queued + sending); more get `452`; 0 = unlimited' },
  { path: 'inFlowDelay', type: 'int', default: 1000, min: 0, max: 10000, unit: 'ms', doc: 'while 100 messages per worker (at most 10,000, at most half of queueSize) are due and waiting, each MAIL FROM waits up to this long for delivery to take some (modelled on Postfix in_flow_delay); 0 = off' },
  { path: 'processingTimeout', type: 'int', default: 300, min: 5, max: 86400, unit: 's', doc: 'limit for one delivery attempt; also the claim lease' },
  { path: 'enableHealthCheck', type: 'bool', default: true, doc: 'serve the HTTP API' },
  { path: 'healthCheckHost', type: 'string', default: '127.0.0.1', pattern: LISTEN_ADDRESS, doc: 'HTTP listen address' },
  { path: 'healthCheckPort', type: 'int', default: 8025, ...PORT, doc: 'HTTP listen port' },
  { path: 'rateLimits.enabled', type: 'bool', default: false, doc: 'enforce the four limits below' },
  { path: 'rateLimits.maxPerHour', type: 'int', default: 500, min: 1, max: 100000000, doc: 'per envelope sender, messages per rolling hour' },
  { path: 'rateLimits.maxPerDay', type: 'int', default: 2000, min: 1, max: 100000000, doc: 'per envelope sender, messages per rolling day' },
  { path: 'rateLimits.globalMaxPerHour', type: 'int', default: 1000, min: 1, max: 100000000, doc: 'all senders together, messages per rolling hour' },
  { path: 'rateLimits.globalMaxPerDay', type: 'int', default: 5000, min: 1, max: 100000000, doc: 'all senders together, messages per rolling day' },
  { path: 'security.allowLocalOnly', type: 'bool', default: true, doc: 'only loopback clients may connect to SMTP' },
  { path: 'security.allowedNetworks', type: 'list', default: [], doc: 'CIDRs allowed when allowLocalOnly is false (empty = any)' },
  { path: 'security.requireAuth', type: 'bool', default: true, doc: 'SMTP AUTH required before MAIL' },
  { path: 'security.logAllEmails', type: 'bool', default: true, doc: 'keep content after delivery and log subjects' },
  {
    path: 'security.adminToken',
    type: 'string',
    default: '',
    secret: true,
    // it travels as `Authorization: Bearer <token>`, which ends at the first space; and anyone
    // who reaches the port may guess it, a page in a browser on the relay's host included
    pattern: { match: /^(?:[\x21-\x7e]{16,})?$/, what: 'empty, or at least 16 printable ASCII characters without spaces (openssl rand -hex 32 makes one)' },
    doc: 'bearer token that lets non-loopback clients use the HTTP API',
  },
  { path: 'tls.cert', type: 'string', default: '', pattern: PEM_FILE, doc: 'PEM certificate file; with tls.key enables STARTTLS' },
  { path: 'tls.key', type: 'string', default: '', pattern: PEM_FILE, doc: 'PEM private key file; with tls.cert enables STARTTLS' },
  { path: 'databasePath', type: 'string', default: 'data/relayq.db', pattern: DATABASE_PATH, doc: 'the one SQLite file' },
  { path: 'emailsDir', type: 'string', default: 'emails', pattern: PATH, doc: 'local deliveries; failed exports go to `emailsDir/failed`' },
  { path: 'maxMessageSize', type: 'int', default: 26214400, min: MIN_MESSAGE_SIZE_LIMIT, max: MAX_MESSAGE_SIZE_LIMIT, unit: 'bytes', doc: 'larger messages get `552` (at most 500 MiB: SQLite stores a message as one value, of at most 512 MiB)' },
  { path: 'spoolAfter', type: 'int', default: 262144, min: 0, max: MAX_MESSAGE_SIZE_LIMIT, unit: 'bytes', doc: 'a message being received is held in memory up to this size, the rest in a file in `<databasePath>-spool/` until its commit (as Haraka\'s spool_after); 0 = all in memory' },
  { path: 'maxRecipients', type: 'int', default: 1000, min: 1, max: 100000, doc: 'more RCPTs get `452`' },
  { path: 'maxConnections', type: 'int', default: 500, min: 1, max: 100000, doc: 'concurrent SMTP connections; more get `421 4.7.0` as they connect' },
  { path: 'retry.maxAttempts', type: 'int', default: 10, min: 1, max: 1000, doc: 'attempts before a temporarily failing batch becomes failed' },
  // not 0: every delay would be 0 × 2^(n-1), and a message would spend its retry.maxAttempts in seconds
  { path: 'retry.initialDelay', type: 'int', default: 60, min: 1, max: 86400, unit: 's', doc: 'delay after the first temporary failure; 90 % of it, at most 60 s, is how long delivery is suspended when the upstream cannot be reached' },
  { path: 'retry.maxDelay', type: 'int', default: 3600, min: 1, max: 604800, unit: 's', doc: 'cap of the exponential backoff (delay doubles, with jitter)' },
  { path: 'retry.maxAge', type: 'int', default: 432000, min: 60, max: 31536000, unit: 's', doc: 'give up on mail older than this (5 days)' },
  { path: 'failedRetryInterval', type: 'int', default: 3600, min: 0, max: 31536000, unit: 's', doc: 're-attempt failed mail whose last error was temporary; 0 = off' },
  { path: 'retention.deliveredDays', type: 'int', default: 7, min: 0, max: 36500, doc: 'delete delivered messages after this many days; 0 = keep' },
  { path: 'minFreeDiskMb', type: 'int', default: 512, min: 0, max: 100000000, doc: 'below this, new mail gets `452` and health is `error`' },
  { path: 'logLevel', type: 'string', default: 'info', values: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], doc: 'pino level' },
];

export interface Config {
  smtpHost: string;
  smtpPort: number;
  serverName: string;
  defaultUsername: string;
  defaultPassword: string;
  forwardSMTP: boolean;
  forwardHost: string;
  forwardPort: number;
  forwardUsername: string;
  forwardPassword: string;
  forwardSSL: boolean;
  forwardRequireTLS: boolean;
  batchSize: number;
  batchDelay: number;
  continueOnError: boolean;
  workerCount: number;
  queueSize: number;
  inFlowDelay: number;
  processingTimeout: number;
  enableHealthCheck: boolean;
  healthCheckHost: string;
  healthCheckPort: number;
  rateLimits: {
    enabled: boolean;
    maxPerHour: number;
    maxPerDay: number;
    globalMaxPerHour: number;
    globalMaxPerDay: number;
  };
  security: {
    allowLocalOnly: boolean;
    allowedNetworks: string[];
    requireAuth: boolean;
    logAllEmails: boolean;
    adminToken: string;
  };
  tls: { cert: string; key: string };
  databasePath: string;
  emailsDir: string;
  maxMessageSize: number;
  spoolAfter: number;
  maxRecipients: number;
  maxConnections: number;
  retry: { maxAttempts: number; initialDelay: number; maxDelay: number; maxAge: number };
  failedRetryInterval: number;
  retention: { deliveredDays: number };
  minFreeDiskMb: number;
  logLevel: string;
}

/** `rateLimits.maxPerHour` → `RATE_LIMITS_MAX_PER_HOUR`. */
export function envName(path: string): string {
  return path
    .split('.')
    .map((part) => part.replace(/([a-z0-9])([A-Z])/g, '$1_$2').replace(/([A-Z]+)([A-Z][a-z])/g, '$1_$2'))
    .join('_')
    .toUpperCase();
}

export function defaultConfig(): Config {
  const out: Record<string, unknown> = {};
  for (const key of CONFIG_KEYS) setPath(out, key.path, Array.isArray(key.default) ? [...key.default] : key.default);
  return out as unknown as Config;
}

export function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const parts = path.split('.');
  let node = target;
  for (const part of parts.slice(0, -1)) {
    if (typeof node[part] !== 'object' || node[part] === null) node[part] = {};
    node = node[part] as Record<string, unknown>;
  }
  node[parts[parts.length - 1]] = value;
}

export function getPath(source: unknown, path: string): unknown {
  let node = source;
  for (const part of path.split('.')) {
    if (typeof node !== 'object' || node === null) return undefined;
    node = (node as Record<string, unknown>)[part];
  }
  return node;
}

/** The values of the secret keys (passwords, the admin token), set or empty. */
export function configSecrets(config: Config): string[] {
  return CONFIG_KEYS.filter((key) => key.secret).map((key) => String(getPath(config, key.path) ?? ''));
}
