/**
 * qcow2 refcounts: the refcount table (held in memory), refcount blocks (through a write-back cache),
 * cluster allocation (lowest free cluster first, as QEMU) and freeing, new refcount blocks, growing the
 * refcount table, and rebuilding the whole structure from a walk of the image (dirty-bit repair).
 *
 * Ordering (formats.md §1.9): a refcount may be too high but never too low. New refcount blocks and
 * tables are written and flushed before anything points at them; callers write back this cache and
 * flush before writing an L2/L1 entry that references a newly allocated cluster, and only decrement
 * refcounts after the entry that referenced the cluster is durable.
 */
import { BlockIOError, genericError, strerror } from '../../../errors.js';
import { HOST_OFFSET_END } from './header.js';
import type { BlockNode } from '../../node.js';
import { TableCache } from './tables.js';
import { discardPassthrough, PendingDiscards, type DiscardPassthrough, type FreeReason } from './discard.js';

const REFT_OFF_MASK_LO = 0xfffffe00;

export interface MetadataRange {
  offset: number;
  bytes: number;
  what: string;
}

export class Refcounts {
  readonly bits: number;
  readonly entriesPerBlock: number;
  readonly cs: number;
  /** Refcount block offsets, one per table entry (0 = none). */
  table: number[];
  tableOffset: number;
  tableClusters: number;
  readonly cache: TableCache;
  /** Lowest cluster index that may be free (QEMU's free_cluster_index). */
  private freeHint = 0;
  /** Highest cluster index handed out in this session (it may not be written yet). */
  highestAllocated = 0;
  /** The largest refcount an entry holds (2^refcount_bits - 1). */
  readonly maxRefcount: number;
  /** Which reasons for freeing a cluster discard it on the file (the node's pass-discard-* options). */
  passthrough: DiscardPassthrough = discardPassthrough({});
  /** Clusters freed whose discard is still to be sent (see discard.ts). */
  readonly discards: PendingDiscards;

  constructor(
    /** The image file, as the node's file link has it now (blockdev-reopen can point it elsewhere). */
    private readonly fileOf: () => BlockNode,
    readonly clusterBits: number,
    readonly refcountOrder: number,
    tableOffset: number,
    tableClusters: number,
    table: number[],
    /** Persist the refcount table location (12 bytes at header offset 48) and flush. */
    private readonly writeHeaderRefTable: (offset: number, clusters: number) => Promise<void>,
  ) {
    this.cs = 2 ** clusterBits;
    this.bits = 2 ** refcountOrder;
    this.entriesPerBlock = (this.cs * 8) / this.bits;
    this.table = table;
    this.tableOffset = tableOffset;
    this.tableClusters = tableClusters;
    this.maxRefcount = this.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.cache = new TableCache(fileOf, this.cs, Math.max(8, Math.floor((4 << 20) / this.cs)));
    this.discards = new PendingDiscards(fileOf);
  }

  private get file(): BlockNode {
    return this.fileOf();
  }

  static parseTable(buf: Buffer, entries: number): { table: number[]; bad?: string } {
    const table: number[] = [];
    let bad: string | undefined;
    for (let i = 0; i < entries; i++) {
      const hi = buf.readUInt32BE(i * 8);
      const lo = buf.readUInt32BE(i * 8 + 4);
      if (lo & 0x1ff && !bad) bad = `Refcount table entry ${i} has reserved bits set`;
      table.push(hi * 2 ** 32 + ((lo & REFT_OFF_MASK_LO) >>> 0));
    }
    return { table, bad };
  }

  // ---- entry codec ----

  readEntry(block: Buffer, i: number): number {
    switch (this.bits) {
      case 64: {
        const v = block.readBigUInt64BE(i * 8);
        return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
      }
      case 32:
        return block.readUInt32BE(i * 4);
      case 16:
        return block.readUInt16BE(i * 2);
      case 8:
        return block[i];
      default: {
        const bit = i * this.bits;
        return (block[bit >> 3] >> (bit & 7)) & ((1 << this.bits) - 1);
      }
    }
  }

  writeEntry(block: Buffer, i: number, v: number): void {
    switch (this.bits) {
      case 64:
        block.writeBigUInt64BE(BigInt(v), i * 8);
        return;
      case 32:
        block.writeUInt32BE(v, i * 4);
        return;
      case 16:
        block.writeUInt16BE(v, i * 2);
        return;
      case 8:
        block[i] = v;
        return;
      default: {
        const bit = i * this.bits;
        const mask = ((1 << this.bits) - 1) << (bit & 7);
        block[bit >> 3] = (block[bit >> 3] & ~mask) | ((v << (bit & 7)) & mask);
      }
    }
  }

