/**
 * The `copy-on-read` filter driver (QEMU's block/copy-on-read.c): a read through it copies what the
 * filtered node shows from its backing chain into the filtered node itself, so that later reads find
 * it there. `bottom` (a non-filter node of the chain) limits what is copied: only data allocated in
 * the layers above it, it included. block-stream inserts one above the node it streams into and
 * makes its copies through it (populate()).
 *
 * The chunks a read needs (unallocated in the format layer, allocated above `bottom`; one chunk per
 * cluster of that layer) are found while their chunk locks are held and marked in the filter's own
 * copy bitmap. A read through the filter reads its chunks once through the filtered node and writes
 * the marked ones from that buffer (readCopying); populate() (no data wanted) copies them with the
 * copy engine (BlockCopy: source the backing node of the format layer, target the filtered node). The engine's writes
 * are BDRV_REQ_WRITE_UNCHANGED (they change no guest-visible byte). Every other write to the format
 * layer, through the filter or not, takes the chunk locks of its range while it runs (a write
 * observer) and then clears those chunks from the bitmap — the cluster is then allocated with the
 * write's data — so a copy never overwrites a guest write with older data from below, which is what
 * QEMU's serialising copy-on-read requests guarantee.
 */
import { genericError } from '../../errors.js';
import { str } from '../../qapi/schema.js';
import { HBitmap } from '../../base/hbitmap.js';
import type { BlockDriver } from '../graph.js';
import { isAllZeroes, type BdrvChild, type BlockNode, type WriteObserver, type WriteRequest } from '../node.js';
import { BLK_PERM_CONSISTENT_READ, BLK_PERM_RESIZE, BLK_PERM_WRITE, BLK_PERM_WRITE_UNCHANGED, type Permissions } from '../permissions.js';
import { BlockdevRef } from '../drivers/raw.js';
import { BlockCopy, type CopyBitmap } from '../copy/block-copy.js';
import type { ChunkLock } from '../copy/chunk-locks.js';
import { FilterNode, filterJsonFilename } from './filter.js';
import type { ImageInfo } from '../node.js';

const PERM_PASSTHROUGH = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE;
/** The largest piece one copy moves. */
const MAX_IO = 1 << 20;

/** A copy bitmap of the filter's own (QEMU's copy-on-read keeps none a user could see). */
class ChunkBitmap implements CopyBitmap {
  private readonly h: HBitmap;
  constructor(size: number, granularity: number) {
    this.h = new HBitmap(size, Math.log2(granularity));
  }
  count(): number {
    return this.h.count();
  }
  isDirty(offset: number): boolean {
    return this.h.get(offset);
  }
  setDirty(offset: number, bytes: number): void {
    this.h.set(offset, bytes);
  }
  resetDirty(offset: number, bytes: number): void {
    this.h.reset(offset, bytes);
  }
  nextDirtyArea(offset: number, end?: number): { offset: number; bytes: number } | undefined {
    return this.h.nextDirtyArea(offset, end);
  }
}

export class CopyOnReadNode extends FilterNode {
  readonly driver = 'copy-on-read';
  /** QEMU 7.2's driver has no reopen: every blockdev-reopen of the node is refused. */
  override supportsReopen(): boolean {
    return false;
  }
  /** The layer copies go into, and whose writes are observed. */
  private readonly layer: BlockNode;
  private readonly chunk: number;
  private readonly bitmap: ChunkBitmap;
  private engine?: BlockCopy;
  private readonly writeLocks = new Map<WriteRequest, ChunkLock>();
  private readonly observer: WriteObserver;

  constructor(
    nodeName: string,
    child: BlockNode,
    /** Copy only what is allocated above this node, it included; everything when undefined. */
    readonly bottom: BlockNode | undefined,
  ) {
    super(nodeName, child, 'file');
    this.layer = child.formatLayer();
    this.chunk = Math.max(512, this.layer.nodeInfo().clusterSize ?? 65536);
    this.bitmap = new ChunkBitmap(this.layer.length(), this.chunk);
    this.observer = {
      beforeWrite: (req) => this.beforeLayerWrite(req),
      afterWrite: (req, error) => this.afterLayerWrite(req, error),
    };
    this.layer.addWriteObserver(this.observer);
    const below = this.layer.backing();
    // The engine (and its locks) from the start: a write that begins before the first read holds them too.
    if (below) this.copyEngine(below);
  }

