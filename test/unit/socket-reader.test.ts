/**
 * SocketReader on real sockets, both ways it takes bytes (onread into its own buffers, and 'data'
 * events of a socket created without it): messages of every size, read as promises and framed
 * synchronously, come out byte for byte as the peer sent them, in whatever pieces the peer wrote.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import * as net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SocketReader, SocketClosedError } from '../../src/nbd/socket-reader.js';

/** Sizes around the staging buffer's and the direct read's thresholds, and small ones between. */
const SIZES = [4, 28, 300_000, 1, 70_000, 16 << 10, (16 << 10) - 1, 5, 64 << 10, (64 << 10) + 3, 3, 1 << 20, 12, 0, 40_000];

function stream(total: number): Buffer {
  const b = Buffer.alloc(total);
  for (let i = 0; i < total; i++) b[i] = (i * 131 + (i >> 9)) & 0xff;
  return b;
}

/** A connected pair: `reading` is read through a SocketReader (onread or 'data'), `writing` writes `data` in odd pieces. */
async function pair(viaOnread: boolean, data: Buffer): Promise<{ reader: SocketReader; close: () => void }> {
  const dir = mkdtempSync(join(tmpdir(), 'bm-sr-'));
  const path = join(dir, 's');
  const server = net.createServer((peer) => {
    let off = 0;
    let piece = 1;
    const more = (): void => {
      while (off < data.length) {
        const n = Math.min(piece, data.length - off);
        piece = (piece * 7 + 13) % 200_000;
        const ok = peer.write(data.subarray(off, off + n));
        off += n;
        if (!ok) return void peer.once('drain', more);
      }
      peer.end();
    };
    more();
  });
  await new Promise<void>((r) => server.listen(path, r));
  const reader = new SocketReader();
  const sock = viaOnread ? net.createConnection({ path, onread: reader.onread }) : net.createConnection(path);
  await new Promise<void>((r) => sock.once('connect', r));
  reader.attach(sock, viaOnread);
  return {
    reader,
    close: () => {
      sock.destroy();
      server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

for (const viaOnread of [true, false]) {
  const how = viaOnread ? 'onread' : "'data' events";

  test(`read and readInto return the stream as sent (${how}); the end rejects`, async () => {
    const total = SIZES.reduce((a, b) => a + b, 0);
    const data = stream(total);
    const { reader, close } = await pair(viaOnread, data);
    try {
      let off = 0;
      for (const [i, n] of SIZES.entries()) {
        const got = i % 2 ? await reader.read(n) : await reader.readInto(Buffer.alloc(n));
        assert.ok(got.equals(data.subarray(off, off + n)), `message ${i} (${n} bytes) at ${off}`);
        off += n;
      }
      await assert.rejects(reader.read(1), SocketClosedError);
    } finally {
      close();
    }
  });

  test(`synchronous framing (peek, skip, fillFrom on the read callback) sees every message (${how})`, async () => {
    // Messages of a 4-byte length and that many bytes, as NBD's requests and payloads.
    const parts: Buffer[] = [];
    for (const n of SIZES) {
      const h = Buffer.alloc(4);
      h.writeUInt32BE(n);
      parts.push(h, stream(n + 17).subarray(17));
    }
    const { reader, close } = await pair(viaOnread, Buffer.concat(parts));
    try {
      const got: Buffer[] = [];
      await new Promise<void>((resolve, reject) => {
        const take = (): void => {
          while (!reader.filling && reader.available >= 4) {
            const n = reader.peek(4).readUInt32BE(0);
            reader.skip(4);
            reader.fillFrom(Buffer.alloc(n), (b) => got.push(b), reject);
          }
        };
        reader.setConsumer({ bytes: take, ended: () => resolve() });
        take();
      });
      assert.equal(got.length, SIZES.length);
      for (const [i, n] of SIZES.entries()) assert.ok(got[i].equals(parts[2 * i + 1]), `message ${i} (${n} bytes)`);
    } finally {
      close();
    }
  });
}