  // ---- lookups ----

  async get(cluster: number): Promise<number> {
    const ti = Math.floor(cluster / this.entriesPerBlock);
    if (ti >= this.table.length || this.table[ti] === 0) return 0;
    const block = this.cache.peek(this.table[ti]) ?? (await this.cache.get(this.table[ti]));
    return this.readEntry(block, cluster % this.entriesPerBlock);
  }

  /**
   * How many refcount table entries point at each host cluster: built on first use (isBlock), then
   * kept in step as blocks are added and dropped, and built again when the table is replaced.
   */
  private blockClusters?: Map<number, number>;

  /** Whether host cluster `cluster` holds a refcount block (the qcow2 overlap check). */
  isBlock(cluster: number): boolean {
    if (!this.blockClusters) {
      this.blockClusters = new Map();
      for (const b of this.table) if (b) this.countBlock(b, 1);
    }
    return this.blockClusters.has(cluster);
  }

  private countBlock(offset: number, delta: number): void {
    const m = this.blockClusters;
    if (!m) return;
    const c = Math.floor(offset / this.cs);
    const n = (m.get(c) ?? 0) + delta;
    if (n > 0) m.set(c, n);
    else m.delete(c);
  }

  /** Clusters the refcount structure itself occupies. */
  metadataRanges(): MetadataRange[] {
    const r: MetadataRange[] = [{ offset: this.tableOffset, bytes: this.tableClusters * this.cs, what: 'refcount table' }];
    this.table.forEach((b, i) => {
      if (b) r.push({ offset: b, bytes: this.cs, what: `refcount block ${i}` });
    });
    return r;
  }

  // ---- updates ----

  /** Add `delta` to the refcount of `cluster`, creating the refcount block if needed; `reason` as in updateRun. */
  async update(cluster: number, delta: number, reason: FreeReason = 'never'): Promise<void> {
    return this.updateRun(cluster, 1, delta, reason);
  }

  /**
   * Add `delta` to the refcounts of clusters [first, first+n), creating refcount blocks if needed: one
   * block lookup and one dirty mark per refcount block the run touches, not per cluster (a run of
   * newly allocated data clusters is one update). Checked entry by entry before any is changed, so a
   * refcount that would leave its range changes nothing. This is the one place where a host cluster
   * becomes free: when its refcount reaches zero and `reason` passes (discard.ts), it is discarded on
   * the file once the update is done.
   */
  async updateRun(first: number, n: number, delta: number, reason: FreeReason = 'never'): Promise<void> {
    let c = first;
    const end = first + n;
    while (c < end) {
      const ti = Math.floor(c / this.entriesPerBlock);
      // (Awaited only when missing: a wait for nothing would cost every allocation a turn.)
      if (ti >= this.table.length || this.table[ti] === 0) await this.ensureBlock(ti);
      const boff = this.table[ti];
      const block = this.cache.peek(boff) ?? (await this.cache.get(boff));
      const base = ti * this.entriesPerBlock;
      const stop = Math.min(end, base + this.entriesPerBlock);
      for (let k = c; k < stop; k++) {
        const v = this.readEntry(block, k - base) + delta;
        if (v < 0) throw new BlockIOError('EIO', `qcow2: refcount of cluster ${k} would become negative`);
        if (v > this.maxRefcount) throw new BlockIOError('EINVAL', `qcow2: refcount of cluster ${k} overflows`);
      }
      for (let k = c; k < stop; k++) {
        const v = this.readEntry(block, k - base) + delta;
        this.writeEntry(block, k - base, v);
        if (v === 0 && k < this.freeHint) this.freeHint = k;
        if (v === 0 && delta < 0 && this.passthrough[reason]) this.discards.add(k * this.cs, this.cs);
      }
      this.cache.markDirty(boff);
      c = stop;
    }
    await this.discards.issue();
  }

