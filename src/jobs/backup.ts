/**
 * The backup job: a point-in-time copy of a node into a target while writes continue (QEMU's
 * block/backup.c). A copy-before-write filter goes above the source (filter-node-name, or an implicit
 * one); from that instant every first write to a range of the source copies the range's old data to the
 * target first, by whatever path the write came (the filter observes the source node itself). The job
 * walks the filter's copy bitmap and copies the rest in the background with the shared copy engine:
 * chunks copied before a write are not copied again, so the target ends as the source was at the start.
 *
 * What is copied (sync): full — everything; top — what the source's top layer allocates; bitmap (and
 * incremental, its on-success form) — the chunks dirty in the user's bitmap; none — nothing in the
 * background: only copy-before-write, until the job is cancelled (fleecing).
 *
 * The user's bitmap (BitmapSyncMode): the caller froze it with a successor (new writes go there) before
 * the job was made; at the end it is abdicated (the successor replaces it: it then holds exactly the
 * writes made during the job) or reclaimed (the successor's bits merged back: as if no backup ran), as
 * backup_cleanup_sync_bitmap decides: abdicate when (success or mode=always) and mode≠never; after a
 * failure with mode=always the chunks not copied are added to it, so that the next incremental backup
 * copies them.
 */
import { genericError } from '../errors.js';
import { BlockNode, type BdrvChild } from '../block/node.js';
import { BLK_PERM_ALL, jobParent } from '../block/permissions.js';
import { idWellFormed, type BlockGraph } from '../block/graph.js';
import { CopyBeforeWriteNode, type OnCbwError } from '../block/filters/copy-before-write.js';
import type { CopyOperation } from '../block/copy/block-copy.js';
import type { BitmapManager } from '../bitmap/manager.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { Job, type JobOptions, type OnError } from './job.js';
import type { JobRegistry } from './registry.js';
import type { BitmapSyncMode } from './mirror.js';
import { tracer } from '../trace/trace.js';

/** MirrorSyncMode after `incremental` became `bitmap` + on-success. */
export type BackupSync = 'full' | 'top' | 'none' | 'bitmap';

const traceStart = tracer.point('backup_start');
const SLICE_MS = 100;

export interface BackupJobOptions extends JobOptions {
  graph: BlockGraph;
  bitmaps: BitmapManager;
  source: BlockNode;
  target: BlockNode;
  sync: BackupSync;
  /** The user's bitmap, already frozen with a successor (BitmapManager.createSuccessor). */
  syncBitmap?: { bitmap: DirtyBitmap; mode: BitmapSyncMode };
  /** The copy-before-write filter appendCbw put above the source. */
  filter: CopyBeforeWriteNode;
  onSourceError: OnError;
  onTargetError: OnError;
  /**
   * drive-backup: a target the job opened itself, closed when the job ends unless someone else
   * uses it (QEMU drops its last reference).
   */
  ownedTarget?: boolean;
}

export class BackupJob extends Job {
  readonly type = 'backup' as const;
  private readonly o: BackupJobOptions;
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly filter: CopyBeforeWriteNode;
  private failure: unknown;
  private readonly claims: BdrvChild[] = [];
  private readonly blockerReason = 'block device is in use by block job: backup';

  constructor(registry: JobRegistry, o: BackupJobOptions) {
    super(registry, o);
    this.o = o;
    this.source = o.source;
    this.target = o.target;
    this.filter = o.filter;
  }

  /** The filter's cluster size: the unit of the copy (block_copy_cluster_size). */
  get clusterSize(): number {
    return this.filter.clusterSize;
  }

