/**
 * detect-zeroes, against qemu-storage-daemon 7.2 on the same images: a guest write of nothing but
 * zeroes (through an NBD export) to a node with detect-zeroes=on becomes a write-zeroes request, so
 * the clusters it covers stop holding data; with detect-zeroes=unmap (which needs discard=unmap, with
 * QEMU's refusal text otherwise) they are unmapped; a node without the option writes the zeroes as data.
 * Both daemons must leave the same data extents (qemu-img map), the same contents (qemu-img compare)
 * and clean images (qemu-img check).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { setup, haveQsd, qmpError, assertIdentical, poll, KiB } from '../support/daemon.js';
import { mustRun, qemuIoNbd } from '../support/tools.js';

type Program = 'bitmirror' | 'qemu-storage-daemon';

interface Outcome {
  refusal: string;
  /** [start, length] of every data extent, per image. */
  data: Record<string, Array<[number, number]>>;
  files: Record<string, string>;
  dir: string;
}

const IMAGES: Record<string, Record<string, unknown>> = {
  off: {},
  on: { 'detect-zeroes': 'on' },
  unmap: { 'detect-zeroes': 'unmap', discard: 'unmap' },
};

async function dataExtents(file: string): Promise<Array<[number, number]>> {
  const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', file])) as Array<{ start: number; length: number; data: boolean }>;
  return map.filter((e) => e.data).map((e) => [e.start, e.length]);
}

async function runOn(program: Program): Promise<Outcome> {
  const env = await setup(`detect-zeroes-${program === 'bitmirror' ? 'bm' : 'qsd'}`, program);
  const files: Record<string, string> = {};
  try {
    const { qmp } = env.d;
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', env.f('x.qcow2'), '4M']);
    const refusal = (await qmpError(env, 'blockdev-add', { driver: 'qcow2', 'node-name': 'x', 'detect-zeroes': 'unmap', file: { driver: 'file', filename: env.f('x.qcow2') } })).desc;
    const sock = env.f('nbd.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    for (const [name, opts] of Object.entries(IMAGES)) {
      const file = (files[name] = env.f(`${name}.qcow2`));
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', file, '4M']);
      // Four data clusters, and one more further on.
      await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 256k', '-c', 'write -P 2 1M 64k', file]);
      await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': name, ...opts, file: { driver: 'file', filename: file } });
      await qmp.execute('block-export-add', { type: 'nbd', id: name, 'node-name': name, name, writable: true });
      // Zero data over two whole data clusters, over part of one, and into a hole.
      await qemuIoNbd(`nbd+unix:///${name}?socket=${sock}`, ['write -P 0 0 128k', 'write -P 0 192k 32k', 'write -P 0 2M 64k']);
      await qmp.execute('block-export-del', { id: name, mode: 'hard' });
    }
    await qmp.execute('nbd-server-stop');
    for (const name of Object.keys(IMAGES)) {
      // block-export-del finishes in the background: the node is free once the export is gone.
      await poll(`blockdev-del ${name}`, async () => !('error' in (await qmp.request('blockdev-del', { 'node-name': name }))));
    }
    const data: Record<string, Array<[number, number]>> = {};
    for (const [name, file] of Object.entries(files)) {
      data[name] = await dataExtents(file);
      await mustRun('qemu-img', ['check', file]);
    }
    return { refusal, data, files, dir: env.dir };
  } finally {
    await env.d.stop();
  }
}

test('detect-zeroes on/unmap: zero data written over NBD leaves no data clusters, as in qemu-storage-daemon', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const bm = await runOn('bitmirror');
  const qsd = await runOn('qemu-storage-daemon');
  try {
  assert.equal(bm.refusal, 'setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  assert.equal(bm.refusal, qsd.refusal);
  // Without the option the zeroes are data; with it, the two whole clusters hold none.
  assert.ok(bm.data.off.some(([s, l]) => s === 0 && l >= 256 * KiB), `off: ${JSON.stringify(bm.data.off)}`);
  for (const name of ['on', 'unmap']) {
    assert.ok(!bm.data[name].some(([s]) => s < 128 * KiB), `${name}: ${JSON.stringify(bm.data[name])}`);
    assert.deepEqual(bm.data[name], qsd.data[name], `${name}: data extents, bitmirror vs qemu-storage-daemon`);
  }
  for (const name of Object.keys(IMAGES)) await assertIdentical(bm.files[name], qsd.files[name]);
  } finally {
    for (const o of [bm, qsd]) await fsp.rm(o.dir, { recursive: true, force: true });
  }
});
