/**
 * Persistent dirty bitmaps of RBD images, kept in the image's metadata in the cluster (rbd-bitmaps.ts),
 * on the test file's own Ceph cluster:
 *  - the same bitmap script (add, refusals, merge, transaction, remove, disable, restart, query) on a
 *    qcow2 node and on an RBD node gives the same replies and bitmaps: qcow2's semantics;
 *  - after SIGKILL the bitmap comes back consistent (recovered) and covers every write made since the
 *    last clear, and an incremental backup of the RBD disk then reads only the dirty extents.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { startDaemon, qcow2, bitmaps, KiB, MiB } from '../support/daemon.js';
import { cephCluster, skipCeph, type CephCluster } from '../support/ceph.js';
import { mustRun, tempDir } from '../support/tools.js';
import type { SpawnedDaemon } from '../../src/daemon/spawn.js';

const SIZE = 32 * MiB;

async function rbdImage(ceph: CephCluster, image: string): Promise<Record<string, unknown>> {
  await ceph.rbd('create', '--size', `${SIZE / MiB}M`, `${ceph.pool}/${image}`);
  return { driver: 'rbd', ...ceph.location(image) };
}

/** The bitmaps of node 'd' as query-named-block-nodes shows them, by name. */
async function bitmapList(d: SpawnedDaemon): Promise<unknown> {
  return bitmaps({ d }, 'd');
}

async function script(dir: string, name: string, node: Record<string, unknown>): Promise<unknown[]> {
  const out: unknown[] = [];
  const start = () => startDaemon(path.join(dir, `${name}.sock`), ['--blockdev', JSON.stringify({ ...node, 'node-name': 'd' })]);
  let d = await start();
  const r = async (cmd: string, args?: Record<string, unknown>) => {
    const rep = await d.qmp.request(cmd, args);
    out.push([cmd, 'error' in rep ? rep.error : rep.return]);
  };
  const io = (cmd: string) => d.qmp.hmpOutput(`qemu-io d "${cmd}"`);
  await r('block-dirty-bitmap-add', { node: 'd', name: 'b0', persistent: true, granularity: 64 * KiB });
  await r('block-dirty-bitmap-add', { node: 'd', name: 'b0', persistent: true });
  await r('block-dirty-bitmap-add', { node: 'd', name: 'b1', persistent: true, granularity: 256 });
  await r('block-dirty-bitmap-add', { node: 'd', name: 'x'.repeat(1024), persistent: true });
  await r('block-dirty-bitmap-add', { node: 'd', name: 'b1', persistent: true, disabled: true, granularity: 128 * KiB });
  await r('block-dirty-bitmap-add', { node: 'd', name: 'tmp', persistent: false });
  await io('write -P 1 0 64k');
  await io('write -P 2 5M 100k');
  await r('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'd', name: 'b2', persistent: true, granularity: 64 * KiB } },
      { type: 'block-dirty-bitmap-merge', data: { node: 'd', target: 'b2', bitmaps: ['b0'] } },
    ],
  });
  await r('block-dirty-bitmap-add', { node: 'd', name: 'gone', persistent: true });
  await io('write -P 3 9M 4k');
  await r('block-dirty-bitmap-remove', { node: 'd', name: 'gone' });
  await r('block-dirty-bitmap-merge', { node: 'd', target: 'b1', bitmaps: ['b0', 'tmp'] });
  await r('block-dirty-bitmap-disable', { node: 'd', name: 'b0' });
  await io('write -P 4 20M 64k');
  out.push(await bitmapList(d));
  await r('x-debug-block-dirty-bitmap-sha256', { node: 'd', name: 'b1' });
  assert.equal(await d.stop(), 0);
  // Again: the persistent bitmaps as they were, the others gone; then a clear and a remove that last.
  d = await start();
  out.push(await bitmapList(d));
  await r('x-debug-block-dirty-bitmap-sha256', { node: 'd', name: 'b1' });
  await r('block-dirty-bitmap-clear', { node: 'd', name: 'b2' });
  await r('block-dirty-bitmap-remove', { node: 'd', name: 'b1' });
  await r('block-dirty-bitmap-enable', { node: 'd', name: 'b0' });
  await io('write -P 5 30M 64k');
  assert.equal(await d.stop(), 0);
  d = await start();
  out.push(await bitmapList(d));
  assert.equal(await d.stop(), 0);
  return out;
}

test('RBD persistent bitmaps: the same script gives the same replies and bitmaps as on qcow2', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const tmp = await tempDir('bm-rbdbm-');
  try {
    const img = await qcow2(path.join(tmp.dir, 'a.qcow2'), SIZE);
    const onQcow2 = await script(tmp.dir, 'q', { driver: 'qcow2', file: { driver: 'file', filename: img } });
    const onRbd = await script(tmp.dir, 'r', await rbdImage(ceph, 'sem'));
    const mask = (v: unknown) => JSON.parse(JSON.stringify(v).replaceAll("in 'd'", 'in NODE'));
    assert.equal(onRbd.length, onQcow2.length);
    for (let i = 0; i < onQcow2.length; i++) assert.deepEqual(mask(onRbd[i]), mask(onQcow2[i]), `step ${i}`);
    // The bitmaps live in the cluster, beside the image.
    const meta = await ceph.rbd('image-meta', 'list', `${ceph.pool}/sem`);
    assert.match(meta, /__org\.bitmirror\.bitmap:b0/);
    assert.doesNotMatch(meta, /bitmap:b1|bitmap:gone|bitmap:tmp/);
  } finally {
    await tmp.cleanup();
  }
});

