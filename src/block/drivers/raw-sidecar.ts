/**
 * Persistent dirty bitmaps for raw images (issue 14, item 4), kept in a sidecar file beside the image
 * and given to the raw node as a child: `"__org.bitmirror_bitmaps": {"driver": "file", "filename":
 * "disk.raw.bitmaps"}` (an empty file starts with no bitmaps). With it, a raw node is a
 * PersistentBitmapStore as qcow2 is: persistent bitmaps are added, removed, merged and stored at close
 * with the same semantics, and survive a crash through the same write-intent tracking
 * (block/write-intent.ts). Without it raw has no persistent bitmaps, as in QEMU.
 *
 * Layout (big-endian). Sector 0, the header (always written whole, one 512-byte write, so a power cut
 * leaves the old or the new one):
 *   0  magic "BMSIDECR"        8  u32 version (1)      12 u32 state (0 clean, 1 in use)
 *   16 u8[16] sidecar uuid     32 u64 image inode      40 u64 image size (the raw node's)
 *   48 u64 image mtime (ns) at the last clean store    56 u32 region_bits  60 u32 nb_regions
 *   64 u64 slot offset  72 u64 slot length  80 u32 nb_bitmaps  84 u32 0  88 u8[32] sha256 of the slot
 * [512, 4608): the write-intent region bitmap (bit i = byte i/8, LSB first).
 * From 8192: slots. A slot holds the stored bitmaps, one entry each: u16 name length, u8 granularity
 * bits, u8 flags (1 auto, 2 inconsistent), u32 0, u64 data length, the name, the serialised bits.
 * A store writes a new slot where the current one is not, flushes, then switches the header to it.
 *
 * Binding. The header names the image it belongs to: its inode and size. A sidecar whose inode or
 * size differ is refused (the open fails, saying so): it was copied beside another image, or the
 * image was copied (cp makes a new inode) or resized by someone else. mv within a file system keeps
 * the inode, and so the bitmaps. The device number is not part of it: device-mapper numbers can
 * change across reboots, exactly when a crash must be recovered from. The image's mtime at the last
 * clean store (after an fsync, so it is durable) tells whether another program wrote the image since:
 * the bitmaps then load inconsistent, as qcow2's after QEMU wrote the image. After a crash (state in
 * use) the mtime cannot tell bitmirror's own last writes from another program's: raw has no place
 * for a mark such as qcow2's autoclear bit, so a write by another program between a crash and the
 * next open goes unseen (README).
 *
 * Protocol (the same guarantees as qcow2's, write-intent.ts there):
 *   load      clean: the stored bits (inconsistent if the mtime moved); in use: stored bits ∪ marked
 *             regions (recovered). Entries flagged inconsistent stay so.
 *   activate  if there are consistent bitmaps and the header is clean: the region bitmap is zeroed
 *             and flushed if it is not zero, then the header says in use (flushed). From then on
 *             every moment the header says in use, the region bitmap covers every write since the
 *             stored bits. A recovered sidecar stays in use, its regions kept.
 *   write     before a write is performed, its regions are durable in the region bitmap (one write
 *             of the region bitmap + flush of the sidecar, shared by concurrent first writes; the
 *             image's cached data is not written back by it).
 *   store     the image flushed, fsynced and its mtime read; the new slot written and flushed; the
 *             header switched to it, clean (flushed); the region bitmap zeroed (a cut before that
 *             leaves stale regions, which only make a later recovery coarser).
 *   remove    (block-dirty-bitmap-remove) a new slot without the bitmap, the header keeping its state.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { genericError } from '../../errors.js';
import { qemuStringBytes, qemuStringFromBytes } from '../../base/qemu-string.js';
import type { BdrvChild, BlockNode } from '../node.js';
import { defaultChildPermissions, type Permissions } from '../permissions.js';
import type { LoadedDirtyBitmap, PersistentBitmapStore } from '../bitmap-store.js';
import { markedRanges, MAX_REGION_BITMAP_BYTES, regionLayout, setSerializedBits, WriteIntentRecord, type WriteIntentLayout } from '../write-intent.js';
import { RawNode } from './raw.js';

const MAGIC = Buffer.from('BMSIDECR');
const VERSION = 1;
const HEADER_BYTES = 512;
const BITS_AT = 512;
const SLOT_START = 8192;
const SLOT_ALIGN = 4096;
const STATE_CLEAN = 0;
const STATE_IN_USE = 1;
const FLAG_AUTO = 1;
const FLAG_INCONSISTENT = 2;

interface SidecarHeader {
  state: number;
  uuid: Buffer;
  inode: bigint;
  size: number;
  mtimeNs: bigint;
  layout: WriteIntentLayout;
  slotOffset: number;
  slotLength: number;
  nbBitmaps: number;
  slotSha: Buffer;
}

interface SidecarEntry {
  name: string;
  granularityBits: number;
  flags: number;
  data: Buffer;
}

function encodeHeader(h: SidecarHeader): Buffer {
  const b = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(b, 0);
  b.writeUInt32BE(VERSION, 8);
  b.writeUInt32BE(h.state, 12);
  h.uuid.copy(b, 16);
  b.writeBigUInt64BE(h.inode, 32);
  b.writeBigUInt64BE(BigInt(h.size), 40);
  b.writeBigUInt64BE(h.mtimeNs, 48);
  b.writeUInt32BE(h.layout.regionBits, 56);
  b.writeUInt32BE(h.layout.nbRegions, 60);
  b.writeBigUInt64BE(BigInt(h.slotOffset), 64);
  b.writeBigUInt64BE(BigInt(h.slotLength), 72);
  b.writeUInt32BE(h.nbBitmaps, 80);
  h.slotSha.copy(b, 88);
  return b;
}

function decodeHeader(b: Buffer, what: string): SidecarHeader {
  if (b.length < HEADER_BYTES || !b.subarray(0, 8).equals(MAGIC)) throw genericError(`${what} is not a bitmirror bitmap sidecar`);
  if (b.readUInt32BE(8) !== VERSION) throw genericError(`${what}: unsupported bitmap sidecar version ${b.readUInt32BE(8)}`);
  const h: SidecarHeader = {
    state: b.readUInt32BE(12),
    uuid: Buffer.from(b.subarray(16, 32)),
    inode: b.readBigUInt64BE(32),
    size: Number(b.readBigUInt64BE(40)),
    mtimeNs: b.readBigUInt64BE(48),
    layout: { regionBits: b.readUInt32BE(56), nbRegions: b.readUInt32BE(60) },
    slotOffset: Number(b.readBigUInt64BE(64)),
    slotLength: Number(b.readBigUInt64BE(72)),
    nbBitmaps: b.readUInt32BE(80),
    slotSha: Buffer.from(b.subarray(88, 120)),
  };
  const layoutOk = h.layout.regionBits >= 9 && h.layout.regionBits <= 62 && h.layout.nbRegions >= 1 && h.layout.nbRegions <= MAX_REGION_BITMAP_BYTES * 8;
  if ((h.state !== STATE_CLEAN && h.state !== STATE_IN_USE) || (h.state === STATE_IN_USE && !layoutOk) || (h.nbBitmaps && h.slotOffset < SLOT_START)) {
    throw genericError(`${what} is damaged (invalid header)`);
  }
  return h;
}

function encodeSlot(entries: SidecarEntry[]): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const name = qemuStringBytes(e.name);
    const fixed = Buffer.alloc(16);
    fixed.writeUInt16BE(name.length, 0);
    fixed[2] = e.granularityBits;
    fixed[3] = e.flags;
    fixed.writeBigUInt64BE(BigInt(e.data.length), 8);
    parts.push(fixed, name, e.data);
  }
  return Buffer.concat(parts);
}

function decodeSlot(slot: Buffer, nb: number, what: string): SidecarEntry[] {
  const out: SidecarEntry[] = [];
  let off = 0;
  for (let i = 0; i < nb; i++) {
    if (off + 16 > slot.length) throw genericError(`${what} is damaged (truncated bitmap entry)`);
    const nameLen = slot.readUInt16BE(off);
    const dataLen = Number(slot.readBigUInt64BE(off + 8));
    const end = off + 16 + nameLen + dataLen;
    if (end > slot.length) throw genericError(`${what} is damaged (truncated bitmap entry)`);
    out.push({
      name: qemuStringFromBytes(slot.subarray(off + 16, off + 16 + nameLen)),
      granularityBits: slot[off + 2],
      flags: slot[off + 3],
      data: Buffer.from(slot.subarray(off + 16 + nameLen, end)),
    });
    off = end;
  }
  if (off !== slot.length) throw genericError(`${what} is damaged (bitmap entries do not fill their slot)`);
  return out;
}

const sha256 = (b: Buffer): Buffer => createHash('sha256').update(b).digest();
const alignUp = (n: number, a: number): number => Math.ceil(n / a) * a;

/** Bytes of a bitmap of `granularity` over `size` bytes, serialised (as qcow2 stores it). */
function serializedBytes(size: number, granularity: number): number {
  return Math.ceil(Math.ceil(size / granularity) / 8);
}

