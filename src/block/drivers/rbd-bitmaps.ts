/**
 * Persistent dirty bitmaps of an RBD image, kept in the cluster beside the image: in the image's
 * metadata (rbd_metadata_set: key/value pairs in the omap of the image's header object). Chosen over
 * an object of our own because metadata goes wherever the image goes — `rbd rm` removes it with the
 * image, `rbd cp`/`deep cp`/`migration` carry it, `rbd image-meta list` shows it, and no other object
 * needs naming, cleaning or permissions — and because each metadata set is one atomic, durable
 * update of one key, which is all the crash protocol below needs.
 *
 * Keys (the `__org.bitmirror.` prefix keeps them apart from librbd's own `conf_` keys; names are
 * percent-encoded, so any bitmap name makes a valid key):
 *   __org.bitmirror.bitmap:NAME              JSON {granularity, auto, inUse, gen, chunks, bytes, seq}:
 *                                            the directory entry, one atomic key per bitmap
 *   __org.bitmirror.bitmap-data:NAME:GEN:I   base64 of chunk I (48 KiB of bits) of generation GEN
 *   __org.bitmirror.write-intent             JSON {v: 1, regionBits, nbRegions, covered: [[name, gen]…],
 *                                            bits: base64}: the write-intent record
 *
 * The semantics are qcow2's (bitmap/persistence.ts, qcow2/node.ts): bitmaps load at open, those in
 * use when their last writer stopped load inconsistent, a read-write open marks them in use once the
 * open has succeeded (activate), close stores them with in use cleared, a removed bitmap leaves the
 * image at once. Storing writes a bitmap's new generation of chunks first and its directory entry
 * last (the one atomic switch), then drops the old generation: a crash at any point leaves either
 * generation whole, and leftover chunks of a generation no entry names are dropped at the next store.
 *
 * Crash guarantees are qcow2's write-intent design (block/write-intent.ts, shared by every bitmap
 * store): before a bitmap is marked in use, a record covering it (name and generation) is
 * durable; before any write, write-zeroes or discard is performed, the regions it touches are marked
 * in the record and that metadata update is acknowledged by the cluster. At open, a bitmap still in
 * use that the record covers comes back as its stored bits ∪ the marked regions — a superset of
 * every write since its last clear — instead of inconsistent.
 *
 * Limitation: only writes made through bitmirror are seen. Another client writing the image while
 * bitmirror does not have it open (QEMU's rbd driver, krbd) changes nothing here, as no other
 * program knows these bitmaps.
 */
import { genericError } from '../../errors.js';
import type { LoadedDirtyBitmap } from '../bitmap-store.js';
import { markedRanges, regionLayout, setSerializedBits, WriteIntentRecord, MAX_REGION_BITMAP_BYTES, type WriteIntentBits } from '../write-intent.js';

/** What the store needs of the image: its metadata, asynchronously (librbd's calls on the thread pool). */
export interface ImageMetadata {
  get(key: string): Promise<string | undefined>;
  set(key: string, value: string): Promise<void>;
  remove(key: string): Promise<void>;
  list(): Promise<Record<string, string>>;
}

const DIR = '__org.bitmirror.bitmap:';
const DATA = '__org.bitmirror.bitmap-data:';
const INTENT = '__org.bitmirror.write-intent';
/** Raw bytes of bitmap per metadata value (64 KiB of base64). */
const CHUNK = 48 * 1024;
/** As qcow2's limits: at most this many bitmaps, names up to 1023 bytes, granularity 512 B..2 GiB. */
const MAX_BITMAPS = 65535;
/** A bitmap's bits may take at most this much (qcow2's BME_MAX_PHYS_SIZE). */
const MAX_BITMAP_BYTES = 512 * 1024 * 1024;

interface DirEntry {
  granularity: number;
  auto: boolean;
  inUse: boolean;
  gen: number;
  chunks: number;
  bytes: number;
  /** Storage order (qcow2's directory order). */
  seq: number;
}

interface StoredBitmap extends DirEntry {
  name: string;
}

export interface RbdBitmapToStore {
  name: string;
  granularity: number;
  auto: boolean;
  data: Buffer;
}

const enc = (name: string): string => encodeURIComponent(name);

function parseEntry(name: string, json: string): StoredBitmap | undefined {
  try {
    const e = JSON.parse(json) as DirEntry;
    if (![e.granularity, e.gen, e.chunks, e.bytes, e.seq].every(Number.isSafeInteger) || typeof e.inUse !== 'boolean') return undefined;
    return { name, ...e };
  } catch {
    return undefined;
  }
}

interface IntentJson {
  v: number;
  regionBits: number;
  nbRegions: number;
  covered: Array<[string, number]>;
  bits: string;
}

