/**
 * READ replies whose data goes by reference (sendfile): a read-only qcow2 in memory (tmpfs) exported
 * over NBD. Every reply comes in order and whole, whatever mix of replies by reference and by copy
 * (small reads, holes, errors) a client asks for, also when the client reads slowly so that replies
 * wait for the socket, and when a read's clusters lie apart in the file; nbdcopy's copy of the export
 * is the image's data. A writable node's data
 * is never sent by reference (its bytes could change while they wait), and neither is a file on disk.
 */
import { test, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import * as P from '../../src/nbd/protocol.js';
import { mustRun } from '../support/tools.js';
import { WireClient, type Chunk } from '../support/nbd-wire.js';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { newGraph, openQcow2File } from '../support/graph.js';
import { poll } from '../support/wait.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;
const TMPFS_MAGIC = 0x01021994;
const CLUSTER = 64 * 1024;
/** The scattered image: its size, and the byte each of its clusters holds. */
const SCATTERED = 2 * MiB;
const scatteredByte = (cluster: number): number => (cluster * 5 + 3) & 0xff;

let memoryDir: string | undefined;
let dir: string;
let d: SpawnedDaemon;
let sock: string;
/** The image's guest data. */
let data: Buffer;

before(async () => {
  // /dev/shm is tmpfs on Linux machines; where it is not, this file has nothing to test.
  memoryDir = await fsp.statfs('/dev/shm').then((s) => (s.type === TMPFS_MAGIC ? '/dev/shm' : undefined), () => undefined);
  if (!memoryDir) return;
  dir = await fsp.mkdtemp(path.join(memoryDir, 'bm-nbd-sendfile-'));
  // A different byte in every 4 KiB block, a hole at 2-3 MiB, and an odd-sized data run after it.
  data = Buffer.alloc(SIZE);
  for (let b = 0; b < SIZE / 4096; b++) data.fill((b * 7 + 1) & 0xff, b * 4096, (b + 1) * 4096);
  data.fill(0, 2 * MiB, 3 * MiB);
  const raw = path.join(dir, 'src.raw');
  await fsp.writeFile(raw, data);
  const image = path.join(dir, 'disk.qcow2');
  await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
  // The same data with its clusters in the file in reverse order: a read spans several host ranges.
  const scattered = path.join(dir, 'scattered.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', scattered, String(SCATTERED)]);
  const writes: string[] = [];
  for (let c = SCATTERED / CLUSTER - 1; c >= 0; c--) writes.push('-c', `write -P ${scatteredByte(c)} ${c * CLUSTER} ${CLUSTER}`);
  await mustRun('qemu-io', ['-f', 'qcow2', ...writes, scattered]);
  sock = path.join(dir, 'nbd.sock');
  d = await spawnDaemon(path.join(dir, 'qmp.sock'), [
    '--blockdev', `driver=file,node-name=f0,filename=${image}`,
    '--blockdev', 'driver=qcow2,node-name=d0,file=f0,read-only=on',
    '--blockdev', `driver=file,node-name=f1,filename=${scattered}`,
    '--blockdev', 'driver=qcow2,node-name=d1,file=f1,read-only=on',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=e0,node-name=d0,name=ro',
    '--export', 'type=nbd,id=e1,node-name=d1,name=scattered',
    '--trace', 'nbd_send_file',
  ]);
});

after(async () => {
  if (!memoryDir) return;
  assert.equal(await d.stop(), 0, `exit code; stderr: ${d.stderr()}`);
  await fsp.rm(dir, { recursive: true, force: true });
});

/** The bytes a READ reply's chunks describe, [offset, +length) of the export; or its error. */
function assemble(chunks: Chunk[], offset: number, length: number): Buffer | number {
  const out = Buffer.alloc(length, 0xee);
  let covered = 0;
  for (const c of chunks) {
    if (c.type === P.NBD_REPLY_TYPE.OFFSET_DATA) {
      const at = Number(c.payload.readBigUInt64BE(0)) - offset;
      c.payload.copy(out, at, 8);
      covered += c.payload.length - 8;
    } else if (c.type === P.NBD_REPLY_TYPE.OFFSET_HOLE) {
      const h = P.parseOffsetHole(c.payload);
      out.fill(0, Number(h.offset) - offset, Number(h.offset) - offset + h.size);
      covered += h.size;
    } else if (c.type === P.NBD_REPLY_TYPE.ERROR) {
      return P.parseErrorPayload(c.type, c.payload).error;
    }
  }
  assert.equal(covered, length, 'the chunks cover the request');
  return out;
}