/** What the open found in the sidecar (reads only), handed to the node. */
interface SidecarState {
  header?: SidecarHeader;
  entries: SidecarEntry[];
  imageInode: bigint;
  imageMtimeNs: bigint;
  /** The region bitmap as on disk (in use: its marked regions; clean: whatever a cut left there). */
  regionBits: Buffer;
}

/**
 * Read and check the sidecar `sidecar` of the image in file `imageFilename` whose disk has `diskSize`
 * bytes: its binding (refused with a clear message when it belongs to another image), its slot.
 */
async function readSidecar(sidecar: BlockNode, imageFilename: string, diskSize: number): Promise<SidecarState> {
  const what = `Bitmap sidecar '${sidecar.imageInfo().filename}'`;
  const st = await fsp.stat(imageFilename, { bigint: true }).catch(() => undefined);
  if (!st?.isFile()) throw genericError(`${what}: the image '${imageFilename}' must be a regular file`);
  const state: SidecarState = { entries: [], imageInode: st.ino, imageMtimeNs: st.mtimeNs, regionBits: Buffer.alloc(0) };
  if (sidecar.length() === 0) return state;
  const h = decodeHeader(await sidecar.read(0, Math.min(HEADER_BYTES, sidecar.length())), what);
  if (h.inode !== st.ino || h.size !== diskSize) {
    throw genericError(
      `${what} does not belong to '${imageFilename}': it was written for a disk of ${h.size} bytes in inode ${h.inode}, ` +
        `this one has ${diskSize} bytes in inode ${st.ino} (a copy, another image, or resized elsewhere); remove the sidecar (its bitmaps are lost) or give the right one`,
    );
  }
  if (h.nbBitmaps) {
    if (h.slotOffset + h.slotLength > sidecar.length()) throw genericError(`${what} is damaged (its bitmaps lie past its end)`);
    const slot = await sidecar.read(h.slotOffset, h.slotLength);
    if (!sha256(slot).equals(h.slotSha)) throw genericError(`${what} is damaged (checksum mismatch)`);
    state.entries = decodeSlot(slot, h.nbBitmaps, what);
    for (const e of state.entries) {
      if (e.granularityBits < 9 || e.granularityBits > 31 || (!(e.flags & FLAG_INCONSISTENT) && e.data.length !== serializedBytes(diskSize, 2 ** e.granularityBits))) {
        throw genericError(`${what} is damaged (bitmap '${e.name}')`);
      }
    }
  }
  const n = h.state === STATE_IN_USE ? Math.ceil(h.layout.nbRegions / 8) : MAX_REGION_BITMAP_BYTES;
  if (sidecar.length() > BITS_AT) state.regionBits = await sidecar.read(BITS_AT, Math.min(n, sidecar.length() - BITS_AT));
  if (h.state === STATE_IN_USE && state.regionBits.length < n) throw genericError(`${what} is damaged (its region bitmap is cut short)`);
  state.header = h;
  return state;
}

