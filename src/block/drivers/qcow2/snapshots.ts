/**
 * The qcow2 internal snapshot table (docs/interop/qcow2.txt "Snapshots"; formats.md §1.7): its codec
 * and QEMU's rules for it (qcow2-snapshot.c). The operations that change refcounts and tables
 * (create, delete) are Qcow2Node's; this module knows only the table's bytes.
 *
 * An entry: L1 offset and size, id and name lengths, date (s, ns), guest clock (ns), a 32-bit VM state
 * size, the extra data size, then the extra data (QEMU writes 24 bytes: the 64-bit VM state size, the
 * disk size, icount; more is kept as it was read), the id, the name; each entry starts 8-aligned. The
 * table's size is the end of its last entry (unpadded), as QEMU counts it.
 */
import { genericError } from '../../../errors.js';
import type { SnapshotEntry } from '../../node.js';

/** QEMU's limits (QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE). */
export const MAX_SNAPSHOTS = 65536;
const MAX_EXTRA_DATA = 1024;
const MAX_TABLE_SIZE = 1024 * MAX_SNAPSHOTS;
/** The extra data QEMU writes (QCowSnapshotExtraData: vm_state_size_large, disk_size, icount). */
const EXTRA_SIZE = 24;
const FIXED = 40;
/** icount when there is none (-1ULL). */
export const NO_ICOUNT = 0xffffffffffffffffn;

export interface Qcow2Snapshot extends SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  /** Virtual disk size when it was taken (extra data; the image's size at open when absent). */
  diskSize: number;
  /** extra_data_size as read (at least EXTRA_SIZE is written back) and the bytes past EXTRA_SIZE. */
  extraDataSize: number;
  unknownExtra: Buffer;
}

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** The table at `buf` (read from snapshots_offset; at least tableSize bytes), `nb` entries. */
export function parseSnapshotTable(buf: Buffer, nb: number, imageSize: number): Qcow2Snapshot[] {
  const list: Qcow2Snapshot[] = [];
  let off = 0;
  for (let i = 0; i < nb; i++) {
    off = pad8(off);
    if (off + FIXED > buf.length) throw genericError('Snapshot table exceeds the file');
    const idLen = buf.readUInt16BE(off + 12);
    const nameLen = buf.readUInt16BE(off + 14);
    const extraDataSize = buf.readUInt32BE(off + 36);
    if (extraDataSize > MAX_EXTRA_DATA) throw genericError(`Too much extra metadata in snapshot table entry ${i}`);
    const extraAt = off + FIXED;
    const end = extraAt + extraDataSize + idLen + nameLen;
    if (end > buf.length) throw genericError('Snapshot table exceeds the file');
    const extra = buf.subarray(extraAt, extraAt + extraDataSize);
    const u64 = (at: number) => extra.readBigUInt64BE(at);
    let vmStateSize = buf.readUInt32BE(off + 32);
    if (extraDataSize >= 8) vmStateSize = Number(u64(0));
    list.push({
      l1TableOffset: Number(buf.readBigUInt64BE(off)),
      l1Size: buf.readUInt32BE(off + 8),
      dateSec: buf.readUInt32BE(off + 16),
      dateNsec: buf.readUInt32BE(off + 20),
      vmClockNsec: buf.readBigUInt64BE(off + 24),
      vmStateSize,
      diskSize: extraDataSize >= 16 ? Number(u64(8)) : imageSize,
      icount: extraDataSize >= 24 ? u64(16) : NO_ICOUNT,
      extraDataSize,
      unknownExtra: Buffer.from(extra.subarray(Math.min(EXTRA_SIZE, extraDataSize))),
      id: buf.toString('utf8', extraAt + extraDataSize, extraAt + extraDataSize + idLen),
      name: buf.toString('utf8', extraAt + extraDataSize + idLen, end),
    });
    off = end;
  }
  return list;
}

/** Bytes the table of `list` takes (QEMU's snapshots_size); EFBIG past QEMU's limit. */
export function snapshotTableSize(list: readonly Qcow2Snapshot[]): number {
  let off = 0;
  for (const sn of list) {
    off = pad8(off) + FIXED + Math.max(EXTRA_SIZE, sn.extraDataSize) + Buffer.byteLength(sn.id) + Buffer.byteLength(sn.name);
    if (off > MAX_TABLE_SIZE) throw genericError('Snapshot table too large');
  }
  return off;
}

/** The table's bytes as qcow2_write_snapshots writes them. */
export function serializeSnapshotTable(list: readonly Qcow2Snapshot[]): Buffer {
  const buf = Buffer.alloc(snapshotTableSize(list));
  let off = 0;
  for (const sn of list) {
    off = pad8(off);
    const id = Buffer.from(sn.id, 'utf8');
    const name = Buffer.from(sn.name, 'utf8');
    const extraSize = Math.max(EXTRA_SIZE, sn.extraDataSize);
    buf.writeBigUInt64BE(BigInt(sn.l1TableOffset), off);
    buf.writeUInt32BE(sn.l1Size, off + 8);
    buf.writeUInt16BE(id.length, off + 12);
    buf.writeUInt16BE(name.length, off + 14);
    buf.writeUInt32BE(sn.dateSec, off + 16);
    buf.writeUInt32BE(sn.dateNsec, off + 20);
    buf.writeBigUInt64BE(sn.vmClockNsec, off + 24);
    // A VM state too large for 32 bits is written as 0 there: older readers see a disk-only snapshot.
    if (sn.vmStateSize <= 0xffffffff) buf.writeUInt32BE(sn.vmStateSize, off + 32);
    buf.writeUInt32BE(extraSize, off + 36);
    buf.writeBigUInt64BE(BigInt(sn.vmStateSize), off + 40);
    buf.writeBigUInt64BE(BigInt(sn.diskSize), off + 48);
    buf.writeBigUInt64BE(sn.icount, off + 56);
    sn.unknownExtra.copy(buf, off + FIXED + EXTRA_SIZE);
    off += FIXED + extraSize;
    id.copy(buf, off);
    off += id.length;
    name.copy(buf, off);
    off += name.length;
  }
  return buf;
}

/** find_new_snapshot_id: one more than the largest id read as a number (strtoul: leading digits). */
export function newSnapshotId(list: readonly Qcow2Snapshot[]): string {
  let max = 0n;
  for (const sn of list) {
    const digits = /^\s*\+?(\d+)/.exec(sn.id)?.[1];
    const v = digits ? BigInt(digits) : 0n;
    if (v > max) max = v;
  }
  return String(max + 1n);
}

/** find_snapshot_by_id_and_name: the first entry matching both, or the one given. -1: none. */
export function findSnapshot(list: readonly SnapshotEntry[], id: string | undefined, name: string | undefined): number {
  if (id === undefined && name === undefined) return -1;
  return list.findIndex((sn) => (id === undefined || sn.id === id) && (name === undefined || sn.name === name));
}