function parseIntent(json: string | undefined): (WriteIntentBits & { coveredNames: Array<[string, number]> }) | undefined {
  if (!json) return undefined;
  try {
    const r = JSON.parse(json) as IntentJson;
    const bits = Buffer.from(r.bits, 'base64');
    if (r.v !== 1 || !(r.regionBits >= 9 && r.regionBits <= 62) || !(r.nbRegions >= 1) || bits.length !== Math.ceil(r.nbRegions / 8)) return undefined;
    return { regionBits: r.regionBits, nbRegions: r.nbRegions, coveredNames: r.covered, bits };
  } catch {
    return undefined;
  }
}

export class RbdBitmapStore {
  /** Bitmaps handed to the bitmap layer at open, marked in use by activate(). */
  private loaded: StoredBitmap[] = [];
  /** Some bitmap came back from the record: its regions must stay marked until it is stored. */
  private recoveredIntent?: ReturnType<typeof parseIntent>;
  private writeIntent?: WriteIntentRecord;
  /** The bitmaps the armed record covers (marked in use by activate, not stored since). */
  private readonly covered = new Set<string>();

  constructor(
    private readonly meta: ImageMetadata,
    private readonly nodeName: string,
    private readonly size: () => number,
  ) {}

  private async stored(): Promise<{ bitmaps: StoredBitmap[]; all: Record<string, string> }> {
    const all = await this.meta.list();
    const bitmaps: StoredBitmap[] = [];
    for (const [k, v] of Object.entries(all)) {
      if (!k.startsWith(DIR)) continue;
      const e = parseEntry(decodeURIComponent(k.slice(DIR.length)), v);
      if (e) bitmaps.push(e);
    }
    bitmaps.sort((a, b) => a.seq - b.seq);
    return { bitmaps, all };
  }

  private async readData(b: StoredBitmap, all: Record<string, string>): Promise<Buffer | undefined> {
    const parts: Buffer[] = [];
    for (let i = 0; i < b.chunks; i++) {
      const v = all[`${DATA}${enc(b.name)}:${b.gen}:${i}`];
      if (v === undefined) return undefined;
      parts.push(Buffer.from(v, 'base64'));
    }
    const data = Buffer.concat(parts);
    return data.length === b.bytes ? data : undefined;
  }

  /** PersistentBitmapStore.canStoreNewDirtyBitmap with qcow2's limits and QEMU's wording. */
  canStoreNewDirtyBitmap(name: string, granularity: number, persistentNames: string[] = []): void {
    if (persistentNames.includes(name)) throw genericError(`Bitmap already exists: ${name}`);
    const fail = (msg: string): never => {
      throw genericError(`Can't make bitmap '${name}' persistent in '${this.nodeName}': ${msg}`);
    };
    const gbits = Math.log2(granularity);
    if (gbits > 31) fail('Granularity exceeds maximum (2147483648 bytes)');
    if (gbits < 9) fail('Granularity is under minimum (512 bytes)');
    if (Math.ceil(this.size() / granularity / 8) > MAX_BITMAP_BYTES) fail('Too much space will be occupied by the bitmap. Use larger granularity');
    if (Buffer.byteLength(name) > 1023) fail('Name length exceeds maximum (1023 characters)');
    if (persistentNames.length + 1 > MAX_BITMAPS) fail('Maximum number of persistent bitmaps is already reached');
  }

  /** The stored bitmaps; in-use ones recovered from the write-intent record when it covers them. Only reads. */
  async load(): Promise<LoadedDirtyBitmap[]> {
    const { bitmaps, all } = await this.stored();
    const intent = parseIntent(all[INTENT]);
    const covers = (b: StoredBitmap) => intent?.coveredNames.some(([n, g]) => n === b.name && g === b.gen) ?? false;
    const expectBytes = (g: number) => Math.ceil(Math.ceil(this.size() / g) / 8);
    const out: LoadedDirtyBitmap[] = [];
    this.loaded = [];
    this.recoveredIntent = undefined;
    for (const b of bitmaps) {
      const inconsistent = (): void => void out.push({ name: b.name, granularity: b.granularity, enabled: false, inconsistent: true });
      if (b.inUse && !covers(b)) {
        inconsistent();
        continue;
      }
      const data = await this.readData(b, all);
      // Missing chunks or a size another program changed: the bits cannot be trusted.
      if (!data || data.length !== expectBytes(b.granularity)) {
        inconsistent();
        continue;
      }
      if (b.inUse && intent) {
        const ranges = markedRanges(intent, this.size());
        for (const [start, bytes] of ranges) setSerializedBits(data, start, bytes, b.granularity);
        out.push({ name: b.name, granularity: b.granularity, enabled: b.auto, inconsistent: false, data, recovered: { regions: ranges.length, regionSize: 2 ** intent.regionBits } });
        this.recoveredIntent = intent;
      } else {
        out.push({ name: b.name, granularity: b.granularity, enabled: b.auto, inconsistent: false, data });
      }
      this.loaded.push(b);
    }
    return out;
  }

