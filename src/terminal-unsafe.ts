// Characters from mail that must not reach an operator's terminal as they are: DEL, the C1
// controls (U+009B is a CSI, which starts an escape sequence as ESC [ does), the bidirectional
// marks, overrides and isolates (which show an address reversed: `evil\u202emoc.elpmaxe`), and
// the line and paragraph separators. A character class body, for a RegExp; C0 controls are left
// to the caller (the log's JSON escapes them already; a table replaces them).
export const TERMINAL_UNSAFE = '\\x7f-\\x9f\\u061c\\u200e\\u200f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069';
