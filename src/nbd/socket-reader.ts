/**
 * Exact-size reads from a stream socket: `read(n)` resolves with the next n bytes once they have
 * arrived. The socket is paused while nobody waits for bytes and more than `highWater` are buffered, so
 * a peer that sends faster than it is served is held back by TCP flow control instead of filling memory.
 * Both NBD ends use it.
 */
import type { Socket } from 'node:net';

export class SocketClosedError extends Error {
  constructor() {
    super('connection closed');
    this.name = 'SocketClosedError';
  }
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; into?: Buffer; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private ended = false;
  private endError: Error | undefined;

  constructor(
    private readonly socket: Socket,
    private readonly highWater = 1 << 20,
  ) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      if (this.buffered > this.highWater && !this.waiter) socket.pause();
      this.deliver();
    });
    const finish = (err?: Error) => {
      if (this.ended) return;
      this.ended = true;
      this.endError = err;
      this.deliver();
    };
    socket.on('end', () => finish());
    socket.on('close', () => finish());
    socket.on('error', (e) => finish(e));
  }

  /** Bytes received and not read yet. */
  get available(): number {
    return this.buffered;
  }

  /** The next `n` bytes; rejects with SocketClosedError if the stream ends first. One read at a time. */
  read(n: number): Promise<Buffer> {
    if (this.waiter) throw new Error('SocketReader: concurrent reads');
    return new Promise<Buffer>((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.deliver();
    });
  }

  /**
   * The next `into.length` bytes, copied into `into` (a reused buffer: no allocation per read, where
   * read() allocates whenever the bytes span the socket's chunks); resolves with it.
   */
  readInto(into: Buffer): Promise<Buffer> {
    if (this.waiter) throw new Error('SocketReader: concurrent reads');
    return new Promise<Buffer>((resolve, reject) => {
      this.waiter = { n: into.length, into, resolve, reject };
      this.deliver();
    });
  }

  private deliver(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= w.n) {
      this.waiter = undefined;
      w.resolve(this.take(w.n, w.into));
      if (this.buffered <= this.highWater) this.socket.resume();
      return;
    }
    if (this.ended) {
      this.waiter = undefined;
      w.reject(this.endError ?? new SocketClosedError());
      return;
    }
    // Someone waits for more than is buffered: let the data in.
    this.socket.resume();
  }

  private take(n: number, into?: Buffer): Buffer {
    if (n === 0) return into ?? Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length >= n && !into) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = into ?? Buffer.allocUnsafe(n);
    let pos = 0;
    while (pos < n) {
      const c = this.chunks[0];
      const k = Math.min(c.length, n - pos);
      c.copy(out, pos, 0, k);
      pos += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }
}
