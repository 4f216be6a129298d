/** Seeded randomness, so that a failing test can be replayed with its seed. */

/**
 * splitmix32's finaliser: spreads a seed over all 32 bits, so that neighbouring seeds (a test's
 * seed0, seed0 + 1, …) start xorshift32 from unrelated states. Unscrambled, xorshift32's first
 * outputs for seeds n and n+1 are nearly equal (its first step is almost linear in small seeds).
 */
function scramble(seed: number): number {
  let z = (seed + 0x9e3779b9) >>> 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
  return (z ^ (z >>> 16)) >>> 0;
}

/** xorshift32 from a scrambled seed: a small seeded generator so failures can be replayed. */
export function rng(seed: number): () => number {
  let s = scramble(seed >>> 0) || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

export function randomBytes(rand: () => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  // Runs of a repeated byte keep failures readable; a per-op random seed byte makes every op distinct.
  let v = Math.floor(rand() * 256);
  for (let i = 0; i < n; i++) {
    if (i % 97 === 0) v = Math.floor(rand() * 256);
    b[i] = v;
  }
  return b;
}
