/**
 * L1/L2 entry codecs, a bounded write-back cache of one-cluster metadata tables (L2 tables and refcount
 * blocks), and the metadata lock. Entries are handled as two 32-bit halves to stay in plain numbers.
 */
import type { BlockNode } from '../../node.js';

export const COPIED_HI = 0x80000000;
const COMPRESSED_HI = 0x40000000;
/** L1/L2 offset mask 0x00fffffffffffe00 split into halves; the other bits are flags and reserved bits. */
export const OFFSET_MASK_HI = 0x00ffffff;
export const OFFSET_MASK_LO = 0xfffffe00;
/** L2 standard reserved bits 0x3f000000000001fe. */
const L2_RES_HI = 0x3f000000;
const L2_RES_LO = 0x1fe;
/** L1 reserved bits 0x7f000000000001ff. */
const L1_RES_HI = 0x7f000000;
const L1_RES_LO = 0x1ff;

export type ClusterType = 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal' | 'compressed';

export interface L2Entry {
  type: ClusterType;
  /** Host offset of a normal/zero-alloc cluster, or the byte offset of compressed data. */
  offset: number;
  copied: boolean;
  /** Compressed: bytes of compressed data on disk (upper bound). */
  csize: number;
  /** An unaligned offset: the entry is corrupt, reads and writes through it fail (as in QEMU). */
  bad?: string;
  /** Reserved bits set: QEMU reads through such an entry ignoring them; we refuse to write through it. */
  reservedBits?: string;
}

export function decodeL1(buf: Buffer, index: number): { offset: number; copied: boolean; bad?: string } {
  // The halves read one by one: every lookup decodes entries, and a pair in an array was garbage.
  const hi = buf.readUInt32BE(index * 8);
  const lo = buf.readUInt32BE(index * 8 + 4);
  const offset = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
  const r: { offset: number; copied: boolean; bad?: string } = { offset, copied: (hi & COPIED_HI) !== 0 };
  if (hi & L1_RES_HI || lo & L1_RES_LO) r.bad = `L1 entry ${index} has reserved bits set`;
  return r;
}

export function encodeEntry(buf: Buffer, index: number, offset: number, hiFlags: number, loFlags = 0): void {
  const hi = (Math.floor(offset / 2 ** 32) | hiFlags) >>> 0;
  const lo = ((offset % 2 ** 32) | loFlags) >>> 0;
  buf.writeUInt32BE(hi, index * 8);
  buf.writeUInt32BE(lo, index * 8 + 4);
}

