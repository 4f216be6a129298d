/**
 * copy-before-write: the filter that makes a point-in-time image of its source while writes continue
 * (QEMU's block/copy-before-write.c). Before a write, write-zeroes or discard changes a range of the
 * source for the first time, the old data of that range is copied to the target; the target (or a
 * snapshot-access node over the filter) then holds the source as it was when the filter was inserted.
 * The backup job inserts one above its source; it is also a blockdev-add driver (file, target,
 * bitmap, on-cbw-error, cbw-timeout, min-cluster-size) for fleecing.
 *
 * Where it goes further than QEMU's filter: the copy is done by a write observer on the source node
 * itself, not by the filter's own write path, so a write that reaches the source by another way (HMP
 * qemu-io on the source node, an NBD export of the source, a second filter) is copied first too.
 * In QEMU such writes silently change the "frozen" image.
 *
 * The copying is the shared copy engine's (BlockCopy.copyNow): the chunks of a write that are still to
 * copy are copied now, holding their chunk locks, and a background copy of the same chunks (the backup
 * job's walk over the same copy bitmap) is waited for first, so each chunk is copied exactly once,
 * with its old data.
 *
 * Bitmaps, as QEMU keeps them (query-named-block-nodes shows them): the copy bitmap (what is still to
 * copy) is an anonymous bitmap on the source; the done bitmap (what copy-before-write copied) and the
 * access bitmap (what a snapshot reader may read) are anonymous bitmaps on the filter.
 */
import { genericError } from '../../errors.js';
import { BlockIOError } from '../../errors.js';
import { FilterNode } from './filter.js';
import { chainContains } from '../chain.js';
import type { BdrvChild, BlockNode, WriteObserver, WriteRequest } from '../node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_RESIZE, BLK_PERM_WRITE, type Permissions } from '../permissions.js';
import { BlockCopy, streamBounds, type BlockCopyHooks, type CopyBitmap } from '../copy/block-copy.js';
import type { CopyBitmapHost } from '../copy/copy-bitmaps.js';
import type { BlockDriver } from '../graph.js';
import { BlockdevRef } from '../../qapi/block.js';
import { enumOf, int, object, str, uint32, type Members } from '../../qapi/schema.js';
import { tracer } from '../../trace/trace.js';

/** OnCbwError (QEMU 8.0): what a failed copy-before-write breaks. */
export type OnCbwError = 'break-guest-write' | 'break-snapshot';

/** block-copy's cluster size when the target tells none (BLOCK_COPY_CLUSTER_SIZE_DEFAULT). */
export const BLOCK_COPY_CLUSTER_SIZE_DEFAULT = 65536;
/** block-copy's largest single read/write when not offloaded (BLOCK_COPY_MAX_BUFFER). */
export const BLOCK_COPY_MAX_BUFFER = 1 << 20;
/** Background copies at once when x-perf max-workers is not given (QEMU's BackupPerf default). */
const BACKUP_MAX_WORKERS = 64;
/** block-copy's memory budget for background copies (BLOCK_COPY_MAX_MEM). */
export const BLOCK_COPY_MAX_MEM = 128 << 20;

const traceCbw = tracer.point('cbw_do_copy_before_write');

/**
 * block_copy_calculate_cluster_size: the target's cluster size, at least the default (64 KiB) and at
 * least min-cluster-size (upstream since 9.2).
 */
export function copyClusterSize(target: BlockNode, minClusterSize = 0): number {
  const cs = target.nodeInfo().clusterSize ?? 0;
  return Math.max(BLOCK_COPY_CLUSTER_SIZE_DEFAULT, cs, minClusterSize);
}

export interface CopyBeforeWriteOptions {
  target: BlockNode;
  bitmaps: CopyBitmapHost;
  /** Only the chunks dirty in this bitmap are copied (the `bitmap` option); else every chunk. */
  bitmap?: CopyBitmap;
  onCbwError: OnCbwError;
  /** A copy-before-write taking longer than this fails as ETIMEDOUT (seconds; 0: no limit). */
  cbwTimeout: number;
  minClusterSize: number;
  /** Write the copies to the target compressed (the backup job's `compress`). */
  compress?: boolean;
  /** Background copies at once, and the largest piece one moves (the backup job's x-perf). */
  maxWorkers?: number;
  maxChunk?: number;
  /**
   * Discard on the source what has been copied to the target (backup's discard-source, upstream QEMU
   * 9.1, which passes it to the filter as an open flag, BDRV_O_CBW_DISCARD_SOURCE): the filter then
   * takes write permission on its source, so a read-only source is refused ("Block node is read-only").
   */
  discardSource?: boolean;
}

