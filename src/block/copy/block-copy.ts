/**
 * The copy engine: copies ranges of a source node to a target node, for every job and filter that
 * copies data (mirror today; backup and copy-before-write are to use it). QEMU's block/block-copy.c is
 * the model: one shared state per source/target pair with a copy bitmap (what is still to copy), a
 * background walk that launches bounded copies (mirror, backup), and "copy this range now" for a
 * writer that must wait until the old data is safe (copy-before-write).
 *
 * What it does, so that its users do not:
 * - the walk: the next dirty run of chunks after a cursor, at most `maxIoBytes` long (MAX_OFFLOAD_BYTES
 *   while the kernel copies), none of it in flight; bits are reset before the copy reads, so a write
 *   that lands meanwhile sets them again and the chunks are copied again (no write is lost); on a
 *   failure the rest of the range is dirty again;
 * - the bounds: at most `maxInFlight` copies at once within a budget of `bufSize` bytes (a run waits
 *   until its whole size is free);
 * - the data: per piece, block status through the source's backing chain decides between copying data
 *   and writing zeroes. Data is copied by the kernel (copy_file_range, a reflink where the file system
 *   can) when the source's bytes lie in a host file and the target can take a host copy there
 *   (BlockNode.copyRangeTo: file, raw, qcow2 host clusters, filters); else, or when the kernel says no,
 *   it is read into a pooled page-aligned buffer of the piece's size (BlockNode.readInto) and written. Either way the
 *   bookkeeping (bits, locks, progress, observers of the target) is the same;
 * - in-flight chunk locks (ChunkLocks): copies of overlapping ranges never run at once, and writers
 *   that take a lock wait for copies of their range (and copies for them);
 * - partial-cluster widening: a write into a cluster that is unallocated in a target without a backing
 *   file is widened to the whole cluster, the missing part read from the source
 *   (`__org.bitmirror_fill-partial-clusters`), so the target never holds a cluster with partial data;
 * - hooks for the user's bookkeeping: a launch (speed accounting), progress, a failure (the user's
 *   error policy, see errorActionFor), the end of a copy (wake the user's loop).
 * It knows nothing of jobs: it lives in block/ and reports through the hooks.
 */
import type { BlockNode, WriteFlags } from '../node.js';
import { errorCode } from '../../errors.js';
import { tracer } from '../../trace/trace.js';
import { BufferPool } from './buffer-pool.js';
import { chainStatus } from './chain-status.js';
import { ChunkLocks } from './chunk-locks.js';

/** The bits the engine reads and changes in the user's bitmap (a DirtyBitmap is one). */
export interface CopyBitmap {
  count(): number;
  isDirty(offset: number): boolean;
  setDirty(offset: number, bytes: number): void;
  resetDirty(offset: number, bytes: number): void;
  nextDirtyArea(offset: number, end?: number): { offset: number; bytes: number } | undefined;
}

export type CopyOperation = 'read' | 'write';

const traceOffload = tracer.point('block_copy_offload');
const traceOffloadFail = tracer.point('block_copy_offload_fail');

/**
 * The largest piece the kernel copies in one call. A copy that needs no buffer is not bound by the
 * buffer-sized maxIoBytes: QEMU's block-copy lets copy_range move 16 MiB at once
 * (BLOCK_COPY_MAX_COPY_RANGE) against 1 MiB through a buffer. Measured on a 1 GiB qcow2 mirror, a
 * tenth of the pieces takes a third of the CPU on tmpfs' kernel copy and on XFS' reflinks.
 */
export const MAX_OFFLOAD_BYTES = 16 << 20;

/**
 * The default buffer budget's share of each stream of a target with several (an NBD node's
 * connections): two of Linux's largest TCP send windows (tcp_wmem's default maximum, 4 MiB), so that
 * a connection over a long link has its next window queued while one is on the wire. The mirror's
 * default buf-size (commands/mirror.ts, never less than QEMU's) and a commit's budget use it.
 */
