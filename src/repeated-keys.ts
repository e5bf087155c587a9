// JSON.parse keeps the last of two values given for one key of an object, without a word: in a
// config file an operator who changed the first would see no effect, and in a request to the API
// a filter would quietly be narrowed to the second. Both refuse such a document instead.
import { visit } from 'jsonc-parser';

/** The keys an object of the JSON document `text` gives twice, as dotted paths (`retry.maxAttempts`). */
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