  /** cor_child_perm: the filter writes unchanged data into its child whenever it can. */
  override childPermissions(_child: BdrvChild, perm: number, shared: number): Permissions {
    return { perm: (perm & PERM_PASSTHROUGH) | BLK_PERM_WRITE_UNCHANGED, shared: (shared & PERM_PASSTHROUGH) | BLK_PERM_WRITE_UNCHANGED };
  }

  /** QEMU's copy-on-read forwards compressed writes (cor_co_pwritev_compressed). */
  override supportsCompressedWrites(): boolean {
    return this.filtered.supportsCompressedWrites();
  }

  protected override async doRead(offset: number, bytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(bytes);
    await this.readCopying(offset, buf);
    return buf;
  }
  protected override doReadInto(offset: number, buf: Buffer): Promise<void> {
    return this.readCopying(offset, buf);
  }

  /**
   * A read through the filter (QEMU's bdrv_co_do_copy_on_readv): the whole chunks it touches are read
   * once through the filtered node, which reads what it lacks from below; the chunks to copy are
   * written from that same buffer into it (BDRV_REQ_WRITE_UNCHANGED; all-zero ones as write-zeroes),
   * and the requested part is returned. All under the chunk locks: no write of the layer runs over the
   * range meanwhile, so the data written is what the guest sees. A failed copy fails the read (as
   * QEMU: "simply report it in all cases"), its chunks still to copy.
   */
  private async readCopying(offset: number, out: Buffer): Promise<void> {
    const below = this.layer.backing();
    if (!below || out.length === 0) return super.doReadInto(offset, out);
    const g = this.chunk;
    const start = Math.floor(offset / g) * g;
    const end = Math.min(this.layer.length(), Math.ceil((offset + out.length) / g) * g);
    const engine = this.copyEngine(below);
    const lock = await engine.locks.acquire(start, end - start);
    try {
      await this.markWanted(below, start, end);
      if (!this.bitmap.nextDirtyArea(start, end)) return await super.doReadInto(offset, out);
      const bounce = start === offset && end === offset + out.length ? out : Buffer.allocUnsafe(end - start);
      await this.filtered.readInto(start, bounce);
      for (let area = this.bitmap.nextDirtyArea(start, end); area; area = this.bitmap.nextDirtyArea(area.offset + area.bytes, end)) {
        const piece = bounce.subarray(area.offset - start, area.offset - start + area.bytes);
        this.bitmap.resetDirty(area.offset, area.bytes);
        try {
          if (isAllZeroes(piece)) await this.filtered.writeZeroes(area.offset, area.bytes, { writeUnchanged: true });
          else await this.filtered.write(area.offset, piece, { writeUnchanged: true });
        } catch (err) {
          this.bitmap.setDirty(area.offset, area.bytes);
          throw err;
        }
      }
      if (bounce !== out) bounce.copy(out, 0, offset - start, offset - start + out.length);
    } finally {
      lock.release();
    }
  }

  /**
   * Copy into the filtered node what it shows from below `bottom`'s overlay down to `bottom` in
   * [offset, +bytes) (whole chunks): a read without the data (QEMU's BDRV_REQ_PREFETCH through the
   * filter). Throws the copy's error (read or write), the range then still to copy.
   */
  async populate(offset: number, bytes: number): Promise<void> {
    const below = this.layer.backing();
    if (!below || bytes === 0) return;
    const g = this.chunk;
    const size = this.layer.length();
    const start = Math.floor(offset / g) * g;
    const end = Math.min(size, Math.ceil((offset + bytes) / g) * g);
    // Decide under the locks: no write of the layer is in flight over the range, none starts.
    const lock = await this.copyEngine(below).locks.acquire(start, end - start);
    try {
      await this.markWanted(below, start, end);
    } finally {
      lock.release();
    }
    await this.copyEngine(below).copyNow(start, end - start);
  }

