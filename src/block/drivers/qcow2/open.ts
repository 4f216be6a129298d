/**
 * Opening a qcow2 image: read and validate the header and the tables it points to, refuse what we
 * cannot handle (with a message naming the problem), load the bitmap directory and open the backing
 * chain. Nothing is written here: the repair of a dirty (lazy refcounts) image and other updates on a
 * read-write open are Qcow2Node.doActivate's, once the whole open has succeeded.
 */
import { checkRuntimeOptions } from './runtime-options.js';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { genericError, errorMessage } from '../../../errors.js';
import type { BlockNode } from '../../node.js';
import type { OpenContext } from '../../graph.js';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  INCOMPAT_COMPRESSION,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  INCOMPAT_MASK,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  QCOW_MAGIC,
  parseHeader,
  unknownFeaturesMessage,
  writeRefcountTableLocation,
  type Qcow2Header,
} from './header.js';
import { checkCompressionType } from './compressed.js';
import { discardPassthrough } from './discard.js';
import { Refcounts } from './refcount.js';
import { decodeL1 } from './tables.js';
import { parseSnapshotTable, snapshotTableSize, type Qcow2Snapshot } from './snapshots.js';
import { Qcow2Node } from './node.js';
import { bitmapEntryValid, bitmapTableProblem, checkBitmapsExtension, dirEntrySize, parseBitmapDirectory, type StoredBitmap } from './bitmaps.js';
import { imageFileOf, protocolOptions, resolveBackingFilename } from '../../filename.js';

/** How many backing files deep a chain may go. */
export const MAX_BACKING_DEPTH = 32;

async function readAt(file: BlockNode, off: number, n: number): Promise<Buffer> {
  const avail = Math.max(0, Math.min(n, file.length() - off));
  const b = avail > 0 ? await file.read(off, avail) : Buffer.alloc(0);
  return b.length === n ? b : Buffer.concat([b, Buffer.alloc(n - b.length)]);
}

function hex(n: number): string {
  return '0x' + n.toString(16);
}

/** Validate the header against the file; throws a clear error for anything we must not open. */
export function validateHeader(h: Qcow2Header, fileLength: number, readOnly: boolean): void {
  const cs = 2 ** h.clusterBits;
  const unknown = h.incompatibleFeatures & ~INCOMPAT_MASK;
  if (unknown) throw genericError(unknownFeaturesMessage(h, unknown));
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE || h.hasDataFileExt) throw genericError('qcow2: external data files are not supported');
  // The data-file-raw autoclear bit without a data file: QEMU 7.2 refuses the image (read-only too).
  if (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) throw genericError('data-file-raw requires a data file');
  if (h.incompatibleFeatures & INCOMPAT_EXTL2) throw genericError('qcow2: images with extended L2 entries are not supported');
  if (h.cryptMethod !== 0 || h.hasCryptoExt) throw genericError('qcow2: encrypted images are not supported');
  if ((h.compressionType !== 0) !== ((h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n)) {
    throw genericError('qcow2: compression_type field and the compression type feature bit disagree');
  }
  checkCompressionType(h.compressionType);
  if (h.version === 2 && h.refcountOrder !== 4) throw genericError('qcow2: version 2 images must have 16-bit refcounts');
  if (!readOnly && h.incompatibleFeatures & INCOMPAT_CORRUPT) throw genericError('qcow2: Image is corrupt; cannot be opened read/write');

  const l2Entries = cs / 8;
  const needL1 = Math.ceil(h.size / (cs * l2Entries));
  if (needL1 * 8 > MAX_L1_BYTES) throw genericError(`qcow2: image size ${h.size} is too large for cluster size ${cs} (needs an L1 table of ${needL1 * 8} bytes)`);
  if (h.l1Size * 8 > MAX_L1_BYTES) throw genericError('Active L1 table too large');
  if (h.l1Size < needL1) throw genericError('L1 table is too small');
  if (h.l1Size > 0) {
    if (h.l1TableOffset === 0 || h.l1TableOffset % cs) throw genericError('Invalid L1 table offset');
    // No check against the file's end: as QEMU (qcow2_validate_table checks alignment and size only),
    // an L1 table reaching past it reads as zeroes there (unallocated), and an L2 table allocated for
    // such an entry writes the entry, growing the file. qemu-img check counts such a table as a
    // corruption until the file covers it.
  }
  if (h.refcountTableClusters === 0 || h.refcountTableOffset === 0 || h.refcountTableOffset % cs) throw genericError('Invalid reference count table offset');
  if (h.refcountTableClusters * cs > MAX_REFTABLE_BYTES) throw genericError('Reference count table too large');
  if (h.refcountTableOffset >= fileLength) {
    throw genericError(`qcow2: refcount table (offset ${hex(h.refcountTableOffset)}) lies beyond the end of the image file (${fileLength} bytes)`);
  }
  if (h.nbSnapshots > 65536) throw genericError('Too many snapshots');
  if (h.nbSnapshots && (h.snapshotsOffset % cs || h.snapshotsOffset >= fileLength)) throw genericError('Invalid snapshot table offset');
}

