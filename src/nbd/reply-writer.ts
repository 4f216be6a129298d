/**
 * The write side of a server connection: replies go out in the order they are given, either as
 * buffers through the socket's stream, or as a header and ranges of host files whose pages the kernel
 * hands to the socket by reference (sendfile), so the server copies none of their bytes.
 *
 * Buffers: replies given in the same turn of the event loop go out together: the socket stays corked
 * until the turn's I/O callbacks have run (setImmediate), then one writev sends them all, without
 * copying. A write per reply cost a system call and a wake-up of the client each. The parts of one
 * message are written one after another, so concurrent replies never interleave inside a message.
 *
 * Files: their bytes bypass the stream, straight to the descriptor, so they may go only when the
 * stream holds nothing (the cork is released first) and nothing is queued before them. What the socket
 * does not take at once waits in a queue, in order with every later reply, each range on a duplicate
 * of its file's descriptor (the node's own may be closed before the client takes the rest); the queue
 * moves on when the stream is empty again (a zero-length write completes after everything before it)
 * or, when the socket itself is full, once a small piece of the waiting bytes, copied and written
 * through the stream, has gone out (the stream is what waits for the socket to take more).
 *
 * Measured (nbdcopy of 512 MiB out of a read-only qcow2 on tmpfs into null:, 4 connections, a warm
 * daemon, 6 alternating rounds, load 2.7 on 2 cores): server CPU 0.17-0.25 s, where copying in and
 * out (preadv2 + writev) took 0.21 s alone before (perf, main thread; 0.30-0.36 s in all), and
 * qemu-storage-daemon's 0.27-0.40 s; wall 0.30-0.34 s against its 0.33-0.42 s.
 */
import type { Socket } from 'node:net';
import { closeSync, readSync } from 'node:fs';
import { nativeAddon } from '../block/native.js';
import type { HostRange } from '../block/node.js';
import { tracer } from '../trace/trace.js';

const traceSendFile = tracer.point('nbd_send_file');

/** The bytes copied to wait for a full socket (see the header comment): one page. */
const WAKER_BYTES = 4096;
/**
 * SO_SNDBUF of a unix socket (the kernel doubles it): its default (208 KiB) holds less than one
 * 256 KiB READ reply, so nearly every reply waited for the client once, through the stream. With
 * 2 MiB (nbdcopy of 512 MiB out of a read-only qcow2 on tmpfs, 3 alternating rounds, load 6-7 on
 * 2 cores): fresh daemon 0.34-0.45 s of CPU against 0.51-0.55 s, warm 0.12-0.26 against 0.16-0.29.
 * The kernel caps it at net.core.wmem_max. TCP sockets keep the kernel's own tuning.
 */
const UNIX_SEND_BUFFER_BYTES = 2 << 20;

const EMPTY = Buffer.alloc(0);

interface BufferItem {
  kind: 'buffers';
  parts: Buffer[];
  sent?: () => void;
}

/** A header (what of it is left) and file ranges (what of them is left), on descriptors of its own. */
interface FileItem {
  kind: 'file';
  head: Buffer;
  ranges: Array<{ fd: number; offset: number; bytes: number }>;
}

type Item = BufferItem | FileItem;

function itemBytes(item: Item): number {
  if (item.kind === 'buffers') return item.parts.reduce((n, b) => n + b.length, 0);
  return item.ranges.reduce((n, r) => n + r.bytes, item.head.length);
}

export class ReplyWriter {
  /** The socket is corked until the end of this turn of the event loop. */
  private corked = false;
  /** Replies waiting behind file bytes the socket has not taken yet, in order. */
  private readonly queue: Item[] = [];
  private queuedBytes = 0;
  /** A stream write is outstanding whose completion moves the queue on. */
  private waiting = false;
  private pumping = false;
  private readonly idleWaiters: Array<() => void> = [];
  private closed = false;
  /** The socket's descriptor, when file ranges can be sent by reference. */
  private readonly fd: number | undefined;

  /**
   * `fd`: the socket's descriptor (file ranges are refused without it); `moved`: called when queued
   * bytes have gone to the socket (room for more replies); `failed`: the socket refused file bytes
   * with an error (the connection cannot go on).
   */
  constructor(
    private readonly socket: Socket,
    fd: number | undefined,
    private readonly moved: () => void,
    private readonly failed: (err: Error) => void,
  ) {
    this.fd = fd !== undefined && nativeAddon()?.sendFile ? fd : undefined;
    if (this.fd !== undefined && socket.remotePort === undefined) nativeAddon()!.setSendBuffer?.(this.fd, UNIX_SEND_BUFFER_BYTES);
  }

  /** Whether file ranges can be sent by reference here. */
  get sendsFiles(): boolean {
    return this.fd !== undefined;
  }

  /** Reply bytes given but not yet taken by the socket (its stream's and the queue's). */
  get unsentBytes(): number {
    return this.socket.writableLength + this.queuedBytes;
  }

  /** Send `parts`, then `sent` once the socket no longer needs them (written, or the socket gone). */
  send(parts: Buffer[], sent?: () => void): void {
    if (this.closed || this.socket.destroyed) {
      sent?.();
      return;
    }
    if (this.queue.length) return this.enqueue({ kind: 'buffers', parts, sent });
    this.write(parts, sent);
  }

