// Names close to a mistyped one, for the "did you mean" of config errors and of the CLI's
// unknown options: the same but for case and punctuation, or a letter or two off.

/** A name without case and punctuation: `worker-count`, `WORKER_COUNT` and `workerCount` are one. */
const folded = (name: string) => name.toLowerCase().replace(/[^a-z0-9.]/g, '');

/** Edits (insert, delete, replace) from one name to the other. */
function editDistance(a: string, b: string): number {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const next = [i];
    for (let j = 1; j <= b.length; j++) next[j] = Math.min(row[j] + 1, next[j - 1] + 1, row[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    row = next;
  }
  return row[b.length];
}

/**
 * The known name an unknown one was likely meant to be: the same but for case and punctuation,
 * or one letter off (two in a name of nine letters or more; none in one of four or fewer); else,
 * for a name given outside any section, the one name of a section that ends as it does
 * (`security.requireAuth` for `requireAuth`). A name in a section is not sent to another: in
 * `tls.enabled` or `retention.maxAge`, the section says what it is about.
 */
export function closestName(name: string, names: readonly string[]): string | undefined {
  const wanted = folded(name);
  let best: { name: string; distance: number } | undefined;
  for (const known of names) {
    const limit = best?.distance ?? Math.min(3, Math.ceil(wanted.length / 4));
    const candidate = folded(known);
    // the section the name is in (`rateLimits` for `rateLimits.x`) is not what it meant
    if (wanted.startsWith(`${candidate}.`)) continue;
    // names that differ this much in length are this many edits apart at least
    if (Math.abs(candidate.length - wanted.length) >= limit) continue;
    const distance = editDistance(wanted, candidate);
    if (distance < limit) best = { name: known, distance };
  }
  return best?.name ?? (wanted.includes('.') ? undefined : inASection(wanted, names));
}

/** The one name of a section whose last part is `wanted` (folded), if one is. */
function inASection(wanted: string, names: readonly string[]): string | undefined {
  const found = names.filter((known) => folded(known).endsWith(`.${wanted}`));
  return found.length === 1 ? found[0] : undefined;
}

/** ` (did you mean <prefix><name>?)` for closestName's name; empty when there is none. */
export function didYouMean(name: string, names: readonly string[], prefix = ''): string {
  const best = closestName(name, names);
  return best ? ` (did you mean ${prefix}${best}?)` : '';
}
