import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { HBitmap } from '../../src/base/hbitmap.js';
import { rng } from '../support/random.js';

/** The naive model: one byte per chunk. */
class Model {
  readonly bits: Uint8Array;
  readonly gran: number;
  constructor(
    readonly size: number,
    g: number,
  ) {
    this.gran = 2 ** g;
    this.bits = new Uint8Array(Math.ceil(size / this.gran));
  }
  set(off: number, bytes: number): void {
    if (bytes === 0) return;
    const a = Math.floor(off / this.gran);
    const b = Math.floor((off + bytes - 1) / this.gran);
    this.bits.fill(1, a, b + 1);
  }
  reset(off: number, bytes: number): void {
    if (bytes === 0) return;
    this.bits.fill(0, off / this.gran, Math.floor((off + bytes - 1) / this.gran) + 1);
  }
  count(): number {
    let c = 0;
    for (const b of this.bits) c += b;
    return c * this.gran;
  }
  nextDirty(off: number, bytes?: number): number {
    const end = bytes === undefined || bytes > this.size - off ? this.size : off + bytes;
    for (let i = Math.floor(off / this.gran); i * this.gran < end; i++) if (this.bits[i]) return Math.max(off, i * this.gran);
    return -1;
  }
  nextZero(off: number, bytes?: number): number {
    const end = bytes === undefined || bytes > this.size - off ? this.size : off + bytes;
    for (let i = Math.floor(off / this.gran); i * this.gran < end; i++) if (!this.bits[i]) return Math.max(off, i * this.gran);
    return -1;
  }
  serialize(): Buffer {
    const buf = Buffer.alloc(Math.ceil(this.bits.length / 64) * 8);
    this.bits.forEach((b, i) => {
      if (b) buf[i >> 3] |= 1 << (i & 7);
    });
    return buf;
  }
}

function check(hb: HBitmap, m: Model, rand: () => number, msg: string): void {
  assert.equal(hb.count(), m.count(), `${msg}: count`);
  assert.deepEqual(hb.serialize(), m.serialize(), `${msg}: serialised`);
  for (let k = 0; k < 20; k++) {
    const off = Math.floor(rand() * m.size);
    const bytes = rand() < 0.3 ? undefined : Math.floor(rand() * (m.size - off + 1));
    assert.equal(hb.nextDirty(off, bytes), m.nextDirty(off, bytes), `${msg}: nextDirty(${off}, ${bytes})`);
    assert.equal(hb.nextZero(off, bytes), m.nextZero(off, bytes), `${msg}: nextZero(${off}, ${bytes})`);
    assert.equal(hb.get(off), m.bits[Math.floor(off / m.gran)] === 1, `${msg}: get(${off})`);
  }
  // Full iteration: areas cover exactly the set chunks.
  const fromAreas = new Uint8Array(m.bits.length);
  let prevEnd = -1;
  for (const a of hb.dirtyAreas()) {
    assert.ok(a.offset > prevEnd, `${msg}: areas are disjoint and maximal`);
    prevEnd = a.offset + a.bytes;
    fromAreas.fill(1, a.offset / m.gran, Math.ceil((a.offset + a.bytes) / m.gran));
  }
  assert.deepEqual(fromAreas, m.bits, `${msg}: dirtyAreas`);
  const it = hb.iter();
  const fromIter = new Uint8Array(m.bits.length);
  for (let off = it.next(); off >= 0; off = it.next()) fromIter[off / m.gran] = 1;
  assert.deepEqual(fromIter, m.bits, `${msg}: iterator`);
}

/** A random range, aligned to the granularity (as resets must be) unless `unaligned`. */
function randomRange(rand: () => number, size: number, gran: number, unaligned: boolean): [number, number] {
  const chunks = Math.ceil(size / gran);
  const kind = rand();
  let len = kind < 0.5 ? 1 + Math.floor(rand() * 4) : kind < 0.9 ? 1 + Math.floor(rand() * 200) : 1 + Math.floor(rand() * chunks);
  const first = Math.floor(rand() * chunks);
  len = Math.min(len, chunks - first);
  let off = first * gran;
  let end = Math.min(size, (first + len) * gran);
  if (unaligned) {
    off += Math.floor(rand() * Math.min(gran, end - off));
    end -= Math.floor(rand() * Math.min(gran, end - off));
  }
  return [off, end - off];
}

const CASES: Array<{ g: number; chunks: number }> = [
  { g: 9, chunks: 100 },
  { g: 9, chunks: 70001 },
  { g: 12, chunks: 40000 },
  { g: 16, chunks: 32768 * 3 + 17 },
  { g: 20, chunks: 1025 },
  { g: 31, chunks: 300 }, // 2 GiB granularity
];

