/**
 * The mirror job: copy a live node to a target while writes continue, converge, then (on job-complete)
 * switch over so the target takes the source's place in the graph.
 *
 * How it follows QEMU's block/mirror.c, and where it goes further:
 * - A mirror_top filter is inserted above the source (filter-node-name, or an implicit one), as QEMU does.
 * - Writes are observed on the source node itself, not only in the filter: every write that reaches the
 *   source, by any path (through the filter, HMP qemu-io on the source, a second export), is tracked
 *   (background mode) or copied synchronously (write-blocking mode) exactly once. In QEMU writes below
 *   the filter silently leave the target different.
 * - The working bitmap is the job's own (disabled, filled by the initial block-status scan and by writes),
 *   or the caller's (`bitmap` with sync=full: the unmerged upstream series), or a private copy of the
 *   caller's (`sync=bitmap|incremental` with `bitmap-mode`: Proxmox VE's variant).
 * - The copying itself (the walk over dirty chunks, up to 16 copies at once within buf-size, chunk
 *   locks, partial-cluster widening) is the copy engine's, block/copy/block-copy.ts; this file decides
 *   when to copy, what the job's state is, and what an error does.
 * - Completing (job-complete, or a soft cancel after READY) needs a moment in which nothing is dirty and
 *   no write is half-done. QEMU drains the graph for it. Here the job switches to copying every new
 *   write synchronously (as write-blocking does), copies what is left, and waits until the writes it has
 *   seen begin have ended; after that the target equals the source and stays so until the switch.
 * - Partial clusters: a write into a target cluster that is unallocated in a target without a backing
 *   file (a "diff" target) is widened to the whole cluster with the missing part read from the source,
 *   so the target never holds a cluster with partial data (the pitfall both bitmap-mirror patches
 *   document). The engine does the widening; the option says whether.
 * - The switch (the pivot of job-complete, or the end of a soft cancel after READY) happens in one
 *   synchronous step at a moment when nothing is dirty and no write is in flight on the filter or the
 *   source (prepare waits for one, copying every new write synchronously meanwhile): the target then
 *   equals the source, and a write either reached the source before the switch (and the target through
 *   the job) or goes to the target after it. With `__org.bitmirror_carry-bitmaps` the source chain's
 *   bitmaps are carried onto the target in that same step (bitmap/carry.ts), so every write is
 *   recorded by the source's bitmaps or by the target's, never by neither. The carry is checked when
 *   job-complete or the soft cancel is asked for (refused with the reason, nothing changed) and
 *   again before the switch (the job then fails without switching).
 */
import { genericError, errorMessage } from '../errors.js';
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
import { MirrorTopNode } from '../block/filters/mirror-top.js';
import { filterOrCowChild, freezeChain, unfreezeChain } from '../block/chain.js';
import type { BitmapManager } from '../bitmap/manager.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { commitCarry, planCarry, sourceChainLayers, type CarryDone } from '../bitmap/carry.js';
import { BlockCopy, streamBounds, type CopyOperation } from '../block/copy/block-copy.js';
import { chainStatus, forEachAllocated, readsAllZeroes } from '../block/copy/chain-status.js';
import type { ChunkLock } from '../block/copy/chunk-locks.js';
import { Job, type JobOptions, type OnError } from './job.js';
import type { JobRegistry } from './registry.js';
import { tracer } from '../trace/trace.js';

export type MirrorSync = 'full' | 'top' | 'none';
export type CopyMode = 'background' | 'write-blocking';
export type BitmapSyncMode = 'on-success' | 'never' | 'always';

/** QEMU's constants (block/mirror.c). */
export const MAX_IN_FLIGHT = 16;
export const MAX_IO_BYTES = 1 << 20;
export const DEFAULT_MIRROR_BUF_SIZE = 16 << 20;
const SLICE_MS = 100;

const traceStart = tracer.point('mirror_start');
const traceIteration = tracer.point('mirror_one_iteration');
const traceYield = tracer.point('mirror_yield');
const traceBeforeFlush = tracer.point('mirror_before_flush');
const traceBeforeSleep = tracer.point('mirror_before_sleep');
const traceActiveWrite = tracer.point('mirror_sync_write');
const traceDirty = tracer.point('mirror_dirty_init');

