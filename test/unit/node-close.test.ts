/**
 * How a node closes and how writes reach its dirty bitmaps, in-process on real nodes (null-co, raw):
 * a closing node finishes its requests in flight (bitmaps marked) before the beforeClose hooks run and
 * refuses new ones; shutdown closes parents before children; a bitmap misses no write because another
 * observer failed or because it was created while the write was in flight.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { Core } from '../../src/core/core.js';
import { nullDriver } from '../../src/block/drivers/null.js';
import { rawDriver } from '../../src/block/drivers/raw.js';
import { BlockIOError } from '../../src/errors.js';
import type { BlockNode } from '../../src/block/node.js';
import { fileDriver } from '../../src/block/drivers/file.js';
import { MiB } from '../../src/base/sizes.js';
import { tempDir } from '../support/tools.js';

function newCore(): Core {
  const core = new Core();
  core.graph.registerDriver(nullDriver);
  core.graph.registerDriver(rawDriver);
  return core;
}

function openNull(core: Core, name: string): Promise<BlockNode> {
  return core.graph.open({ driver: 'null-co', 'node-name': name, size: 64 * MiB, 'read-zeroes': true });
}

const ENOMEDIUM = (err: unknown) => err instanceof BlockIOError && err.code === 'ENOMEDIUM';

test('quiesce: a write in flight ends and is in the bitmap before it resolves; new requests get ENOMEDIUM', async () => {
  const core = newCore();
  const node = await openNull(core, 'n');
  const bm = core.bitmaps.create(node, 'b', 65536);
  const write = node.write(3 * 65536, Buffer.alloc(100, 1));
  await node.quiesce();
  assert.deepEqual([...bm.dirtyAreas()], [{ offset: 3 * 65536, bytes: 65536 }]);
  await write;
  await assert.rejects(node.write(0, Buffer.alloc(512)), ENOMEDIUM);
  await assert.rejects(node.writeZeroes(0, 512), ENOMEDIUM);
  await assert.rejects(node.read(0, 512), ENOMEDIUM);
  assert.equal(bm.count(), 65536, 'the refused write marked nothing');
});

test('blockdev-del path: the beforeClose hooks run after the writes in flight ended, once however often it is closed', async () => {
  const core = newCore();
  const node = await openNull(core, 'n');
  const bm = core.bitmaps.create(node, 'b', 65536);
  const seen: number[] = [];
  // Ahead of the core's own hook (which stores and releases the bitmaps): what would be stored.
  core.graph.beforeClose.unshift(async (n) => void (n === node && seen.push(bm.count())));
  const writes = [0, 5, 9].map((c) => node.write(c * 65536 + 7, Buffer.alloc(10)));
  await Promise.all([core.graph.remove(node), core.graph.remove(node)]);
  await Promise.all(writes);
  assert.deepEqual(seen, [3 * 65536]);
  assert.equal(core.graph.find('n'), undefined);
  assert.ok(node.isClosed());
});

test('shutdown closes parents before children, also a child attached after its parent was opened', async () => {
  const core = newCore();
  await openNull(core, 'a');
  const r = await core.graph.open({ driver: 'raw', 'node-name': 'r', file: 'a' });
  const b = await openNull(core, 'b');
  // A pivot: r now reads and writes b, a node created after it.
  core.graph.replace(core.graph.lookup('a'), b);
  assert.equal(r.primaryChild(), b);
  const order: string[] = [];
  core.graph.beforeClose.unshift(async (n) => void order.push(n.nodeName));
  await core.shutdown();
  assert.ok(order.indexOf('r') < order.indexOf('b'), order.join(' '));
  assert.deepEqual([...order].sort(), ['a', 'b', 'r']);
  assert.deepEqual(core.graph.allNodes(), []);
  await assert.rejects(openNull(core, 'c'), /The daemon is shutting down/);
});

test("one observer's failing afterWrite keeps no bitmap from marking the write", async () => {
  const core = newCore();
  const node = await openNull(core, 'n');
  let calls = 0;
  node.addWriteObserver({
    afterWrite: () => {
      calls++;
      throw new BlockIOError('EIO');
    },
  });
  const bm = core.bitmaps.create(node, 'b', 65536);
  await assert.rejects(node.write(2 * 65536, Buffer.alloc(1)), (err) => err instanceof BlockIOError && err.code === 'EIO');
  assert.equal(calls, 1);
  assert.deepEqual([...bm.dirtyAreas()], [{ offset: 2 * 65536, bytes: 65536 }]);
});

test('a bitmap created while a write is in flight records that write (the first bitmap of the node too)', async () => {
  const core = newCore();
  const node = await openNull(core, 'n');
  const write = node.write(4 * 65536, Buffer.alloc(65536 + 1));
  const bm = core.bitmaps.create(node, 'b', 65536);
  await write;
  assert.deepEqual([...bm.dirtyAreas()], [{ offset: 4 * 65536, bytes: 2 * 65536 }]);
  // And a second one, created while the first observes.
  const write2 = node.write(0, Buffer.alloc(1));
  const bm2 = core.bitmaps.create(node, 'b2', 65536);
  await write2;
  assert.deepEqual([...bm2.dirtyAreas()], [{ offset: 0, bytes: 65536 }]);
});

test('shutdown waits for a blockdev-del under way (its bitmaps still go into the child) and for an open under way', async (t) => {
  const core = newCore();
  core.graph.registerDriver(fileDriver);
  const { dir, cleanup } = await tempDir('bm-close-');
  t.after(cleanup);
  const img = path.join(dir, 'f.raw');
  await fsp.writeFile(img, Buffer.alloc(MiB));
  // A real file: the writes below take real I/O, so the shutdown overlaps them.
  const q = await core.graph.open({ driver: 'raw', 'node-name': 'q', file: { driver: 'file', 'node-name': 'f', filename: img } });
  const f = core.graph.lookup('f');
  const hookWrites: string[] = [];
  // Like storing bitmaps: the closing parent writes into its child, in several steps.
  core.graph.beforeClose.unshift(async (n) => {
    if (n !== q) return;
    for (const off of [0, 512, 1024]) await f.write(off, Buffer.alloc(512)).then(() => hookWrites.push('ok'), (err: Error) => hookWrites.push(err.message));
  });
  const removing = core.graph.remove(q);
  const opening = openNull(core, 'late');
  await core.shutdown();
  await removing;
  const late = await opening;
  assert.deepEqual(hookWrites, ['ok', 'ok', 'ok']);
  assert.ok(q.isClosed() && f.isClosed() && late.isClosed());
  assert.deepEqual(core.graph.allNodes(), []);
});

test('a node is not found by name until its open finished (its stored bitmaps loaded): nothing writes to it before', async () => {
  const core = newCore();
  const seen: Array<[string, boolean, boolean]> = [];
  // After the core's own hook (which loads the stored bitmaps): what a command would find meanwhile.
  core.graph.afterOpen.push(async (n) => void seen.push([n.nodeName, core.graph.find(n.nodeName) !== undefined, core.graph.allNodes().includes(n)]));
  const r = await core.graph.open({ driver: 'raw', 'node-name': 'r', file: { driver: 'null-co', 'node-name': 'f', size: MiB } });
  assert.deepEqual(seen, [
    ['f', false, false],
    ['r', false, false],
  ]);
  assert.equal(core.graph.find('r'), r);
  assert.equal(core.graph.lookup('f'), r.primaryChild());
  // The name is taken while the open runs: a second open of it is refused.
  await assert.rejects(openNull(core, 'f'), /Duplicate nodes with node-name='f'/);
});

test('quiesce waits for a resize under way (bitmaps resized with it); a closing node refuses to resize', async (t) => {
  const core = newCore();
  core.graph.registerDriver(fileDriver);
  const { dir, cleanup } = await tempDir('bm-close-');
  t.after(cleanup);
  const img = path.join(dir, 'r.raw');
  await fsp.writeFile(img, Buffer.alloc(MiB));
  const node = await core.graph.open({ driver: 'file', 'node-name': 'f', filename: img });
  const bm = core.bitmaps.create(node, 'b', 65536);
  const resizing = node.truncate(2 * MiB);
  await node.quiesce();
  assert.equal(node.length(), 2 * MiB);
  assert.equal(bm.size, 2 * MiB);
  await resizing;
  await assert.rejects(node.truncate(3 * MiB), /No medium inserted/);
  assert.equal((await fsp.stat(img)).size, 2 * MiB);
});
