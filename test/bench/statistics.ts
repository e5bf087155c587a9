// Summaries of repeated measurements: the benchmark quotes medians of repeated runs and ratios
// between figures measured in the same run, because the machine is shared and noisy.

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

export function median(values: readonly number[]): number {
  const finite = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (finite.length === 0) return Number.NaN;
  const mid = Math.floor(finite.length / 2);
  return finite.length % 2 ? finite[mid] : (finite[mid - 1] + finite[mid]) / 2;
}

/** The median of each field over repeated runs that measured the same figures. */
export function medians<T extends { [K in keyof T]: number }>(runs: readonly T[]): T {
  const keys = Object.keys(runs[0] ?? {}) as Array<keyof T>;
  return Object.fromEntries(keys.map((key) => [key, median(runs.map((run) => run[key]))])) as T;
}

export function ratio(numerator: number, denominator: number): number {
  return denominator > 0 && Number.isFinite(numerator) ? numerator / denominator : Number.NaN;
}

/** Least-squares slope of y over x (e.g. queue depth per second). */
export function slope(points: ReadonlyArray<readonly [number, number]>): number {
  const n = points.length;
  if (n < 2) return Number.NaN;
  const mx = points.reduce((s, [x]) => s + x, 0) / n;
  const my = points.reduce((s, [, y]) => s + y, 0) / n;
  let num = 0;
  let den = 0;
  for (const [x, y] of points) {
    num += (x - mx) * (y - my);
    den += (x - mx) ** 2;
  }
  return den === 0 ? Number.NaN : num / den;
}

/** Times `fn` in batches and returns the median cost of one call in microseconds. */
export function microsPerCall(fn: () => unknown, { batches = 21, perBatch = 200 } = {}): number {
  for (let i = 0; i < perBatch; i++) fn(); // warm the statement cache and the JIT
  const samples: number[] = [];
  for (let b = 0; b < batches; b++) {
    const start = process.hrtime.bigint();
    for (let i = 0; i < perBatch; i++) fn();
    samples.push(Number(process.hrtime.bigint() - start) / 1000 / perBatch);
  }
  return median(samples);
}
