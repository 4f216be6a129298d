/**
 * createQcow2: format a (normally empty) protocol node as qcow2, with QEMU's layout (formats.md §1.8):
 * header in cluster 0, refcount table, refcount block(s), then the L1 table. Called by the
 * blockdev-create job with BlockdevCreateOptionsQcow2 members.
 */
import { isPowerOf2, MiB } from '../../../base/sizes.js';
import { genericError } from '../../../errors.js';
import type { BlockNode } from '../../node.js';
import { COMPAT_LAZY_REFCOUNTS, serializeHeader, writeRefcountTableLocation, type Qcow2Header } from './header.js';
import { Refcounts } from './refcount.js';
import { COPIED_HI, encodeEntry } from './tables.js';

export interface Qcow2CreateOptions {
  size: number;
  'cluster-size'?: number;
  version?: 'v2' | 'v3';
  'backing-file'?: string;
  'backing-fmt'?: string;
  'lazy-refcounts'?: boolean;
  'refcount-bits'?: number;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  'extended-l2'?: boolean;
  'compression-type'?: 'zlib' | 'zstd';
  'data-file'?: unknown;
  'data-file-raw'?: boolean;
  encrypt?: unknown;
  [key: string]: unknown;
}

export async function createQcow2(file: BlockNode, opts: Qcow2CreateOptions): Promise<void> {
  const size = opts.size;
  const cs = opts['cluster-size'] ?? 65536;
  const version = opts.version ?? 'v3';
  const refcountBits = opts['refcount-bits'] ?? 16;
  const prealloc = opts.preallocation ?? 'off';
  if (!isPowerOf2(cs) || cs < 512 || cs > 2 * MiB) throw genericError('Cluster size must be a power of two between 512 and 2048k');
  if (!Number.isSafeInteger(size) || size < 0) throw genericError('Invalid image size');
  if (size % 512) throw genericError('Image size must be a multiple of 512 bytes');
  if (!isPowerOf2(refcountBits) || refcountBits > 64) throw genericError('Refcount width must be a power of two and may not exceed 64 bits');
  if (version === 'v2') {
    if (opts['lazy-refcounts']) throw genericError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
    if (refcountBits !== 16) throw genericError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
    if (opts['extended-l2']) throw genericError('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (opts['extended-l2']) throw genericError('qcow2: creating images with extended L2 entries is not supported');
  if (opts['data-file'] !== undefined || opts['data-file-raw']) throw genericError('qcow2: external data files are not supported');
  if (opts.encrypt !== undefined) throw genericError('qcow2: encrypted images are not supported');
  if (opts['compression-type'] === 'zstd') throw genericError("qcow2: compression type 'zstd' is not supported by this build");
  if (prealloc !== 'off' && prealloc !== 'metadata') throw genericError(`qcow2: preallocation mode '${prealloc}' is not supported`);
  if (opts['backing-file'] !== undefined && prealloc !== 'off') throw genericError('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  if (opts['backing-fmt'] !== undefined && opts['backing-file'] === undefined) throw genericError('Backing format cannot be used without backing file');
  if (opts['compression-type'] !== undefined && opts['compression-type'] !== 'zlib' && version === 'v2') {
    throw genericError('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }

  const clusterBits = Math.log2(cs);
  const l2Entries = cs / 8;
  const l1Size = Math.ceil(size / (cs * l2Entries));
  if (l1Size * 8 > 32 * 1024 * 1024) throw genericError('Image size is too large for this cluster size');
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  const refcountOrder = Math.log2(refcountBits);
  const entriesPerBlock = (cs * 8) / refcountBits;
  // Clusters: header, refcount table (T), refcount blocks (B), L1 (L).
  let T = 1;
  let B = 1;
  for (let i = 0; i < 20; i++) {
    const total = 1 + T + B + l1Clusters;
    const nb = Math.ceil(total / entriesPerBlock);
    const nt = Math.ceil((nb * 8) / cs);
    if (nb === B && nt === T) break;
    B = nb;
    T = nt;
  }
  const total = 1 + T + B + l1Clusters;
  const l1Offset = (1 + T + B) * cs;

  const h: Qcow2Header = {
    version: version === 'v2' ? 2 : 3,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: l1Size > 0 ? l1Offset : 0,
    refcountTableOffset: cs,
    refcountTableClusters: T,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: opts['lazy-refcounts'] ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder,
    headerLength: version === 'v2' ? 72 : 112,
    compressionType: 0,
    extraHeaderBytes: Buffer.alloc(0),
    backingFile: opts['backing-file'],
    backingFormat: opts['backing-file'] !== undefined ? opts['backing-fmt'] : undefined,
    unknownExtensions: [],
    featureNames: [],
    hasDataFileExt: false,
    hasCryptoExt: false,
  };
  const headerBuf = serializeHeader(h, cs);

  // Start from an empty file.
  if (file.capabilities().resize) await file.truncate(0);

  const rc = new Refcounts(() => file, clusterBits, refcountOrder, cs, T, [], async () => undefined);
  const table = Buffer.alloc(T * cs);
  const blocks: Buffer[] = [];
  for (let b = 0; b < B; b++) {
    table.writeBigUInt64BE(BigInt((1 + T + b) * cs), b * 8);
    blocks.push(Buffer.alloc(cs));
  }
  for (let c = 0; c < total; c++) rc.writeEntry(blocks[Math.floor(c / entriesPerBlock)], c % entriesPerBlock, 1);

  // Header last would be safer, but the file is new: write in layout order, then flush.
  const cluster0 = Buffer.alloc(cs);
  headerBuf.copy(cluster0);
  await file.write(0, cluster0);
  await file.write(cs, table);
  for (let b = 0; b < B; b++) await file.write((1 + T + b) * cs, blocks[b]);
  if (l1Size > 0) await file.write(l1Offset, Buffer.alloc(l1Size * 8));
  await file.flush();

  if (prealloc === 'metadata') await preallocateMetadata(file, h, total);
}

/**
 * preallocation=metadata: an L2 table and a data cluster for every guest cluster, all at refcount 1
 * with COPIED, the data clusters left as holes (they read as zeroes).
 */
async function preallocateMetadata(file: BlockNode, h: Qcow2Header, usedClusters: number): Promise<void> {
  const cs = 2 ** h.clusterBits;
  const l2Entries = cs / 8;
  const guestClusters = Math.ceil(h.size / cs);
  const refTableBuf = await file.read(h.refcountTableOffset, h.refcountTableClusters * cs);
  const { table } = Refcounts.parseTable(refTableBuf, (h.refcountTableClusters * cs) / 8);
  const rc = new Refcounts(() => file, h.clusterBits, h.refcountOrder, h.refcountTableOffset, h.refcountTableClusters, table, (off, clusters) =>
    writeRefcountTableLocation(file, h, off, clusters),
  );
  rc.highestAllocated = usedClusters - 1;
  const l1 = Buffer.alloc(h.l1Size * 8);
  for (let i = 0; i < h.l1Size; i++) {
    const l2Off = await rc.alloc(1);
    const n = Math.min(l2Entries, guestClusters - i * l2Entries);
    const dataOff = await rc.alloc(n);
    const l2 = Buffer.alloc(cs);
    for (let k = 0; k < n; k++) encodeEntry(l2, k, dataOff + k * cs, COPIED_HI);
    await file.write(l2Off, l2);
    encodeEntry(l1, i, l2Off, COPIED_HI);
  }
  await rc.flush();
  await file.write(h.l1TableOffset, l1);
  // Make the file cover every data cluster so that they read as zeroes.
  const end = (rc.highestAllocated + 1) * cs;
  if (file.capabilities().resize && file.length() < end) await file.truncate(end);
  await file.flush();
}