export interface MirrorJobOptions extends JobOptions {
  graph: BlockGraph;
  bitmaps: BitmapManager;
  /** The node whose data is copied (QEMU's `bs`). */
  source: BlockNode;
  target: BlockNode;
  /** Node to replace by the target on completion (default: the source). */
  replaces?: BlockNode;
  sync: MirrorSync;
  granularity: number;
  bufSize: number;
  onSourceError: OnError;
  onTargetError: OnError;
  copyMode: CopyMode;
  /** Write zeroes with MAY_UNMAP (blockdev-mirror always; drive-mirror's `unmap`). */
  unmap: boolean;
  /** The target already reads as zeroes: zero ranges of the source need no copy. */
  targetIsZero: boolean;
  filterNodeName?: string;
  /** The caller's bitmap used as the working bitmap (sync=full + bitmap). */
  workingBitmap?: DirtyBitmap;
  /** Proxmox's variant: the caller's bitmap seeds a private one and is updated per `bitmapMode` at the end. */
  syncBitmap?: { bitmap: DirtyBitmap; mode: BitmapSyncMode };
  /** Widen writes into unallocated clusters of a no-backing target to whole clusters (see above). */
  fillPartialClusters: boolean;
  /** Let the kernel copy data between host files (copy_file_range) where it can. */
  copyOffload: boolean;
  /**
   * drive-mirror: a target the job opened itself. When the job ends it is closed unless a parent uses
   * it (a pivot gave it the source's parents), as QEMU drops its last reference.
   */
  ownedTarget?: boolean;
  /**
   * drive-mirror mode=absolute-paths (QEMU's MIRROR_SOURCE_BACKING_CHAIN): the target runs without a
   * backing file and gets this node as its backing at completion — the source itself for sync=none,
   * the source's backing for sync=top — instead of opening the image named in its header a second time.
   */
  backingAtCompletion?: BlockNode;
  /**
   * `__org.bitmirror_carry-bitmaps`: at the switch (pivot or soft cancel after READY) the source
   * chain's bitmaps (the whole chain for sync=full, the top layer otherwise) are carried onto the target.
   */
  carryBitmaps?: boolean;
  /**
   * Active commit (block-commit of the active layer, QEMU's commit_active_start): the target is the
   * base of the source's backing chain. The job is a 'commit' job; only what lies above the base is
   * copied; a smaller base grows to the source's size; the filter asks no consistent read of the
   * chain (the layers above the base change) and lets it be written; the layers in between are
   * claimed and their links frozen. `baseWasReadOnly`: the command made the base writable for the
   * job; it is read-only again if the job fails or is cancelled before the pivot.
   */
  commit?: { baseWasReadOnly: boolean };
}

export class MirrorJob extends Job {
  readonly type: 'mirror' | 'commit';
  private readonly o: MirrorJobOptions;
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly filter: MirrorTopNode;
  private readonly bitmap: DirtyBitmap;
  private readonly bitmapIsLocal: boolean;
  private readonly granularity: number;
  private copyMode: CopyMode;
  /** Copies the dirty chunks of `bitmap`; synchronous writes hold their chunks in its locks. */
  private readonly copy: BlockCopy;
  /** Writes to the source that began while the observer was installed and have not ended. */
  private activeWrites = 0;
  private activeWriteBytes = 0;
  private activeWritesIdle: Array<() => void> = [];
  private failure: unknown;
  private shouldComplete = false;
  /** Every new write is copied synchronously (write-blocking mode, or while completing). */
  private finalSync = false;
  private activelySynced = false;
  private observer: WriteObserver | undefined;
  private pivoted = false;
  /** The switch has happened (or the job ended without one): writes are no longer copied synchronously. */
  private switched = false;
  private abandoned = false;
  private readonly blockerReason: string;
  /** Active commit: the layers between the source and the base (claimed, their links frozen). */
  private readonly intermediate: BlockNode[] = [];
  private frozen: BdrvChild[] = [];
  /** The job's parent edges (its BlockBackends and job claims) on the filter, source and target. */
  private readonly claims: BdrvChild[] = [];