/** Open a raw node (RawNode's arguments) whose persistent bitmaps live in the sidecar node `sidecar`. */
export async function openRawSidecarNode(nodeName: string, readOnly: boolean, file: BlockNode, offset: number, size: number | undefined, sidecar: BlockNode): Promise<RawSidecarNode> {
  const state = await readSidecar(sidecar, file.imageInfo().filename, size ?? file.length() - offset);
  return new RawSidecarNode(nodeName, readOnly, file, offset, size, sidecar, state);
}

/** A raw node whose persistent bitmaps live in a sidecar child (see the top of this file). */
export class RawSidecarNode extends RawNode implements PersistentBitmapStore {
  private header?: SidecarHeader;
  private entries: SidecarEntry[];
  /** The image's identity as found at open, then at each store (inode, mtime). */
  private imageInode: bigint;
  private imageMtimeNs: bigint;
  /** Some bitmap was handed to the bitmap layer consistent at load (activation arms the record for them). */
  private consistentLoaded = false;
  private regionBitsOnDisk: Buffer;
  private record?: WriteIntentRecord;
  /** Serialises the sidecar's writes (header, slots, region bitmap). */
  private writes: Promise<unknown> = Promise.resolve();

  constructor(nodeName: string, readOnly: boolean, file: BlockNode, offset: number, size: number | undefined, sidecar: BlockNode, state: SidecarState) {
    super(nodeName, readOnly, file, offset, size);
    this.attachChild('bitmaps', sidecar, 'image');
    this.header = state.header;
    this.entries = state.entries;
    this.imageInode = state.imageInode;
    this.imageMtimeNs = state.imageMtimeNs;
    this.regionBitsOnDisk = state.regionBits;
  }

