/**
 * blockdev-snapshot and blockdev-snapshot-sync against qemu-storage-daemon 7.2: the same scripts give
 * the same replies (every refusal, in QEMU's order), the same nodes afterwards (read-only base, json:
 * filename of an overlay whose header names no backing file, exports following the overlay) and
 * the same image files (qemu-img info of the created overlay; no file left by a refused format).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { haveQsd, mustRun, tempDir } from '../support/tools.js';

type Step = [string, Record<string, unknown>?] | ['nodes'] | ['info', string] | ['ls'];

async function runScript(program: 'bitmirror' | 'qemu-storage-daemon', dir: string, images: string[][], script: (f: (n: string) => string) => Step[]): Promise<unknown[]> {
  const f = (n: string) => path.join(dir, n);
  for (const args of images) await mustRun('qemu-img', ['create', ...args.map((a) => (a.includes('.') && !a.startsWith('-') ? f(a) : a))]);
  const d = await spawnDaemon(f(`${program}.sock`), [], program);
  const out: unknown[] = [];
  try {
    for (const step of script(f)) {
      if (step[0] === 'nodes') {
        const nodes = (await d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
        for (const n of nodes) {
          if ((n['node-name'] as string).startsWith('#')) continue;
          const { 'actual-size': _a, 'format-specific': _f, ...image } = n.image as Record<string, unknown>;
          out.push([n['node-name'], n.drv, n.ro, n.file, n.backing_file, image]);
        }
      } else if (step[0] === 'info') {
        const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', f(step[1] as string)])) as Record<string, unknown>;
        out.push([info['backing-filename'], info['backing-filename-format'], info['virtual-size']]);
      } else if (step[0] === 'ls') {
        out.push((await fsp.readdir(dir)).filter((n) => !n.endsWith('.sock')).sort());
      } else {
        out.push(await d.qmp.request(step[0], step[1] as Record<string, unknown> | undefined));
      }
    }
  } finally {
    assert.equal(await d.stop(), 0);
  }
  return JSON.parse(JSON.stringify(out).replaceAll(dir, 'DIR')) as unknown[];
}

async function same(images: string[][], script: (f: (n: string) => string) => Step[]): Promise<void> {
  const a = await tempDir('bm-snapq-');
  const b = await tempDir('bm-snapb-');
  try {
    const theirs = await runScript('qemu-storage-daemon', a.dir, images, script);
    const ours = await runScript('bitmirror', b.dir, images, script);
    for (let i = 0; i < Math.max(theirs.length, ours.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
  } finally {
    await a.cleanup();
    await b.cleanup();
  }
}

const qcow2 = (name: string, ...more: string[]) => ['-f', 'qcow2', ...more, name, ...(more.includes('-b') ? [] : ['1M'])];
const file = (f: (n: string) => string, name: string) => ({ driver: 'file', filename: f(name) });
const skip = !haveQsd && 'qemu-storage-daemon not installed';

test('blockdev-snapshot: refusals and the graph afterwards as qemu-storage-daemon 7.2', { skip }, async () => {
  await same([qcow2('base.qcow2'), qcow2('ov.qcow2', '-b', 'base.qcow2', '-F', 'qcow2'), qcow2('ov2.qcow2'), ['-f', 'raw', 'r.raw', '1M'], qcow2('other.qcow2'), qcow2('ovb.qcow2', '-b', 'other.qcow2', '-F', 'qcow2')], (f) => [
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: file(f, 'base.qcow2') }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'ov2', file: file(f, 'ov2.qcow2') }],
    ['blockdev-add', { driver: 'raw', 'node-name': 'r', file: file(f, 'r.raw') }],
    ['object-add', { 'qom-type': 'throttle-group', id: 'tg' }],
    ['blockdev-add', { driver: 'throttle', 'node-name': 'thr', 'throttle-group': 'tg', file: 'ov2' }],
    ['nbd-server-start', { addr: { type: 'unix', data: { path: f('nbd.sock') } } }],
    ['block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'ov2' }],
    ['blockdev-snapshot', { node: 'nope', overlay: 'ov2' }],
    ['blockdev-snapshot', { node: 'base', overlay: 'nope' }],
    ['blockdev-snapshot', { node: 'base', overlay: 'r' }],
    ['blockdev-snapshot', { node: 'base', overlay: 'thr' }],
    ['blockdev-snapshot', { node: 'base', overlay: 'ov2' }],
    ['block-export-del', { id: 'e1' }],
    ['blockdev-snapshot', { node: 'base', overlay: 'base' }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'ov', file: file(f, 'ov.qcow2'), backing: null }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'ovb', file: file(f, 'ovb.qcow2') }],
    ['blockdev-snapshot', { node: 'base', overlay: 'ovb' }],
    ['block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'base', writable: true }],
    ['transaction', { actions: [{ type: 'blockdev-snapshot', data: { node: 'base', overlay: 'ov' } }, { type: 'abort', data: {} }] }],
    ['nodes'],
    ['blockdev-snapshot', { node: 'base', overlay: 'ov' }],
    ['nodes'],
    ['query-block-exports'],
    ['blockdev-snapshot', { node: 'base', overlay: 'ov2' }],
    ['blockdev-snapshot', { node: 'ov2', overlay: 'ov' }],
    ['blockdev-snapshot', { node: 'ov', overlay: 'ov2' }],
    ['nodes'],
    ['blockdev-del', { 'node-name': 'base' }],
  ]);
});

test('blockdev-snapshot-sync: refusals, the created overlay and mode=existing as qemu-storage-daemon 7.2', { skip }, async () => {
  await same([qcow2('base.qcow2'), qcow2('s3.qcow2')], (f) => [
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: file(f, 'base.qcow2') }],
    ['nbd-server-start', { addr: { type: 'unix', data: { path: f('nbd.sock') } } }],
    ['block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'base', writable: true }],
    ['blockdev-snapshot-sync', { 'snapshot-file': f('s1.qcow2') }],
    ['blockdev-snapshot-sync', { 'node-name': 'base', 'snapshot-file': f('s1.qcow2') }],
    ['blockdev-snapshot-sync', { device: 'base', 'snapshot-file': f('s1.qcow2'), 'snapshot-node-name': 's1' }],
    ['blockdev-snapshot-sync', { 'node-name': 'base', 'snapshot-file': f('s1.qcow2'), 'snapshot-node-name': 'base' }],
    ['blockdev-snapshot-sync', { 'node-name': 'base', 'snapshot-file': f('s0.raw'), format: 'raw', 'snapshot-node-name': 's0' }],
    ['blockdev-snapshot-sync', { 'node-name': 'base', 'snapshot-file': f('none.qcow2'), 'snapshot-node-name': 's2', mode: 'existing' }],
    ['transaction', { actions: [{ type: 'blockdev-snapshot-sync', data: { 'node-name': 'base', 'snapshot-file': f('s9.qcow2'), 'snapshot-node-name': 's9' } }], properties: { 'completion-mode': 'grouped' } }],
    ['transaction', { actions: [{ type: 'blockdev-snapshot-sync', data: { 'node-name': 'base', 'snapshot-file': f('s9.qcow2'), 'snapshot-node-name': 's9' } }, { type: 'abort', data: {} }] }],
    ['ls'],
    ['nodes'],
    ['blockdev-snapshot-sync', { 'node-name': 'base', 'snapshot-file': f('s1.qcow2'), 'snapshot-node-name': 's1' }],
    ['info', 's1.qcow2'],
    ['query-block-exports'],
    ['blockdev-snapshot-sync', { 'node-name': 's1', 'snapshot-file': f('s3.qcow2'), 'snapshot-node-name': 's3', mode: 'existing' }],
    ['nodes'],
    ['blockdev-del', { 'node-name': 's3' }],
    ['blockdev-del', { 'node-name': 's1' }],
  ]);
});
