/**
 * The NBD server on the wire, with a raw client (test/support/nbd-wire.ts): hostile handshakes and
 * requests get the protocol's error or a closed connection, and other clients and the daemon carry on;
 * a client that stops reading holds only itself; several clients and many requests are served at once;
 * extended headers (64-bit requests, extended reply headers, BLOCK_STATUS_EXT); block-export-del's
 * safe and hard modes with a client connected.
 */
import { test, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import * as P from '../../src/nbd/protocol.js';
import { mustRun, tempDir } from '../support/tools.js';
import { WireClient } from '../support/nbd-wire.js';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';

const MiB = 1 << 20;
const GiB = 1 << 30;
const MAX_CONNECTIONS = 12;
let d: SpawnedDaemon;
let sock: string;
let cleanup: () => Promise<void>;

before(async () => {
  const t = await tempDir('bm-nbd-wire-');
  cleanup = t.cleanup;
  const image = path.join(t.dir, 'disk.raw');
  await mustRun('qemu-img', ['create', '-q', '-f', 'raw', image, '8M']);
  await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 4M 1M', image]);
  sock = path.join(t.dir, 'nbd.sock');
  // Not startDaemon: its after hook would kill the daemon before this file's after hook stops it.
  d = await spawnDaemon(path.join(t.dir, 'qmp.sock'), [
    '--blockdev', `driver=file,node-name=f0,filename=${image}`,
    '--blockdev', 'driver=raw,node-name=d0,file=f0',
    '--blockdev', JSON.stringify({ driver: 'null-co', 'node-name': 'big', size: 8 * GiB, 'read-zeroes': true }),
    '--nbd-server', `addr.type=unix,addr.path=${sock},max-connections=${MAX_CONNECTIONS}`,
    '--export', 'type=nbd,id=e1,node-name=d0,name=rw,writable=on',
    '--export', 'type=nbd,id=e0,node-name=d0,name=ro',
    '--export', 'type=nbd,id=e2,node-name=big,name=big',
  ]);
});

after(async () => {
  assert.equal(await d.stop(), 0, `exit code; stderr: ${d.stderr()}`);
  await cleanup();
});

/** A fresh client reads the first 1 MiB of ro and finds 0x11, and the monitor answers: all is well. */
async function stillServing(): Promise<void> {
  const c = await WireClient.connect(sock);
  await c.open('ro');
  c.request(P.NBD_CMD.READ, 0, MiB, 1n);
  const chunks = await c.chunks();
  const data = Buffer.concat(chunks.map((ch) => ch.payload.subarray(8)));
  assert.ok(data.equals(Buffer.alloc(MiB, 0x11)), 'data read by a fresh client');
  c.destroy();
  await d.qmp.execute('query-version');
}

function errorOf(chunk: P.ReplyHeader | { type: number; payload: Buffer }): number {
  if ('payload' in chunk) return P.parseErrorPayload(chunk.type, chunk.payload).error;
  return chunk.kind === 'simple' ? chunk.error : -1;
}

test('handshake: hostile options get an error reply or a closed connection', async () => {
  // Unknown client flags: the server must drop the connection.
  let c = await WireClient.connect(sock);
  await c.start(0x80 | P.NBD_FLAG_C_FIXED_NEWSTYLE);
  await c.closed;

  // A bad option magic.
  c = await WireClient.connect(sock);
  await c.start();
  c.send(Buffer.concat([Buffer.from('IHAVEOPS'), Buffer.alloc(8)]));
  await c.closed;

  // An option claiming more data than the server takes.
  c = await WireClient.connect(sock);
  await c.start();
  const huge = P.encodeOption(P.NBD_OPT.GO);
  huge.writeUInt32BE(64 * MiB, 12);
  c.send(huge);
  await c.closed;

  // A client that goes away in the middle of an option.
  c = await WireClient.connect(sock);
  await c.start();
  c.send(P.encodeOption(P.NBD_OPT.GO, Buffer.alloc(100)).subarray(0, 40));
  c.destroy();

  // Errors the session survives, then a normal GO.
  c = await WireClient.connect(sock);
  assert.equal(await c.start(), P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  const expectError = async (option: number, data: Buffer, type: number) => {
    const r = await c.option(option, data);
    assert.equal(r.length, 1);
    assert.equal(r[0].type, type, `option ${option}: ${r[0].data.toString()}`);
  };
  await expectError(99, Buffer.from('whatever'), P.NBD_REP.ERR_UNSUP);
  await expectError(P.NBD_OPT.STARTTLS, Buffer.alloc(0), P.NBD_REP.ERR_POLICY);
  await expectError(P.NBD_OPT.SET_META_CONTEXT, P.encodeMetaContextRequest({ name: 'ro', queries: ['base:allocation'] }), P.NBD_REP.ERR_INVALID);
  await expectError(P.NBD_OPT.LIST, Buffer.alloc(3), P.NBD_REP.ERR_INVALID);
  await expectError(P.NBD_OPT.GO, Buffer.from([0, 0, 0, 9, 1]), P.NBD_REP.ERR_INVALID);
  await expectError(P.NBD_OPT.GO, P.encodeInfoRequest({ name: 'nope', requests: [] }), P.NBD_REP.ERR_UNKNOWN);
  assert.equal((await c.option(P.NBD_OPT.STRUCTURED_REPLY))[0].type, P.NBD_REP.ACK);
  await expectError(P.NBD_OPT.STRUCTURED_REPLY, Buffer.alloc(0), P.NBD_REP.ERR_INVALID);
  // SET with a wildcard selects nothing; LIST with one lists.
  const set = await c.option(P.NBD_OPT.SET_META_CONTEXT, P.encodeMetaContextRequest({ name: 'ro', queries: ['base:', 'qemu:', 'x-unknown:foo', 'base:allocation'] }));
  assert.deepEqual(set.map((r) => r.type), [P.NBD_REP.META_CONTEXT, P.NBD_REP.ACK]);
  assert.deepEqual(P.parseRepMetaContext(set[0].data), { id: 0, name: 'base:allocation' });
  const list = await c.option(P.NBD_OPT.LIST, Buffer.alloc(0));
  assert.deepEqual(list.filter((r) => r.type === P.NBD_REP.SERVER).map((r) => P.parseRepServer(r.data).name), ['rw', 'ro', 'big']);
  const info = await c.option(P.NBD_OPT.INFO, P.encodeInfoRequest({ name: 'rw', requests: [P.NBD_INFO.NAME, P.NBD_INFO.BLOCK_SIZE] }));
  const items = info.filter((r) => r.type === P.NBD_REP.INFO).map((r) => P.parseInfoReply(r.data));
  assert.deepEqual(items[0], { type: 'name', name: 'rw' });
  assert.deepEqual(items.find((i) => i.type === 'export'), { type: 'export', size: BigInt(8 * MiB), flags: 0x0ded });
  assert.equal(info[info.length - 1].type, P.NBD_REP.ACK);
  // EXPORT_NAME: size, flags and no padding (NO_ZEROES was agreed).
  c.send(P.encodeOption(P.NBD_OPT.EXPORT_NAME, Buffer.from('ro')));
  const reply = await c.reader.read(10);
  assert.equal(reply.readBigUInt64BE(0), BigInt(8 * MiB));
  assert.equal(reply.readUInt16BE(8), 0x058f);
  c.request(P.NBD_CMD.BLOCK_STATUS, 0, 8 * MiB, 7n);
  const [bs] = await c.chunks();
  assert.equal(bs.type, P.NBD_REPLY_TYPE.BLOCK_STATUS);
  assert.equal(P.parseBlockStatus(bs.type, bs.payload).contextId, 0);
  c.destroy();

  // EXPORT_NAME of an unknown export: no error is possible, the session ends.
  c = await WireClient.connect(sock);
  await c.start(P.NBD_FLAG_C_FIXED_NEWSTYLE);
  c.send(P.encodeOption(P.NBD_OPT.EXPORT_NAME, Buffer.from('nope')));
  await c.closed;
  // ABORT is acknowledged.
  c = await WireClient.connect(sock);
  await c.start();
  assert.equal((await c.option(P.NBD_OPT.ABORT))[0].type, P.NBD_REP.ACK);
  await c.closed;
  await stillServing();
});

test('transmission: bad requests get errors; a bad magic, an oversized write or a half request end only that connection', async () => {
  const c = await WireClient.connect(sock);
  await c.open('rw');
  const simpleOrChunk = async () => {
    const r = await c.reply();
    return r.kind === 'simple' ? r.error : P.parseErrorPayload(r.type, r.payload).error;
  };
  c.request(42, 0, 512, 1n);
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.EINVAL, 'unknown command');
  c.request(P.NBD_CMD.FLUSH, 0, 0, 2n, P.NBD_CMD_FLAG.REQ_ONE);
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.EINVAL, 'flag not allowed');
  c.request(P.NBD_CMD.READ, 0, 33 * MiB, 3n);
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.EINVAL, 'read over 32 MiB');
  c.request(P.NBD_CMD.READ, 8 * MiB - 512, 1024, 4n);
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.EINVAL, 'read past the end');
  c.request(P.NBD_CMD.WRITE, 8 * MiB, 512, 5n, 0, Buffer.alloc(512));
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.ENOSPC, 'write past the end');
  c.request(P.NBD_CMD.TRIM, 2n ** 63n, 512, 6n);
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.EINVAL, 'trim at a huge offset');
  c.request(P.NBD_CMD.BLOCK_STATUS, 0, 512, 7n);
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.EINVAL, 'block status without a context');
  // A misaligned write and read are served (read-modify-write below).
  c.request(P.NBD_CMD.WRITE, 4 * MiB + 3, 5, 8n, P.NBD_CMD_FLAG.FUA, Buffer.from('hello'));
  assert.equal(await simpleOrChunk(), 0);
  c.request(P.NBD_CMD.READ, 4 * MiB + 1, 9, 9n);
  const data = Buffer.concat((await c.chunks()).map((ch) => ch.payload.subarray(8)));
  assert.deepEqual([...data], [0x22, 0x22, ...Buffer.from('hello'), 0x22, 0x22]);
  // A write whose payload is larger than the server takes: refused, and the session ends.
  c.request(P.NBD_CMD.WRITE, 0, 64 * MiB, 10n);
  assert.equal(await simpleOrChunk(), P.NBD_ERRNO.EINVAL);
  await c.closed;

  // A bad request magic.
  const c2 = await WireClient.connect(sock);
  await c2.open('rw');
  c2.send(Buffer.alloc(28, 0xee));
  await c2.closed;

  // A client that dies in the middle of a write's payload: the write is not made.
  const c3 = await WireClient.connect(sock);
  await c3.open('rw');
  c3.request(P.NBD_CMD.WRITE, 0, 4096, 11n, 0, Buffer.alloc(4096, 0xff).subarray(0, 1000));
  c3.send(Buffer.alloc(1000, 0xff));
  c3.destroy();
  await stillServing();
});

