/**
 * `bitmirror copy` with RBD on either side (against the test file's throwaway Ceph cluster):
 * - `--qmp`: an RBD node copied into an existing qcow2 file, a qcow2 node into an existing RBD node and
 *   into a new RBD image named `rbd:…`, each with a persistent bitmap carried;
 * - on images named as qemu-img names them (`rbd:POOL/IMAGE:conf=…`): a qcow2 file into a new RBD image
 *   and that image into a new file (qcow2, to hold the bitmap), the bitmap carried both ways;
 * - a copy that fails leaves no half-made RBD image, and never removes one the user made.
 * The copies compare identical (qemu-img through QEMU's rbd driver); the carried bitmaps are listed
 * where they landed. The rbd: name parser's messages are qemu-img's.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { setup, qcow2, io, assertIdentical, bitmaps, MiB, KiB } from '../support/daemon.js';
import { cephCluster, skipCeph } from '../support/ceph.js';
import { jsonLines, runCli } from '../support/cli.js';
import { mustRun, run, tempDir } from '../support/tools.js';
import { parseRbdFilename } from '../../src/block/drivers/rbd.js';

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
    // qcow2 → a new RBD image: created in the daemon, kept as node 'q0-copy' (the copy is switched to).
    const r3 = await runCli(['copy', '--qmp', sock, 'q0', ceph.qemuName('made'), '--progress', 'none']);
    assert.equal(r3.code, 0, r3.stdout + r3.stderr);
    assert.equal((await bitmaps(env, 'q0-copy')).b1?.count, 128 * KiB);

    // Everything stored: the daemon stops, then QEMU's tools check the copies and the bitmaps.
    assert.equal(await env.d.stop(), 0, env.d.stderr());
    await assertIdentical(ceph.qemuName('from'), out);
    await assertIdentical(src, ceph.qemuName('into'));
    await assertIdentical(src, ceph.qemuName('made'));
    assert.match(await mustRun('qemu-img', ['info', out]), /name: b0\n\s+granularity: 65536/);
  } finally {
    await env.done().catch(() => undefined);
  }
});

/** A qcow2 file of SIZE whose reads at 4 MiB fail (EIO): a version 3 image with a zero cluster there, relabelled version 2. */
async function failingSource(file: string): Promise<string> {
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(SIZE)]);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 0 8M', '-c', 'write -z 4M 64k', file]);
  const b = await fsp.readFile(file);
  b.writeUInt32BE(2, 4);
  await fsp.writeFile(file, b);
  return file;
}

