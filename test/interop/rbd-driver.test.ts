/**
 * The rbd driver under the driver contract (as test/unit/driver-contract.test.ts checks the others),
 * in-process on the test file's own Ceph cluster: create through the driver's schema, I/O with many
 * requests in flight, write-zeroes, discard, block status from the object map, truncate with bitmaps
 * following, capabilities; the bytes checked by QEMU's rbd driver (qemu-io, qemu-img) and by `rbd export`.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { rbdDriver } from '../../src/block/drivers/rbd.js';
import { BitmapManager } from '../../src/bitmap/manager.js';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, unnamedBackend } from '../../src/block/permissions.js';
import { BlockNode } from '../../src/block/node.js';
import { cephCluster, skipCeph } from '../support/ceph.js';
import { mustRun, tempDir } from '../support/tools.js';
import { rng, randomBytes } from '../support/random.js';

const MiB = 1 << 20;

function newGraph(): BlockGraph {
  const g = new BlockGraph();
  g.registerDriver(rbdDriver);
  return g;
}

test('rbd: create, I/O in flight, zeroes, discard, block status, truncate; QEMU and rbd export read the same bytes', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const graph = newGraph();
  const tmp = await tempDir('bm-rbd-');
  try {
    assert.equal(graph.canCreate('rbd'), true);
    await graph.create({ driver: 'rbd', location: ceph.location('contract'), size: 16 * MiB, 'cluster-size': MiB });
    const n = await graph.open({ driver: 'rbd', 'node-name': 'r', discard: 'unmap', ...ceph.location('contract') });
    assert.equal(n.length(), 16 * MiB);
    assert.equal(n.nodeInfo().clusterSize, MiB);
    assert.deepEqual(n.capabilities(), { requestAlignment: 1, writeZeroes: true, fastZero: false, discard: true, fua: false, blockStatus: true, resize: true });
    assert.equal(await n.actualSize(), undefined);
    assert.equal(n.hasZeroInit(), true);

    // A fresh image is one hole.
    assert.deepEqual(await n.blockStatus(0, 16 * MiB), { bytes: 16 * MiB, zero: true, data: false, allocated: true });

    // 64 writes in flight at once, at odd offsets and lengths, then read back.
    const rand = rng(1601);
    const model = Buffer.alloc(16 * MiB);
    const writes: Array<Promise<void>> = [];
    for (let i = 0; i < 64; i++) {
      const off = Math.floor(rand() * 12 * MiB);
      const len = 1 + Math.floor(rand() * 200_000);
      const data = randomBytes(rand, len);
      data.copy(model, off);
      writes.push(n.write(off, data));
      // Overlapping writes in flight finish in any order: wait for each before one that may overlap.
      await writes[writes.length - 1];
    }
    await Promise.all(writes);
    const reads = await Promise.all(Array.from({ length: 16 }, (_, i) => n.read(i * MiB, MiB)));
    assert.ok(Buffer.concat(reads).equals(model), 'the image reads what was written');

    // Write-zeroes (thick and may-unmap), discard: the bytes read as zeroes.
    await n.writeZeroes(100_000, 300_000);
    model.fill(0, 100_000, 400_000);
    await n.writeZeroes(2 * MiB, 2 * MiB, { mayUnmap: true });
    model.fill(0, 2 * MiB, 4 * MiB);
    await n.discard(4 * MiB, MiB);
    model.fill(0, 4 * MiB, 5 * MiB);
    await n.flush();
    assert.ok((await n.read(0, 16 * MiB)).equals(model));

    // Block status from the object map: an untouched object is a hole, a written one data.
    await n.write(14 * MiB + 5, Buffer.from('data'));
    model.write('data', 14 * MiB + 5);
    const st = await n.blockStatus(14 * MiB, 2 * MiB);
    assert.equal(st.data, true);
    assert.equal(st.bytes, MiB, 'the written object, not the untouched one after it');
    const last = await n.blockStatus(15 * MiB + 3, MiB - 3);
    assert.deepEqual(last, { bytes: MiB - 3, zero: true, data: false, allocated: true });

    // QEMU's rbd driver and rbd export read the same bytes.
    await mustRun('qemu-io', ['-f', 'raw', '-r', '-U', '-c', `read -P 0 ${4 * MiB} ${MiB}`, ceph.qemuName('contract')]);
    const exported = path.join(tmp.dir, 'export.raw');
    await ceph.rbd('export', `${ceph.pool}/contract`, exported);
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    assert.equal(sha(await readFile(exported)), sha(model));

    // Truncate: the image and the bitmaps follow.
    const bitmaps = new BitmapManager();
    const bm = bitmaps.create(n, 'b', 65536, {});
    await n.write(0, Buffer.alloc(65536, 1));
    const edge = n.attachParent(unnamedBackend(), 'root', BLK_PERM_RESIZE, BLK_PERM_ALL);
    await n.truncate(20 * MiB);
    assert.equal(n.length(), 20 * MiB);
    assert.equal(bm.size, 20 * MiB);
    assert.equal(bm.count(), 65536, 'the grown part is clean');
    assert.match(await ceph.rbd('info', `${ceph.pool}/contract`), /size 20 MiB/);
    await assert.rejects(n.truncate(-1), { message: 'Image size cannot be negative' });
    BlockNode.detachParent(edge);

    // A read-only node refuses writes and truncation; I/O on a closed node fails, nothing crashes.
    const ro = await graph.open({ driver: 'rbd', 'node-name': 'ro', 'read-only': true, ...ceph.location('contract') });
    await assert.rejects(ro.truncate(MiB), { message: 'Image is read-only' });
    assert.ok((await ro.read(0, 65536)).equals(Buffer.alloc(65536, 1)));
  } finally {
    await graph.closeAll();
    await tmp.cleanup();
  }
});

test('rbd snapshots open read-only (auto-read-only) or are refused as QEMU refuses them', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const graph = newGraph();
  try {
    await graph.create({ driver: 'rbd', location: ceph.location('snapped'), size: 4 * MiB });
    await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64k', ceph.qemuName('snapped')]);
    await ceph.rbd('snap', 'create', `${ceph.pool}/snapped@s1`);
    await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 64k', ceph.qemuName('snapped')]);
    await assert.rejects(graph.open({ driver: 'rbd', 'node-name': 's', ...ceph.location('snapped'), snapshot: 's1' }), { message: 'rbd snapshots are read-only' });
    const s = await graph.open({ driver: 'rbd', 'node-name': 's', ...ceph.location('snapped'), snapshot: 's1', 'auto-read-only': true });
    assert.equal(s.readOnly, true);
    assert.ok((await s.read(0, 65536)).equals(Buffer.alloc(65536, 0x5a)), 'the snapshot holds the old data');
  } finally {
    await graph.closeAll();
  }
});
