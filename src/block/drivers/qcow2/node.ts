/**
 * Qcow2Node: guest I/O through L1/L2 tables, cluster allocation with crash-safe ordering, zero
 * clusters, compressed clusters (read, and written packed into shared host clusters), discard, block
 * status, and the persistent-bitmap storage API.
 *
 * Concurrency: a reader/writer lock. Reads, and writes into clusters that are already allocated with
 * refcount 1 (COPIED), share it; anything that changes metadata (allocation, zeroing, discard, flush)
 * holds it alone, so no cluster is allocated twice and no cluster is freed under a request using it.
 * A second lock, `meta`, serialises metadata changes. An allocating write that frees nothing takes
 * only `meta` (readers and overwrites go on meanwhile: they never see a mapping change under them,
 * since an allocation only fills entries that were not allocated-and-ours): once to allocate and once,
 * after its data is written with no lock held, to link the L2 entries. Meanwhile its guest clusters are
 * "in flight" and other allocations or zeroing of them wait (QEMU's cluster allocation dependencies).
 * Whatever frees clusters (or copies a shared L2 table) takes `lock` alone and then `meta`; flush takes
 * `meta` only.
 *
 * Durability (formats.md §1.9): L2 tables and refcount blocks are cached and written back on flush,
 * eviction, or before a cluster is freed, always in the order refcount blocks → flush → L2 tables →
 * flush. Data written into a new cluster completes before its L2 entry is updated in the cache, and
 * write-back runs under the exclusive lock, so the flush before the L2 write covers that data. New L2
 * tables are written and flushed before the L1 entry that points at them (synchronous L1 write).
 * Refcounts are only decremented after the entry that referenced the cluster is durable.
 */
import { checkRuntimeOptions } from './runtime-options.js';
import { BlockIOError, errorCode, errorMessage, genericError, strerror } from '../../../errors.js';
import { nativeAddon } from '../../native.js';
import { BlockNode, jsonFilename, type BlockStatus, type HostRange, type ImageInfo, type NodeCapabilities, type NodeInfo, type ReopenChange, type SnapshotEntry, type WriteFlags } from '../../node.js';
import { snapshotInfo } from '../../internal-snapshot.js';
import { findSnapshot, MAX_SNAPSHOTS, newSnapshotId, serializeSnapshotTable, type Qcow2Snapshot } from './snapshots.js';
import {
  AUTOCLEAR_BITMAPS,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  HOST_OFFSET_END,
  INCOMPAT_DIRTY,
  MAX_L1_BYTES,
  backingChangeWrites,
  serializeHeader,
  type Qcow2Header,
} from './header.js';
import { resolveBackingFilename } from '../../filename.js';
import { readsAsZeroes } from '../../copy/chain-status.js';
import { jsonOptions } from '../../filters/filter.js';
import { Refcounts, type MetadataRange } from './refcount.js';
import { discardPassthrough, type FreeReason } from './discard.js';
import { compressedOffsetLimit, COPIED_HI, decodeL1, decodeL2, encodeCompressedEntry, encodeEntry, OFFSET_MASK_HI, OFFSET_MASK_LO, RWLock, TableCache, type L2Entry } from './tables.js';
import { compressCluster, decompressCluster } from './compressed.js';
import { walkReferences } from './walk.js';
import {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_PHYS_SIZE,
  bitmapTableEntryAllOnes,
  bitmapTableEntryOffset,
  dirEntrySize,
  MAX_BITMAP_DIRECTORY_SIZE,
  MAX_BITMAPS,
  parseBitmapDirectory,
  serializeBitmapDirectory,
  type StoredBitmap,
} from './bitmaps.js';
import type { LoadedDirtyBitmap, PersistentBitmapStore } from '../../bitmap-store.js';
import {
  AUTOCLEAR_WRITE_INTENT,
  chooseWriteIntentLayout,
  decodeWriteIntent,
  encodeWriteIntent,
  EXT_WRITE_INTENT,
  HEADER_SLACK,
  type DecodedWriteIntent,
} from './write-intent.js';
import { markedRanges, setSerializedBits, WriteIntentRecord } from '../../write-intent.js';

/** Guest clusters [gStart, gEnd) getting new host clusters whose L2 entries are not linked yet. */
interface InFlightAllocation {
  gStart: number;
  gEnd: number;
  nClusters: number;
  host: number;
  /** A zero-alloc run that is ours: its host clusters are written in place, nothing allocated. */
  reuse: boolean;
  /** The clusters' old contents read as zeroes (no copy-on-write reads). */
  cowZero: boolean;
  /** Linking replaces allocated clusters, which are then freed. */
  frees: boolean;
  /** Bytes of the request this allocation covers (from the request's offset). */
  bytes: number;
  l1Index: number;
  l2Index: number;
  done: Promise<void>;
  resolve: () => void;
}

/**
 * What a write puts into clusters: guest data, or (copy offload) a host file range the kernel copies
 * from, which covers whole clusters only (canWriteHost), so it never needs copy-on-write reads.
 */
type Payload = Buffer | HostRange;

function slicePayload(p: Payload, start: number, end: number): Payload {
  return Buffer.isBuffer(p) ? p.subarray(start, end) : { fd: p.fd, offset: p.offset + start, bytes: end - start };
}

interface Mapping {
  entry: L2Entry;
  /** Bytes from the queried offset that share this mapping (host-contiguous for normal clusters). */
  bytes: number;
  l1Index: number;
  l2Index: number;
}

/** A bitmap to store: its name, granularity, flags, and serialized data (formats.md §2.4). */
export interface BitmapToStore {
  name: string;
  granularity: number;
  /** Enabled bitmaps are stored with the 'auto' flag. */
  auto: boolean;
  /** Serialized bits, LSB first, ceil(ceil(size/granularity)/8) bytes. */
  data: Buffer;
}

/** Keep the stored entry of this name as it is on disk (flags, table and data): an inconsistent bitmap. */
export interface BitmapToKeep {
  name: string;
  keep: true;
}

export class Qcow2Node extends BlockNode implements PersistentBitmapStore {
  readonly driver = 'qcow2';
  readonly cs: number;
  readonly clusterBits: number;
  readonly l2Entries: number;
  readonly v3: boolean;
  private readonly l2cache: TableCache;
  private readonly lock = new RWLock();
  /** Serialises metadata changes (allocation, L2 linking, write-back); taken after `lock` when both are. */
  private readonly meta = new RWLock();
  /** The dirty bit is set on disk for this session (lazy refcounts). */
  private markedDirty = false;
  /** We set the dirty bit ourselves (lazy refcounts): not shown as dirty-flag while open. */
  private dirtySetByUs = false;
  private lastCompressed?: { offset: number; data: Buffer };
  private readonly allocsInFlight: InFlightAllocation[] = [];
  unmapAllowed = false;