for (const { g, chunks } of CASES) {
  test(`random set/reset against a model at granularity 2^${g}, ${chunks} chunks`, () => {
    const rand = rng(g * 1000 + chunks);
    // An unaligned size so that the last chunk is partial.
    const size = (chunks - 1) * 2 ** g + Math.max(1, Math.floor(2 ** g / 3));
    const hb = new HBitmap(size, g);
    const m = new Model(size, g);
    for (let round = 0; round < 300; round++) {
      const op = rand();
      if (op < 0.55) {
        const [off, len] = randomRange(rand, size, 2 ** g, true);
        hb.set(off, len);
        m.set(off, len);
      } else if (op < 0.97) {
        const [off, len] = randomRange(rand, size, 2 ** g, false);
        hb.reset(off, len);
        m.reset(off, len);
      } else if (op < 0.985) {
        hb.setAll();
        m.set(0, size);
      } else {
        hb.resetAll();
        m.reset(0, size);
      }
      if (round % 25 === 0) check(hb, m, rand, `round ${round}`);
    }
    check(hb, m, rand, 'end');
  });
}

test('merge with same and different granularities matches the model', () => {
  const rand = rng(7);
  const size = 40 * 2 ** 20 + 12345;
  for (const [gd, gs] of [
    [16, 16],
    [16, 12],
    [12, 16],
    [9, 20],
  ]) {
    const dst = new HBitmap(size, gd);
    const src = new HBitmap(size, gs);
    const md = new Model(size, gd);
    for (let i = 0; i < 60; i++) {
      const [o1, l1] = randomRange(rand, size, 2 ** gd, true);
      dst.set(o1, l1);
      md.set(o1, l1);
      const [o2, l2] = randomRange(rand, size, 2 ** gs, true);
      src.set(o2, l2);
      // The model of a merge: every dirty area of the source, set in the destination.
      md.set(Math.floor(o2 / 2 ** gs) * 2 ** gs, Math.min(size, Math.ceil((o2 + l2) / 2 ** gs) * 2 ** gs) - Math.floor(o2 / 2 ** gs) * 2 ** gs);
    }
    if (gd === gs && gd === 16) {
      // Exercise all-ones pages on the source side.
      src.setAll();
      md.set(0, size);
    }
    const before = src.serialize();
    dst.merge(src);
    assert.deepEqual(src.serialize(), before, 'source unchanged');
    check(dst, md, rand, `merge ${gs} into ${gd}`);
  }
  assert.throws(() => new HBitmap(100, 9).merge(new HBitmap(101, 9)), RangeError);
});

test('merge of sparse pages into partial pages keeps upper levels right', () => {
  const size = 2 ** 40;
  const a = new HBitmap(size, 16);
  const b = new HBitmap(size, 16);
  const m = new Model(size, 16);
  const rand = rng(99);
  for (let i = 0; i < 500; i++) {
    const off = Math.floor(rand() * 2 ** 24) * 2 ** 16;
    (i % 2 ? a : b).set(off, 1);
    m.set(off, 1);
  }
  a.merge(b);
  check(a, m, rand, 'merge sparse');
});

test('serialisation round trip, parts and qcow2 bit order', () => {
  const g = 16;
  const size = 3 * 2 ** 30 + 7 * 2 ** 16 + 100;
  const hb = new HBitmap(size, g);
  // qcow2 order: a write at 1 MiB (chunk 16) -> byte 2 = 0x01; chunks 48-49 -> byte 6 = 0x03.
  hb.set(2 ** 20, 4096);
  hb.set(3 * 2 ** 20, 100 * 1024);
  const ser = hb.serialize();
  assert.equal(ser.length, Math.ceil(Math.ceil(size / 2 ** g) / 64) * 8);
  assert.equal(ser[2], 0x01);
  assert.equal(ser[6], 0x03);
  hb.set(2 ** 31, 2 ** 30); // whole pages
  hb.set(size - 1, 1); // the partial last chunk
  const full = hb.serialize();
  const copy = new HBitmap(size, g);
  copy.deserialize(full);
  assert.deepEqual(copy.serialize(), full);
  assert.equal(copy.count(), hb.count());
  assert.equal(copy.sha256(), hb.sha256());
  assert.equal(copy.nextDirty(2 ** 20 + 65536), 3 * 2 ** 20);
  // In parts, aligned to 64 << g, with the upper levels rebuilt at the end.
  const align = hb.serializationAlign();
  const parts = new HBitmap(size, g);
  for (let start = 0; start < size; start += 5 * align) {
    const count = Math.min(5 * align, size - start);
    const buf = Buffer.alloc(hb.serializationSize(start, count));
    hb.serializePart(buf, start, count);
    if (buf.every((b) => b === 0)) parts.deserializeZeroes(start, count, false);
    else parts.deserializePart(buf, start, count, false);
  }
  parts.deserializeFinish();
  assert.deepEqual(parts.serialize(), full);
  assert.equal(parts.count(), hb.count());
  assert.equal(parts.nextDirty(0), 2 ** 20);
  assert.throws(() => hb.serializationSize(align / 2, align), RangeError);
  // Stray bits past the end in a serialised buffer are ignored.
  const tiny = new HBitmap(3 * 512, 9);
  tiny.deserialize(Buffer.from([0xff, 0, 0, 0, 0, 0, 0, 0]));
  assert.equal(tiny.count(), 3 * 512);
});