  override childPermissions(child: BdrvChild, perm: number, shared: number, writable: boolean): Permissions {
    // The sidecar is metadata: written whenever the node is writable (raw's own rule is for its data).
    if (child.name === 'bitmaps') return defaultChildPermissions('image', writable, perm, shared);
    return super.childPermissions(child, perm, shared, writable);
  }

  /**
   * The sidecar is bound to one image (inode and size): the file and the window it covers stay as
   * opened. A bitmirror rule (QEMU has no sidecar): reopen refuses to move them, as before 'file',
   * 'offset' and 'size' became changeable for raw.
   */
  override reopenableOptions(): readonly string[] {
    return [];
  }
  override reopenCheck(options: Record<string, unknown>): void {
    if (typeof options.file === 'string' && options.file !== this.child('file')!.node.nodeName) throw genericError("Cannot change the option 'file'");
  }

  private get sidecar(): BlockNode {
    return this.child('bitmaps')!.node;
  }

  private get imageFilename(): string {
    return this.child('file')!.node.imageInfo().filename;
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.writes.then(fn, fn);
    this.writes = run.catch(() => undefined);
    return run;
  }

  // ---- PersistentBitmapStore -----------------------------------------------------------------------

  canStoreNewDirtyBitmap(name: string, granularity: number, persistentNames: string[] = []): void {
    if (persistentNames.includes(name) || this.entries.some((e) => e.name === name && e.flags & FLAG_INCONSISTENT)) throw genericError(`Bitmap already exists: ${name}`);
    const fail = (msg: string): never => {
      throw genericError(`Can't make bitmap '${name}' persistent in '${this.nodeName}': ${msg}`);
    };
    const gbits = Math.log2(granularity);
    if (gbits > 31) fail('Granularity exceeds maximum (2147483648 bytes)');
    if (gbits < 9) fail('Granularity is under minimum (512 bytes)');
    if (Buffer.byteLength(name) > 1023) fail('Name length exceeds maximum (1023 characters)');
    if (this.readOnly) fail('No write access');
  }