function overlaps(a: number, an: number, b: number, bn: number): boolean {
  return a < b + bn && b < a + an;
}

/** Checks needed before writing: refcount blocks and L2 tables must not sit on other metadata. */
function validateForWrite(h: Qcow2Header, refTable: number[], l1: Buffer, fileLength: number): void {
  const cs = 2 ** h.clusterBits;
  const fixed = [
    { offset: 0, bytes: cs, what: 'qcow2 header' },
    { offset: h.l1TableOffset, bytes: h.l1Size * 8, what: 'active L1 table' },
    { offset: h.refcountTableOffset, bytes: h.refcountTableClusters * cs, what: 'refcount table' },
  ];
  const seen = new Map<number, number>();
  refTable.forEach((off, i) => {
    if (!off) return;
    if (off % cs) throw genericError(`qcow2: refcount block ${i} (offset ${hex(off)}) is not cluster aligned; cannot be opened read/write`);
    if (off >= fileLength) throw genericError(`qcow2: refcount block ${i} (offset ${hex(off)}) lies beyond the end of the image file; cannot be opened read/write`);
    for (const m of fixed) {
      if (overlaps(off, cs, m.offset, m.bytes)) throw genericError(`qcow2: refcount block ${i} (offset ${hex(off)}) overlaps with the ${m.what}; cannot be opened read/write`);
    }
    const dup = seen.get(off);
    if (dup !== undefined) throw genericError(`qcow2: refcount blocks ${dup} and ${i} share offset ${hex(off)}; cannot be opened read/write`);
    seen.set(off, i);
  });
  for (let i = 0; i < h.l1Size; i++) {
    const e = decodeL1(l1, i);
    if (!e.offset) continue;
    if (e.bad) throw genericError(`qcow2: ${e.bad}; cannot be opened read/write`);
    if (e.offset % cs) throw genericError(`qcow2: L2 table ${i} (offset ${hex(e.offset)}) is not cluster aligned; cannot be opened read/write`);
    if (e.offset >= fileLength) throw genericError(`qcow2: L2 table ${i} (offset ${hex(e.offset)}) lies beyond the end of the image file; cannot be opened read/write`);
    for (const m of fixed) {
      if (overlaps(e.offset, cs, m.offset, m.bytes)) throw genericError(`qcow2: L2 table ${i} (offset ${hex(e.offset)}) overlaps with the ${m.what}; cannot be opened read/write`);
    }
    if (seen.has(e.offset)) throw genericError(`qcow2: L2 table ${i} (offset ${hex(e.offset)}) overlaps with refcount block ${seen.get(e.offset)}; cannot be opened read/write`);
  }
}

/** Read just the backing name and format of a qcow2 file on the host (for chain checks). */
async function peekBacking(filename: string): Promise<{ qcow2: boolean; backing?: string; format?: string }> {
  const fh = await fsp.open(filename, 'r');
  try {
    const head = Buffer.alloc(2 * 1024 * 1024);
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    const buf = head.subarray(0, bytesRead);
    if (buf.length < 4 || buf.readUInt32BE(0) !== QCOW_MAGIC) return { qcow2: false };
    const h = parseHeader(buf.length >= 2 ** buf.readUInt32BE(20) ? buf.subarray(0, 2 ** buf.readUInt32BE(20)) : buf);
    return { qcow2: true, backing: h.backingFile, format: h.backingFormat };
  } finally {
    await fh.close();
  }
}