export class CopyBeforeWriteNode extends FilterNode {
  readonly driver = 'copy-before-write';
  /** QEMU 7.2's driver has no reopen: every blockdev-reopen of the node is refused. */
  override supportsReopen(): boolean {
    return false;
  }
  /** The engine: its bitmap is `copyBitmap`, its locks are shared with a backup job's walk. */
  readonly copy: BlockCopy;
  /** What is still to copy: an anonymous bitmap on the source, one bit per cluster. */
  readonly copyBitmap: CopyBitmap;
  readonly clusterSize: number;
  private readonly host: CopyBitmapHost;
  /** What copy-before-write has copied, and what a snapshot reader may read (both on the filter). */
  private readonly doneBitmap: CopyBitmap;
  /**
   * The source's length when the point in time was taken (the bitmaps' size). A file under a format
   * node grows as the format allocates: what lies past this end was not in the snapshot and needs no copy.
   */
  private readonly snapshotLength: number;
  private readonly accessBitmap: CopyBitmap;
  private readonly onCbwError: OnCbwError;
  private readonly cbwTimeoutMs: number;
  private readonly discardSource: boolean;
  private observer: WriteObserver | undefined;
  /** Copies before writes that timed out (cbw-timeout) and are still running. */
  private readonly lateCopies = new Set<Promise<void>>();
  /** Set once a copy failed with on-cbw-error=break-snapshot: no more copying, the image is broken. */
  snapshotError: unknown;
  /** A job's hooks (speed accounting, progress, failures), forwarded from the engine. */
  jobHooks: BlockCopyHooks & { snapshotBroken?(err: unknown): void } = {};

  constructor(nodeName: string, source: BlockNode, o: CopyBeforeWriteOptions) {
    super(nodeName, source, 'file');
    this.host = o.bitmaps;
    this.onCbwError = o.onCbwError;
    this.cbwTimeoutMs = o.cbwTimeout * 1000;
    this.discardSource = o.discardSource === true;
    this.attachChild('target', o.target, 'data');
    this.clusterSize = copyClusterSize(o.target, o.minClusterSize);
    // QEMU's order: the block-copy bitmap on the source, then done and access on the filter.
    this.copyBitmap = this.host.createHidden(source, this.clusterSize);
    if (o.bitmap) this.host.mergeInto(this.copyBitmap, o.bitmap);
    else this.host.setAll(this.copyBitmap);
    this.doneBitmap = this.host.createHidden(this, this.clusterSize);
    this.snapshotLength = this.length();
    this.accessBitmap = this.host.createHidden(this, this.clusterSize);
    this.host.mergeInto(this.accessBitmap, this.copyBitmap);
    const maxChunk = o.maxChunk ? Math.floor(o.maxChunk / this.clusterSize) * this.clusterSize : 0;
    // Into a target with streams (an NBD node, or a format or filter node over one) the mirror's rule
    // (streamBounds): more workers and larger pieces; x-perf max-workers and max-chunk, when given,
    // still bound both.
    const bounds = streamBounds(o.target, { maxInFlight: BACKUP_MAX_WORKERS, maxIoBytes: BLOCK_COPY_MAX_BUFFER });
    const maxIo = Math.max(this.clusterSize, maxChunk ? Math.min(maxChunk, bounds.maxIoBytes) : bounds.maxIoBytes);
    this.copy = new BlockCopy({
      source,
      target: o.target,
      bitmap: this.copyBitmap,
      chunkSize: this.clusterSize,
      bufSize: Math.max(BLOCK_COPY_MAX_MEM, maxIo),
      maxInFlight: o.maxWorkers ?? bounds.maxInFlight,
      maxIoBytes: maxIo,
      // x-perf max-chunk bounds every copy, the kernel's too (QEMU's block_copy_async max_chunk).
      ...(maxChunk ? { maxOffloadBytes: Math.max(this.clusterSize, maxChunk) } : {}),
      unmap: false,
      // A backup target holds whole clusters of the source (the chunk is at least its cluster size).
      fillPartialClusters: false,
      // As QEMU's block-copy (is_fleecing): only a target whose backing chain reads through to the
      // source needs its copies-before-write serialised against its reads (snapshot-access readers
      // hold the chunk locks instead); any other target takes them as the background copies, offloaded
      // to the kernel where it can (one copy_file_range instead of a read and a write).
      serialiseWriterCopies: chainContains(o.target, source),
      discardSource: this.discardSource,
      compress: o.compress,
      hooks: {
        launched: (offset, bytes) => this.jobHooks.launched?.(offset, bytes),
        progress: (bytes) => this.jobHooks.progress?.(bytes),
        failed: (operation, err, offset, bytes) => this.jobHooks.failed?.(operation, err, offset, bytes),
        ended: () => this.jobHooks.ended?.(),
        paced: () => this.jobHooks.paced?.() === true,
      },
    });
  }

