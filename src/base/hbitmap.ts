/**
 * HBitmap: a hierarchical bitmap as QEMU's util/hbitmap.c describes it (reference §3), items are bytes.
 *
 * Each bit of the bottom level stands for 2^granularityShift bytes. Every level above summarises the one
 * below: bit N of level k+1 is set iff word N of level k is non-zero, so searches for a set bit skip
 * empty regions in O(levels). Words are 32 bits (plain int32 arithmetic is what V8 does fast; BigInt
 * is not), so the fan-out is 32 and a 2^30-bit bitmap (64 TiB at 64 KiB) has 7 levels.
 *
 * Memory: every level is split into 4 KiB pages (1024 words, 32768 bits) that are allocated on the
 * first set bit and freed when their last bit is cleared. A page whose every bit is set is replaced by
 * one shared read-only all-ones page (copied again on the first reset). So an empty or a completely
 * dirty bitmap costs only its page tables whatever the disk size, and a sparse one costs 4 KiB per
 * touched 32768 chunks (2 GiB of disk at 64 KiB granularity) instead of a flat 128 MiB for 64 TiB.
 * Each page keeps its population count, which gives an O(1) total count, emptiness, and lets
 * nextZero skip full pages.
 *
 * Serialised form (qcow2 bitmap data, dirty-bitmap migration, x-debug sha256): the bottom level as a
 * linear bit sequence, bit n in byte n/8 at position n%8 (least significant first), i.e. little-endian
 * 64-bit words as QEMU's `unsigned long` array on x86-64. Chunks align to 64 << granularityShift bytes.
 */
import { createHash } from 'node:crypto';
import { endianness } from 'node:os';
import { tracer } from '../trace/trace.js';

const WORD_BITS = 32;
const PAGE_WORDS = 1024;
const PAGE_BITS = PAGE_WORDS * WORD_BITS;
const PAGE_BYTES = PAGE_WORDS * 4;
/** The shared all-ones page. Never written: writers copy it first. */
const ONES: Int32Array = new Int32Array(PAGE_WORDS).fill(-1);
const ZERO_BYTES = Buffer.alloc(PAGE_BYTES);
const ONES_BYTES = Buffer.alloc(PAGE_BYTES, 0xff);
const LITTLE_ENDIAN = endianness() === 'LE';

const traceSet = tracer.point('hbitmap_set');
const traceReset = tracer.point('hbitmap_reset');

interface Level {
  /** Number of bits in this level. */
  bits: number;
  /** Pages of PAGE_WORDS words; undefined = all zero; ONES = all one. */
  pages: Array<Int32Array | undefined>;
  /** Set bits per page. */
  popc: Int32Array;
}

function popcnt32(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  x = (x + (x >>> 4)) & 0x0f0f0f0f;
  return Math.imul(x, 0x01010101) >>> 24;
}

function ctz32(x: number): number {
  return 31 - Math.clz32(x & -x);
}

/** Mask of bits [lo, hi] (0..31 inclusive) of a word, as int32. */
function rangeMask(lo: number, hi: number): number {
  return (-1 << lo) & (-1 >>> (31 - hi));
}

function newLevel(bits: number): Level {
  const words = Math.ceil(bits / WORD_BITS);
  const npages = Math.ceil(words / PAGE_WORDS);
  return { bits, pages: new Array<Int32Array | undefined>(npages).fill(undefined), popc: new Int32Array(npages) };
}

/** Level sizes for a bottom level of `bits` bits: each level has ceil(bits/32) bits, up to a single bit. */
function levelSizes(bits: number): number[] {
  const sizes = [bits];
  let b = bits;
  while (b > 1) {
    b = Math.ceil(b / WORD_BITS);
    sizes.push(b);
  }
  return sizes;
}

export interface DirtyArea {
  /** First dirty byte (a multiple of the granularity, or the search start). */
  offset: number;
  bytes: number;
}

