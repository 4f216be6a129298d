/**
 * change-backing-file against qemu-storage-daemon 7.2: the same script gives the same replies, the
 * same node descriptions (backing file name, format, json: filename when the name no longer names
 * the backing node) and the same image headers (qemu-img info), which qemu-img check finds clean.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { haveQsd, mustRun, tempDir } from '../support/tools.js';

async function chain(dir: string): Promise<void> {
  await mustRun('qemu-img', ['create', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '1M']);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path.join(dir, 'mid.qcow2')]);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', path.join(dir, 'top.qcow2')]);
}

/** The script's replies, the top node's description and the header qemu-img reads, after each step. */
async function runScript(program: 'bitmirror' | 'qemu-storage-daemon', dir: string): Promise<unknown[]> {
  await chain(dir);
  const top = path.join(dir, 'top.qcow2');
  const d = await spawnDaemon(path.join(dir, `${program}.sock`), [], program);
  const out: unknown[] = [];
  const describe = async () => {
    const nodes = (await d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    const n = nodes.find((x) => x['node-name'] === 'top')!;
    const { 'actual-size': _size, 'format-specific': _fs, ...image } = n.image as Record<string, unknown>;
    out.push({ ro: n.ro, image });
    const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', top])) as Record<string, unknown>;
    out.push({ backing: info['backing-filename'], format: info['backing-filename-format'] });
  };
  const r = async (cmd: string, args: Record<string, unknown>) => out.push(await d.qmp.request(cmd, args));
  try {
    await r('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
    await r('blockdev-add', { driver: 'null-co', 'node-name': 'null0' });
    await r('change-backing-file', { device: 'nope', 'image-node-name': 'top', 'backing-file': 'x' });
    await r('change-backing-file', { device: 'top', 'image-node-name': 'nope', 'backing-file': 'x' });
    await r('change-backing-file', { device: 'top', 'image-node-name': 'null0', 'backing-file': 'x' });
    await r('change-backing-file', { device: 'null0', 'image-node-name': 'null0', 'backing-file': 'x' });
    await r('change-backing-file', { device: 'null0', 'image-node-name': 'top', 'backing-file': 'x' });
    await r('change-backing-file', { device: 'top', 'image-node-name': 'top', 'backing-file': path.join(dir, 'mid.qcow2') });
    await describe();
    await r('change-backing-file', { device: 'top', 'image-node-name': 'top', 'backing-file': 'somewhere-else.qcow2' });
    await describe();
    await r('change-backing-file', { device: 'top', 'image-node-name': 'top', 'backing-file': '' });
    await describe();
    await r('change-backing-file', { device: 'top', 'image-node-name': 'top', 'backing-file': 'x'.repeat(1024) });
    await r('change-backing-file', { device: 'top', 'image-node-name': 'top', 'backing-file': 'mid.qcow2' });
    await describe();
    await r('blockdev-del', { 'node-name': 'top' });
    // A read-only backing node is reopened read-write for the change, and read-only again after.
    const file = (name: string) => ({ driver: 'file', filename: path.join(dir, name) });
    await r('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: file('base.qcow2'), 'read-only': true });
    await r('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', file: file('mid.qcow2'), backing: 'base', 'read-only': true });
    await r('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: file('top.qcow2'), backing: 'mid' });
    await r('change-backing-file', { device: 'top', 'image-node-name': 'mid', 'backing-file': path.join(dir, 'base.qcow2') });
    const nodes = (await d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    out.push(nodes.filter((n) => !(n['node-name'] as string).startsWith('#')).map((n) => [n['node-name'], n.ro]));
    const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', path.join(dir, 'mid.qcow2')])) as Record<string, unknown>;
    out.push(info['backing-filename']);
  } finally {
    assert.equal(await d.stop(), 0);
  }
  for (const img of ['top.qcow2', 'mid.qcow2', 'base.qcow2']) assert.match(await mustRun('qemu-img', ['check', path.join(dir, img)]), /No errors were found/);
  return JSON.parse(JSON.stringify(out).replaceAll(dir, 'DIR')) as unknown[];
}

test('change-backing-file: same replies, node descriptions and headers as qemu-storage-daemon 7.2', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const a = await tempDir('bm-cbf-q-');
  const b = await tempDir('bm-cbf-b-');
  try {
    const theirs = await runScript('qemu-storage-daemon', a.dir);
    const ours = JSON.parse(JSON.stringify(await runScript('bitmirror', b.dir))) as unknown[];
    // The two runs live in different directories.
    const norm = (v: unknown[]) => JSON.parse(JSON.stringify(v).replace(/bm-cbf-[qb]-[A-Za-z0-9]+/g, 'T')) as unknown[];
    assert.deepEqual(norm(ours), norm(theirs));
  } finally {
    await a.cleanup();
    await b.cleanup();
  }
});
