/**
 * The qcow2 "bitmaps" extension (formats.md §2): bitmap directory codec and the checks QEMU applies
 * on open (QEMU's messages). The node (node.ts) exposes listStoredBitmaps / readBitmapData / setBitmapsInUse /
 * storeBitmaps on top of these.
 */
import { genericError } from '../../../errors.js';
import { qemuStringBytes, qemuStringFromBytes } from '../../../base/qemu-string.js';
import type { BitmapsExtension } from './header.js';

export const BME_FLAG_IN_USE = 1;
export const BME_FLAG_AUTO = 2;
export const BME_RESERVED_FLAGS = 0xfffffffc;
export const BME_MAX_PHYS_SIZE = 512 * 1024 * 1024;

export interface StoredBitmap {
  name: string;
  /** Host offset of the bitmap table. */
  tableOffset: number;
  /** Number of u64 entries in the bitmap table. */
  tableSize: number;
  flags: number;
  inUse: boolean;
  auto: boolean;
  type: number;
  granularityBits: number;
  granularity: number;
  /** Byte offset of this entry inside the directory. */
  dirOffset: number;
  /** Bytes of the name up to its first NUL (what QEMU keeps of it). */
  nameBytes: number;
}

/** QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE (formats.md §2.7). */
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
const BME_MAX_TABLE_SIZE = 0x8000000;
const BME_MAX_NAME_SIZE = 1023;
const BME_TABLE_ENTRY_RESERVED_MASK = 0xff000000000001fen;
const BME_TABLE_ENTRY_OFFSET_MASK = 0x00fffffffffffe00n;
const BME_TABLE_ENTRY_FLAG_ALL_ONES = 1n;

/** The data cluster of bitmap table entry `k` (0: none; the cluster then reads as all ones if bit 0 is set). */
export function bitmapTableEntryOffset(table: Buffer, k: number): number {
  return Number(table.readBigUInt64BE(k * 8) & BME_TABLE_ENTRY_OFFSET_MASK);
}

/** Whether bitmap table entry `k` without a data cluster stands for all ones (else all zeroes). */
export function bitmapTableEntryAllOnes(table: Buffer, k: number): boolean {
  return (table.readBigUInt64BE(k * 8) & BME_TABLE_ENTRY_FLAG_ALL_ONES) !== 0n;
}

/**
 * The bitmaps extension's own checks, in QEMU's order and words (qcow2_read_extensions); only for an
 * extension the autoclear bit vouches for (an unvouched one is ignored).
 */
export function checkBitmapsExtension(ext: BitmapsExtension, clusterSize: number): void {
  const size = ext.raw?.directorySize ?? BigInt(ext.directorySize);
  const offset = ext.raw?.directoryOffset ?? BigInt(ext.directoryOffset);
  if (ext.reserved) throw genericError('bitmaps_ext: Reserved field is not zero');
  if (ext.nbBitmaps > MAX_BITMAPS) throw genericError(`bitmaps_ext: Image has ${ext.nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS}`);
  if (ext.nbBitmaps === 0) throw genericError('found bitmaps extension with zero bitmaps');
  if (offset % BigInt(clusterSize)) throw genericError('bitmaps_ext: invalid bitmap directory offset');
  if (size > BigInt(MAX_BITMAP_DIRECTORY_SIZE)) {
    throw genericError(`bitmaps_ext: bitmap directory size (${size}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE})`);
  }
  if (size === 0n) throw genericError('Requested bitmap directory size is zero');
  if (!withinRequestLimit(ext.directoryOffset, ext.directorySize)) throw genericError('Failed to read bitmap directory: Input/output error');
}

/** QEMU's BDRV_MAX_LENGTH: a request reaching beyond it fails with EIO (bdrv_check_request). */
export function withinRequestLimit(offset: number, bytes: number): boolean {
  return offset + bytes <= 2 ** 63 - 2 ** 30;
}

/**
 * Parse the bitmap directory with QEMU's checks and messages (bitmap_list_load). `checkEntry`, when
 * given, is QEMU's check_dir_entry, applied to each entry in turn (the order decides which message a
 * damaged directory gets). A name ends at its first NUL byte, as QEMU reads it.
 */