  /**
   * The job's claims, the copy bitmap for the sync mode, copying before writes from here on, other
   * users blocked. Throws with nothing changed.
   */
  install(): void {
    try {
      const job = jobParent('backup', this.id);
      // block_job_create(cbw, 0, BLK_PERM_ALL); the target's claim (its writer is the filter).
      this.claims.push(this.filter.attachParent(job, 'main node', 0, BLK_PERM_ALL));
      this.claims.push(this.target.attachParent(job, 'target', 0, BLK_PERM_ALL));
    } catch (err) {
      this.releaseClaims();
      throw err;
    }
    // backup_init_bcs_bitmap, done here before the first write is observed: the copy set is fixed at
    // the instant the filter starts copying.
    const bcs = this.filter.copyBitmap as DirtyBitmap;
    if (this.o.sync === 'bitmap') {
      bcs.clear();
      bcs.hbitmap.merge(this.o.syncBitmap!.bitmap.hbitmap);
    }
    this.filter.jobHooks = {
      launched: (_offset, bytes) => this.ratelimitProcessed(bytes),
      progress: (bytes) => this.progressUpdate(bytes),
      failed: (operation, err) => this.copyFailed(operation, err),
      ended: () => this.kick(),
      paced: () => this.speed > 0,
      // The point-in-time image is broken (on-cbw-error=break-snapshot): the backup cannot be one.
      snapshotBroken: (err) => {
        if (this.failure === undefined) this.failure = err;
        this.kick();
      },
    };
    this.filter.startObserving();
    this.progressSetRemaining(bcs.count());
    this.filter.blockers.set(this, this.blockerReason);
    this.target.blockers.set(this, this.blockerReason);
    traceStart({ job: this.id, source: this.source.nodeName, target: this.target.nodeName, sync: this.o.sync });
  }

  // ---- the copy loop ------------------------------------------------------------------------------

  protected async run(): Promise<void> {
    try {
      await this.runLoop();
    } finally {
      // A failed or cancelled job waits for its copies: none writes to the target after it ended.
      await this.filter.copy.drain();
    }
  }

  private async runLoop(): Promise<void> {
    const copy = this.filter.copy;
    const bcs = this.filter.copyBitmap;
    if (this.o.sync === 'none') {
      // Copy-before-write only, until cancelled (a failed copy with break-snapshot fails the job).
      for (;;) {
        if (this.failure !== undefined) throw this.failure;
        await this.pausePoint();
        if (this.isCancelled()) return;
        await this.yieldUntilKicked();
      }
    }
    if (this.o.sync === 'top') await this.resetUnallocated();
    for (;;) {
      if (this.failure !== undefined) throw this.failure;
      await this.pausePoint();
      if (this.isCancelled()) return;
      this.progressSetRemaining(copy.bytesInFlight + bcs.count());
      let started = false;
      while (this.failure === undefined && !this.isCancelled() && !this.pausedRequested && bcs.count() > 0 && copy.hasRoom()) {
        if (!(await copy.launchNext())) break;
        started = true;
        if (this.speed > 0) await this.ratelimitSleep();
      }
      if (this.failure !== undefined || this.pausedRequested || this.isCancelled()) continue;
      if (copy.copiesInFlight > 0) {
        const ended = copy.anyEnded();
        if (ended) await Promise.race([ended, this.yieldUntilKicked(SLICE_MS)]);
        continue;
      }
      if (bcs.count() === 0) return;
      // Dirty chunks, nothing in flight, none started: a copy-before-write holds them; wait for it.
      if (!started) await (copy.anyEnded() ?? this.yieldUntilKicked(SLICE_MS));
    }
  }

  /** backup_run for sync=top: chunks the source's top layer does not allocate are not copied. */
  private async resetUnallocated(): Promise<void> {
    const bcs = this.filter.copyBitmap;
    const base = this.source.formatLayer().backing();
    const size = this.source.length();
    const g = this.clusterSize;
    for (let offset = 0; offset < size; ) {
      await this.pausePoint();
      if (this.isCancelled()) return;
      const st = await this.source.isAllocatedAbove(base, offset, Math.min(size - offset, 1 << 30));
      // Whole chunks only: a chunk partly allocated is copied.
      const end = offset + st.bytes;
      if (!st.allocated) {
        const s = Math.ceil(offset / g) * g;
        const e = end >= size ? size : Math.floor(end / g) * g;
        if (e > s) bcs.resetDirty(s, e - s);
      }
      offset = end;
      this.progressSetRemaining(this.filter.copy.bytesInFlight + bcs.count());
    }
  }

  /** A failed background copy: the error policy decides (the chunks are dirty again and retried). */
  private copyFailed(operation: CopyOperation, err: unknown): void {
    const action = this.errorAction(operation === 'read' ? this.o.onSourceError : this.o.onTargetError, operation, err);
    if (action === 'report' && this.failure === undefined) this.failure = err;
  }