export const STREAM_BUF_SIZE = 8 << 20;
/**
 * bitmirror's: the largest piece of contiguous data one request moves into a target that spreads
 * requests over streams (an NBD node), instead of the job's own piece (QEMU's 1 MiB or 512 KiB). Each
 * request there is a message, a reply and a trip through every layer of both daemons, and a run of
 * dirty chunks is one request (the chunk, the unit of the bitmap, stays). `BM_NBD_LAYOUT=dense npm
 * run bench -- nbd` (256 MiB of contiguous data over a 20 ms link), a mirror against 1 MiB in the
 * same run, 5 alternating rounds: the mirroring daemon's CPU 0.24 (0.20-0.27) s against 0.33
 * (0.30-0.35) with 4 connections, 0.22 (0.20-0.24) against 0.30 (0.28-0.33) with one; throughput and
 * peak memory within noise (the buffer budget bounds what is in flight either way).
 */
export const MAX_STREAM_IO_BYTES = 4 << 20;

/**
 * The one rule for a copy into a target with streams (NodeCapabilities.streams: an NBD node's
 * connections, also seen through the format and filter nodes whose data goes there): the job's own
 * copies in flight for each stream, so that data in small extents still keeps every connection's TCP
 * window full over a long link, and contiguous data in pieces of MAX_STREAM_IO_BYTES within what the
 * target takes at once. A target without streams keeps the job's (QEMU's) bounds.
 */
export function streamBounds(target: BlockNode, base: { maxInFlight: number; maxIoBytes: number }): { maxInFlight: number; maxIoBytes: number; streams: number | undefined } {
  const caps = target.capabilities();
  if (caps.streams === undefined) return { ...base, streams: undefined };
  const piece = Math.min(MAX_STREAM_IO_BYTES, caps.maxTransfer ?? MAX_STREAM_IO_BYTES);
  return { maxInFlight: base.maxInFlight * caps.streams, maxIoBytes: Math.max(base.maxIoBytes, piece), streams: caps.streams };
}

/** The kernel's "not between these files": no use asking again for the rest of the copy. */
const OFFLOAD_REFUSALS = new Set(['EXDEV', 'EINVAL', 'ENOTSUP', 'ENOSYS', 'EBADF']);

export interface BlockCopyHooks {
  /** A background copy of [offset, +bytes) is about to start: account it against a speed limit. */
  launched?(offset: number, bytes: number): void;
  /** `bytes` more bytes have been copied. */
  progress?(bytes: number): void;
  /** A background copy failed at `operation`; [offset, +bytes) (the rest of its range) is dirty again. */
  failed?(operation: CopyOperation, err: unknown, offset: number, bytes: number): void;
  /** A background copy has ended, whether or not it succeeded: room for the next. */
  ended?(): void;
  /**
   * A speed limit paces the copies: runs stay within maxIoBytes while the kernel copies too, so the
   * limit moves the job in small steps rather than a pause after every MAX_OFFLOAD_BYTES.
   */
  paced?(): boolean;
}

export interface BlockCopyOptions {
  source: BlockNode;
  target: BlockNode;
  /** What is still to copy; its granularity must be `chunkSize` (or finer). */
  bitmap: CopyBitmap;
  /** Bytes per chunk: the unit of the walk, of the locks and of the budget. */
  chunkSize: number;
  /** Buffer budget of the background copies, in bytes. */
  bufSize: number;
  /** Background copies at once. */
  maxInFlight: number;
  /** The largest piece one read or write moves (and one background copy covers). */
  maxIoBytes: number;
  /** Write zeroes with MAY_UNMAP. */
  unmap: boolean;
  /** Widen writes into unallocated clusters of a no-backing target to whole clusters (see above). */
  fillPartialClusters: boolean;
  /** Let the kernel copy data between host files where it can (default true). */
  offload?: boolean;
  /** The largest piece the kernel copies at once (default MAX_OFFLOAD_BYTES; a backup's x-perf max-chunk). */
  maxOffloadBytes?: number;
  /**
   * Copies for a writer (copyNow) write the target serialising, without offload: a read of the target
   * in flight (a fleecing image reading through to its backing, the source) ends first. Otherwise they
   * are copied as the background copies are (offloaded where the kernel can).
   */
  serialiseWriterCopies?: boolean;
  /** Every write to the target is BDRV_REQ_WRITE_UNCHANGED (copy-on-read into the node reading through). */
  writeUnchanged?: boolean;
  /**
   * Discard what was copied on the source, once it is on the target (backup's discard-source, QEMU
   * 9.1's block_copy_task_entry): the caller holds write permission on the source for it.
   */
  discardSource?: boolean;
  /**
   * Data goes to the target as compressed writes (a backup's `compress`; QEMU's COPY_READ_WRITE_CLUSTER):
   * one chunk per read and write, never offloaded, since a compressed write takes whole clusters.
   * Zeroes are still written as write-zeroes.
   */
  compress?: boolean;
  hooks?: BlockCopyHooks;
}