  constructor(
    nodeName: string,
    readOnly: boolean,
    file: BlockNode,
    readonly header: Qcow2Header,
    private l1: Buffer,
    readonly rc: Refcounts,
    /** full-backing-filename: the header's backing file name resolved against the image's directory. */
    public backingDisplayName: string | undefined,
  ) {
    super(nodeName, readOnly);
    this.attachChild('file', file, 'image');
    this.clusterBits = header.clusterBits;
    this.cs = 2 ** header.clusterBits;
    this.l2Entries = this.cs / 8;
    this.v3 = header.version === 3;
    this.l2cache = new TableCache(() => this.file, this.cs, Math.max(16, Math.floor((16 << 20) / this.cs)));
    this.markedDirty = (header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  }

  get file(): BlockNode {
    return this.child('file')!.node;
  }

  length(): number {
    return this.header.size;
  }

  override nodeInfo(): NodeInfo {
    return { clusterSize: this.cs };
  }

  /**
   * Zero clusters (v3) make write-zeroes cheap; discard frees clusters when discard=unmap. The data
   * clusters are written to the file, a contiguous run of them as one request: the file's streams
   * (an NBD node's connections) carry this node's data too, so a copy into it scales as into the file.
   */
  override capabilities(): NodeCapabilities {
    const streams = this.file.capabilities().streams;
    return {
      requestAlignment: this.requestAlignment,
      writeZeroes: this.v3,
      fastZero: this.v3,
      discard: this.unmapAllowed,
      fua: false,
      blockStatus: true,
      resize: this.doTruncate !== undefined,
      ...(streams !== undefined ? { streams } : {}),
    };
  }
  override hasZeroInit(): boolean {
    return this.header.backingFile === undefined && !this.backing();
  }

  // ---- metadata helpers ---------------------------------------------------------------------------

  /** Metadata ranges that must never be handed out or overwritten with guest data. */
  metadataRanges(): MetadataRange[] {
    return [
      { offset: 0, bytes: this.cs, what: 'qcow2 header' },
      { offset: this.header.l1TableOffset, bytes: this.header.l1Size * 8, what: 'active L1 table' },
      ...this.rc.metadataRanges(),
    ];
  }

  private isReserved = (cluster: number): boolean => {
    const off = cluster * this.cs;
    if (cluster === 0) return true;
    const l1End = this.header.l1TableOffset + this.header.l1Size * 8;
    if (off < l1End && off + this.cs > this.header.l1TableOffset) return true;
    const rtEnd = this.rc.tableOffset + this.rc.tableClusters * this.cs;
    if (off < rtEnd && off + this.cs > this.rc.tableOffset) return true;
    // The live bitmap directory (QEMU's overlap check guards it too): an image whose directory
    // cluster lost its refcount must not get a new table there. (Whether it is live is asked last:
    // it is a BigInt test, and this runs for every cluster an allocation scans.)
    const dir = this.header.bitmaps;
    if (dir && off < dir.directoryOffset + dir.directorySize && off + this.cs > dir.directoryOffset && this.bitmapsValid()) return true;
    // An L2 table or refcount block whose cluster lost its refcount (a damaged image) is not handed out either.
    return this.metadataAt(cluster) !== undefined;
  };

  private async readFile(off: number, n: number): Promise<Buffer> {
    const avail = Math.max(0, Math.min(n, this.file.length() - off));
    const b = avail > 0 ? await this.file.read(off, avail) : Buffer.alloc(0);
    return b.length === n ? b : Buffer.concat([b, Buffer.alloc(n - b.length)]);
  }

  /** readFile into `buf` (all of it): zeroes past the end of the file. */
  private async readFileInto(off: number, buf: Buffer): Promise<void> {
    const avail = Math.max(0, Math.min(buf.length, this.file.length() - off));
    if (avail > 0) await this.file.readInto(off, avail === buf.length ? buf : buf.subarray(0, avail));
    if (avail < buf.length) buf.fill(0, avail);
  }

  private checkHostOffset(off: number, what: string): void {
    if (off + this.cs > HOST_OFFSET_END || off >= Math.max(this.file.length(), (this.rc.highestAllocated + 1) * this.cs)) {
      throw new BlockIOError('EIO', `qcow2: ${what} at offset ${off} is beyond the end of the image file`);
    }
  }

  /**
   * Before writing into the host cluster an L2 entry maps: reads go through what QEMU reads through
   * (reserved bits, data beyond the end of the file reads as zeroes), a write there must not.
   */
  private checkWriteTarget(e: L2Entry, bytes = this.cs): void {
    if (e.reservedBits) throw new BlockIOError('EIO', `qcow2: ${e.reservedBits}`);
    this.checkHostOffset(e.offset, 'data cluster');
    const first = Math.floor(e.offset / this.cs);
    const last = Math.floor((e.offset + bytes - 1) / this.cs);
    for (let c = first; c <= last; c++) {
      const what = this.metadataAt(c);
      // QEMU's overlap check (its message; QEMU also marks the image corrupt, bitmirror leaves it as
      // it is): guest data over the image's own tables would destroy them.
      if (what) throw new BlockIOError('EIO', `qcow2: Preventing invalid write on metadata (overlaps with ${what})`);
    }
  }

  /**
   * How many active L1 entries point at each host cluster (the L2 tables): built on first use, then
   * kept in step where L1 entries change (newL2, shrinkTables; growL1 copies them).
   */
  private l2Clusters?: Map<number, number>;

  private l2ClusterMap(): Map<number, number> {
    if (!this.l2Clusters) {
      this.l2Clusters = new Map();
      for (let i = 0; i < this.header.l1Size; i++) this.countL2(decodeL1(this.l1, i).offset, 1);
    }
    return this.l2Clusters;
  }

  private countL2(offset: number, delta: number): void {
    const m = this.l2Clusters;
    if (!m || !offset) return;
    const c = Math.floor(offset / this.cs);
    const n = (m.get(c) ?? 0) + delta;
    if (n > 0) m.set(c, n);
    else m.delete(c);
  }

  /**
   * The metadata host cluster `cluster` holds, in QEMU's overlap-check names and order, or undefined:
   * the header, the active L1 table, an active L2 table, the refcount table, a refcount block, the
   * bitmap directory. O(1): the L2 tables and refcount blocks are counted as they change.
   */
  private metadataAt(cluster: number): string | undefined {
    const off = cluster * this.cs;
    const within = (start: number, bytes: number) => bytes > 0 && off < start + bytes && off + this.cs > start;
    if (cluster === 0) return 'qcow2_header';
    if (within(this.header.l1TableOffset, this.header.l1Size * 8)) return 'active L1 table';
    if (this.l2ClusterMap().has(cluster)) return 'active L2 table';
    if (within(this.rc.tableOffset, this.rc.tableClusters * this.cs)) return 'refcount table';
    if (this.rc.isBlock(cluster)) return 'refcount block';
    const dir = this.header.bitmaps;
    if (dir && within(dir.directoryOffset, dir.directorySize) && this.bitmapsValid()) return 'bitmap directory';
    return undefined;
  }

  /** Where the L2 table for `l1Index` lies (undefined: none), checked as a reader or writer needs. */
  private l2Location(l1Index: number): { offset: number; copied: boolean } | undefined {
    if (l1Index >= this.header.l1Size) return undefined;
    const e = decodeL1(this.l1, l1Index);
    if (!e.offset) return undefined;
    if (e.offset % this.cs) throw new BlockIOError('EIO', `qcow2: L2 table offset ${e.offset} is not cluster aligned`);
    // As QEMU, a reader ignores reserved bits and reads a table beyond the end of the file as zeroes
    // (unallocated); a writable node was checked at open (open.ts validateForWrite) and stays strict.
    if (!this.readOnly) {
      if (e.bad) throw new BlockIOError('EIO', `qcow2: ${e.bad}`);
      this.checkHostOffset(e.offset, 'L2 table');
    }
    return e;
  }

  private async l2Table(l1Index: number): Promise<{ table: Buffer; offset: number; copied: boolean } | undefined> {
    const e = this.l2Location(l1Index);
    if (!e) return undefined;
    return { table: await this.l2cache.get(e.offset), offset: e.offset, copied: e.copied };
  }

  /**
   * The mapping of `offset` and how far it extends (at most `max` bytes, within one L2 table). Answered
   * without waiting (no promise) when the L2 table is cached, as it nearly always is on a data path,
   * where every piece of a copy is looked up several times (source block status and host range,
   * target write and allocation): a wait there cost a promise chain per lookup.
   */
  private lookup(offset: number, max: number): Mapping | Promise<Mapping> {
    const gc = Math.floor(offset / this.cs);
    const l1Index = Math.floor(gc / this.l2Entries);
    const l2Index = gc % this.l2Entries;
    const tableEnd = (l1Index + 1) * this.l2Entries * this.cs;
    const limit = Math.min(offset + max, tableEnd, this.header.size);
    const loc = this.l2Location(l1Index);
    if (!loc) return { entry: { type: 'unallocated', offset: 0, copied: false, csize: 0 }, bytes: limit - offset, l1Index, l2Index };
    const table = this.l2cache.peek(loc.offset);
    if (table) return this.mapIn(table, offset, limit, l1Index, l2Index);
    return this.l2cache.get(loc.offset).then((t) => this.mapIn(t, offset, limit, l1Index, l2Index));
  }

  /** lookup's answer from the L2 table itself. */
  private mapIn(tb: Buffer, offset: number, limit: number, l1Index: number, l2Index: number): Mapping {
    const first = decodeL2(tb, l2Index, this.clusterBits, this.v3);
    if (first.bad) throw new BlockIOError('EIO', `qcow2: ${first.bad} (guest offset ${offset})`);
    const gc = Math.floor(offset / this.cs);
    let end = (gc + 1) * this.cs;
    if (first.type !== 'compressed') {
      // The run goes on while the raw entries are what the first one predicts: the same flag bits and,
      // for host clusters, the next host offset (an entry that differs otherwise just ends the run; the
      // next lookup decodes it in full). No per-entry objects on this path.
      const hi0 = tb.readUInt32BE(l2Index * 8);
      const lo0 = tb.readUInt32BE(l2Index * 8 + 4);
      const hosted = first.type === 'normal' || first.type === 'zero-alloc';
      for (let i = l2Index + 1; end < limit; i++) {
        const hi = tb.readUInt32BE(i * 8);
        const lo = tb.readUInt32BE(i * 8 + 4);
        if (hosted) {
          const want = first.offset + (i - l2Index) * this.cs;
          if (hi !== ((hi0 & ~OFFSET_MASK_HI) | Math.floor(want / 2 ** 32)) >>> 0 || lo !== ((lo0 & ~OFFSET_MASK_LO) | want % 2 ** 32) >>> 0) break;
        } else if (hi !== hi0 || lo !== lo0) break;
        end += this.cs;
      }
    }
    return { entry: first, bytes: Math.min(end, limit) - offset, l1Index, l2Index };
  }

  // ---- read ---------------------------------------------------------------------------------------

  protected async doRead(offset: number, bytes: number): Promise<Buffer> {
    return this.lock.withShared(() => this.readUnlocked(offset, bytes));
  }

  protected override async doReadInto(offset: number, buf: Buffer): Promise<void> {
    return this.lock.withShared(() => this.readUnlockedInto(offset, buf));
  }

  private async readUnlocked(offset: number, bytes: number): Promise<Buffer> {
    if (bytes === 0) return Buffer.alloc(0);
    // One host-contiguous run covers the whole request: the file's buffer is the answer (no copy).
    const m = await this.lookup(offset, bytes);
    if (m.bytes >= bytes && m.entry.type === 'normal') return this.readFile(m.entry.offset + (offset % this.cs), bytes);
    // Every byte is written by readUnlockedInto: no need to zero the buffer first.
    const out = Buffer.allocUnsafe(bytes);
    await this.readUnlockedInto(offset, out);
    return out;
  }

  private async readUnlockedInto(offset: number, out: Buffer): Promise<void> {
    const bytes = out.length;
    let pos = 0;
    while (pos < bytes) {
      const off = offset + pos;
      const m = await this.lookup(off, bytes - pos);
      const n = m.bytes;
      const e = m.entry;
      const dst = pos === 0 && n >= bytes ? out : out.subarray(pos, pos + n);
      switch (e.type) {
        case 'unallocated': {
          const b = this.backing();
          const k = b && off < b.length() ? Math.min(n, b.length() - off) : 0;
          if (k > 0) await b!.readInto(off, k === n ? dst : dst.subarray(0, k));
          if (k < n) dst.fill(0, k);
          break;
        }
        case 'zero-plain':
        case 'zero-alloc':
          dst.fill(0);
          break;
        case 'normal':
          await this.readFileInto(e.offset + (off % this.cs), dst);
          break;
        case 'compressed': {
          const data = await this.readCompressed(e);
          data.copy(dst, 0, off % this.cs, (off % this.cs) + n);
          break;
        }
      }
      pos += n;
    }
  }

  private async readCompressed(e: L2Entry): Promise<Buffer> {
    if (this.lastCompressed?.offset === e.offset) return this.lastCompressed.data;
    if (e.offset + e.csize > this.file.length() + 512) throw new BlockIOError('EIO', 'qcow2: compressed cluster is beyond the end of the image file');
    const raw = await this.readFile(e.offset, e.csize);
    const data = decompressCluster(raw, this.cs);
    this.lastCompressed = { offset: e.offset, data };
    return data;
  }

  // ---- write --------------------------------------------------------------------------------------

  protected async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    if (flags.compressed) await this.writeCompressed(offset, data);
    else await this.writePayload(offset, data);
    if (flags.fua) await this.doFlush();
  }

  private async writePayload(offset: number, payload: Payload): Promise<void> {
    const len = Buffer.isBuffer(payload) ? payload.length : payload.bytes;
    let pos = 0;
    while (pos < len) {
      const off = offset + pos;
      // Fast path: overwrite clusters that are allocated and exclusively ours.
      const done = await this.lock.withShared(async () => {
        const m = await this.lookup(off, len - pos);
        if (m.entry.type !== 'normal' || !m.entry.copied) return 0;
        this.checkWriteTarget(m.entry, (off % this.cs) + m.bytes);
        await this.writeHostClusters(m.entry.offset + (off % this.cs), slicePayload(payload, pos, pos + m.bytes));
        return m.bytes;
      });
      if (done) {
        pos += done;
        continue;
      }
      let a = await this.withMeta(() => this.prepareAllocation(off, len - pos, false));
      if (a && 'exclusive' in a) a = await this.withAll(() => this.prepareAllocation(off, len - pos, true));
      if (a === undefined || 'exclusive' in a) continue; // became allocated meanwhile: the fast path takes it
      if ('wait' in a) {
        await a.wait; // an allocation of the same clusters is in flight
        continue;
      }
      await this.completeAllocation(a, off, slicePayload(payload, pos, pos + a.bytes));
      pos += a.bytes;
    }
  }

  private writeHostClusters(hostOffset: number, payload: Payload): Promise<void> {
    return Buffer.isBuffer(payload) ? this.file.write(hostOffset, payload) : this.file.writeHost(hostOffset, payload);
  }

  // ---- compressed writes --------------------------------------------------------------------------

  override supportsCompressedWrites(): boolean {
    return true;
  }

  /**
   * Where the next compressed cluster's data goes (QEMU's free_byte_offset): the first free byte of
   * the host cluster the last compressed data went into, 0 when a new host cluster is needed.
   * Compressed clusters are packed byte by byte, several into one host cluster, whose refcount counts
   * the compressed clusters with data in it.
   */
  private freeByteOffset = 0;

