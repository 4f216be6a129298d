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

/** At most this many regions are marked ahead of a sequential writer (WriteIntentRecord.markAhead). */
export const MAX_REGIONS_AHEAD = 16;
/** Sequential streams followed at once (e.g. several guest threads each writing a file). */
const MAX_STREAMS = 16;

/**
 * The live record of an open image: which regions are dirty in memory (`bits`, the extension's
 * data the header is serialised from) and which of them are known durable. `persist` writes the
 * extension as it is in memory, durably.
 *
 * Why a recovered bitmap is a superset of what changed: a write is performed only once every region
 * it touches is durable in the record (`mark` returns no promise only then, else one that settles
 * after a persist that included them), and regions are cleared only when the bitmaps themselves are
 * stored (the store's job, after flushing the data: clean-marking stays lazy). Marking *more*
 * regions than written — look-ahead for sequential writers, several writers sharing one persist —
 * can only make a recovery coarser, never miss a change.
 */
export class WriteIntentRecord {
  private readonly durable: Buffer;
  private inFlight?: Promise<void>;
  /**
   * Sequential streams: the offset where the next write of each would start -> where it began.
   * Oldest first (Map order); at most MAX_STREAMS.
   */
  private readonly streams = new Map<number, number>();
  /** Mark regions ahead of sequential writers (markAhead); the bench turns it off to measure it. */
  lookAhead = true;
  /** Record writes made, and writes that had to wait for one (the bench prints them). */
  readonly counts = { recordWrites: 0, waitingWrites: 0 };

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
    const streamed = this.followStream(offset, Math.max(bytes, 1));
    const durable = this.allDurable(first, last);
    if (!durable) for (let i = first; i <= last; i++) this.bits[i >> 3] |= 1 << (i & 7);
    // Set before the wait below starts a persist, so that one write covers both.
    if (streamed && this.lookAhead) this.markAhead(last, streamed);
    if (durable) return undefined;
    this.counts.waitingWrites++;
    return this.waitDurable(first, last);
  }

  /**
   * Follow sequential writers: a write starting where an earlier one ended continues its stream.
   * Returns how many whole regions the stream has written so far, with this write (0: not a stream,
   * or not yet one region long).
   */
  private followStream(offset: number, bytes: number): number {
    const began = this.streams.get(offset);
    this.streams.delete(offset);
    const start = began ?? offset;
    this.streams.set(offset + bytes, start);
    if (this.streams.size > MAX_STREAMS) this.streams.delete(this.streams.keys().next().value!);
    return began === undefined ? 0 : Math.floor((offset + bytes - start) / 2 ** this.layout.regionBits);
  }

  /**
   * A sequential writer that has written `streamed` whole regions and is now in region `last`: the
   * regions after it (as many as it has written, at most MAX_REGIONS_AHEAD) are marked in the
   * background, so that the writer finds them durable instead of waiting for a record write at each
   * region boundary. Topped up once half of them are used, so one record write serves several
   * regions. Still a superset (see the class comment): a stream that stops leaves at most as many
   * regions marked beyond its end as it wrote, and at most MAX_REGIONS_AHEAD. A random writer never
   * starts a stream, so its recovery stays as fine as its writes. A failed background write leaves
   * the regions not durable: the first write into one then waits for a record write of its own.
   */
  private markAhead(last: number, streamed: number): void {
    const ahead = Math.min(MAX_REGIONS_AHEAD, streamed, this.layout.nbRegions - 1 - last);
    if (ahead <= 0) return;
    const isSet = (i: number) => !!(this.bits[i >> 3] & (1 << (i & 7)));
    const soon = Math.ceil(ahead / 2);
    let needed = false;
    for (let i = last + 1; i <= last + soon; i++) if (!isSet(i)) needed = true;
    if (!needed) return;
    for (let i = last + 1; i <= last + ahead; i++) this.bits[i >> 3] |= 1 << (i & 7);
    this.waitDurable(last + 1, last + ahead).catch(() => undefined);
  }

  private async waitDurable(first: number, last: number): Promise<void> {
    while (!this.allDurable(first, last)) {
      // One write at a time; whoever finds none running starts the next, covering every bit set
      // by then: the writers that queued behind the running one share it.
      if (!this.inFlight) {
        const snapshot = Buffer.from(this.bits);
        this.counts.recordWrites++;
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
