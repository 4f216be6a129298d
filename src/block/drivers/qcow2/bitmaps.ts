/**
 * The qcow2 "bitmaps" extension (formats.md §2): bitmap directory codec and the checks QEMU applies
 * on open. The node (index.ts) exposes listStoredBitmaps / readBitmapData / setBitmapsInUse /
 * storeBitmaps on top of these.
 */
import { genericError } from '../../../errors.js';

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
  extraData: Buffer;
}

export function parseBitmapDirectory(dir: Buffer, nb: number): StoredBitmap[] {
  const out: StoredBitmap[] = [];
  let off = 0;
  for (let i = 0; i < nb; i++) {
    if (off + 24 > dir.length) throw genericError('Broken bitmap directory');
    const tableOffset = Number(dir.readBigUInt64BE(off));
    const tableSize = dir.readUInt32BE(off + 8);
    const flags = dir.readUInt32BE(off + 12);
    const type = dir[off + 16];
    const granularityBits = dir[off + 17];
    const nameSize = dir.readUInt16BE(off + 18);
    const extraSize = dir.readUInt32BE(off + 20);
    const size = Math.ceil((24 + extraSize + nameSize) / 8) * 8;
    if (off + size > dir.length) throw genericError('Broken bitmap directory');
    out.push({
      name: dir.subarray(off + 24 + extraSize, off + 24 + extraSize + nameSize).toString('utf8'),
      tableOffset,
      tableSize,
      flags,
      inUse: (flags & BME_FLAG_IN_USE) !== 0,
      auto: (flags & BME_FLAG_AUTO) !== 0,
      type,
      granularityBits,
      granularity: 2 ** granularityBits,
      dirOffset: off,
      extraData: Buffer.from(dir.subarray(off + 24, off + 24 + extraSize)),
    });
    off += size;
  }
  if (off !== dir.length) throw genericError('Broken bitmap directory');
  return out;
}

/** QEMU's per-entry checks (qcow2-bitmap.c check_dir_entry); returns a problem or undefined. */
export function checkBitmapEntry(bm: StoredBitmap, clusterSize: number, virtualSize: number): string | undefined {
  if (bm.tableOffset === 0 || bm.tableOffset % clusterSize) return 'bitmap table offset is invalid';
  if (bm.tableSize === 0 || bm.tableSize * clusterSize > BME_MAX_PHYS_SIZE) return 'bitmap table size is invalid';
  if (bm.flags & BME_RESERVED_FLAGS) return 'reserved flags are set';
  if (bm.extraData.length) return 'Bitmap extra data is not supported';
  if (bm.type !== 1) return 'unknown bitmap type';
  if (bm.granularityBits < 9 || bm.granularityBits > 31) return 'granularity is out of range';
  if (!bm.name.length || bm.name.length > 1023) return 'name length is invalid';
  if (!bm.inUse && virtualSize > bm.tableSize * clusterSize * 8 * bm.granularity) return 'bitmap is too small for the image';
  return undefined;
}

export function serializeBitmapDirectory(entries: Array<{ name: string; tableOffset: number; tableSize: number; flags: number; granularityBits: number }>): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
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