  /**
   * The write phase of a read-write open: a durable record covering the loaded bitmaps (their marked
   * regions kept when one was recovered), then the bitmaps marked in use.
   */
  async activate(): Promise<void> {
    if (!this.loaded.length) return;
    const covered: Array<[string, number]> = this.loaded.map((b) => [b.name, b.gen]);
    const old = this.recoveredIntent;
    const layout = old ?? regionLayout(this.size(), MAX_REGION_BITMAP_BYTES);
    const bits = Buffer.alloc(Math.ceil(layout.nbRegions / 8));
    if (old) old.bits.copy(bits);
    const persist = (): Promise<void> =>
      this.meta.set(INTENT, JSON.stringify({ v: 1, regionBits: layout.regionBits, nbRegions: layout.nbRegions, covered, bits: bits.toString('base64') } satisfies IntentJson));
    await persist();
    this.writeIntent = new WriteIntentRecord(layout, bits, persist);
    for (const b of this.loaded) {
      await this.meta.set(DIR + enc(b.name), JSON.stringify({ ...this.entry(b), inUse: true }));
      this.covered.add(b.name);
    }
    this.loaded = [];
  }

  private entry(b: StoredBitmap): DirEntry {
    return { granularity: b.granularity, auto: b.auto, inUse: b.inUse, gen: b.gen, chunks: b.chunks, bytes: b.bytes, seq: b.seq };
  }

  /** Before a write to [offset, offset+bytes) is performed, its regions are durably marked (or undefined: nothing to wait for). */
  markWriteIntent(offset: number, bytes: number): Promise<void> | undefined {
    return this.writeIntent?.mark(offset, bytes);
  }

  /**
   * Store `list` with in use cleared; stored bitmaps not in it (inconsistent ones) are kept as they
   * are. Per bitmap: the new generation's chunks, then its entry (the atomic switch), then the old
   * chunks go. Leftover chunks no entry names (a crash mid-store) are dropped too.
   */
  async store(list: RbdBitmapToStore[]): Promise<void> {
    const { bitmaps, all } = await this.stored();
    const byName = new Map(bitmaps.map((b) => [b.name, b]));
    let nextSeq = bitmaps.reduce((m, b) => Math.max(m, b.seq + 1), 0);
    const live = new Set<string>();
    for (const b of bitmaps) if (!list.some((x) => x.name === b.name)) live.add(`${DATA}${enc(b.name)}:${b.gen}:`);
    for (const x of list) {
      const old = byName.get(x.name);
      const gen = (old?.gen ?? 0) + 1;
      const chunks = Math.ceil(x.data.length / CHUNK);
      for (let i = 0; i < chunks; i++) {
        await this.meta.set(`${DATA}${enc(x.name)}:${gen}:${i}`, x.data.subarray(i * CHUNK, (i + 1) * CHUNK).toString('base64'));
      }
      const entry: DirEntry = { granularity: x.granularity, auto: x.auto, inUse: false, gen, chunks, bytes: x.data.length, seq: old?.seq ?? nextSeq++ };
      await this.meta.set(DIR + enc(x.name), JSON.stringify(entry));
      live.add(`${DATA}${enc(x.name)}:${gen}:`);
    }
    for (const k of Object.keys(all)) {
      if (!k.startsWith(DATA)) continue;
      const prefix = k.slice(0, k.lastIndexOf(':') + 1);
      if (!live.has(prefix)) await this.meta.remove(k);
    }
    // Every bitmap the record covered is stored now: its regions are in their bits. The next
    // activation writes a fresh record.
    for (const x of list) this.covered.delete(x.name);
    if (!this.covered.size) {
      this.writeIntent = undefined;
      this.recoveredIntent = undefined;
      if (all[INTENT] !== undefined) await this.meta.remove(INTENT);
    }
  }

  /** Drop `name` and its chunks from the image (block-dirty-bitmap-remove of a persistent bitmap). */
  async remove(name: string): Promise<void> {
    const all = await this.meta.list();
    if (all[DIR + enc(name)] === undefined) return;
    await this.meta.remove(DIR + enc(name));
    this.covered.delete(name);
    const prefix = `${DATA}${enc(name)}:`;
    for (const k of Object.keys(all)) if (k.startsWith(prefix)) await this.meta.remove(k);
  }

  /** Names of the bitmaps stored in the image (for the resize check). */
  async storedNames(): Promise<string[]> {
    return (await this.stored()).bitmaps.map((b) => b.name);
  }

  /**
   * The node became writable again (blockdev-reopen): the bitmaps it stored when it went read-only
   * are in memory; cover them by a new record and mark them in use again, as at activation.
   */
  async rearm(): Promise<void> {
    this.loaded = (await this.stored()).bitmaps.filter((b) => !b.inUse);
    this.recoveredIntent = undefined;
    await this.activate();
  }
}