/** Read the chunks of `count` replies, in whatever order they come: by cookie. */
async function replies(c: WireClient, count: number): Promise<Map<bigint, Chunk[]>> {
  const byCookie = new Map<bigint, Chunk[]>();
  let done = 0;
  while (done < count) {
    const r = await c.reply();
    if (r.kind !== 'chunk') throw new Error('simple reply where chunks were expected');
    const list = byCookie.get(r.cookie) ?? [];
    list.push(r);
    byCookie.set(r.cookie, list);
    if (r.flags & P.NBD_REPLY_FLAG_DONE) done++;
  }
  return byCookie;
}

/** Reads of every kind: large ones (by reference), small ones (copied), over the hole, unaligned, past the end. */
function mixedReads(): Array<{ offset: number; length: number }> {
  const reads: Array<{ offset: number; length: number }> = [];
  for (let i = 0; i < 48; i++) {
    const offset = [0, 1 * MiB + 4096, 2 * MiB - 64 * 1024, 5 * MiB + 512, 7 * MiB + 3][i % 5] + (i % 7) * 65536;
    const length = [256 * 1024, 4096, MiB, 65536 + 512, 3 * MiB][i % 5];
    reads.push({ offset, length });
  }
  reads.push({ offset: SIZE - 4096, length: 8192 });
  return reads;
}

test('mixed READs, read at once: every reply whole and right, data by reference among them', { timeout: 120_000 }, async (t) => {
  if (!memoryDir) return t.skip('/dev/shm is not tmpfs');
  const c = await WireClient.connect(sock);
  await c.open('ro');
  const reads = mixedReads();
  reads.forEach((r, i) => c.request(P.NBD_CMD.READ, r.offset, r.length, BigInt(i)));
  const got = await replies(c, reads.length);
  reads.forEach((r, i) => {
    const out = assemble(got.get(BigInt(i))!, r.offset, r.length);
    if (r.offset + r.length > SIZE) assert.equal(out, P.NBD_ERRNO.EINVAL, 'a read past the end fails');
    else assert.ok(Buffer.isBuffer(out) && out.equals(data.subarray(r.offset, r.offset + r.length)), `read ${i} at ${r.offset}+${r.length}`);
  });
  await d.waitOutput('stderr', /nbd_send_file ranges=1 waits=false/);
  c.destroy();
});

test('a client that reads slowly: replies by reference wait for the socket, in order, and arrive whole', { timeout: 120_000 }, async (t) => {
  if (!memoryDir) return t.skip('/dev/shm is not tmpfs');
  const c = await WireClient.connect(sock);
  await c.open('ro');
  // Far more reply bytes than the socket holds, and none read until the server has had to queue.
  c.socket.pause();
  const reads = mixedReads().filter((r) => r.offset + r.length <= SIZE);
  reads.forEach((r, i) => c.request(P.NBD_CMD.READ, r.offset, r.length, BigInt(i)));
  await d.waitOutput('stderr', /nbd_send_file ranges=1 waits=true/);
  c.socket.resume();
  const got = await replies(c, reads.length);
  reads.forEach((r, i) => {
    const out = assemble(got.get(BigInt(i))!, r.offset, r.length);
    assert.ok(Buffer.isBuffer(out) && out.equals(data.subarray(r.offset, r.offset + r.length)), `read ${i} at ${r.offset}+${r.length}`);
  });
  c.destroy();
});

