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
