/**
 * What a stream socket sends, read into buffers this reader chooses: a staging buffer, reused for as
 * long as the connection lives, for headers and other small messages; and, for a large message whose
 * size is known (an NBD WRITE's payload, a READ reply's data), the caller's own buffer, which the
 * socket then reads into directly. Both NBD ends use it.
 *
 * Why: a socket left to itself delivers every read as a fresh 64 KiB buffer. At a few hundred MiB/s
 * those buffers were most of the daemon's garbage, and copying them into the payload's buffer most of
 * its copying. A socket created with `onread: reader.onread` (net.Socket's own option) reads where the
 * reader says; any other socket is read through its 'data' events, and the reader copies (attach()).
 *
 * Reading is either a promise per message (read, readInto: the handshake, the client's replies) or
 * synchronous framing (setConsumer: the server's requests), where the consumer is called on the
 * socket's read callback itself, so it can point the next read of the socket at a payload's buffer.
 *
 * Back-pressure: the socket stops reading while nobody wants bytes and the staged ones fill half the
 * staging buffer, or while the owner has paused it (pause/resume), so a peer that sends faster than it
 * is served is held back by TCP flow control instead of filling memory.
 */
import type { Socket } from 'node:net';

/** A socket's descriptor (libuv's handle has it; Node has no public accessor), when it has one. */
export function socketDescriptor(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

export class SocketClosedError extends Error {
  constructor() {
    super('connection closed');
    this.name = 'SocketClosedError';
  }
}

/** Bytes of a reader's staging buffer. */
export const STAGING_BYTES = 64 << 10;
/**
 * A message whose unread rest is at least this long is read straight into its buffer; a shorter rest
 * goes through staging, so that one read of the socket takes it and whatever follows.
 */
const DIRECT_MIN_BYTES = 16 << 10;
/** Compact the staged bytes to the front when less than this is free behind them. */
const MIN_FREE_BYTES = 4 << 10;

/** A message being read into its own buffer: `filled` bytes so far. */
interface Fill {
  buf: Buffer;
  filled: number;
  done: (buf: Buffer) => void;
  fail: (err: Error) => void;
}

/** The owner of synchronous framing (setConsumer). */
export interface Consumer {
  /** Bytes were staged (available > 0, no fill in progress). Called on the socket's read callback. */
  bytes(): void;
  /** The stream ended (the peer closed, or an error); `err` says why when it was an error. */
  ended(err: Error | undefined): void;
}

export class SocketReader {
  private staging: Buffer;
  /** The staged bytes are staging[start, end). */
  private start = 0;
  private end = 0;
  private fill: Fill | undefined;
  /** Where the socket's next bytes land (what nextBuffer() last gave out): it stays valid until they do. */
  private target: 'staging' | 'fill' = 'staging';
  private consumer: Consumer | undefined;
  private socket: Socket | undefined;
  /** Reading stopped (by a read callback returning false, or pause()). */
  private stopped = false;
  private paused = false;
  private ended = false;
  private endError: Error | undefined;
  private inCallback = false;

  /** net.Socket's `onread` option: the socket reads into the buffers this reader gives out. */
  readonly onread = {
    buffer: (): Buffer => this.nextBuffer(),
    callback: (n: number): boolean => this.onRead(n),
  };

  constructor(private readonly capacity = STAGING_BYTES) {
    this.staging = Buffer.allocUnsafe(capacity);
  }

  /** A reader of a socket created without this reader's `onread` (read through its 'data' events). */
  static of(socket: Socket): SocketReader {
    const reader = new SocketReader();
    reader.attach(socket, false);
    return reader;
  }

  /**
   * Take `socket`'s bytes: through `onread` when the socket was created with this reader's `onread`
   * option, else from its 'data' events (copied). Either way its end and errors end the reader.
   */
  attach(socket: Socket, viaOnread: boolean): void {
    this.socket = socket;
    // A socket accepted with pauseOnConnect starts paused.
    this.stopped = socket.isPaused();
    if (!viaOnread) socket.on('data', (chunk: Buffer) => this.copyIn(chunk));
    const finish = (err?: Error): void => {
      if (this.ended) return;
      this.ended = true;
      this.endError = err;
      const f = this.fill;
      this.fill = undefined;
      f?.fail(err ?? new SocketClosedError());
      this.consumer?.ended(err);
    };
    socket.on('end', () => finish());
    socket.on('close', () => finish());
    socket.on('error', (e) => finish(e));
    this.flow();
  }

  /** Bytes received and not taken yet. */
  get available(): number {
    return this.end - this.start;
  }

  /** Whether a fill (read, readInto, fillFrom) is in progress. */
  get filling(): boolean {
    return this.fill !== undefined;
  }

  /** The next `n` bytes (a new buffer); rejects with SocketClosedError if the stream ends first. One read at a time. */
  read(n: number): Promise<Buffer> {
    return this.readInto(Buffer.allocUnsafe(n));
  }

  /** The next `into.length` bytes, into `into` (straight from the socket when it is large); resolves with it. */
  readInto(into: Buffer): Promise<Buffer> {
    return new Promise<Buffer>((resolve, reject) => this.fillFrom(into, resolve, reject));
  }

  /**
   * Read the next `buf.length` bytes into `buf`: the staged ones are copied now, the rest is read from
   * the socket, straight into `buf` when it is large. `done` is called once `buf` is full (at once,
   * when the staged bytes were enough, else on the socket's read callback); `fail` if the stream ends
   * first. One fill at a time.
   */
  fillFrom(buf: Buffer, done: (buf: Buffer) => void, fail: (err: Error) => void): void {
    if (this.fill) throw new Error('SocketReader: concurrent reads');
    if (this.ended && this.available < buf.length) {
      fail(this.endError ?? new SocketClosedError());
      return;
    }
    this.fill = { buf, filled: 0, done, fail };
    this.moveStagedIntoFill();
    this.flow();
  }

  /** The next `n` staged bytes as a view, valid until the reader next runs (n <= available). Call skip(n) after. */
  peek(n: number): Buffer {
    return this.staging.subarray(this.start, this.start + n);
  }

  /** Drop the next `n` staged bytes (after peek). */
  skip(n: number): void {
    this.start += n;
    this.flow();
  }

  /** Synchronous framing: `consumer` is told about staged bytes as they arrive, and about the end. */
  setConsumer(consumer: Consumer): void {
    this.consumer = consumer;
    if (this.ended) consumer.ended(this.endError);
  }

  /** Stop reading the socket (except into a fill in progress) until resume(). */
  pause(): void {
    this.paused = true;
    this.flow();
  }

  resume(): void {
    this.paused = false;
    this.flow();
  }

  // ---- the socket's side ---------------------------------------------------------------------------

  /** Whether the socket should read: into a fill, or into staging while not paused and not half full. */
  private wantsBytes(): boolean {
    if (this.ended) return false;
    if (this.fill) return true;
    return !this.paused && this.available < this.capacity / 2;
  }

  /** Start or stop the socket's reading to match wantsBytes() (on a read callback, its return value does). */
  private flow(): void {
    if (!this.socket || this.inCallback) return;
    const want = this.wantsBytes();
    if (want && this.stopped) {
      this.stopped = false;
      this.socket.resume();
    } else if (!want && !this.stopped) {
      this.stopped = true;
      this.socket.pause();
    }
  }

  /**
   * The buffer the socket's next bytes go into: the rest of a large fill, or the free space behind the
   * staged bytes. Only here does the staging buffer's layout change (compaction), since the region
   * given out before must stay where it was until bytes arrive in it.
   */
  private nextBuffer(): Buffer {
    const f = this.fill;
    if (f && this.available === 0 && f.buf.length - f.filled >= DIRECT_MIN_BYTES) {
      this.target = 'fill';
      return f.buf.subarray(f.filled);
    }
    this.target = 'staging';
    if (this.start === this.end) this.start = this.end = 0;
    else if (this.staging.length - this.end < MIN_FREE_BYTES) {
      if (this.start > 0) {
        this.staging.copyWithin(0, this.start, this.end);
        this.end -= this.start;
        this.start = 0;
      }
      // Full of bytes nobody took (reading has stopped, see wantsBytes): room for when it resumes.
      if (this.staging.length - this.end < MIN_FREE_BYTES) {
        const bigger = Buffer.allocUnsafe(this.staging.length * 2);
        this.staging.copy(bigger, 0, 0, this.end);
        this.staging = bigger;
      }
    }
    return this.staging.subarray(this.end);
  }

  /** `n` bytes arrived where nextBuffer() said; returns whether to go on reading. */
  private arrived(n: number): void {
    if (this.target === 'fill') {
      const f = this.fill!;
      f.filled += n;
      if (f.filled === f.buf.length) this.completeFill();
    } else {
      this.end += n;
      this.moveStagedIntoFill();
    }
    if (!this.fill && this.available > 0) this.consumer?.bytes();
  }

  /** The onread callback. */
  private onRead(n: number): boolean {
    this.inCallback = true;
    try {
      this.arrived(n);
    } catch (err) {
      // What the consumer or a fill's callback threw must not escape into the socket's callback.
      this.socket?.destroy(err as Error);
      return false;
    } finally {
      this.inCallback = false;
    }
    const more = this.wantsBytes();
    this.stopped = !more;
    return more;
  }

  /** A 'data' chunk (a socket without onread): copied into where nextBuffer() says, piece by piece. */
  private copyIn(chunk: Buffer): void {
    this.inCallback = true;
    try {
      for (let off = 0; off < chunk.length; ) {
        const k = chunk.copy(this.nextBuffer(), 0, off);
        off += k;
        this.arrived(k);
      }
    } catch (err) {
      this.socket?.destroy(err as Error);
      return;
    } finally {
      this.inCallback = false;
    }
    this.flow();
  }

  private moveStagedIntoFill(): void {
    const f = this.fill;
    if (!f) return;
    const k = Math.min(this.available, f.buf.length - f.filled);
    this.staging.copy(f.buf, f.filled, this.start, this.start + k);
    this.start += k;
    f.filled += k;
    if (f.filled === f.buf.length) this.completeFill();
  }

  private completeFill(): void {
    const f = this.fill!;
    this.fill = undefined;
    f.done(f.buf);
  }
}
