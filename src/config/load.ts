// Builds the effective configuration from defaults, a JSON file, the environment and flags
// (later wins). loadConfig reads no file and changes nothing: given the file's text, argv and env
// it depends only on this host's name and interface addresses (serverName's default; whether
// forwardSMTP would reach relayq's own listener). loadConfigFromSources finds and reads the file. Errors are returned, all of them at once, each naming the key and
// where the bad value came from.
import fs from 'node:fs';
import os from 'node:os';
import net from 'node:net';
import { isAbsolute, resolve } from 'node:path';
import { clientFilter, hostPort, isLoopback, parseCidr } from '../access-control.js';
import { holdsSecret } from '../logger.js';
import { MAX_NESTING, nestedDeeperThan, repeatedKeys } from '../repeated-keys.js';
import { physicalPath, readRootsFile } from '../root-guard.js';
import { closestName, didYouMean } from './names.js';
import { CONFIG_KEYS, type Config, configSecrets, defaultConfig, envName, getPath, type KeyDef, PEM_OR_LINES, setPath } from './schema.js';

export type Source = 'file' | 'env' | 'flag';

export interface ConfigError {
  key: string;
  source: Source | 'config';
  /** The other sources of the values a check of several keys involves, after `source`. */
  alsoFrom?: Source[];
  message: string;
}

export interface ConfigFile {
  path: string;
  /** Raw file text; parse errors are reported as config errors. */
  text: string;
  /** The permission bits of what was read, when it is a regular file (not a pipe, `--config <(…)`). */
  mode?: number;
}

/**
 * `unread`: errors in keys the caller said it does not read (`reads`), as warnings; their keys
 * keep their defaults.
 */
export type LoadResult = { ok: true; config: Config; warnings: string[]; unread: string[] } | { ok: false; errors: ConfigError[] };

const KEYS_BY_PATH = new Map(CONFIG_KEYS.map((k) => [k.path, k]));
/** The objects that group keys in the file (`rateLimits`, `tls`, …). */
const SECTIONS = new Set(CONFIG_KEYS.filter((k) => k.path.includes('.')).map((k) => k.path.split('.')[0]));

/** Every name a file may use: the keys, and the objects that hold nested ones (`rateLimits`). */
const FILE_NAMES = [...new Set(CONFIG_KEYS.flatMap((k) => k.path.split('.').map((_, i, parts) => parts.slice(0, i + 1).join('.'))))];
/** Every flag's name: `--config` and the keys. */
const FLAG_NAMES = ['config', ...KEYS_BY_PATH.keys()];
/** Every environment variable relayq reads: RELAYQ_CONFIG and one per key. */
const ENV_NAMES = ['RELAYQ_CONFIG', ...CONFIG_KEYS.map((k) => envName(k.path))];

/**
 * A flag whose value is never shown and may start with `--`: a secret key's, or an unknown flag
 * that may be one mistyped (`--defaultPasword`, `--forward-pass`): its value is as secret.
 */
function secretFlag(name: string): boolean {
  const key = KEYS_BY_PATH.get(name) ?? KEYS_BY_PATH.get(closestName(name, FLAG_NAMES) ?? '');
  return key?.secret === true || (!KEYS_BY_PATH.has(name) && name !== 'config' && /pass|secret|token/i.test(name));
}

/** `--config` or `--<key path>`, with or without `=value`. */
function isFlagName(arg: string): boolean {
  const name = arg.slice(2).split('=')[0];
  return name === 'config' || KEYS_BY_PATH.has(name);
}

/**
 * Flags: `--config FILE` and `--<key path> VALUE` or `--<key path>=VALUE`, e.g. `--rateLimits.enabled=true`.
 * A value does not start with `--`, so `--smtpPort --defaultPassword x` (an unset `$PORT`) is
 * "--smtpPort needs a value", and a boolean alone is true (`--forwardSMTP --forwardHost h`); a
 * password or token may, unless it is another known flag. What is reported names flags, never
 * values: a mistyped `--defaultPasword=...` or `--defaultPasword ...` stays secret.
 */