/** Why a copy of a range stopped: the operation, the error, and the range now dirty again. */
interface CopyFailure {
  operation: CopyOperation;
  err: unknown;
  offset: number;
  bytes: number;
}

export class BlockCopy {
  readonly source: BlockNode;
  readonly target: BlockNode;
  /** Copies (and writers holding ranges) in flight, by chunk range; a chunk is in at most one. */
  readonly locks = new ChunkLocks();
  private readonly o: BlockCopyOptions;
  private readonly bitmap: CopyBitmap;
  private readonly chunkSize: number;
  private readonly pool: BufferPool;
  private readonly hooks: BlockCopyHooks;
  private bufFree: number;
  private _copiesInFlight = 0;
  private _bytesInFlight = 0;
  /** Where the walk looks for the next dirty chunk (it wraps around at the end). */
  private cursor = 0;
  /** Still trying copy offload: cleared by the option, or when the kernel refuses. */
  private offload: boolean;
  /**
   * The last piece tried by the kernel was copied by it: the walk takes runs of up to
   * MAX_OFFLOAD_BYTES then (as QEMU's block-copy moves to full-size copy_range requests after one
   * works), else of up to maxIoBytes, the pieces a buffer carries.
   */
  private offloadWorks = false;
  /** Bytes of the buffer budget the next run needs (it waits for them, as QEMU's mirror_do_read). */
  private budgetWanted = 0;
  /** The source ranges being discarded after their copy (discardSource), while their chunks are locked. */
  private readonly sourceDiscards = new Set<{ offset: number; bytes: number }>();

  constructor(o: BlockCopyOptions) {
    this.o = o.compress ? { ...o, maxIoBytes: o.chunkSize, offload: false } : o;
    o = this.o;
    this.source = o.source;
    this.target = o.target;
    this.bitmap = o.bitmap;
    this.chunkSize = o.chunkSize;
    this.bufFree = o.bufSize;
    // The buffers together hold at most the budget (the background copies read no more at once), or
    // one largest piece where that is more (copyNow's, which the budget does not bound).
    this.pool = new BufferPool(Math.max(o.bufSize, o.maxIoBytes));
    this.hooks = o.hooks ?? {};
    this.offload = o.offload ?? true;
  }

  /** Background copies running now. */
  get copiesInFlight(): number {
    return this._copiesInFlight;
  }

  /** Bytes the background copies running now cover. */
  get bytesInFlight(): number {
    return this._bytesInFlight;
  }

  /**
   * Whether another background copy may start: below the in-flight bound, and budget free for a chunk,
   * or for the whole run a walk step found and left waiting for its budget.
   */
  hasRoom(): boolean {
    return this._copiesInFlight < this.o.maxInFlight && this.bufFree >= Math.max(this.chunkSize, this.budgetWanted);
  }

  private maxOffloadBytes(): number {
    return Math.max(this.o.maxOffloadBytes ?? MAX_OFFLOAD_BYTES, this.o.maxIoBytes);
  }

  /** The largest run one background copy covers now (see offloadWorks), never more than the budget. */
  private pieceBytes(): number {
    const most = this.offload && this.offloadWorks && this.hooks.paced?.() !== true ? this.maxOffloadBytes() : this.o.maxIoBytes;
    return Math.max(this.chunkSize, Math.min(most, Math.floor(this.o.bufSize / this.chunkSize) * this.chunkSize));
  }

  // ---- the background walk ------------------------------------------------------------------------