  /**
   * Send `head` and then the bytes of `ranges`, by reference. Their bytes must be stable now
   * (HostRange.stable: nobody may write them); a writer that comes while they wait here or in the
   * socket overlaps a read whose reply the client has not taken, so either data is right for it.
   * The descriptors need stay open only during this call.
   */
  sendFile(head: Buffer, ranges: readonly HostRange[]): void {
    if (this.closed || this.socket.destroyed) return;
    const item: FileItem = { kind: 'file', head, ranges: ranges.map((r) => ({ fd: r.fd, offset: r.offset, bytes: r.bytes })) };
    const sent = !this.queue.length && this.sendNow(item);
    traceSendFile({ ranges: ranges.length, waits: !sent });
    if (sent) return;
    // What is left waits, on descriptors of its own.
    const n = nativeAddon()!;
    for (let i = 0; i < item.ranges.length; i++) {
      const dup = n.dupFd!(item.ranges[i].fd);
      if (dup < 0) {
        for (let j = 0; j < i; j++) closeSync(item.ranges[j].fd);
        this.failed(new Error(`cannot duplicate a descriptor: errno ${-dup}`));
        return;
      }
      item.ranges[i].fd = dup;
    }
    this.enqueue(item);
  }

  /** Resolves once nothing waits in the queue (everything given to the stream), or on close(). */
  idle(): Promise<void> {
    if (!this.queue.length || this.closed) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Drop what waits (the connection is closing): buffers are released, descriptors closed. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // Replies held by the cork go out first: an error reply before a dropped connection.
    if (this.corked) {
      this.corked = false;
      this.socket.uncork();
    }
    for (const item of this.queue.splice(0)) this.release(item);
    this.queuedBytes = 0;
    for (const w of this.idleWaiters.splice(0)) w();
  }

  // ---- internals ----------------------------------------------------------------------------------

  private write(parts: Buffer[], sent?: () => void): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(() => this.uncork());
    }
    for (let i = 0; i < parts.length - 1; i++) this.socket.write(parts[i]);
    this.socket.write(parts[parts.length - 1], sent && (() => sent()));
  }

  private uncork(): void {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  }

  private enqueue(item: Item): void {
    this.queue.push(item);
    this.queuedBytes += itemBytes(item);
    if (this.queue.length === 1) this.pump();
  }

  /**
   * Send as much of a file item as the socket takes now, when the stream holds nothing (it may, after
   * the cork is released); true when all of it went. The item keeps what is left.
   */
  private sendNow(item: FileItem): boolean {
    this.uncork();
    if (this.socket.writableLength > 0) return false;
    const n = nativeAddon()!;
    while (item.ranges.length) {
      const r = item.ranges[0];
      const want = item.head.length + r.bytes;
      const k = n.sendFile!(this.fd!, item.head, r.fd, r.offset, r.bytes);
      if (k < 0) {
        // The socket is broken: the connection closes (and drops the queue).
        this.failed(new Error(`sendfile: errno ${-k}`));
        return true;
      }
      const fromHead = Math.min(k, item.head.length);
      item.head = item.head.subarray(fromHead);
      r.offset += k - fromHead;
      r.bytes -= k - fromHead;
      if (k < want) return false;
      item.ranges.shift();
      this.closeOwn(item, r);
    }
    if (item.head.length) return false;
    return true;
  }

  /** Move the queue on until it is empty or waits for the stream; then tell the connection. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.queue.length && !this.waiting && !this.closed && !this.socket.destroyed) {
        const item = this.queue[0];
        const before = itemBytes(item);
        if (item.kind === 'buffers') {
          this.queue.shift();
          this.queuedBytes -= before;
          this.write(item.parts, item.sent);
          continue;
        }
        const done = this.sendNow(item);
        if (this.closed) return;
        this.queuedBytes -= before - itemBytes(item);
        if (done) this.queue.shift();
        else this.wait(item);
      }
    } finally {
      this.pumping = false;
    }
    if (!this.queue.length) for (const w of this.idleWaiters.splice(0)) w();
    // Outside the loop: the connection may start requests, whose replies come back here.
    this.moved();
  }

  /**
   * Wait until the stream has written everything given to it: a zero-length write when it holds
   * bytes; else (the socket is full) a piece of the item's own bytes, copied, which the stream writes
   * when the socket takes more.
   */
  private wait(item: FileItem): void {
    this.waiting = true;
    const resume = () => {
      this.waiting = false;
      this.pump();
    };
    if (this.socket.writableLength > 0) {
      this.socket.write(EMPTY, resume);
      return;
    }
    let piece: Buffer;
    if (item.head.length) {
      piece = item.head;
      item.head = EMPTY;
    } else {
      const r = item.ranges[0];
      piece = Buffer.allocUnsafe(Math.min(WAKER_BYTES, r.bytes));
      let got = 0;
      try {
        while (got < piece.length) {
          const k = readSync(r.fd, piece, got, piece.length - got, r.offset + got);
          if (k <= 0) throw new Error('a host file ended before the reply');
          got += k;
        }
      } catch (err) {
        this.failed(err as Error);
        return;
      }
      r.offset += got;
      r.bytes -= got;
      if (!r.bytes) {
        item.ranges.shift();
        this.closeOwn(item, r);
      }
      if (!item.ranges.length) this.queue.shift();
    }
    this.queuedBytes -= piece.length;
    this.socket.write(piece, resume);
  }

  /** Close a range's descriptor if the item owns it (it waited in the queue). */
  private closeOwn(item: FileItem, r: { fd: number }): void {
    if (this.queue[0] === item) closeSync(r.fd);
  }

  private release(item: Item): void {
    if (item.kind === 'buffers') item.sent?.();
    else for (const r of item.ranges) closeSync(r.fd);
  }
}