  /**
   * Free `n` clusters starting at host offset `offset` (the references to them must already be gone
   * from disk); `reason` says whether the ones no longer used are discarded on the file (discard.ts).
   */
  async free(offset: number, n: number, reason: FreeReason): Promise<void> {
    const c0 = Math.floor(offset / this.cs);
    // As QEMU (qcow2_free_clusters): a refcount that would go below zero fails the whole update,
    // which is undone; QEMU logs it and carries on (the image had a refcount error already).
    for (let c = c0; c < c0 + n; c++) {
      if ((await this.get(c)) === 0) {
        process.stderr.write(`qcow2_free_clusters failed: ${strerror('EINVAL')}\n`);
        return;
      }
    }
    await this.updateRun(c0, n, -1, reason);
  }

  /**
   * Allocate `n` contiguous clusters (lowest free run) with refcount 1; returns the host offset.
   * `isReserved` lets the caller exclude clusters it knows to be metadata (belt and braces).
   */
  async alloc(n: number, isReserved?: (cluster: number) => boolean): Promise<number> {
    for (let attempt = 0; attempt < 1000; attempt++) {
      let start = this.freeHint;
      let firstFree = -1;
      let run = 0;
      let c = start;
      while (run < n) {
        // One refcount block at a time: looked up once, its entries scanned without awaiting.
        const ti = Math.floor(c / this.entriesPerBlock);
        const base = ti * this.entriesPerBlock;
        const block = ti >= this.table.length || this.table[ti] === 0 ? undefined : (this.cache.peek(this.table[ti]) ?? (await this.cache.get(this.table[ti])));
        for (const stop = base + this.entriesPerBlock; c < stop && run < n; c++) {
          const free = block === undefined || this.readEntry(block, c - base) === 0;
          if (free && !(isReserved && isReserved(c))) {
            if (firstFree < 0) firstFree = c;
            run++;
          } else {
            run = 0;
            start = c + 1;
          }
        }
      }
      if ((start + n) * this.cs > HOST_OFFSET_END) throw new BlockIOError('EFBIG');
      if (firstFree >= 0) this.freeHint = firstFree;
      // Make sure every block covering the run exists; creating one may take clusters of the run.
      const tiFirst = Math.floor(start / this.entriesPerBlock);
      const tiLast = Math.floor((start + n - 1) / this.entriesPerBlock);
      let changed = false;
      for (let ti = tiFirst; ti <= tiLast; ti++) {
        if (ti >= this.table.length || this.table[ti] === 0) {
          await this.ensureBlock(ti);
          changed = true;
        }
      }
      if (changed) continue; // search again (QEMU's -EAGAIN)
      await this.updateRun(start, n, 1);
      // As QEMU's free_cluster_index: the search goes on after this run, past any hole it skipped as
      // too small (until a cluster below is freed), so the layout of an image follows QEMU's.
      this.freeHint = start + n;
      this.highestAllocated = Math.max(this.highestAllocated, start + n - 1);
      return start * this.cs;
    }
    throw new BlockIOError('EIO', 'qcow2: cluster allocation does not converge');
  }

  private rangeReserved(c: number, n: number, isReserved: (cluster: number) => boolean): boolean {
    for (let k = 0; k < n; k++) if (isReserved(c + k)) return true;
    return false;
  }

  /** Create refcount block `ti` if it does not exist (formats.md §1.9 step 5). */
  private async ensureBlock(ti: number): Promise<void> {
    if (ti < this.table.length && this.table[ti] !== 0) return;
    if (ti >= this.tableClusters * (this.cs / 8)) {
      await this.growTable(ti);
      if (this.table[ti]) return;
    }
    // Find a free cluster for the block without touching refcounts.
    let c = this.freeHint;
    for (;;) {
      const cti = Math.floor(c / this.entriesPerBlock);
      if (cti === ti) break; // inside its own range: it describes itself
      if (cti >= this.table.length || this.table[cti] === 0) {
        // A free cluster in another missing block's range: use the first cluster of our own range
        // instead, unless that range lies below (then it would already have been found).
        c = ti * this.entriesPerBlock;
        break;
      }
      if ((await this.get(c)) === 0) break;
      c++;
    }
    const self = Math.floor(c / this.entriesPerBlock) === ti;
    const block = Buffer.alloc(this.cs);
    if (self) {
      this.writeEntry(block, c % this.entriesPerBlock, 1);
    } else {
      await this.update(c, 1);
      await this.flush();
    }
    this.highestAllocated = Math.max(this.highestAllocated, c);
    await this.file.write(c * this.cs, block);
    await this.file.flush();
    while (this.table.length <= ti) this.table.push(0);
    this.table[ti] = c * this.cs;
    this.countBlock(c * this.cs, 1);
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(BigInt(c * this.cs));
    await this.file.write(this.tableOffset + ti * 8, e);
    await this.file.flush();
  }