  constructor(registry: JobRegistry, o: MirrorJobOptions) {
    super(registry, o);
    this.o = o;
    this.type = o.commit ? 'commit' : 'mirror';
    this.blockerReason = `block device is in use by block job: ${this.type}`;
    this.source = o.source;
    this.target = o.target;
    this.granularity = o.granularity;
    this.copyMode = o.copyMode;
    // The filter goes above the source: its parents become the filter's.
    const name = o.filterNodeName ?? o.graph.generateNodeName();
    this.filter = new MirrorTopNode(name, o.source, o.commit !== undefined);
    if (!o.filterNodeName) this.filter.implicit = true;
    if (o.workingBitmap) {
      this.bitmap = o.workingBitmap;
      this.bitmapIsLocal = false;
      o.bitmaps.setBusy(this.bitmap, true);
    } else {
      this.bitmap = o.bitmaps.createAnonymous(this.filter, o.granularity, { disabled: true });
      this.bitmapIsLocal = true;
      if (o.syncBitmap) {
        o.bitmaps.merge(this.bitmap, o.syncBitmap.bitmap);
        o.bitmaps.setBusy(o.syncBitmap.bitmap, true);
      }
    }
    // Into a target with streams (an NBD node, or a format or filter node over one), more copies in
    // flight and larger pieces of contiguous data (block-copy.ts: streamBounds); small extents still
    // make small requests.
    const { maxInFlight, maxIoBytes: pieceMax } = streamBounds(o.target, { maxInFlight: MAX_IN_FLIGHT, maxIoBytes: MAX_IO_BYTES });
    this.copy = new BlockCopy({
      source: o.source,
      target: o.target,
      bitmap: this.bitmap,
      chunkSize: o.granularity,
      bufSize: o.bufSize,
      maxInFlight,
      // One copy moves at most max_io_bytes, so that up to maxInFlight of them run side by side (each
      // piece it reads takes a pooled buffer of the piece's size).
      maxIoBytes: Math.max(o.bufSize / maxInFlight, pieceMax),
      unmap: o.unmap,
      fillPartialClusters: o.fillPartialClusters,
      offload: o.copyOffload,
      hooks: {
        launched: (offset, bytes) => {
          traceIteration({ job: this.id, offset, bytes });
          this.ratelimitProcessed(bytes);
        },
        progress: (bytes) => this.progressUpdate(bytes),
        failed: (operation, err) => this.copyFailed(operation, err),
        ended: () => this.kick(),
        paced: () => this.speed > 0,
      },
    });
  }

  /**
   * Put the filter in the graph and take the job's permissions as QEMU's mirror_start_job does, start
   * observing writes, block other users. Throws with nothing changed.
   */
  install(): void {
    const { graph } = this.o;
    graph.insertFilter(this.filter, this.source);
    try {
      const job = jobParent(this.type, this.id);
      // block_job_create: the job reads through the filter (its "main node" edge; QEMU's jobs have had no
      // BlockBackend of their own since 6.1, x-debug-query-block-graph shows the edge).
      this.claims.push(this.filter.attachParent(job, 'main node', BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_WRITE));
      if (this.o.commit) {
        // Active commit: the base is in use by the chain above it; anything but a resize by others is
        // fine. A smaller base is grown to the source's size.
        const resize = this.target.length() < this.source.length() ? BLK_PERM_RESIZE : 0;
        this.claims.push(this.target.attachParent(unnamedBackend(), 'root', BLK_PERM_WRITE | resize, BLK_PERM_WRITE_UNCHANGED | BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE));
      } else {
        // The target's BlockBackend writes and lets nobody else do anything but unchanged writes.
        this.claims.push(this.target.attachParent(unnamedBackend(), 'root', BLK_PERM_WRITE, BLK_PERM_WRITE_UNCHANGED));
      }
      // The source may be written and read by others while the job runs, but not resized.
      this.claims.push(this.source.attachParent(job, 'source', 0, BLK_PERM_WRITE_UNCHANGED | BLK_PERM_WRITE | BLK_PERM_CONSISTENT_READ));
      this.claims.push(this.target.attachParent(job, 'target', 0, BLK_PERM_ALL));
      if (this.o.commit) {
        // The layers between source and base disappear: nobody else may read them consistently or
        // resize them, and their links may not change.
        for (let n = filterOrCowChild(this.source); n && n !== this.target; n = filterOrCowChild(n)) {
          this.claims.push(n.attachParent(job, 'intermediate node', 0, BLK_PERM_WRITE_UNCHANGED | BLK_PERM_WRITE));
          this.intermediate.push(n);
        }
        this.frozen = freezeChain(this.filter, this.target);
      }
    } catch (err) {
      unfreezeChain(this.frozen);
      this.intermediate.splice(0);
      this.releaseClaims();
      graph.replace(this.filter, this.source);
      this.filter.detachChild('backing');
      graph.forget(this.filter);
      throw err;
    }
    this.observer = {
      beforeWrite: (req) => this.beforeSourceWrite(req),
      afterWrite: (req, err) => this.afterSourceWrite(req, err),
    };
    this.source.addWriteObserver(this.observer);
    for (const n of this.intermediate) n.addWriteObserver(this.layerObserver);
    // From here on the job records writes itself: the caller's bitmap stops recording (as in the series).
    if (!this.bitmapIsLocal) this.bitmap.disabled = true;
    this.source.blockers.set(this, this.blockerReason);
    this.target.blockers.set(this, this.blockerReason);
    for (const n of this.intermediate) n.blockers.set(this, this.blockerReason);
    traceStart({ job: this.id, source: this.source.nodeName, target: this.target.nodeName, granularity: this.granularity });
  }

