// Characters from mail that must not reach an operator's terminal as they are: DEL, the C1
// controls (U+009B is a CSI, which starts an escape sequence as ESC [ does), the bidirectional
// marks, overrides and isolates (which show an address reversed: `evil\u202emoc.elpmaxe`), and
// the line and paragraph separators. A character class body, for a RegExp; C0 controls are left
// to the caller (the log's JSON escapes them already; a table replaces them).
export const TERMINAL_UNSAFE = '\\x7f-\\x9f\\u061c\\u200e\\u200f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069';

const UNSAFE = new RegExp(`[${TERMINAL_UNSAFE}]`);
const UNSAFE_ALL = new RegExp(UNSAFE.source, 'g');

/**
 * JSON text (a log line, the CLI's --json) with the characters a client may put in a subject, an
 * address or a HELO name that a terminal would act on (`tail -f` of the log) written as JSON
 * escapes (`\u009b`): the same value to a JSON reader, plain ASCII to a terminal. JSON itself
 * escapes only the C0 controls.
 */
export function escapeTerminalUnsafe(line: string): string {
  return UNSAFE.test(line) ? line.replace(UNSAFE_ALL, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`) : line;
}
