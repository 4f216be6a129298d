/**
 * The rbd driver on a cephx cluster, as libvirt and OpenStack open Ceph disks: no conf file and no
 * keyring, the monitors given as `server` and the client's key only in a `secret` object named by
 * `key-secret` (base64, or encrypted with another secret), `auth-client-required` passed on. The
 * cluster requires cephx, so an image opens only with the key from the secret. The same QMP script
 * against qemu-storage-daemon 7.2 gives the same replies (creates, opens, QEMU's messages for a
 * secret that is missing or no secret, a conf file that cannot be read, an empty server or auth list;
 * the nodes' json filenames), and data written through bitmirror's node is what `rbd export` reads.
 * Cases where librados retries for minutes (a wrong key, no key) are left out.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { createCipheriv } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { haveQsd } from '../support/daemon.js';
import { replayOn, type Replay } from '../support/qmp-replay.js';
import { cephCluster, skipCeph, type CephCluster } from '../support/ceph.js';

const skip = skipCeph || (!haveQsd && 'qemu-storage-daemon not installed');
const MiB = 1024 * 1024;

/** The admin key encrypted with a 32-byte master key (QEMU's secret keyid/iv), base64. */
function encryptedKey(key: Buffer, master: Buffer, iv: Buffer): string {
  const c = createCipheriv('aes-256-cbc', master, iv);
  return Buffer.concat([c.update(key), c.final()]).toString('base64');
}

/** The secrets the script uses: the admin key in base64, and encrypted with a master key. */
async function addSecrets(r: Replay, ceph: CephCluster): Promise<void> {
  const key = Buffer.from(await ceph.key('admin'), 'base64');
  const master = Buffer.alloc(32, 3);
  const iv = Buffer.alloc(16, 4);
  await r.request('object-add', { 'qom-type': 'secret', id: 'key', data: key.toString('base64'), format: 'base64' });
  await r.request('object-add', { 'qom-type': 'secret', id: 'master', data: master.toString('base64'), format: 'base64' });
  await r.request('object-add', { 'qom-type': 'secret', id: 'enckey', data: encryptedKey(key, master, iv), format: 'base64', keyid: 'master', iv: iv.toString('base64') });
  await r.request('object-add', { 'qom-type': 'throttle-group', id: 'tg' });
}

test('rbd with server, key-secret and auth-client-required on a cephx cluster, no conf file: as qemu-storage-daemon 7.2', { skip }, async () => {
  const ceph = await cephCluster({ cephx: true });
  assert.ok(ceph.cephx);
  const run = (program: 'bitmirror' | 'qemu-storage-daemon', prefix: string) =>
    replayOn(program, 'rbdx', async (r, env) => {
      await addSecrets(r, ceph);
      const server = [{ host: '127.0.0.1', port: ceph.monPort }];
      const loc = (image: string, extra: Record<string, unknown> = {}) => ({ pool: ceph.pool, image: prefix + image, server, user: 'admin', 'key-secret': 'key', ...extra });
      const create = async (id: string, options: Record<string, unknown>) => {
        await r.request('blockdev-create', { 'job-id': id, options: { driver: 'rbd', ...options } });
        await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id, status: 'concluded' });
        const jobs = (await env.d.qmp.execute<Array<Record<string, unknown>>>('query-jobs')).map((j) => (typeof j.error === 'string' ? { ...j, error: j.error.replaceAll(prefix, 'P-') } : j));
        r.replies.push(['query-jobs', jobs]);
        await r.request('job-dismiss', { id });
      };
      await create('c1', { location: loc('a'), size: 4 * MiB });
      await create('c2', { location: loc('b', { 'key-secret': 'enckey', 'auth-client-required': ['cephx'] }), size: 4 * MiB });
      await create('c3', { location: loc('c', { 'key-secret': 'nosec' }), size: 4 * MiB });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r1', ...loc('a') });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r2', ...loc('b', { 'key-secret': 'enckey', 'auth-client-required': ['cephx', 'none'] }) });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('a', { 'key-secret': 'nosec' }) });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('a', { 'key-secret': 'tg' }) });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('a', { conf: '/nonexistent.conf', 'key-secret': 'nosec' }) });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('a', { 'auth-client-required': [] }) });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('a', { server: [] }) });
      await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'r3', ...loc('a', { server: [{ host: '::1', port: ceph.monPort }, ...server] }) });
      // The secret may go once the node is open (QEMU reads it only to connect).
      await r.request('object-del', { id: 'enckey' });
      await r.request('block_resize', { 'node-name': 'r2', size: 8 * MiB });
      const nodes = await env.d.qmp.execute<Array<{ 'node-name': string; image: { 'virtual-size': number; filename: string } }>>('query-named-block-nodes', { flat: true });
      r.replies.push(nodes.map((n) => [n['node-name'], n.image['virtual-size'], n.image.filename.replaceAll(prefix, 'P-')]).sort());
      if (program === 'bitmirror') {
        // Data through the node reaches the image: rbd export reads what qemu-io wrote.
        await env.d.qmp.execute('human-monitor-command', { 'command-line': 'qemu-io r1 "write -P 0x5c 0 1M"' });
        await env.d.qmp.execute('human-monitor-command', { 'command-line': 'qemu-io r1 "flush"' });
        const out = env.f('export.raw');
        await ceph.rbd('export', `${ceph.pool}/${prefix}a`, out);
        const data = await readFile(out);
        assert.equal(data.length, 4 * MiB);
        assert.ok(data.subarray(0, MiB).every((b) => b === 0x5c));
        assert.ok(data.subarray(MiB).every((b) => b === 0));
      }
      for (const n of ['r1', 'r2', 'r3']) await r.request('blockdev-del', { 'node-name': n });
    });
  const theirs = await run('qemu-storage-daemon', `q${process.pid}-`);
  const ours = await run('bitmirror', `b${process.pid}-`);
  for (let i = 0; i < Math.max(ours.length, theirs.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
  // The script did reach the cluster: the first create and open passed.
  assert.deepEqual(ours[5], ['query-jobs', [{ id: 'c1', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 }]]);
  assert.deepEqual(ours[13], ['blockdev-add', {}]);
});

test('rbd encrypt: the secret is looked up, then refused with QEMU\'s message for a librbd without encryption', { skip: skipCeph }, async () => {
  const ceph = await cephCluster({ cephx: true });
  const replies = await replayOn('bitmirror', 'rbdx-enc', async (r) => {
    const key = await ceph.key('admin');
    await r.request('object-add', { 'qom-type': 'secret', id: 'key', data: key, format: 'base64' });
    await ceph.rbd('create', `${ceph.pool}/e${process.pid}`, '--size', '4M');
    const loc = { pool: ceph.pool, image: `e${process.pid}`, server: [{ host: '127.0.0.1', port: ceph.monPort }], user: 'admin', 'key-secret': 'key' };
    await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'e1', ...loc, encrypt: { format: 'luks', 'key-secret': 'nosec' } });
    await r.request('blockdev-add', { driver: 'rbd', 'node-name': 'e1', ...loc, encrypt: { format: 'luks', 'key-secret': 'key' } });
  });
  assert.deepEqual(replies.slice(1), [
    ['blockdev-add', { class: 'GenericError', desc: "No secret with id 'nosec'" }],
    ['blockdev-add', { class: 'GenericError', desc: 'RBD library does not support image encryption' }],
  ]);
});
