/**
 * QEMU writes, we read; we write, QEMU reads. Images from qemu-img create / qemu-io / convert -c
 * (compressed) / snapshots read back identical to `qemu-img convert -O raw`, and images we write pass
 * `qemu-io -c 'read -P'`.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { readFile, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph, openQcow2File } from '../support/graph.js';
import { randomBytes, rng } from '../support/random.js';

async function readAllOurs(img: string, extra: Record<string, unknown> = {}): Promise<Buffer> {
  const g = newGraph();
  try {
    const n = await openQcow2File(g, img, { 'read-only': true, ...extra });
    return await n.read(0, n.length());
  } finally {
    await g.closeAll();
  }
}

async function qemuRaw(dir: string, img: string): Promise<Buffer> {
  const out = path.join(dir, 'qemu-out.raw');
  await mustRun('qemu-img', ['convert', '-O', 'raw', img, out]);
  return readFile(out);
}

const PATTERNS = ['write -P 0xab 0 64k', 'write -P 0xcd 1M 4k', 'write -P 0x11 3000k 300k', 'write -z 64k 64k', 'write -P 0x22 200k 8k', 'write -z 200k 4k', 'write -P 0x33 7M 1M', 'discard 7M 64k'];

for (const [label, opts] of [
  ['v3 64k', 'cluster_size=65536'],
  ['v3 4k', 'cluster_size=4096'],
  ['v3 512', 'cluster_size=512'],
  ['v3 2M', 'cluster_size=2M'],
  ['v2 64k', 'compat=0.10'],
  ['refcount_bits=1', 'refcount_bits=1'],
] as const) {
  test(`qemu-io written image (${label}) reads identical`, async () => {
    const { dir, cleanup } = await tempDir();
    try {
      const img = path.join(dir, 'a.qcow2');
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, img, '16M']);
      await mustRun('qemu-io', ['-f', 'qcow2', ...PATTERNS.flatMap((c) => ['-c', c]), img]);
      assert.ok((await readAllOurs(img)).equals(await qemuRaw(dir, img)));
    } finally {
      await cleanup();
    }
  });
}

test('compressed image (qemu-img convert -c) reads identical, and stays right after our overwrites', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const src = path.join(dir, 'src.raw');
    const rand = rng(5);
    const content = Buffer.alloc(8 << 20);
    for (let i = 0; i < content.length; i += 4096) if (rand() < 0.6) randomBytes(rand, 4096).map((b) => b & 0x0f).forEach((b, k) => (content[i + k] = b));
    for (const cs of ['65536', '4096', '2M']) {
      await writeFile(src, content);
      const img = path.join(dir, `c${cs}.qcow2`);
      await mustRun('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', `cluster_size=${cs}`, src, img]);
      assert.ok((await readAllOurs(img)).equals(content), `compressed ${cs}`);
      // Overwrite parts of compressed clusters: COW out of the compressed data, free the old one.
      const g = newGraph();
      const n = await openQcow2File(g, img);
      await n.write(12345, Buffer.alloc(1000, 0x77));
      content.fill(0x77, 12345, 13345);
      await n.writeZeroes(1 << 20, 1 << 20, { mayUnmap: true });
      content.fill(0, 1 << 20, 2 << 20);
      await g.closeAll();
      const check = await run('qemu-img', ['check', img]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      assert.ok((await qemuRaw(dir, img)).equals(content), `after overwrite ${cs}`);
    }
  } finally {
    await cleanup();
  }
});

test('image with an internal snapshot: we read the active layer and COW shared clusters', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = path.join(dir, 's.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xaa 0 1M', img]);
    await mustRun('qemu-img', ['snapshot', '-c', 'snap1', img]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xbb 64k 64k', img]);
    const g = newGraph();
    const n = await openQcow2File(g, img);
    await n.write(300 << 10, Buffer.alloc(4096, 0xcc));
    await g.closeAll();
    const check = await run('qemu-img', ['check', img]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    const r = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0xaa 0 64k', '-c', 'read -P 0xbb 64k 64k', '-c', 'read -P 0xcc 300k 4k', '-c', 'read -P 0xaa 304k 720k', img]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    // The snapshot still holds the old data.
    await mustRun('qemu-img', ['snapshot', '-a', 'snap1', img]);
    const r2 = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0xaa 0 1M', img]);
    assert.equal(r2.code, 0, r2.stdout + r2.stderr);
  } finally {
    await cleanup();
  }
});

test('images we write read back with qemu-io read -P; backing chain via header', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 4M', base]);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    const g = newGraph();
    const n = await openQcow2File(g, top);
    assert.equal(n.backing()?.driver, 'qcow2');
    await n.write(1000, Buffer.alloc(5000, 0x02)); // partial clusters: COW from the backing file
    await n.writeZeroes(1 << 20, 64 << 10, {});
    const st = await n.blockStatus(2 << 20, 4096);
    assert.equal(st.allocated, false);
    const info = n.imageInfo();
    assert.equal(info['backing-filename'], 'base.qcow2');
    assert.equal(info['backing-filename-format'], 'qcow2');
    await g.closeAll();
    const r = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x01 0 1000', '-c', 'read -P 0x02 1000 5000', '-c', 'read -P 0x01 6000 59536', '-c', 'read -P 0 1M 64k', '-c', 'read -P 0x01 1088k 1M', top]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const check = await run('qemu-img', ['check', top]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    // backing: null opens without the backing file: unallocated reads as zeroes.
    const g2 = newGraph();
    const n2 = await openQcow2File(g2, top, { backing: null, 'read-only': true });
    assert.equal(n2.backing(), undefined);
    assert.ok((await n2.read(2 << 20, 4096)).equals(Buffer.alloc(4096)));
    await g2.closeAll();
  } finally {
    await cleanup();
  }
});

test('dirty image (lazy refcounts, crashed) is repaired on read-write open', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = path.join(dir, 'd.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '8M']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 192k', img]);
    // Simulate a crash after deferred refcount updates: dirty bit set, data refcounts lost.
    const buf = await readFile(img);
    buf.writeBigUInt64BE(buf.readBigUInt64BE(72) | 1n, 72);
    // Refcount block at 0x20000: clusters 5 and 6 (data) back to 0.
    buf.writeUInt16BE(0, 0x20000 + 5 * 2);
    buf.writeUInt16BE(0, 0x20000 + 6 * 2);
    await writeFile(img, buf);
    assert.equal((await run('qemu-img', ['check', img])).code, 2);
    const g = newGraph();
    const n = await openQcow2File(g, img);
    assert.equal(n.imageInfo()['dirty-flag'], false);
    await n.write(1 << 20, Buffer.alloc(4096, 0x6b));
    await g.closeAll();
    const check = await run('qemu-img', ['check', img]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    const r = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x5a 0 192k', '-c', 'read -P 0x6b 1M 4k', img]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  } finally {
    await cleanup();
  }
});