export function decodeL2(buf: Buffer, index: number, clusterBits: number, v3: boolean): L2Entry {
  const hi = buf.readUInt32BE(index * 8);
  const lo = buf.readUInt32BE(index * 8 + 4);
  if (hi & COMPRESSED_HI) {
    // Compressed descriptor: x = 62 - (cluster_bits - 8) offset bits, then the sector count.
    const e = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
    const x = BigInt(62 - (clusterBits - 8));
    const coffset = Number(e & ((1n << x) - 1n));
    const nsec = Number((e >> x) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
    const r: L2Entry = { type: 'compressed', offset: coffset, copied: false, csize: nsec * 512 - (coffset % 512) };
    if (hi & COPIED_HI) r.reservedBits = 'compressed cluster with the copied flag';
    return r;
  }
  const offset = (hi & OFFSET_MASK_HI) * 2 ** 32 + ((lo & OFFSET_MASK_LO) >>> 0);
  const copied = (hi & COPIED_HI) !== 0;
  // The zero flag is decoded in every version, as QEMU 7.2 does; a version 2 image has no zero
  // clusters, so QEMU fails any read or write through such an entry ("Zero cluster entry found in
  // pre-v3 image", EIO) instead of reading it as zeroes or as its data: so do we.
  const zero = (lo & 1) !== 0;
  let type: ClusterType;
  if (zero) type = offset ? 'zero-alloc' : 'zero-plain';
  else type = offset ? 'normal' : 'unallocated';
  const r: L2Entry = { type, offset, copied, csize: 0 };
  if (hi & L2_RES_HI || lo & L2_RES_LO) r.reservedBits = 'L2 entry has reserved bits set';
  if (offset % 2 ** clusterBits !== 0) r.bad = 'data cluster is not properly aligned';
  if (zero && !v3) r.bad = 'Zero cluster entry found in pre-v3 image';
  return r;
}

/**
 * Largest host byte offset a compressed descriptor holds: x = 62 - (cluster_bits - 8) offset bits
 * (formats.md §1.5).
 */
export function compressedOffsetLimit(clusterBits: number): number {
  return 2 ** (62 - (clusterBits - 8));
}

/**
 * Write a compressed cluster descriptor for `bytes` of compressed data at host byte `offset`: bit 62,
 * the offset in bits 0..x-1, and in bits x..61 the number of 512-byte sectors the data touches beyond
 * the one holding its first byte. Never COPIED (compressed clusters may share host clusters).
 */
export function encodeCompressedEntry(buf: Buffer, index: number, offset: number, bytes: number, clusterBits: number): void {
  const x = 62 - (clusterBits - 8);
  const extraSectors = Math.floor((offset + bytes - 1) / 512) - Math.floor(offset / 512);
  if (offset >= 2 ** x || extraSectors >= 2 ** (clusterBits - 8)) throw new Error(`qcow2: compressed descriptor cannot hold ${bytes} bytes at ${offset}`);
  buf.writeBigUInt64BE((1n << 62n) | (BigInt(extraSectors) << BigInt(x)) | BigInt(offset), index * 8);
}

/** A FIFO reader/writer lock: data I/O into mapped clusters shares it; metadata changes hold it alone. */
export class RWLock {
  private readers = 0;
  private writer = false;
  private queue: Array<{ write: boolean; go: () => void }> = [];

  async shared(): Promise<void> {
    if (!this.writer && this.queue.length === 0) {
      this.readers++;
      return;
    }
    await new Promise<void>((go) => this.queue.push({ write: false, go }));
  }
  async exclusive(): Promise<void> {
    if (!this.writer && this.readers === 0 && this.queue.length === 0) {
      this.writer = true;
      return;
    }
    await new Promise<void>((go) => this.queue.push({ write: true, go }));
  }
  releaseShared(): void {
    this.readers--;
    this.pump();
  }
  releaseExclusive(): void {
    this.writer = false;
    this.pump();
  }
  private pump(): void {
    while (this.queue.length > 0 && !this.writer) {
      const next = this.queue[0];
      if (next.write) {
        if (this.readers > 0) return;
        this.queue.shift();
        this.writer = true;
        next.go();
        return;
      }
      this.queue.shift();
      this.readers++;
      next.go();
    }
  }
  /**
   * Run `fn` holding the lock shared. Uncontended (nearly always, on a data path that takes it a few
   * times per piece) it is taken and `fn` runs at once, in the caller's turn, with no promise of the
   * lock's own; else `fn` runs once the lock is granted. Either way the lock is released when the
   * promise `fn` returns has settled.
   */
  withShared<T>(fn: () => T | Promise<T>): Promise<T> {
    if (!this.writer && this.queue.length === 0) {
      this.readers++;
      return this.runHolding(fn, () => this.releaseShared());
    }
    return this.shared().then(() => this.runHolding(fn, () => this.releaseShared()));
  }
  /** Run `fn` holding the lock alone (see withShared). */
  withExclusive<T>(fn: () => T | Promise<T>): Promise<T> {
    if (!this.writer && this.readers === 0 && this.queue.length === 0) {
      this.writer = true;
      return this.runHolding(fn, () => this.releaseExclusive());
    }
    return this.exclusive().then(() => this.runHolding(fn, () => this.releaseExclusive()));
  }
  /** `fn`'s result as a promise, `release` called once it has settled (or thrown). */
  private runHolding<T>(fn: () => T | Promise<T>, release: () => void): Promise<T> {
    let r: T | Promise<T>;
    try {
      r = fn();
    } catch (err) {
      release();
      return Promise.reject(err);
    }
    if (r instanceof Promise) {
      return r.then(
        (v) => {
          release();
          return v;
        },
        (err: unknown) => {
          release();
          throw err;
        },
      );
    }
    release();
    return Promise.resolve(r);
  }
}

/**
 * Bounded cache of one-cluster tables at host offsets. Dirty tables are written only by writeback()
 * (called by the owner under the exclusive metadata lock, after whatever must be durable first);
 * get() evicts clean tables only, so the cache may exceed its capacity until the owner writes back.
 */
export class TableCache {
  private readonly tables = new Map<number, Buffer>();
  private readonly dirty = new Set<number>();
  /** Loads in progress, so that two readers of one table share a single read. */
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** The key last in the Map's order (the most recently used), if known. */
  private newest?: number;

  constructor(
    /** The image file, as the node's file link has it now (blockdev-reopen can point it elsewhere). */
    private readonly fileOf: () => BlockNode,
    private readonly clusterSize: number,
    readonly capacity: number,
  ) {}

  private get file(): BlockNode {
    return this.fileOf();
  }

  /**
   * The table at `offset` if the cache holds it (a use, for the LRU order), without waiting;
   * undefined when it must be read (get). For the data path's lookups, which mostly hit.
   */
  peek(offset: number): Buffer | undefined {
    const t = this.tables.get(offset);
    if (t && offset !== this.newest) {
      // LRU: move to the end of the insertion order. (Not when it is there already, as it mostly is:
      // the Map rehashes, allocating, after a run of deletes.)
      this.tables.delete(offset);
      this.tables.set(offset, t);
      this.newest = offset;
    }
    return t;
  }

  async get(offset: number): Promise<Buffer> {
    const t = this.peek(offset);
    if (t) return t;
    let p = this.loading.get(offset);
    if (!p) {
      p = (async () => {
        // Past the end of the file a table reads as zeroes (as QEMU's reads beyond EOF do).
        const avail = Math.min(this.clusterSize, Math.max(0, this.file.length() - offset));
        const buf = avail > 0 ? Buffer.from(await this.file.read(offset, avail)) : Buffer.alloc(0);
        const full = buf.length === this.clusterSize ? buf : Buffer.concat([buf, Buffer.alloc(this.clusterSize - buf.length)]);
        this.insert(offset, full);
        return full;
      })();
      this.loading.set(offset, p);
      p.finally(() => this.loading.delete(offset)).catch(() => undefined);
    }
    return p;
  }

  /** Put a table that was just created (its content is `buf`), marked dirty. */
  put(offset: number, buf: Buffer): void {
    this.insert(offset, buf);
    this.dirty.add(offset);
  }

  private insert(offset: number, buf: Buffer): void {
    // (Map.set keeps the place of a key it holds: only a new key is the newest.)
    if (!this.tables.has(offset)) this.newest = offset;
    this.tables.set(offset, buf);
    if (this.tables.size > this.capacity) {
      for (const k of this.tables.keys()) {
        if (this.tables.size <= this.capacity) break;
        if (!this.dirty.has(k) && k !== offset) this.tables.delete(k);
      }
    }
  }

  /** Put a table whose content is already on disk. */
  putClean(offset: number, buf: Buffer): void {
    this.insert(offset, buf);
    this.dirty.delete(offset);
  }

  markDirty(offset: number): void {
    this.dirty.add(offset);
  }

  isDirty(): boolean {
    return this.dirty.size > 0;
  }

  overfull(): boolean {
    return this.tables.size > this.capacity;
  }

  /** Forget a table (its cluster was freed); a pending write is dropped. */
  drop(offset: number): void {
    if (offset === this.newest) this.newest = undefined;
    this.tables.delete(offset);
    this.dirty.delete(offset);
  }

  /** Write every dirty table to the file (no flush). */
  async writeback(): Promise<void> {
    const offsets = [...this.dirty].sort((a, b) => a - b);
    for (const off of offsets) {
      const t = this.tables.get(off);
      this.dirty.delete(off);
      if (t) await this.file.write(off, t);
    }
  }

  clear(): void {
    this.newest = undefined;
    this.tables.clear();
    this.dirty.clear();
  }
}
