/** Byte units and power-of-two arithmetic shared by every layer. */
export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

/** Whether `n` is a positive power of two (any safe integer, not only 32-bit ones). */
export function isPowerOf2(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
