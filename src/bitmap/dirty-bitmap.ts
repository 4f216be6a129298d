/**
 * DirtyBitmap: a named (or anonymous) HBitmap attached to one block node, with the state QEMU's
 * BdrvDirtyBitmap carries: enabled/recording, busy (in use by a job or an NBD export), persistent
 * (stored in the image), readonly (loaded from a read-only image), inconsistent (found in_use on
 * disk) and a successor (backup's anonymous bitmap that records while the job runs).
 *
 * Bitmaps are created, released and merged through the BitmapManager, which also feeds them writes.
 * This class holds the data and the checks; it knows nothing of QMP beyond the error messages.
 */
import { genericError, type QmpError } from '../errors.js';
import type { BlockNode } from '../block/node.js';
import { HBitmap, type DirtyArea } from '../base/hbitmap.js';

/** BlockDirtyInfo, as query-named-block-nodes and query-block show it (members in QEMU's order). */
export interface BlockDirtyInfo {
  name?: string;
  recording: boolean;
  persistent: boolean;
  busy: boolean;
  granularity: number;
  count: number;
  inconsistent?: boolean;
  /**
   * Downstream extension: present (true) when the persistent bitmap was in use when its image's
   * last writer died and was recovered from the write-intent record at open.
   */
  '__org.bitmirror_recovered'?: boolean;
}

/** bdrv_dirty_bitmap_check flags. */
export const BITMAP_BUSY = 1;
export const BITMAP_RO = 2;
export const BITMAP_INCONSISTENT = 4;
/** busy, readonly and inconsistent: for anything that modifies the bitmap. */
export const BITMAP_DEFAULT = BITMAP_BUSY | BITMAP_RO | BITMAP_INCONSISTENT;
/** busy and inconsistent: for enable/disable and merge sources. */
export const BITMAP_ALLOW_RO = BITMAP_BUSY | BITMAP_INCONSISTENT;

/** Longest bitmap name (BDRV_BITMAP_MAX_NAME_SIZE). */
export const BITMAP_MAX_NAME_SIZE = 1023;

/** A user-facing error with QEMU's hint text (printed by CLIs, not sent over QMP, as in QEMU). */
export type HintedError = QmpError & { hint?: string };

export class DirtyBitmap {
  /** The bits. Replaced wholesale by clear-with-backup and restore (transactions). */
  hbitmap: HBitmap;
  /** Not recording writes (block-dirty-bitmap-disable, add with disabled=true, a non-auto qcow2 bitmap). */
  disabled: boolean;
  /** In use by a job or an export: may not be modified, removed, enabled or disabled. */
  busy = false;
  /** Stored in the image when the node closes (qcow2 persistent bitmaps). */
  persistent: boolean;
  /** Loaded from a read-only image: may not be modified, and the node may not be written. */
  readonly = false;
  /** Found with in_use set on disk: empty, disabled, usable only by remove. */
  inconsistent = false;
  /** Recovered after a crash from the image's write-intent record (query: __org.bitmirror_recovered). */
  recovered = false;
  /** Do not store this persistent bitmap (being removed by a transaction). */
  skipStore = false;
  /** Backup's successor: records writes while this bitmap is frozen (see BitmapManager.createSuccessor). */
  successor: DirtyBitmap | undefined;

  /**
   * @param granularity bytes per bit: a power of two >= 512 (checked by the manager)
   * @param size bytes covered (the node's length)
   */
  constructor(
    readonly node: BlockNode,
    public name: string | undefined,
    granularity: number,
    size: number,
    opts: { disabled?: boolean; persistent?: boolean } = {},
  ) {
    this.hbitmap = new HBitmap(size, Math.log2(granularity));
    this.disabled = opts.disabled ?? false;
    this.persistent = opts.persistent ?? false;
  }

  /** Bytes per bit. */
  get granularity(): number {
    return this.hbitmap.granularityBytes;
  }

  /** Bytes covered. */
  get size(): number {
    return this.hbitmap.size;
  }

  /** Records writes itself. */
  get enabled(): boolean {
    return !this.disabled;
  }

  /** Enabled, or has an enabled successor (BlockDirtyInfo.recording). */
  get recording(): boolean {
    return !this.disabled || (this.successor !== undefined && !this.successor.disabled);
  }

  /** Dirty bytes: set bits × granularity. */
  count(): number {
    return this.hbitmap.count();
  }

