/** `1 message`, `2 messages`: a number with its noun (a regular plural). */
export function count(n: number, noun: string): string {
  return `${n} ${noun}${n === 1 ? '' : 's'}`;
}