export function parseFlags(argv: readonly string[]): { configPath?: string; values: Map<string, string>; unknown: string[]; missing: string[] } {
  const values = new Map<string, string>();
  const unknown: string[] = [];
  const missing: string[] = [];
  let configPath: string | undefined;
  /**
   * Set after a secret's value, or a stray `-defaultPassword` or `DEFAULT_PASSWORD`: the words up
   * to the next flag may be the rest of an unquoted secret, so they are named by it, not shown.
   */
  let hiding: { what: string; named: boolean } | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) {
      if (hiding) {
        if (!hiding.named) unknown.push(hiding.what);
        hiding.named = true;
        continue;
      }
      // `-defaultPassword=…` (one dash) or `DEFAULT_PASSWORD=…` (a variable's name) is shown without its value
      const eq = arg.indexOf('=');
      const name = eq >= 0 ? arg.slice(0, eq) : arg;
      const shown = eq >= 0 ? `${name}=…` : arg;
      unknown.push(shown);
      // its value, or the rest of it (`DEFAULT_PASSWORD=correct horse`), may follow
      if (secretFlag(name.replace(/^-+/, ''))) hiding = { what: `the words after ${shown}`, named: false };
      continue;
    }
    hiding = undefined;
    let name = arg.slice(2);
    let value: string | undefined;
    const eq = name.indexOf('=');
    if (eq >= 0) {
      value = name.slice(eq + 1);
      name = name.slice(0, eq);
    }
    const key = KEYS_BY_PATH.get(name);
    const next = argv[i + 1];
    // a password or token may start with `--`, and so does PEM text (refused as a path, unshown);
    // any other value, and another known flag, may not
    const mayTake = next !== undefined && (!next.startsWith('--') || next.startsWith('-----BEGIN') || (secretFlag(name) && !isFlagName(next)));
    if (value === undefined && mayTake) value = argv[++i];
    // a space in an unquoted password leaves its next words here, as do the lines of an unquoted
    // key's PEM text (`--tls.key $(cat key.pem)`)
    if (value !== undefined && (secretFlag(name) || value.startsWith('-----BEGIN'))) {
      hiding = { what: `the words after --${name}'s value (quote a value that has spaces)`, named: false };
    }
    const known = name === 'config' || key !== undefined;
    // a name is shown: not text that only starts with -- (a key's PEM, a password's second word)
    if (!known && (!/^[\w.-]*$/.test(name) || arg.startsWith('-----'))) {
      unknown.push('an argument that starts with -- but is no option name');
      if (arg.startsWith('-----')) hiding = { what: 'the words after it', named: false };
    } else if (!known) unknown.push(`--${name}`);
    else if (value === undefined && key?.type === 'bool') values.set(name, 'true');
    // an empty value is one for a string (an empty password), not for a number or a boolean
    else if (value === undefined || (value === '' && (name === 'config' || key?.type === 'int' || key?.type === 'bool'))) missing.push(name);
    else if (name === 'config') configPath = value;
    else values.set(name, value);
  }
  return { configPath, values, unknown, missing };
}

/**
 * JSON.parse's reason, and where in the file, without the text around the error that V8 quotes
 * (it may be a password: `"defaultPassword": 'secret'`). V8 gives a position for most errors; for
 * an unexpected token it quotes the 10 characters before and after it instead, which locate it.
 */
