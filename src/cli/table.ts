// Plain-text output for people: left-aligned columns padded to the widest cell, numbers
// right-aligned, and "key: value" blocks. Scripts use --json instead, so nothing here is parsed.
// Widths are terminal columns, not string lengths: an address may be internationalized
// (SMTPUTF8), and a CJK character or an emoji takes two columns, a combining accent none.
import stringWidth from 'string-width';
import { TERMINAL_UNSAFE } from '../terminal-unsafe.js';

export interface Column<Row> {
  header: string;
  value: (row: Row) => string | number | null | undefined;
  /** Right-align (numbers). */
  right?: boolean;
  /** Cut longer text to this many columns with an ellipsis. */
  max?: number;
}

export function formatTable<Row>(rows: readonly Row[], columns: readonly Column<Row>[]): string {
  const cells = rows.map((row) => columns.map((c) => cell(c.value(row), c.max)));
  const widths = columns.map((c, i) => Math.max(c.header.length, ...cells.map((r) => stringWidth(r[i]))));
  const line = (values: string[]) =>
    values
      .map((v, i) => {
        const fill = ' '.repeat(widths[i] - stringWidth(v));
        return columns[i].right ? fill + v : v + fill;
      })
      .join('  ')
      .trimEnd();
  return [line(columns.map((c) => c.header)), ...cells.map(line)].join('\n');
}

/** "key: value" lines with the values aligned. */
export function formatFields(fields: ReadonlyArray<[string, string | number | null | undefined]>): string {
  const width = Math.max(...fields.map(([k]) => k.length));
  return fields.map(([k, v]) => `${`${k}:`.padEnd(width + 1)} ${cell(v)}`.trimEnd()).join('\n');
}

const UNPRINTABLE = new RegExp(`[\\x00-\\x1f${TERMINAL_UNSAFE}]`, 'g');

function cell(value: string | number | null | undefined, max?: number): string {
  if (value === null || value === undefined || value === '') return '-';
  // Control characters from mail (a reply text, an address) must not break the layout or reach
  // the terminal: C0 and TERMINAL_UNSAFE.
  const text = String(value).replace(/[\r\n\t]+/g, ' ').replace(UNPRINTABLE, '?');
  return max && stringWidth(text) > max ? `${cut(text, max - 1)}…` : text;
}

const graphemes = new Intl.Segmenter();

/** The longest start of text that takes at most `width` columns, never half a character. */
function cut(text: string, width: number): string {
  let kept = '';
  let used = 0;
  for (const { segment } of graphemes.segment(text)) {
    used += stringWidth(segment);
    if (used > width) break;
    kept += segment;
  }
  return kept;
}

/** Milliseconds since the epoch as "2026-01-01 12:00:00Z" (UTC, like the logs). */
export function formatTime(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return '-';
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d{3}Z$/, 'Z');
}

/** A duration in the largest sensible unit: "45s", "12m", "3h", "2d". */
export function formatAge(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  // the unit of the figure as rounded: 1,048,575 bytes are 1.0 MiB, not 1024.0 KiB
  for (const [unit, size] of [['KiB', 1024], ['MiB', 1024 ** 2]] as const) {
    const shown = (n / size).toFixed(1);
    if (Number(shown) < 1024) return `${shown} ${unit}`;
  }
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}
