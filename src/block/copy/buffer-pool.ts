/**
 * Read buffers for a copy's pieces, reused from one piece to the next (QEMU's mirror reuses its
 * buf-size the same way): a piece that is read and written takes a buffer, uses the first bytes it
 * needs, and gives it back once the target write of the same data has ended. Page-aligned, so a read
 * through O_DIRECT needs no bounce buffer.
 *
 * A piece gets a buffer of about its size, not of the largest piece's: a free buffer that holds it
 * (the smallest such), else a new one of just its size (whole pages). So the buffers in use hold
 * about what the copies in flight read, which the caller's buffer budget bounds (a mirror's buf-size),
 * and a copy whose pieces are small or offloaded (copy_file_range: no buffer at all) holds little.
 * Free buffers count against `maxBytes` with those in use: a new buffer that would pass it first
 * drops free ones (the oldest first; the GC frees them). In use alone may pass it: how much is in
 * flight is the caller's bound, not the pool's.
 */
import { nativeAddon } from '../native.js';

export const BUFFER_ALIGNMENT = 4096;

export class BufferPool {
  /** Free buffers, oldest first. */
  private readonly free: Buffer[] = [];
  private freeBytes = 0;
  private usedBytes = 0;

  constructor(private readonly maxBytes: number) {}

  /** Bytes of the buffers the pool holds: in use and free. */
  get bytes(): number {
    return this.usedBytes + this.freeBytes;
  }

  /** A buffer of at least `bytes` (use its first `bytes`); give it back when nothing uses it any more. */
  take(bytes: number): Buffer {
    let best = -1;
    for (let i = 0; i < this.free.length; i++) {
      const len = this.free[i].length;
      if (len >= bytes && (best < 0 || len < this.free[best].length)) best = i;
    }
    let buf: Buffer;
    if (best >= 0) {
      buf = this.free.splice(best, 1)[0];
      this.freeBytes -= buf.length;
    } else {
      const size = Math.ceil(Math.max(1, bytes) / BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT;
      while (this.free.length > 0 && this.usedBytes + this.freeBytes + size > this.maxBytes) this.freeBytes -= this.free.shift()!.length;
      buf = nativeAddon()?.alignedBuffer(size, BUFFER_ALIGNMENT) ?? Buffer.allocUnsafeSlow(size);
    }
    this.usedBytes += buf.length;
    return buf;
  }

  give(buf: Buffer): void {
    this.usedBytes -= buf.length;
    if (this.usedBytes + this.freeBytes + buf.length > this.maxBytes) return;
    this.free.push(buf);
    this.freeBytes += buf.length;
  }

  /** Drop the free buffers (the copy has ended). */
  clear(): void {
    this.free.length = 0;
    this.freeBytes = 0;
  }
}

/**
 * Buffers of many sizes, reused: for a server whose requests come in sizes the client picks (NBD). A
 * request takes the smallest power-of-two buffer that holds it (at least MIN_CLASS) and uses a prefix;
 * given back, it waits for the next request of its class. Reuse matters because a fresh buffer of a few
 * hundred KiB costs page faults and zeroed pages in the kernel and GC work in V8 each time, more than
 * copying its bytes. At most `maxFreeBytes` wait in the pool (the rest go to the GC), so an idle pool
 * holds a bounded amount of memory; buffers above `maxClassBytes` are never kept.
 */
export class SizedBufferPool {
  private static readonly MIN_CLASS = 64 << 10;
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;

  constructor(
    private readonly maxFreeBytes: number,
    private readonly maxClassBytes = 32 << 20,
  ) {}

  /** A buffer of at least `bytes` (its length is its size class: use a prefix of it). */
  take(bytes: number): Buffer {
    const size = Math.max(SizedBufferPool.MIN_CLASS, 2 ** Math.ceil(Math.log2(Math.max(1, bytes))));
    const buf = this.free.get(size)?.pop();
    if (buf) {
      this.freeBytes -= size;
      return buf;
    }
    return nativeAddon()?.alignedBuffer(size, BUFFER_ALIGNMENT) ?? Buffer.allocUnsafeSlow(size);
  }

  /** Give back a buffer that take() returned, once nothing uses it any more. */
  give(buf: Buffer): void {
    const size = buf.length;
    if (size > this.maxClassBytes || this.freeBytes + size > this.maxFreeBytes || (size & (size - 1)) !== 0) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(buf);
    this.freeBytes += size;
  }
}
