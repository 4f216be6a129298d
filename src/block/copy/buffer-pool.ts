/**
 * Read buffers of one size for a copy, reused from one piece to the next (QEMU's mirror reuses its
 * buf-size the same way): a buffer is taken for a read, stays in use until the target write of the
 * same data has ended, and goes back. Page-aligned, so a read through O_DIRECT needs no bounce buffer.
 * How many exist at once is bounded by the caller's in-flight limit, not here.
 */
import { nativeAddon } from '../native.js';

export const BUFFER_ALIGNMENT = 4096;

export class BufferPool {
  private readonly free: Buffer[] = [];
  readonly bufferSize: number;

  constructor(bufferSize: number) {
    this.bufferSize = Math.ceil(bufferSize);
  }

  take(): Buffer {
    return this.free.pop() ?? nativeAddon()?.alignedBuffer(this.bufferSize, BUFFER_ALIGNMENT) ?? Buffer.allocUnsafeSlow(this.bufferSize);
  }

  give(buf: Buffer): void {
    if (buf.length === this.bufferSize) this.free.push(buf);
  }

  /** Drop the free buffers (the copy has ended). */
  clear(): void {
    this.free.length = 0;
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
