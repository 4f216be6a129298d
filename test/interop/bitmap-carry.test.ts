/**
 * The bitmap carry primitive (src/bitmap/carry.ts) on a real qcow2 chain in-process (a Core with the
 * daemon's drivers): bitmaps made and dirtied by qemu-img/qemu-io in two layers are carried onto a new
 * qcow2, merged by name; the result is stored and read back by qemu-img and qemu-nbd. Refusals (raw
 * destination, inconsistent bitmap, incompatible clash, a change between plan and commit) change nothing.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import * as path from 'node:path';
import { promises as fsp } from 'node:fs';
import { Core } from '../../src/core/core.js';
import { BLOCK_DRIVERS } from '../../src/daemon/drivers.js';
import { carryBitmaps, commitCarry, planCarry, sourceChainLayers } from '../../src/bitmap/carry.js';
import type { BlockNode } from '../../src/block/node.js';
import { mustRun, nbdDirtyRanges, run, tempDir } from '../support/tools.js';

const MiB = 1 << 20;
const KiB = 1024;

interface Info {
  'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[]; granularity: number }> } };
}

function newCore(): Core {
  const core = new Core();
  for (const d of BLOCK_DRIVERS) core.graph.registerDriver(d);
  return core;
}

/** base.qcow2 (bitmap a: 0..64k written) <- top.qcow2 (bitmaps a and b, 128k granularity, both: 1M..+64k and 4M..+4k; then b disabled). */
async function chain(dir: string): Promise<{ base: string; top: string }> {
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
  await mustRun('qemu-img', ['bitmap', '--add', base, 'a']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', base]);
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  await mustRun('qemu-img', ['bitmap', '--add', top, 'a']);
  await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', top, 'b']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 1M 64k', '-c', 'write -P 0x33 4M 4k', top]);
  await mustRun('qemu-img', ['bitmap', '--disable', top, 'b']);
  return { base, top };
}

async function open(core: Core, name: string, file: string, extra: Record<string, unknown> = {}): Promise<BlockNode> {
  return core.openForMonitor({ driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: file }, ...extra });
}

function state(core: Core, node: BlockNode): unknown {
  return core.bitmaps.list(node).map((b) => [b.name, b.granularity, b.persistent, b.enabled, b.sha256()]);
}

test('carry: two layers merged by name onto a new qcow2; qemu-img lists them, qemu-nbd shows their bits', async () => {
  const { dir, cleanup } = await tempDir('bm-carry-');
  const core = newCore();
  try {
    const { top } = await chain(dir);
    const dst = path.join(dir, 'dst.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', dst, '16M']);
    const src = await open(core, 'top', top);
    const dest = await open(core, 'dst', dst);
    const layers = sourceChainLayers(src);
    assert.deepEqual(
      layers.map((n) => n.nodeName),
      ['top', src.backing()!.nodeName],
    );
    const before = layers.map((n) => state(core, n));
    let switched = false;
    const done = await carryBitmaps(core.bitmaps, layers, dest, () => (switched = true));
    assert.ok(switched);
    assert.deepEqual(
      done.carried.map((b) => [b.name, b.granularity, b.persistent, b.enabled]),
      [
        ['a', 65536, true, true],
        ['b', 131072, true, false],
      ],
    );
    // The layers keep theirs.
    assert.deepEqual(
      layers.map((n) => state(core, n)),
      before,
    );
    // A write to the destination after the carry is recorded by the enabled bitmap only.
    await dest.write(8 * MiB, Buffer.alloc(4 * KiB, 0x44));
    await core.shutdown();
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', dst])) as Info;
    assert.deepEqual(info['format-specific'].data.bitmaps?.sort((x, y) => x.name.localeCompare(y.name)), [
      { flags: ['auto'], name: 'a', granularity: 65536 },
      { flags: [], name: 'b', granularity: 131072 },
    ]);
    await mustRun('qemu-img', ['check', dst]);
    assert.deepEqual(await nbdDirtyRanges(dst, 'a'), [
      [0, 64 * KiB],
      [1 * MiB, 64 * KiB],
      [4 * MiB, 64 * KiB],
      [8 * MiB, 64 * KiB],
    ]);
    assert.deepEqual(await nbdDirtyRanges(dst, 'b'), [
      [1 * MiB, 128 * KiB],
      [4 * MiB, 128 * KiB],
    ]);
  } finally {
    await core.shutdown();
    await cleanup();
  }
});