  async loadPersistentDirtyBitmaps(): Promise<LoadedDirtyBitmap[]> {
    const h = this.header;
    if (!h || !h.nbBitmaps) return [];
    // Clean but the image changed since (another program wrote it): nothing can be trusted.
    const foreign = h.state === STATE_CLEAN && h.mtimeNs !== this.imageMtimeNs;
    const recovered = h.state === STATE_IN_USE;
    const ranges = recovered ? markedRanges({ ...h.layout, bits: this.regionBitsOnDisk }, this.length()) : [];
    const out: LoadedDirtyBitmap[] = [];
    for (const e of this.entries) {
      const granularity = 2 ** e.granularityBits;
      if (foreign || e.flags & FLAG_INCONSISTENT) {
        out.push({ name: e.name, granularity, enabled: false, inconsistent: true });
        continue;
      }
      const data = Buffer.from(e.data);
      for (const [start, bytes] of ranges) setSerializedBits(data, start, bytes, granularity);
      out.push({ name: e.name, granularity, enabled: (e.flags & FLAG_AUTO) !== 0, inconsistent: false, data, ...(recovered ? { recovered: { regions: ranges.length, regionSize: 2 ** h.layout.regionBits } } : {}) });
    }
    if (foreign) for (const e of this.entries) e.flags |= FLAG_INCONSISTENT;
    this.consistentLoaded = out.some((b) => !b.inconsistent);
    if (this.activated && !this.readOnly) await this.arm();
    return out;
  }

  markWriteIntent(offset: number, bytes: number): Promise<void> | undefined {
    return this.record?.mark(offset, bytes);
  }

  async storePersistentDirtyBitmaps(list: Array<{ name: string; granularity: number; auto: boolean; data: Buffer }>): Promise<void> {
    if (!list.length && !this.entries.length) return;
    // As qcow2: entries already stored keep their place, new ones go to the end; stored ones not in
    // the list (inconsistent) are kept inconsistent, as qcow2 keeps them in_use.
    const byName = new Map(list.map((b) => [b.name, b]));
    const entries: SidecarEntry[] = [];
    for (const e of this.entries) {
      const b = byName.get(e.name);
      if (b) entries.push({ name: b.name, granularityBits: Math.log2(b.granularity), flags: b.auto ? FLAG_AUTO : 0, data: b.data });
      else entries.push({ ...e, flags: e.flags | FLAG_INCONSISTENT, data: Buffer.alloc(0) });
    }
    const stored = new Set(this.entries.map((e) => e.name));
    for (const b of list) if (!stored.has(b.name)) entries.push({ name: b.name, granularityBits: Math.log2(b.granularity), flags: b.auto ? FLAG_AUTO : 0, data: b.data });
    // The image's data durable and its mtime read only now: nothing writes it any more.
    await this.child('file')!.node.flush();
    const fh = await fsp.open(this.imageFilename, 'r');
    try {
      await fh.sync();
      const st = await fh.stat({ bigint: true });
      this.imageInode = st.ino;
      this.imageMtimeNs = st.mtimeNs;
    } finally {
      await fh.close();
    }
    this.record = undefined;
    await this.writeSlot(entries, STATE_CLEAN);
    await this.serial(async () => {
      if (this.regionBitsOnDisk.some((x) => x !== 0)) {
        await this.sidecar.write(BITS_AT, Buffer.alloc(this.regionBitsOnDisk.length));
        await this.sidecar.flush();
        this.regionBitsOnDisk = Buffer.alloc(0);
      }
    });
  }

  async removePersistentDirtyBitmap(name: string): Promise<void> {
    if (!this.entries.some((e) => e.name === name)) return;
    await this.writeSlot(
      this.entries.filter((e) => e.name !== name),
      this.header!.state,
    );
  }

