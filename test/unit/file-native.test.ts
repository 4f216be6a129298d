/**
 * The file driver's use of the native addon: block status from SEEK_DATA/SEEK_HOLE, discard as a
 * punched hole, write-zeroes as ZERO_RANGE, O_DIRECT with aligned buffers, reads from the page cache
 * on the event loop.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, truncateSync, statSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { fileDriver, FileNode } from '../../src/block/drivers/file.js';
import { nativeAddon } from '../../src/block/native.js';
import type { BlockNode, BlockStatus } from '../../src/block/node.js';

const MiB = 1 << 20;

function tmp(): { dir: string; done: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'bm-file-'));
  return { dir, done: () => rmSync(dir, { recursive: true, force: true }) };
}

async function open(opts: Record<string, unknown>): Promise<{ graph: BlockGraph; node: FileNode }> {
  const graph = new BlockGraph();
  graph.registerDriver(fileDriver);
  const node = (await graph.open({ driver: 'file', locking: 'off', ...opts })) as FileNode;
  return { graph, node };
}

/** The whole map of a node as [offset, bytes, zero, data] runs. */
async function map(node: BlockNode): Promise<[number, number, boolean, boolean][]> {
  const out: [number, number, boolean, boolean][] = [];
  for (let off = 0; off < node.length(); ) {
    const st: BlockStatus = await node.blockStatus(off, node.length() - off);
    const last = out[out.length - 1];
    if (last && last[2] === st.zero && last[3] === st.data) last[1] += st.bytes;
    else out.push([off, st.bytes, st.zero, st.data]);
    assert.equal(st.allocated, true);
    off += st.bytes;
  }
  return out;
}

function blocksUsed(path: string): number {
  return statSync(path).blocks * 512;
}

test('native addon is built', () => {
  assert.ok(nativeAddon(), 'run npm run build:native');
});

test('block status of a sparse file: holes read as zero, not data', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 'sparse.img');
    writeFileSync(f, '');
    truncateSync(f, 4 * MiB);
    const { graph, node } = await open({ filename: f });
    assert.deepEqual(await map(node), [[0, 4 * MiB, true, false]]);
    await node.write(MiB, Buffer.alloc(64 * 1024, 0xab));
    assert.deepEqual(await map(node), [
      [0, MiB, true, false],
      [MiB, 64 * 1024, false, true],
      [MiB + 64 * 1024, 3 * MiB - 64 * 1024, true, false],
    ]);
    // A request smaller than the run stops at its end.
    const st = await node.blockStatus(MiB + 4096, 4096);
    assert.deepEqual(st, { bytes: 4096, zero: false, data: true, allocated: true });
    await graph.closeAll();
  } finally {
    t.done();
  }
});

test('discard punches a hole only with discard=unmap', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 'd.img');
    writeFileSync(f, Buffer.alloc(2 * MiB, 0x5a));
    {
      const { graph, node } = await open({ filename: f });
      await node.discard(0, MiB);
      assert.deepEqual(await map(node), [[0, 2 * MiB, false, true]], 'discard=ignore is a no-op');
      await graph.closeAll();
    }
    const { graph, node } = await open({ filename: f, discard: 'unmap' });
    const before = blocksUsed(f);
    await node.discard(0, MiB);
    assert.deepEqual(await map(node), [
      [0, MiB, true, false],
      [MiB, MiB, false, true],
    ]);
    assert.ok(blocksUsed(f) <= before - MiB, 'space is freed');
    assert.equal(statSync(f).size, 2 * MiB, 'size is kept');
    assert.ok((await node.read(0, MiB)).equals(Buffer.alloc(MiB)));
    assert.ok((await node.read(MiB, MiB)).equals(Buffer.alloc(MiB, 0x5a)));
    await graph.closeAll();
  } finally {
    t.done();
  }
});

test('write-zeroes: ZERO_RANGE keeps allocation, may-unmap with discard=unmap punches', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 'z.img');
    writeFileSync(f, Buffer.alloc(2 * MiB, 0x77));
    const { graph, node } = await open({ filename: f, discard: 'unmap' });
    const before = blocksUsed(f);
    await node.writeZeroes(0, MiB);
    assert.ok((await node.read(0, MiB)).equals(Buffer.alloc(MiB)));
    assert.ok(blocksUsed(f) >= before - 64 * 1024, 'ZERO_RANGE does not deallocate');
    await node.writeZeroes(MiB, MiB, { mayUnmap: true });
    assert.ok((await node.read(MiB, MiB)).equals(Buffer.alloc(MiB)));
    const st = await node.blockStatus(MiB, MiB);
    assert.deepEqual([st.zero, st.data], [true, false]);
    assert.equal(statSync(f).size, 2 * MiB);
    // Unaligned write-zeroes in the middle of data.
    await node.write(0, Buffer.alloc(8192, 1));
    await node.writeZeroes(100, 1000);
    const b = await node.read(0, 8192);
    assert.equal(b.subarray(100, 1100).every((x) => x === 0), true);
    assert.equal(b[99], 1);
    assert.equal(b[1100], 1);
    await graph.closeAll();
  } finally {
    t.done();
  }
});

test('write-zeroes past a punched tail keeps the file size', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 't.img');
    writeFileSync(f, Buffer.alloc(MiB, 3));
    const { graph, node } = await open({ filename: f, discard: 'unmap' });
    await node.writeZeroes(MiB - 4096, 4096, { mayUnmap: true });
    assert.equal(statSync(f).size, MiB);
    await graph.closeAll();
  } finally {
    t.done();
  }
});