  // ---- the copy loop ------------------------------------------------------------------------------

  protected async run(): Promise<void> {
    try {
      await this.runLoop();
    } finally {
      // mirror_run's exit path: a failed or cancelled job still waits for the copies it started, so
      // that none writes to the target (or changes the bitmap and progress) after the job has ended.
      await this.copy.drain();
    }
  }

  private async runLoop(): Promise<void> {
    const size = this.source.length();
    if (this.o.commit) {
      // Active commit grows a smaller base to the active layer's size.
      if (this.target.length() < size) await this.target.truncate(size);
    } else if (this.target.length() !== size) throw genericError('Source and target image have different sizes');
    if (size > 0 && this.o.sync !== 'none' && this.bitmapIsLocal && !this.o.syncBitmap) await this.dirtyInit(size);
    for (;;) {
      if (this.failure !== undefined) throw this.failure;
      await this.pausePoint();
      if (this.isCancelled()) return;
      const cnt = this.bitmap.count();
      this.progressSetRemaining(this.copy.bytesInFlight + cnt + this.activeWriteBytes);
      const sliceEnd = Date.now() + SLICE_MS;
      let worked = false;
      // A pause request stops new copies at once: the pause point waits for those in flight (onPause).
      while (Date.now() < sliceEnd && this.failure === undefined && !this.isCancelled() && !this.pausedRequested) {
        if (this.bitmap.count() > 0 && this.copy.hasRoom()) {
          const started = await this.copy.launchNext();
          if (!started) break;
          worked = true;
          if (this.speed > 0) await this.ratelimitSleep();
        } else break;
      }
      if (this.failure !== undefined || this.pausedRequested) continue;
      if (this.copy.copiesInFlight > 0 && (this.bitmap.count() === 0 || !this.copy.hasRoom() || !worked)) {
        traceYield({ job: this.id, in_flight: this.copy.copiesInFlight, cnt: this.bitmap.count() });
        await this.waitForAnyCopy();
        continue;
      }
      if (this.bitmap.count() > 0 || this.copy.copiesInFlight > 0) continue;
      // Nothing dirty, nothing being copied.
      if (!this.isReady() && this.status === 'running') {
        traceBeforeFlush({ job: this.id });
        if (!(await this.flushTarget())) continue;
        if (this.bitmap.count() > 0 || this.copy.copiesInFlight > 0) continue;
        this.progressSetRemaining(0);
        this.transitionToReady();
        if (this.copyMode === 'write-blocking') this.activelySynced = true;
      }
      if (this.shouldComplete || (this.cancelRequested && this.isReady())) {
        if (await this.converge()) return;
        continue;
      }
      if (this.copyMode === 'write-blocking' && this.activeWrites === 0) this.activelySynced = true;
      traceBeforeSleep({ job: this.id });
      await this.sleep(SLICE_MS);
    }
  }

  /**
   * The final step before completion: copy every new write synchronously, copy what is still dirty,
   * wait for half-done writes, flush. True when the target now equals the source.
   */
  private async converge(): Promise<boolean> {
    this.finalSync = true;
    await this.waitActiveWritesIdle();
    if (this.failure !== undefined || this.bitmap.count() > 0 || this.copy.copiesInFlight > 0) return false;
    if (!(await this.flushTarget())) return false;
    return this.bitmap.count() === 0 && this.copy.copiesInFlight === 0 && this.failure === undefined;
  }

  /** mirror_pause: a pause takes effect once the copies in flight have ended (nothing moves while paused). */
  protected override async onPause(): Promise<void> {
    await this.copy.drain();
  }

