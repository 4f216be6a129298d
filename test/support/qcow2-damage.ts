/**
 * Seeded damage for qcow2 images (the damaged-image tests): find where the metadata fields of an image
 * lie (header, L1/L2 entries, refcount table and blocks, bitmaps extension, directory and tables), and
 * damage one of them the way a bad disk, a bad tool or an attacker would (flipped bits, or a value
 * that is known to be interesting: zero, all ones, past the end of the file, misaligned).
 */
import { createHash } from 'node:crypto';

/** One metadata field of an image: `bytes` big-endian bytes at `offset`. */
export interface Field {
  what: string;
  offset: number;
  bytes: 1 | 2 | 4 | 8;
}

const EXT_BITMAPS = 0x23852875;

export function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** The bitmaps extension, directory entries and bitmap table entries of an image. */
export function bitmapFields(img: Buffer): Field[] {
  const out: Field[] = [];
  const cs = 2 ** img.readUInt32BE(20);
  let off = img.readUInt32BE(4) === 3 ? img.readUInt32BE(100) : 72;
  let ext: number | undefined;
  while (off + 8 <= cs) {
    const type = img.readUInt32BE(off);
    const len = img.readUInt32BE(off + 4);
    if (type === 0) break;
    if (type === EXT_BITMAPS) ext = off;
    off += 8 + Math.ceil(len / 8) * 8;
  }
  if (ext === undefined) return out;
  out.push(
    { what: 'bitmaps extension length', offset: ext + 4, bytes: 4 },
    { what: 'bitmaps extension nb_bitmaps', offset: ext + 8, bytes: 4 },
    { what: 'bitmaps extension reserved', offset: ext + 12, bytes: 4 },
    { what: 'bitmap directory size', offset: ext + 16, bytes: 8 },
    { what: 'bitmap directory offset', offset: ext + 24, bytes: 8 },
  );
  const nb = img.readUInt32BE(ext + 8);
  const dirSize = Number(img.readBigUInt64BE(ext + 16));
  const dirOff = Number(img.readBigUInt64BE(ext + 24));
  let e = dirOff;
  for (let i = 0; i < nb && e + 24 <= dirOff + dirSize; i++) {
    const tableOff = Number(img.readBigUInt64BE(e));
    const tableSize = img.readUInt32BE(e + 8);
    const nameSize = img.readUInt16BE(e + 18);
    const p = `bitmap ${i} `;
    out.push(
      { what: p + 'table offset', offset: e, bytes: 8 },
      { what: p + 'table size', offset: e + 8, bytes: 4 },
      { what: p + 'flags', offset: e + 12, bytes: 4 },
      { what: p + 'type', offset: e + 16, bytes: 1 },
      { what: p + 'granularity bits', offset: e + 17, bytes: 1 },
      { what: p + 'name size', offset: e + 18, bytes: 2 },
      { what: p + 'extra data size', offset: e + 20, bytes: 4 },
      { what: p + 'name', offset: e + 24, bytes: 1 },
    );
    for (let k = 0; k < tableSize && tableOff + (k + 1) * 8 <= img.length; k++) out.push({ what: p + `table entry ${k}`, offset: tableOff + k * 8, bytes: 8 });
    e += Math.ceil((24 + nameSize) / 8) * 8;
  }
  return out;
}

