/**
 * The driver contract without a daemon: create through the driver (with its options schema), truncate
 * with QEMU's checks, dirty bitmaps following a resize, capabilities and actual size — and commands and
 * jobs reaching drivers only through it.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { mkdtempSync, rmSync, statSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync } from 'node:child_process';
import { BlockGraph } from '../../src/block/graph.js';
import { BlockNode } from '../../src/block/node.js';
import { nullDriver } from '../../src/block/drivers/null.js';
import { rawDriver } from '../../src/block/drivers/raw.js';
import { fileDriver } from '../../src/block/drivers/file.js';
import { qcow2Driver } from '../../src/block/drivers/qcow2/index.js';
import { BitmapManager } from '../../src/bitmap/manager.js';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, unnamedBackend } from '../../src/block/permissions.js';
import { nativeAddon } from '../../src/block/native.js';

function setup(): { dir: string; graph: BlockGraph; done: () => Promise<void> } {
  const dir = mkdtempSync(join(tmpdir(), 'bm-contract-'));
  const graph = new BlockGraph();
  for (const d of [nullDriver, rawDriver, fileDriver, qcow2Driver]) graph.registerDriver(d);
  return {
    dir,
    graph,
    done: async () => {
      await graph.closeAll();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

test('drivers that can create say so; blockdev-create options are the drivers\' own', () => {
  const { graph } = setup();
  assert.equal(graph.canCreate('file'), true);
  assert.equal(graph.canCreate('qcow2'), true);
  assert.equal(graph.canCreate('raw'), false);
  const schema = graph.createOptionsSchema();
  assert.equal(schema.kind, 'union');
  assert.deepEqual(Object.keys((schema as { variants: Record<string, unknown> }).variants).sort(), ['file', 'qcow2']);
});

test('createImage makes a qcow2 that qemu-img checks clean, and actualSize is what the host reports', async () => {
  const t = setup();
  try {
    const img = join(t.dir, 'a.qcow2');
    await t.graph.createImage('qcow2', img, 3 << 20);
    execFileSync('qemu-img', ['check', img]);
    const node = await t.graph.open({ driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img } });
    assert.equal(node.length(), 3 << 20);
    assert.equal(await node.actualSize(), statSync(img).blocks * 512);
    const caps = node.capabilities();
    assert.equal(caps.blockStatus, true);
    assert.equal(caps.writeZeroes, true);
    const raw = join(t.dir, 'r.raw');
    await t.graph.createImage('raw', raw, 1 << 20);
    assert.equal(statSync(raw).size, 1 << 20);
  } finally {
    await t.done();
  }
});

test('truncate: QEMU\'s checks, the file follows through raw, bitmaps grow clean', async () => {
  const t = setup();
  try {
    const img = join(t.dir, 'r.raw');
    await t.graph.create({ driver: 'file', filename: img, size: 1 << 20 });
    const r = await t.graph.open({ driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: img } });
    const bitmaps = new BitmapManager();
    const bm = bitmaps.create(r, 'b', 65536, {});
    await r.write(0, Buffer.alloc(65536, 1));
    const edge = r.attachParent(unnamedBackend(), 'root', BLK_PERM_RESIZE, BLK_PERM_ALL);
    await r.truncate(2 << 20);
    assert.equal(statSync(img).size, 2 << 20);
    assert.equal(r.length(), 2 << 20);
    assert.equal(bm.size, 2 << 20);
    assert.equal(bm.count(), 65536, 'the grown part is clean');
    await assert.rejects(r.truncate(-1), { message: 'Image size cannot be negative' });
    // A raw window unshares resize on its file (the data role): only once nobody resizes it.
    BlockNode.detachParent(edge);
    const fixed = await t.graph.open({ driver: 'raw', 'node-name': 'fixed', file: { driver: 'file', filename: img }, size: 65536 });
    await assert.rejects(fixed.truncate(1 << 20), { message: 'Cannot resize fixed-size raw disks' });
    assert.equal(fixed.capabilities().resize, false);
    const ro = await t.graph.open({ driver: 'raw', 'node-name': 'ro', 'read-only': true, file: { driver: 'file', filename: img, 'read-only': true } });
    await assert.rejects(ro.truncate(1 << 20), { message: 'Image is read-only' });
    const n = await t.graph.open({ driver: 'null-co', 'node-name': 'n' });
    await assert.rejects(n.truncate(1 << 20), { message: 'Image format driver does not support resize' });
    assert.equal(await n.actualSize(), 0);
  } finally {
    await t.done();
  }
});

test('file capabilities: holes and zero ranges on a regular file', { skip: !nativeAddon() && 'native addon not built' }, async () => {
  const t = setup();
  try {
    const img = join(t.dir, 'f.raw');
    await t.graph.create({ driver: 'file', filename: img, size: 1 << 20 });
    const f = await t.graph.open({ driver: 'file', 'node-name': 'f', filename: img, discard: 'unmap' });
    assert.deepEqual(f.capabilities(), { requestAlignment: 1, writeZeroes: true, fastZero: true, discard: true, fua: false, blockStatus: true, resize: true });
    const plain = await t.graph.open({ driver: 'file', 'node-name': 'g', filename: img });
    assert.equal(plain.capabilities().discard, false, 'discard=ignore frees nothing');
  } finally {
    await t.done();
  }
});

test('commands and jobs import no concrete driver', () => {
  const src = resolve(dirname(fileURLToPath(import.meta.url)), '../../../src');
  for (const dir of ['commands', 'jobs']) {
    for (const f of readdirSync(join(src, dir)).filter((n) => n.endsWith('.ts'))) {
      assert.doesNotMatch(readFileSync(join(src, dir, f), 'utf8'), /from '[./]*block\/drivers\//, `${dir}/${f}`);
    }
  }
});