  /**
   * Write `entries` into a new slot (where the current one is not), flush, then switch the header to
   * it with `state` and the image's identity, flush; space past the new slot is given back.
   */
  private writeSlot(entries: SidecarEntry[], state: number): Promise<void> {
    return this.serial(async () => {
      const old = this.header;
      const slot = encodeSlot(entries);
      let at = SLOT_START;
      if (old?.nbBitmaps && old.slotOffset === SLOT_START) at = alignUp(old.slotOffset + old.slotLength, SLOT_ALIGN);
      else if (old?.nbBitmaps && SLOT_START + slot.length > old.slotOffset) at = alignUp(old.slotOffset + old.slotLength, SLOT_ALIGN);
      if (entries.length) await this.sidecar.write(at, slot);
      const h: SidecarHeader = {
        state: entries.length ? state : STATE_CLEAN,
        uuid: old?.uuid ?? randomBytes(16),
        inode: this.imageInode,
        size: this.length(),
        mtimeNs: this.imageMtimeNs,
        layout: old?.layout ?? regionLayout(this.length(), MAX_REGION_BITMAP_BYTES),
        slotOffset: entries.length ? at : 0,
        slotLength: entries.length ? slot.length : 0,
        nbBitmaps: entries.length,
        slotSha: entries.length ? sha256(slot) : Buffer.alloc(32),
      };
      await this.sidecar.flush();
      await this.sidecar.write(0, encodeHeader(h));
      await this.sidecar.flush();
      this.header = h;
      this.entries = entries;
      // The old slot is free now; the file ends with the new one (or with the region bitmap).
      const end = entries.length ? at + slot.length : BITS_AT + MAX_REGION_BITMAP_BYTES;
      if (this.sidecar.length() > end && (!entries.length || at === SLOT_START)) await this.sidecar.truncate(end, false);
    });
  }

  // ---- activation -----------------------------------------------------------------------------

  protected override async doActivate(): Promise<void> {
    if (!this.readOnly) await this.arm();
  }

  override async reopenFinish(change: Parameters<RawNode['reopenFinish']>[0], wasReadOnly: boolean): Promise<void> {
    await super.reopenFinish(change, wasReadOnly);
    if (wasReadOnly && !this.readOnly) {
      this.consistentLoaded = this.entries.some((e) => !(e.flags & FLAG_INCONSISTENT));
      await this.arm();
    }
  }

  /** Arm write-intent tracking for the consistent stored bitmaps: the header says in use from now on. */
  private arm(): Promise<void> {
    return this.serial(async () => {
      const h = this.header;
      if (!h || !h.nbBitmaps || !this.consistentLoaded || this.record) return;
      let bits: Buffer;
      if (h.state === STATE_IN_USE) {
        // Recovered: the stored bits do not include the marked regions yet, so they stay marked.
        bits = Buffer.alloc(Math.ceil(h.layout.nbRegions / 8));
        this.regionBitsOnDisk.copy(bits);
      } else {
        const layout = regionLayout(this.length(), MAX_REGION_BITMAP_BYTES);
        bits = Buffer.alloc(Math.ceil(layout.nbRegions / 8));
        if (this.regionBitsOnDisk.some((x) => x !== 0)) {
          await this.sidecar.write(BITS_AT, Buffer.alloc(Math.max(bits.length, this.regionBitsOnDisk.length)));
          await this.sidecar.flush();
        }
        const next = { ...h, state: STATE_IN_USE, layout };
        await this.sidecar.write(0, encodeHeader(next));
        await this.sidecar.flush();
        this.header = next;
      }
      this.regionBitsOnDisk = bits;
      const layout = this.header!.layout;
      this.record = new WriteIntentRecord(layout, bits, () =>
        // FUA: this write durable, nothing else of the sidecar pending anyway.
        this.serial(() => this.sidecar.write(BITS_AT, Buffer.from(bits), { fua: true })),
      );
    });
  }

  /** A sidecar binds its bitmaps to the disk's size: resizing is refused while it holds any. */
  protected override async doTruncate(size: number, exact: boolean): Promise<void> {
    if (this.header?.nbBitmaps) throw genericError(`Cannot resize '${this.nodeName}': its persistent bitmaps are kept in a sidecar bound to the disk's size`);
    await super.doTruncate(size, exact);
  }
}
