/**
 * BitmapManager: the dirty bitmaps of every node, newest first (QEMU inserts at the list head), and
 * the one WriteObserver per node that marks every enabled bitmap after each completed write,
 * write-zeroes or discard (bdrv_set_dirty). Commands and jobs create, find, merge and release bitmaps
 * here; the manager enforces QEMU's checks and messages (reference §2.1, §2.3).
 *
 * Jobs (mirror, backup, NBD exports) use:
 *   createAnonymous(node, granularity) / release(bm)   a private bitmap that records writes
 *   setBusy(bm, true|false)                             lock a named bitmap against QMP changes
 *   merge(dst, src) / copy(src, node?)                  combine or snapshot bits
 *   createSuccessor(bm) / abdicate(bm) / reclaim(bm)    backup's freeze-and-record protocol
 *   bm.dirtyAreas(), bm.nextDirtyArea(), bm.resetDirty() iterate and consume
 */
import { BlockIOError, genericError } from '../errors.js';
import type { BlockNode, WriteObserver, WriteRequest } from '../block/node.js';
import { persistentStore } from '../block/bitmap-store.js';
import { isPowerOf2 } from '../base/sizes.js';
import { qemuStringBytes } from '../base/qemu-string.js';
import { tracer } from '../trace/trace.js';
import { BITMAP_ALLOW_RO, BITMAP_BUSY, BITMAP_DEFAULT, BITMAP_RO, BITMAP_MAX_NAME_SIZE, DirtyBitmap, type BlockDirtyInfo } from './dirty-bitmap.js';
import type { HBitmap } from '../base/hbitmap.js';

export interface AddBitmapOptions {
  /** Bytes per bit; default: the node's cluster size clamped to [4 KiB, 64 KiB], 64 KiB if unknown. */
  granularity?: number;
  persistent?: boolean;
  disabled?: boolean;
}

const traceCreate = tracer.point('bdrv_create_dirty_bitmap');
const traceRelease = tracer.point('bdrv_release_dirty_bitmap');

interface NodeEntry {
  /** Newest first. */
  bitmaps: DirtyBitmap[];
  observer: WriteObserver;
}

export class BitmapManager {
  private readonly nodes = new Map<BlockNode, NodeEntry>();

  // ---- lookup -----------------------------------------------------------------------------------

  /** The node's bitmaps, newest first (a copy). */
  list(node: BlockNode): DirtyBitmap[] {
    return [...(this.nodes.get(node)?.bitmaps ?? [])];
  }

  /** The named bitmap on `node` (bdrv_find_dirty_bitmap), or undefined. */
  find(node: BlockNode, name: string): DirtyBitmap | undefined {
    return this.nodes.get(node)?.bitmaps.find((b) => b.name === name);
  }

  /** The named bitmap on `node`, or QEMU's "Dirty bitmap 'x' not found". */
  get(node: BlockNode, name: string): DirtyBitmap {
    const bm = this.find(node, name);
    if (!bm) throw genericError(`Dirty bitmap '${name}' not found`);
    return bm;
  }

  /** BlockDirtyInfo list for query-named-block-nodes / query-block; undefined when there are none. */
  info(node: BlockNode): BlockDirtyInfo[] | undefined {
    const list = this.nodes.get(node)?.bitmaps;
    return list && list.length > 0 ? list.map((b) => b.info()) : undefined;
  }

  /** Whether any bitmap on the node is read-only (writes to the node then fail with EPERM). */
  hasReadonlyBitmaps(node: BlockNode): boolean {
    return this.nodes.get(node)?.bitmaps.some((b) => b.readonly) ?? false;
  }

  /** bdrv_get_default_bitmap_granularity: cluster size clamped to [4 KiB, 64 KiB]; 64 KiB if unknown. */
  defaultGranularity(node: BlockNode): number {
    const cs = node.nodeInfo().clusterSize;
    if (cs === undefined || !(cs > 0)) return 65536;
    return Math.min(65536, Math.max(4096, cs));
  }

  // ---- create and release -----------------------------------------------------------------------

  /**
   * block-dirty-bitmap-add after the node lookup: check the name, granularity and persistence, then
   * create the bitmap (newest first). The checks and messages follow block_dirty_bitmap_add.
   */
  async add(node: BlockNode, name: string, opts: AddBitmapOptions = {}): Promise<DirtyBitmap> {
    if (name === '') throw genericError('Bitmap name cannot be empty');
    let granularity = opts.granularity;
    if (granularity !== undefined) {
      if (granularity < 512 || !isPowerOf2(granularity)) throw genericError('Granularity must be power of 2 and at least 512');
    } else {
      granularity = this.defaultGranularity(node);
    }
    if (opts.persistent) {
      const store = persistentStore(node);
      if (!store) throw genericError(`Can't store persistent bitmaps to ${node.nodeName}: Operation not supported`);
      const persistentNames = this.list(node)
        .filter((b) => b.persistent && b.name !== undefined)
        .map((b) => b.name!);
      await store.canStoreNewDirtyBitmap(name, granularity, persistentNames);
    }
    return this.create(node, name, granularity, { persistent: opts.persistent, disabled: opts.disabled });
  }

