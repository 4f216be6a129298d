/**
 * qcow2 header and header-extension codec (docs/interop/qcow2.txt; shared/reference/formats.md §1.2-1.4).
 * Parsing validates everything that later code relies on and reports problems with a clear message;
 * serialising rebuilds the whole first cluster in QEMU's order, preserving unknown extensions and
 * unknown additional header fields.
 */
import { genericError } from '../../../errors.js';
import type { BlockNode } from '../../node.js';

export const QCOW_MAGIC = 0x514649fb;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_MASK = 0x1fn;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
/** The external data file is a raw image (qcow2.txt autoclear bit 1). */
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

/** QEMU's implementation limits. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
/** Host offsets are below 2^56: L1, L2, refcount-table and bitmap-table entries keep bits 9..55. */
export const HOST_OFFSET_END = 2 ** 56;
const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 21;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  /** Must be zero (checked on open); never written. */
  reserved?: number;
  /** The fields as stored, for the checks on open (the numbers above may have lost precision). */
  raw?: { directorySize: bigint; directoryOffset: bigint };
  directorySize: number;
  directoryOffset: number;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes past 112 that we do not know (preserved on rewrite). */
  extraHeaderBytes: Buffer;
  backingFile?: string;
  backingFormat?: string;
  /** Extensions we do not interpret (preserved on rewrite), in file order. */
  unknownExtensions: HeaderExtension[];
  bitmaps?: BitmapsExtension;
  /** Raw feature name table entries (type, bit, name), when present. */
  featureNames: Array<{ type: number; bit: number; name: string }>;
  hasDataFileExt: boolean;
  hasCryptoExt: boolean;
}

function u64(buf: Buffer, off: number, what: string): number {
  const v = buf.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw genericError(`qcow2: ${what} is too large (${v})`);
  return Number(v);
}

/** QEMU 7.2's feature table, written on every v3 image. */
const FEATURE_TABLE: Array<[number, number, string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

/**
 * Parse cluster 0 (or at least its first `buf.length` bytes; pass the whole cluster). `fileLength`
 * is used to check that the structures named by the header lie inside the file.
 */
export function parseHeader(buf: Buffer): Qcow2Header {
  if (buf.length < 72 || buf.readUInt32BE(0) !== QCOW_MAGIC) throw genericError('Image is not in qcow2 format');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw genericError(`Unsupported qcow2 version ${version}`);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) throw genericError(`Unsupported cluster size: 2^${clusterBits}`);
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(buf, 8, 'backing file offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits,
    size: u64(buf, 24, 'image size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(buf, 40, 'L1 table offset'),
    refcountTableOffset: u64(buf, 48, 'refcount table offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(buf, 64, 'snapshot table offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: 72,
    compressionType: 0,
    extraHeaderBytes: Buffer.alloc(0),
    unknownExtensions: [],
    featureNames: [],
    hasDataFileExt: false,
    hasCryptoExt: false,
  };
  if (version === 3) {
    if (buf.length < 104) throw genericError('qcow2 header too short');
    h.incompatibleFeatures = buf.readBigUInt64BE(72);
    h.compatibleFeatures = buf.readBigUInt64BE(80);
    h.autoclearFeatures = buf.readBigUInt64BE(88);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.headerLength < 104) throw genericError('qcow2 header too short');
    if (h.headerLength % 8 !== 0) throw genericError(`qcow2 header length ${h.headerLength} is not a multiple of 8`);
    if (h.headerLength > clusterSize) throw genericError('qcow2 header exceeds cluster size');
    if (h.headerLength > 104) h.compressionType = buf[104];
    if (h.headerLength > 112) h.extraHeaderBytes = Buffer.from(buf.subarray(112, h.headerLength));
  }
  if (h.refcountOrder > 6) throw genericError('Reference count entry width too large; may not exceed 64 bits');

  // Extensions.
  let off = h.headerLength;
  const seen = new Set<number>();
  const extEnd = h.backingFileOffset > 0 ? Math.min(h.backingFileOffset, clusterSize) : clusterSize;
  for (;;) {
    if (off + 8 > extEnd) throw genericError('qcow2: header extension area is not terminated');
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    off += 8;
    if (type === EXT_END) break;
    if (len > extEnd - off) throw genericError('Header extension too large');
    if (seen.has(type)) throw genericError(`qcow2: duplicate header extension 0x${type.toString(16)}`);
    seen.add(type);
    const data = Buffer.from(buf.subarray(off, off + len));
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len > 1023) throw genericError('ERROR: ext_backing_format: len=' + len + ' too large');
        h.backingFormat = data.toString('latin1');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          h.featureNames.push({ type: data[i], bit: data[i + 1], name: raw.subarray(0, nul < 0 ? 46 : nul).toString('latin1') });
        }
        break;
      case EXT_BITMAPS:
        if (len !== 24) throw genericError('bitmaps_ext: Invalid extension length');
        // Checked on open, and only when the autoclear bit vouches for the extension (QEMU's messages).
        h.bitmaps = {
          nbBitmaps: data.readUInt32BE(0),
          reserved: data.readUInt32BE(4),
          directorySize: Number(data.readBigUInt64BE(8)),
          directoryOffset: Number(data.readBigUInt64BE(16)),
          raw: { directorySize: data.readBigUInt64BE(8), directoryOffset: data.readBigUInt64BE(16) },
        };
        break;
      case EXT_DATA_FILE:
        h.hasDataFileExt = true;
        h.unknownExtensions.push({ type, data });
        break;
      case EXT_CRYPTO:
        h.hasCryptoExt = true;
        h.unknownExtensions.push({ type, data });
        break;
      default:
        h.unknownExtensions.push({ type, data });
    }
    off += Math.ceil(len / 8) * 8;
  }

  if (h.backingFileOffset > 0) {
    if (h.backingFileSize > 1023 || h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw genericError('Backing file name too long');
    }
    h.backingFile = buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize).toString('utf8');
  }
  return h;
}