test('RBD persistent bitmap after SIGKILL: recovered, a superset of the writes; the incremental backup reads only dirty extents', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const tmp = await tempDir('bm-rbdkill-');
  try {
    const node = { ...(await rbdImage(ceph, 'kill')), 'node-name': 'd' };
    const start = () => startDaemon(path.join(tmp.dir, 'k.sock'), ['--blockdev', JSON.stringify(node)]);
    let d = await start();
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'd', name: 'b0', persistent: true, granularity: 64 * KiB });
    await d.qmp.hmpOutput('qemu-io d "write -P 7 0 1M"');
    assert.equal(await d.stop(), 0);

    // The next session: a full backup's worth is behind us; clear, write, then SIGKILL.
    d = await start();
    await d.qmp.execute('block-dirty-bitmap-clear', { node: 'd', name: 'b0' });
    const writes: Array<[number, number]> = [
      [3 * MiB + 4096, 8192],
      [17 * MiB, 64 * KiB],
      [SIZE - 4096, 4096],
    ];
    for (const [off, len] of writes) await d.qmp.hmpOutput(`qemu-io d "write -P 9 ${off} ${len}"`);
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'd', name: 'late', persistent: true });
    await d.kill();

    // The killed daemon still holds the image's exclusive lock, and its watch stays until the OSD's
    // watch timeout (30 s): the admin breaks the lock, blocklisting the dead client.
    await ceph.breakLock('kill');
    d = await startDaemon(path.join(tmp.dir, 'k2.sock'));
    await d.qmp.execute('blockdev-add', node);
    const b = (await bitmapList(d)) as Record<string, Record<string, unknown>>;
    assert.equal(b.b0?.['__org.bitmirror_recovered'], true, JSON.stringify(b));
    assert.equal(b.b0.recording, true);
    assert.equal(b.late, undefined, 'a bitmap added in the killed session was never stored (as in qcow2)');
    // The stored bits (clear) ∪ the record's marked regions: each write lies in its own 4 MiB region.
    const count = b.b0.count as number;
    assert.equal(count, 3 * 4 * MiB);

    // Incremental backup of the RBD disk: what the bitmap marks, and only that, is read from the image.
    const target = await qcow2(path.join(tmp.dir, 'inc.qcow2'), SIZE);
    await d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 't', file: { driver: 'file', filename: target } });
    await d.qmp.execute('blockdev-backup', { 'job-id': 'inc', device: 'd', target: 't', sync: 'incremental', bitmap: 'b0', 'auto-dismiss': false });
    await d.qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'inc', status: 'concluded' }, 120_000);
    const job = (await d.qmp.execute<Array<Record<string, unknown>>>('query-jobs')).find((j) => j.id === 'inc')!;
    await d.qmp.execute('job-dismiss', { id: 'inc' });
    assert.equal(job.error, undefined);
    assert.equal(job['total-progress'], count, 'the backup copied (read) exactly the dirty extents');
    assert.equal(await d.stop(), 0);
    // …and they are exactly what the backup holds.
    const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', target])) as Array<{ length: number; data: boolean }>;
    assert.equal(map.filter((e) => e.data).reduce((n, e) => n + e.length, 0), count);
    // Every write of the killed session is in the backup, with the data written.
    for (const [off, len] of writes) await mustRun('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -P 9 ${off} ${len}`, target]);
  } finally {
    await tmp.cleanup();
  }
});

test('RBD persistent bitmaps follow blockdev-reopen: read-only, then writable again and covered by the write-intent record', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const tmp = await tempDir('bm-rbdreopen-');
  try {
    const node = { ...(await rbdImage(ceph, 'reopen')), 'node-name': 'd' };
    let d = await startDaemon(path.join(tmp.dir, 'a.sock'), ['--blockdev', JSON.stringify(node)]);
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'd', name: 'b0', persistent: true, granularity: 64 * KiB });
    assert.equal(await d.stop(), 0);
    d = await startDaemon(path.join(tmp.dir, 'b.sock'), ['--blockdev', JSON.stringify({ ...node, 'read-only': true })]);
    assert.equal(((await bitmapList(d)) as Record<string, Record<string, unknown>>).b0.busy, false);
    await d.qmp.execute('blockdev-reopen', { options: [{ ...node, 'read-only': false }] });
    await d.qmp.hmpOutput('qemu-io d "write -P 3 8M 4k"');
    await d.kill();
    await ceph.breakLock('reopen');
    d = await startDaemon(path.join(tmp.dir, 'c.sock'));
    await d.qmp.execute('blockdev-add', node);
    const b0 = ((await bitmapList(d)) as Record<string, Record<string, unknown>>).b0;
    assert.equal(b0['__org.bitmirror_recovered'], true, 'in use again after the reopen, and covered');
    assert.equal(b0.count, 4 * MiB, 'the 4 MiB region of the write');
    assert.equal(await d.stop(), 0);
    // A snapshot stays read-only.
    await ceph.rbd('snap', 'create', `${ceph.pool}/reopen@s`);
    d = await startDaemon(path.join(tmp.dir, 'd.sock'), ['--blockdev', JSON.stringify({ ...node, snapshot: 's', 'read-only': true })]);
    const err = await d.qmp.request('blockdev-reopen', { options: [{ ...node, snapshot: 's', 'read-only': false }] });
    assert.deepEqual('error' in err ? err.error : err, { class: 'GenericError', desc: "Cannot change node 'd' to r/w when using RBD snapshot" });
    assert.equal(await d.stop(), 0);
  } finally {
    await tmp.cleanup();
  }
});
