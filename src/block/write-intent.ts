/**
 * Write-intent tracking for persistent dirty bitmaps (issue 14; the idea of Linux md's write-intent
 * bitmap), the part every store shares: the disk is cut into regions of 2^region_bits bytes, and
 * before a write to a region that is clean on disk is performed, the region is durably marked dirty
 * in the store's record; regions go clean only when the bitmaps are stored. After a crash, each
 * bitmap = its stored bits ∪ the marked regions: a superset of what changed. Where the record lives
 * and how it is vouched for is the store's: qcow2 (drivers/qcow2/write-intent.ts: a header extension
 * under an autoclear bit) and the raw sidecar (drivers/raw-sidecar.ts).
 */

/** Regions are at least 4 MiB; the region bitmap takes at most 4 KiB (32768 regions). */
export const MIN_REGION_BITS = 22;
export const MAX_REGION_BITMAP_BYTES = 4096;

export interface WriteIntentLayout {
  regionBits: number;
  nbRegions: number;
}

/** A layout and its region bitmap: bit i = byte i/8, least significant bit first. */
export interface WriteIntentBits extends WriteIntentLayout {
  bits: Buffer;
}

/**
 * The smallest regions (a power of two, at least 4 MiB) for a disk of `virtualSize` bytes whose
 * bitmap fits in `bitmapBytes` bytes.
 */
export function regionLayout(virtualSize: number, bitmapBytes: number): WriteIntentLayout {
  let regionBits = MIN_REGION_BITS;
  while (Math.ceil(Math.max(1, virtualSize) / 2 ** regionBits) > bitmapBytes * 8) regionBits++;
  return { regionBits, nbRegions: Math.max(1, Math.ceil(virtualSize / 2 ** regionBits)) };
}

/** The guest byte ranges of the marked regions of a disk of `size` bytes. */
export function markedRanges(rec: WriteIntentBits, size: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const regionSize = 2 ** rec.regionBits;
  for (let i = 0; i < rec.nbRegions; i++) {
    if (!(rec.bits[i >> 3] & (1 << (i & 7)))) continue;
    const start = i * regionSize;
    const end = i === rec.nbRegions - 1 ? size : Math.min(size, start + regionSize);
    if (end > start) out.push([start, end - start]);
  }
  return out;
}

/** Set the bits of serialized bitmap `data` (granularity `granularity`) covering [start, start+bytes). */
export function setSerializedBits(data: Buffer, start: number, bytes: number, granularity: number): void {
  const nbits = data.length * 8;
  const first = Math.floor(start / granularity);
  const last = Math.min(nbits - 1, Math.floor((start + bytes - 1) / granularity));
  for (let i = first; i <= last; i++) data[i >> 3] |= 1 << (i & 7);
}

/**
 * The live record of an open image: which regions are dirty in memory (`bits`, the extension's
 * data the header is serialised from) and which of them are known durable. `persist` writes the
 * extension as it is in memory and flushes.
 */
export class WriteIntentRecord {
  private readonly durable: Buffer;
  private inFlight?: Promise<void>;

  constructor(
    private readonly layout: WriteIntentLayout,
    private readonly bits: Buffer,
    private readonly persist: () => Promise<void>,
  ) {
    // What the record holds at arming time has just been written and flushed.
    this.durable = Buffer.from(bits);
  }

  private regions(offset: number, bytes: number): [number, number] {
    const last = this.layout.nbRegions - 1;
    const first = Math.min(last, Math.floor(offset / 2 ** this.layout.regionBits));
    const end = Math.min(last, Math.floor((offset + Math.max(bytes, 1) - 1) / 2 ** this.layout.regionBits));
    return [first, end];
  }

  private allDurable(first: number, last: number): boolean {
    for (let i = first; i <= last; i++) if (!(this.durable[i >> 3] & (1 << (i & 7)))) return false;
    return true;
  }

  /**
   * Make the regions of [offset, offset+bytes) dirty on disk. Undefined (no wait) when they already
   * are; otherwise a promise that settles once a flushed write of the record includes them.
   */
  mark(offset: number, bytes: number): Promise<void> | undefined {
    const [first, last] = this.regions(offset, bytes);
    if (this.allDurable(first, last)) return undefined;
    for (let i = first; i <= last; i++) this.bits[i >> 3] |= 1 << (i & 7);
    return this.waitDurable(first, last);
  }

  private async waitDurable(first: number, last: number): Promise<void> {
    while (!this.allDurable(first, last)) {
      // One write at a time; whoever finds none running starts the next, covering every bit set
      // by then: the writers that queued behind the running one share it.
      if (!this.inFlight) {
        const snapshot = Buffer.from(this.bits);
        this.inFlight = this.persist()
          .then(() => {
            for (let i = 0; i < snapshot.length; i++) this.durable[i] |= snapshot[i];
          })
          .finally(() => (this.inFlight = undefined));
      }
      await this.inFlight;
    }
  }
}