test('a client that stops reading its replies holds only itself; others are served meanwhile', { timeout: 120_000 }, async () => {
  const slow = await WireClient.connect(sock);
  await slow.open('ro');
  // Far more replies than socket buffers hold, none of them read.
  for (let i = 0; i < 200; i++) slow.request(P.NBD_CMD.READ, 0, 4 * MiB, BigInt(i));
  for (let i = 0; i < 3; i++) await stillServing();
  slow.destroy();
  await stillServing();
});

test('several clients with many requests in flight each are served at once, and get their own data', { timeout: 120_000 }, async () => {
  const clients = await Promise.all(Array.from({ length: 6 }, () => WireClient.connect(sock)));
  await Promise.all(clients.map((c) => c.open('rw')));
  // Each client writes its own 64 KiB blocks, 16 requests in flight, then reads them back with 16 in flight.
  await Promise.all(
    clients.map(async (c, k) => {
      for (let i = 0; i < 16; i++) c.request(P.NBD_CMD.WRITE, (2 * MiB) + (k * 16 + i) * 4096, 4096, BigInt(i), 0, Buffer.alloc(4096, k * 16 + i));
      for (let i = 0; i < 16; i++) {
        const r = await c.reply();
        assert.equal(r.kind === 'simple' ? r.error : -1, 0);
      }
      for (let i = 0; i < 16; i++) c.request(P.NBD_CMD.READ, (2 * MiB) + (k * 16 + i) * 4096, 4096, BigInt(100 + i));
      const got = new Map<bigint, Buffer>();
      for (let i = 0; i < 16; ) {
        const r = await c.reply();
        assert.equal(r.kind, 'chunk');
        if (r.kind !== 'chunk') return;
        got.set(r.cookie, Buffer.concat([got.get(r.cookie) ?? Buffer.alloc(0), r.payload.subarray(8)]));
        if (r.flags & P.NBD_REPLY_FLAG_DONE) i++;
      }
      for (let i = 0; i < 16; i++) assert.ok(got.get(BigInt(100 + i))!.equals(Buffer.alloc(4096, k * 16 + i)), `client ${k} block ${i}`);
    }),
  );
  // Clients over max-connections wait (nbd-max-connections.test.ts); these leave, the server serves on.
  for (const c of clients) c.destroy();
  await stillServing();
});