/** The "Unsupported qcow2 feature(s)" message for unknown incompatible bits, naming them from the table. */
export function unknownFeaturesMessage(h: Qcow2Header, mask: bigint): string {
  const parts: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (!(mask & (1n << BigInt(bit)))) continue;
    const named = h.featureNames.find((f) => f.type === 0 && f.bit === bit);
    parts.push(named ? named.name : `Unknown incompatible feature: ${(1n << BigInt(bit)).toString(16)}`);
  }
  return `Unsupported qcow2 feature(s): ${parts.join(', ')}`;
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Serialise the whole first cluster as QEMU does (qcow2_update_header); throws if it does not fit. */
export function serializeHeader(h: Qcow2Header, clusterSize: number): Buffer {
  const buf = Buffer.alloc(clusterSize);
  const headerLength = h.version === 2 ? 72 : Math.max(112, 112 + h.extraHeaderBytes.length);
  buf.writeUInt32BE(QCOW_MAGIC, 0);
  buf.writeUInt32BE(h.version, 4);
  buf.writeUInt32BE(h.clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(h.size), 24);
  buf.writeUInt32BE(h.cryptMethod, 32);
  buf.writeUInt32BE(h.l1Size, 36);
  buf.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  buf.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  buf.writeUInt32BE(h.refcountTableClusters, 56);
  buf.writeUInt32BE(h.nbSnapshots, 60);
  buf.writeBigUInt64BE(BigInt(h.snapshotsOffset), 64);
  if (h.version === 3) {
    buf.writeBigUInt64BE(h.incompatibleFeatures, 72);
    buf.writeBigUInt64BE(h.compatibleFeatures, 80);
    buf.writeBigUInt64BE(h.autoclearFeatures, 88);
    buf.writeUInt32BE(h.refcountOrder, 96);
    buf.writeUInt32BE(headerLength, 100);
    buf[104] = h.compressionType;
    h.extraHeaderBytes.copy(buf, 112);
  }
  let off = headerLength;
  const put = (type: number, data: Buffer) => {
    if (off + 8 + pad8(data.length) + 8 > clusterSize) throw genericError('qcow2: header extensions do not fit in the first cluster');
    buf.writeUInt32BE(type, off);
    buf.writeUInt32BE(data.length, off + 4);
    data.copy(buf, off + 8);
    off += 8 + pad8(data.length);
  };
  if (h.backingFormat !== undefined) put(EXT_BACKING_FORMAT, Buffer.from(h.backingFormat, 'latin1'));
  for (const e of h.unknownExtensions) if (e.type === EXT_DATA_FILE || e.type === EXT_CRYPTO) put(e.type, e.data);
  // QEMU 7.2 writes the feature table only for clusters of at least 8 KiB (checked with qemu-img create).
  if (h.version === 3 && clusterSize >= 8192) {
    const t = Buffer.alloc(48 * FEATURE_TABLE.length);
    FEATURE_TABLE.forEach(([type, bit, name], i) => {
      t[i * 48] = type;
      t[i * 48 + 1] = bit;
      t.write(name, i * 48 + 2, 'latin1');
    });
    put(EXT_FEATURE_TABLE, t);
  }
  if (h.bitmaps) {
    const b = Buffer.alloc(24);
    b.writeUInt32BE(h.bitmaps.nbBitmaps, 0);
    b.writeBigUInt64BE(BigInt(h.bitmaps.directorySize), 8);
    b.writeBigUInt64BE(BigInt(h.bitmaps.directoryOffset), 16);
    put(EXT_BITMAPS, b);
  }
  for (const e of h.unknownExtensions) if (e.type !== EXT_DATA_FILE && e.type !== EXT_CRYPTO) put(e.type, e.data);
  // End marker (8 zero bytes) is already there.
  off += 8;
  if (h.backingFile !== undefined) {
    const name = Buffer.from(h.backingFile, 'utf8');
    if (name.length > 1023 || off + name.length > clusterSize) throw genericError('Backing file name too long');
    name.copy(buf, off);
    buf.writeBigUInt64BE(BigInt(off), 8);
    buf.writeUInt32BE(name.length, 16);
    off += name.length;
  }
  return buf.subarray(0, off);
}