  /**
   * bdrv_create_dirty_bitmap: a bitmap covering the node's current length. `name` undefined makes an
   * anonymous bitmap (jobs). Throws "Bitmap already exists" / "Bitmap name too long".
   */
  create(node: BlockNode, name: string | undefined, granularity: number, opts: { persistent?: boolean; disabled?: boolean } = {}): DirtyBitmap {
    if (!isPowerOf2(granularity) || granularity < 512) throw genericError('Granularity must be power of 2 and at least 512');
    if (name !== undefined) {
      if (this.find(node, name)) throw genericError(`Bitmap already exists: ${name}`);
      if (qemuStringBytes(name).length > BITMAP_MAX_NAME_SIZE) throw genericError(`Bitmap name too long: ${name}`);
    }
    const bm = new DirtyBitmap(node, name, granularity, node.length(), opts);
    this.attach(bm);
    traceCreate({ node: node.nodeName, name: name ?? '', granularity });
    return bm;
  }

  /** An anonymous bitmap on `node` that records writes: for jobs (default granularity if omitted). */
  createAnonymous(node: BlockNode, granularity?: number, opts: { disabled?: boolean } = {}): DirtyBitmap {
    return this.create(node, undefined, granularity ?? this.defaultGranularity(node), opts);
  }

  /**
   * A new bitmap on `node` (default: the source's node) with the source's granularity and bits,
   * anonymous unless named; disabled unless `enabled`. For a job's frozen copy of a user bitmap.
   */
  copy(src: DirtyBitmap, opts: { node?: BlockNode; name?: string; enabled?: boolean } = {}): DirtyBitmap {
    const node = opts.node ?? src.node;
    const bm = this.create(node, opts.name, src.granularity, { disabled: !opts.enabled });
    if (bm.size === src.size) bm.restore(src.cloneBits());
    else bm.hbitmap.merge(src.hbitmap); // throws on a size mismatch; release first
    return bm;
  }

  private attach(bm: DirtyBitmap): void {
    let entry = this.nodes.get(bm.node);
    if (!entry) {
      const node = bm.node;
      const observer: WriteObserver = {
        beforeWrite: (req: WriteRequest) => {
          // bdrv_co_write_req_prepare: an image with read-only bitmaps may not be written.
          if (this.hasReadonlyBitmaps(node)) throw new BlockIOError('EPERM');
          // Beyond QEMU: the image's write-intent record marks the range before it is written, so
          // the stored bitmaps survive a crash (qcow2/write-intent.ts).
          return persistentStore(node)?.markWriteIntent?.(req.offset, req.bytes);
        },
        afterWrite: (req: WriteRequest) => this.markDirty(node, req.offset, req.bytes),
        // bdrv_dirty_bitmap_truncate: a grown node's bitmaps grow clean; a shrunk one's lose the tail.
        resized: (_node, size) => this.truncate(node, size),
        beforeResize: (_node, names) => {
          for (const name of names) {
            const bm = this.find(node, name);
            // We rely on every stored bitmap being in memory to resize it (QEMU's reason too).
            if (!bm) throw genericError('Cannot resize qcow2 with persistent bitmaps that were not loaded');
            bm.check(BITMAP_DEFAULT);
          }
        },
        // The node's first bitmap, created during a write, records that write too (bdrv_set_dirty
        // marks the bitmaps that exist when a write ends).
        seesWritesInFlight: true,
      };
      entry = { bitmaps: [], observer };
      this.nodes.set(node, entry);
      node.addWriteObserver(observer);
    }
    entry.bitmaps.unshift(bm);
  }

  /** bdrv_set_dirty: mark [offset, offset+bytes) in every enabled bitmap of the node. */
  markDirty(node: BlockNode, offset: number, bytes: number): void {
    const list = this.nodes.get(node)?.bitmaps;
    if (!list) return;
    for (const bm of list) {
      if (!bm.enabled || bytes === 0) continue;
      // A write may run past a bitmap created before a grow that it has not followed yet: clip.
      const end = Math.min(offset + bytes, bm.size);
      if (end > offset) bm.hbitmap.set(offset, end - offset);
    }
  }

  /** Drop a bitmap (bdrv_release_dirty_bitmap). Releasing one that is not attached does nothing. */
  release(bm: DirtyBitmap): void {
    const entry = this.nodes.get(bm.node);
    if (!entry) return;
    const i = entry.bitmaps.indexOf(bm);
    if (i < 0) return;
    entry.bitmaps.splice(i, 1);
    traceRelease({ node: bm.node.nodeName, name: bm.name ?? '' });
    if (entry.bitmaps.length === 0) {
      bm.node.removeWriteObserver(entry.observer);
      this.nodes.delete(bm.node);
    }
  }