function describeJsonError(err: Error, text: string, padded = false): string {
  const at = (pos: number) => {
    const before = text.slice(0, pos).split('\n');
    return ` at line ${before.length}, column ${before[before.length - 1].length + 1}`;
  };
  // a comment, as many config formats take and JSON does not
  const comment = (pos: number) => (text.startsWith('//', pos) || text.startsWith('/*', pos) ? ' (JSON takes no comments)' : '');
  const positioned = /^((?:[^'"]|'[^']')*?) (in|after) JSON at position (\d+)/.exec(err.message);
  if (positioned) {
    const pos = Number(positioned[3]);
    return `${positioned[1]}${positioned[2] === 'after' ? ' after the object' : ''}${at(pos)}${comment(pos)}`;
  }
  if (/^Unexpected end of JSON input/.test(err.message)) return 'unexpected end of the file';
  const token = /^Unexpected token '(.{1,2}?)', (\.\.\.)?"(.*)"(\.\.\.)? is not valid JSON$/s.exec(err.message);
  if (!token) return 'syntax error';
  const [, char, lead, context, trail] = token;
  if (!lead && !trail && !padded) {
    // V8 quotes a text of under 21 characters whole, which gives no position; spaces after it
    // (JSON ignores them, and they do not move the error) make it quote the ten characters on
    // each side of the error instead
    const spaced = text + ' '.repeat(32);
    try {
      JSON.parse(spaced);
    } catch (again) {
      return describeJsonError(again as Error, spaced, true);
    }
  }
  let pos: number | undefined;
  if (lead && text.includes(context)) pos = text.indexOf(context) + 10;
  else if (!lead && trail) pos = context.length - 10;
  const hint = (): string => {
    // True, FALSE, Null: JSON's words are lower case (in double quotes, a string a boolean key
    // refuses); one of them as written is out of place (a colon or comma missing before it)
    const word = pos === undefined ? undefined : /^\p{L}+/u.exec(text.slice(pos))?.[0];
    if (word !== undefined && /^(true|false|null)$/i.test(word)) return word === word.toLowerCase() ? '' : ' (JSON writes true, false and null in lower case)';
    if (/^['\p{L}]/u.test(char)) return ' (strings must be in double quotes)';
    return pos === undefined ? '' : comment(pos);
  };
  return `unexpected character${pos === undefined ? '' : at(pos)}${hint()}`;
}

/** Which config file to read: `--config`, else RELAYQ_CONFIG, else ./config.json if it exists. */
function findConfigFile(argv: readonly string[], env: NodeJS.ProcessEnv): string | undefined {
  const { configPath } = parseFlags(argv);
  if (configPath !== undefined) return configPath;
  // set but empty (`RELAYQ_CONFIG=${UNSET}`) is an error of loadConfig's, not a fallback
  if (env.RELAYQ_CONFIG !== undefined) return env.RELAYQ_CONFIG;
  const local = `${process.cwd()}/config.json`;
  // a name there is the file meant, even a link to nothing: read, it fails with the reason, rather
  // than the relay start on the defaults
  return fs.lstatSync(local, { throwIfNoEntry: false }) ? local : undefined;
}

/** Reads the file chosen by findConfigFile; a missing explicit file is reported by loadConfig. */
export function readConfigFile(path: string | undefined): ConfigFile | undefined | { path: string; error: string } {
  if (!path) return undefined;
  try {
    const { bytes, stat } = readRootsFile(path);
    // without a UTF-8 byte order mark, which some editors write and JSON.parse refuses
    return { path, text: bytes.toString('utf8').replace(/^\uFEFF/, ''), mode: stat.isFile() ? stat.mode & 0o7777 : undefined };
  } catch (err) {
    // a relative path is read from the working directory, which `npm start` sets to the package's
    const from = isAbsolute(path) ? '' : ` (looked for from ${process.cwd()})`;
    return { path, error: `${(err as Error).message}${from}` };
  }
}

export function loadConfig(
  argv: readonly string[],
  env: NodeJS.ProcessEnv,
  file?: ConfigFile | { path: string; error: string },
  reads?: ReadonlySet<string>,
): LoadResult {
  const config = defaultConfig() as unknown as Record<string, unknown>;
  const errors: ConfigError[] = [];
  /** Where each key's value came from; keys not in it have their default. */
  const origins = new Map<string, Source>();

  if (file && 'error' in file) {
    errors.push({ key: 'config', source: 'file', message: `cannot read ${file.path}: ${file.error}` });
  } else if (file) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(file.text);
    } catch (err) {
      errors.push({ key: 'config', source: 'file', message: `${file.path} is not valid JSON: ${describeJsonError(err as Error, file.text)}` });
    }
    if (parsed !== undefined) {
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
        errors.push({ key: 'config', source: 'file', message: `${file.path} must hold a JSON object` });
      } else if (nestedDeeperThan(parsed, MAX_NESTING)) {
        errors.push({ key: 'config', source: 'file', message: `${file.path} nests objects or arrays more than ${MAX_NESTING} levels deep` });
      } else {
        applyFileObject(parsed as Record<string, unknown>, '', config, errors, origins);
        for (const key of repeatedKeys(file.text)) {
          errors.push({ key, source: 'file', message: `${key}: given more than once in the file; keep one (JSON would take the last without a word)` });
        }
      }
    }
  }

  /** A value given as text (environment, flag): parsed for its key, and set or refused. */
  const applyText = (key: KeyDef, raw: string, source: 'env' | 'flag', label: string) => {
    const value = parseString(key, raw);
    if ('error' in value) return errors.push({ key: key.path, source, message: `${label}: ${value.error}` });
    setPath(config, key.path, value.value);
    origins.set(key.path, source);
  };
  for (const key of CONFIG_KEYS) {
    const raw = env[envName(key.path)];
    // the variable as the operator set it, and the key it sets
    if (raw !== undefined) applyText(key, raw, 'env', `${envName(key.path)} (${key.path})`);
  }
  const warnings = mistypedEnvNames(env);

  const flags = parseFlags(argv);
  if (env.RELAYQ_CONFIG === '' && flags.configPath === undefined) {
    errors.push({ key: 'RELAYQ_CONFIG', source: 'env', message: 'RELAYQ_CONFIG is empty: set it to the config file\'s path, or unset it to read ./config.json' });
  }
  for (const arg of flags.unknown) {
    const message = arg.startsWith('--') ? `unknown option ${arg}${didYouMean(arg.slice(2), FLAG_NAMES, '--')}` : `unexpected argument: ${arg}`;
    errors.push({ key: arg, source: 'flag', message });
  }
  for (const name of flags.missing) errors.push({ key: name, source: 'flag', message: `--${name} needs a value` });
  for (const [path, raw] of flags.values) applyText(KEYS_BY_PATH.get(path) as KeyDef, raw, 'flag', `--${path}`);
  // as of a config file that every user may read (exposedSecretsWarning)
  const secretFlags = CONFIG_KEYS.filter((k) => k.secret && origins.get(k.path) === 'flag' && getPath(config, k.path)).map((k) => `--${k.path}`);
  if (secretFlags.length > 0) {
    const it = secretFlags.length === 1 ? 'it' : 'them';
    warnings.push(`${secretFlags.join(', ')} on the command line: every user of this machine may read ${it} there (ps); give ${it} in the environment or the config file`);
  }

  // A bad value that a later source replaced is not used: a warning, so that a flag can stand in
  // for a bad variable (and a variable for a bad line of the file) while it is fixed.
  const rank = { file: 0, env: 1, flag: 2, config: -1 } as const;
  const overridden = (e: ConfigError) => {
    const origin = origins.get(e.key);
    return origin !== undefined && rank[origin] > rank[e.source];
  };
  for (const e of errors.filter(overridden)) {
    warnings.push(`${e.source === 'file' && file ? `${file.path}: ` : ''}${e.message} (not used: ${origins.get(e.key) === 'flag' ? `--${e.key}` : envName(e.key)} replaces it)`);
  }
  errors.splice(0, errors.length, ...errors.filter((e) => !overridden(e)));

  const typed = config as unknown as Config;
  // Checked on the values that were valid; a combination that involves a key whose own value was
  // already refused is left out (the default standing in for it would only confuse), and so is one
  // with a key at its default when the file could not be read (the file may set it).
  const unjudged = new Set(errors.map((e) => e.key));
  if (unjudged.has('config')) for (const key of CONFIG_KEYS) if (!origins.has(key.path)) unjudged.add(key.path);
  checkCombinations(typed, origins, unjudged, errors, warnings);
  // A command that reads a few keys (the CLI's) is not kept from its work by another one's bad
  // value, as Postfix's postqueue is not by a main.cf parameter it does not use. A name the file
  // misspells may be one the command reads, unless it is in a section that holds none of those.
  const unreadKey = (e: ConfigError) => {
    if (reads === undefined || reads.has(e.key)) return false;
    if (KEYS_BY_PATH.has(e.key)) return true;
    const section = e.key.split('.')[0];
    return SECTIONS.has(section) && ![...reads].some((k) => k.startsWith(`${section}.`));
  };
  // stopped by one it reads, the command lists them all, as serve does
  if (errors.some((e) => !unreadKey(e))) return { ok: false, errors };
  return { ok: true, config: typed, warnings, unread: errors.map((e) => formatErrors([e], file?.path)) };
}

/**
 * The environment holds every other program's variables too, so a name relayq does not read is no
 * error. One that is relayq's but for a letter or its underscores (`WORKER_CONT`,
 * `HEALTHCHECK_PORT`) was likely meant for it and is ignored: that gets a warning.
 */
export function mistypedEnvNames(env: NodeJS.ProcessEnv): string[] {
  const warnings: string[] = [];
  for (const name of Object.keys(env)) {
    if (ENV_NAMES.includes(name)) continue;
    const guess = didYouMean(name, ENV_NAMES);
    if (guess) warnings.push(`${name}: not an environment variable relayq reads, so it is ignored${guess}`);
  }
  return warnings;
}

function applyFileObject(
  obj: Record<string, unknown>,
  prefix: string,
  config: Record<string, unknown>,
  errors: ConfigError[],
  origins: Map<string, Source>,
) {
  for (const [name, value] of Object.entries(obj)) {
    const path = prefix ? `${prefix}.${name}` : name;
    // the file nests: {"security": {"requireAuth": false}}, not {"security.requireAuth": false}
    const key = name.includes('.') ? undefined : KEYS_BY_PATH.get(path);
    if (key) {
      const checked = checkValue(key, value);
      if ('error' in checked) errors.push({ key: path, source: 'file', message: `${path}: ${checked.error}` });
      else {
        setPath(config, path, checked.value);
        origins.set(path, 'file');
      }
    } else if (CONFIG_KEYS.some((k) => k.path.startsWith(`${path}.`))) {
      if (typeof value === 'object' && value !== null && !Array.isArray(value)) {
        applyFileObject(value as Record<string, unknown>, path, config, errors, origins);
      } else {
        errors.push({ key: path, source: 'file', message: `${path}: must be an object` });
      }
    } else {
      const advice = KEYS_BY_PATH.has(path) ? ` (write it nested: {"${path.split('.').join('": {"')}": …})` : didYouMean(path, FILE_NAMES);
      errors.push({ key: path, source: 'file', message: `${path}: unknown key${advice}` });
    }
  }
}

type Checked = { value: unknown } | { error: string };

/**
 * A refused value as an error shows it: a password before a host (`smtp://user:secret@host`,
 * `user:secret@host`) masked, all of it up to the last `@`, which may be in the password too.
 */
function withoutPassword(value: string): string {
  return value.replace(/^((?:[a-z][a-z0-9+.-]*:\/\/)?[^:@/\s]*:).*@/i, '$1***@');
}

function checkValue(key: KeyDef, value: unknown): Checked {
  switch (key.type) {
    case 'string':
      if (typeof value !== 'string') return { error: 'must be a string' };
      // a choice is taken in any case and with spaces around it (LOG_LEVEL=" Info "), as booleans are
      if (key.values) {
        const chosen = key.values.find((v) => v === value.trim().toLowerCase());
        return chosen === undefined ? { error: `must be one of ${key.values.join(', ')}, got ${JSON.stringify(value)}` } : { value: chosen };
      }
      if (key.pattern && !key.pattern.match.test(value)) {
        const shown = key.secret || PEM_OR_LINES.test(value) ? '' : `, got ${JSON.stringify(withoutPassword(value))}`;
        return { error: `must be ${key.pattern.what}${shown}` };
      }
      return { value };
    case 'bool':
      return typeof value === 'boolean' ? { value } : { error: 'must be true or false' };
    case 'int':
      if (typeof value !== 'number' || !Number.isInteger(value)) {
        // a value written with a unit is shown, with what it would be in the key's
        const hint = unitHint(key, value);
        return { error: `${integerIn(key)}${hint && `, got ${JSON.stringify(value)}${hint}`}` };
      }
      return inRange(key, value);
    case 'list':
      if (!Array.isArray(value) || value.some((v) => typeof v !== 'string')) return { error: 'must be a list of strings' };
      return { value };
  }
}

function parseString(key: KeyDef, raw: string): Checked {
  switch (key.type) {
    case 'string':
      return checkValue(key, raw);
    case 'bool': {
      const v = raw.trim().toLowerCase();
      if (['true', '1', 'yes'].includes(v)) return { value: true };
      if (['false', '0', 'no'].includes(v)) return { value: false };
      return { error: `must be true/false/1/0/yes/no, got "${raw}"` };
    }
    case 'int':
      if (!/^-?\d+$/.test(raw.trim())) return { error: `${integerIn(key)}, got "${raw}"${unitHint(key, raw)}` };
      return inRange(key, Number(raw.trim()), raw);
    case 'list':
      return {
        value: raw
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean),
      };
  }
}