  /**
   * qcow2_shrink_reftable (the end of a shrink): refcount blocks that count nothing but, perhaps,
   * themselves leave the table, rewritten whole and synced before they are forgotten, so the file can
   * be cut after the last cluster still in use. A dropped block counted in another block loses that
   * count too, and every dropped block is discarded on the file whatever the pass-discard options say:
   * both as qemu-storage-daemon 7.2 does (compared by qemu-img check --output=json, no leak, and by
   * the file's extents in qcow2-discard-qsd.test.ts).
   */
  async dropUnusedBlocks(): Promise<void> {
    await this.flush();
    const next = [...this.table];
    for (let i = 0; i < this.table.length; i++) {
      const off = this.table[i];
      if (!off) continue;
      const block = this.cache.peek(off) ?? (await this.cache.get(off));
      const own = Math.floor(off / this.cs);
      const selfIndex = Math.floor(own / this.entriesPerBlock) === i ? own % this.entriesPerBlock : -1;
      let unused = true;
      for (let k = 0; k < this.entriesPerBlock && unused; k++) if (k !== selfIndex && this.readEntry(block, k) !== 0) unused = false;
      if (unused) next[i] = 0;
    }
    if (next.every((o, i) => o === this.table[i])) return;
    const buf = Buffer.alloc(this.tableClusters * this.cs);
    next.forEach((o, i) => buf.writeBigUInt64BE(BigInt(o), i * 8));
    await this.file.write(this.tableOffset, buf);
    await this.file.flush();
    await this.discards.batch(async () => {
      const countedElsewhere: number[] = [];
      for (let i = 0; i < this.table.length; i++) {
        const off = this.table[i];
        if (!off || next[i]) continue;
        this.cache.drop(off);
        this.table[i] = 0;
        this.countBlock(off, -1);
        this.discards.add(off, this.cs);
        if (Math.floor(off / this.cs / this.entriesPerBlock) !== i) countedElsewhere.push(off);
      }
      for (const off of countedElsewhere) await this.free(off, 1, 'never');
    });
    await this.flush();
  }

  /** Write back dirty refcount blocks and flush the file. */
  async flush(): Promise<void> {
    if (!this.cache.isDirty()) return;
    await this.cache.writeback();
    await this.file.flush();
  }

  /**
   * Grow the refcount table so that it has an entry `ti` (§1.9 step 6): the new table and the refcount
   * blocks that describe it go past everything in use, describing themselves; then the header switches.
   */
  private async growTable(ti: number): Promise<void> {
    await this.flush();
    const entriesPerCluster = this.cs / 8;
    const fileClusters = Math.ceil(this.file.length() / this.cs);
    const S = Math.max(fileClusters, this.highestAllocated + 1, 1);
    const minEntries = Math.max(ti + 1, Math.ceil((this.table.length * 3) / 2));
    const plan = planSelfDescribing(S, minEntries, this.entriesPerBlock, entriesPerCluster, (i) => i < this.table.length && this.table[i] !== 0);
    if (plan.tableClusters * this.cs > 8 * 1024 * 1024 * 8) throw new BlockIOError('EFBIG');
    const newTable = [...this.table];
    while (newTable.length < plan.tableClusters * entriesPerCluster) newTable.push(0);
    const blocks = new Map<number, Buffer>();
    plan.blockIndices.forEach((bti, k) => {
      newTable[bti] = (plan.start + plan.tableClusters + k) * this.cs;
      blocks.set(bti, Buffer.alloc(this.cs));
    });
    for (let c = plan.start; c < plan.end; c++) {
      const bti = Math.floor(c / this.entriesPerBlock);
      const b = blocks.get(bti);
      // Clusters in ranges that already have a block are counted there (they are free: past the end).
      if (b) this.writeEntry(b, c % this.entriesPerBlock, 1);
      else await this.update(c, 1);
    }
    await this.cache.writeback();
    for (const [bti, b] of blocks) await this.file.write(newTable[bti], b);
    await this.file.flush();
    const tbuf = Buffer.alloc(plan.tableClusters * this.cs);
    newTable.forEach((o, i) => tbuf.writeBigUInt64BE(BigInt(o), i * 8));
    await this.file.write(plan.start * this.cs, tbuf);
    await this.file.flush();
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    await this.writeHeaderRefTable(plan.start * this.cs, plan.tableClusters);
    this.table = newTable;
    this.blockClusters = undefined;
    this.tableOffset = plan.start * this.cs;
    this.tableClusters = plan.tableClusters;
    this.highestAllocated = Math.max(this.highestAllocated, plan.end - 1);
    await this.free(oldOffset, oldClusters, 'other');
  }

