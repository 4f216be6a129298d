/**
 * Walk every metadata structure of a qcow2 image and count references per host cluster, as QEMU's
 * check does (formats.md §1.10). Used to rebuild refcounts when an image with the dirty bit
 * (lazy refcounts) is opened read-write.
 */
import { BlockIOError } from '../../../errors.js';
import type { BlockNode } from '../../node.js';
import { EXT_CRYPTO, type Qcow2Header } from './header.js';
import { decodeL1, decodeL2 } from './tables.js';
import { bitmapTableEntryOffset, parseBitmapDirectory } from './bitmaps.js';

export interface WalkResult {
  refs: Map<number, number>;
  /** One past the highest referenced cluster. */
  end: number;
}

async function readAt(file: BlockNode, off: number, n: number): Promise<Buffer> {
  const avail = Math.max(0, Math.min(n, file.length() - off));
  const b = avail > 0 ? await file.read(off, avail) : Buffer.alloc(0);
  return b.length === n ? b : Buffer.concat([b, Buffer.alloc(n - b.length)]);
}

export async function walkReferences(file: BlockNode, h: Qcow2Header, includeBitmaps: boolean): Promise<WalkResult> {
  const cs = 2 ** h.clusterBits;
  const refs = new Map<number, number>();
  let end = 0;
  const inc = (off: number, bytes: number) => {
    if (bytes <= 0) return;
    const first = Math.floor(off / cs);
    const last = Math.floor((off + bytes - 1) / cs);
    for (let c = first; c <= last; c++) refs.set(c, (refs.get(c) ?? 0) + 1);
    end = Math.max(end, last + 1);
  };
  inc(0, cs);
  const v3 = h.version === 3;
  const walkL1 = async (l1Offset: number, l1Size: number) => {
    inc(l1Offset, l1Size * 8);
    const l1 = await readAt(file, l1Offset, l1Size * 8);
    for (let i = 0; i < l1Size; i++) {
      const e = decodeL1(l1, i);
      if (!e.offset) continue;
      if (e.offset % cs) throw new BlockIOError('EIO', `qcow2: L1 entry ${i} is not cluster aligned`);
      inc(e.offset, cs);
      const l2 = await readAt(file, e.offset, cs);
      for (let j = 0; j < cs / 8; j++) {
        const d = decodeL2(l2, j, h.clusterBits, v3);
        if (d.type === 'normal' || d.type === 'zero-alloc') inc(d.offset, cs);
        else if (d.type === 'compressed') inc(d.offset, d.csize);
      }
    }
  };
  await walkL1(h.l1TableOffset, h.l1Size);
  if (h.nbSnapshots > 0) {
    let off = h.snapshotsOffset;
    const start = off;
    for (let i = 0; i < h.nbSnapshots; i++) {
      const fixed = await readAt(file, off, 40);
      const l1Off = Number(fixed.readBigUInt64BE(0));
      const l1Size = fixed.readUInt32BE(8);
      const idLen = fixed.readUInt16BE(12);
      const nameLen = fixed.readUInt16BE(14);
      const extra = fixed.readUInt32BE(36);
      off += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
      await walkL1(l1Off, l1Size);
    }
    inc(start, off - start);
  }
  for (const e of h.unknownExtensions) {
    if (e.type === EXT_CRYPTO && e.data.length >= 16) inc(Number(e.data.readBigUInt64BE(0)), Number(e.data.readBigUInt64BE(8)));
  }
  if (includeBitmaps && h.bitmaps) {
    inc(h.bitmaps.directoryOffset, h.bitmaps.directorySize);
    const dir = await readAt(file, h.bitmaps.directoryOffset, h.bitmaps.directorySize);
    for (const bm of parseBitmapDirectory(dir, h.bitmaps.nbBitmaps)) {
      inc(bm.tableOffset, bm.tableSize * 8);
      const t = await readAt(file, bm.tableOffset, bm.tableSize * 8);
      for (let k = 0; k < bm.tableSize; k++) {
        const off = bitmapTableEntryOffset(t, k);
        if (off) inc(off, cs);
      }
    }
  }
  return { refs, end };
}