  /** mirror_dirty_init: mark what must be copied, from block status. */
  private async dirtyInit(size: number): Promise<void> {
    // Active commit copies what lies above the base (the target), and nothing else: the base has the rest.
    const base = this.o.commit ? this.target : this.o.sync === 'top' ? this.source.formatLayer().backing() : undefined;
    // A target that does not read as zeroes needs zero ranges of the source written too. As upstream
    // QEMU (10.1+) does, look before assuming: a freshly created target reads as zeroes.
    const cancelled = () => this.isCancelled();
    const copyZeroes = this.o.sync === 'full' && !this.o.commit && !this.o.targetIsZero && !(await readsAllZeroes(this.target, cancelled));
    traceDirty({ job: this.id, copyZeroes });
    if (copyZeroes) {
      this.bitmap.setDirty(0, size);
      return;
    }
    // A target that reads as zeroes (sync=full, checked above) needs nothing where the source reads as
    // zeroes, allocated or not (qcow2 zero clusters: what a backup writes for holes): a copy of them
    // would write zeroes that a raw target may keep as allocated space. Upstream QEMU (10.1) skips
    // those zero writes for the same reason; as there (and as 7.2, which writes them) they count as
    // copied, so the job's progress still covers every allocated byte.
    const targetReadsZeroes = this.o.sync === 'full' && !this.o.commit;
    const allocated: Array<[number, number]> = [];
    await forEachAllocated(this.source, base, (offset, bytes) => allocated.push([offset, bytes]), cancelled);
    for (const [offset, bytes] of allocated) {
      if (!targetReadsZeroes) {
        this.bitmap.setDirty(offset, bytes);
        continue;
      }
      for (let pos = offset; pos < offset + bytes; ) {
        if (cancelled()) return;
        const st = await chainStatus(this.source, pos, offset + bytes - pos);
        if (!st.zero) this.bitmap.setDirty(pos, st.bytes);
        else this.progressUpdate(st.bytes);
        pos += st.bytes;
      }
    }
  }

  /** The one answer to a failed copy, flush or synchronous write: the error policy decides what happens to the job. */
  private copyFailed(operation: CopyOperation, err: unknown): void {
    this.activelySynced = false;
    const action = this.errorAction(operation === 'read' ? this.o.onSourceError : this.o.onTargetError, operation, err);
    if (action === 'report' && this.failure === undefined) this.failure = err;
  }

  private async flushTarget(): Promise<boolean> {
    try {
      await this.target.flush();
      return true;
    } catch (err) {
      this.copyFailed('write', err);
      return false;
    }
  }

  // ---- writes to the source (the observer) --------------------------------------------------------

  private syncWrites(): boolean {
    // While completing, writes stay synchronous after the run has ended, until the switch in prepare().
    return (this.copyMode === 'write-blocking' || this.finalSync) && this.failure === undefined && !this.isCancelled() && !this.switched && (this.finalSync || !this.isCompleted());
  }

  private async beforeSourceWrite(req: WriteRequest): Promise<void> {
    this.activeWrites++;
    this.activeWriteBytes += req.bytes;
    if (!this.syncWrites()) return;
    // A synchronous copy must not race a background copy of the same chunks (which could land later
    // with older data): wait for those, then hold the chunks while this write is in flight.
    const g = this.granularity;
    const start = Math.floor(req.offset / g) * g;
    const end = Math.ceil((req.offset + req.bytes) / g) * g;
    activeOps.set(req, await this.copy.locks.acquire(start, end - start));
  }

  private async afterSourceWrite(req: WriteRequest, err: unknown): Promise<void> {
    const held = activeOps.get(req);
    activeOps.delete(req);
    try {
      if (err !== undefined || !held || !this.syncWrites() || req.kind === 'discard' || req.kind === 'copy') {
        // Not copied now: the chunks are copied by the loop. (A failed or discarded range may hold
        // anything, and a host copy brought no buffer, so it is copied from what the source reads.)
        this.bitmap.setDirty(req.offset, req.bytes);
        if (this.activelySynced && (err !== undefined || req.kind !== 'discard' || !held)) this.activelySynced = false;
        this.kick();
        return;
      }
      await this.syncTargetWrite(req);
    } finally {
      held?.release();
      this.writeEnded(req);
    }
  }

  private writeEnded(req: WriteRequest): void {
    this.activeWrites--;
    this.activeWriteBytes -= req.bytes;
    if (this.activeWrites === 0) {
      const w = this.activeWritesIdle;
      this.activeWritesIdle = [];
      for (const f of w) f();
    }
  }