/** Header fields, L1 and L2 entries, refcount table entries and refcount block entries in use. */
export function mappingFields(img: Buffer): Field[] {
  const cs = 2 ** img.readUInt32BE(20);
  const out: Field[] = [
    { what: 'header version', offset: 4, bytes: 4 },
    { what: 'header backing file offset', offset: 8, bytes: 8 },
    { what: 'header cluster bits', offset: 20, bytes: 4 },
    { what: 'header size', offset: 24, bytes: 8 },
    { what: 'header l1 size', offset: 36, bytes: 4 },
    { what: 'header l1 table offset', offset: 40, bytes: 8 },
    { what: 'header refcount table offset', offset: 48, bytes: 8 },
    { what: 'header refcount table clusters', offset: 56, bytes: 4 },
    { what: 'header nb snapshots', offset: 60, bytes: 4 },
    { what: 'header incompatible features', offset: 72, bytes: 8 },
    { what: 'header compatible features', offset: 80, bytes: 8 },
    { what: 'header autoclear features', offset: 88, bytes: 8 },
    { what: 'header refcount order', offset: 96, bytes: 4 },
    { what: 'header length', offset: 100, bytes: 4 },
  ];
  const l1Size = img.readUInt32BE(36);
  const l1Off = Number(img.readBigUInt64BE(40));
  for (let i = 0; i < l1Size && l1Off + (i + 1) * 8 <= img.length; i++) {
    out.push({ what: `L1 entry ${i}`, offset: l1Off + i * 8, bytes: 8 });
    const l2 = Number(img.readBigUInt64BE(l1Off + i * 8) & 0x00fffffffffffe00n);
    if (!l2 || l2 + cs > img.length) continue;
    for (let j = 0; j < cs / 8; j++) {
      if (img.readBigUInt64BE(l2 + j * 8) !== 0n) out.push({ what: `L2 table ${i} entry ${j}`, offset: l2 + j * 8, bytes: 8 });
    }
  }
  const rtOff = Number(img.readBigUInt64BE(48));
  const rtClusters = img.readUInt32BE(56);
  const refBytes = 2 ** img.readUInt32BE(96) / 8;
  for (let i = 0; i < (rtClusters * cs) / 8 && rtOff + (i + 1) * 8 <= img.length; i++) {
    const rb = Number(img.readBigUInt64BE(rtOff + i * 8));
    if (!rb) continue;
    out.push({ what: `refcount table entry ${i}`, offset: rtOff + i * 8, bytes: 8 });
    if (rb + cs > img.length || refBytes < 1) continue;
    const w = refBytes as 1 | 2 | 4 | 8;
    for (let j = 0; j < cs / w; j++) {
      const v = w === 8 ? img.readBigUInt64BE(rb + j * 8) : BigInt(img.readUIntBE(rb + j * w, w));
      if (v !== 0n) out.push({ what: `refcount block ${i} entry ${j}`, offset: rb + j * w, bytes: w });
    }
  }
  return out;
}

/**
 * Damage `field` in place: flip one to three random bits, or store an interesting value. Returns a
 * description of what was done (for the failure message).
 */
export function damage(img: Buffer, field: Field, rand: () => number): string {
  const cs = 2 ** Math.min(21, Math.max(9, img.readUInt32BE(20)));
  const bits = field.bytes * 8;
  const read = (): bigint => (field.bytes === 8 ? img.readBigUInt64BE(field.offset) : BigInt(img.readUIntBE(field.offset, field.bytes)));
  const write = (v: bigint): void => {
    const m = v & ((1n << BigInt(bits)) - 1n);
    if (field.bytes === 8) img.writeBigUInt64BE(m, field.offset);
    else img.writeUIntBE(Number(m), field.offset, field.bytes);
  };
  const old = read();
  const pick = Math.floor(rand() * 10);
  let v: bigint;
  if (pick < 5) {
    v = old;
    const flips = 1 + Math.floor(rand() * 3);
    for (let i = 0; i < flips; i++) v ^= 1n << BigInt(Math.floor(rand() * bits));
  } else {
    const end = BigInt(img.length);
    const keepFlags = field.bytes === 8 ? old & 0xff000000000001ffn : 0n;
    const interesting = [0n, 1n, (1n << BigInt(bits)) - 1n, keepFlags | (end + BigInt(cs) * 16n), keepFlags | end, keepFlags | ((old & 0x00fffffffffffe00n) + 512n), old + 1n, old - 1n];
    v = interesting[Math.floor(rand() * interesting.length)];
  }
  write(v);
  return `${field.what} @${field.offset}: 0x${old.toString(16)} -> 0x${read().toString(16)}`;
}
