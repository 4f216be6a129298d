/**
 * Pull-mode backup as libvirt runs it (consumers.md §1.5): a scratch qcow2 backed by the live disk, one
 * transaction with the new checkpoint's bitmap, a temporary disabled bitmap on the scratch node merged
 * from the previous checkpoint, and blockdev-backup sync=none into the scratch; then the scratch is
 * exported over NBD with that bitmap. While writes continue on the disk (through the filter and on the
 * disk node below it), nbdcopy reads a frozen image equal to the disk at the backup's start, and
 * nbdinfo --map=qemu:dirty-bitmap:backup-vda shows exactly the extents changed since the previous
 * checkpoint. Then libvirt's teardown: block-job-cancel force, job-dismiss, block-export-del,
 * blockdev-del, bitmap removal, nbd-server-stop.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { KiB, MiB, setup, qcow2, addQcow2, io, flush, assertIdentical, eventsUntil } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

const SIZE = 32 * MiB;

test('pull-mode backup: NBD readers get the frozen image and the changed extents while writes continue', async () => {
  const env = await setup('backup-pull');
  try {
    const disk = await qcow2(env.f('disk.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x10 0 8M', '-c', 'write -P 0x20 16M 4M', disk]);
    await addQcow2(env, 'libvirt-1-format', disk);
    // The previous checkpoint, and the writes since.
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'libvirt-1-format', name: 'c0', persistent: false });
    await io(env, 'libvirt-1-format', 'write -P 0x31 1M 64k');
    await io(env, 'libvirt-1-format', 'write -P 0x32 20M 128k');
    await io(env, 'libvirt-1-format', 'write -P 0x33 30M 4k');
    // The disk at the backup's start.
    await flush(env, 'libvirt-1-format');
    const point = env.f('point.raw');
    await mustRun('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', disk, point]);
    // The scratch image, backed by the live disk.
    const scratch = env.f('scratch.qcow2');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', '-F', 'qcow2', '-b', disk, scratch]);
    await addQcow2(env, 'backup-libvirt-1-format', scratch, { backing: 'libvirt-1-format' });
    const sock = env.f('nbd.sock');
    await env.d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await env.d.qmp.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'libvirt-1-format', name: 'c1', persistent: false } },
        { type: 'block-dirty-bitmap-add', data: { node: 'backup-libvirt-1-format', name: 'backup-vda', persistent: false, disabled: true, granularity: 64 * KiB } },
        { type: 'block-dirty-bitmap-merge', data: { node: 'backup-libvirt-1-format', target: 'backup-vda', bitmaps: [{ node: 'libvirt-1-format', name: 'c0' }] } },
        {
          type: 'blockdev-backup',
          data: { device: 'libvirt-1-format', target: 'backup-libvirt-1-format', sync: 'none', 'job-id': 'backup-libvirt-1-format', 'auto-finalize': true, 'auto-dismiss': false },
        },
      ],
    });
    await env.d.qmp.execute('block-export-add', {
      type: 'nbd',
      id: 'libvirt-nbd-backup-libvirt-1-format',
      'node-name': 'backup-libvirt-1-format',
      writable: false,
      name: 'vda',
      bitmaps: ['backup-vda'],
    });
    // The guest keeps writing: on the disk node (below the filter) and over what the checkpoint covers.
    await io(env, 'libvirt-1-format', 'write -P 0x41 0 2M');
    await io(env, 'libvirt-1-format', 'write -P 0x42 1M 64k');
    await io(env, 'libvirt-1-format', 'write -z 16M 1M');
    await io(env, 'libvirt-1-format', 'discard 24M 1M');
    const uri = `nbd+unix:///vda?socket=${sock}`;
    const copy = env.f('copy.raw');
    await mustRun('nbdcopy', [uri, copy]);
    await io(env, 'libvirt-1-format', 'write -P 0x43 6M 3M');
    await assertIdentical(copy, point, ['-f', 'raw', '-F', 'raw']);
    // The changed extents since c0: exactly the three writes' clusters.
    const map = JSON.parse(await mustRun('nbdinfo', ['--json', '--map=qemu:dirty-bitmap:backup-vda', uri])) as Array<{ offset: number; length: number; type: number }>;
    const dirty = map.filter((e) => e.type & 1).map((e) => [e.offset, e.length]);
    assert.deepEqual(dirty, [
      [1 * MiB, 64 * KiB],
      [20 * MiB, 128 * KiB],
      [30 * MiB, 64 * KiB],
    ]);
    // The new checkpoint recorded what the guest wrote during the backup.
    const nodes = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    const c1 = ((nodes.find((n) => n['node-name'] === 'libvirt-1-format')!['dirty-bitmaps'] ?? []) as Array<Record<string, unknown>>).find((b) => b.name === 'c1');
    assert.equal(c1?.count, 2 * MiB + 1 * MiB + 1 * MiB + 3 * MiB);
    // libvirt's teardown.
    await env.d.qmp.execute('block-job-cancel', { device: 'backup-libvirt-1-format', force: true });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'backup-libvirt-1-format', status: 'concluded' });
    await env.d.qmp.execute('job-dismiss', { id: 'backup-libvirt-1-format' });
    await env.d.qmp.execute('block-export-del', { id: 'libvirt-nbd-backup-libvirt-1-format' });
    await eventsUntil(env, 'BLOCK_EXPORT_DELETED');
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'backup-libvirt-1-format' });
    await env.d.qmp.execute('block-dirty-bitmap-remove', { node: 'libvirt-1-format', name: 'c0' });
    await env.d.qmp.execute('nbd-server-stop');
    const left = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    assert.deepEqual(left.map((n) => n['node-name']).filter((n) => !String(n).startsWith('#')), ['libvirt-1-format']);
    await flush(env, 'libvirt-1-format');
    await mustRun('qemu-img', ['check', '-U', disk]);
  } finally {
    await env.done();
  }
});

test('fleecing with copy-before-write and snapshot-access (blockdev-add): a frozen NBD image while the disk is written', async () => {
  const env = await setup('backup-fleece');
  try {
    const disk = await qcow2(env.f('disk.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x10 0 8M', '-c', 'write -P 0x20 16M 4M', disk]);
    await addQcow2(env, 'disk', disk);
    await qcow2(env.f('scratch.qcow2'), SIZE);
    await addQcow2(env, 'scratch', env.f('scratch.qcow2'));
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'disk', name: 'c0' });
    await io(env, 'disk', 'write -P 0x31 1M 64k');
    // The disk when the filter is added.
    await flush(env, 'disk');
    const point = env.f('point.raw');
    await mustRun('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', disk, point]);
    await env.d.qmp.execute('blockdev-add', { driver: 'copy-before-write', 'node-name': 'fleece', file: 'disk', target: 'scratch' });
    await env.d.qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap', file: 'fleece' });
    // A copy-before-write that copies only what a bitmap marks: the rest of its snapshot is not readable.
    await qcow2(env.f('scratch2.qcow2'), SIZE);
    await addQcow2(env, 'scratch2', env.f('scratch2.qcow2'));
    const sock = env.f('nbd.sock');
    await env.d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await env.d.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'snap', name: 'snap', writable: false });
    // Writes to the disk node itself (nothing passes through the filter) are copied first.
    await io(env, 'disk', 'write -P 0x41 0 2M');
    await io(env, 'disk', 'write -z 16M 1M');
    await io(env, 'disk', 'write -P 0x32 1M 64k');
    const copy = env.f('copy.raw');
    await mustRun('nbdcopy', [`nbd+unix:///snap?socket=${sock}`, copy]);
    await io(env, 'disk', 'write -P 0x42 5M 1M');
    await assertIdentical(copy, point, ['-f', 'raw', '-F', 'raw']);
    // snapshot-access refuses writes.
    assert.match(await env.d.qmp.hmpOutput('qemu-io snap "write 0 4k"'), /Operation not permitted|Permission denied|failed/);
    await env.d.qmp.execute('block-export-del', { id: 'e' });
    await eventsUntil(env, 'BLOCK_EXPORT_DELETED');
    await env.d.qmp.execute('nbd-server-stop');
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'snap' });
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'fleece' });
    await env.d.qmp.execute('blockdev-add', { driver: 'copy-before-write', 'node-name': 'fleece2', file: 'disk', target: 'scratch2', bitmap: { node: 'disk', name: 'c0' } });
    await env.d.qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': 'snap2', file: 'fleece2' });
    assert.match(await env.d.qmp.hmpOutput('qemu-io snap2 "read -P 0x32 1M 64k"'), /read 65536/);
    assert.match(await env.d.qmp.hmpOutput('qemu-io snap2 "read 8M 64k"'), /Permission denied/);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'snap2' });
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'fleece2' });
  } finally {
    await env.done();
  }
});

/** The ranges of a qcow2 image that hold data (qemu-img map), as [start, length]. */
async function dataExtents(file: string): Promise<Array<[number, number]>> {
  const map = JSON.parse(await mustRun('qemu-img', ['map', '-U', '-f', 'qcow2', '--output=json', file])) as Array<{ start: number; length: number; data: boolean }>;
  return map.filter((e) => e.data).map((e) => [e.start, e.length]);
}