  /**
   * qcow2_co_pwritev_compressed_part: whole clusters from a cluster boundary (the last one may end at
   * the end of the image), each compressed on its own (EINVAL otherwise, as QEMU).
   */
  private async writeCompressed(offset: number, data: Buffer): Promise<void> {
    if (offset % this.cs || (data.length % this.cs && offset + data.length !== this.header.size)) throw new BlockIOError('EINVAL');
    const writes: Array<Promise<void>> = [];
    for (let pos = 0; pos < data.length; pos += this.cs) writes.push(this.writeCompressedCluster(offset + pos, data.subarray(pos, pos + this.cs)));
    // Every cluster's write has ended before the request does (none goes on behind a failed one).
    const failed = (await Promise.allSettled(writes)).find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /**
   * qcow2_co_pwritev_compressed_task for one guest cluster: deflate it (a short last cluster padded
   * with zeroes); data that does not shrink is written as a normal cluster, as QEMU does. Otherwise,
   * as the other allocating writes: allocate the bytes (meta lock, the guest cluster in flight), write
   * the data with no lock held, then link the compressed descriptor into the L2 table (the refcount
   * blocks are written back before the L2 table that references the bytes, formats.md §1.9).
   */
  private async writeCompressedCluster(offset: number, chunk: Buffer): Promise<void> {
    let cluster = chunk;
    if (chunk.length < this.cs) {
      cluster = Buffer.alloc(this.cs);
      chunk.copy(cluster);
    }
    const packed = await compressCluster(cluster);
    if (!packed) return this.writePayload(offset, chunk);
    let a: InFlightAllocation;
    for (;;) {
      let r = await this.withMeta(() => this.prepareCompressed(offset, packed.length, false));
      if ('exclusive' in r) r = await this.withAll(() => this.prepareCompressed(offset, packed.length, true));
      if ('wait' in r) {
        await r.wait; // an allocation of this cluster is in flight: look again once it is linked
        continue;
      }
      if ('exclusive' in r) continue;
      a = r;
      break;
    }
    try {
      try {
        await this.file.write(a.host, packed);
      } catch (err) {
        // Nothing references the bytes: give them back.
        await this.withMeta(() => this.releaseCompressedBytes(a.host, packed.length, 'never')).catch(() => undefined);
        throw err;
      }
      await this.withMeta(async () => {
        const t = await this.ensureL2(a.l1Index);
        encodeCompressedEntry(t.table, a.l2Index, a.host, packed.length, this.clusterBits);
        this.l2cache.markDirty(t.offset);
        await this.maybeWriteback();
      });
    } finally {
      this.endAllocation(a);
      a.resolve();
    }
  }

  /**
   * qcow2_alloc_compressed_cluster_offset (meta lock held; `exclusive` when both locks are): refuse a
   * cluster that has a host offset already (EIO, as QEMU: compression cannot overwrite anything), make
   * its L2 table ours, allocate `bytes` for the data and mark the guest cluster in flight.
   */
  private async prepareCompressed(offset: number, bytes: number, exclusive: boolean): Promise<InFlightAllocation | { wait: Promise<void> } | { exclusive: true }> {
    const busy = this.allocationOverlapping(offset, offset + this.cs);
    if (busy) return { wait: busy.done };
    const m = await this.lookup(offset, this.cs);
    const e = m.entry;
    // Plain EIO, no text of our own: a backup job reports it as QEMU's does ("Input/output error").
    if (e.type === 'normal' || e.type === 'zero-alloc' || e.type === 'compressed') throw new BlockIOError('EIO');
    // Copying a shared L2 table frees the old one: readers must not be using it.
    if (!exclusive && m.l1Index < this.header.l1Size) {
      const l1e = decodeL1(this.l1, m.l1Index);
      if (l1e.offset && !l1e.copied) return { exclusive: true };
    }
    await this.markDirtyIfLazy();
    await this.ensureL2(m.l1Index);
    const host = await this.allocCompressedBytes(bytes);
    let resolve!: () => void;
    const gEnd = Math.min(this.header.size, offset + this.cs);
    const a: InFlightAllocation = { gStart: offset, gEnd, nClusters: 1, host, reuse: false, cowZero: false, frees: false, bytes: gEnd - offset, l1Index: m.l1Index, l2Index: m.l2Index, done: new Promise<void>((r) => (resolve = r)), resolve };
    this.allocsInFlight.push(a);
    return a;
  }

  /**
   * qcow2_alloc_bytes: `bytes` (less than a cluster) at the free byte offset when they fit in its host
   * cluster, or run on into the next host cluster when that is the one allocated next; else at the
   * start of a new host cluster. Every host cluster the bytes touch gains one reference.
   */
  private async allocCompressedBytes(bytes: number): Promise<number> {
    let off = this.freeByteOffset;
    if (off) {
      // A full refcount (refcount_bits=1: any) takes no more references; a freed cluster is not ours.
      const rc = await this.rc.get(Math.floor(off / this.cs));
      if (rc === 0 || rc >= this.rc.maxRefcount) off = 0;
    }
    const room = off ? this.cs - (off % this.cs) : 0;
    if (off && room >= bytes) {
      await this.rc.update(Math.floor(off / this.cs), 1);
    } else {
      const fresh = await this.rc.alloc(1, this.isReserved);
      if (off && fresh === off + room) await this.rc.update(Math.floor(off / this.cs), 1);
      else off = fresh;
    }
    if (off + bytes > compressedOffsetLimit(this.clusterBits)) {
      await this.releaseCompressedBytes(off, bytes, 'never');
      throw new BlockIOError('EFBIG');
    }
    this.freeByteOffset = (off + bytes) % this.cs ? off + bytes : 0;
    if (this.lastCompressed?.offset === off) this.lastCompressed = undefined;
    return off;
  }

  /**
   * Drop the references of compressed data at [offset, +bytes) to the host clusters it touches (meta
   * lock held). Bytes are never handed out again from a cluster that lost references this way: the
   * free byte offset moves on to a new cluster. `reason`: whether a host cluster left unused is
   * discarded on the file (discard.ts).
   */
  private async releaseCompressedBytes(offset: number, bytes: number, reason: FreeReason): Promise<void> {
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + bytes - 1) / this.cs);
    if (this.freeByteOffset && Math.floor(this.freeByteOffset / this.cs) >= first && Math.floor(this.freeByteOffset / this.cs) <= last) this.freeByteOffset = 0;
    await this.rc.updateRun(first, last - first + 1, -1, reason);
  }

  // ---- copy offload -------------------------------------------------------------------------------

  /** Normal clusters lie in the file as they are; unallocated ones in the backing node, if any. */
  protected override async doMapHost(offset: number, bytes: number): Promise<HostRange | undefined> {
    const m = await this.lock.withShared(() => this.lookup(offset, bytes));
    const n = Math.min(bytes, m.bytes);
    if (m.entry.type === 'normal') return this.file.mapHost(m.entry.offset + (offset % this.cs), n);
    const b = this.backing();
    if (m.entry.type === 'unallocated' && b && offset < b.length()) return b.mapHost(offset, Math.min(n, b.length() - offset));
    return undefined;
  }

  /** Whole clusters only: a partial one needs copy-on-write of the rest, which is a read and a write. */
  protected override canWriteHost(offset: number, bytes: number): boolean {
    return offset % this.cs === 0 && (offset + bytes) % this.cs === 0 && this.file.acceptsHostCopy(0, this.cs);
  }

  protected override doWriteHost(offset: number, src: HostRange): Promise<void> {
    return this.writePayload(offset, src);
  }

  private withMeta<T>(fn: () => Promise<T>): Promise<T> {
    return this.meta.withExclusive(fn);
  }

  /** Both locks: no reader, writer or metadata change runs meanwhile. */
  private withAll<T>(fn: () => Promise<T>): Promise<T> {
    return this.lock.withExclusive(() => this.meta.withExclusive(fn));
  }

  /** Before the first allocation of a session with lazy refcounts, set the dirty bit (durably). */
  private async markDirtyIfLazy(): Promise<void> {
    if (this.markedDirty || !(this.header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS)) return;
    await this.writebackMetadata();
    this.header.incompatibleFeatures |= INCOMPAT_DIRTY;
    await this.writeHeader();
    this.markedDirty = true;
    this.dirtySetByUs = true;
  }

  /** An allocation in flight that overlaps guest clusters [start, end) (byte offsets), if any. */
  private allocationOverlapping(start: number, end: number): InFlightAllocation | undefined {
    const allocs = this.allocsInFlight;
    for (let i = 0; i < allocs.length; i++) if (allocs[i].gStart < end && start < allocs[i].gEnd) return allocs[i];
    return undefined;
  }

  /** An allocation is linked (or failed): it is no longer in flight. */
  private endAllocation(a: InFlightAllocation): void {
    const i = this.allocsInFlight.indexOf(a);
    if (i >= 0) this.allocsInFlight.splice(i, 1);
  }

  /**
   * Step 1 of an allocating write (exclusive lock held): the run of clusters at `offset` that needs
   * new host clusters, its L2 table made ours, and the host clusters allocated (refcounts raised in
   * the cache) in one contiguous run. The guest clusters are marked in flight so that no other request
   * allocates or zeroes them until the L2 entries are linked. Returns undefined when the clusters are
   * now allocated and ours (overwrite them), or { wait } when another allocation of some
   * of these clusters is in flight.
   */
  private async prepareAllocation(
    offset: number,
    len: number,
    exclusive: boolean,
  ): Promise<InFlightAllocation | { wait: Promise<void> } | { exclusive: true } | undefined> {
    const m = await this.lookup(offset, len);
    const e = m.entry;
    if (e.type === 'normal' && e.copied) return undefined;
    // Copying a shared L2 table frees the old one: readers must not be using it.
    if (!exclusive && m.l1Index < this.header.l1Size) {
      const l1e = decodeL1(this.l1, m.l1Index);
      if (l1e.offset && !l1e.copied) return { exclusive: true };
    }
    const gStart = offset - (offset % this.cs);
    const gEnd = Math.min(this.header.size, Math.ceil((offset + m.bytes) / this.cs) * this.cs);
    const busy = this.allocationOverlapping(gStart, gEnd);
    if (busy) return { wait: busy.done }; // (wrapped: an async function would adopt the promise)
    const nClusters = Math.ceil((gEnd - gStart) / this.cs);
    await this.markDirtyIfLazy();
    await this.ensureL2(m.l1Index);
    const reuse = e.type === 'zero-alloc' && e.copied;
    if (reuse) this.checkWriteTarget(e, nClusters * this.cs);
    // The old contents of the run read as zeroes: partial clusters need no copy-on-write reads.
    const cowZero = e.type === 'zero-plain' || e.type === 'zero-alloc' || (e.type === 'unallocated' && !this.backing());
    const host = reuse ? e.offset : await this.rc.alloc(nClusters, this.isReserved);
    let resolve!: () => void;
    // Replaced clusters are freed when the new ones are linked (then readers must be out of the way).
    const frees = !reuse && (e.type === 'normal' || e.type === 'compressed' || e.type === 'zero-alloc');
    const a: InFlightAllocation = { gStart, gEnd, nClusters, host, reuse, cowZero, frees, bytes: m.bytes, l1Index: m.l1Index, l2Index: m.l2Index, done: new Promise<void>((r) => (resolve = r)), resolve };
    this.allocsInFlight.push(a);
    return a;
  }

  /**
   * Steps 2 and 3 (no lock held while the data is written, so allocating writes run side by side as
   * in QEMU): build the clusters (old contents under the new data, only for partial clusters), write
   * them in one request, then link the L2 entries under the exclusive lock and drop references to
   * replaced clusters. The data is written before its L2 entries change in the cache, and the
   * write-back's flush after the refcount blocks covers it (formats.md §1.9, steps 1-2).
   */
  private async completeAllocation(a: InFlightAllocation, offset: number, data: Payload): Promise<void> {
    try {
      try {
        const headLen = offset - a.gStart;
        const tailStart = offset + a.bytes;
        const full = a.nClusters * this.cs;
        let buf: Payload;
        if (headLen === 0 && a.bytes === full) {
          buf = data;
        } else if (!Buffer.isBuffer(data)) {
          throw new Error('qcow2: a host copy must cover whole clusters');
        } else {
          // Page-aligned when the native addon is there, so an O_DIRECT file needs no bounce copy.
          buf = nativeAddon()?.alignedBuffer(full, 4096) ?? Buffer.alloc(full);
          const lastStart = a.gStart + (a.nClusters - 1) * this.cs;
          if (headLen > 0 && !a.cowZero) (await this.lock.withShared(() => this.readUnlocked(a.gStart, Math.min(this.cs, a.gEnd - a.gStart)))).copy(buf, 0);
          if (tailStart < a.gEnd && !a.cowZero && !(headLen > 0 && lastStart === a.gStart)) {
            (await this.lock.withShared(() => this.readUnlocked(lastStart, a.gEnd - lastStart))).copy(buf, lastStart - a.gStart);
          }
          data.copy(buf, headLen);
        }
        await this.writeHostClusters(a.host, buf);
      } catch (err) {
        // Nothing references the new clusters: give them back.
        if (!a.reuse) await this.withMeta(() => this.rc.free(a.host, a.nClusters, 'never')).catch(() => undefined);
        throw err;
      }
      const link = async () => {
        const t = await this.ensureL2(a.l1Index);
        const old: L2Entry[] = [];
        for (let k = 0; k < a.nClusters; k++) {
          const idx = a.l2Index + k;
          const prev = decodeL2(t.table, idx, this.clusterBits, this.v3);
          if (!a.reuse && (prev.type === 'normal' || prev.type === 'compressed' || prev.type === 'zero-alloc')) old.push(prev);
          encodeEntry(t.table, idx, a.host + k * this.cs, COPIED_HI);
        }
        this.l2cache.markDirty(t.offset);
        // As QEMU, the clusters an overwrite replaced are never discarded on the file.
        if (old.length) await this.freeEntries(old, 'never');
        await this.maybeWriteback();
      };
      await (a.frees ? this.withAll(link) : this.withMeta(link));
    } finally {
      this.endAllocation(a);
      a.resolve();
    }
  }

  /** The L2 table for `l1Index`, allocated (or copied, if shared) if needed (§1.9 step 3). */
  private ensureL2(l1Index: number): { table: Buffer; offset: number } | Promise<{ table: Buffer; offset: number }> {
    // The table is ours and cached (every allocation after the first in its range): no wait.
    const loc = this.l2Location(l1Index);
    const table = loc?.copied ? this.l2cache.peek(loc.offset) : undefined;
    if (table) return { table, offset: loc!.offset };
    return this.newL2(l1Index);
  }

  private async newL2(l1Index: number): Promise<{ table: Buffer; offset: number }> {
    const cur = await this.l2Table(l1Index);
    if (cur && cur.copied) return cur;
    const newOff = await this.rc.alloc(1, this.isReserved);
    const content = cur ? Buffer.from(cur.table) : Buffer.alloc(this.cs);
    await this.rc.flush();
    await this.file.write(newOff, content);
    await this.file.flush();
    this.l2cache.putClean(newOff, content);
    encodeEntry(this.l1, l1Index, newOff, COPIED_HI);
    this.countL2(newOff, 1);
    if (cur) this.countL2(cur.offset, -1);
    await this.file.write(this.header.l1TableOffset + l1Index * 8, Buffer.from(this.l1.subarray(l1Index * 8, l1Index * 8 + 8)));
    await this.file.flush();
    if (cur) {
      // The shared table lost one reference (the active L1's); the clusters it maps are now also
      // referenced by the copy, which the snapshot's own count already accounted for.
      this.l2cache.drop(cur.offset);
      await this.rc.free(cur.offset, 1, 'other');
    }
    return { table: content, offset: newOff };
  }

  /**
   * Drop references to host clusters whose L2 entries were just replaced (in the cache); those left
   * unused are discarded on the file, together once all are dropped, when `reason` passes.
   */
  private async freeEntries(old: L2Entry[], reason: FreeReason): Promise<void> {
    await this.writebackMetadata();
    await this.rc.discards.batch(async () => {
      for (const e of old) {
        if (e.type === 'compressed') {
          await this.releaseCompressedBytes(e.offset, e.csize, reason);
          if (this.lastCompressed?.offset === e.offset) this.lastCompressed = undefined;
        } else {
          await this.rc.free(e.offset, 1, reason);
        }
      }
    });
  }

  /** Refcount blocks → flush → L2 tables → flush (exclusive lock held). */
  private async writebackMetadata(): Promise<void> {
    const l2Dirty = this.l2cache.isDirty();
    if (!l2Dirty && !this.rc.cache.isDirty()) return;
    await this.rc.cache.writeback();
    await this.file.flush();
    if (l2Dirty) {
      await this.l2cache.writeback();
      await this.file.flush();
    }
  }

  private async maybeWriteback(): Promise<void> {
    if (this.l2cache.overfull() || this.rc.cache.overfull()) await this.writebackMetadata();
  }

  // ---- write zeroes / discard ---------------------------------------------------------------------

  /**
   * Write zeroes as QEMU 7.2's qcow2 does (compared with qemu-io by qemu-img map, qcow2-zeroes-qemu.test.ts).
   * The request is taken in QEMU's block-layer pieces, split at cluster boundaries:
   * - whole clusters become zero clusters (v3), over unallocated ones too, with or without a backing
   *   file; a cluster we own stays allocated (ZERO_ALLOC) unless the write may unmap (MAY_UNMAP);
   * - a piece of a cluster: when the cluster is unallocated or zero here and the rest of it reads as
   *   zeroes through the backing chain (by block status, as QEMU's is_zero), the whole cluster becomes
   *   a zero cluster; otherwise the piece is written as data (QEMU's driver says ENOTSUP and its block
   *   layer writes a buffer of zeroes);
   * - v2 has no zero clusters: without a backing file the clusters are discarded (they read as zeroes
   *   then), with one the zeroes are written as data.
   */
  protected override async doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    if (!this.v3 && this.backing()) return super.doWriteZeroes(offset, bytes, flags);
    // MAY_UNMAP is honoured whatever the node's discard option says: QEMU checks that option only where
    // a driver passes zeroes on to its child, not for a request to the qcow2 node itself (verified with
    // qemu-storage-daemon, discard=ignore, an NBD client's write-zeroes without NO_HOLE).
    const mode = !this.v3 ? 'discard' : flags.mayUnmap === true ? 'unmap' : 'zero';
    const size = this.header.size;
    const end = offset + bytes;
    for (let pos = offset; pos < end; ) {
      const cStart = Math.floor(pos / this.cs) * this.cs;
      const cEnd = Math.min(size, cStart + this.cs);
      if (pos === cStart && end >= cEnd) {
        // Whole clusters (the image's last one may be shorter).
        const wEnd = end === size ? size : Math.floor(end / this.cs) * this.cs;
        await this.zeroClustersWhenIdle(pos, wEnd, mode);
        pos = wEnd;
        continue;
      }
      const pEnd = Math.min(end, cEnd);
      const wholeCluster = await this.zeroClustersWhenIdle(cStart, cEnd, mode, () => this.restOfClusterReadsZeroes(cStart, cEnd, pos, pEnd));
      if (!wholeCluster) {
        // No fallback (BDRV_REQ_NO_FALLBACK): where QEMU's driver says ENOTSUP, so does the request.
        if (flags.noFallback) throw new BlockIOError('ENOTSUP');
        await this.doWrite(pos, Buffer.alloc(pEnd - pos), {});
      }
      pos = pEnd;
    }
    if (flags.fua) await this.doFlush();
  }

  /**
   * For a zero write of [p0, p1) inside the cluster [cStart, cEnd) (exclusive lock held): whether the
   * cluster is unallocated or zero in this image and the rest of it reads as zeroes.
   */
  private async restOfClusterReadsZeroes(cStart: number, cEnd: number, p0: number, p1: number): Promise<boolean> {
    const type = (await this.lookup(cStart, cEnd - cStart)).entry.type;
    if (type === 'zero-plain' || type === 'zero-alloc') return true;
    if (type !== 'unallocated') return false;
    const below = this.backing();
    if (!below) return true;
    return (await readsAsZeroes(below, cStart, p0 - cStart)) && (await readsAsZeroes(below, p1, cEnd - p1));
  }

  protected override async doDiscard(offset: number, bytes: number): Promise<void> {
    if (!this.unmapAllowed) return;
    const end = offset + bytes;
    const aStart = Math.ceil(offset / this.cs) * this.cs;
    const aEnd = end === this.header.size ? end : Math.floor(end / this.cs) * this.cs;
    if (aStart >= aEnd) return;
    await this.zeroClustersWhenIdle(aStart, aEnd, 'discard');
  }

  /**
   * zeroClusters under the exclusive lock, once no allocation of these clusters is in flight, and only
   * if `onlyIf` (checked in the same step) says so: whether it zeroed them.
   */
  private async zeroClustersWhenIdle(start: number, end: number, mode: 'zero' | 'unmap' | 'discard', onlyIf?: () => Promise<boolean>): Promise<boolean> {
    for (;;) {
      const outcome = await this.withAll(async (): Promise<{ wait: Promise<unknown> } | { zeroed: boolean }> => {
        const a = this.allocationOverlapping(start, end);
        if (a) return { wait: a.done };
        if (onlyIf && !(await onlyIf())) return { zeroed: false };
        await this.zeroClusters(start, end, mode);
        return { zeroed: true };
      });
      if ('zeroed' in outcome) return outcome.zeroed;
      await outcome.wait;
    }
  }

  /**
   * Change whole clusters in [start, end) to zero clusters, unallocated ones included, as QEMU 7.2's
   * zero_in_l2_slice does: a compressed cluster always loses its host cluster, an allocated one
   * (normal or already zero) only with 'unmap'; with 'zero' every other cluster keeps its host offset
   * and its COPIED flag and gains the zero flag, so a cluster an internal snapshot shares stays shared.
   * 'discard' makes them unallocated, or zero when a backing file would show through on v3; 'cut'
   * (QEMU's full discard, of the clusters a shrink crops) makes them unallocated whatever is below.
   * Freed clusters are released after the new entries are durable, and discarded on the file as
   * QEMU's discard types say: 'cut' always, the others when pass-discard-request is on.
   */
  private async zeroClusters(start: number, end: number, mode: 'zero' | 'unmap' | 'discard' | 'cut'): Promise<void> {
    await this.markDirtyIfLazy();
    const hasBacking = !!this.backing();
    const old: L2Entry[] = [];
    for (let off = start; off < end; ) {
      const m = await this.lookup(off, end - off);
      const n = m.bytes;
      const nCl = Math.ceil(n / this.cs);
      const e = m.entry;
      const want: 'keep' | 'zero-plain' | 'unallocated' | 'zero-alloc' =
        mode === 'discard' || mode === 'cut'
          ? mode === 'discard' && hasBacking && this.v3
            ? e.type === 'zero-plain'
              ? 'keep'
              : 'zero-plain'
            : e.type === 'unallocated'
              ? 'keep'
              : 'unallocated'
          : e.type === 'zero-plain'
            ? 'keep'
            : e.type === 'zero-alloc'
              ? mode === 'unmap'
                ? 'zero-plain'
                : 'keep'
              : e.type === 'normal' && mode === 'zero'
                ? 'zero-alloc'
                : 'zero-plain';
      // As QEMU's get_cluster_table, the L2 table is made ours (allocated, or copied when an internal
      // snapshot shares it) even where no entry changes: the images stay the same cluster for cluster.
      const t = await this.ensureL2(m.l1Index);
      if (want !== 'keep') {
        for (let k = 0; k < nCl; k++) {
          const idx = m.l2Index + k;
          const prev = decodeL2(t.table, idx, this.clusterBits, this.v3);
          if (want === 'zero-alloc') {
            encodeEntry(t.table, idx, prev.offset, prev.copied ? COPIED_HI : 0, 1);
            continue;
          }
          if (prev.type === 'normal' || prev.type === 'compressed' || prev.type === 'zero-alloc') old.push(prev);
          encodeEntry(t.table, idx, 0, 0, want === 'zero-plain' ? 1 : 0);
        }
        this.l2cache.markDirty(t.offset);
      }
      off += n;
    }
    if (old.length) await this.freeEntries(old, mode === 'cut' ? 'always' : 'request');
    await this.maybeWriteback();
  }

  // ---- flush / close ------------------------------------------------------------------------------

  protected async doFlush(): Promise<void> {
    if (this.readOnly) return;
    await this.withMeta(async () => {
      await this.writebackMetadata();
      await this.file.flush();
    });
  }

  /**
   * The write phase of a read-write open (open.ts only reads and validates): repair a dirty image's
   * refcounts, clear autoclear bits we do not know, mark the bitmaps the layer above loaded in_use
   * (formats.md §2.5; a crash before they are stored leaves them inconsistent).
   */
  protected override async doActivate(): Promise<void> {
    if (this.readOnly) return;
    await this.prepareForWriting();
    if (this.loadedBitmapNames.length) await this.setBitmapsInUse(this.loadedBitmapNames, true);
    this.loadedBitmapNames = [];
  }

  /** What a writer does first: repair a dirty image's refcounts, or clear autoclear bits it does not know. */
  private async prepareForWriting(): Promise<void> {
    const h = this.header;
    if (h.incompatibleFeatures & INCOMPAT_DIRTY) await this.repairRefcounts();
    // The write-intent record covering the bitmaps about to be marked in_use (write-intent.ts).
    const hadIntent = h.unknownExtensions.some((e) => e.type === EXT_WRITE_INTENT);
    const armed = this.prepareWriteIntent(this.loadedBitmapNames);
    // A writer must clear autoclear bits it does not know (and bit 0 when the extension is ignored).
    const known = (h.bitmaps ? AUTOCLEAR_BITMAPS : 0n) | (armed ? AUTOCLEAR_WRITE_INTENT : 0n);
    if (h.autoclearFeatures & ~known || armed || hadIntent) {
      h.autoclearFeatures &= known;
      await this.writeHeader();
    }
  }

  // ---- reopen -------------------------------------------------------------------------------------

  /** qcow2_update_options: what qcow2 lets blockdev-reopen change (pass-discard-* take effect, see reopenCommit; the others bitmirror keeps as given). */
  override reopenableOptions(): readonly string[] {
    return [
      'lazy-refcounts', 'pass-discard-request', 'pass-discard-snapshot', 'pass-discard-other', 'overlap-check',
      'cache-size', 'l2-cache-size', 'l2-cache-entry-size', 'refcount-cache-size', 'cache-clean-interval',
    ];
  }

  /** Going read-only: everything cached is written back and the image marked clean, as at close. */
  override async reopenPrepare(change: ReopenChange): Promise<void> {
    checkRuntimeOptions(change.options, this.header);
    if (!change.readOnly || this.readOnly || !this.activated) return;
    await this.withAll(async () => {
      await this.writebackMetadata();
      if (this.markedDirty && this.header.incompatibleFeatures & INCOMPAT_DIRTY) {
        await this.file.flush();
        this.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
        await this.writeHeader();
        this.markedDirty = false;
        this.dirtySetByUs = false;
      }
      await this.file.flush();
    });
  }

  override reopenCommit(change: ReopenChange): void {
    super.reopenCommit(change);
    this.unmapAllowed = change.options.discard === 'unmap';
    // As qcow2_update_options: an option left out goes back to its default.
    this.rc.passthrough = discardPassthrough(change.options);
  }

  /**
   * Became writable (qcow2_reopen_bitmaps_rw): the writer's first steps, and the stored bitmaps,
   * which the layer above now lets change, are marked in use on disk.
   */
  override async reopenFinish(_change: ReopenChange, wasReadOnly: boolean): Promise<void> {
    if (!wasReadOnly || this.readOnly) return;
    // As after a read-write open: the bitmaps about to be in use are covered by the write-intent record.
    const names = this.bitmapsValid() ? this.cachedBitmaps.filter((b) => !b.inUse).map((b) => b.name) : [];
    this.loadedBitmapNames = names;
    await this.prepareForWriting();
    if (names.length) await this.setBitmapsInUse(names, true);
    this.loadedBitmapNames = [];
  }

  protected override async doClose(): Promise<void> {
    // A node whose open did not complete has written nothing and writes nothing now.
    if (!this.readOnly && this.activated) {
      await this.withAll(async () => {
        await this.writebackMetadata();
        if (this.markedDirty && this.header.incompatibleFeatures & INCOMPAT_DIRTY) {
          await this.file.flush();
          this.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
          await this.writeHeader();
          this.markedDirty = false;
          this.dirtySetByUs = false;
        }
        await this.file.flush();
      });
    }
    this.l2cache.clear();
    this.rc.cache.clear();
  }

  // ---- resize -------------------------------------------------------------------------------------

  /**
   * qcow2_co_truncate (block_resize): QEMU's checks in its order, then the tables changed (grown: the
   * L1 table grown to cover the new size; shrunk: see shrinkTables), then the size in the header, each
   * step synced before the next depends on it, so a crash leaves the old size or the new one. As
   * qemu-storage-daemon 7.2, an image with internal snapshots is resized too (each snapshot keeps the
   * size it was taken at and the clusters it references).
   */
  protected override async doTruncate(size: number): Promise<void> {
    if (size % 512) throw genericError('The new size must be a multiple of 512');
    // qcow2_truncate_bitmaps_check: every bitmap stored in the image must be in memory and usable.
    this.checkStoredBitmapsResizable(this.bitmapsValid() ? this.cachedBitmaps.map((b) => b.name) : []);
    const needL1 = Math.ceil(size / (this.cs * this.l2Entries));
    if (needL1 * 8 > MAX_L1_BYTES) throw genericError('Failed to grow the L1 table: File too large');
    for (;;) {
      const busy = await this.withAll(async (): Promise<{ wait: Promise<void> } | undefined> => {
        if (size < this.header.size) {
          // Clusters being allocated past the new end are linked first, then cropped. Wrapped: an
          // async function returning the promise would adopt it, waiting under the exclusive lock
          // for an allocation that needs the lock to finish.
          const a = this.allocationOverlapping(size, this.header.size);
          if (a) return { wait: a.done };
          await this.shrinkTables(size, needL1);
        } else if (needL1 > this.header.l1Size) {
          await this.growL1(needL1);
        }
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(BigInt(size));
        try {
          await this.file.write(24, b);
          await this.file.flush();
        } catch (err) {
          throw genericError(`Failed to update the image size: ${errorMessage(err)}`);
        }
        this.header.size = size;
        return undefined;
      });
      if (!busy) return;
      await busy.wait;
    }
  }

  /**
   * The shrinking half of qcow2_co_truncate (exclusive lock held): the whole clusters past the new end
   * become unallocated and lose their references (a partial last cluster keeps its data, as in QEMU);
   * the L1 entries past the tables the new size needs are zeroed on disk (l1_size in the header stays,
   * as QEMU leaves it) and their L2 tables freed; refcount blocks left counting nothing leave the
   * refcount table; then the file is cut after its last referenced cluster (a failure there is only a warning: the image is consistent either way).
   */
  private async shrinkTables(size: number, l1Entries: number): Promise<void> {
    const from = Math.ceil(size / this.cs) * this.cs;
    try {
      if (from < this.header.size) await this.zeroClusters(from, this.header.size, 'cut');
      await this.writebackMetadata();
    } catch (err) {
      throw genericError(`Failed to discard cropped clusters: ${errorMessage(err)}`);
    }
    try {
      if (l1Entries < this.header.l1Size) {
        await this.file.write(this.header.l1TableOffset + l1Entries * 8, Buffer.alloc((this.header.l1Size - l1Entries) * 8));
        await this.file.flush();
        await this.rc.discards.batch(async () => {
          for (let i = this.header.l1Size - 1; i >= l1Entries; i--) {
            const loc = this.l2Location(i);
            this.l1.writeBigUInt64BE(0n, i * 8);
            if (!loc) continue;
            this.countL2(loc.offset, -1);
            this.l2cache.drop(loc.offset);
            await this.rc.free(loc.offset, 1, 'always');
          }
        });
        await this.writebackMetadata();
        await this.file.flush();
      }
    } catch (err) {
      throw genericError(`Failed to reduce the number of L2 tables: ${errorMessage(err)}`);
    }
    try {
      await this.rc.dropUnusedBlocks();
    } catch (err) {
      throw genericError(`Failed to discard unused refblocks: ${errorMessage(err)}`);
    }
    const fileLength = this.file.length();
    let last = Math.ceil(fileLength / this.cs) - 1;
    while (last >= 0 && (await this.rc.get(last)) === 0) last--;
    if ((last + 1) * this.cs < fileLength) {
      try {
        await this.file.truncate((last + 1) * this.cs);
      } catch (err) {
        process.stderr.write(`warning: Failed to truncate the tail of the image: ${errorMessage(err)}\n`);
      }
    }
  }

  /**
   * qcow2_grow_l1_table with an exact size: a new table (the old entries, then zeroes) in fresh
   * clusters, synced; then l1_size and l1_table_offset switched in one header write, synced; then the
   * old table's clusters freed.
   */
  private async growL1(entries: number): Promise<void> {
    const bytes = entries * 8;
    const clusters = Math.ceil(bytes / this.cs);
    const table = Buffer.alloc(clusters * this.cs);
    this.l1.copy(table, 0, 0, this.header.l1Size * 8);
    try {
      await this.writebackMetadata();
      const off = await this.rc.alloc(clusters, this.isReserved);
      await this.rc.flush();
      await this.file.write(off, table);
      await this.file.flush();
      const hdr = Buffer.alloc(12);
      hdr.writeUInt32BE(entries, 0);
      hdr.writeBigUInt64BE(BigInt(off), 4);
      await this.file.write(36, hdr);
      await this.file.flush();
      const old = { offset: this.header.l1TableOffset, clusters: Math.ceil((this.header.l1Size * 8) / this.cs) };
      this.header.l1TableOffset = off;
      this.header.l1Size = entries;
      this.l1 = table.subarray(0, bytes);
      if (old.clusters > 0) await this.rc.free(old.offset, old.clusters, 'other');
      await this.rc.flush();
    } catch (err) {
      throw genericError(`Failed to grow the L1 table: ${errorMessage(err)}`);
    }
  }

  // ---- internal snapshots -------------------------------------------------------------------------

  /** The snapshot table as read at open (or written since). */
  snapshots: Qcow2Snapshot[] = [];

  override snapshotList(): SnapshotEntry[] {
    return this.snapshots.map((sn) => ({ id: sn.id, name: sn.name, vmStateSize: sn.vmStateSize, dateSec: sn.dateSec, dateNsec: sn.dateNsec, vmClockNsec: sn.vmClockNsec, icount: sn.icount }));
  }

  /**
   * qcow2_snapshot_create (the caller has drained the node): the active L1 table copied into new clusters, then every cluster
   * it reaches gains a reference (COPIED cleared where a cluster is now shared, so that later writes
   * copy), all of it durable before the new snapshot table is written and the header points at it.
   */
  override async snapshotCreate(info: Omit<SnapshotEntry, 'id' | 'vmStateSize'>): Promise<SnapshotEntry> {
    if (this.readOnly) throw new BlockIOError('EPERM');
    return this.withAll(async () => {
      if (this.snapshots.length >= MAX_SNAPSHOTS) throw new BlockIOError('EFBIG');
      await this.writebackMetadata();
      const sn: Qcow2Snapshot = {
        ...info,
        id: newSnapshotId(this.snapshots),
        vmStateSize: 0,
        diskSize: this.header.size,
        extraDataSize: 24,
        unknownExtra: Buffer.alloc(0),
        l1TableOffset: 0,
        l1Size: this.header.l1Size,
      };
      const l1Bytes = this.header.l1Size * 8;
      if (l1Bytes > 0) {
        sn.l1TableOffset = await this.rc.alloc(Math.ceil(l1Bytes / this.cs), this.isReserved);
        await this.rc.flush();
        await this.file.write(sn.l1TableOffset, Buffer.from(this.l1.subarray(0, l1Bytes)));
      }
      // Referenced, and COPIED cleared, before the table names the copy (the walk ends synced).
      await this.updateSnapshotRefcount(undefined, 1);
      await this.writeSnapshotTable([...this.snapshots, sn]);
      return sn;
    });
  }

  /**
   * qcow2_snapshot_delete (the caller has drained the node): the entry leaves the table first (a crash then only leaks), then
   * the clusters its L1 table reaches lose a reference (those left unused freed, discarded when
   * pass-discard-snapshot says so), its L1 copy is freed, and the active tables' COPIED flags are
   * set again where a cluster is no longer shared.
   */
  override async snapshotDelete(id: string | undefined, name: string | undefined): Promise<SnapshotEntry> {
    return this.withAll(async () => {
      const i = findSnapshot(this.snapshots, id, name);
      if (i < 0) throw genericError("Can't find the snapshot");
      const sn = this.snapshots[i];
      if (sn.l1TableOffset % this.cs || sn.l1Size * 8 > MAX_L1_BYTES) throw genericError('Snapshot L1 table offset invalid');
      if (this.readOnly) throw genericError(`Failed to remove snapshot from snapshot list: ${strerror('EPERM')}`);
      try {
        await this.writeSnapshotTable(this.snapshots.filter((_, k) => k !== i));
      } catch (err) {
        throw genericError(`Failed to remove snapshot from snapshot list: ${strerror(errorCode(err))}`);
      }
      try {
        await this.updateSnapshotRefcount({ offset: sn.l1TableOffset, size: sn.l1Size }, -1);
        if (sn.l1Size > 0) await this.rc.free(sn.l1TableOffset, Math.ceil((sn.l1Size * 8) / this.cs), 'snapshot');
        await this.rc.flush();
      } catch (err) {
        throw genericError(`Failed to free the cluster and L1 table: ${strerror(errorCode(err))}`);
      }
      try {
        await this.updateSnapshotRefcount(undefined, 0);
      } catch (err) {
        throw genericError(`Failed to update snapshot status in disk: ${strerror(errorCode(err))}`);
      }
      return sn;
    });
  }

  /**
   * qcow2_update_snapshot_refcount: add `addend` to the refcount of every cluster the L1 table reaches
   * (the active one when `l1` is undefined): its L2 tables, their data clusters, and for a compressed
   * cluster every host cluster its data touches (QEMU's count). On the way, each L2 entry's COPIED
   * flag is set exactly when its cluster's refcount is then 1 (never for compressed clusters), and
   * each active L1 entry's likewise. The refcount blocks are written and synced before the L2 tables,
   * and those before the active L1 table is rewritten; clusters freed (addend -1) are dropped from the
   * cache and discarded as 'snapshot' once everything is synced.
   */
  private async updateSnapshotRefcount(l1: { offset: number; size: number } | undefined, addend: -1 | 0 | 1): Promise<void> {
    const active = l1 === undefined;
    const size = active ? this.header.l1Size : l1.size;
    const table = active ? this.l1 : await this.readFile(l1.offset, size * 8);
    let l1Modified = false;
    await this.rc.discards.batch(async () => {
      for (let i = 0; i < size; i++) {
        const e = decodeL1(table, i);
        if (!e.offset) continue;
        if (e.offset % this.cs) throw new BlockIOError('EIO', `qcow2: L2 table offset ${e.offset} is not cluster aligned`);
        const l2 = await this.l2cache.get(e.offset);
        let l2Modified = false;
        for (let j = 0; j < this.l2Entries; j++) {
          const d = decodeL2(l2, j, this.clusterBits, this.v3);
          let refcount = 0;
          if (d.type === 'compressed') {
            if (addend !== 0) {
              const first = Math.floor(d.offset / this.cs);
              await this.rc.updateRun(first, Math.floor((d.offset + d.csize - 1) / this.cs) - first + 1, addend, 'snapshot');
            }
            refcount = 2;
          } else if (d.type === 'normal' || d.type === 'zero-alloc') {
            if (d.offset % this.cs) throw new BlockIOError('EIO', `qcow2: data cluster offset ${d.offset} is not cluster aligned`);
            const c = d.offset / this.cs;
            if (addend !== 0) await this.rc.update(c, addend, 'snapshot');
            refcount = await this.rc.get(c);
          }
          const hi = l2.readUInt32BE(j * 8);
          const want = refcount === 1 ? (hi | COPIED_HI) >>> 0 : (hi & ~COPIED_HI) >>> 0;
          if (want !== hi) {
            l2.writeUInt32BE(want, j * 8);
            l2Modified = true;
          }
        }
        if (l2Modified) this.l2cache.markDirty(e.offset);
        const c = e.offset / this.cs;
        if (addend !== 0) await this.rc.update(c, addend, 'snapshot');
        const refcount = await this.rc.get(c);
        // A table no longer referenced must not be written back into a freed cluster.
        if (refcount === 0) this.l2cache.drop(e.offset);
        if (active && refcount === 1 !== e.copied) {
          encodeEntry(table, i, e.offset, refcount === 1 ? COPIED_HI : 0);
          l1Modified = true;
        }
      }
      await this.writebackMetadata();
      await this.file.flush();
    });
    if (active && l1Modified) {
      await this.file.write(this.header.l1TableOffset, Buffer.from(table.subarray(0, size * 8)));
      await this.file.flush();
    }
  }

  /**
   * qcow2_write_snapshots: `list` written whole into new clusters (allocated and synced first), synced,
   * then nb_snapshots and snapshots_offset switched in one header write, synced; then the old table's
   * clusters are freed. An empty table takes no clusters (its offset is written as 0).
   */
  private async writeSnapshotTable(list: Qcow2Snapshot[]): Promise<void> {
    const buf = serializeSnapshotTable(list);
    let offset = 0;
    if (buf.length > 0) {
      offset = await this.rc.alloc(Math.ceil(buf.length / this.cs), this.isReserved);
      await this.rc.flush();
      await this.file.write(offset, buf);
    }
    await this.file.flush();
    await this.withHeader(async () => {
      const h = Buffer.alloc(12);
      h.writeUInt32BE(list.length, 0);
      h.writeBigUInt64BE(BigInt(offset), 4);
      await this.file.write(60, h);
      await this.file.flush();
    });
    const old = { offset: this.header.snapshotsOffset, bytes: this.snapshotsSize };
    this.header.nbSnapshots = list.length;
    this.header.snapshotsOffset = offset;
    this.snapshotsSize = buf.length;
    this.snapshots = list;
    if (old.bytes > 0) {
      const first = Math.floor(old.offset / this.cs);
      await this.rc.free(first * this.cs, Math.floor((old.offset + old.bytes - 1) / this.cs) - first + 1, 'snapshot');
      await this.rc.flush();
    }
  }

  /** Bytes of the snapshot table on disk (QEMU's snapshots_size). */
  snapshotsSize = 0;

  /** Rewrite the first cluster from `header` and flush. */
  async writeHeader(): Promise<void> {
    await this.withHeader(async () => {
      const buf = serializeHeader(this.header, this.cs);
      this.header.headerLength = this.v3 ? buf.readUInt32BE(100) : 72;
      // Where the write-intent record is on disk from now on (the header's layout may have moved).
      const at = this.v3 ? findHeaderExtension(buf, this.header.headerLength, EXT_WRITE_INTENT) : undefined;
      this.intentOnDisk = undefined;
      await this.file.write(0, buf);
      await this.file.flush();
      this.intentOnDisk = at?.offset;
    });
  }

  /** qcow2 images can have a backing file (QEMU's supports_backing). */
  override supportsBacking(): boolean {
    return true;
  }

  /**
   * qcow2_change_backing_file: the header names `backingFile` (of `backingFormat`) as the backing
   * file, or none. Crash-safe: the new name is written where the old header uses nothing, then one
   * write within the first sector switches to it (backingChangeWrites), each flushed. A name over
   * 1023 bytes is EINVAL, as in QEMU.
   */
  protected override async doChangeBackingFile(backingFile: string | undefined, backingFormat: string | undefined): Promise<void> {
    if (backingFile !== undefined && Buffer.byteLength(backingFile) > 1023) throw new BlockIOError('EINVAL');
    await this.withHeader(async () => {
      const h = this.header;
      const old = { file: h.backingFile, format: h.backingFormat };
      h.backingFile = backingFile;
      h.backingFormat = backingFormat;
      let buf: Buffer;
      let writes;
      try {
        buf = serializeHeader(h, this.cs);
        const onDisk = await this.file.read(0, Math.min(this.cs, this.file.length()));
        writes = backingChangeWrites(onDisk, buf, h.headerLength, this.cs);
      } catch (err) {
        h.backingFile = old.file;
        h.backingFormat = old.format;
        throw err;
      }
      const at = this.v3 ? findHeaderExtension(buf, h.headerLength, EXT_WRITE_INTENT) : undefined;
      this.intentOnDisk = undefined;
      for (const w of writes) {
        await this.file.write(w.offset, w.data);
        await this.file.flush();
      }
      this.intentOnDisk = at?.offset;
      this.autoBackingFile = backingFile ?? '';
      this.backingDisplayName = backingFile === undefined || backingFile === '' ? undefined : resolveBackingFilename(this.file.imageInfo().filename, backingFile);
    });
  }

  /**
   * Header writes one at a time: the write-intent record writes its part of the first cluster while
   * guest I/O goes on, and must never be overtaken by a whole-header write serialised before it.
   */
  private headerWrites: Promise<unknown> = Promise.resolve();
  private withHeader<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.headerWrites.then(fn, fn);
    this.headerWrites = run.catch(() => undefined);
    return run;
  }

  // ---- block status -------------------------------------------------------------------------------

  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return this.lock.withShared(async () => {
      const m = await this.lookup(offset, bytes);
      const n = Math.min(m.bytes, bytes);
      switch (m.entry.type) {
        case 'unallocated': {
          const hasBacking = !!this.backing();
          return { bytes: n, zero: !hasBacking, data: false, allocated: false, ...(hasBacking ? {} : { depth: 0 }) };
        }
        case 'zero-plain':
        case 'zero-alloc':
          return { bytes: n, zero: true, data: false, allocated: true, depth: 1 };
        default:
          return { bytes: n, zero: false, data: true, allocated: true, depth: 1 };
      }
    });
  }

  // ---- info ---------------------------------------------------------------------------------------

  /**
   * Opened with `backing: null` over an image whose header names a backing file, directly on a file
   * node: QEMU cannot name such a node by its file name and names it by a json: pseudo-filename.
   */
  private overriddenBacking(): boolean {
    return this.openOptions.backing === null && !this.backing() && !!this.header.backingFile && this.file.driver === 'file';
  }

  /**
   * QEMU's auto_backing_file: the header's backing file name as read at open (or as rewritten
   * since), unresolved; undefined when the backing node was opened from that name (QEMU then keeps
   * the backing node's own file name, so it always matches). When it is not the backing node's file
   * name (a backing given by reference, attached by a snapshot, or renamed), QEMU's
   * bdrv_backing_overridden names this node by a json: pseudo-filename that spells out the backing.
   */
  autoBackingFile: string | undefined;

  /** The json: options of the backing node when the header's name no longer names it (see autoBackingFile). */
  private overridingBacking(): Record<string, unknown> | undefined {
    const b = this.backing();
    if (this.autoBackingFile === undefined || !b || this.file.driver !== 'file') return undefined;
    if (this.autoBackingFile === b.imageInfo().filename) return undefined;
    return jsonOptions(b);
  }

  imageInfo(): ImageInfo {
    const f = this.file.imageInfo();
    const h = this.header;
    const overriding = this.overridingBacking();
    const info: ImageInfo = {
      filename: this.overriddenBacking()
        ? jsonFilename({ backing: null, driver: 'qcow2', file: { driver: 'file', filename: f.filename } })
        : overriding
          ? jsonFilename({ backing: overriding, driver: 'qcow2', file: { driver: 'file', filename: f.filename } })
          : f.filename.startsWith('json:')
            ? // A file QEMU cannot name by a file name (a filter under the node): json: of the whole node.
              jsonFilename({ driver: 'qcow2', file: jsonOptions(this.file) })
            : f.filename,
      format: 'qcow2',
      'virtual-size': h.size,
      'cluster-size': this.cs,
      'dirty-flag': (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n && !this.dirtySetByUs,
    };
    // An empty name is no backing file name (QEMU's backing_file[0] == '\0').
    if (h.backingFile) {
      info['backing-filename'] = h.backingFile;
      if (this.backingDisplayName) info['full-backing-filename'] = this.backingDisplayName;
      if (h.backingFormat) info['backing-filename-format'] = h.backingFormat;
    }
    if (this.snapshots.length) info.snapshots = this.snapshots.map(snapshotInfo);
    const b = this.backing();
    if (b) info['backing-image'] = b.imageInfo();
    const data: Record<string, unknown> = { compat: this.v3 ? '1.1' : '0.10' };
    if (this.v3) {
      data['compression-type'] = h.compressionType === 1 ? 'zstd' : 'zlib';
      data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
      if (this.bitmapsValid()) {
        data.bitmaps = this.cachedBitmaps.map((bm) => ({
          flags: [...(bm.inUse ? ['in-use'] : []), ...(bm.auto ? ['auto'] : [])],
          name: bm.name,
          granularity: bm.granularity,
        }));
      }
      data['refcount-bits'] = this.rc.bits;
      data.corrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = false;
    } else {
      data['compression-type'] = 'zlib';
      data['refcount-bits'] = this.rc.bits;
    }
    info['format-specific'] = { type: 'qcow2', data };
    return info;
  }

  // ---- persistent bitmaps -------------------------------------------------------------------------

  /** The bitmap directory as loaded at open (or after the last change through this API). */
  cachedBitmaps: StoredBitmap[] = [];

  bitmapsValid(): boolean {
    return !!this.header.bitmaps && (this.header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
  }

  /** The bitmaps stored in the image (empty when there is no consistent bitmaps extension). */
  listStoredBitmaps(): StoredBitmap[] {
    return this.bitmapsValid() ? this.cachedBitmaps.map((b) => ({ ...b })) : [];
  }

  /** The serialized data of a stored bitmap: ceil(ceil(size/granularity)/8) bytes, LSB first. */
  async readBitmapData(bm: StoredBitmap): Promise<Buffer> {
    const bits = Math.ceil(this.header.size / bm.granularity);
    const bytes = Math.ceil(bits / 8);
    const out = Buffer.alloc(bytes);
    const table = await this.readFile(bm.tableOffset, bm.tableSize * 8);
    for (let k = 0; k < bm.tableSize && k * this.cs < bytes; k++) {
      const off = bitmapTableEntryOffset(table, k);
      const n = Math.min(this.cs, bytes - k * this.cs);
      if (off) {
        this.checkHostOffset(off, 'bitmap data cluster');
        (await this.readFile(off, n)).copy(out, k * this.cs);
      } else if (bitmapTableEntryAllOnes(table, k)) {
        out.fill(0xff, k * this.cs, k * this.cs + n);
      }
    }
    // Unused tail bits read as zero.
    if (bits % 8) out[bytes - 1] &= (1 << (bits % 8)) - 1;
    return out;
  }

  /**
   * Set or clear in_use on the named bitmaps in place: the directory is rewritten where it is with
   * only their flags changed, then flushed. QEMU 7.2 first clears autoclear bit 0, rewrites the
   * directory, then sets the bit again; a power cut between those writes leaves the bitmaps
   * extension ignored, i.e. every bitmap lost (issue 14). Not needed here: each entry's flags field
   * (entry offset + 12, entries 8-byte aligned, the directory cluster aligned) lies inside one
   * 512-byte sector, and no other byte of the directory changes, so however the write is torn every
   * entry reads either its old or its new flags, both valid. Before in_use is set, the write-intent
   * record covering these bitmaps is durable (doActivate), so each bitmap's state on disk is usable
   * at every cut. No guest write runs before the open completes, so nothing else is in flight.
   */
  async setBitmapsInUse(names: string[] | 'all', inUse: boolean): Promise<void> {
    if (this.readOnly) throw new BlockIOError('EPERM');
    if (!this.bitmapsValid()) return;
    await this.withAll(async () => {
      const bm = this.header.bitmaps!;
      const dir = await this.readFile(bm.directoryOffset, bm.directorySize);
      let changed = false;
      for (const b of this.cachedBitmaps) {
        if (names !== 'all' && !names.includes(b.name)) continue;
        const flags = inUse ? b.flags | BME_FLAG_IN_USE : b.flags & ~BME_FLAG_IN_USE;
        changed ||= flags !== b.flags;
        b.flags = flags;
        b.inUse = inUse;
        dir.writeUInt32BE(b.flags, b.dirOffset + 12);
      }
      if (!changed) return;
      await this.file.write(bm.directoryOffset, dir);
      await this.file.flush();
    });
  }

  /**
   * Replace the stored bitmaps by `list` (§2.5): new data clusters (only those with a set bit), new
   * tables and a new directory, then the header, then the old clusters are freed. An empty list
   * removes the extension.
   */
  async storeBitmaps(list: Array<BitmapToStore | BitmapToKeep>): Promise<void> {
    if (this.readOnly) throw new BlockIOError('EPERM', 'No write access');
    if (!this.v3) throw genericError('Cannot store dirty bitmaps in qcow2 v2 files');
    await this.withAll(async () => {
      const entries: Array<{ name: string; tableOffset: number; tableSize: number; flags: number; granularityBits: number }> = [];
      const names = new Set<string>();
      const kept = new Set<StoredBitmap>();
      for (const b of list) {
        if (names.has(b.name)) throw genericError(`Bitmap already exists: ${b.name}`);
        names.add(b.name);
        if ('keep' in b) {
          const old = this.bitmapsValid() ? this.cachedBitmaps.find((c) => c.name === b.name) : undefined;
          if (!old) continue;
          kept.add(old);
          entries.push({ name: old.name, tableOffset: old.tableOffset, tableSize: old.tableSize, flags: old.flags, granularityBits: old.granularityBits });
          continue;
        }
        const gbits = Math.log2(b.granularity);
        if (!Number.isInteger(gbits) || gbits < 9 || gbits > 31) throw genericError('Granularity must be power of 2 and at least 512');
        const bytes = Math.ceil(Math.ceil(this.header.size / b.granularity) / 8);
        const tableSize = Math.max(1, Math.ceil(bytes / this.cs));
        const table = Buffer.alloc(Math.ceil((tableSize * 8) / this.cs) * this.cs);
        // I/O failures get QEMU's messages (store_bitmap_data, store_bitmap) with strerror's text.
        const alloc = (n: number) => storeStep(`Failed to allocate clusters for bitmap '${b.name}'`, () => this.rc.alloc(n, this.isReserved));
        const write = (off: number, buf: Buffer) => storeStep(`Failed to write bitmap '${b.name}' to file`, () => this.file.write(off, buf));
        for (let k = 0; k < tableSize; k++) {
          const chunk = b.data.subarray(k * this.cs, Math.min(bytes, (k + 1) * this.cs));
          if (!chunk.some((x) => x !== 0)) continue;
          const off = await alloc(1);
          const cl = Buffer.alloc(this.cs);
          chunk.copy(cl);
          await write(off, cl);
          table.writeBigUInt64BE(BigInt(off), k * 8);
        }
        const tOff = await alloc(table.length / this.cs);
        await write(tOff, table);
        entries.push({ name: b.name, tableOffset: tOff, tableSize, flags: b.auto ? BME_FLAG_AUTO : 0, granularityBits: gbits });
      }
      const oldExt = this.bitmapsValid() ? this.header.bitmaps : undefined;
      const oldBitmaps = oldExt ? this.cachedBitmaps : [];
      await storeStep('Failed to update bitmap extension', async () => {
        if (entries.length) {
          const dir = serializeBitmapDirectory(entries);
          const dOff = await this.rc.alloc(Math.ceil(dir.length / this.cs), this.isReserved);
          await this.file.write(dOff, dir);
          await this.writebackMetadata();
          await this.rc.flush();
          await this.file.flush();
          this.header.bitmaps = { nbBitmaps: entries.length, directorySize: dir.length, directoryOffset: dOff };
          this.header.autoclearFeatures |= AUTOCLEAR_BITMAPS;
          this.cachedBitmaps = parseBitmapDirectory(dir, entries.length);
        } else {
          await this.writebackMetadata();
          await this.file.flush();
          this.header.bitmaps = undefined;
          this.header.autoclearFeatures &= ~AUTOCLEAR_BITMAPS;
          this.cachedBitmaps = [];
        }
        await this.writeHeader();
      });
      // Free the old directory, tables and data.
      if (oldExt) {
        for (const b of oldBitmaps) {
          if (kept.has(b)) continue;
          const t = await this.readFile(b.tableOffset, b.tableSize * 8);
          for (let k = 0; k < b.tableSize; k++) {
            const off = bitmapTableEntryOffset(t, k);
            // As QEMU's clear_bitmap_table / free_bitmap_clusters: bitmap data always goes, tables are 'other'.
            if (off) await this.rc.free(off, 1, 'always');
          }
          await this.rc.free(b.tableOffset, Math.ceil((b.tableSize * 8) / this.cs), 'other');
        }
        await this.rc.free(oldExt.directoryOffset, Math.ceil(oldExt.directorySize / this.cs), 'other');
      }
      await this.rc.flush();
    });
  }

  // ---- PersistentBitmapStore (block/bitmap-store.ts; used by bitmap/manager.ts and persistence.ts) ----

  /**
   * qcow2_co_can_store_new_dirty_bitmap: may a new persistent bitmap `name` be added, given the
   * persistent bitmaps the node already has in memory (`persistentNames`)? QEMU's checks and messages.
   */
  canStoreNewDirtyBitmap(name: string, granularity: number, persistentNames: string[] = []): void {
    if (persistentNames.includes(name)) throw genericError(`Bitmap already exists: ${name}`);
    const fail = (msg: string): never => {
      throw genericError(`Can't make bitmap '${name}' persistent in '${this.nodeName}': ${msg}`);
    };
    if (!this.v3) fail('Cannot store dirty bitmaps in qcow2 v2 files');
    const gbits = Math.log2(granularity);
    if (gbits > 31) fail('Granularity exceeds maximum (2147483648 bytes)');
    if (gbits < 9) fail('Granularity is under minimum (512 bytes)');
    const bytes = Math.ceil(Math.ceil(this.header.size / granularity) / 8);
    if (Math.ceil(bytes / this.cs) * this.cs > BME_MAX_PHYS_SIZE) fail('Too much space will be occupied by the bitmap. Use larger granularity');
    if (Buffer.byteLength(name) > 1023) fail('Name length exceeds maximum (1023 characters)');
    const all = [...persistentNames, name];
    if (all.length > MAX_BITMAPS) fail('Maximum number of persistent bitmaps is already reached');
    if (all.reduce((n, x) => n + dirEntrySize(Buffer.byteLength(x)), 0) > MAX_BITMAP_DIRECTORY_SIZE) fail('Not enough space in the bitmap directory');
  }

  /** Bitmaps handed to the bitmap layer at open, marked in_use on disk by doActivate. */
  private loadedBitmapNames: string[] = [];

  /**
   * qcow2_load_dirty_bitmaps: the stored bitmaps with their bits (open.ts checked the directory and
   * tables); one found with in_use comes back inconsistent and empty. Only reads: on a read-write
   * node the loaded bitmaps are marked in_use by doActivate, once the open has succeeded.
   */
  async loadPersistentDirtyBitmaps(): Promise<LoadedDirtyBitmap[]> {
    const out: LoadedDirtyBitmap[] = [];
    const loaded: string[] = [];
    const intent = this.trustedWriteIntent();
    this.recoveredBitmaps = false;
    for (const bm of this.listStoredBitmaps()) {
      if (bm.inUse) {
        // In use when the last writer stopped: usable only when our write-intent record covers it.
        if (!intent?.covered.includes(bm.tableOffset)) {
          out.push({ name: bm.name, granularity: bm.granularity, enabled: false, inconsistent: true });
          continue;
        }
        const data = await this.readBitmapData(bm);
        const ranges = markedRanges(intent, this.header.size);
        for (const [start, bytes] of ranges) setSerializedBits(data, start, bytes, bm.granularity);
        out.push({ name: bm.name, granularity: bm.granularity, enabled: bm.auto, inconsistent: false, data, recovered: { regions: ranges.length, regionSize: 2 ** intent.regionBits } });
        this.recoveredBitmaps = true;
        loaded.push(bm.name);
        continue;
      }
      out.push({ name: bm.name, granularity: bm.granularity, enabled: bm.auto, inconsistent: false, data: await this.readBitmapData(bm) });
      loaded.push(bm.name);
    }
    if (this.activated && !this.readOnly && loaded.length) {
      this.prepareWriteIntent(loaded);
      await this.writeHeader();
      await this.setBitmapsInUse(loaded, true);
    } else this.loadedBitmapNames = loaded;
    return out;
  }

  // ---- write intent (write-intent.ts) -------------------------------------------------------------

  /** The live record, when the loaded bitmaps are covered by one. */
  private writeIntent?: WriteIntentRecord;
  /** Some bitmap was recovered from the record at load: its regions must stay dirty on disk. */
  private recoveredBitmaps = false;

  /** The record found in the image, when our autoclear bit still vouches for it. */
  private trustedWriteIntent(): DecodedWriteIntent | undefined {
    if (!(this.header.autoclearFeatures & AUTOCLEAR_WRITE_INTENT) || !this.bitmapsValid()) return undefined;
    const ext = this.header.unknownExtensions.find((e) => e.type === EXT_WRITE_INTENT);
    return ext ? decodeWriteIntent(ext.data) : undefined;
  }

  /**
   * Put a new record into the in-memory header covering the stored bitmaps `names` (keeping the
   * old record's regions when bitmaps were recovered from it) and arm it; the caller writes the
   * header. False, with no record left in the header, when there is nothing to cover or no room.
   */
  private prepareWriteIntent(names: string[]): boolean {
    const h = this.header;
    const old = this.recoveredBitmaps ? this.trustedWriteIntent() : undefined;
    h.unknownExtensions = h.unknownExtensions.filter((e) => e.type !== EXT_WRITE_INTENT);
    h.autoclearFeatures &= ~AUTOCLEAR_WRITE_INTENT;
    this.writeIntent = undefined;
    if (!names.length || !this.v3 || !this.bitmapsValid()) return false;
    const covered = this.cachedBitmaps.filter((b) => names.includes(b.name)).map((b) => b.tableOffset);
    let data: Buffer | undefined;
    const room = () => this.cs - HEADER_SLACK - serializeHeader(h, this.cs).length - 8;
    try {
      if (old) {
        data = encodeWriteIntent(old, covered, old.bits);
      } else {
        const layout = chooseWriteIntentLayout(h.size, room(), covered.length);
        if (layout) data = encodeWriteIntent(layout, covered);
      }
      if (!data || data.length > room()) return false;
    } catch {
      return false; // the header itself no longer fits: no record
    }
    h.unknownExtensions.push({ type: EXT_WRITE_INTENT, data });
    h.autoclearFeatures |= AUTOCLEAR_WRITE_INTENT;
    const rec = decodeWriteIntent(data)!;
    this.writeIntent = new WriteIntentRecord(rec, rec.bits, () => this.persistWriteIntent(data));
    return true;
  }

  /** Where the record's data is in the first cluster on disk, as the last header write put it. */
  private intentOnDisk?: number;

  /**
   * Write the armed record's bytes in the first cluster as they are in memory, durably (FUA: the
   * file node makes this one write durable, without writing back the guest data cached so far as a
   * flush would): at the place the last header write put it, never where the in-memory header
   * (which a bitmap store may be changing meanwhile) would put it.
   */
  private persistWriteIntent(data: Buffer): Promise<void> {
    return this.withHeader(async () => {
      if (this.intentOnDisk === undefined) throw new BlockIOError('EIO', 'qcow2: write-intent record missing from the header');
      await this.file.write(this.intentOnDisk, Buffer.from(data), { fua: true });
    });
  }

  /**
   * PersistentBitmapStore.markWriteIntent: before a write to [offset, offset+bytes) is performed,
   * its regions are dirty on disk (undefined when they already are, or when no record is armed).
   */
  markWriteIntent(offset: number, bytes: number): Promise<void> | undefined {
    return this.writeIntent?.mark(offset, bytes);
  }

  /**
   * qcow2_store_persistent_dirty_bitmaps: write `list` (in_use cleared); stored entries not in the
   * list (inconsistent bitmaps) are kept as they are. Nothing is written when there is nothing to store.
   */
  async storePersistentDirtyBitmaps(list: BitmapToStore[]): Promise<void> {
    const stored = this.listStoredBitmaps();
    if (!list.length && !stored.length) return;
    // As QEMU: entries already in the directory keep their place, new ones go to the end.
    const byName = new Map(list.map((b) => [b.name, b]));
    const out: Array<BitmapToStore | BitmapToKeep> = stored.map((b) => byName.get(b.name) ?? { name: b.name, keep: true });
    const onDisk = new Set(stored.map((b) => b.name));
    out.push(...list.filter((b) => !onDisk.has(b.name)));
    await this.storeBitmaps(out);
  }

  /** qcow2_co_remove_persistent_dirty_bitmap: drop `name` from the image and free its clusters. */
  async removePersistentDirtyBitmap(name: string): Promise<void> {
    const stored = this.listStoredBitmaps();
    if (!stored.some((b) => b.name === name)) return;
    await this.storeBitmaps(stored.filter((b) => b.name !== name).map((b) => ({ name: b.name, keep: true })));
  }

  // ---- repair -------------------------------------------------------------------------------------

  /** Rebuild refcounts from the metadata (opening a dirty image read-write), then clear the dirty bit. */
  async repairRefcounts(): Promise<void> {
    const w = await walkReferences(this.file, this.header, this.bitmapsValid());
    const fileClusters = Math.ceil(this.file.length() / this.cs);
    await this.rc.rebuild(w.refs, Math.max(w.end, fileClusters));
    this.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
    await this.writeHeader();
    this.markedDirty = false;
  }
}

/** Where the data of header extension `type` is in a serialised first cluster. */
function findHeaderExtension(buf: Buffer, headerLength: number, type: number): { offset: number; length: number } | undefined {
  for (let off = headerLength; off + 8 <= buf.length; ) {
    const t = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    if (t === 0) return undefined;
    if (t === type) return { offset: off + 8, length: len };
    off += 8 + Math.ceil(len / 8) * 8;
  }
  return undefined;
}

/** Run one I/O step of storing bitmaps; a failure becomes QEMU's "<what>: <strerror>" message. */
async function storeStep<T>(what: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw genericError(`${what}: ${strerror(errorCode(err))}`);
  }
}
