/**
 * The stream job (QEMU 7.2's block/stream.c, `block-stream`): pull the data of the backing chain
 * between a node and its base into the node, then drop the layers in between from the chain.
 *
 * A copy-on-read filter goes above the node (filter-node-name, or an implicit one) with `bottom` the
 * lowest layer streamed; the job walks the node in chunks of 512 KiB and, where the node does not
 * allocate data that a layer above the base does, has the filter copy it (CopyOnReadNode.populate:
 * the copy engine, serialised with every write to the node, whatever its path). Guest reads through
 * the filter copy too. At the end (prepare) the filter goes, the node's backing becomes the base and
 * its image names the base (`backing-file`, or the base's file name; QEMU's backing_file_str).
 *
 * Errors (a read or write of a copy) take `on-error`, as QEMU's block_job_error_action with
 * operation "read": stop pauses the job (the chunk is retried on resume), report ends it, ignore goes
 * on but the job still fails at the end (QEMU keeps the chain then: "Do not remove the backing file
 * if an error was there but ignored").
 */
import { BlockNode, type BdrvChild } from '../block/node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_WRITE, BLK_PERM_WRITE_UNCHANGED, jobParent } from '../block/permissions.js';
import type { BlockGraph } from '../block/graph.js';
import type { CopyOnReadNode } from '../block/filters/copy-on-read.js';
import { filterOrCowChild, freezeChain, skipFilters, unfreezeChain, type Frozen } from '../block/chain.js';
import { BlockIOError } from '../errors.js';
import { Job, type JobOptions, type OnError } from './job.js';
import type { JobRegistry } from './registry.js';
import { tracer } from '../trace/trace.js';
import type { BitmapManager } from '../bitmap/manager.js';
import { carryBitmaps, sourceChainLayers } from '../bitmap/carry.js';

const traceStart = tracer.point('stream_start');
const traceIteration = tracer.point('stream_one_iteration');

/** QEMU's STREAM_CHUNK. */
const STREAM_CHUNK = 512 * 1024;
/** What the job's claims share on the nodes it reads (QEMU's basic_flags). */
const BASIC = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED;

export interface StreamJobOptions extends JobOptions {
  graph: BlockGraph;
  /** Carry the removed layers' named bitmaps into the node (`__org.bitmirror_carry-bitmaps`) when given. */
  bitmaps?: BitmapManager;
  /** The node streamed into (QEMU's target_bs), below the filter. */
  top: BlockNode;
  /** The lowest layer streamed (QEMU's base_overlay): data allocated in it or above is copied. */
  baseOverlay: BlockNode;
  /** The node whose backing link becomes the node's new backing link (QEMU's above_base). */
  aboveBase: BlockNode;
  /** The first node of the chain not streamed (the base; undefined: the whole chain). */
  base: BlockNode | undefined;
  filter: CopyOnReadNode;
  /** The name the node's image records for its new backing file (default: the base's file name). */
  backingFile?: string;
  /** Record "raw" instead of a protocol driver's name as the base's format (upstream, since 8.x). */
  backingMaskProtocol: boolean;
  onError: OnError;
  /** The node was read-only and reopened read-write for the job: read-only again at the end. */
  topWasReadOnly: boolean;
}

export class StreamJob extends Job {
  readonly type = 'stream' as const;
  private readonly o: StreamJobOptions;
  private readonly claims: BdrvChild[] = [];
  /** The nodes between the node and its base: claimed, and closed when the stream dropped them. */
  private readonly intermediates: BlockNode[] = [];
  private frozen: Frozen = [];
  private filterDropped = false;

  constructor(registry: JobRegistry, o: StreamJobOptions) {
    super(registry, o);
    this.o = o;
  }

  /**
   * stream_start's claims: the filter ("main node", and the job's BlockBackend reading through it),
   * the node ("active node"), every node below it down to the base ("intermediate node": nobody else
   * writes or resizes them while their data is copied), and the chain frozen down to the base's
   * overlay. Throws with nothing held.
   */
  install(): void {
    // bdrv_freeze_backing_chain first, as stream_start: another job's frozen link refuses the stream.
    const frozen = freezeChain(this.o.top, this.o.aboveBase);
    const job = jobParent('stream', this.id);
    try {
      this.claims.push(this.o.filter.attachParent(job, 'main node', 0, BLK_PERM_ALL));
      this.claims.push(this.o.filter.attachParent(job, 'stream job', BLK_PERM_CONSISTENT_READ, BASIC | BLK_PERM_WRITE));
      this.claims.push(this.o.top.attachParent(job, 'active node', 0, BASIC | BLK_PERM_WRITE));
      for (let n = filterOrCowChild(this.o.top); n && n !== this.o.base; n = filterOrCowChild(n)) {
        this.claims.push(n.attachParent(job, 'intermediate node', 0, BASIC));
        this.intermediates.push(n);
      }
    } catch (err) {
      this.releaseClaims();
      unfreezeChain(frozen);
      throw err;
    }
    this.frozen = frozen;
    // block_job_add_bdrv blocks every operation on the nodes the job claims.
    for (const n of [this.o.filter, this.o.top, ...this.intermediates]) n.blockers.set(this, 'block device is in use by block job: stream');
    traceStart({ job: this.id, top: this.o.top.nodeName, base: this.o.base?.nodeName ?? '' });
  }