  /** Start copying before writes: from here on the target's view of the source is frozen. */
  startObserving(): void {
    if (this.observer) return;
    this.observer = { beforeWrite: (req) => this.beforeSourceWrite(req) };
    this.filtered.addWriteObserver(this.observer);
  }

  /** cbw_do_copy_before_write, for every write to the source by any path. */
  private async beforeSourceWrite(req: WriteRequest): Promise<void> {
    if (this.snapshotError !== undefined || req.bytes === 0) return;
    // discard-source: the engine discarding what it has just copied (locked and clean: nothing to copy).
    if (req.kind === 'discard' && this.copy.isOwnSourceDiscard(req.offset, req.bytes)) return;
    traceCbw({ node: this.nodeName, offset: req.offset, bytes: req.bytes });
    try {
      await this.withTimeout(this.copy.copyNow(req.offset, req.bytes));
    } catch (err) {
      if (this.onCbwError === 'break-guest-write') throw err;
      // break-snapshot: the write goes on; the point-in-time image is no longer one.
      this.snapshotError = err;
      this.jobHooks.snapshotBroken?.(err);
      return;
    }
    const g = this.clusterSize;
    const start = Math.floor(req.offset / g) * g;
    const end = Math.min(this.snapshotLength, Math.ceil((req.offset + req.bytes) / g) * g);
    if (end > start) this.doneBitmap.setDirty(start, end - start);
  }

  /**
   * cbw-timeout: the copy fails as ETIMEDOUT once it took longer (QEMU's qemu_co_timeout around
   * block_copy). The copy itself cannot be stopped: it goes on holding its chunks' locks and ends
   * later (copied, or dirty again on failure, nobody told); closing the filter waits for it, as QEMU
   * keeps such a copy in the node's in-flight count.
   */
  private withTimeout(p: Promise<void>): Promise<void> {
    if (!this.cbwTimeoutMs) return p;
    let timer: NodeJS.Timeout | undefined;
    let timedOut = false;
    const timeout = new Promise<void>((_, reject) => {
      timer = setTimeout(() => {
        timedOut = true;
        const late = p.catch(() => undefined).finally(() => this.lateCopies.delete(late));
        this.lateCopies.add(late);
        reject(new BlockIOError('ETIMEDOUT'));
      }, this.cbwTimeoutMs);
    });
    // After a timeout the copy's own failure has nobody to tell.
    p.catch(() => undefined);
    return Promise.race([p, timeout]).finally(() => {
      if (!timedOut) clearTimeout(timer);
    });
  }

  // ---- the point-in-time image (for snapshot-access) ---------------------------------------------

  /**
   * cbw_co_preadv_snapshot: read the source as it was when copying began. Chunks still to copy are read
   * from the source, copied ones from the target; the range is held in the copy's chunk locks meanwhile,
   * so a write to the source waits (its copy-before-write waits for the lock) until the read is done.
   * A chunk outside the access bitmap (not in the `bitmap` option's set, or discarded) fails EACCES, as
   * does everything once the snapshot broke.
   */
  async snapshotRead(offset: number, bytes: number): Promise<Buffer> {
    if (this.snapshotError !== undefined) throw new BlockIOError('EACCES');
    const g = this.clusterSize;
    const start = Math.floor(offset / g) * g;
    const end = Math.min(this.length(), Math.ceil((offset + bytes) / g) * g);
    const lock = await this.copy.locks.acquire(start, end - start);
    try {
      const out = Buffer.alloc(bytes);
      for (let pos = offset; pos < offset + bytes; ) {
        const chunkEnd = Math.min(offset + bytes, (Math.floor(pos / g) + 1) * g);
        if (!this.accessBitmap.isDirty(pos)) throw new BlockIOError('EACCES');
        const from = this.copyBitmap.isDirty(pos) ? this.filtered : this.child('target')!.node;
        (await from.read(pos, chunkEnd - pos)).copy(out, pos - offset);
        pos = chunkEnd;
      }
      if (this.snapshotError !== undefined) throw new BlockIOError('EACCES');
      return out;
    } finally {
      lock.release();
    }
  }