test('carry refusals change nothing: raw destination, inconsistent bitmap, incompatible clash, a change before commit', async () => {
  const { dir, cleanup } = await tempDir('bm-carry-');
  const core = newCore();
  try {
    const { top } = await chain(dir);
    const raw = path.join(dir, 'dst.raw');
    await fsp.writeFile(raw, Buffer.alloc(0));
    await fsp.truncate(raw, 16 * MiB);
    const q = path.join(dir, 'dst.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', q, '16M']);
    const src = await open(core, 'top', top);
    const rawNode = await core.openForMonitor({ driver: 'raw', 'node-name': 'rawdst', file: { driver: 'file', filename: raw } });
    const dest = await open(core, 'dst', q);
    const layers = sourceChainLayers(src);
    const before = layers.map((n) => state(core, n));

    await assert.rejects(planCarry(core.bitmaps, layers, rawNode), {
      message: "Cannot carry dirty bitmap 'a' of node 'top' to node 'rawdst': Can't store persistent bitmaps to rawdst: Operation not supported",
    });
    assert.equal(core.bitmaps.list(rawNode).length, 0);

    // A bitmap of the destination with the carried name but another granularity.
    await core.bitmaps.add(dest, 'b', { granularity: 65536, persistent: true });
    await assert.rejects(planCarry(core.bitmaps, layers, dest), {
      message: "Cannot carry dirty bitmap 'b' of node 'top' to node 'dst': node 'dst' already has a bitmap 'b' with granularity 65536 (carried: 131072)",
    });
    assert.deepEqual(
      core.bitmaps.list(dest).map((b) => b.name),
      ['b'],
    );
    await core.bitmaps.remove(core.bitmaps.get(dest, 'b'));

    // A compatible one is merged into, keeping its bits and taking the carried ones.
    const mine = await core.bitmaps.add(dest, 'a', { persistent: true });
    mine.setDirty(12 * MiB, 1);
    const plan = await planCarry(core.bitmaps, layers, dest);
    // Something changes between plan and commit: a new bitmap on a layer.
    const late = core.bitmaps.create(src, 'late', 65536);
    assert.throws(() => commitCarry(core.bitmaps, plan), /Node 'top' got a bitmap 'late' while bitmaps were being carried to node 'dst'; nothing was carried/);
    assert.deepEqual(
      core.bitmaps.list(dest).map((b) => [b.name, b.count()]),
      [['a', 65536]],
    );
    core.bitmaps.release(late);
    const done = commitCarry(core.bitmaps, await planCarry(core.bitmaps, layers, dest));
    assert.equal(done.carried[0], mine);
    assert.equal(mine.count(), 4 * 65536);
    done.undo();
    assert.equal(mine.count(), 65536);
    assert.deepEqual(
      core.bitmaps.list(dest).map((b) => b.name),
      ['a'],
    );

    // A failing switch takes the carry back.
    await assert.rejects(
      carryBitmaps(core.bitmaps, layers, dest, () => {
        throw new Error('switch failed');
      }),
      /switch failed/,
    );
    assert.equal(mine.count(), 65536);
    assert.deepEqual(
      core.bitmaps.list(dest).map((b) => b.name),
      ['a'],
    );

    // An inconsistent bitmap: its image's writer (qemu-io) was killed while it had the bitmap in use.
    const bad = path.join(dir, 'bad.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', bad, '16M']);
    await mustRun('qemu-img', ['bitmap', '--add', bad, 'x']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', '-c', 'sigraise 9', bad]);
    const badNode = await open(core, 'bad', bad);
    assert.equal(core.bitmaps.get(badNode, 'x').inconsistent, true);
    await assert.rejects(planCarry(core.bitmaps, [badNode], dest), {
      message: "Cannot carry dirty bitmap 'x' of node 'bad' to node 'dst': Bitmap 'x' is inconsistent and cannot be used",
    });
    assert.deepEqual(
      core.bitmaps.list(dest).map((b) => b.name),
      ['a'],
    );
    assert.deepEqual(
      layers.map((n) => state(core, n)),
      before,
    );
  } finally {
    await core.shutdown();
    await cleanup();
  }
});

test('carry onto a layer of the chain (what a commit does): the base keeps its own bitmaps and gets the upper layers\' merged in', async () => {
  const { dir, cleanup } = await tempDir('bm-carry-');
  const core = newCore();
  try {
    const { base } = await chain(dir);
    const src = await open(core, 'top', path.join(dir, 'top.qcow2'));
    const baseNode = src.backing()!;
    // A commit makes its base writable first; a read-only destination cannot take persistent bitmaps.
    await assert.rejects(planCarry(core.bitmaps, sourceChainLayers(src), baseNode), {
      message: `Cannot carry dirty bitmap 'a' of node 'top' to node '${baseNode.nodeName}': node '${baseNode.nodeName}' already has a bitmap 'a' that cannot be merged into: Bitmap 'a' is readonly and cannot be modified`,
    });
    await core.graph.setReadOnly(baseNode, false);
    const done = await carryBitmaps(core.bitmaps, sourceChainLayers(src), baseNode);
    assert.deepEqual(
      done.carried.map((b) => [b.name, b.node.nodeName === baseNode.nodeName]),
      [
        ['a', true],
        ['b', true],
      ],
    );
    await core.shutdown();
    assert.deepEqual(await nbdDirtyRanges(base, 'a'), [
      [0, 64 * KiB],
      [1 * MiB, 64 * KiB],
      [4 * MiB, 64 * KiB],
    ]);
    assert.deepEqual(await nbdDirtyRanges(base, 'b'), [
      [1 * MiB, 128 * KiB],
      [4 * MiB, 128 * KiB],
    ]);
  } finally {
    await core.shutdown();
    await cleanup();
  }
});