const UNIT_WORDS: Record<string, string> = { ms: 'milliseconds', s: 'seconds', bytes: 'bytes' };
const MS_PER: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };
const BYTES_PER: Record<string, number> = { k: 1024, m: 1024 ** 2, g: 1024 ** 3 };

function integerIn(key: KeyDef): string {
  return key.unit ? `must be an integer number of ${UNIT_WORDS[key.unit] ?? key.unit}` : 'must be an integer';
}

/**
 * A value written with a unit, a time as in Postfix's main.cf (`5d`, `1s`) or a size in binary units
 * (`25M`, `25MiB`: 25 × 1024²), in the key's own unit:
 * what it would be, when it is a whole number of it.
 */
function inUnit(key: KeyDef, text: string): number | undefined {
  const m = /^\s*(\d+)\s*([a-z]+)\s*$/i.exec(text);
  if (!m || !key.unit) return undefined;
  const suffix = m[2].toLowerCase();
  const ms = Number(m[1]) * (MS_PER[suffix] ?? Number.NaN);
  const n = key.unit === 'bytes' ? Number(m[1]) * (BYTES_PER[suffix.replace(/i?b$/, '')] ?? Number.NaN) : key.unit === 's' ? ms / 1000 : key.unit === 'ms' ? ms : Number.NaN;
  return Number.isInteger(n) ? n : undefined;
}