  /**
   * Active commit, beyond QEMU: a write made directly to a layer between the source and the base
   * (opened read-write: HMP qemu-io, an export) changes what the source shows where the source has no
   * data of its own. QEMU's mirror sees only writes through its filter and loses it. Here its range is
   * copied again from what the source shows — before the write completes once the job is completing —
   * and the switch waits for such writes as for the source's.
   */
  private readonly layerObserver: WriteObserver = {
    beforeWrite: (req) => {
      this.activeWrites++;
      this.activeWriteBytes += req.bytes;
    },
    afterWrite: async (req) => {
      try {
        const size = this.source.length();
        if (req.offset >= size) return;
        const bytes = Math.min(req.bytes, size - req.offset);
        this.bitmap.setDirty(req.offset, bytes);
        this.activelySynced = false;
        if (!this.syncWrites()) {
          this.kick();
          return;
        }
        try {
          await this.copy.copyNow(req.offset, bytes);
        } catch (err) {
          // The layer has the write; the copy's failure is the job's (its range stays dirty).
          this.copyFailed('write', err);
          this.kick();
        }
      } finally {
        this.writeEnded(req);
      }
    },
  };

  /** do_sync_target_write: copy a guest write to the target before it completes. */
  private async syncTargetWrite(req: WriteRequest): Promise<void> {
    const g = this.granularity;
    let start = req.offset;
    let end = req.offset + req.bytes;
    // A partial head or tail chunk that is still dirty is left to the background copy (its other
    // bytes differ on the target anyway); a clean one is in sync, so writing just our bytes keeps it so.
    if (start % g !== 0 && this.bitmap.isDirty(start)) start = Math.min(end, Math.ceil(start / g) * g);
    if (end % g !== 0 && end > start && this.bitmap.isDirty(end - 1)) end = Math.max(start, Math.floor(end / g) * g);
    if (end <= start) return;
    traceActiveWrite({ job: this.id, offset: start, bytes: end - start });
    this.bitmap.resetDirtyInside(start, end - start);
    try {
      if (req.kind === 'write') await this.copy.writeTarget(start, req.data!.subarray(start - req.offset, end - req.offset));
      else await this.copy.writeTargetZeroes(start, end - start);
    } catch (e) {
      const s = Math.floor(start / g) * g;
      this.bitmap.setDirty(s, Math.min(this.source.length(), Math.ceil(end / g) * g) - s);
      this.copyFailed('write', e);
      this.kick();
    }
  }

  // ---- waiting ----------------------------------------------------------------------------------

  private async waitForAnyCopy(): Promise<void> {
    const ended = this.copy.anyEnded();
    if (!ended) return;
    // No timer: a background copy in flight kicks the job when it ends, whatever its outcome (and so do
    // pause, cancel, complete and set-speed), and a held range of a synchronous write ends `ended`.
    // (A timer per wait was set and cleared once per piece.)
    await Promise.race([ended, this.yieldUntilKicked()]);
  }

  private waitActiveWritesIdle(): Promise<void> {
    if (this.activeWrites === 0) return Promise.resolve();
    return new Promise((r) => this.activeWritesIdle.push(r));
  }

  // ---- verbs --------------------------------------------------------------------------------------

  protected override async doComplete(): Promise<void> {
    if (!this.isReady()) throw genericError(`The active block job '${this.id}' cannot be completed`);
    if (this.o.replaces && !this.o.graph.find(this.o.replaces.nodeName)) throw genericError(`Node name '${this.o.replaces.nodeName}' not found`);
    // A bitmap that cannot be carried refuses the completion now, with the job still ready.
    if (this.o.carryBitmaps) await planCarry(this.o.bitmaps, this.carryLayers(), this.carryDestination());
    if (this.cancelRequested || this.shouldComplete || !this.isReady()) throw genericError(`The active block job '${this.id}' cannot be completed`);
    this.o.replaces?.blockers.set(this, 'block device is in use by block-job-complete');
    this.shouldComplete = true;
  }

  /** Before READY every cancel is a force cancel; after it a soft cancel completes without pivot. */
  protected override onCancel(force: boolean): boolean {
    return force || !this.isReady();
  }

  /** A soft cancel after READY carries the bitmaps too: refused (job still ready) when they cannot be. */
  protected override async checkSoftCancel(): Promise<void> {
    if (this.o.carryBitmaps && !this.o.commit) await planCarry(this.o.bitmaps, this.carryLayers(), this.carryDestination());
  }