  info(): BlockDirtyInfo {
    const info: BlockDirtyInfo = {
      ...(this.name !== undefined ? { name: this.name } : {}),
      recording: this.recording,
      persistent: this.persistent,
      busy: this.busy,
      granularity: this.granularity,
      count: this.count(),
    };
    if (this.inconsistent) info.inconsistent = true;
    if (this.recovered) info['__org.bitmirror_recovered'] = true;
    return info;
  }

  /** bdrv_dirty_bitmap_check: throw QEMU's error when the bitmap may not be used as `flags` says. */
  check(flags: number): void {
    const name = this.name ?? '(null)';
    if (flags & BITMAP_BUSY && this.busy) {
      throw genericError(`Bitmap '${name}' is currently in use by another operation and cannot be used`);
    }
    if (flags & BITMAP_RO && this.readonly) {
      throw genericError(`Bitmap '${name}' is readonly and cannot be modified`);
    }
    if (flags & BITMAP_INCONSISTENT && this.inconsistent) {
      const err: HintedError = genericError(`Bitmap '${name}' is inconsistent and cannot be used`);
      err.hint = 'Try block-dirty-bitmap-remove to delete this bitmap from disk';
      throw err;
    }
  }

  // ---- data -------------------------------------------------------------------------------------

  /** Mark [offset, offset+bytes) dirty (whether or not the bitmap is enabled). */
  setDirty(offset: number, bytes: number): void {
    this.hbitmap.set(offset, bytes);
  }

  /** Clear [offset, offset+bytes); must be granularity-aligned except at the end of the bitmap. */
  resetDirty(offset: number, bytes: number): void {
    this.hbitmap.reset(offset, bytes);
  }

  /**
   * Clear every whole chunk inside [offset, offset+bytes) and leave partly covered chunks dirty: for
   * callers whose ranges are not aligned to this bitmap's granularity.
   */
  resetDirtyInside(offset: number, bytes: number): void {
    const g = this.granularity;
    const start = Math.ceil(offset / g) * g;
    let end = offset + bytes === this.size ? this.size : Math.floor((offset + bytes) / g) * g;
    if (end > this.size) end = this.size;
    if (end > start) this.hbitmap.reset(start, end - start);
  }

  isDirty(offset: number): boolean {
    return this.hbitmap.get(offset);
  }

  /** Clear everything. */
  clear(): void {
    this.hbitmap.resetAll();
  }

  /** Clear everything, returning the old bits so that restore() can undo it (transactions). */
  clearWithBackup(): HBitmap {
    const old = this.hbitmap;
    this.hbitmap = new HBitmap(old.size, old.granularityShift);
    return old;
  }

  /** Put back bits saved by clearWithBackup() or a merge backup. */
  restore(backup: HBitmap): void {
    this.hbitmap = backup;
  }

  nextDirty(offset: number, bytes?: number): number {
    return this.hbitmap.nextDirty(offset, bytes);
  }

  nextZero(offset: number, bytes?: number): number {
    return this.hbitmap.nextZero(offset, bytes);
  }

  nextDirtyArea(offset: number, end?: number, maxBytes?: number): DirtyArea | undefined {
    return this.hbitmap.nextDirtyArea(offset, end, maxBytes);
  }

  dirtyAreas(start?: number, end?: number, maxBytes?: number): Generator<DirtyArea> {
    return this.hbitmap.dirtyAreas(start, end, maxBytes);
  }

  /** An independent copy of the bits (e.g. a job's frozen view). */
  cloneBits(): HBitmap {
    return this.hbitmap.clone();
  }

  /** SHA-256 of the bits, as x-debug-block-dirty-bitmap-sha256. */
  sha256(): string {
    return this.hbitmap.sha256();
  }

  /** Follow a resize of the node (bdrv_dirty_bitmap_truncate). */
  truncate(size: number): void {
    this.hbitmap.truncate(size);
    this.successor?.truncate(size);
  }

  // ---- serialisation (qcow2 persistence, formats.md §2.4) ----------------------------------------

  /**
   * The whole bitmap in qcow2 order: ceil(ceil(size/granularity)/8) bytes, bit n of the disk in byte
   * n/8 at bit n%8 (least significant first).
   */
  toBuffer(): Buffer {
    const full = this.hbitmap.serialize();
    return full.subarray(0, Math.ceil(this.hbitmap.bitCount / 8));
  }

  /** Replace the bits with a buffer in qcow2 order (at least ceil(bits/8) bytes; stray tail bits ignored). */
  loadFromBuffer(buf: Uint8Array): void {
    this.hbitmap.deserialize(buf);
  }
}
