/**
 * The order in which QEMU prints the members of a JSON object: QEMU keeps objects in a QDict, a hash
 * table of 512 buckets, and writes them bucket by bucket, each bucket newest member first. Every QMP
 * reply and event, and every json: pseudo-filename, comes out in this order; scripts that compare
 * QEMU's output as text see it.
 */

const BUCKETS = 512;

/** QDict's hash of a member name (tdb_hash, on the name's UTF-8 bytes, in 32-bit arithmetic). */
function tdbHash(name: string): number {
  const bytes = Buffer.from(name, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) value = (value + ((bytes[i] << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

const bucketCache = new Map<string, number>();

function bucket(name: string): number {
  let b = bucketCache.get(name);
  if (b === undefined) {
    b = tdbHash(name) % BUCKETS;
    if (bucketCache.size < 10_000) bucketCache.set(name, b);
  }
  return b;
}

/** `keys` (in insertion order) in the order QEMU prints a QDict holding them. */
export function qdictOrder(keys: string[]): string[] {
  return keys
    .map((k, i) => ({ k, i, b: bucket(k) }))
    .sort((x, y) => x.b - y.b || y.i - x.i)
    .map((e) => e.k);
}