test('bitmirror copy with rbd: names: a qcow2 file into a new RBD image and back into a new qcow2 file, the bitmap carried; a failed copy leaves no image', { skip: skipCeph }, async () => {
  const ceph = await cephCluster();
  const { dir, cleanup } = await tempDir('bm-rbd-copy-');
  try {
    const src = `${dir}/src.qcow2`;
    await qcow2(src, SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x51 0 3M', src]);
    await mustRun('qemu-img', ['bitmap', '--add', src, 'b1']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x52 5M 128k', src]);

    // qcow2 file → a new RBD image: the bitmap is stored with the image.
    const rbdName = ceph.qemuName('disk');
    const c1 = await runCli(['copy', src, rbdName, '--progress', 'json']);
    assert.equal(c1.code, 0, c1.stdout + c1.stderr);
    const res1 = jsonLines(c1.stdout).find((l) => l.type === 'result') as { bitmaps: Array<{ name: string; count: number }> } | undefined;
    assert.deepEqual(res1?.bitmaps.map((b) => [b.name, b.count]), [['b1', 128 * KiB]], c1.stdout);
    await assertIdentical(src, rbdName);

    // The RBD image → a new file: a qcow2 (an RBD image is raw data; the bitmap needs qcow2), the
    // bitmap as a new daemon loaded it from the image; progress up to all there is to copy (the mirror
    // skips what reads as zeroes into a target that reads as zeroes, so that may be less than the disk).
    const out = `${dir}/out.img`;
    const c2 = await runCli(['copy', rbdName, out, '--progress', 'json']);
    assert.equal(c2.code, 0, c2.stdout + c2.stderr);
    const lines = jsonLines(c2.stdout);
    const progress = lines.filter((l) => l.type === 'progress');
    assert.ok(progress.length >= 1 && progress.every((p, i) => i === 0 || (p.done as number) >= (progress[i - 1].done as number)), c2.stdout);
    const last = progress.at(-1)!;
    assert.equal(last.done, last.total, c2.stdout);
    assert.ok((last.total as number) > 0 && (last.total as number) <= SIZE, c2.stdout);
    const res2 = lines.find((l) => l.type === 'result') as { bitmaps: Array<{ name: string; count: number }> } | undefined;
    assert.deepEqual(res2?.bitmaps.map((b) => [b.name, b.count]), [['b1', 128 * KiB]], c2.stdout);
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', out])) as { format: string; 'format-specific': { data: { bitmaps?: Array<{ name: string; granularity: number }> } } };
    assert.equal(info.format, 'qcow2');
    assert.deepEqual(info['format-specific'].data.bitmaps?.map((b) => [b.name, b.granularity]), [['b1', 64 * KiB]]);
    await mustRun('qemu-img', ['check', out]);
    await assertIdentical(rbdName, out);

    // A copy that fails (a read error in the source) into a new RBD image removes the image it made.
    const bad = await failingSource(`${dir}/bad.qcow2`);
    const half = ceph.qemuName('half');
    const c3 = await runCli(['copy', bad, half, '--progress', 'none']);
    assert.equal(c3.code, 1, c3.stdout + c3.stderr);
    assert.match(c3.stderr, /the copy failed: .*; '.*bad\.qcow2' is untouched; the incomplete copy 'rbd:rbd\/half:conf=.*' was removed\n$/);
    const images = async (): Promise<string[]> => (await ceph.rbd('ls')).split('\n').filter(Boolean);
    assert.ok(!(await images()).includes('half'), await ceph.rbd('ls'));

    // An image the user made is never removed: not when it is refused (exists), not when a --reuse copy into it fails.
    await ceph.rbd('create', '--size', `${SIZE / MiB}M`, 'rbd/users');
    const c4 = await runCli(['copy', src, ceph.qemuName('users'), '--progress', 'none']);
    assert.equal(c4.code, 2, c4.stdout + c4.stderr);
    assert.match(c4.stderr, /'rbd:rbd\/users:conf=.*' exists: use --reuse to copy into it\n$/);
    const c5 = await runCli(['copy', '--reuse', bad, ceph.qemuName('users'), '--progress', 'none']);
    assert.equal(c5.code, 1, c5.stdout + c5.stderr);
    assert.match(c5.stderr, /'rbd:rbd\/users:conf=.*' is an incomplete copy/);
    assert.ok((await images()).includes('users'), await ceph.rbd('ls'));
  } finally {
    await cleanup();
  }
});

test("rbd: names are parsed as qemu-img parses them (escapes, namespace, snapshot, conf, id); its messages for bad ones", async () => {
  assert.deepEqual(parseRbdFilename('rbd:pool/image'), { pool: 'pool', image: 'image' });
  assert.deepEqual(parseRbdFilename('rbd:p\\/x/ns/im\\:g@sn\\@ap:conf=/etc/c\\:eph.conf:id=bob'), {
    pool: 'p/x',
    namespace: 'ns',
    image: 'im:g',
    snapshot: 'sn@ap',
    conf: '/etc/c:eph.conf',
    user: 'bob',
  });
  // QEMU's own messages for the names it refuses before connecting.
  for (const [name, message] of [
    ['rbd:rbd', 'Pool name is required'],
    ['rbd:rbd/img:conf', 'conf option conf has no value'],
  ]) {
    assert.throws(() => parseRbdFilename(name), { message });
    const q = await run('qemu-img', ['info', name]);
    assert.equal(q.stderr.trim(), `qemu-img: Could not open '${name}': ${message}`);
  }
  assert.throws(() => parseRbdFilename('rbd:rbd/img:mon_host=127.0.0.1'), /the rbd option 'mon_host' is not supported; set it in a conf file/);
});
