/** Seeded randomness, so that a failing test can be replayed with its seed. */

/** xorshift32: a small seeded generator so failures can be replayed. */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
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
