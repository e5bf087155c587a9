// Bounded waits of the shutdown: for in-flight attempts (the engine) and for upstream sessions
// still being answered (the pool). Each waited-for promise leaves its collection when it settles.
// And the end of an attempt's wait: its abort.

/** Resolves when `signal` aborts. */
export function whenAborted(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
}

/**
 * Waits until every task settled (including ones added meanwhile) or `ms` passed. `tasks` is a
 * Set of promises, or a Map whose values are, each removed from it once settled.
 */
export async function settleWithin(tasks: { readonly size: number; values(): Iterable<Promise<unknown>> }, ms: number): Promise<void> {
  // on the monotonic clock: a stepped wall clock must neither cut the wait short nor lengthen it
  const deadline = performance.now() + ms;
  while (tasks.size > 0 && performance.now() < deadline) {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, Math.max(1, deadline - performance.now()));
    });
    await Promise.race([Promise.allSettled([...tasks.values()]), timeout]);
    clearTimeout(timer);
  }
}