export function parseBitmapDirectory(dir: Buffer, nb: number, checkEntry?: (bm: StoredBitmap, nameBytes: number, rawTableOffset: bigint) => boolean): StoredBitmap[] {
  const broken = () => genericError('Broken bitmap directory');
  const out: StoredBitmap[] = [];
  let off = 0;
  while (off < dir.length) {
    if (off + 24 > dir.length) throw broken();
    if (out.length + 1 > nb) throw genericError('More bitmaps found than specified in header extension');
    const rawTableOffset = dir.readBigUInt64BE(off);
    const tableOffset = Number(rawTableOffset);
    const tableSize = dir.readUInt32BE(off + 8);
    const flags = dir.readUInt32BE(off + 12);
    const type = dir[off + 16];
    const granularityBits = dir[off + 17];
    const nameSize = dir.readUInt16BE(off + 18);
    const extraSize = dir.readUInt32BE(off + 20);
    // QEMU computes the entry size in an int: a huge extra data size wraps (and is then refused as
    // extra data, not as a broken directory).
    const size = (Math.ceil((24 + extraSize + nameSize) / 8) * 8) | 0;
    if (off + size > dir.length) throw broken();
    if (extraSize !== 0) throw genericError('Bitmap extra data is not supported');
    const rawName = dir.subarray(off + 24, off + 24 + nameSize);
    const nul = rawName.indexOf(0);
    const bm: StoredBitmap = {
      name: qemuStringFromBytes(rawName),
      tableOffset,
      tableSize,
      flags,
      inUse: (flags & BME_FLAG_IN_USE) !== 0,
      auto: (flags & BME_FLAG_AUTO) !== 0,
      type,
      granularityBits,
      granularity: 2 ** granularityBits,
      dirOffset: off,
      nameBytes: nul < 0 ? nameSize : nul,
    };
    if (checkEntry && !checkEntry(bm, nameSize, rawTableOffset)) throw genericError(`Bitmap '${bm.name}' doesn't satisfy the constraints`);
    out.push(bm);
    off += size;
  }
  if (out.length !== nb) throw genericError('Less bitmaps found than specified in header extension');
  return out;
}

/** QEMU's check_dir_entry: is this directory entry one QEMU would load? */
export function bitmapEntryValid(bm: StoredBitmap, nameBytes: number, rawTableOffset: bigint, clusterSize: number, virtualSize: number): boolean {
  if (bm.tableSize === 0 || rawTableOffset === 0n || rawTableOffset % BigInt(clusterSize) || bm.tableSize > BME_MAX_TABLE_SIZE) return false;
  if (bm.flags & BME_RESERVED_FLAGS || nameBytes > BME_MAX_NAME_SIZE || bm.type !== 1) return false;
  if (bm.granularityBits < 9 || bm.granularityBits > 31) return false;
  const physBytes = bm.tableSize * clusterSize;
  if (physBytes > BME_MAX_PHYS_SIZE) return false;
  // A bitmap that is not in use must cover the whole disk.
  return bm.inUse || virtualSize <= physBytes * 8 * bm.granularity;
}

/** Size of a directory entry for a name of `nameBytes` bytes and no extra data (formats.md §2.2). */
export function dirEntrySize(nameBytes: number): number {
  return Math.ceil((24 + nameBytes) / 8) * 8;
}

/** Number of bitmap table entries a bitmap of `granularity` over `virtualSize` bytes has. */
export function bitmapTableEntries(virtualSize: number, granularity: number, clusterSize: number): number {
  return Math.ceil(Math.ceil(Math.ceil(virtualSize / granularity) / 8) / clusterSize);
}

/**
 * QEMU's checks of a loaded bitmap's table (load_bitmap): check_table_entry for each entry, then the
 * table's size against the bitmap's (load_bitmap_data); QEMU's message, or undefined when it is valid.
 * Beyond QEMU 7.2 (which reads a cluster past the end of the file as zeroes, then fails to free it
 * when the bitmap is stored, leaking clusters), the table and its data clusters must lie inside the file: such a table
 * is refused like any other invalid one, before anything is written.
 */
export function bitmapTableProblem(table: Buffer, bm: StoredBitmap, clusterSize: number, virtualSize: number, fileLength: number): string | undefined {
  if (!withinRequestLimit(bm.tableOffset, bm.tableSize * 8)) return `Could not read bitmap_table table from image for bitmap '${bm.name}': Input/output error`;
  if (bm.tableOffset + bm.tableSize * 8 > fileLength) return `Could not read bitmap_table table from image for bitmap '${bm.name}': Invalid argument`;
  for (let k = 0; k < bm.tableSize; k++) {
    const e = table.readBigUInt64BE(k * 8);
    const off = e & BME_TABLE_ENTRY_OFFSET_MASK;
    const bad = e & BME_TABLE_ENTRY_RESERVED_MASK || (off !== 0n && (e & BME_TABLE_ENTRY_FLAG_ALL_ONES || off % BigInt(clusterSize) || off >= BigInt(fileLength)));
    if (bad) return `Could not read bitmap_table table from image for bitmap '${bm.name}': Invalid argument`;
  }
  if (bm.tableSize !== bitmapTableEntries(virtualSize, bm.granularity, clusterSize)) return `Could not read bitmap '${bm.name}' from image: Invalid argument`;
  return undefined;
}

export function serializeBitmapDirectory(entries: Array<{ name: string; tableOffset: number; tableSize: number; flags: number; granularityBits: number }>): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const name = qemuStringBytes(e.name);
    const b = Buffer.alloc(Math.ceil((24 + name.length) / 8) * 8);
    b.writeBigUInt64BE(BigInt(e.tableOffset), 0);
    b.writeUInt32BE(e.tableSize, 8);
    b.writeUInt32BE(e.flags, 12);
    b[16] = 1;
    b[17] = e.granularityBits;
    b.writeUInt16BE(name.length, 18);
    b.writeUInt32BE(0, 20);
    name.copy(b, 24);
    parts.push(b);
  }
  return Buffer.concat(parts);
}
