import { EndSignal } from '../base/end-signal.js';

/**
 * In-flight request tracking for one node: which ranges are being read or written right now, so that
 * a request can wait for overlapping ones (read-modify-write of unaligned writes, a mirror's
 * write-blocking copy, close/drain). A serialising request makes every later overlapping request wait,
 * and waits itself for earlier overlapping ones, like QEMU's BDRV_REQ_SERIALISING.
 */
export interface TrackedRequest {
  readonly kind: string;
  readonly offset: number;
  readonly bytes: number;
  /** Order of arrival: a request only ever waits for earlier ones, so waits cannot form a cycle. */
  readonly seq: number;
  /** Range other requests must not overlap while this one is serialising (set by serialise()). */
  serialisingOffset?: number;
  serialisingBytes?: number;
  /** Resolves when the request has ended. */
  readonly done: Promise<void>;
}

/** A request in flight; its `done` promise is made only when someone waits (most end unwaited). */
class Tracked extends EndSignal implements TrackedRequest {
  serialisingOffset?: number;
  serialisingBytes?: number;

  constructor(
    readonly kind: string,
    readonly offset: number,
    readonly bytes: number,
    readonly seq: number,
  ) {
    super();
  }
}

function overlaps(aOff: number, aLen: number, bOff: number, bLen: number): boolean {
  return aOff < bOff + bLen && bOff < aOff + aLen;
}

export class RequestTracker {
  private readonly inFlight = new Set<Tracked>();
  private idleWaiters: Array<() => void> = [];
  private nextSeq = 0;
  private serialisingCount = 0;

  begin(kind: string, offset: number, bytes: number): TrackedRequest {
    const req = new Tracked(kind, offset, bytes, this.nextSeq++);
    this.inFlight.add(req);
    return req;
  }

  end(req: TrackedRequest): void {
    if (!(req instanceof Tracked) || !this.inFlight.delete(req)) return;
    if (req.serialisingOffset !== undefined) this.serialisingCount--;
    req.end();
    if (this.inFlight.size === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  get count(): number {
    return this.inFlight.size;
  }

  /**
   * Resolves when every write-class request (anything but a read) now in flight has ended; undefined
   * when there is none. Requests that begin meanwhile are not waited for.
   */
  writesEnded(): Promise<void> | undefined {
    const writes = [...this.inFlight].filter((r) => r.kind !== 'read');
    return writes.length ? Promise.all(writes.map((r) => r.done)).then(() => undefined) : undefined;
  }

  /** Wait until no request is in flight. */
  drain(): Promise<void> {
    if (this.inFlight.size === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /**
   * Make `req` serialising over [offset, offset+bytes): later overlapping requests wait for it (see
   * waitForSerialising), and it waits for every earlier overlapping request.
   */
  async serialise(req: TrackedRequest, offset: number, bytes: number): Promise<void> {
    if (req.serialisingOffset === undefined) this.serialisingCount++;
    req.serialisingOffset = offset;
    req.serialisingBytes = bytes;
    await this.waitForOverlapping(offset, bytes, req);
  }

  /**
   * A plain request waits only for earlier serialising requests that overlap it. Undefined (nothing to
   * wait for, no promise made) when no request is serialising, as on every plain data path.
   */
  waitForSerialising(req: TrackedRequest): Promise<void> | undefined {
    return this.serialisingCount > 0 ? this.waitForSerialisingRequests(req) : undefined;
  }

  private async waitForSerialisingRequests(req: TrackedRequest): Promise<void> {
    while (this.serialisingCount > 0) {
      let blocker: TrackedRequest | undefined;
      for (const other of this.inFlight) {
        if (other.seq >= req.seq || other.serialisingOffset === undefined) continue;
        if (overlaps(req.offset, req.bytes, other.serialisingOffset, other.serialisingBytes!)) {
          blocker = other;
          break;
        }
      }
      if (!blocker) return;
      await blocker.done;
    }
  }

  /**
   * Wait for every in-flight request overlapping [offset, offset+bytes) to finish; with `self`, only
   * for those that arrived before it.
   */
  async waitForOverlapping(offset: number, bytes: number, self?: TrackedRequest): Promise<void> {
    for (;;) {
      let blocker: TrackedRequest | undefined;
      for (const other of this.inFlight) {
        if (other === self || (self && other.seq > self.seq)) continue;
        const oOff = other.serialisingOffset ?? other.offset;
        const oLen = other.serialisingBytes ?? other.bytes;
        if (overlaps(offset, bytes, oOff, oLen)) {
          blocker = other;
          break;
        }
      }
      if (!blocker) return;
      await blocker.done;
    }
  }
}
