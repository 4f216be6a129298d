/**
 * HBitmap on a 64 TiB disk at 64 KiB granularity (2^30 bits, a 128 MiB bottom level if flat): sparse
 * (random single-chunk writes) and dense (everything dirty, then random holes) bitmaps; timings of
 * set, reset, next-dirty iteration, count, merge, serialisation and sha256, and the page memory held.
 * There is no peer tool to compare with (QEMU's HBitmap is internal), so rows are absolute.
 * Runs alone as `node dist/bench/hbitmap.js`.
 */
import { pathToFileURL } from 'node:url';
import { HBitmap } from '../src/base/hbitmap.js';

export const title = 'HBitmap, 64 TiB at 64 KiB granularity (2^30 bits)';

const SIZE = 64 * 2 ** 40;
const G = 16;
const CHUNK = 2 ** G;
const CHUNKS = SIZE / CHUNK;

interface Row {
  name: string;
  ops: number;
  ms: number;
  'ns/op': number;
  'pages MiB': number;
  [k: string]: string | number;
}

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function time(rows: Row[], name: string, ops: number, hb: HBitmap, fn: () => void): void {
  const t0 = process.hrtime.bigint();
  fn();
  const ns = Number(process.hrtime.bigint() - t0);
  rows.push({ name, ops, ms: ns / 1e6, 'ns/op': Math.round(ns / ops), 'pages MiB': hb.memoryUsage() / 2 ** 20 });
}

export async function run(): Promise<Row[]> {
  const rows: Row[] = [];
  const N = 100_000;
  const rand = rng(42);
  const offsets = Array.from({ length: N }, () => Math.floor(rand() * CHUNKS) * CHUNK);

  // ---- sparse ----
  const sparse = new HBitmap(SIZE, G);
  time(rows, 'sparse: empty bitmap', 1, sparse, () => undefined);
  time(rows, 'sparse: set 1 chunk x100k (random)', N, sparse, () => {
    for (const o of offsets) sparse.set(o, CHUNK);
  });
  time(rows, 'sparse: set 4 KiB writes x100k (random, unaligned)', N, sparse, () => {
    for (const o of offsets) sparse.set(o + 12288, 4096);
  });
  time(rows, 'sparse: get x100k', N, sparse, () => {
    for (const o of offsets) sparse.get(o);
  });
  time(rows, 'sparse: count x1M', 1_000_000, sparse, () => {
    let c = 0;
    for (let i = 0; i < 1_000_000; i++) c += sparse.count();
    if (c < 0) throw new Error('unreachable');
  });
  let areas = 0;
  time(rows, 'sparse: iterate every dirty area', CHUNKS, sparse, () => {
    for (const a of sparse.dirtyAreas()) areas += a.bytes > 0 ? 1 : 0;
  });
  rows[rows.length - 1].name += ` (${areas} areas)`;
  time(rows, 'sparse: nextDirty from 100k random offsets', N, sparse, () => {
    for (const o of offsets) sparse.nextDirty(o);
  });
  const sparse2 = new HBitmap(SIZE, G);
  for (let i = 0; i < N; i++) sparse2.set(Math.floor(rand() * CHUNKS) * CHUNK, CHUNK);
  time(rows, 'sparse: merge same granularity', 1, sparse, () => sparse.merge(sparse2));
  const coarse = new HBitmap(SIZE, 20);
  for (let i = 0; i < N; i++) coarse.set(Math.floor(rand() * CHUNKS) * CHUNK, CHUNK);
  const target = sparse.clone();
  time(rows, 'sparse: merge from 1 MiB granularity (sparse merge)', 1, target, () => target.merge(coarse));
  time(rows, 'sparse: clone', 1, sparse, () => sparse.clone());
  time(rows, 'sparse: sha256 (streamed)', 1, sparse, () => sparse.sha256());
  let ser: Buffer = Buffer.alloc(0);
  time(rows, 'sparse: serialise (128 MiB buffer)', 1, sparse, () => {
    ser = sparse.serialize();
  });
  const back = new HBitmap(SIZE, G);
  time(rows, 'sparse: deserialise', 1, back, () => back.deserialize(ser));
  if (back.count() !== sparse.count()) throw new Error('round trip mismatch');
  time(rows, 'sparse: reset 1 chunk x100k', N, sparse, () => {
    for (const o of offsets) sparse.reset(o, CHUNK);
  });
  ser = Buffer.alloc(0);

  // ---- dense ----
  const dense = new HBitmap(SIZE, G);
  time(rows, 'dense: set all', 1, dense, () => dense.setAll());
  time(rows, 'dense: nextZero over a full bitmap', 1, dense, () => {
    if (dense.nextZero(0) !== -1) throw new Error('not full');
  });
  time(rows, 'dense: reset 1 chunk x100k (random holes)', N, dense, () => {
    for (const o of offsets) dense.reset(o, CHUNK);
  });
  let runs = 0;
  time(rows, 'dense: iterate dirty areas, 1 GiB max (mirror-like)', 1, dense, () => {
    for (const a of dense.dirtyAreas(0, SIZE, 2 ** 30)) runs += a.bytes > 0 ? 1 : 0;
  });
  rows[rows.length - 1].name += ` (${runs} areas)`;
  time(rows, 'dense: nextZero from 100k random offsets', N, dense, () => {
    for (const o of offsets) dense.nextZero(o);
  });
  const full = new HBitmap(SIZE, G);
  full.setAll();
  const d2 = dense.clone();
  time(rows, 'dense: merge full into holed', 1, d2, () => d2.merge(full));
  const d3 = new HBitmap(SIZE, G);
  time(rows, 'dense: merge holed into empty', 1, d3, () => d3.merge(dense));
  time(rows, 'dense: sha256 (streamed)', 1, dense, () => dense.sha256());
  time(rows, 'dense: serialise (128 MiB buffer)', 1, dense, () => {
    ser = dense.serialize();
  });
  const dback = new HBitmap(SIZE, G);
  time(rows, 'dense: deserialise', 1, dback, () => dback.deserialize(ser));
  if (dback.count() !== dense.count()) throw new Error('round trip mismatch');
  ser = Buffer.alloc(0);
  time(rows, 'dense: reset all', 1, dense, () => dense.resetAll());
  return rows;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  run()
    .then((rows) => {
      process.stdout.write(`${title}\n`);
      for (const r of rows) {
        process.stdout.write(`${r.name.padEnd(62)} ${r.ms.toFixed(2).padStart(10)} ms ${String(r['ns/op']).padStart(9)} ns/op ${r['pages MiB'].toFixed(2).padStart(8)} MiB\n`);
      }
    })
    .catch((err) => {
      process.stderr.write(`${String(err)}\n`);
      process.exit(1);
    });
}