  /**
   * The layers whose bitmaps go to the target: the whole source chain for a full copy, else the top;
   * for an active commit the layers that leave the chain (the source down to the base, which keeps its own).
   */
  /** Where they go: the target's format node (a filter target, e.g. throttle, cannot keep bitmaps; writes pass it). */
  private carryDestination(): BlockNode {
    return this.target.formatLayer();
  }

  private carryLayers(): BlockNode[] {
    if (this.o.commit) return sourceChainLayers(this.source, this.target);
    const base = this.o.sync === 'full' ? undefined : this.source.formatLayer().backing();
    return sourceChainLayers(this.source, base);
  }

  protected override doChange(opts: Record<string, unknown>): void {
    const want = opts['copy-mode'] as CopyMode;
    if (want === this.copyMode) return;
    if (want !== 'write-blocking') throw genericError(`Change to copy mode '${want}' is not implemented`);
    if (this.copyMode !== 'background') throw genericError(`Expected current copy mode 'background', got '${this.copyMode}'`);
    this.copyMode = 'write-blocking';
    this.kick();
  }

  protected override extraBlockJobInfo(): Record<string, unknown> {
    // BlockJobInfo's mirror branch (upstream 9.x); a commit job has none.
    if (this.type === 'commit') return {};
    return { 'actively-synced': this.activelySynced };
  }

  // ---- finalization -------------------------------------------------------------------------------

  /**
   * mirror_exit_common on success: the switch. Completing, the target takes the source's place (the
   * pivot); a soft cancel after READY leaves the graph as it is, the target a copy of the source as of
   * that moment. Either way the bitmaps are carried when asked for, in the same synchronous step.
   */
  protected override async prepare(): Promise<void> {
    unfreezeChain(this.frozen);
    // (A soft cancel of an active commit changes no chain: nothing to carry.)
    const softCancel = !this.shouldComplete && this.cancelRequested && !this.o.commit;
    if (!this.shouldComplete && !softCancel) {
      this.switched = true;
      return;
    }
    const toReplace = this.o.replaces ?? this.source;
    if (this.shouldComplete && !this.o.graph.find(toReplace.nodeName) && toReplace !== this.source) {
      this.switched = true;
      throw genericError(`Can no longer replace '${toReplace.nodeName}' by '${this.target.nodeName}', because it can no longer be guaranteed that doing so would not lead to an abrupt change of visible data`);
    }
    let plan;
    try {
      // Checked again: bitmaps may have changed since job-complete. A refusal fails the job unswitched.
      if (this.o.carryBitmaps) plan = await planCarry(this.o.bitmaps, this.carryLayers(), this.carryDestination());
      await this.settleForSwitch();
    } catch (err) {
      this.switched = true;
      this.filter.releaseWrites();
      throw err;
    }
    // From here to the end of the switch nothing awaits: no write can come between the carry and the
    // switch, and none is in flight on the source (settleForSwitch).
    let carried: CarryDone | undefined;
    try {
      if (plan) carried = commitCarry(this.o.bitmaps, plan);
    } catch (err) {
      this.filter.releaseWrites();
      throw err;
    } finally {
      this.switched = true;
    }
    if (softCancel) {
      this.filter.releaseWrites();
      return;
    }
    try {
      // mirror_exit_common: drop the job's claims (the target's writer above all) and stop the filter
      // passing on permissions before the target takes the source's place, where they could conflict.
      this.releaseClaims();
      const backing = this.o.backingAtCompletion;
      if (backing && this.target.formatLayer().backing() !== backing) this.target.formatLayer().attachChild('backing', backing, 'cow');
      // The filter's parents and the replaced node's parents now use the target.
      this.o.graph.replace(this.filter, this.target);
      this.o.graph.replace(toReplace, this.target, this.filter);
    } catch (err) {
      carried?.undo();
      this.filter.releaseWrites();
      throw err;
    }
    this.pivoted = true;
    // The writes the filter held were sent before the switch; they go to the node that took its place.
    this.filter.releaseWrites(this.target);
  }