  protected async run(): Promise<void> {
    const top = skipFilters(this.o.top);
    if (top === this.o.baseOverlay) return; // nothing to stream
    const len = this.o.top.length();
    this.progressSetRemaining(len);
    let firstError: unknown;
    for (let offset = 0, n = 0; offset < len; offset += n) {
      await this.ratelimitSleep();
      if (this.isCancelled()) break;
      let copy = false;
      // What an ignored error skips when even the block status failed.
      n = Math.min(STREAM_CHUNK, len - offset);
      try {
        ({ n, copy } = await this.whatToCopy(top, offset, len));
        traceIteration({ job: this.id, offset, bytes: n, copy });
        if (copy) await this.o.filter.populate(offset, n);
      } catch (err) {
        // A failed block status or copy (QEMU: ret < 0 either way) takes the error policy.
        const action = this.errorAction(this.o.onError, 'read', err);
        if (action === 'stop') {
          n = 0; // retried once the job is resumed
          continue;
        }
        firstError ??= err;
        if (action === 'report') break;
      }
      this.progressUpdate(n);
      if (copy) this.ratelimitProcessed(n);
    }
    if (firstError !== undefined) throw firstError;
  }

  /**
   * From `offset`, how many bytes share one answer (at most STREAM_CHUNK), and whether they are to be
   * copied: not allocated in the node, allocated in a layer from its backing down to baseOverlay.
   */
  private async whatToCopy(top: BlockNode, offset: number, len: number): Promise<{ n: number; copy: boolean }> {
    const st = await top.blockStatus(offset, Math.min(STREAM_CHUNK, len - offset));
    if (st.allocated) return { n: st.bytes, copy: false };
    const below = top.backing();
    // The end of the backing file: nothing more below.
    if (!below || offset >= below.length()) return { n: len - offset, copy: false };
    const a = await below.isAllocatedAbove(this.o.baseOverlay.backing()?.formatLayer(), offset, Math.min(st.bytes, below.length() - offset));
    return { n: a.bytes, copy: a.allocated };
  }

  /**
   * stream_prepare: the filter goes, the node's backing becomes the base, and the node's image names
   * it (the backing file string and format), or names none when the whole chain was streamed.
   */
  protected override async prepare(): Promise<void> {
    await this.dropFilter();
    const top = skipFilters(this.o.top);
    if (!top.backing()) return;
    const base = filterOrCowChild(this.o.aboveBase);
    const unfilteredBase = skipFilters(base);
    let baseId: string | undefined;
    let baseFormat: string | undefined;
    if (unfilteredBase) {
      baseId = this.o.backingFile ?? unfilteredBase.imageInfo().filename;
      baseFormat = this.o.backingMaskProtocol && unfilteredBase.primaryChild() === undefined ? 'raw' : unfilteredBase.driver;
    }
    this.unfreeze();
    const below = filterOrCowChild(top);
    const layers = below ? sourceChainLayers(below, base) : [];
    try {
      // The removed layers take no writes (the node's copies go to the node), so the carry and the
      // chain change are one synchronous step.
      if (this.o.bitmaps) await carryBitmaps(this.o.bitmaps, layers, top, () => this.o.graph.setBacking(top, base));
      else this.o.graph.setBacking(top, base);
      await top.changeBackingFile(baseId, baseFormat);
    } catch (err) {
      // QEMU reports the error on stderr and fails the job with EPERM.
      process.stderr.write(`bitmirror: ${err instanceof Error ? err.message : String(err)}\n`);
      throw new BlockIOError('EPERM');
    }
  }

  protected override async clean(): Promise<void> {
    await this.dropFilter();
    this.unfreeze();
    this.releaseClaims();
    if (this.o.topWasReadOnly) await this.o.graph.setReadOnly(this.o.top, true).catch(() => undefined);
    // Layers the stream dropped that nothing uses any more go, as QEMU's last reference does.
    for (const n of this.intermediates) {
      if (n.parents.length === 0 && this.o.graph.find(n.nodeName) === n) await this.o.graph.remove(n).catch(() => undefined);
    }
  }

  private async dropFilter(): Promise<void> {
    if (this.filterDropped) return;
    this.filterDropped = true;
    const filter = this.o.filter;
    for (const c of this.claims.filter((e) => e.node === filter)) BlockNode.detachParent(c);
    await StreamJob.dropFilter(this.o.graph, filter);
  }

  /** bdrv_cor_filter_drop: whoever used the filter uses the node again; the filter closes. */
  static async dropFilter(graph: BlockGraph, filter: CopyOnReadNode): Promise<void> {
    try {
      graph.replace(filter, filter.filtered, filter);
    } catch {
      // The filter's parents going back to the node take what they took on the filter: no conflict.
    }
    graph.forget(filter);
    await filter.close().catch(() => undefined);
    filter.detachChild('file');
  }

  private unfreeze(): void {
    unfreezeChain(this.frozen);
  }

  private releaseClaims(): void {
    for (const e of this.claims.splice(0)) BlockNode.detachParent(e);
    for (const n of [this.o.filter, this.o.top, ...this.intermediates]) n.blockers.delete(this);
  }

  /** Undo install() and the filter, for a job that fails before it starts. */
  override async abandon(): Promise<void> {
    await this.clean();
  }
}
