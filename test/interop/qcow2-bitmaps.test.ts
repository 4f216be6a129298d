/** Persistent-bitmap storage API against bitmaps made and checked by qemu-img. */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import * as path from 'node:path';
import type { Qcow2Node } from '../../src/block/drivers/qcow2/index.js';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph, openQcow2File } from '../support/graph.js';

interface Info {
  'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[]; granularity: number }> } };
}

test('list, read, mark in use and store bitmaps; qemu-img agrees', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = path.join(dir, 'b.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1G']);
    await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
    await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', '--disable', img, 'b1']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write 1M 64k', '-c', 'write 3M 100k', img]);

    let g = newGraph();
    let n = (await openQcow2File(g, img)) as Qcow2Node;
    const list = n.listStoredBitmaps();
    assert.deepEqual(list.map((b) => [b.name, b.granularity, b.auto, b.inUse]), [['b0', 65536, true, false], ['b1', 131072, false, false]]);
    const d0 = await n.readBitmapData(list[0]);
    assert.equal(d0.length, 2048);
    assert.equal(d0[2], 0x01);
    assert.equal(d0[6], 0x03);
    assert.equal(d0.filter((x) => x !== 0).length, 2);
    assert.equal((await n.readBitmapData(list[1])).filter((x) => x !== 0).length, 0);

    await n.setBitmapsInUse('all', true);
    const inUse = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', img])) as Info;
    assert.deepEqual(inUse['format-specific'].data.bitmaps?.map((b) => b.flags), [['in-use', 'auto'], ['in-use']]);

    // Store a new set: b0 changed, b1 dropped, b2 added.
    const b0 = Buffer.from(d0);
    b0[100] = 0xff;
    const b2 = Buffer.alloc(1024);
    b2[0] = 0x80;
    await n.storeBitmaps([
      { name: 'b0', granularity: 65536, auto: true, data: b0 },
      { name: 'b2', granularity: 131072, auto: false, data: b2 },
    ]);
    await g.closeAll();

    const check = await run('qemu-img', ['check', img]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', img])) as Info;
    assert.deepEqual(info['format-specific'].data.bitmaps, [
      { flags: ['auto'], name: 'b0', granularity: 65536 },
      { flags: [], name: 'b2', granularity: 131072 },
    ]);
    // qemu-img can use what we stored: merge b2 into a new bitmap and read it back with our reader.
    await mustRun('qemu-img', ['bitmap', '--add', '--disable', '-g', '131072', img, 'm']);
    await mustRun('qemu-img', ['bitmap', '--merge', 'b2', img, 'm']);
    g = newGraph();
    n = (await openQcow2File(g, img, { 'read-only': true })) as Qcow2Node;
    const m = n.listStoredBitmaps().find((b) => b.name === 'm')!;
    const md = await n.readBitmapData(m);
    assert.equal(md[0], 0x80);
    const nb0 = await n.readBitmapData(n.listStoredBitmaps().find((b) => b.name === 'b0')!);
    assert.ok(nb0.equals(b0));
    await g.closeAll();
  } finally {
    await cleanup();
  }
});