  /**
   * Wait for a moment at which the target equals the source: nothing dirty, no copy in flight, no
   * write in flight on the source, new writes through the filter held. Writes to the source by
   * another path meanwhile are copied synchronously (syncWrites), and whatever got dirty since the run
   * ended (e.g. while the job waited for job-finalize) is copied here. Returns at such a moment; the
   * caller switches without awaiting and then releases the filter's held writes.
   */
  private async settleForSwitch(): Promise<void> {
    this.finalSync = true;
    // New writes through the filter wait until the switch (released in prepare or clean): a guest
    // that keeps writes in flight all the time would otherwise never leave a quiet moment.
    this.filter.holdWrites();
    let wrote = false;
    for (;;) {
      if (this.failure !== undefined) throw this.failure;
      if (this.isCancelled()) throw genericError(`Job '${this.id}' was cancelled while switching`);
      if (this.bitmap.count() > 0 || this.copy.copiesInFlight > 0) {
        await this.copyDirty();
        wrote = true;
        continue;
      }
      if (this.activeWrites > 0) {
        await this.waitActiveWritesIdle();
        wrote = true;
        continue;
      }
      // Writes held by the filter have not reached the source; those past it are in its tracker.
      const writes = this.source.tracker.writesEnded();
      if (writes) {
        await writes;
        wrote = true;
        continue;
      }
      if (wrote) {
        wrote = false;
        if (!(await this.flushTarget())) continue;
        continue;
      }
      return;
    }
  }

  /** Copy every dirty chunk (after the run has ended: no rate limit, no pause). */
  private async copyDirty(): Promise<void> {
    while (this.bitmap.count() > 0 && this.failure === undefined && !this.isCancelled()) {
      if (this.copy.hasRoom()) {
        const before = this.copy.copiesInFlight;
        if (!(await this.copy.launchNext())) break;
        if (this.copy.copiesInFlight > before) continue;
      }
      // No room, or the next dirty chunks are held (a copy or a synchronous write): wait for one to end.
      const ended = this.copy.anyEnded();
      if (ended) await ended;
      else await new Promise<void>((r) => setImmediate(r));
    }
    await this.copy.drain();
  }

  /** Undo what the constructor and install() did, for a job that fails before it starts. */
  override async abandon(): Promise<void> {
    this.abandoned = true;
    await this.clean();
  }

  /** Drop the job's parent edges and make the filter take nothing from below (QEMU's s->stop). */
  private releaseClaims(): void {
    for (const e of this.claims.splice(0)) BlockNode.detachParent(e);
    this.filter.stop();
  }

  protected override async clean(): Promise<void> {
    const { graph, bitmaps } = this.o;
    this.switched = true;
    this.filter.releaseWrites();
    this.copy.release();
    if (this.observer) this.source.removeWriteObserver(this.observer);
    for (const n of this.intermediate) n.removeWriteObserver(this.layerObserver);
    this.observer = undefined;
    this.releaseClaims();
    // Take the filter out: whoever still uses it uses the source again.
    graph.replace(this.filter, this.source);
    this.filter.detachChild('backing');
    if (graph.find(this.filter.nodeName) === this.filter) await graph.remove(this.filter).catch(() => undefined);
    this.source.blockers.delete(this);
    this.target.blockers.delete(this);
    for (const n of this.intermediate) n.blockers.delete(this);
    unfreezeChain(this.frozen);
    this.o.replaces?.blockers.delete(this);
    // mirror_exit_common: a commit that failed (or was cancelled before READY) leaves the base
    // read-only again, as it found it. (After a pivot the base is the active layer; after a soft
    // cancel QEMU leaves it writable.)
    if (this.o.commit?.baseWasReadOnly && this.error !== undefined && !this.target.readOnly) {
      await graph.setReadOnly(this.target, true).catch(() => undefined);
    }
    const succeeded = this.error === undefined;
    if (this.bitmapIsLocal) {
      if (this.o.syncBitmap) {
        const { bitmap: user, mode } = this.o.syncBitmap;
        bitmaps.setBusy(user, false);
        if (!this.abandoned && (mode === 'always' || (mode === 'on-success' && succeeded))) {
          bitmaps.clear(user);
          bitmaps.merge(user, this.bitmap);
        }
      }
      bitmaps.release(this.bitmap);
    } else {
      bitmaps.setBusy(this.bitmap, false);
      this.bitmap.disabled = false;
    }
    if (this.o.ownedTarget && graph.find(this.target.nodeName) === this.target && this.target.parents.length === 0) {
      await graph.remove(this.target).catch(() => undefined);
    }
  }

  /** For tests and the CLI: a short description. */
  describe(): string {
    return `mirror ${this.source.nodeName} -> ${this.target.nodeName} (${errorMessage(this.failure ?? 'ok')})`;
  }
}

/** The chunks a synchronous write holds while in flight, by request. */
const activeOps = new WeakMap<WriteRequest, ChunkLock>();