/** Follow the chain below `imageFilename` through the headers: refuse loops and chains too deep. */
async function checkBackingChain(imageFilename: string, backing: string, format: string | undefined): Promise<void> {
  const seen = new Set<string>();
  seen.add(await fsp.realpath(imageFilename).catch(() => path.resolve(imageFilename)));
  let cur = resolveBackingFilename(imageFilename, backing);
  let fmt = format;
  for (let depth = 1; ; depth++) {
    if (depth > MAX_BACKING_DEPTH) throw genericError(`Backing chain of '${imageFilename}' is more than ${MAX_BACKING_DEPTH} files deep`);
    let real: string;
    try {
      real = await fsp.realpath(cur);
    } catch {
      return; // the open will report the missing file
    }
    if (seen.has(real)) throw genericError(`Backing file '${cur}' of '${imageFilename}' creates a loop in the backing chain`);
    seen.add(real);
    if (fmt !== undefined && fmt !== 'qcow2') return;
    let p: Awaited<ReturnType<typeof peekBacking>>;
    try {
      p = await peekBacking(real);
    } catch {
      return;
    }
    if (!p.qcow2 || p.backing === undefined) return;
    cur = resolveBackingFilename(real, p.backing);
    fmt = p.format;
  }
}

async function probeFormat(filename: string): Promise<string> {
  try {
    const fh = await fsp.open(filename, 'r');
    try {
      const b = Buffer.alloc(4);
      const { bytesRead } = await fh.read(b, 0, 4, 0);
      return bytesRead === 4 && b.readUInt32BE(0) === QCOW_MAGIC ? 'qcow2' : 'raw';
    } finally {
      await fh.close();
    }
  } catch {
    return 'raw';
  }
}

export async function openQcow2(nodeName: string, opts: Record<string, unknown>, ctx: OpenContext): Promise<Qcow2Node> {
  const readOnly = opts['read-only'] === true;
  const file = await ctx.openChild(opts.file, readOnly, 'file', 'image');
  const fileLength = file.length();
  if (fileLength < 72) throw genericError(fileLength < 4 ? 'Image is not in qcow2 format' : `qcow2: image file is truncated (${fileLength} bytes, shorter than a qcow2 header)`);
  const first = await readAt(file, 0, 104);
  if (first.readUInt32BE(0) !== QCOW_MAGIC) throw genericError('Image is not in qcow2 format');
  const bits = first.readUInt32BE(20);
  if (bits < 9 || bits > 21) throw genericError(`Unsupported cluster size: 2^${bits}`);
  const cs = 2 ** bits;
  const truncated = (need: number) => genericError(`qcow2: image file is truncated (${fileLength} bytes, the header needs ${need})`);
  if (first.readUInt32BE(4) === 3 && fileLength < 104) throw truncated(104);
  const h = parseHeader(await readAt(file, 0, cs));
  if (fileLength < h.headerLength) throw truncated(h.headerLength);
  validateHeader(h, fileLength, readOnly);
  checkRuntimeOptions(opts, h);

  const l1 = await readAt(file, h.l1TableOffset, h.l1Size * 8);
  const rtBytes = h.refcountTableClusters * cs;
  const { table: refTable, bad } = Refcounts.parseTable(await readAt(file, h.refcountTableOffset, rtBytes), rtBytes / 8);
  if (!readOnly) {
    if (bad) throw genericError(`qcow2: ${bad}; cannot be opened read/write`);
    validateForWrite(h, refTable, l1, fileLength);
  }

  const storedBitmaps = await loadBitmapDirectory(file, h, fileLength, readOnly);
  const snapshots = await loadSnapshotTable(file, h);

  // The metadata code reaches the file through the node's link once there is a node: blockdev-reopen
  // and a filter inserted below it move that link.
  const link: { node?: Qcow2Node } = {};
  const fileOf = () => link.node?.file ?? file;
  const rc = new Refcounts(fileOf, h.clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters, refTable, (off, clusters) =>
    writeRefcountTableLocation(fileOf(), h, off, clusters),
  );

  // Backing chain.
  let backing: BlockNode | undefined;
  // full-backing-filename: the header's name resolved, however the backing node is given.
  const backingDisplay = h.backingFile ? resolveBackingFilename(file.imageInfo().filename, h.backingFile) : undefined;
  const fileName = file.imageInfo().filename;
  if (opts.backing !== undefined && opts.backing !== null) {
    backing = await ctx.openChild(opts.backing, true, 'backing', 'cow');
  } else if (opts.backing === undefined && h.backingFile !== undefined && h.backingFile !== '') {
    const full = resolveBackingFilename(fileName, h.backingFile);
    await checkBackingChain(fileName, h.backingFile, h.backingFormat);
    const fmt = h.backingFormat ?? (await probeFormat(imageFileOf(full)));
    try {
      backing = await ctx.openChild({ driver: fmt, file: protocolOptions(full) }, true, 'backing', 'cow');
    } catch (err) {
      throw genericError(`Could not open backing file: ${errorMessage(err)}`);
    }
  }

  const node = new Qcow2Node(nodeName, readOnly, file, h, l1, rc, backingDisplay);
  link.node = node;
  node.cachedBitmaps = storedBitmaps;
  node.snapshots = snapshots.list;
  node.snapshotsSize = snapshots.size;
  node.unmapAllowed = opts.discard === 'unmap';
  node.rc.passthrough = discardPassthrough(opts);
  // Unless the backing node was opened from the header's name, that name is what a backing node
  // attached later (or given by reference) is compared with.
  if (opts.backing !== undefined || !h.backingFile) node.autoBackingFile = h.backingFile ?? '';
  // The node holds its file (with the permissions checked) from here: a failure lets go of it.
  try {
    if (backing) node.attachChild('backing', backing, 'cow');
  } catch (err) {
    for (const c of [...node.children]) node.detachChild(c.name);
    throw err;
  }
  // Nothing is written here: repairs and flag updates wait for Qcow2Node.doActivate, after the whole
  // open (bitmaps loaded by the layer above included) has succeeded.
  return node;
}

