// JSON.parse keeps the last of two values given for one key of an object, without a word: in a
// config file an operator who changed the first would see no effect, and in a request to the API
// a filter would quietly be narrowed to the second. Both refuse such a document instead.
import { visit } from 'jsonc-parser';

/**
 * How deep a document relayq reads may nest objects and arrays (its own are two or three levels
 * deep). repeatedKeys reads the text with a parser that recurses at every level, which a
 * document of a few thousand levels (20 KB) would take beyond the stack.
 */
export const MAX_NESTING = 32;

/** Whether a parsed JSON value nests objects or arrays deeper than `levels`. */
export function nestedDeeperThan(value: unknown, levels: number): boolean {
  if (typeof value !== 'object' || value === null) return false;
  return levels === 0 || Object.values(value).some((inner) => nestedDeeperThan(inner, levels - 1));
}

/**
 * The keys an object of the JSON document `text` gives twice, as dotted paths (`retry.maxAttempts`).
 * The document must not nest deeper than MAX_NESTING (see nestedDeeperThan).
 */
export function repeatedKeys(text: string): string[] {
  const seen: Set<string>[] = [];
  const repeated = new Set<string>();
  visit(text, {
    onObjectBegin: () => {
      seen.push(new Set());
    },
    onObjectEnd: () => {
      seen.pop();
    },
    onObjectProperty: (name, _offset, _length, _line, _column, parentPath) => {
      const keys = seen[seen.length - 1];
      if (keys.has(name)) repeated.add([...parentPath(), name].join('.'));
      keys.add(name);
    },
  });
  return [...repeated];
}