/**
 * Point the header at a moved refcount table: refcount_table_offset and refcount_table_clusters (bytes
 * 48..59) written in place, then flushed, so that the new table is what an open finds before anything
 * relies on it; `h` follows. What Refcounts calls when it grows its table.
 */
export async function writeRefcountTableLocation(file: BlockNode, h: Qcow2Header, offset: number, clusters: number): Promise<void> {
  const b = Buffer.alloc(12);
  b.writeBigUInt64BE(BigInt(offset), 0);
  b.writeUInt32BE(clusters, 8);
  await file.write(48, b);
  await file.flush();
  h.refcountTableOffset = offset;
  h.refcountTableClusters = clusters;
}

/** Where the header extension area of a serialised first cluster ends (after its end marker). */
export function extensionsEnd(buf: Buffer, headerLength: number): number {
  for (let off = headerLength; off + 8 <= buf.length; ) {
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    off += 8;
    if (type === EXT_END) return off;
    off += pad8(len);
  }
  return buf.length;
}

/** One write of a header update: `data` at `offset` of the first cluster, followed by a flush. */
export interface HeaderWrite {
  offset: number;
  data: Buffer;
}

/** Writes of at most one sector within it are taken as atomic (what a disk promises). */
const SECTOR = 512;

/**
 * The writes (each flushed before the next) that turn the first cluster `onDisk` into the header
 * `next` (serializeHeader's output with a new backing file name or format), ordered so that a crash
 * at any point leaves either the old header or the new one:
 *   1. the new name goes where the old header uses nothing (past its extensions and its name, and
 *      past the new extensions): the old header stays valid;
 *   2. one write within the first sector (the header fields with backing_file_offset/size, and the
 *      start of the extension area) switches to the new header at once.
 * This holds when the extension area beyond the first sector stays as it is on disk (a name
 * replaced, a format of the same padded length); otherwise (a backing format added or removed that
 * moves the later extensions) the header is written at once, as QEMU's qcow2_update_header does.
 */
export function backingChangeWrites(onDisk: Buffer, next: Buffer, headerLength: number, clusterSize: number): HeaderWrite[] {
  const whole = [{ offset: 0, data: next }];
  const nameOffset = Number(next.readBigUInt64BE(8));
  const nameLength = next.readUInt32BE(16);
  const extEnd = nameOffset > 0 ? nameOffset : next.length;
  if (onDisk.length < Math.max(extEnd, 20)) return whole;
  if (extEnd > SECTOR && !next.subarray(SECTOR, extEnd).equals(onDisk.subarray(SECTOR, extEnd))) return whole;
  const head = Buffer.from(next.subarray(0, Math.min(extEnd, SECTOR)));
  if (nameLength === 0) return [{ offset: 0, data: head }];
  const oldNameOffset = Number(onDisk.readBigUInt64BE(8));
  const oldNameEnd = oldNameOffset > 0 ? oldNameOffset + onDisk.readUInt32BE(16) : 0;
  const at = pad8(Math.max(extEnd, extensionsEnd(onDisk, headerLength), oldNameEnd));
  if (at + nameLength > clusterSize) return whole;
  head.writeBigUInt64BE(BigInt(at), 8);
  return [
    { offset: at, data: Buffer.from(next.subarray(nameOffset, nameOffset + nameLength)) },
    { offset: 0, data: head },
  ];
}