function unitHint(key: KeyDef, value: unknown): string {
  const n = typeof value === 'string' ? inUnit(key, value) : undefined;
  return n === undefined ? '' : ` (${String(value).trim()} is ${n})`;
}

function inRange(key: KeyDef, n: number, text = String(n)): Checked {
  if (key.min !== undefined && n < key.min) return { error: `must be at least ${key.min}, got ${text}` };
  if (key.max !== undefined && n > key.max) return { error: `must be at most ${key.max}, got ${text}` };
  return { value: n };
}

/**
 * Checks that involve several keys. Each error names the key to change, and says where the
 * values involved came from (an environment variable by its name); its source is that of the
 * first of them set anywhere, and the others follow in `alsoFrom`.
 */
function checkCombinations(c: Config, origins: ReadonlyMap<string, Source>, unjudged: ReadonlySet<string>, errors: ConfigError[], warnings: string[]) {
  const fail = (key: string, involved: string[], message: string) => {
    // a key is refused with the object that holds it (`tls` given twice refuses tls.cert too)
    if (involved.some((k) => unjudged.has(k) || unjudged.has(k.slice(0, k.lastIndexOf('.'))))) return;
    const sources = [...new Set(involved.flatMap((k) => origins.get(k) ?? []))];
    const origin = (k: string) => {
      const source = origins.get(k);
      if (source === undefined) return 'by default';
      return source === 'env' ? `from env ${envName(k)}` : `from ${source}`;
    };
    const from = involved.map((k) => `${k} ${origin(k)}`).join(', ');
    const [source = 'config', ...alsoFrom] = sources;
    errors.push({ key, source, ...(alsoFrom.length > 0 ? { alsoFrom } : {}), message: `${message} [${from}]` });
  };
  if (c.forwardSMTP && !c.forwardHost) {
    fail('forwardHost', ['forwardSMTP', 'forwardHost'], 'forwardHost is required when forwardSMTP is true');
  }
  /** Two keys given both or neither: the error names the one missing. */
  const together = (a: string, b: string, hint = '') => {
    const aSet = getPath(c, a) !== '';
    if (aSet !== (getPath(c, b) !== '')) fail(aSet ? b : a, [a, b], `${a} and ${b} must be set together${hint}`);
  };
  // one without the other would log in with an empty password, or drop the one given
  if (c.forwardSMTP) together('forwardUsername', 'forwardPassword', ' (leave both empty for no upstream AUTH)');
  // one without the other turns SMTP AUTH off (an unset variable in a compose file, say)
  together('defaultUsername', 'defaultPassword', ' (leave both empty for no SMTP AUTH)');
  if (c.forwardSMTP && c.forwardPort === c.smtpPort && reaches(c.forwardHost, c.smtpHost)) {
    fail(
      'forwardPort',
      ['forwardHost', 'forwardPort', 'smtpHost', 'smtpPort'],
      `forwardHost:forwardPort ${hostPort(c.forwardHost, c.forwardPort)} is relayq's own SMTP listener: every message would go round in a loop`,
    );
  }
  if (c.enableHealthCheck && c.smtpPort !== 0 && c.smtpPort === c.healthCheckPort && clash(c.healthCheckHost, c.smtpHost)) {
    fail('healthCheckPort', ['smtpPort', 'healthCheckPort'], 'smtpPort and healthCheckPort must differ: SMTP and the HTTP API cannot listen on one port');
  }
  together('tls.cert', 'tls.key');
  if (c.rateLimits.maxPerHour > c.rateLimits.maxPerDay) {
    fail('rateLimits.maxPerHour', ['rateLimits.maxPerHour', 'rateLimits.maxPerDay'], 'rateLimits.maxPerHour must not exceed rateLimits.maxPerDay');
  }
  if (c.rateLimits.globalMaxPerHour > c.rateLimits.globalMaxPerDay) {
    fail(
      'rateLimits.globalMaxPerHour',
      ['rateLimits.globalMaxPerHour', 'rateLimits.globalMaxPerDay'],
      'rateLimits.globalMaxPerHour must not exceed rateLimits.globalMaxPerDay',
    );
  }
  // Set on purpose above the global limit, a per-sender limit never applies: all senders together stop first.
  // (With the limits off, none does.)
  for (const [sender, all] of [
    ['maxPerHour', 'globalMaxPerHour'],
    ['maxPerDay', 'globalMaxPerDay'],
  ] as const) {
    if (c.rateLimits.enabled && origins.has(`rateLimits.${sender}`) && c.rateLimits[sender] > c.rateLimits[all]) {
      warnings.push(
        `rateLimits.${sender} ${c.rateLimits[sender]} is above rateLimits.${all} ${c.rateLimits[all]}: all senders together reach the global limit first, so the per-sender one never applies`,
      );
    }
  }
  if (c.retry.initialDelay > c.retry.maxDelay) {
    fail('retry.initialDelay', ['retry.initialDelay', 'retry.maxDelay'], 'retry.initialDelay must not exceed retry.maxDelay');
  }
  if (c.inFlowDelay > 0 && c.inFlowDelay <= 10) {
    // Postfix's in_flow_delay is in seconds (1s by default, at most 10s); this key is in ms
    warnings.push(
      `inFlowDelay is in milliseconds: ${c.inFlowDelay} ms hardly slows intake while delivery is behind; Postfix's in_flow_delay = 1s is inFlowDelay 1000`,
    );
  }
  if (c.failedRetryInterval > 0 && c.queueSize > 0 && c.queueSize < 4) {
    // it puts failed mail back only into room under half of queueSize and of the pacing backlog
    warnings.push(
      `failedRetryInterval puts failed mail back only while less than half of queueSize is in use: with queueSize ${c.queueSize} that is never; retry failed mail by hand (relayq retry --failed) or raise queueSize to 4 or more`,
    );
  }
  if (/(^|\.)example(\.(com|net|org))?\.?$/i.test(c.serverName)) {
    // config.example.json's placeholder, copied and left as it was
    warnings.push(
      `serverName ${c.serverName} is a name reserved for examples (RFC 2606): every Received: header and the EHLO to the upstream carry it; set it to this host's name`,
    );
  }
  if (c.forwardSMTP && !c.serverName.includes('.') && !c.serverName.startsWith('[')) {
    // the default is the host's name, which is often a bare one; Postfix would add its mydomain
    warnings.push(
      `serverName ${c.serverName} is not a fully qualified domain name: it is the EHLO name relayq sends to the upstream, and an upstream that requires one (Postfix's reject_non_fqdn_helo_hostname) fails every message for good; set serverName to this host's full name`,
    );
  }
  checkAccessPolicy(c, fail, warnings);
}