test('cache.direct=on: O_DIRECT with probed alignment, unaligned requests and tail', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 'direct.img');
    const size = MiB + 1000; // not a multiple of any alignment
    const content = Buffer.alloc(size);
    for (let i = 0; i < size; i++) content[i] = (i * 7) & 0xff;
    writeFileSync(f, content);
    const { graph, node } = await open({ filename: f, cache: { direct: true }, aio: 'native' });
    assert.ok([512, 1024, 2048, 4096].includes(node.requestAlignment), `alignment ${node.requestAlignment}`);
    assert.ok((await node.read(0, size)).equals(content));
    assert.ok((await node.read(13, 777)).equals(content.subarray(13, 790)));
    const patch = Buffer.alloc(5000, 0xee);
    await node.write(3, patch);
    patch.copy(content, 3);
    await node.write(size - 10, Buffer.alloc(10, 0xcd));
    content.fill(0xcd, size - 10);
    await node.writeZeroes(8192, 4096);
    content.fill(0, 8192, 8192 + 4096);
    await node.flush();
    assert.ok((await node.read(0, size)).equals(content));
    await graph.closeAll();
    // The node is 512-byte sectors long, as in QEMU: the aligned write of the last sector extends the
    // file to the sector boundary with zeroes (QEMU's read-modify-write of the tail does the same).
    const onDisk = readFileSync(f);
    assert.equal(onDisk.length, Math.ceil(size / 512) * 512);
    assert.ok(onDisk.subarray(0, size).equals(content));
    assert.ok(onDisk.subarray(size).equals(Buffer.alloc(onDisk.length - size)));
  } finally {
    t.done();
  }
});

test('aio=native without cache.direct is refused as QEMU does', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 'a.img');
    writeFileSync(f, Buffer.alloc(4096));
    await assert.rejects(open({ filename: f, aio: 'native' }), {
      message: 'aio=native was specified, but it requires cache.direct=on, which was not specified.',
    });
    const { graph } = await open({ filename: f, aio: 'io_uring' });
    await graph.closeAll();
  } finally {
    t.done();
  }
});

test('a FUA write is one pwritev2(RWF_DSYNC): the bytes land where asked, the file grows, no flush of the whole file', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 'a.img');
    writeFileSync(f, Buffer.alloc(MiB, 0x11));
    const { graph, node } = await open({ filename: f });
    const fh = (node as unknown as { fh: { fd: number } }).fh;
    const data = Buffer.alloc(3000, 0x5a);
    assert.equal(await nativeAddon()!.pwriteDsync!(fh.fd, data, MiB - 1000), 3000);
    assert.equal(statSync(f).size, MiB + 2000);
    assert.ok(readFileSync(f).subarray(MiB - 1000).equals(data));
    // Through the node: FUA takes the same path; the fallback (write, then fdatasync) would call doFlush.
    let flushes = 0;
    const n = node as unknown as { doFlush: () => Promise<void> };
    const doFlush = n.doFlush.bind(node);
    n.doFlush = () => (flushes++, doFlush());
    await node.write(2 * MiB, Buffer.alloc(512, 0x6b), { fua: true });
    assert.equal(flushes, 0);
    assert.equal(node.length(), 2 * MiB + 512);
    assert.ok(readFileSync(f).subarray(2 * MiB).equals(Buffer.alloc(512, 0x6b)));
    await node.write(0, Buffer.alloc(512, 1));
    await node.flush();
    assert.equal(flushes, 1, 'a flush still flushes');
    await graph.closeAll();
  } finally {
    t.done();
  }
});

test('reads take what the page cache holds on the event loop (readCached) and the rest through the pool', async () => {
  const t = tmp();
  try {
    const f = join(t.dir, 'c.img');
    const data = Buffer.alloc(4 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    writeFileSync(f, data);
    const { graph, node } = await open({ filename: f });
    const fd = (node as unknown as { fh: { fd: number } }).fh.fd;
    const n = nativeAddon()!;
    // Just written: cached, so all of it comes at once; at the end of the file, what is there.
    const buf = Buffer.alloc(MiB);
    assert.equal(n.readCached!(fd, buf, MiB), MiB);
    assert.ok(buf.equals(data.subarray(MiB, 2 * MiB)));
    assert.equal(n.readCached!(fd, buf, 4 * MiB - 1000), 1000);
    assert.equal(n.readCached!(fd, buf, 4 * MiB), 0);
    // Write back, then drop the second half from the page cache (posix_fadvise DONTNEED through dd):
    // readCached stops where the cache does (on tmpfs nothing is dropped), and a read through the
    // node, cached part and pool part together, is the file's bytes.
    execFileSync('sync', [f]);
    execFileSync('dd', [`if=${f}`, 'of=/dev/null', 'iflag=nocache', 'bs=1M', 'skip=2', 'count=2', 'status=none']);
    const head = Buffer.alloc(4 * MiB);
    const got = n.readCached!(fd, head, 0);
    assert.ok(got >= 0 && got <= 4 * MiB, `readCached returned ${got}`);
    assert.ok(head.subarray(0, got).equals(data.subarray(0, got)));
    assert.ok((await node.read(0, 4 * MiB)).equals(data));
    const into = Buffer.alloc(3 * MiB);
    await node.readInto(MiB, into);
    assert.ok(into.equals(data.subarray(MiB)));
    await graph.closeAll();
  } finally {
    t.done();
  }
});
