/**
 * Damaged and unsupported images: each open fails with an error naming the problem, nothing crashes,
 * and the file's bytes are unchanged.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { readFile, writeFile, truncate } from 'node:fs/promises';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph, openQcow2File } from '../support/graph.js';

async function expectRefused(img: string, pattern: RegExp, extra: Record<string, unknown> = {}): Promise<void> {
  const before = await readFile(img);
  const g = newGraph();
  await assert.rejects(openQcow2File(g, img, extra), (err: Error) => {
    assert.match(err.message, pattern);
    return true;
  });
  await g.closeAll();
  assert.ok((await readFile(img)).equals(before), 'file unchanged');
}

async function fresh(dir: string, name = 'a.qcow2', opts: string[] = []): Promise<string> {
  const img = path.join(dir, name);
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, img, '1G']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 128k', img]);
  return img;
}

async function patch(img: string, fn: (b: Buffer) => void): Promise<void> {
  const b = await readFile(img);
  fn(b);
  await writeFile(img, b);
}

const cases: Array<[string, (dir: string) => Promise<string>, RegExp, Record<string, unknown>?]> = [
  ['bad magic', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeUInt32BE(0x12345678, 0)); return i; }, /not in qcow2 format/],
  // A file is read in whole 512-byte sectors (zeroes past its end), as QEMU reads it: QEMU's message.
  // (An L1 table past the end of the file is no damage QEMU refuses: qcow2-l1-past-eof.test.ts.)
  ['truncated to 100 bytes', async (d) => { const i = await fresh(d); await truncate(i, 100); return i; }, /^qcow2 header too short$/],
  ['truncated to 40 bytes', async (d) => { const i = await fresh(d); await truncate(i, 40); return i; }, /^qcow2 header too short$/],
  ['refcount table beyond EOF', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(0x7000000000n, 48)); return i; }, /refcount table .* beyond the end/],
  ['refcount block pointing at the L1 table', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(0x30000n, 0x10000)); return i; }, /refcount block 0 .* overlaps with the active L1 table/],
  ['refcount block pointing at the header', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(0x10000n, 0x10008)); return i; }, /refcount block 1 .* overlaps with the refcount table/],
  ['L2 table pointing at the refcount block', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(0x8000000000020000n, 0x30000)); return i; }, /L2 table 0 .* overlaps with refcount block 0/],
  ['huge virtual size', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(1n << 62n, 24)); return i; }, /too large/],
  ['size larger than the L1 table covers', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(1n << 45n, 24)); return i; }, /L1 table is too small/],
  ['unknown incompatible feature', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(0x20n, 72)); return i; }, /Unsupported qcow2 feature\(s\): Unknown incompatible feature: 20/],
  ['corrupt bit (read-write)', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(0x2n, 72)); return i; }, /Image is corrupt; cannot be opened read\/write/],
  ['external data file', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeBigUInt64BE(0x4n, 72)); return i; }, /external data files are not supported/],
  ['zstd compression', async (d) => { const i = await fresh(d); await patch(i, (b) => { b.writeBigUInt64BE(0x8n, 72); b[104] = 1; }); return i; }, /zstd/],
  ['unsupported version', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeUInt32BE(4, 4)); return i; }, /Unsupported qcow2 version 4/],
  ['cluster bits out of range', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeUInt32BE(30, 20)); return i; }, /Unsupported cluster size/],
  ['refcount order 7', async (d) => { const i = await fresh(d); await patch(i, (b) => b.writeUInt32BE(7, 96)); return i; }, /Reference count entry width too large/],
  ['backing loop', async (d) => {
    const a = path.join(d, 'a.qcow2');
    const b = path.join(d, 'b.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', a, '1M']);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', b]);
    await mustRun('qemu-img', ['rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a]);
    return b;
  }, /loop in the backing chain/],
  ['missing backing file', async (d) => {
    const b = path.join(d, 'b.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'nonexistent.qcow2', '-F', 'qcow2', b, '1M']);
    return b;
  }, /Could not open backing file: Could not open '.*nonexistent.qcow2': No such file or directory/],
];

for (const [name, make, pattern, extra] of cases) {
  test(`damaged image refused: ${name}`, async () => {
    const { dir, cleanup } = await tempDir();
    try {
      const img = await make(dir);
      await expectRefused(img, pattern, extra);
    } finally {
      await cleanup();
    }
  });
}

test('corrupt bit: read-only open works and reads data', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = await fresh(dir);
    await patch(img, (b) => b.writeBigUInt64BE(0x2n, 72));
    const before = await readFile(img);
    const g = newGraph();
    const n = await openQcow2File(g, img, { 'read-only': true });
    assert.ok((await n.read(0, 4096)).equals(Buffer.alloc(4096, 0x42)));
    const fs = n.imageInfo()['format-specific'] as unknown as { data: { corrupt: boolean } };
    assert.equal(fs.data.corrupt, true);
    await g.closeAll();
    assert.ok((await readFile(img)).equals(before));
  } finally {
    await cleanup();
  }
});

test('L2 entry pointing beyond EOF: read-only reads zeroes there as qemu-io does, a read-write open refuses to write through it', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = await fresh(dir);
    // L1[0] = 0x40000 (L2); L2[0] data at 0x50000 → point it far past the end.
    await patch(img, (b) => b.writeBigUInt64BE(0x8000001000000000n, 0x40000));
    const before = await readFile(img);
    const g = newGraph();
    const n = await openQcow2File(g, img, { 'read-only': true });
    assert.ok((await n.read(0, 512)).equals(Buffer.alloc(512)));
    await mustRun('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0 0 512', img]).then((out) => assert.doesNotMatch(out, /Pattern verification failed/));
    assert.ok((await n.read(64 << 10, 512)).equals(Buffer.alloc(512, 0x42)));
    await g.closeAll();
    assert.ok((await readFile(img)).equals(before));
    const rw = newGraph();
    const w = await openQcow2File(rw, img);
    await assert.rejects(w.write(0, Buffer.alloc(512, 1)), /beyond the end of the image file/);
    await rw.closeAll();
  } finally {
    await cleanup();
  }
});

test('zero cluster in a version 2 image (a v3 image relabelled): reads through it fail with EIO as in qemu-io, the other clusters read', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = await fresh(dir); // 0x42 at [0, 128k), 64 KiB clusters
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -z 448k 64k', '-c', 'write -P 0x43 512k 64k', '-c', 'write -z 512k 64k', img]);
    await patch(img, (b) => b.writeUInt32BE(2, 4)); // version 3 → 2: no zero clusters in that version
    const before = await readFile(img);
    const q = await run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read 448k 64k', '-c', 'read 512k 64k', '-c', 'read -P 0x42 0 64k', img]);
    assert.equal(q.stdout.match(/read failed: Input\/output error/g)?.length, 2, q.stdout + q.stderr);
    assert.match(q.stderr, /Zero cluster entry found in pre-v3 image/);
    const g = newGraph();
    const n = await openQcow2File(g, img, { 'read-only': true });
    await assert.rejects(n.read(448 << 10, 64 << 10), /Zero cluster entry found in pre-v3 image/); // zero-plain
    await assert.rejects(n.read(512 << 10, 64 << 10), /Zero cluster entry found in pre-v3 image/); // zero-alloc
    assert.ok((await n.read(0, 64 << 10)).equals(Buffer.alloc(64 << 10, 0x42)));
    await g.closeAll();
    assert.ok((await readFile(img)).equals(before), 'file unchanged');
  } finally {
    await cleanup();
  }
});

test('damaged L1 entries, read-only: every 2 MiB region reads as qemu-io reads it (undamaged ones served, unaligned ones EIO)', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = path.join(dir, 'l1.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '8M']);
    // 4 KiB clusters: one L2 table maps 2 MiB, so L1 entry i maps region i.
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x41 0 2M', '-c', 'write -P 0x42 2M 2M', '-c', 'write -P 0x43 4M 2M', '-c', 'write -P 0x44 6M 2M', img]);
    const clean = await readFile(img);
    const l1 = Number(clean.readBigUInt64BE(40));
    const entry = clean.readBigUInt64BE(l1 + 8);
    const damages: Array<[string, bigint]> = [
      ['past the end of the file', 0x8000000010000000n],
      ['unaligned', entry + 0x200n],
      ['reserved bits', entry | 0x100n],
      ['reserved high bits', entry | 0x0100000000000000n],
      ['copied flag cleared', entry & ~(1n << 63n)],
      ['pointing at the L1 table', 0x8000000000000000n | BigInt(l1)],
      ['zero', 0n],
    ];
    for (const [what, value] of damages) {
      const b = Buffer.from(clean);
      b.writeBigUInt64BE(value, l1 + 8);
      await writeFile(img, b);
      const g = newGraph();
      const n = await openQcow2File(g, img, { 'read-only': true });
      for (let region = 0; region < 4; region++) {
        const off = region * 2 * 1024 * 1024 + 4096;
        const ours = await n.read(off, 4096).catch(() => undefined);
        const q = (await run('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -v ${off} 4096`, img])).stdout;
        if (q.includes('read failed')) {
          assert.equal(ours, undefined, `${what}: region ${region} fails in qemu-io, bitmirror reads`);
          continue;
        }
        assert.ok(ours, `${what}: region ${region} is read by qemu-io, bitmirror fails`);
        const theirs = Buffer.from(q.split('\n').filter((l) => /^[0-9a-f]{8}:/.test(l)).flatMap((l) => l.slice(11, 58).trim().split(' ').map((h) => parseInt(h, 16))));
        assert.ok(ours.equals(theirs), `${what}: region ${region} reads as in qemu-io`);
      }
      await g.closeAll();
      assert.ok((await readFile(img)).equals(b), `${what}: file unchanged`);
    }
  } finally {
    await cleanup();
  }
});

test('an L2 entry pointing at metadata: a write there fails as in qemu-io 7.2 (its overlap check) and the tables stay intact', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    // fresh(): refcount table 0x10000, refcount block 0x20000, L1 0x30000, L2 0x40000, data 0x50000 and 0x60000.
    const targets: Array<[number, string]> = [
      [0x10000, 'refcount table'],
      [0x20000, 'refcount block'],
      [0x30000, 'active L1 table'],
      [0x40000, 'active L2 table'],
    ];
    for (const [target, what] of targets) {
      const img = await fresh(dir, `ov-${target}.qcow2`);
      await patch(img, (b) => b.writeBigUInt64BE(0x8000000000000000n | BigInt(target), 0x40000));
      const before = await readFile(img);
      // QEMU's words for the same image (it then marks the image corrupt; bitmirror leaves it as it was).
      const copy = path.join(dir, 'qemu.qcow2');
      await writeFile(copy, before);
      const q = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 4k', copy]);
      assert.match(q.stderr + q.stdout, new RegExp(`Preventing invalid write on metadata \\(overlaps with ${what}\\)`));
      const g = newGraph();
      const n = await openQcow2File(g, img);
      await assert.rejects(n.write(0, Buffer.alloc(4096, 0x33)), new RegExp(`: qcow2: Preventing invalid write on metadata \\(overlaps with ${what}\\)$`), what);
      // Other clusters are still written and read back.
      await n.write(64 << 10, Buffer.alloc(4096, 0x44));
      assert.ok((await n.read(64 << 10, 4096)).equals(Buffer.alloc(4096, 0x44)), what);
      await g.closeAll();
      const after = await readFile(img);
      for (const off of [0x10000, 0x20000, 0x30000, 0x40000]) assert.ok(after.subarray(off, off + 512).equals(before.subarray(off, off + 512)), `${what}: metadata at ${off} unchanged`);
    }
  } finally {
    await cleanup();
  }
});