  /**
   * Replace the whole refcount structure by one computed from `refs` (cluster index → reference
   * count), placed past `endCluster` (§1.9 dirty-bit repair). Old table and blocks become free.
   */
  async rebuild(refs: Map<number, number> | number[], endCluster: number): Promise<void> {
    const entriesPerCluster = this.cs / 8;
    const count = (c: number) => (Array.isArray(refs) ? (refs[c] ?? 0) : (refs.get(c) ?? 0));
    const used = new Set<number>();
    const keys = Array.isArray(refs) ? refs.keys() : refs.keys();
    for (const c of keys) if (count(c) > 0) used.add(Math.floor(c / this.entriesPerBlock));
    const S = Math.max(endCluster, 1);
    const plan = planSelfDescribing(S, 1, this.entriesPerBlock, entriesPerCluster, () => false, used);
    const newTable = new Array<number>(plan.tableClusters * entriesPerCluster).fill(0);
    const blocks = new Map<number, Buffer>();
    plan.blockIndices.forEach((bti, k) => {
      newTable[bti] = (plan.start + plan.tableClusters + k) * this.cs;
      blocks.set(bti, Buffer.alloc(this.cs));
    });
    const set = (c: number, v: number) => {
      const b = blocks.get(Math.floor(c / this.entriesPerBlock))!;
      this.writeEntry(b, c % this.entriesPerBlock, Math.min(v, this.maxRefcount));
    };
    for (const c of Array.isArray(refs) ? refs.keys() : refs.keys()) if (count(c) > 0) set(c, count(c));
    for (let c = plan.start; c < plan.end; c++) set(c, 1);
    for (const [bti, b] of blocks) await this.file.write(newTable[bti], b);
    const tbuf = Buffer.alloc(plan.tableClusters * this.cs);
    newTable.forEach((o, i) => tbuf.writeBigUInt64BE(BigInt(o), i * 8));
    await this.file.write(plan.start * this.cs, tbuf);
    await this.file.flush();
    await this.writeHeaderRefTable(plan.start * this.cs, plan.tableClusters);
    this.cache.clear();
    this.table = newTable;
    this.blockClusters = undefined;
    this.tableOffset = plan.start * this.cs;
    this.tableClusters = plan.tableClusters;
    this.highestAllocated = plan.end - 1;
    this.freeHint = 0;
  }
}

export interface StructurePlan {
  start: number;
  end: number;
  tableClusters: number;
  /** Refcount table indices that get a new block, in the order the blocks are laid out. */
  blockIndices: number[];
}

/**
 * Lay out a refcount table followed by new refcount blocks from cluster `start` on, such that the
 * blocks cover themselves and the table (and every index in `alsoNeeded`), and the table has an entry
 * for every block. `exists(ti)` says a block already exists for index ti.
 */
export function planSelfDescribing(
  start: number,
  minEntries: number,
  entriesPerBlock: number,
  entriesPerCluster: number,
  exists: (ti: number) => boolean,
  alsoNeeded: Set<number> = new Set(),
): StructurePlan {
  let tableClusters = Math.max(1, Math.ceil(minEntries / entriesPerCluster));
  let nBlocks = 0;
  for (let iter = 0; iter < 100; iter++) {
    const end = start + tableClusters + nBlocks;
    const needed = new Set<number>();
    for (const ti of alsoNeeded) if (!exists(ti)) needed.add(ti);
    for (let ti = Math.floor(start / entriesPerBlock); ti <= Math.floor((end - 1) / entriesPerBlock); ti++) if (!exists(ti)) needed.add(ti);
    const maxTi = Math.max(minEntries - 1, ...needed);
    const tc = Math.max(tableClusters, Math.ceil((maxTi + 1) / entriesPerCluster));
    if (needed.size === nBlocks && tc === tableClusters) {
      return { start, end, tableClusters, blockIndices: [...needed].sort((a, b) => a - b) };
    }
    nBlocks = needed.size;
    tableClusters = tc;
  }
  throw genericError('qcow2: cannot lay out the refcount structure');
}
