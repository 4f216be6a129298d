/**
 * Mirroring into and out of RBD on the test file's own Ceph cluster, writes going on meanwhile: a full
 * mirror qcow2 → RBD, then a bitmap-driven incremental one (the working bitmap of the full run), each
 * checked identical by qemu-img compare through QEMU's rbd driver and by `rbd export`; the RBD image
 * exported over NBD reads the same; then back RBD → qcow2, full and incremental, the same way.
 * A soft cancel after READY is the copy without a pivot: source and target are equal at that instant.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, addQcow2, qcow2, io, flush, assertIdentical, bitmapCount, MiB, KiB, type Env } from '../support/daemon.js';
import { cephCluster, skipCeph, type CephCluster } from '../support/ceph.js';
import { mustRun } from '../support/tools.js';

const SIZE = 32 * MiB;

/** A pattern write somewhere in the disk, different on every call. */
let writeNo = 0;
async function someWrite(env: Env, node: string): Promise<void> {
  writeNo++;
  const off = ((writeNo * 7919) % (SIZE / (64 * KiB))) * 64 * KiB + (writeNo % 3) * 4096;
  await io(env, node, `write -P ${writeNo & 0xff} ${off} ${48 * KiB}`);
}

/**
 * Mirror `device` into `target` (with `bitmap` as the working bitmap when given) while writes to the
 * source go on until READY and a few more after it; then a soft cancel. Returns the bytes the job copied.
 */
async function mirrorWhileWriting(env: Env, device: string, target: string, bitmap?: string): Promise<number> {
  const id = `m-${device}-${target}`;
  await env.d.qmp.execute('blockdev-mirror', { 'job-id': id, device, target, sync: 'full', ...(bitmap ? { bitmap } : {}) });
  let ready = false;
  const readyEvent = env.d.qmp.waitEvent('BLOCK_JOB_READY', { device: id }, 120_000).then(() => (ready = true));
  let during = 0;
  // Writes go on while the job runs (at least 3, at most 20: unbounded writes could outrun the copy).
  while ((!ready && during < 20) || during < 3) {
    await someWrite(env, device);
    during++;
  }
  await readyEvent;
  for (let i = 0; i < 3; i++) await someWrite(env, device);
  const jobs = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-jobs');
  const job = jobs.find((j) => j.id === id);
  await env.d.qmp.execute('block-job-cancel', { device: id });
  await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id, status: 'null' }, 120_000);
  return job?.['total-progress'] as number;
}

/** An RBD image with 64 KiB objects: the bitmaps' granularity, so a working bitmap is not finer than its clusters. */
async function createRbd(env: Env, ceph: CephCluster, image: string): Promise<void> {
  await env.d.qmp.execute('blockdev-create', { 'job-id': `c-${image}`, options: { driver: 'rbd', location: ceph.location(image), size: SIZE, 'cluster-size': 64 * KiB } });
  await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id: `c-${image}`, status: 'concluded' });
  await env.d.qmp.execute('job-dismiss', { id: `c-${image}` });
}

test('full and bitmap-driven incremental mirror qcow2 → RBD and back while writes go on; compare, rbd export, NBD', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const env = await setup('rbd-mirror');
  try {
    const src = await qcow2(env.f('src.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4M', '-c', 'write -P 0x22 20M 1M', '-c', 'write -z 26M 2M', src]);
    await addQcow2(env, 'src', src);
    await createRbd(env, ceph, 'fwd');
    await env.d.qmp.execute('blockdev-add', { driver: 'rbd', 'node-name': 'rbd0', ...ceph.location('fwd') });

    // Full mirror qcow2 → RBD; 'inc' records every write from its start on.
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 'inc', granularity: 64 * KiB });
    await mirrorWhileWriting(env, 'src', 'rbd0');
    await flush(env, 'src', 'rbd0');
    // qemu-img compare's block status (rbd_diff_iterate2 with fast-diff on an image opened writable)
    // asks the daemon for the image's exclusive lock; the daemon hands it over and takes it back at its
    // next write. (Had the daemon missed its watch pings for the OSD's watch timeout, it would be taken
    // for dead and blocklisted: ceph-fixture.sh keeps that timeout at its default for this reason.)
    await assertIdentical(src, ceph.qemuName('fwd'));

    // Incremental: more writes, then a mirror that copies only what 'inc' marks (and new writes).
    await env.d.qmp.execute('block-dirty-bitmap-clear', { node: 'src', name: 'inc' });
    for (let i = 0; i < 6; i++) await someWrite(env, 'src');
    const dirty = await bitmapCount(env, 'src', 'inc');
    assert.ok(dirty > 0 && dirty < SIZE / 4, `a few dirty clusters (${dirty})`);
    const copied = await mirrorWhileWriting(env, 'src', 'rbd0', 'inc');
    assert.ok(copied < SIZE / 2, `the incremental run copied ${copied} bytes, not the disk`);
    await flush(env, 'src', 'rbd0');
    await assertIdentical(src, ceph.qemuName('fwd'));

    // rbd export of the image equals the source.
    const exported = env.f('fwd.raw');
    await ceph.rbd('export', `${ceph.pool}/fwd`, exported);
    await assertIdentical(src, exported, ['-F', 'raw']);

    // The RBD node over NBD reads the same.
    const sock = env.f('nbd.sock');
    await env.d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await env.d.qmp.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'rbd0' });
    await assertIdentical(src, `nbd+unix:///rbd0?socket=${sock}`, ['-F', 'raw']);
    await env.d.qmp.execute('block-export-del', { id: 'e0' });
    await env.d.qmp.waitEvent('BLOCK_EXPORT_DELETED', { id: 'e0' });

    // Back: RBD → qcow2, full then incremental, writes going to the RBD node meanwhile.
    const back = await qcow2(env.f('back.qcow2'), SIZE);
    await addQcow2(env, 'back', back);
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'rbd0', name: 'inc2', granularity: 64 * KiB });
    await mirrorWhileWriting(env, 'rbd0', 'back');
    await flush(env, 'rbd0', 'back');
    await assertIdentical(ceph.qemuName('fwd'), back);
    await env.d.qmp.execute('block-dirty-bitmap-clear', { node: 'rbd0', name: 'inc2' });
    for (let i = 0; i < 6; i++) await someWrite(env, 'rbd0');
    const copiedBack = await mirrorWhileWriting(env, 'rbd0', 'back', 'inc2');
    assert.ok(copiedBack < SIZE / 2, `the incremental run back copied ${copiedBack} bytes, not the disk`);
    await flush(env, 'rbd0', 'back');
    await assertIdentical(ceph.qemuName('fwd'), back);
    await mustRun('qemu-img', ['check', '-U', back]);
  } finally {
    await env.done();
  }
});