test('extended headers: 64-bit requests, extended reply headers, BLOCK_STATUS_EXT, errors as chunks', async () => {
  const c = await WireClient.connect(sock);
  await c.start();
  assert.equal((await c.option(P.NBD_OPT.EXTENDED_HEADERS))[0].type, P.NBD_REP.ACK);
  assert.equal((await c.option(P.NBD_OPT.EXTENDED_HEADERS))[0].type, P.NBD_REP.ERR_INVALID);
  assert.equal((await c.option(P.NBD_OPT.STRUCTURED_REPLY))[0].type, P.NBD_REP.ERR_INVALID);
  await c.option(P.NBD_OPT.SET_META_CONTEXT, P.encodeMetaContextRequest({ name: 'big', queries: ['base:allocation'] }));
  const go = await c.option(P.NBD_OPT.GO, P.encodeInfoRequest({ name: 'big', requests: [] }));
  assert.equal(go[go.length - 1].type, P.NBD_REP.ACK);
  c.extended = true;
  // A block status over 6 GiB: one 64-bit extent.
  c.request(P.NBD_CMD.BLOCK_STATUS, GiB, 6 * GiB, 1n);
  const [bs] = await c.chunks();
  assert.equal(bs.type, P.NBD_REPLY_TYPE.BLOCK_STATUS_EXT);
  assert.equal(bs.offset, BigInt(GiB), 'the extended header echoes the offset');
  assert.deepEqual(P.parseBlockStatus(bs.type, bs.payload), { contextId: 0, extents: [{ length: 6 * GiB, flags: P.NBD_STATE_HOLE | P.NBD_STATE_ZERO }] });
  // A read of zeroes: a hole chunk; a flush: a NONE chunk (no simple replies with extended headers).
  c.request(P.NBD_CMD.READ, 5 * GiB, 4096, 2n);
  const [hole] = await c.chunks();
  assert.equal(hole.type, P.NBD_REPLY_TYPE.OFFSET_HOLE);
  assert.deepEqual(P.parseOffsetHole(hole.payload), { offset: BigInt(5 * GiB), size: 4096 });
  c.request(P.NBD_CMD.FLUSH, 0, 0, 3n);
  const [none] = await c.chunks();
  assert.deepEqual([none.type, none.flags, none.payload.length], [P.NBD_REPLY_TYPE.NONE, P.NBD_REPLY_FLAG_DONE, 0]);
  // Errors are ERROR chunks: a read-only export, a read past the end.
  c.request(P.NBD_CMD.WRITE, 0, 512, 4n, P.NBD_CMD_FLAG.PAYLOAD_LEN, Buffer.alloc(512));
  assert.equal(errorOf((await c.chunks())[0]), P.NBD_ERRNO.EPERM);
  c.request(P.NBD_CMD.READ, 8 * GiB, 512, 5n);
  assert.equal(errorOf((await c.chunks())[0]), P.NBD_ERRNO.EINVAL);
  // A compact request after extended headers were agreed is a protocol violation.
  // (Two of them, so that a whole 32-byte header has arrived.)
  const compact = P.encodeRequest({ flags: 0, type: P.NBD_CMD.READ, cookie: 6n, offset: 0n, length: 512n }, false);
  c.send(Buffer.concat([compact, compact]));
  await c.closed;

  // EXPORT_NAME may not be used with extended headers.
  const c2 = await WireClient.connect(sock);
  await c2.start();
  await c2.option(P.NBD_OPT.EXTENDED_HEADERS);
  c2.send(P.encodeOption(P.NBD_OPT.EXPORT_NAME, Buffer.from('big')));
  await c2.closed;
  await stillServing();
});

test('block-export-del: safe refuses while a client is connected, hard disconnects it; BLOCK_EXPORT_DELETED once it is gone', async () => {
  await d.qmp.execute('block-export-add', { type: 'nbd', id: 'tmp', 'node-name': 'd0', name: 'tmp' });
  const c = await WireClient.connect(sock);
  await c.open('tmp');
  const err = await d.qmp.request('block-export-del', { id: 'tmp' });
  assert.deepEqual('error' in err && err.error, { class: 'GenericError', desc: "export 'tmp' still in use" });
  await d.qmp.execute('block-export-del', { id: 'tmp', mode: 'hard' });
  await c.closed;
  const ev = await d.qmp.waitEvent('BLOCK_EXPORT_DELETED');
  assert.deepEqual(ev.data, { id: 'tmp' });
  const exports = (await d.qmp.execute('query-block-exports')) as Array<{ id: string }>;
  assert.deepEqual(exports.map((e) => e.id), ['e2', 'e0', 'e1']);
  await stillServing();
});