  /** Mark the chunks of [start, end) that are unallocated in the layer and allocated above the bottom's backing. */
  private async markWanted(below: BlockNode, start: number, end: number): Promise<void> {
    const g = this.chunk;
    const stop = this.bottom?.formatLayer().backing();
    for (let pos = start; pos < end; ) {
      const st = await this.layer.blockStatus(pos, end - pos);
      if (!st.allocated) {
        const runEnd = pos + st.bytes;
        for (let p = pos; p < runEnd && p < below.length(); ) {
          const a = await below.isAllocatedAbove(stop, p, Math.min(runEnd, below.length()) - p);
          if (a.allocated) {
            const s = Math.floor(p / g) * g;
            this.bitmap.setDirty(s, Math.min(end, Math.ceil((p + a.bytes) / g) * g) - s);
          }
          p += a.bytes;
        }
      }
      pos += st.bytes;
    }
  }

  private copyEngine(below: BlockNode): BlockCopy {
    if (this.engine && this.engine.source === below) return this.engine;
    this.engine = new BlockCopy({
      source: below,
      target: this.filtered,
      bitmap: this.bitmap,
      chunkSize: this.chunk,
      bufSize: MAX_IO,
      maxInFlight: 1,
      maxIoBytes: Math.max(this.chunk, MAX_IO - (MAX_IO % this.chunk)),
      unmap: false,
      fillPartialClusters: false,
      offload: false,
      writeUnchanged: true,
    });
    return this.engine;
  }

  /** A write of the layer (not the filter's own copies) holds its chunks: no copy runs over it. */
  private async beforeLayerWrite(req: WriteRequest): Promise<void> {
    if (req.flags.writeUnchanged || !this.engine) return;
    const { start, bytes } = this.chunksOf(req);
    this.writeLocks.set(req, await this.engine.locks.acquire(start, bytes));
  }

  /** The written chunks are allocated in the layer now (with the write's data): nothing to copy there. */
  private afterLayerWrite(req: WriteRequest, error?: unknown): void {
    const lock = this.writeLocks.get(req);
    if (!lock) return;
    this.writeLocks.delete(req);
    if (error === undefined && req.kind !== 'discard') {
      const { start, bytes } = this.chunksOf(req);
      this.bitmap.resetDirty(start, bytes);
    }
    lock.release();
  }

  private chunksOf(req: WriteRequest): { start: number; bytes: number } {
    const g = this.chunk;
    const start = Math.floor(req.offset / g) * g;
    return { start, bytes: Math.min(this.layer.length(), Math.ceil((req.offset + req.bytes) / g) * g) - start };
  }

  override async close(): Promise<void> {
    await super.close();
    this.layer.removeWriteObserver(this.observer);
    this.engine?.release();
  }

  /** As QEMU shows it: the filtered node's image without its backing file name, a json: filename (bottom not in it). */
  override imageInfo(): ImageInfo {
    const { 'backing-filename': _b, 'full-backing-filename': _f, 'backing-filename-format': _ff, ...info } = super.imageInfo();
    return { ...info, filename: filterJsonFilename(this) };
  }
}

export const copyOnReadDriver: BlockDriver = {
  name: 'copy-on-read',
  options: { file: BlockdevRef, '*bottom': str },
  async open(nodeName, opts, ctx) {
    const file = await ctx.openChild(opts.file, opts['read-only'] as boolean, 'file', 'filtered');
    let bottom: BlockNode | undefined;
    if (opts.bottom !== undefined) {
      const name = opts.bottom as string;
      bottom = ctx.graph.find(name);
      if (!bottom) throw genericError(`Bottom node '${name}' not found`);
      if (bottom instanceof FilterNode) throw genericError(`Bottom node '${name}' is a filter`);
    }
    return new CopyOnReadNode(nodeName, file, bottom);
  },
};
