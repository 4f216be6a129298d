/**
 * Write-intent record for persistent dirty bitmaps in qcow2 (issue 14; the shared part, regions and
 * the live record, is block/write-intent.ts): what lets bitmaps that were in use when the daemon died
 * come back usable.
 *
 * Where it lives. Inside the image's first cluster, as a header extension of our own (magic
 * EXT_WRITE_INTENT) vouched for by an autoclear bit of our own (AUTOCLEAR_WRITE_INTENT). QEMU keeps
 * unknown header extensions when it rewrites the header and clears unknown autoclear bits when it
 * opens an image read-write, so a missing bit means another program may have written the image:
 * the record is then not trusted and in-use bitmaps load inconsistent, as before. Being inside the
 * header, the record owns no clusters: qemu-img check has nothing to count, and QEMU 7.2 opens and
 * uses the image as before.
 *
 * Contents (big-endian): u32 version (1), u32 region_bits, u32 nb_regions, u32 nb_covered,
 * u64 covered[nb_covered] (the bitmap-table offsets of the bitmaps the record covers: the stored
 * version of each bitmap that was loaded consistent and then marked in_use), then the region bitmap,
 * ceil(nb_regions / 8) bytes, bit i = byte i/8, least significant bit first. Region i covers guest
 * bytes [i << region_bits, (i+1) << region_bits); the last region reaches to the end of the disk (so
 * a grown disk stays covered).
 *
 * Region size: the smallest power of two of at least 4 MiB for which the region bitmap fits in the
 * room the first cluster has left (at most 4 KiB of bits, and 512 bytes left free for what QEMU may
 * add when it rewrites the header): 4 MiB up to 128 GiB, 32 MiB for 1 TiB. Larger regions mean fewer
 * first writes (each costs one durable header write), smaller ones a tighter bitmap after a crash.
 * Images whose first cluster has no room (clusters under 2 KiB, long backing names) get no record:
 * their bitmaps behave as before.
 *
 * Protocol.
 *   open        an in_use bitmap whose table offset is covered by a trusted record loads consistent:
 *               its stored bits ∪ every marked region (recovered). Any other in_use bitmap loads
 *               inconsistent.
 *   activate    the record is rewritten (covering the bitmaps just loaded consistent; regions kept if
 *               any bitmap was recovered, since their stored bits do not include them yet, else all
 *               clean), the autoclear bit set and the header flushed, and only then are the bitmaps
 *               marked in_use: every moment a bitmap is in_use on disk, a record covers it. The
 *               in_use flags are written in place in the existing directory (node.ts
 *               setBitmapsInUse), not by QEMU's clear-bit-0 / rewrite / set-bit-0 sequence, whose
 *               middle would leave the bitmaps extension ignored (all bitmaps lost) after a power
 *               cut: a flags field never straddles a sector, so every cut leaves each bitmap
 *               either not in use or in use and covered.
 *   write       before any write, write-zeroes or discard is performed (and so before it is
 *               acknowledged), each region it touches is dirty on disk (mark()). Regions already
 *               dirty cost nothing; new ones are set in memory and one durable write of the record
 *               (FUA: pwritev2 RWF_DSYNC in the file driver, which, unlike fdatasync, does not write
 *               back the guest data cached so far) makes all of them durable: concurrent first
 *               writes to clean regions share it. A sequential writer gets the next regions marked
 *               ahead, in the background (block/write-intent.ts markAhead): more marked than
 *               written, so still a superset, bounded by what the stream already wrote.
 *   store       (close) copy-on-write as QEMU: new data clusters, tables and directory, flushed, then
 *               one header write switches to them (in_use cleared), then the old clusters are freed;
 *               a cut leaves the old directory (in use, covered) or the new one (not in use), at
 *               worst with leaked clusters.
 *   clearing    lazy: a region goes clean on disk only when the bitmaps' stored state covers it,
 *               i.e. when the bitmaps are stored (in_use cleared) at close, after the data was
 *               flushed; the next activation starts from a clean record. Until then a region once
 *               dirty stays dirty, so each region costs one metadata write per session at most.
 * The result after a crash is a superset of the true changes since each bitmap's last clear: its
 * stored bits hold everything up to the session's open, and every write since then was inside a
 * region made durable before the write reached the disk.
 */
import { MAX_REGION_BITMAP_BYTES, regionLayout, type WriteIntentBits, type WriteIntentLayout } from '../../write-intent.js';

export const EXT_WRITE_INTENT = 0x62697477; // 'bitw'
/** Autoclear bit 48: any writer that does not know it clears it (formats.md, autoclear features). */
export const AUTOCLEAR_WRITE_INTENT = 1n << 48n;

const VERSION = 1;
const FIXED_BYTES = 16;
/** Room left in the first cluster for what QEMU may write there beyond our own serialisation. */
export const HEADER_SLACK = 512;
/** More covered bitmaps than this: no record (their table offsets would crowd the first cluster). */
const MAX_COVERED = 64;

/** The extension's data decoded; `bits` is a view into it. */
export interface DecodedWriteIntent extends WriteIntentBits {
  covered: number[];
}

/** The extension's data, or undefined when it is not a record we wrote (wrong version or sizes). */
export function decodeWriteIntent(data: Buffer): DecodedWriteIntent | undefined {
  if (data.length < FIXED_BYTES || data.readUInt32BE(0) !== VERSION) return undefined;
  const regionBits = data.readUInt32BE(4);
  const nbRegions = data.readUInt32BE(8);
  const nbCovered = data.readUInt32BE(12);
  if (regionBits < 9 || regionBits > 62 || nbRegions < 1 || nbCovered > MAX_COVERED) return undefined;
  const bitsAt = FIXED_BYTES + 8 * nbCovered;
  if (data.length !== bitsAt + Math.ceil(nbRegions / 8)) return undefined;
  const covered: number[] = [];
  for (let i = 0; i < nbCovered; i++) covered.push(Number(data.readBigUInt64BE(FIXED_BYTES + 8 * i)));
  return { regionBits, nbRegions, covered, bits: data.subarray(bitsAt) };
}

/** A new record's data: `layout`, `covered`, and the region bits `bits` (all clean if omitted). */
export function encodeWriteIntent(layout: WriteIntentLayout, covered: number[], bits?: Buffer): Buffer {
  const bitsAt = FIXED_BYTES + 8 * covered.length;
  const data = Buffer.alloc(bitsAt + Math.ceil(layout.nbRegions / 8));
  data.writeUInt32BE(VERSION, 0);
  data.writeUInt32BE(layout.regionBits, 4);
  data.writeUInt32BE(layout.nbRegions, 8);
  data.writeUInt32BE(covered.length, 12);
  covered.forEach((off, i) => data.writeBigUInt64BE(BigInt(off), FIXED_BYTES + 8 * i));
  if (bits) bits.copy(data, bitsAt, 0, Math.min(bits.length, data.length - bitsAt));
  return data;
}

/**
 * The region layout for a disk of `virtualSize` bytes when the extension's data may take `roomBytes`
 * (already net of the extension's own 8-byte header), or undefined when it does not fit.
 */
export function chooseWriteIntentLayout(virtualSize: number, roomBytes: number, nbCovered: number): WriteIntentLayout | undefined {
  if (nbCovered > MAX_COVERED) return undefined;
  const bitmapBytes = Math.min(MAX_REGION_BITMAP_BYTES, Math.floor((roomBytes - FIXED_BYTES - 8 * nbCovered) / 8) * 8);
  if (bitmapBytes < 8) return undefined;
  return regionLayout(virtualSize, bitmapBytes);
}