/** Below this length a password that non-loopback clients may log in with is a warning. */
const MIN_EXPOSED_PASSWORD = 12;

/** Who may send: never everyone without AUTH (an open relay), and AUTH only where it can work. */
function checkAccessPolicy(c: Config, fail: (key: string, involved: string[], message: string) => void, warnings: string[]) {
  for (const cidr of c.security.allowedNetworks) {
    const parsed = parseCidr(cidr);
    if (!parsed) {
      fail('security.allowedNetworks', ['security.allowedNetworks'], `security.allowedNetworks: "${cidr}" is not a CIDR (e.g. 10.0.0.0/8)`);
    } else if (parsed.hostBits) {
      // as Postfix warns of mynetworks: a host's address with a network's prefix length admits the whole network
      warnings.push(
        `security.allowedNetworks: "${cidr}" has host bits set: it admits all of ${parsed.network}/${parsed.bits}, not ${parsed.address} alone`,
      );
    }
  }
  // who may connect when allowLocalOnly is off
  const admits = clientFilter({ allowLocalOnly: false, allowedNetworks: c.security.allowedNetworks });
  const noCredentials = !c.defaultUsername || !c.defaultPassword;
  if (c.security.requireAuth && noCredentials) {
    if (c.security.allowLocalOnly) {
      warnings.push(
        'security.requireAuth is on but defaultUsername/defaultPassword are not set: accepting mail from loopback clients without AUTH',
      );
    } else {
      fail(
        'defaultUsername',
        ['security.allowLocalOnly', 'security.requireAuth', 'defaultUsername', 'defaultPassword'],
        'security.requireAuth with security.allowLocalOnly=false needs defaultUsername and defaultPassword ' +
          '(set DEFAULT_USERNAME and DEFAULT_PASSWORD, or set security.allowLocalOnly=true); relayq never runs as an open relay',
      );
    }
  }
  // guessed over the network (the slow-down is per address and locks no one out); adminToken must
  // be 16 characters, but a password may be one an application already has
  if (c.security.requireAuth && !noCredentials && !c.security.allowLocalOnly && [...c.defaultPassword].length < MIN_EXPOSED_PASSWORD) {
    warnings.push(
      `defaultPassword is shorter than ${MIN_EXPOSED_PASSWORD} characters, and clients other than loopback may log in with it ` +
        '(security.allowLocalOnly=false): at about two guesses a second from each address, a short one is found; use a long random one (openssl rand -hex 16)',
    );
  }
  if (c.security.requireAuth && !noCredentials && !c.security.allowLocalOnly && !c.tls.cert) {
    // AUTH in plain text is for loopback clients only (538 5.7.11 to others): with no STARTTLS a
    // remote client can never authenticate, and without AUTH it gets 530
    const loopbackAllowed = admits('127.0.0.1') || admits('::1');
    warnings.push(
      'security.requireAuth with security.allowLocalOnly=false and no tls.cert/tls.key: clients other than loopback cannot authenticate ' +
        `(AUTH needs STARTTLS) and so cannot send${loopbackAllowed ? '' : ', and security.allowedNetworks does not list loopback: no client can send'}; ` +
        'set tls.cert and tls.key, or security.requireAuth=false with security.allowedNetworks',
    );
  }
  // a list that lets in every address (0.0.0.0/0, ::/0, two halves, ::ffff:0:0/96, 2000::/3), or
  // a large part of them, is as good as none
  const anyClient = c.security.allowedNetworks.length === 0 || admitsQuarter(c.security.allowedNetworks);
  if (!c.security.requireAuth && !c.security.allowLocalOnly && anyClient) {
    fail(
      'security.allowedNetworks',
      ['security.requireAuth', 'security.allowLocalOnly', 'security.allowedNetworks'],
      'security.requireAuth=false with security.allowLocalOnly=false and security.allowedNetworks empty or open to a quarter or more ' +
        'of the IPv4 addresses or of the routed IPv6 ones (2000::/3) would be an open relay; list the networks that may send, or turn security.requireAuth on',
    );
  }
  if (c.security.allowLocalOnly && c.security.allowedNetworks.length > 0) {
    fail(
      'security.allowedNetworks',
      ['security.allowLocalOnly', 'security.allowedNetworks'],
      'security.allowedNetworks applies only with security.allowLocalOnly=false (with it on, only loopback clients may connect); ' +
        'set security.allowLocalOnly=false to use the list, or leave it empty',
    );
  }
}

