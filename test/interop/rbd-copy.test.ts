/**
 * `bitmirror copy --qmp` with RBD on either side (against the test file's throwaway Ceph cluster): an
 * RBD node copied into an existing qcow2 file, and a qcow2 node copied into an existing RBD node, each with a
 * persistent bitmap carried; the copies compare identical (qemu-img through QEMU's rbd driver) and the
 * carried bitmaps are listed where they landed.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, qcow2, io, assertIdentical, bitmaps, MiB, KiB } from '../support/daemon.js';
import { cephCluster, skipCeph } from '../support/ceph.js';
import { runCli } from '../support/cli.js';
import { mustRun } from '../support/tools.js';

const SIZE = 16 * MiB;

test('bitmirror copy --qmp: RBD node into a qcow2 file, qcow2 node into an RBD node, bitmaps carried', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const env = await setup('rbd-copy');
  const sock = env.d.socket;
  try {
    for (const image of ['from', 'into']) {
      await env.d.qmp.execute('blockdev-create', { 'job-id': `c-${image}`, options: { driver: 'rbd', location: ceph.location(image), size: SIZE, 'cluster-size': 64 * KiB } });
      await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id: `c-${image}`, status: 'concluded' });
      await env.d.qmp.execute('job-dismiss', { id: `c-${image}` });
    }

    // RBD → a new qcow2 file.
    await env.d.qmp.execute('blockdev-add', { driver: 'rbd', 'node-name': 'r0', ...ceph.location('from') });
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'r0', name: 'b0', granularity: 64 * KiB, persistent: true });
    await io(env, 'r0', 'write -P 0x41 1M 192k');
    await io(env, 'r0', 'write -P 0x42 9M 64k');
    // A new file would take the source's format, raw for an RBD image (no bitmaps): reuse a qcow2.
    const out = await qcow2(env.f('out.qcow2'), SIZE);
    const r = await runCli(['copy', '--qmp', sock, '--reuse', 'r0', out, '--progress', 'none']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /b0: 256\.0 KiB dirty \(262144 bytes\)/);
    const carried = await bitmaps(env, 'r0-copy');
    assert.equal(carried.b0?.count, 256 * KiB);

    // qcow2 → the existing RBD node 'into'.
    const src = await qcow2(env.f('src.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x51 0 1M', '-c', 'write -P 0x52 12M 64k', src]);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'q0', file: { driver: 'file', filename: src } });
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'q0', name: 'b1', granularity: 64 * KiB, persistent: true });
    await io(env, 'q0', 'write -P 0x53 4M 128k');
    await env.d.qmp.execute('blockdev-add', { driver: 'rbd', 'node-name': 'r1', ...ceph.location('into') });
    const r2 = await runCli(['copy', '--qmp', sock, 'q0', 'r1', '--progress', 'none']);
    assert.equal(r2.code, 0, r2.stdout + r2.stderr);
    assert.equal((await bitmaps(env, 'r1')).b1?.count, 128 * KiB);

    // Everything stored: the daemon stops, then QEMU's tools check the copies and the bitmaps.
    assert.equal(await env.d.stop(), 0, env.d.stderr());
    await assertIdentical(ceph.qemuName('from'), out);
    await assertIdentical(src, ceph.qemuName('into'));
    assert.match(await mustRun('qemu-img', ['info', out]), /name: b0\n\s+granularity: 65536/);
  } finally {
    await env.done().catch(() => undefined);
  }
});