  /** A pause takes effect once the copies in flight have ended. */
  protected override async onPause(): Promise<void> {
    await this.filter.copy.drain();
  }

  // ---- finalization -------------------------------------------------------------------------------

  protected override async commit(): Promise<void> {
    this.cleanupSyncBitmap(true);
  }

  protected override async abort(): Promise<void> {
    this.cleanupSyncBitmap(false);
  }

  /** backup_cleanup_sync_bitmap. */
  private cleanupSyncBitmap(succeeded: boolean): void {
    const sb = this.o.syncBitmap;
    if (!sb) return;
    const { bitmaps } = this.o;
    const sync = (succeeded || sb.mode === 'always') && sb.mode !== 'never';
    const bm = sync ? bitmaps.abdicate(sb.bitmap) : bitmaps.reclaim(sb.bitmap);
    // Failed but synced: the chunks not copied are still to be backed up next time.
    if (!succeeded && sb.mode === 'always') bm.hbitmap.merge((this.filter.copyBitmap as DirtyBitmap).hbitmap);
  }

  /** Undo what the caller and install() did, for a job that fails before it starts. */
  override async abandon(): Promise<void> {
    const sb = this.o.syncBitmap;
    if (sb?.bitmap.successor) this.o.bitmaps.reclaim(sb.bitmap);
    await this.clean();
  }

  private releaseClaims(): void {
    for (const e of this.claims.splice(0)) BlockNode.detachParent(e);
  }

  protected override async clean(): Promise<void> {
    const { graph } = this.o;
    this.releaseClaims();
    this.filter.blockers.delete(this);
    this.target.blockers.delete(this);
    await dropCbw(graph, this.filter);
    if (this.o.ownedTarget && graph.find(this.target.nodeName) === this.target && this.target.parents.length === 0) {
      await graph.remove(this.target).catch(() => undefined);
    }
  }
}

/** What appendCbw needs beyond the nodes. */
export interface CbwAppendOptions {
  filterNodeName?: string;
  onCbwError: OnCbwError;
  minClusterSize: number;
  /** x-perf max-workers; undefined: the filter's default. */
  maxWorkers?: number;
  maxChunk: number;
  /** Discard on the source what the backup copied (upstream QEMU 9.1). */
  discardSource: boolean;
  /** The copies go to the target as compressed writes (block_copy_set_copy_opts' compress). */
  compress?: boolean;
}

/**
 * bdrv_cbw_append: a copy-before-write filter above `source` (its parents move to the filter), copying
 * to `target`. It does not copy yet: the job starts it (BackupJob.install). Throws QEMU's "Could not
 * create node: …" with nothing changed.
 */
export function appendCbw(graph: BlockGraph, source: BlockNode, target: BlockNode, o: CbwAppendOptions): CopyBeforeWriteNode {
  const name = o.filterNodeName ?? graph.generateNodeName();
  if (o.filterNodeName !== undefined) {
    if (!idWellFormed(name)) throw genericError(`Could not create node: Invalid node-name: '${name}'`);
    if (graph.find(name)) throw genericError(`Could not create node: Duplicate nodes with node-name='${name}'`);
  }
  const filter = new CopyBeforeWriteNode(name, source, {
    target,
    bitmaps: graph.copyBitmaps!,
    onCbwError: o.onCbwError,
    cbwTimeout: 0,
    minClusterSize: o.minClusterSize,
    maxWorkers: o.maxWorkers,
    maxChunk: o.maxChunk,
    discardSource: o.discardSource,
    compress: o.compress,
  });
  if (o.filterNodeName === undefined) filter.implicit = true;
  try {
    graph.insertFilter(filter, source);
  } catch (err) {
    void closeFilter(filter);
    throw err;
  }
  return filter;
}

/** bdrv_cbw_drop: whoever uses the filter uses the source again; the filter stops and closes. */
export async function dropCbw(graph: BlockGraph, filter: CopyBeforeWriteNode): Promise<void> {
  try {
    graph.replace(filter, filter.filtered);
  } catch {
    // The filter's parents going back to the source take what they took on the filter: no conflict.
  }
  graph.forget(filter);
  await closeFilter(filter);
}

async function closeFilter(filter: CopyBeforeWriteNode): Promise<void> {
  await filter.close().catch(() => undefined);
  filter.detachChild('target');
  filter.detachChild('file');
}