const EVERY_INTERFACE = new Set(['0.0.0.0', '::']);

/** The IPv4 addresses (as IPv6 writes them, ::ffff:0:0/96) and the routed IPv6 ones (2000::/3). */
const ADDRESS_SPACES = [
  { first: 0xffff_0000_0000n, size: 1n << 32n },
  { first: 0x2n << 124n, size: 1n << 125n },
];

interface Block {
  first: bigint;
  size: bigint;
}

/**
 * Whether the networks together admit a quarter or more of the IPv4 addresses or of the routed
 * IPv6 ones: however a large network is cut into small ones, its pieces add up. A private network
 * (10.0.0.0/8 is a 256th of IPv4) is far below.
 */
function admitsQuarter(cidrs: readonly string[]): boolean {
  const blocks = cidrs.flatMap((cidr): Block[] => {
    const parsed = parseCidr(cidr);
    if (!parsed) return [];
    // an IPv4 network as the IPv4-mapped IPv6 one, which admits the same clients
    if (parsed.family === 4) return [{ first: 0xffff_0000_0000n + parsed.first, size: 1n << BigInt(32 - parsed.bits) }];
    return [{ first: parsed.first, size: 1n << BigInt(128 - parsed.bits) }];
  });
  const within = (inner: Block, outer: Block) => outer.first <= inner.first && inner.first + inner.size <= outer.first + outer.size;
  return ADDRESS_SPACES.some((space) => {
    if (blocks.some((b) => within(space, b))) return true;
    // Two networks are either apart or one inside the other: in the order of their first
    // address, the larger first, a network that starts inside the one before is inside it.
    const inside = blocks.filter((b) => within(b, space)).sort((a, b) => (a.first === b.first ? (a.size > b.size ? -1 : 1) : a.first < b.first ? -1 : 1));
    let admitted = 0n;
    let end = space.first;
    for (const b of inside) {
      if (b.first < end) continue;
      admitted += b.size;
      end = b.first + b.size;
    }
    return admitted * 4n >= space.size;
  });
}

/**
 * Whether connecting to `host` reaches a listener on `listenHost` (the same port assumed): the
 * same host (however written: `LOCALHOST.`, `::ffff:127.0.0.1`), `localhost` and the loopback
 * address it stands for, or this machine (its loopback addresses, its name, the addresses of its
 * interfaces) for a listener on every interface (on every IPv4 one, for 0.0.0.0). Another
 * loopback address (127.0.0.2) reaches another listener. Connecting to 0.0.0.0 or :: reaches this
 * machine's 127.0.0.1 or ::1.
 */
function reaches(host: string, listenHost: string): boolean {
  const [h, l] = [host, listenHost].map(canonicalHost);
  if (h === l) return true;
  if (EVERY_INTERFACE.has(h)) return reaches(h === '::' ? '::1' : '127.0.0.1', listenHost);
  // this machine, whatever its addresses
  if (EVERY_INTERFACE.has(l)) {
    // 0.0.0.0 takes IPv4 alone: an IPv6 address (::1, this machine's own) reaches another listener
    if (l === '0.0.0.0' && net.isIPv6(h)) return false;
    return h === 'localhost' || isLoopback(h) || h === os.hostname().toLowerCase() || interfaceAddresses().has(h);
  }
  // localhost is 127.0.0.1 or ::1, whichever it resolves to first
  const loopback = (x: string) => x === 'localhost' || x === '127.0.0.1' || x === '::1';
  return loopback(h) && loopback(l) && (h === 'localhost' || l === 'localhost');
}

/**
 * A host in one spelling: a name in lower case without its final dot, an IPv6 address as URLs
 * write it (`0:0:0:0:0:0:0:1` is ::1) without its zone (`fe80::1%eth0` is an address of this
 * machine's when fe80::1 is), and an IPv4-mapped one as its IPv4 address (`::ffff:7f00:1` and
 * `::ffff:127.0.0.1` are 127.0.0.1).
 */