/** qcow2_read_snapshots: the internal snapshot table (snapshots.ts). */
async function loadSnapshotTable(file: BlockNode, h: Qcow2Header): Promise<{ list: Qcow2Snapshot[]; size: number }> {
  if (h.nbSnapshots === 0) return { list: [], size: 0 };
  // Read in pieces as large as the table can be (each entry at most 40 + 1024 + 2 * 65535 bytes).
  // Past the end of the file the table reads as zeroes (as QEMU reads its file node), and a damaged
  // entry gets QEMU's message as it is (qcow2_do_open adds nothing to it).
  const max = 64 * 1024 * 1024;
  let want = Math.min(h.nbSnapshots * 1024, max);
  for (;;) {
    const buf = await readAt(file, h.snapshotsOffset, want);
    try {
      const list = parseSnapshotTable(buf, h.nbSnapshots, h.size);
      return { list, size: snapshotTableSize(list) };
    } catch (err) {
      if (want >= max || !/exceeds the file/.test(errorMessage(err))) throw err;
      want = Math.min(want * 4, max);
    }
  }
}

/**
 * The stored bitmaps, every check QEMU makes when it loads them done (qcow2_read_extensions,
 * bitmap_list_load, load_bitmap; QEMU's messages), so that a damaged directory or table refuses the
 * open before anything is written. Only tables of bitmaps not in use are read, as in QEMU.
 */
async function loadBitmapDirectory(file: BlockNode, h: Qcow2Header, fileLength: number, readOnly: boolean): Promise<StoredBitmap[]> {
  // A set autoclear bit 0 vouches for the extension; without it the extension is ignored.
  if (h.bitmaps && !(h.autoclearFeatures & AUTOCLEAR_BITMAPS)) h.bitmaps = undefined;
  const ext = h.bitmaps;
  if (!ext) return [];
  const cs = 2 ** h.clusterBits;
  checkBitmapsExtension(ext, cs);
  const dir = await readAt(file, ext.directoryOffset, ext.directorySize);
  const list = parseBitmapDirectory(dir, ext.nbBitmaps, (bm, nameBytes, rawOffset) => bitmapEntryValid(bm, nameBytes, rawOffset, cs, h.size));
  const names = new Set<string>();
  for (const bm of list) {
    if (!bm.inUse) {
      const table = await readAt(file, bm.tableOffset, bm.tableSize * 8);
      const problem = bitmapTableProblem(table, bm, cs, h.size, fileLength);
      if (problem) throw genericError(problem);
    }
    if (names.has(bm.name)) throw genericError(`Bitmap already exists: ${bm.name}`);
    names.add(bm.name);
  }
  // A read-write open marks the loaded bitmaps in_use by rewriting the directory in place from the
  // names as read (cut at a NUL): QEMU refuses when that would change the directory's size.
  if (!readOnly && list.some((bm) => !bm.inUse) && list.reduce((n, bm) => n + dirEntrySize(bm.nameBytes), 0) !== ext.directorySize) {
    throw genericError("Can't update bitmap directory: Invalid argument");
  }
  return list;
}
