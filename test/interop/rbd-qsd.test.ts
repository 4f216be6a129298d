/**
 * The rbd driver against qemu-storage-daemon 7.2 with Debian's qemu-block-extra, on the test
 * file's own throwaway Ceph cluster: the same QMP script (blockdev-create rbd with its refusals,
 * blockdev-add rbd with every failing step of connecting and opening, query-named-block-nodes,
 * block_resize, blockdev-del) gives equal replies. Each daemon creates images of its own prefix.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, haveQsd, type Env } from '../support/daemon.js';
import { cephCluster, skipCeph, type CephCluster } from '../support/ceph.js';

async function script(program: 'bitmirror' | 'qemu-storage-daemon', ceph: CephCluster, prefix: string): Promise<unknown[]> {
  const env: Env = await setup(`rbdq-${program}`, program);
  const out: unknown[] = [];
  try {
    const { qmp } = env.d;
    const r = async (cmd: string, args?: Record<string, unknown>) => {
      const rep = await qmp.request(cmd, args);
      out.push(JSON.parse(JSON.stringify([cmd, 'error' in rep ? rep.error : rep.return]).replaceAll(prefix, 'P-')));
    };
    const loc = (image: string, extra: Record<string, unknown> = {}) => ({ ...ceph.location(prefix + image), ...extra });
    const create = async (id: string, options: Record<string, unknown>) => {
      await r('blockdev-create', { 'job-id': id, options: { driver: 'rbd', ...options } });
      await qmp.waitEvent('JOB_STATUS_CHANGE', { id, status: 'concluded' });
      await r('query-jobs');
      await r('job-dismiss', { id });
    };
    await create('c1', { location: loc('a'), size: 4 << 20 });
    await create('c2', { location: loc('a'), size: 4 << 20 });
    await create('c3', { location: loc('b'), size: 4 << 20, 'cluster-size': 65536 });
    await create('c4', { location: loc('c'), size: 4 << 20, 'cluster-size': 1000 });
    await create('c5', { location: loc('c'), size: 4 << 20, 'cluster-size': 2048 });
    await create('c6', { location: loc('c', { pool: 'nopool' }), size: 4 << 20 });
    await create('c7', { location: loc('c', { snapshot: 's' }), size: 4 << 20 });
    await create('c8', { location: loc('c'), size: 4 << 20, encrypt: { format: 'luks', 'key-secret': 'sec0' } });
    await r('blockdev-create', { 'job-id': 'c9', options: { driver: 'rbd', location: { pool: 'rbd' }, size: 1 } });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r1', ...loc('a') });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('nosuch') });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('a', { pool: 'nosuch' }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('a', { snapshot: 'nosnap' }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('a', { conf: '/nonexistent.conf' }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('a', { namespace: 'ns1' }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('a', { bogus: 1 }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', pool: 'rbd' });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('b', { 'key-secret': 'nosec' }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('b', { encrypt: { format: 'luks', 'key-secret': 'x' } }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('b', { user: 'admin' }) });
    await r('blockdev-add', { driver: 'rbd', 'node-name': 'r4', ...loc('b'), 'read-only': true });
    await r('query-named-block-nodes');
    await r('block_resize', { 'node-name': 'r1', size: 8 << 20 });
    await r('block_resize', { 'node-name': 'r4', size: 8 << 20 });
    await r('query-named-block-nodes', { flat: true });
    for (const n of ['r1', 'r2', 'r4', 'r1']) await r('blockdev-del', { 'node-name': n });
    await r('query-named-block-nodes', { flat: true });
  } finally {
    await env.done();
  }
  return out;
}

test('blockdev-create/add rbd and query-named-block-nodes: replies equal to qemu-storage-daemon 7.2', { skip: skipCeph || (!haveQsd && 'qemu-storage-daemon not installed') }, async () => {
  const ceph = await cephCluster();
  const theirs = await script('qemu-storage-daemon', ceph, `q${process.pid}-`);
  const ours = await script('bitmirror', ceph, `b${process.pid}-`);
  assert.equal(ours.length, theirs.length);
  for (let i = 0; i < theirs.length; i++) assert.deepEqual(ours[i], theirs[i], `reply ${i}`);
});
