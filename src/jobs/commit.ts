/**
 * The commit job for an intermediate layer (QEMU's block/commit.c; block-commit with a top that no one
 * writes): copy what the layers top..above-base hold into the base, then drop those layers from the
 * chain — the overlay of top gets the base as its backing node, and its image records the base as its
 * backing file. (Committing the active layer is a mirror into the base: MirrorJob with `commit`.)
 *
 * As QEMU's job:
 * - a commit_top filter goes above top (filter-node-name, or an implicit node); the overlay reads the
 *   chain through it;
 * - the base is made writable for the job (and read-only again afterwards, if it was);
 * - the job claims every node from top down to the base (they may not be read consistently by others
 *   while they change, nor resized), the base (written by the job only), and freezes the backing
 *   links in between; its op blockers keep other jobs off them. On success the claims stay until the
 *   job is dismissed, as QEMU's do;
 * - events, states, progress (len = the size of top, every byte counted once) and on-error are
 *   QEMU's.
 * Where it goes further: the copying is the copy engine's (up to 16 copies at once, copy offload), and
 * the job observes writes to the layers it commits. A layer opened read-write can be written directly
 * (HMP qemu-io, an export) while it is committed; QEMU's sequential copy loses such a write when it
 * lands behind the copy. Here it marks its range to copy again, and once the copy has caught up every
 * such write is copied before it completes, so the base has it when the layers are dropped.
 */