  /**
   * One step of the walk (QEMU's mirror_iteration): take the next dirty run of chunks after the cursor
   * that is not in flight, reset its bits and start copying it in the background (not awaited; it
   * calls the hooks). Waits first for a copy in flight on the run's first chunk. False when nothing is
   * dirty; true when it started a copy or moved the cursor (call again while there is room).
   */
  async launchNext(): Promise<boolean> {
    const size = this.source.length();
    let area = this.bitmap.nextDirtyArea(this.cursor, size);
    if (!area) {
      this.cursor = 0;
      area = this.bitmap.nextDirtyArea(0, size);
      if (!area) return false;
    }
    const g = this.chunkSize;
    const offset = Math.floor(area.offset / g) * g;
    // Wait for whatever is in flight on the first chunk, then take a run that is not in flight.
    const busy = this.locks.wait(offset, Math.min(g, size - offset));
    if (busy) await busy;
    if (!this.bitmap.isDirty(offset)) {
      this.cursor = offset + g;
      return true;
    }
    // One copy covers at most pieceBytes (maxIoBytes through a buffer), so that up to maxInFlight of
    // them run side by side.
    const maxBytes = this.pieceBytes();
    // Without a wait above the first chunk is dirty and free (no await since): the run goes on from it.
    // After one, a writer may have taken it in the turns before this one resumed: look again.
    let bytes = busy ? 0 : g;
    while (offset + bytes < size && bytes < maxBytes && this.bitmap.isDirty(offset + bytes) && !this.locks.overlaps(offset + bytes, g)) bytes += g;
    if (bytes === 0) return true;
    // A run larger than the free budget waits for copies in flight to end, as QEMU's mirror_do_read
    // waits for buf_free_count: taking the free part only would cut every later run down to the
    // size of the copy that just ended.
    if (bytes > this.bufFree) {
      if (this._copiesInFlight > 0) {
        this.budgetWanted = bytes;
        return true;
      }
      bytes = Math.max(g, Math.floor(this.bufFree / g) * g);
    }
    this.budgetWanted = 0;
    bytes = Math.min(bytes, size - offset);
    this.cursor = offset + bytes;
    this.launch(offset, bytes);
    return true;
  }

  /** Start the background copy of [offset, +bytes), which is dirty and not in flight. */
  private launch(offset: number, bytes: number): void {
    // Reset before reading: a write during the copy sets the bits again and the chunks are copied again.
    this.bitmap.resetDirty(offset, bytes);
    const cost = Math.ceil(bytes / this.chunkSize) * this.chunkSize;
    this.bufFree -= cost;
    this._bytesInFlight += bytes;
    this._copiesInFlight++;
    // Accounted when the copy is launched, as mirror_iteration does: accounting on completion let a
    // whole batch of maxInFlight copies start before a speed limit saw a single byte.
    this.hooks.launched?.(offset, bytes);
    void this.runCopy(offset, bytes, cost);
  }

  /** The body of a background copy (launch): copy, then give back its lock, budget and slot. */
  private async runCopy(offset: number, bytes: number, cost: number): Promise<void> {
    const lock = this.locks.hold(offset, bytes);
    // Copied pieces leave bytes-in-flight as they enter the progress, so that a user's remaining work
    // (bytes in flight + dirty) plus its progress does not count them twice.
    let notCopied = bytes;
    const copied = (n: number): void => {
      this._bytesInFlight -= n;
      notCopied -= n;
    };
    let failure: CopyFailure | undefined;
    try {
      failure = await this.copyChunks(offset, bytes, copied);
      if (this.o.discardSource) await this.discardCopied(offset, failure ? failure.offset - offset : bytes);
      if (failure) this.hooks.failed?.(failure.operation, failure.err, failure.offset, failure.bytes);
    } finally {
      lock.release();
      this.bufFree += cost;
      this._bytesInFlight -= notCopied;
      this._copiesInFlight--;
      this.hooks.ended?.();
    }
  }

  /** Resolves when a copy (or held range) in flight now has ended; undefined when none is. */
  anyEnded(): Promise<void> | undefined {
    return this.locks.anyReleased();
  }

  /** Wait until no background copy is in flight (those a failure or cancel left running included). */
  async drain(): Promise<void> {
    while (this._copiesInFlight > 0) await this.locks.allReleased();
  }

  // ---- copy now -----------------------------------------------------------------------------------