  /**
   * cbw_co_pdiscard_snapshot: the reader of the point-in-time image no longer needs [offset, +bytes)
   * (a backup out of snapshot-access with discard-source, or a fleecing client's trim). Whole clusters
   * inside the range only (upstream QEMU since 9.1 aligns inwards; 7.2 asserts on an unaligned range):
   * they leave the access bitmap (reads fail EACCES from now on) and the copy bitmap (a later write to
   * the source copies nothing for them), and the target's copies are discarded. Done holding the
   * chunks' locks, so a copy-before-write of them in flight ends first and none starts meanwhile.
   */
  async snapshotDiscard(offset: number, bytes: number): Promise<void> {
    const g = this.clusterSize;
    const start = Math.ceil(offset / g) * g;
    const end = offset + bytes >= this.length() ? this.length() : Math.floor((offset + bytes) / g) * g;
    if (end <= start) return;
    const lock = await this.copy.locks.acquire(start, end - start);
    try {
      this.accessBitmap.resetDirty(start, end - start);
      this.copyBitmap.resetDirty(start, end - start);
      await this.child('target')!.node.discard(start, end - start);
    } finally {
      lock.release();
    }
  }

  /**
   * cbw_child_perm: the target is written (and not resized by others); the source as a filter's child,
   * written too with discard-source (upstream QEMU 9.1) once the filter has a user (the backup job).
   */
  override childPermissions(child: BdrvChild, perm: number, shared: number, writable: boolean): Permissions {
    if (child.name === 'target') return { perm: BLK_PERM_WRITE, shared: BLK_PERM_ALL & ~BLK_PERM_RESIZE };
    const p = super.childPermissions(child, perm, shared, writable);
    if (this.parents.some((e) => e.parentKind !== 'monitor')) {
      const read = perm & BLK_PERM_WRITE ? BLK_PERM_CONSISTENT_READ : 0;
      return { perm: p.perm | read | (this.discardSource ? BLK_PERM_WRITE : 0), shared: p.shared & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE) };
    }
    return p;
  }

  /** Stop copying and let go of the bitmaps (the filter leaves the graph). */
  override async close(): Promise<void> {
    await this.quiesce();
    if (this.observer) this.filtered.removeWriteObserver(this.observer);
    this.observer = undefined;
    await Promise.all([...this.lateCopies]);
    await this.copy.drain();
    this.copy.release();
    for (const bm of [this.accessBitmap, this.doneBitmap, this.copyBitmap]) this.host.release(bm);
  }
}

// ---- the blockdev-add driver -----------------------------------------------------------------------

const OnCbwErrorEnum = enumOf('OnCbwError', ['break-guest-write', 'break-snapshot']);

export const cbwDriver: BlockDriver = {
  name: 'copy-before-write',
  options: {
    file: BlockdevRef,
    target: BlockdevRef,
    '*bitmap': object('BlockDirtyBitmap', { node: str, name: str }),
    // Upstream since 7.2 (QEMU 8.0): on-cbw-error and cbw-timeout; since 9.2: min-cluster-size.
    '*on-cbw-error': OnCbwErrorEnum,
    '*cbw-timeout': uint32,
    '*min-cluster-size': int,
  } satisfies Members,
  async open(nodeName, opts, ctx) {
    const host = ctx.graph.copyBitmaps;
    if (!host) throw genericError('copy-before-write needs dirty bitmaps');
    const minClusterSize = checkMinClusterSize(opts['min-cluster-size'] as number | undefined);
    const file = await ctx.openChild(opts.file, opts['read-only'] as boolean, 'file', 'filtered');
    const target = await ctx.openChild(opts.target, false, 'target', 'data');
    let bitmap: CopyBitmap | undefined;
    const b = opts.bitmap as { node: string; name: string } | undefined;
    if (b) {
      const node = ctx.graph.find(b.node);
      if (!node) throw genericError(`Node '${b.node}' not found`);
      bitmap = host.lookup(node, b.name);
    }
    const node = new CopyBeforeWriteNode(nodeName, file, {
      target,
      bitmaps: host,
      bitmap,
      onCbwError: (opts['on-cbw-error'] as OnCbwError | undefined) ?? 'break-guest-write',
      cbwTimeout: (opts['cbw-timeout'] as number | undefined) ?? 0,
      minClusterSize,
    });
    node.startObserving();
    return node;
  },
};

/** min-cluster-size (upstream 9.2): a power of 2 (0: none). */
export function checkMinClusterSize(v: number | undefined): number {
  if (v === undefined || v === 0) return 0;
  if (v < 0 || (v & (v - 1)) !== 0) throw genericError('min-cluster-size needs to be a power of 2');
  return v;
}