  /** Drop every bitmap of a node (the node is closing; persistent ones must have been stored first). */
  releaseAll(node: BlockNode): void {
    for (const bm of this.list(node)) this.release(bm);
  }

  /** Follow a resize of the node: every bitmap grows (clean) or shrinks. */
  truncate(node: BlockNode, size: number): void {
    for (const bm of this.list(node)) bm.truncate(size);
  }

  // ---- QMP-level operations ---------------------------------------------------------------------

  /**
   * block_dirty_bitmap_remove: check busy and readonly; for a persistent bitmap remove it from the
   * image; then release it unless `release` is false (a transaction releases it at commit).
   */
  async remove(bm: DirtyBitmap, release = true): Promise<void> {
    bm.check(BITMAP_BUSY | BITMAP_RO);
    if (bm.persistent) {
      const store = persistentStore(bm.node);
      if (store?.removePersistentDirtyBitmap && bm.name !== undefined) await store.removePersistentDirtyBitmap(bm.name);
    }
    if (release) this.release(bm);
  }

  /** block-dirty-bitmap-clear; returns the old bits when `backup` is set, for restore(). */
  clear(bm: DirtyBitmap, backup: true): HBitmap;
  clear(bm: DirtyBitmap, backup?: false): undefined;
  clear(bm: DirtyBitmap, backup = false): HBitmap | undefined {
    bm.check(BITMAP_DEFAULT);
    if (backup) return bm.clearWithBackup();
    bm.clear();
    return undefined;
  }

  enable(bm: DirtyBitmap): void {
    bm.check(BITMAP_ALLOW_RO);
    bm.disabled = false;
  }

  disable(bm: DirtyBitmap): void {
    bm.check(BITMAP_ALLOW_RO);
    bm.disabled = true;
  }

  /**
   * bdrv_merge_dirty_bitmap: OR `src` into `dst` (granularities may differ). Checks dst DEFAULT, src
   * ALLOW_RO and equal sizes. With `backup` the old bits of dst are returned for restore().
   */
  merge(dst: DirtyBitmap, src: DirtyBitmap, backup: true): HBitmap;
  merge(dst: DirtyBitmap, src: DirtyBitmap, backup?: false): undefined;
  merge(dst: DirtyBitmap, src: DirtyBitmap, backup = false): HBitmap | undefined {
    dst.check(BITMAP_DEFAULT);
    src.check(BITMAP_ALLOW_RO);
    if (src.size !== dst.size) {
      throw genericError(`Bitmaps are of different sizes (destination size is ${dst.size}, source size is ${src.size}) and can't be merged`);
    }
    if (backup) {
      const old = dst.hbitmap;
      const merged = old.clone();
      merged.merge(src.hbitmap);
      dst.restore(merged);
      return old;
    }
    dst.hbitmap.merge(src.hbitmap);
    return undefined;
  }

  /** Mark a bitmap in use by a job or export (or free it again). */
  setBusy(bm: DirtyBitmap, busy: boolean): void {
    bm.busy = busy;
  }

  // ---- successors (backup) ----------------------------------------------------------------------

  /**
   * bdrv_dirty_bitmap_create_successor: freeze `bm` (disabled, busy) and attach an anonymous successor
   * that records writes as `bm` did. The job then reads `bm` and ends with abdicate or reclaim.
   */
  createSuccessor(bm: DirtyBitmap): DirtyBitmap {
    bm.check(BITMAP_BUSY);
    if (bm.successor) throw genericError('Cannot create a successor for a bitmap that already has one');
    const child = this.create(bm.node, undefined, bm.granularity, { disabled: bm.disabled });
    bm.disabled = true;
    bm.successor = child;
    bm.busy = true;
    return child;
  }

  /**
   * On success (bdrv_dirty_bitmap_abdicate): the successor takes the parent's name, persistence and
   * place; the parent's bits are dropped. Returns the new bitmap.
   */
  abdicate(bm: DirtyBitmap): DirtyBitmap {
    const child = bm.successor;
    if (!child) throw new Error(`bitmap ${bm.name ?? '(anonymous)'} has no successor`);
    child.name = bm.name;
    child.persistent = bm.persistent;
    bm.successor = undefined;
    bm.name = undefined;
    bm.persistent = false;
    this.release(bm);
    return child;
  }

  /**
   * On failure (bdrv_reclaim_dirty_bitmap): merge the successor's bits back into the parent, which
   * takes the successor's enabled state and is no longer busy. Returns the parent.
   */
  reclaim(bm: DirtyBitmap): DirtyBitmap {
    const child = bm.successor;
    if (!child) throw new Error(`bitmap ${bm.name ?? '(anonymous)'} has no successor`);
    bm.hbitmap.merge(child.hbitmap);
    bm.disabled = child.disabled;
    bm.busy = false;
    bm.successor = undefined;
    this.release(child);
    return bm;
  }
}