function canonicalHost(host: string): string {
  const bare = host.toLowerCase().replace(/\.$/, '');
  if (!net.isIPv6(bare)) return bare;
  const address = bare.replace(/%.*$/, '');
  let canonical: string;
  try {
    canonical = new URL(`http://[${address}]/`).hostname.slice(1, -1);
  } catch {
    return address; // an address Node takes and a URL does not
  }
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(canonical);
  if (!mapped) return canonical;
  const [high, low] = [mapped[1], mapped[2]].map((group) => Number.parseInt(group, 16));
  return [high >> 8, high & 255, low >> 8, low & 255].join('.');
}

/** The addresses of this machine's interfaces, as canonicalHost writes them. */
function interfaceAddresses(): Set<string> {
  return new Set(Object.values(os.networkInterfaces()).flatMap((addresses) => (addresses ?? []).map((a) => canonicalHost(a.address))));
}

/**
 * Whether two listeners on one port would refuse each other: one address, however written, or
 * every interface (`::` takes both families, as Linux binds it; 0.0.0.0 every IPv4 address, so
 * that a listener on ::1 is apart from it).
 */
function clash(a: string, b: string): boolean {
  const [x, y] = [canonicalHost(a), canonicalHost(b)];
  if (x === '::' || y === '::') return true;
  if (x === '0.0.0.0' || y === '0.0.0.0') return !net.isIPv6(x === '0.0.0.0' ? y : x);
  return reaches(a, b);
}

/**
 * The configuration `serve` and the CLI run with: the file findConfigFile chooses, the
 * environment and the flags. A failure is formatErrors' text, naming the file that was read.
 */
export function loadConfigFromSources(
  argv: readonly string[],
  env: NodeJS.ProcessEnv,
  reads?: ReadonlySet<string>,
): { ok: true; config: Config; warnings: string[]; unread: string[]; file: string | null } | { ok: false; message: string } {
  const file = readConfigFile(findConfigFile(argv, env));
  const loaded = loadConfig(argv, env, file, reads);
  if (loaded.ok) {
    if (!file || 'error' in file) return { ...loaded, file: null };
    const exposed = exposedSecretsWarning(file);
    // the file that was read: through its links, as the kernel opened it (a pipe by its name)
    const read = file.mode === undefined ? resolve(file.path) : physicalPath(file.path);
    return { ...loaded, warnings: exposed ? [...loaded.warnings, exposed] : loaded.warnings, file: read };
  }
  // a mistyped variable's name (FORWARD_HOSTT) may be why a key is missing: said with the errors
  const warnings = mistypedEnvNames(env).map((w) => `\nwarning: ${w}`);
  return { ok: false, message: formatErrors(loaded.errors, file?.path) + warnings.join('') };
}

/**
 * A config file that sets a password or token and that every user of the machine may read (Postfix
 * asks the same of its sasl_passwd). A group that may read it is taken as meant (root:relayq 0640).
 * Judged on what was read, by its mode then: a pipe (`--config <(…)`) has none to judge.
 */
export function exposedSecretsWarning(file: ConfigFile): string | undefined {
  if (file.mode === undefined || (file.mode & 0o004) === 0) return undefined;
  let values: Record<string, unknown>;
  try {
    values = JSON.parse(file.text) as Record<string, unknown>;
  } catch {
    return undefined; // reported as a config error
  }
  const set = CONFIG_KEYS.filter((key) => key.secret && getPath(values, key.path)).map((key) => key.path);
  if (set.length === 0) return undefined;
  return `${file.path} sets ${set.join(', ')}, and every user of this machine may read it (mode 0${(file.mode & 0o777).toString(8)}): chmod o-r it, or give the secrets in the environment`;
}

/** A path of the config in an error: a relative one with where it was looked for (the working directory, not the config file's). */
export function asGiven(key: string, given: string): string {
  return isAbsolute(given) ? given : `${given} (${physicalPath(given)}: a relative ${key} is taken from the working directory)`;
}

/**
 * Copy of the config with every secret replaced, for logging. A user name that is the password
 * too (an API token some providers take as both) goes with it.
 */
export function redactConfig(config: Config): Config {
  const copy = structuredClone(config) as unknown as Record<string, unknown>;
  for (const key of CONFIG_KEYS) {
    if (key.secret && getPath(copy, key.path)) setPath(copy, key.path, '[redacted]');
  }
  // a user name that holds a secret (its password, as a provider's API token may be both, or another)
  const secrets = configSecrets(config);
  for (const user of ['forwardUsername', 'defaultUsername'] as const) {
    if (holdsSecret(config[user], secrets)) Object.assign(copy, { [user]: '[redacted]' });
  }
  return copy as unknown as Config;
}

/** One line per error; an error of the file names it (`./config.json` or `$RELAYQ_CONFIG` may have been read). */
export function formatErrors(errors: readonly ConfigError[], file?: string): string {
  // an error about the whole file (key 'config') names it already
  const label = (e: ConfigError, source: Source | 'config') => (source === 'file' && file && e.key !== 'config' ? `file ${file}` : source);
  return errors.map((e) => `config error (${[e.source, ...(e.alsoFrom ?? [])].map((s) => label(e, s)).join(', ')}): ${e.message}`).join('\n');
}