test('a read over clusters scattered in the file: several host ranges in one reply, by reference', { timeout: 120_000 }, async (t) => {
  if (!memoryDir) return t.skip('/dev/shm is not tmpfs');
  // The daemon's descriptors of the scattered image: its node's own, and the duplicates replies
  // waiting for the socket hold. Only these are counted: sockets of earlier tests' connections may
  // still be closing, and counting all descriptors made `before` too high now and then.
  const image = path.join(dir, 'scattered.qcow2');
  const openFiles = async () => {
    let n = 0;
    for (const fd of await fsp.readdir(`/proc/${d.proc.pid}/fd`)) {
      if ((await fsp.readlink(`/proc/${d.proc.pid}/fd/${fd}`).catch(() => '')) === image) n++;
    }
    return n;
  };
  const before = await openFiles();
  const c = await WireClient.connect(sock);
  await c.open('scattered');
  const reads = [
    { offset: 0, length: SCATTERED },
    { offset: CLUSTER / 2, length: 5 * CLUSTER },
    { offset: 3 * CLUSTER, length: 4 * CLUSTER + 4096 },
  ];
  // Then more whole reads than the socket holds, unread until some had to wait (on descriptors of their own).
  for (let i = 0; i < 24; i++) reads.push({ offset: 0, length: SCATTERED });
  c.socket.pause();
  reads.forEach((r, i) => c.request(P.NBD_CMD.READ, r.offset, r.length, BigInt(i)));
  await d.waitOutput('stderr', new RegExp(`nbd_send_file ranges=${SCATTERED / CLUSTER} waits=true`));
  c.socket.resume();
  const got = await replies(c, reads.length);
  reads.forEach((r, i) => {
    const want = Buffer.alloc(r.length);
    for (let o = 0; o < r.length; o++) want[o] = scatteredByte(Math.floor((r.offset + o) / CLUSTER));
    const out = assemble(got.get(BigInt(i))!, r.offset, r.length);
    assert.ok(Buffer.isBuffer(out) && out.equals(want), `read ${i} at ${r.offset}+${r.length}`);
  });
  c.destroy();
  await poll('the connection closed', async () => (await openFiles()) === before);
  // A client that goes away with replies waiting: the descriptors they held are closed with it.
  const gone = await WireClient.connect(sock);
  await gone.open('scattered');
  gone.socket.pause();
  for (let i = 0; i < 24; i++) gone.request(P.NBD_CMD.READ, 0, SCATTERED, BigInt(i));
  await poll('replies waiting on descriptors of their own', async () => (await openFiles()) > before + 2);
  gone.destroy();
  await poll('the connection and its descriptors closed', async () => (await openFiles()) === before);
});

test('nbdcopy of the export (4 connections) is the image', { timeout: 120_000 }, async (t) => {
  if (!memoryDir) return t.skip('/dev/shm is not tmpfs');
  const out = path.join(dir, 'copy.raw');
  await mustRun('nbdcopy', [`nbd+unix:///ro?socket=${sock}`, out]);
  assert.ok((await fsp.readFile(out)).equals(data));
});

test('only stable bytes go by reference: a read-only qcow2 in memory, not a writable one, nor one on disk', async (t) => {
  if (!memoryDir) return t.skip('/dev/shm is not tmpfs');
  // Copies of the image (the daemon holds the original, and shares no write on it).
  const inMemory = path.join(dir, 'copy.qcow2');
  await fsp.copyFile(path.join(dir, 'disk.qcow2'), inMemory);
  const diskDir = await fsp.mkdtemp(path.join(process.cwd(), '.bm-sendfile-'));
  const onDisk = path.join(diskDir, 'disk.qcow2');
  await fsp.copyFile(inMemory, onDisk);
  try {
    for (const [filename, readOnly, expected] of [
      [inMemory, true, true],
      [inMemory, false, false],
      [onDisk, true, (await fsp.statfs(onDisk)).type === TMPFS_MAGIC],
    ] as const) {
      const g = newGraph();
      const node = await openQcow2File(g, filename, { 'read-only': readOnly });
      try {
        let ranges = 0;
        const sent = await node.sendStable(0, MiB, (r) => (ranges = r.length));
        assert.equal(sent, expected, `${filename} read-only=${readOnly}`);
        if (sent) assert.equal(ranges, 1, 'one contiguous host range');
      } finally {
        await g.closeAll();
      }
    }
  } finally {
    await fsp.rm(diskDir, { recursive: true, force: true });
  }
});