test('push backup out of a fleecing image with discard-source (upstream 9.1): the scratch image is emptied as the backup goes', async () => {
  const env = await setup('backup-fleece-discard');
  try {
    const size = 4 * MiB;
    const disk = await qcow2(env.f('disk.qcow2'), size);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4M', disk]);
    await mustRun('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', disk, env.f('point.raw')]);
    await addQcow2(env, 'disk', disk);
    await qcow2(env.f('temp.qcow2'), size);
    await addQcow2(env, 'temp', env.f('temp.qcow2'), { discard: 'unmap' });
    await qcow2(env.f('target.qcow2'), size);
    await addQcow2(env, 'target', env.f('target.qcow2'));
    await env.d.qmp.execute('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'disk', target: 'temp' });
    await env.d.qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': 'access', discard: 'unmap', file: 'cbw' });
    // A guest write: its old data goes into the scratch image.
    await io(env, 'cbw', 'write -P 0x22 0 1M');
    await flush(env, 'temp');
    assert.deepEqual(await dataExtents(env.f('temp.qcow2')), [[0, 1 * MiB]]);
    await env.d.qmp.execute('blockdev-backup', { 'job-id': 'b', device: 'access', target: 'target', sync: 'full', 'discard-source': true });
    const ev = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'b', status: 'null' });
    assert.equal(ev.find((e) => e.event === 'BLOCK_JOB_COMPLETED')?.data?.error, undefined);
    await flush(env, 'target', 'temp');
    // The backup is the disk at the fleecing's start; the scratch image holds nothing any more and the
    // snapshot, discarded, cannot be read.
    await assertIdentical(env.f('target.qcow2'), env.f('point.raw'), ['-f', 'qcow2', '-F', 'raw']);
    assert.deepEqual(await dataExtents(env.f('temp.qcow2')), []);
    assert.match(await env.d.qmp.hmpOutput('qemu-io access "read 0 1M"'), /read failed: Permission denied/);
    // Discarded from the copy-before-write too: a later write copies nothing into the scratch image.
    await io(env, 'cbw', 'write -P 0x33 2M 1M');
    await flush(env, 'temp');
    assert.deepEqual(await dataExtents(env.f('temp.qcow2')), []);
    assert.match(await io(env, 'disk', 'read -P 0x33 2M 1M'), /read 1048576/);
    // snapshot-access takes no data, as QEMU's.
    assert.match(await env.d.qmp.hmpOutput('qemu-io access "write 0 4k"'), /write failed: Operation not supported/);
    for (const node of ['access', 'cbw', 'temp']) await env.d.qmp.execute('blockdev-del', { 'node-name': node });
    await mustRun('qemu-img', ['check', '-f', 'qcow2', env.f('temp.qcow2')]);
  } finally {
    await env.done();
  }
});