  /**
   * Copy whatever of [offset, +bytes) is still dirty, now, and return when all of it is copied (QEMU's
   * block_copy, for copy-before-write): waits for copies in flight on the range (one that fails leaves
   * its chunks dirty, and they are copied here), copies the dirty chunks holding their locks, and
   * throws the first error, with the chunks it did not copy dirty again. Not bounded by the buffer
   * budget: its caller (a guest write) bounds it, and it moves one piece of at most maxIoBytes at a time.
   */
  async copyNow(offset: number, bytes: number): Promise<void> {
    const g = this.chunkSize;
    const size = this.source.length();
    const start = Math.floor(offset / g) * g;
    const end = Math.min(size, Math.ceil((offset + bytes) / g) * g);
    for (;;) {
      // After the wait (and with no await until the lock is taken) no copy overlaps the range: each
      // of its chunks is either copied (clean) or still to copy (dirty).
      const busy = this.locks.wait(start, end - start);
      if (busy) await busy;
      const area = this.bitmap.nextDirtyArea(start, end);
      if (!area) return;
      const runStart = Math.floor(area.offset / g) * g;
      const runBytes = Math.min(area.offset + area.bytes, end, runStart + Math.ceil(this.o.maxIoBytes / g) * g) - runStart;
      this.bitmap.resetDirty(runStart, runBytes);
      const lock = this.locks.hold(runStart, runBytes);
      try {
        const failure = await this.copyChunks(runStart, runBytes, undefined, this.o.serialiseWriterCopies === true);
        await this.discardCopied(runStart, failure ? failure.offset - runStart : runBytes);
        if (failure) throw failure.err;
      } finally {
        lock.release();
      }
    }
  }

  // ---- discard-source -----------------------------------------------------------------------------

  /**
   * discardSource: discard [offset, +bytes) of the source, just copied, while its chunks are still
   * locked, so that no write to the range (whose copy-before-write waits for the lock) can land before
   * the discard and be lost to it. As QEMU, a failed discard is ignored: discard is advisory.
   */
  private async discardCopied(offset: number, bytes: number): Promise<void> {
    if (!this.o.discardSource || bytes <= 0) return;
    const range = { offset, bytes: Math.min(bytes, this.source.length() - offset) };
    this.sourceDiscards.add(range);
    try {
      await this.source.discard(range.offset, range.bytes);
    } catch {
      // Advisory (QEMU ignores bdrv_co_pdiscard's result here).
    } finally {
      this.sourceDiscards.delete(range);
    }
  }

  /**
   * Whether a discard of [offset, +bytes) of the source is the engine's own discard-after-copy: its
   * chunks are locked by the copy that just ended and clean, so a copy-before-write must let it pass
   * (waiting for the lock would wait for itself).
   */
  isOwnSourceDiscard(offset: number, bytes: number): boolean {
    for (const d of this.sourceDiscards) if (offset >= d.offset && offset + bytes <= d.offset + d.bytes) return true;
    return false;
  }

  // ---- copying a range ----------------------------------------------------------------------------

  /**
   * Copy [offset, offset+bytes): data, zeroes, or nothing, piece by piece as block status says. On an
   * error the whole rest of the range is dirty again, not only the failed piece: its bits were reset
   * when the copy began and the pieces after the failed one are never copied.
   */
  private async copyChunks(offset: number, bytes: number, copied?: (n: number) => void, serialising = false): Promise<CopyFailure | undefined> {
    const flags: WriteFlags | undefined =
      serialising || this.o.writeUnchanged ? { ...(serialising ? { serialising: true } : {}), ...(this.o.writeUnchanged ? { writeUnchanged: true } : {}) } : undefined;
    const dataFlags: WriteFlags | undefined = this.o.compress ? { ...flags, compressed: true } : flags;
    const end = offset + bytes;
    let pos = offset;
    const failed = (operation: CopyOperation, err: unknown): CopyFailure => {
      this.bitmap.setDirty(pos, end - pos);
      return { operation, err, offset: pos, bytes: end - pos };
    };
    while (pos < end) {
      // A piece the kernel may copy can be larger than one a buffer carries (MAX_OFFLOAD_BYTES).
      const tryKernel = this.offload && !serialising;
      const want = Math.min(end - pos, tryKernel ? this.maxOffloadBytes() : this.o.maxIoBytes);
      let st: { bytes: number; zero: boolean };
      try {
        st = await chainStatus(this.source, pos, want);
      } catch (err) {
        return failed('read', err);
      }
      let n = Math.min(st.bytes, want);
      const offloaded = st.zero || !tryKernel ? 0 : await this.copyByKernel(pos, n);
      if (offloaded > 0) {
        n = offloaded;
      } else if (st.zero) {
        try {
          await this.writeTargetZeroes(pos, n, flags);
        } catch (err) {
          return failed('write', err);
        }
      } else {
        n = Math.min(n, this.o.maxIoBytes);
        // A pooled buffer of about the piece's size: the read fills the n bytes used, and the target
        // write has ended (with the buffer no longer in use) before it goes back to the pool.
        const buf = this.pool.take(n);
        try {
          const data = n === buf.length ? buf : buf.subarray(0, n);
          try {
            await this.source.readInto(pos, data);
          } catch (err) {
            return failed('read', err);
          }
          try {
            await this.writeTarget(pos, data, dataFlags);
          } catch (err) {
            return failed('write', err);
          }
        } finally {
          this.pool.give(buf);
        }
      }
      this.hooks.progress?.(n);
      copied?.(n);
      pos += n;
    }
    return undefined;
  }