test('sha256 is over ceil(bits/64) little-endian words', () => {
  // 64 MiB at 64 KiB: 1024 bits = 128 bytes.
  const hb = new HBitmap(64 * 2 ** 20, 16);
  const empty = createHash('sha256').update(Buffer.alloc(128)).digest('hex');
  assert.equal(hb.sha256(), empty);
  hb.set(0, 65536);
  hb.set(64 * 65536 + 1, 1);
  const buf = Buffer.alloc(128);
  buf[0] = 1;
  buf[8] = 1;
  assert.equal(hb.sha256(), createHash('sha256').update(buf).digest('hex'));
  // 1 bit of 33: one 8-byte word.
  const one = new HBitmap(33 * 512, 9);
  one.set(32 * 512, 512);
  assert.equal(one.sha256(), createHash('sha256').update(Buffer.from([0, 0, 0, 0, 1, 0, 0, 0])).digest('hex'));
});

test('truncate grows clean and shrinks dropping bits', () => {
  const g = 12;
  let size = 10 * 2 ** 20;
  const hb = new HBitmap(size, g);
  const rand = rng(5);
  hb.set(0, size);
  size = 300 * 2 ** 20 + 5;
  hb.truncate(size);
  let m = new Model(size, g);
  m.set(0, 10 * 2 ** 20);
  check(hb, m, rand, 'grown');
  hb.set(200 * 2 ** 20, 4096);
  m.set(200 * 2 ** 20, 4096);
  size = 5 * 2 ** 20 + 4097;
  hb.truncate(size);
  m = new Model(size, g);
  m.set(0, size);
  check(hb, m, rand, 'shrunk');
  hb.truncate(0);
  assert.equal(hb.count(), 0);
  assert.equal(hb.nextDirty(0), -1);
  hb.truncate(2 ** 20);
  assert.equal(hb.count(), 0);
});

test('status, nextDirtyArea with limits, clone and swap', () => {
  const hb = new HBitmap(2 ** 20, 12);
  hb.set(8192, 3 * 4096);
  assert.deepEqual(hb.status(0, 2 ** 20), { dirty: false, bytes: 8192 });
  assert.deepEqual(hb.status(8192, 2 ** 20 - 8192), { dirty: true, bytes: 12288 });
  assert.deepEqual(hb.nextDirtyArea(0, 2 ** 20, 4096), { offset: 8192, bytes: 4096 });
  assert.deepEqual(hb.nextDirtyArea(9000, 12000), { offset: 9000, bytes: 3000 });
  assert.equal(hb.nextDirtyArea(20480), undefined);
  const c = hb.clone();
  c.reset(8192, 4096);
  assert.equal(hb.count(), 12288);
  assert.equal(c.count(), 8192);
  const other = new HBitmap(2 ** 20, 12);
  other.swapContents(hb);
  assert.equal(hb.count(), 0);
  assert.equal(other.count(), 12288);
  assert.throws(() => hb.reset(100, 4096), RangeError);
  assert.throws(() => hb.set(2 ** 20, 1), RangeError);
});

test('a sparse and a full 64 TiB bitmap stay small', () => {
  const size = 64 * 2 ** 40;
  const hb = new HBitmap(size, 16);
  assert.ok(hb.memoryUsage() < 1 << 20, `empty: ${hb.memoryUsage()}`);
  for (let i = 0; i < 1000; i++) hb.set(i * 2 ** 36, 65536);
  assert.equal(hb.count(), 1000 * 65536);
  assert.ok(hb.memoryUsage() < 16 << 20, `sparse: ${hb.memoryUsage()}`);
  assert.equal(hb.nextDirty(2 ** 36 + 1), 2 ** 36 + 1);
  assert.equal(hb.nextDirty(2 ** 36 + 65536), 2 * 2 ** 36);
  hb.setAll();
  assert.equal(hb.count(), size);
  assert.ok(hb.memoryUsage() < 1 << 20, `full: ${hb.memoryUsage()}`);
  assert.equal(hb.nextZero(0), -1);
  hb.reset(2 ** 40, 65536);
  assert.equal(hb.nextZero(0), 2 ** 40);
  assert.equal(hb.count(), size - 65536);
});