import { genericError } from '../errors.js';
import { BlockNode, type BdrvChild, type WriteObserver, type WriteRequest } from '../block/node.js';
import {
  BLK_PERM_ALL,
  BLK_PERM_CONSISTENT_READ,
  BLK_PERM_RESIZE,
  BLK_PERM_WRITE,
  BLK_PERM_WRITE_UNCHANGED,
  jobParent,
  unnamedBackend,
} from '../block/permissions.js';
import type { BlockGraph } from '../block/graph.js';
import { CommitTopNode } from '../block/filters/commit-top.js';
import { filterOrCowChild, freezeChain, unfreezeChain, type Frozen } from '../block/chain.js';
import { BlockCopy, STREAM_BUF_SIZE, streamBounds, type CopyOperation } from '../block/copy/block-copy.js';
import { forEachAllocated } from '../block/copy/chain-status.js';
import { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import type { BitmapManager } from '../bitmap/manager.js';
import { commitCarry, planCarry, sourceChainLayers } from '../bitmap/carry.js';
import { Job, type JobOptions, type OnError } from './job.js';
import type { JobRegistry } from './registry.js';
import { tracer } from '../trace/trace.js';

/** QEMU's COMMIT_BUFFER_SIZE: the most one copy moves. */
export const COMMIT_BUFFER_SIZE = 512 * 1024;
/** Copies at once (the copy engine's bound, as the mirror's). */
const MAX_IN_FLIGHT = 16;
const SLICE_MS = 100;

const traceStart = tracer.point('commit_start');
const traceIteration = tracer.point('commit_one_iteration');

export interface CommitJobOptions extends JobOptions {
  graph: BlockGraph;
  bitmaps: BitmapManager;
  /** The root node the command named (`device`): the job holds it as its main node. */
  device: BlockNode;
  top: BlockNode;
  base: BlockNode;
  /** The backing file name to record in the overlay (default: the base's file name). */
  backingFile?: string;
  /** Record 'raw' rather than a protocol driver's name as the backing format (upstream 9.0). */
  backingMaskProtocol: boolean;
  onError: OnError;
  filterNodeName?: string;
  /**
   * `__org.bitmirror_carry-bitmaps`: in the same step as the layers are dropped, their bitmaps are
   * carried into the base (bitmap/carry.ts: merged into the base's bitmap of the same name, or new).
   */
  carryBitmaps?: boolean;
}

export class CommitJob extends Job {
  readonly type = 'commit' as const;
  private readonly o: CommitJobOptions;
  readonly filter: CommitTopNode;
  /** The layers whose data goes into the base: top and everything below it above the base. */
  private readonly layers: BlockNode[] = [];
  /** What is still to copy (QEMU walks the image instead; this one is the job's own, on no node). */
  private readonly bitmap: DirtyBitmap;
  private readonly copy: BlockCopy;
  private readonly granularity: number;
  private baseWasReadOnly = false;
  private filterInserted = false;
  private frozen: Frozen = [];
  /** Parent edges that go at abort or when the job is freed (QEMU's block_job_remove_all_bdrv). */
  private claims: BdrvChild[] = [];
  /** The job's BlockBackend on the base (writes) and on top (reads): gone at the chain change. */
  private baseBackend: BdrvChild | undefined;
  private topBackend: BdrvChild | undefined;
  private readonly blockerReason = 'block device is in use by block job: commit';
  private blocked: BlockNode[] = [];
  private observer: WriteObserver | undefined;
  /** Writes to the layers in flight (the final copy waits for them). */
  private writesInFlight = 0;
  private writesIdle: Array<() => void> = [];
  /** The copy has caught up: every write to a layer is copied before it completes. */
  private syncWrites = false;
  private failure: unknown;
  /** Progress reported so far (len − what is left, never going back). */
  private reported = 0;

  constructor(registry: JobRegistry, o: CommitJobOptions) {
    super(registry, o);
    this.o = o;
    for (let n: BlockNode | undefined = o.top; n && n !== o.base; n = filterOrCowChild(n)) this.layers.push(n);
    this.filter = new CommitTopNode(o.filterNodeName ?? o.graph.generateNodeName(), o.top);
    if (!o.filterNodeName) this.filter.implicit = true;
    this.granularity = o.bitmaps.defaultGranularity(o.base);
    this.bitmap = new DirtyBitmap(o.top, undefined, this.granularity, o.top.length(), { disabled: true });
    // Into a base with streams (a format node over an NBD node) the mirror's rule (streamBounds):
    // more copies in flight, larger pieces of contiguous data, and a budget of STREAM_BUF_SIZE for
    // each stream.
    const bounds = streamBounds(o.base, { maxInFlight: MAX_IN_FLIGHT, maxIoBytes: COMMIT_BUFFER_SIZE });
    this.copy = new BlockCopy({
      source: o.top,
      target: o.base,
      bitmap: this.bitmap,
      chunkSize: this.granularity,
      bufSize: Math.max(MAX_IN_FLIGHT * COMMIT_BUFFER_SIZE, STREAM_BUF_SIZE * (bounds.streams ?? 0)),
      maxInFlight: bounds.maxInFlight,
      maxIoBytes: bounds.maxIoBytes,
      unmap: false,
      fillPartialClusters: false,
      hooks: {
        launched: (offset, bytes) => {
          traceIteration({ job: this.id, offset, bytes });
          this.ratelimitProcessed(bytes);
        },
        progress: () => this.reportProgress(),
        failed: (operation, err) => this.copyFailed(operation, err),
        ended: () => {
          this.reportProgress();
          this.kick();
        },
        paced: () => this.speed > 0,
      },
    });
  }

  /**
   * commit_start after block_job_create: the base writable, the filter above top, the claims, the
   * frozen chain, the job's backends. Throws QEMU's error with everything undone.
   */
  async install(checkFilterName: () => void = () => undefined): Promise<void> {
    const { graph, device, top, base } = this.o;
    const job = jobParent('commit', this.id);
    try {
      this.claim(device.attachParent(job, 'main node', 0, BLK_PERM_ALL), device);
      if (base.readOnly) {
        this.baseWasReadOnly = true;
        await graph.setReadOnly(base, false);
      }
      // QEMU names the filter after the reopen (bdrv_new_open_driver).
      checkFilterName();
      graph.insertFilter(this.filter, top);
      this.filterInserted = true;
      // The layers that disappear: nobody else may read them consistently (they change), or resize them.
      for (const n of this.layers) this.claim(n.attachParent(job, 'intermediate node', 0, BLK_PERM_WRITE_UNCHANGED | BLK_PERM_WRITE), n);
      this.frozen = freezeChain(this.filter, base);
      this.claim(base.attachParent(job, 'base', 0, BLK_PERM_ALL), base);
      const resize = base.length() < top.length() ? BLK_PERM_RESIZE : 0;
      this.baseBackend = base.attachParent(unnamedBackend(), 'root', BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | resize, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED);
      this.topBackend = top.attachParent(unnamedBackend(), 'root', 0, BLK_PERM_ALL);
    } catch (err) {
      await this.undoInstall();
      throw err;
    }
    this.observer = {
      beforeWrite: (req) => this.beforeLayerWrite(req),
      afterWrite: (req, err) => this.afterLayerWrite(req, err),
    };
    for (const n of this.layers) n.addWriteObserver(this.observer);
    traceStart({ job: this.id, top: top.nodeName, base: base.nodeName });
  }

  private claim(edge: BdrvChild, node: BlockNode): void {
    this.claims.push(edge);
    if (!node.blockers.has(this)) {
      node.blockers.set(this, this.blockerReason);
      this.blocked.push(node);
    }
  }

  /** A job that fails to start: undo what install did, in reverse (commit_start's fail path). */
  private async undoInstall(): Promise<void> {
    unfreezeChain(this.frozen);
    this.releaseBackends();
    this.releaseClaims();
    if (this.baseWasReadOnly) await this.o.graph.setReadOnly(this.o.base, true).catch(() => undefined);
    this.baseWasReadOnly = false;
    await this.removeFilter();
  }

  private releaseBackends(): void {
    if (this.baseBackend) BlockNode.detachParent(this.baseBackend);
    if (this.topBackend) BlockNode.detachParent(this.topBackend);
    this.baseBackend = this.topBackend = undefined;
  }

  private releaseClaims(): void {
    for (const e of this.claims.splice(0)) BlockNode.detachParent(e);
    for (const n of this.blocked.splice(0)) n.blockers.delete(this);
  }

  /** Take the filter out: whoever used it uses top again (or, after the chain change, nobody does). */
  private async removeFilter(): Promise<void> {
    const { graph } = this.o;
    if (this.filterInserted && this.filter.parents.length > 0) graph.replace(this.filter, this.o.top);
    this.filterInserted = false;
    this.filter.detachChild('backing');
    if (graph.find(this.filter.nodeName) === this.filter) await graph.remove(this.filter).catch(() => undefined);
  }

  // ---- the copy -----------------------------------------------------------------------------------

  protected async run(): Promise<void> {
    try {
      await this.runLoop();
    } finally {
      await this.copy.drain();
    }
  }

  private async runLoop(): Promise<void> {
    const { top, base } = this.o;
    const len = top.length();
    this.progressSetRemaining(len);
    if (base.length() < len) await base.truncate(len);
    await forEachAllocated(top, base, (offset, bytes) => this.bitmap.setDirty(offset, bytes), () => this.isCancelled());
    this.reportProgress();
    for (;;) {
      if (this.failure !== undefined) throw this.failure;
      await this.pausePoint();
      if (this.isCancelled()) return;
      const sliceEnd = Date.now() + SLICE_MS;
      while (Date.now() < sliceEnd && this.failure === undefined && !this.isCancelled() && !this.pausedRequested) {
        if (this.bitmap.count() === 0 || !this.copy.hasRoom()) break;
        if (!(await this.copy.launchNext())) break;
        if (this.speed > 0) await this.ratelimitSleep();
      }
      if (this.failure !== undefined || this.pausedRequested || this.isCancelled()) continue;
      if (this.copy.copiesInFlight > 0) {
        const ended = this.copy.anyEnded();
        if (ended) await Promise.race([ended, this.yieldUntilKicked(SLICE_MS)]);
        continue;
      }
      if (this.bitmap.count() > 0) continue;
      // Caught up: from now on writes to the layers are copied before they complete; the ones in
      // flight end first, and whatever they dirtied is copied by the loop.
      this.syncWrites = true;
      await this.waitWritesIdle();
      if (this.bitmap.count() > 0 || this.copy.copiesInFlight > 0) continue;
      try {
        await base.flush();
      } catch (err) {
        this.copyFailed('write', err);
        continue;
      }
      if (this.bitmap.count() === 0 && this.copy.copiesInFlight === 0 && this.failure === undefined) return;
    }
  }

  /** Progress: len − what is still to copy, reported as it grows. */
  private reportProgress(): void {
    const left = this.bitmap.count() + this.copy.bytesInFlight;
    const done = Math.max(0, this.progressTotal - left);
    if (done > this.reported) {
      this.progressUpdate(done - this.reported);
      this.reported = done;
    }
  }

  /** block_job_error_action with the job's on-error: 'report' fails it; the range stays dirty. */
  private copyFailed(operation: CopyOperation, err: unknown): void {
    const action = this.errorAction(this.o.onError, operation, err);
    if (action === 'report' && this.failure === undefined) this.failure = err;
  }

  // ---- writes to the committed layers (beyond QEMU) -----------------------------------------------

  private beforeLayerWrite(_req: WriteRequest): void {
    this.writesInFlight++;
  }

  private async afterLayerWrite(req: WriteRequest, _err: unknown): Promise<void> {
    try {
      // Whatever the write did (even a failed one may have changed part of it), what top shows there
      // is copied again.
      this.bitmap.setDirty(req.offset, Math.min(req.bytes, this.bitmap.size - req.offset));
      // (Also while the job waits for job-finalize: the observer goes at the chain change.)
      if (!this.syncWrites) this.kick();
      else {
        try {
          await this.copy.copyNow(req.offset, req.bytes);
        } catch (err) {
          // The layer has the write; the copy's failure is the job's (the range stays dirty, and the
          // chain change refuses to drop the layer without it).
          this.copyFailed('write', err);
          this.kick();
        }
      }
    } finally {
      if (--this.writesInFlight === 0) for (const f of this.writesIdle.splice(0)) f();
    }
  }

  private waitWritesIdle(): Promise<void> {
    if (this.writesInFlight === 0) return Promise.resolve();
    return new Promise((r) => this.writesIdle.push(r));
  }

  // ---- finalization -------------------------------------------------------------------------------

  /**
   * commit_prepare: the chain change (bdrv_drop_intermediate). Every parent of the filter (the overlay)
   * gets the base in its place, and an overlay whose backing link that is records the base's file name
   * (or backing-file) in its image.
   */
  protected override async prepare(): Promise<void> {
    const { graph, base } = this.o;
    // Copies of writes that came after the run are done (they completed with their writes).
    if (this.bitmap.count() > 0) throw genericError('Commit job could not copy every write to the committed layers');
    this.stopObserving();
    unfreezeChain(this.frozen);
    // The base's writer goes before the normal backing chain is restored.
    this.releaseBackends();
    const parents = this.filter.parents.filter((e) => e.parentNode && e.role === 'cow');
    // The layers are written by nobody now (writes to them were copied synchronously and have ended,
    // and a new one would be copied too): the carry and the chain change go in one synchronous step.
    const plan = this.o.carryBitmaps ? await planCarry(this.o.bitmaps, sourceChainLayers(this.o.top, base), base) : undefined;
    await this.waitWritesIdle();
    const carried = plan ? commitCarry(this.o.bitmaps, plan) : undefined;
    try {
      graph.replace(this.filter, base);
    } catch (err) {
      carried?.undo();
      throw err;
    }
    const backingFile = this.o.backingFile ?? base.imageInfo().filename;
    const format = this.o.backingMaskProtocol && base.formatLayer() === base && !base.primaryChild() && !base.backing() ? 'raw' : base.driver;
    for (const e of parents) await updateBackingFile(graph, e.parentNode!, backingFile, format);
  }

  protected override async abort(): Promise<void> {
    this.stopObserving();
    unfreezeChain(this.frozen);
    this.releaseBackends();
    this.releaseClaims();
  }

  protected override async clean(): Promise<void> {
    this.stopObserving();
    this.copy.release();
    await this.removeFilter();
    // commit_clean: the base goes back to read-only (not atomic; a failure is not reported).
    if (this.baseWasReadOnly) await this.o.graph.setReadOnly(this.o.base, true).catch(() => undefined);
  }

  protected override free(): void {
    this.releaseBackends();
    this.releaseClaims();
  }

  /** Undo the constructor and install() for a job that fails before it starts. */
  override async abandon(): Promise<void> {
    this.stopObserving();
    await this.undoInstall();
  }

  private stopObserving(): void {
    if (!this.observer) return;
    for (const n of this.layers) n.removeWriteObserver(this.observer);
    this.observer = undefined;
  }
}

/**
 * bdrv_backing_update_filename: `overlay`'s image names `backingFile` of `format` as its backing file;
 * a read-only overlay is made writable for the change and read-only again. QEMU's message on failure.
 */
async function updateBackingFile(graph: BlockGraph, overlay: BlockNode, backingFile: string, format: string): Promise<void> {
  const readOnly = overlay.readOnly;
  if (readOnly) await graph.setReadOnly(overlay, false);
  try {
    await overlay.changeBackingFile(backingFile, format);
  } catch (err) {
    throw genericError(`Could not update backing file link: ${err instanceof Error ? err.message : String(err)}`);
  } finally {
    if (readOnly) await graph.setReadOnly(overlay, true).catch(() => undefined);
  }
}