export class HBitmap {
  private origSize: number;
  /** Bits in the bottom level: ceil(origSize / gran). */
  private nbits: number;
  /** Bytes per bit: 2^granularityShift. */
  private gran: number;
  private levels: Level[];
  private countBits = 0;

  /**
   * @param size number of items (bytes) covered
   * @param granularityShift each bit covers 2^granularityShift items (0..62); DirtyBitmap's
   *   granularity is the byte count 2^granularityShift
   */
  constructor(
    size: number,
    readonly granularityShift: number,
  ) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`HBitmap: bad size ${size}`);
    if (!Number.isInteger(granularityShift) || granularityShift < 0 || granularityShift > 62) throw new RangeError(`HBitmap: bad granularity shift ${granularityShift}`);
    this.origSize = size;
    this.gran = 2 ** granularityShift;
    this.nbits = Math.ceil(size / this.gran);
    this.levels = levelSizes(this.nbits).map(newLevel);
  }

  /** Items (bytes) covered, as given to the constructor or truncate. */
  get size(): number {
    return this.origSize;
  }

  /** Bytes per bit. */
  get granularityBytes(): number {
    return this.gran;
  }

  /** Bits in the bottom level. */
  get bitCount(): number {
    return this.nbits;
  }

  /** Dirty items: set bits << granularityShift (a partial last chunk counts in full), as hbitmap_count. */
  count(): number {
    return this.countBits * this.gran;
  }

  // ---- word access ------------------------------------------------------------------------------

  private word(lv: number, wi: number): number {
    const pi = Math.floor(wi / PAGE_WORDS);
    const p = this.levels[lv].pages[pi];
    return p ? p[wi - pi * PAGE_WORDS] : 0;
  }

  /** Set bits [first, last] (inclusive) of level lv; returns whether a word went from zero to non-zero. */
  private setLevelRange(lv: number, first: number, last: number): boolean {
    const L = this.levels[lv];
    const w0 = Math.floor(first / WORD_BITS);
    const w1 = Math.floor(last / WORD_BITS);
    const pi0 = Math.floor(w0 / PAGE_WORDS);
    const pi1 = Math.floor(w1 / PAGE_WORDS);
    let changed = false;
    for (let pi = pi0; pi <= pi1; pi++) {
      let page = L.pages[pi];
      if (page === ONES) continue;
      const pageFirst = pi * PAGE_BITS;
      if (first <= pageFirst && last >= pageFirst + PAGE_BITS - 1) {
        const added = PAGE_BITS - L.popc[pi];
        if (lv === 0) this.countBits += added;
        L.popc[pi] = PAGE_BITS;
        L.pages[pi] = ONES;
        changed = true;
        continue;
      }
      if (!page) {
        page = new Int32Array(PAGE_WORDS);
        L.pages[pi] = page;
      }
      const base = pi * PAGE_WORDS;
      const a = pi === pi0 ? w0 - base : 0;
      const b = pi === pi1 ? w1 - base : PAGE_WORDS - 1;
      let added = 0;
      for (let w = a; w <= b; w++) {
        let mask = -1;
        if (w + base === w0) mask &= -1 << (first - w0 * WORD_BITS);
        if (w + base === w1) mask &= -1 >>> (31 - (last - w1 * WORD_BITS));
        const old = page[w];
        const nw = old | mask;
        if (nw !== old) {
          added += popcnt32(nw ^ old);
          if (old === 0) changed = true;
          page[w] = nw;
        }
      }
      L.popc[pi] += added;
      if (lv === 0) this.countBits += added;
      if (L.popc[pi] === PAGE_BITS) L.pages[pi] = ONES;
    }
    return changed;
  }

  /** Clear bits [first, last] (inclusive) of level lv. */
  private resetLevelRange(lv: number, first: number, last: number): void {
    const L = this.levels[lv];
    const w0 = Math.floor(first / WORD_BITS);
    const w1 = Math.floor(last / WORD_BITS);
    const pi0 = Math.floor(w0 / PAGE_WORDS);
    const pi1 = Math.floor(w1 / PAGE_WORDS);
    for (let pi = pi0; pi <= pi1; pi++) {
      let page = L.pages[pi];
      if (!page) continue;
      const pageFirst = pi * PAGE_BITS;
      if (first <= pageFirst && last >= pageFirst + PAGE_BITS - 1) {
        if (lv === 0) this.countBits -= L.popc[pi];
        L.popc[pi] = 0;
        L.pages[pi] = undefined;
        continue;
      }
      if (page === ONES) {
        page = new Int32Array(PAGE_WORDS).fill(-1);
        L.pages[pi] = page;
      }
      const base = pi * PAGE_WORDS;
      const a = pi === pi0 ? w0 - base : 0;
      const b = pi === pi1 ? w1 - base : PAGE_WORDS - 1;
      let removed = 0;
      for (let w = a; w <= b; w++) {
        let mask = -1;
        if (w + base === w0) mask &= -1 << (first - w0 * WORD_BITS);
        if (w + base === w1) mask &= -1 >>> (31 - (last - w1 * WORD_BITS));
        const old = page[w];
        const nw = old & ~mask;
        if (nw !== old) {
          removed += popcnt32(old ^ nw);
          page[w] = nw;
        }
      }
      L.popc[pi] -= removed;
      if (lv === 0) this.countBits -= removed;
      if (L.popc[pi] === 0) L.pages[pi] = undefined;
    }
  }

  /** Set bottom bits [first, last] and keep the upper levels in step. */
  private setBits(first: number, last: number): void {
    let lv = 0;
    while (this.setLevelRange(lv, first, last) && lv + 1 < this.levels.length) {
      first = Math.floor(first / WORD_BITS);
      last = Math.floor(last / WORD_BITS);
      lv++;
    }
  }

  /** Clear bottom bits [first, last] and keep the upper levels in step. */
  private resetBits(first: number, last: number): void {
    for (let lv = 0; ; lv++) {
      this.resetLevelRange(lv, first, last);
      if (lv + 1 >= this.levels.length) return;
      // Words wholly inside the range are now zero; the edge words may still hold bits outside it.
      const w0 = Math.floor(first / WORD_BITS);
      const w1 = Math.floor(last / WORD_BITS);
      first = this.word(lv, w0) !== 0 ? w0 + 1 : w0;
      last = this.word(lv, w1) !== 0 ? w1 - 1 : w1;
      if (first > last) return;
    }
  }

  // ---- public operations ------------------------------------------------------------------------

  private checkRange(offset: number, bytes: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0 || offset + bytes > this.origSize) {
      throw new RangeError(`HBitmap: range ${offset}+${bytes} outside 0..${this.origSize}`);
    }
  }

  /** Mark [offset, offset+bytes) dirty: every chunk it touches. O(bytes/2^g/32 + levels). */
  set(offset: number, bytes: number): void {
    this.checkRange(offset, bytes);
    if (bytes === 0) return;
    const first = Math.floor(offset / this.gran);
    const last = Math.floor((offset + bytes - 1) / this.gran);
    traceSet({ start: offset, count: bytes, sbit: first, ebit: last });
    this.setBits(first, last);
  }

  /**
   * Clear [offset, offset+bytes). As in QEMU, the range must be aligned to the granularity, except
   * that it may end at the end of the bitmap.
   */
  reset(offset: number, bytes: number): void {
    this.checkRange(offset, bytes);
    if (bytes === 0) return;
    if (offset % this.gran !== 0 || (bytes % this.gran !== 0 && offset + bytes !== this.origSize)) {
      throw new RangeError(`HBitmap: reset of ${offset}+${bytes} not aligned to ${this.gran}`);
    }
    const first = offset / this.gran;
    const last = Math.floor((offset + bytes - 1) / this.gran);
    traceReset({ start: offset, count: bytes, sbit: first, ebit: last });
    this.resetBits(first, last);
  }

  /** Mark everything dirty. */
  setAll(): void {
    if (this.nbits > 0) this.setBits(0, this.nbits - 1);
  }

  /** Clear everything: O(pages). */
  resetAll(): void {
    this.levels = levelSizes(this.nbits).map(newLevel);
    this.countBits = 0;
  }

  /** Whether the chunk holding byte `offset` is dirty. O(1). */
  get(offset: number): boolean {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset >= this.origSize) throw new RangeError(`HBitmap: offset ${offset} outside 0..${this.origSize}`);
    const bit = Math.floor(offset / this.gran);
    const wi = Math.floor(bit / WORD_BITS);
    return ((this.word(0, wi) >>> (bit - wi * WORD_BITS)) & 1) === 1;
  }

  /** First set bottom bit >= bit, or -1: climbs the levels past empty words, then descends. */
  private findNextSet(bit: number): number {
    if (bit >= this.nbits) return -1;
    const top = this.levels.length - 1;
    let lv = 0;
    let pos = bit;
    for (;;) {
      if (pos >= this.levels[lv].bits) return -1;
      const wi = Math.floor(pos / WORD_BITS);
      const w = this.word(lv, wi) & (-1 << (pos - wi * WORD_BITS));
      if (w !== 0) {
        pos = wi * WORD_BITS + ctz32(w);
        break;
      }
      if (lv === top) return -1;
      pos = wi + 1;
      lv++;
    }
    while (lv > 0) {
      lv--;
      pos = pos * WORD_BITS + ctz32(this.word(lv, pos));
    }
    return pos;
  }

  /** First clear bottom bit in [bit, end), or -1. Skips absent pages at once and full pages whole. */
  private findNextZero(bit: number, end: number): number {
    const L = this.levels[0];
    let pos = bit;
    while (pos < end) {
      const pi = Math.floor(pos / PAGE_BITS);
      const page = L.pages[pi];
      if (!page) return pos;
      if (page !== ONES) {
        const base = pi * PAGE_WORDS;
        let w = Math.floor(pos / WORD_BITS) - base;
        let bits = ~page[w] & (-1 << (pos - (base + w) * WORD_BITS));
        for (;;) {
          if (bits !== 0) {
            const r = (base + w) * WORD_BITS + ctz32(bits);
            return r < end ? r : -1;
          }
          if (++w >= PAGE_WORDS) break;
          bits = ~page[w];
        }
      }
      pos = (pi + 1) * PAGE_BITS;
    }
    return -1;
  }

  /** End (exclusive, in bits) of a search from byte `offset` over `bytes` (undefined = to the end). */
  private endBit(offset: number, bytes: number | undefined): { endByte: number; endBit: number } {
    const endByte = bytes === undefined || bytes > this.origSize - offset ? this.origSize : offset + bytes;
    return { endByte, endBit: Math.ceil(endByte / this.gran) };
  }

  /**
   * First dirty byte in [offset, offset+bytes) (to the end when bytes is undefined): the start of the
   * first dirty chunk, or `offset` itself when its chunk is dirty; -1 when none (hbitmap_next_dirty).
   */
  nextDirty(offset: number, bytes?: number): number {
    if (offset >= this.origSize || bytes === 0) return -1;
    const { endByte } = this.endBit(offset, bytes);
    const bit = this.findNextSet(Math.floor(offset / this.gran));
    if (bit < 0) return -1;
    const off = bit * this.gran;
    if (off >= endByte) return -1;
    return Math.max(offset, off);
  }

  /** First clean byte in [offset, offset+bytes), or -1 (hbitmap_next_zero). */
  nextZero(offset: number, bytes?: number): number {
    if (offset >= this.origSize || bytes === 0) return -1;
    const { endBit } = this.endBit(offset, bytes);
    const bit = this.findNextZero(Math.floor(offset / this.gran), endBit);
    if (bit < 0) return -1;
    return Math.max(offset, bit * this.gran);
  }

  /**
   * The next dirty run starting in [offset, end), clipped to `end` and to `maxBytes` (default: no
   * limit); undefined when there is none (hbitmap_next_dirty_area).
   */
  nextDirtyArea(offset: number, end: number = this.origSize, maxBytes: number = Number.MAX_SAFE_INTEGER): DirtyArea | undefined {
    end = Math.min(end, this.origSize);
    if (offset >= end || maxBytes <= 0) return undefined;
    const start = this.nextDirty(offset, end - offset);
    if (start < 0) return undefined;
    const limit = Math.min(end, start + maxBytes);
    const zero = this.nextZero(start, limit - start);
    return { offset: start, bytes: (zero < 0 ? limit : zero) - start };
  }

  /** Whether [offset, …) is dirty, and how many bytes (at most `bytes`) share that state (hbitmap_status). */
  status(offset: number, bytes: number): { dirty: boolean; bytes: number } {
    this.checkRange(offset, bytes);
    const dirty = this.get(offset);
    const next = dirty ? this.nextZero(offset, bytes) : this.nextDirty(offset, bytes);
    return { dirty, bytes: next < 0 ? bytes : next - offset };
  }

  /** Every dirty run in [start, end), each at most maxBytes long. Safe against concurrent changes. */
  *dirtyAreas(start = 0, end: number = this.origSize, maxBytes?: number): Generator<DirtyArea> {
    let pos = start;
    for (;;) {
      const a = this.nextDirtyArea(pos, end, maxBytes);
      if (!a) return;
      yield a;
      pos = a.offset + a.bytes;
    }
  }

  /** An HBitmapIter-style iterator over dirty chunks, starting at byte `first`. */
  iter(first = 0): HBitmapIter {
    return new HBitmapIter(this, first);
  }

  /** @internal for HBitmapIter: next set bit >= bit. */
  nextSetBit(bit: number): number {
    return this.findNextSet(bit);
  }

  // ---- merge, copy, truncate --------------------------------------------------------------------

  /** Whether `src` can be OR-ed into this bitmap (same size; granularity may differ). */
  canMerge(src: HBitmap): boolean {
    return src.origSize === this.origSize;
  }

  /**
   * OR `src` into this bitmap. Same granularity: page-wise OR of every level (an upper-level word of
   * a|b is non-zero iff it is in a or in b), O(allocated pages). Different granularity: set every dirty
   * area of src (a sparse merge).
   */
  merge(src: HBitmap): void {
    if (!this.canMerge(src)) throw new RangeError(`HBitmap: merge of size ${src.origSize} into size ${this.origSize}`);
    if (src === this || src.countBits === 0) return;
    if (src.gran !== this.gran) {
      for (const a of src.dirtyAreas()) this.set(a.offset, a.bytes);
      return;
    }
    for (let lv = 0; lv < this.levels.length; lv++) {
      const D = this.levels[lv];
      const S = src.levels[lv];
      for (let pi = 0; pi < S.pages.length; pi++) {
        const sp = S.pages[pi];
        if (!sp) continue;
        const dp = D.pages[pi];
        if (dp === ONES) continue;
        if (sp === ONES) {
          if (lv === 0) this.countBits += PAGE_BITS - D.popc[pi];
          D.pages[pi] = ONES;
          D.popc[pi] = PAGE_BITS;
          continue;
        }
        if (!dp) {
          D.pages[pi] = sp.slice();
          D.popc[pi] = S.popc[pi];
          if (lv === 0) this.countBits += S.popc[pi];
          continue;
        }
        let added = 0;
        for (let w = 0; w < PAGE_WORDS; w++) {
          const old = dp[w];
          const nw = old | sp[w];
          if (nw !== old) {
            added += popcnt32(nw ^ old);
            dp[w] = nw;
          }
        }
        D.popc[pi] += added;
        if (lv === 0) this.countBits += added;
        if (D.popc[pi] === PAGE_BITS) D.pages[pi] = ONES;
      }
    }
  }

  /** An independent copy (all-ones pages stay shared; they are copy-on-write). */
  clone(): HBitmap {
    const c = new HBitmap(this.origSize, this.granularityShift);
    c.levels = this.levels.map((L) => ({
      bits: L.bits,
      pages: L.pages.map((p) => (p && p !== ONES ? p.slice() : p)),
      popc: L.popc.slice(),
    }));
    c.countBits = this.countBits;
    return c;
  }

  /** Exchange contents with `other` (same size and granularity): used to back up and restore. */
  swapContents(other: HBitmap): void {
    if (other.origSize !== this.origSize || other.gran !== this.gran) throw new RangeError('HBitmap: swap of different shapes');
    [this.levels, other.levels] = [other.levels, this.levels];
    [this.countBits, other.countBits] = [other.countBits, this.countBits];
  }

  /** Grow (new chunks clean) or shrink (bits past the new end are dropped) to `size` items. */
  truncate(size: number): void {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`HBitmap: bad size ${size}`);
    if (size === this.origSize) return;
    const nbits = Math.ceil(size / this.gran);
    if (nbits < this.nbits) this.resetLevelRange(0, nbits, this.nbits - 1);
    const old = this.levels[0];
    const bottom = newLevel(nbits);
    for (let pi = 0; pi < bottom.pages.length && pi < old.pages.length; pi++) {
      bottom.pages[pi] = old.pages[pi];
      bottom.popc[pi] = old.popc[pi];
    }
    this.origSize = size;
    this.nbits = nbits;
    this.levels = levelSizes(nbits).map((b, i) => (i === 0 ? bottom : newLevel(b)));
    this.rebuildUpperLevels();
  }

  /** Recompute every level above the bottom one, and the count, from the bottom level. */
  private rebuildUpperLevels(): void {
    const sizes = levelSizes(this.nbits);
    for (let lv = 1; lv < this.levels.length; lv++) this.levels[lv] = newLevel(sizes[lv]);
    const B = this.levels[0];
    let count = 0;
    for (let pi = 0; pi < B.popc.length; pi++) count += B.popc[pi];
    this.countBits = count;
    for (let lv = 1; lv < this.levels.length; lv++) {
      const below = this.levels[lv - 1];
      for (let pi = 0; pi < below.pages.length; pi++) {
        const p = below.pages[pi];
        if (!p) continue;
        const base = pi * PAGE_WORDS;
        if (p === ONES) {
          this.setLevelRange(lv, base, base + PAGE_WORDS - 1);
          continue;
        }
        for (let w = 0; w < PAGE_WORDS; w++) {
          if (p[w] === 0) continue;
          // Runs of non-zero words become one range.
          let e = w;
          while (e + 1 < PAGE_WORDS && p[e + 1] !== 0) e++;
          this.setLevelRange(lv, base + w, base + e);
          w = e;
        }
      }
    }
  }

  // ---- serialisation ----------------------------------------------------------------------------

  /** Serialised chunks must start at (and, but for the last, be multiples of) this many items. */
  serializationAlign(): number {
    return 64 * this.gran;
  }

  private serializationChunk(start: number, count: number): { byteStart: number; byteLen: number } {
    const align = this.serializationAlign();
    if (start % align !== 0 || start < 0 || count < 0 || start + count > this.origSize) {
      throw new RangeError(`HBitmap: serialisation range ${start}+${count} not aligned to ${align}`);
    }
    if (count % align !== 0 && start + count !== this.origSize) {
      throw new RangeError(`HBitmap: serialisation count ${count} not aligned to ${align}`);
    }
    if (count === 0) return { byteStart: start / this.gran / 8, byteLen: 0 };
    const firstBit = start / this.gran;
    const lastBit = Math.floor((start + count - 1) / this.gran);
    const firstEl = firstBit / 64;
    const elCount = Math.floor(lastBit / 64) + 1 - firstEl;
    return { byteStart: firstEl * 8, byteLen: elCount * 8 };
  }

  /** Bytes that serialising [start, start+count) takes: whole 64-bit words (hbitmap_serialization_size). */
  serializationSize(start: number, count: number): number {
    return this.serializationChunk(start, count).byteLen;
  }

  /** Copy the bottom level for items [start, start+count) into `buf` (qcow2 / migration order). */
  serializePart(buf: Uint8Array, start: number, count: number): void {
    const { byteStart, byteLen } = this.serializationChunk(start, count);
    if (buf.length < byteLen) throw new RangeError(`HBitmap: serialisation buffer too small (${buf.length} < ${byteLen})`);
    const L = this.levels[0];
    const out = Buffer.from(buf.buffer, buf.byteOffset, byteLen);
    let done = 0;
    while (done < byteLen) {
      const b = byteStart + done;
      const pi = Math.floor(b / PAGE_BYTES);
      const inPage = b - pi * PAGE_BYTES;
      const n = Math.min(PAGE_BYTES - inPage, byteLen - done);
      const page = pi < L.pages.length ? L.pages[pi] : undefined;
      if (!page) out.fill(0, done, done + n);
      else if (page === ONES) out.fill(0xff, done, done + n);
      else Buffer.from(page.buffer, page.byteOffset + inPage, n).copy(out, done);
      done += n;
    }
    if (!LITTLE_ENDIAN) out.swap32();
  }

  /**
   * Load items [start, start+count) of the bottom level from `buf` (as serializePart wrote it).
   * With finish (the default) the upper levels are rebuilt; a caller loading many parts may pass
   * false and call deserializeFinish() once at the end, as in QEMU.
   */
  deserializePart(buf: Uint8Array, start: number, count: number, finish = true): void {
    const { byteStart, byteLen } = this.serializationChunk(start, count);
    if (buf.length < byteLen) throw new RangeError(`HBitmap: deserialisation buffer too small (${buf.length} < ${byteLen})`);
    const L = this.levels[0];
    const totalWords = Math.ceil(this.nbits / WORD_BITS);
    const tailBits = this.nbits % WORD_BITS;
    const dv = new DataView(buf.buffer, buf.byteOffset, byteLen);
    const w0 = byteStart / 4;
    const w1 = Math.min(totalWords, w0 + byteLen / 4); // exclusive
    for (let wi = w0; wi < w1; ) {
      const pi = Math.floor(wi / PAGE_WORDS);
      const base = pi * PAGE_WORDS;
      const end = Math.min(w1, base + PAGE_WORDS);
      let page = L.pages[pi];
      if (page === ONES) page = new Int32Array(PAGE_WORDS).fill(-1);
      else if (!page) page = new Int32Array(PAGE_WORDS);
      if (LITTLE_ENDIAN) {
        // The serialised bytes are the page's own little-endian bytes: one copy.
        const src = (wi - w0) * 4;
        new Uint8Array(page.buffer, page.byteOffset + (wi - base) * 4, (end - wi) * 4).set(buf.subarray(src, src + (end - wi) * 4));
        wi = end;
      } else {
        for (; wi < end; wi++) page[wi - base] = dv.getInt32((wi - w0) * 4, true);
      }
      if (end === totalWords && tailBits !== 0) page[totalWords - 1 - base] &= rangeMask(0, tailBits - 1);
      let pc = 0;
      for (let w = 0; w < PAGE_WORDS; w++) if (page[w] !== 0) pc += popcnt32(page[w]);
      L.popc[pi] = pc;
      L.pages[pi] = pc === 0 ? undefined : pc === PAGE_BITS ? ONES : page;
    }
    if (finish) this.deserializeFinish();
  }

  /** Clear items [start, start+count) of the bottom level (a chunk known to be all zeroes). */
  deserializeZeroes(start: number, count: number, finish = true): void {
    this.serializationChunk(start, count);
    if (count > 0) this.resetLevelRange(0, start / this.gran, Math.floor((start + count - 1) / this.gran));
    if (finish) this.deserializeFinish();
  }

  /** Rebuild the upper levels and the count after deserialising parts. */
  deserializeFinish(): void {
    this.rebuildUpperLevels();
  }

  /** The whole bottom level, ceil(bits/64)*8 bytes (what sha256 hashes; qcow2 stores its first ceil(bits/8)). */
  serialize(): Buffer {
    const buf = Buffer.alloc(this.serializationSize(0, this.origSize));
    this.serializePart(buf, 0, this.origSize);
    return buf;
  }

  /** Replace the contents with a serialised bottom level (at least ceil(bits/8) bytes). */
  deserialize(buf: Uint8Array): void {
    const need = this.serializationSize(0, this.origSize);
    let src = buf;
    if (buf.length < need) {
      if (buf.length < Math.ceil(this.nbits / 8)) throw new RangeError(`HBitmap: serialised bitmap too short (${buf.length} bytes)`);
      src = Buffer.alloc(need);
      Buffer.from(buf.buffer, buf.byteOffset, buf.length).copy(src);
    }
    this.resetAll();
    this.deserializePart(src, 0, this.origSize, true);
  }

  /**
   * The bottom level page by page, in serialised order, without building one buffer: all-zero and
   * all-one pages are yielded as shared constant buffers (do not modify them). Total length is
   * serializationSize(0, size).
   */
  *serializedChunks(): Generator<{ offset: number; data: Buffer; zero: boolean; ones: boolean }> {
    const total = this.serializationSize(0, this.origSize);
    const L = this.levels[0];
    for (let off = 0, pi = 0; off < total; off += PAGE_BYTES, pi++) {
      const n = Math.min(PAGE_BYTES, total - off);
      const page = L.pages[pi];
      if (!page) yield { offset: off, data: ZERO_BYTES.subarray(0, n), zero: true, ones: false };
      else if (page === ONES) yield { offset: off, data: ONES_BYTES.subarray(0, n), zero: false, ones: true };
      else {
        const b = Buffer.from(page.buffer, page.byteOffset, n);
        yield { offset: off, data: LITTLE_ENDIAN ? b : Buffer.from(b).swap32(), zero: false, ones: false };
      }
    }
  }

  /** SHA-256 (hex) of the bottom level as little-endian 64-bit words, as x-debug-block-dirty-bitmap-sha256. */
  sha256(): string {
    const h = createHash('sha256');
    for (const c of this.serializedChunks()) h.update(c.data);
    return h.digest('hex');
  }

  /** Bytes of page memory held (shared all-ones pages not counted) plus page tables. */
  memoryUsage(): number {
    let bytes = 0;
    for (const L of this.levels) {
      bytes += L.pages.length * 8 + L.popc.byteLength;
      for (const p of L.pages) if (p && p !== ONES) bytes += PAGE_BYTES;
    }
    return bytes;
  }
}

/**
 * Iterates the dirty chunks of an HBitmap (HBitmapIter): next() returns the byte offset of the next
 * dirty chunk, or -1. A concurrent reset is fine; a concurrent set behind the cursor is not seen.
 */
export class HBitmapIter {
  private bit: number;
  constructor(
    private readonly hb: HBitmap,
    first = 0,
  ) {
    this.bit = Math.floor(first / hb.granularityBytes);
  }

  next(): number {
    const b = this.hb.nextSetBit(this.bit);
    if (b < 0) {
      this.bit = this.hb.bitCount;
      return -1;
    }
    this.bit = b + 1;
    return b * this.hb.granularityBytes;
  }
}