  /**
   * Copy offload of a prefix of [offset, +bytes): the bytes the kernel copied, 0 when it could not (then
   * the caller reads and writes; a real I/O error shows there, attributed to the read or the write).
   * As QEMU's block-copy does, a refusal ends offload for the rest of this copy.
   */
  private async copyByKernel(offset: number, bytes: number): Promise<number> {
    try {
      const n = await this.source.copyRangeTo(offset, bytes, this.target);
      if (n > 0) traceOffload({ offset, bytes: n });
      this.offloadWorks = n > 0;
      return n;
    } catch (err) {
      const code = errorCode(err);
      traceOffloadFail({ offset, bytes, error: code });
      if (OFFLOAD_REFUSALS.has(code)) this.offload = false;
      this.offloadWorks = false;
      return 0;
    }
  }

  // ---- writes to the target -----------------------------------------------------------------------

  /** Write source data to the target at `offset`, widened to whole clusters where needed. */
  async writeTarget(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    const widened = await this.widenToClusters(offset, data.length, data);
    if (widened) return this.target.write(widened.offset, widened.data, flags);
    return this.target.write(offset, data, flags);
  }

  /** Write zeroes to the target, widened to whole clusters (with source data around) where needed. */
  async writeTargetZeroes(offset: number, bytes: number, flags: WriteFlags = {}): Promise<void> {
    const widened = await this.widenToClusters(offset, bytes, undefined);
    if (widened) return this.target.write(widened.offset, widened.data, flags);
    return this.target.writeZeroes(offset, bytes, { ...flags, mayUnmap: this.o.unmap });
  }

  /**
   * For a no-backing target with clusters: when the range starts or ends inside a cluster that is not
   * allocated in the target, return the whole-cluster write (missing parts read from the source).
   */
  private async widenToClusters(offset: number, bytes: number, data: Buffer | undefined): Promise<{ offset: number; data: Buffer } | undefined> {
    if (!this.o.fillPartialClusters) return undefined;
    const cs = this.target.nodeInfo().clusterSize;
    if (!cs || (offset % cs === 0 && (offset + bytes) % cs === 0) || this.target.formatLayer().backing()) return undefined;
    const size = this.target.length();
    const start = Math.floor(offset / cs) * cs;
    const end = Math.min(size, Math.ceil((offset + bytes) / cs) * cs);
    const headPartial = offset > start && !(await this.targetAllocated(start, cs));
    const tailPartial = offset + bytes < end && !(await this.targetAllocated(Math.floor((offset + bytes) / cs) * cs, cs));
    if (!headPartial && !tailPartial) return undefined;
    const newStart = headPartial ? start : offset;
    const newEnd = tailPartial ? end : offset + bytes;
    const buf = Buffer.alloc(newEnd - newStart);
    if (newStart < offset) (await this.source.read(newStart, offset - newStart)).copy(buf, 0);
    if (data) data.copy(buf, offset - newStart);
    if (newEnd > offset + bytes) (await this.source.read(offset + bytes, newEnd - offset - bytes)).copy(buf, offset + bytes - newStart);
    return { offset: newStart, data: buf };
  }

  private async targetAllocated(offset: number, bytes: number): Promise<boolean> {
    const layer = this.target.formatLayer();
    const st = await layer.blockStatus(offset, Math.min(bytes, layer.length() - offset));
    return st.allocated;
  }

  /** Bytes of the read buffers the copy holds now (in use and pooled). */
  get bufferBytes(): number {
    return this.pool.bytes;
  }

  /** The copy has ended: drop the pooled buffers. */
  release(): void {
    this.pool.clear();
  }
}
