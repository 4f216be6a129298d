/**
 * block-stream with `__org.bitmirror_carry-bitmaps`: a chain of four layers, each holding persistent
 * bitmaps that recorded the writes made to it (by QEMU's qemu-io, which records into an image's enabled
 * bitmaps): after the stream the remaining layer holds every bitmap of the removed layers, each
 * covering exactly the writes it recorded, and a bitmap present in every layer holds all of them;
 * qemu-img info lists them and qemu-img check finds the image clean.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { mustRun, nbdDirtyRanges } from '../support/tools.js';
import { addQcow2, assertIdentical, setup } from '../support/daemon.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;

test('block-stream carries the removed layers\' bitmaps into the node: every recorded write stays recorded', async () => {
  const env = await setup('stream-bitmaps');
  try {
    const layers = ['l0.qcow2', 'l1.qcow2', 'l2.qcow2', 'l3.qcow2'].map((n) => env.f(n));
    // Layer i gets writes at clusters 8i+1 and 8i+3, recorded in its bitmaps b<i> and `all`.
    const written: Array<Array<[number, number]>> = [];
    for (const [i, img] of layers.entries()) {
      const backing = i > 0 ? ['-b', layers[i - 1], '-F', 'qcow2'] : [];
      await mustRun('qemu-img', ['create', '-f', 'qcow2', ...backing, img, '2M']);
      await mustRun('qemu-img', ['bitmap', '--add', '-g', String(CLUSTER), img, `b${i}`]);
      await mustRun('qemu-img', ['bitmap', '--add', '-g', String(CLUSTER), img, 'all']);
      const at = [8 * i + 1, 8 * i + 3].map((c) => c * CLUSTER);
      await mustRun('qemu-io', ['-f', 'qcow2', img, ...at.flatMap((o) => ['-c', `write -P ${i + 1} ${o} 4k`])]);
      written.push(at.map((o) => [o, CLUSTER]));
    }
    await mustRun('qemu-img', ['convert', '-O', 'raw', layers[3], env.f('ref.raw')]);
    await addQcow2(env, 'l3', layers[3]);
    await env.d.qmp.execute('block-stream', { device: 'l3', 'job-id': 'j', '__org.bitmirror_carry-bitmaps': true });
    const done = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' }, 60_000);
    assert.equal(done.data!.error, undefined);
    await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'null' }, 60_000);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'l3' });

    const top = layers[3];
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', top])) as { 'backing-filename'?: string; 'format-specific': { data: { bitmaps: Array<{ name: string; flags: string[] }> } } };
    assert.equal(info['backing-filename'], undefined);
    assert.deepEqual(info['format-specific'].data.bitmaps.map((b) => b.name).sort(), ['all', 'b0', 'b1', 'b2', 'b3']);
    for (const b of info['format-specific'].data.bitmaps) assert.deepEqual(b.flags, ['auto'], b.name);
    // Each removed layer's bitmap covers exactly its writes; `all` covers every layer's.
    for (const i of [0, 1, 2]) assert.deepEqual(await nbdDirtyRanges(top, `b${i}`), written[i], `b${i}`);
    const all = await nbdDirtyRanges(top, 'all');
    for (const [o] of written.flat()) assert.ok(all.some(([s, l]) => s <= o && o < s + l), `all covers ${o}`);
    await assertIdentical(top, env.f('ref.raw'));
    assert.match(await mustRun('qemu-img', ['check', top]), /No errors were found/);
  } finally {
    await env.done();
  }
});
