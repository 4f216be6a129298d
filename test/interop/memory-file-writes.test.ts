/**
 * Writes into an image file in memory (tmpfs) are made on the event loop (FileNode's writeInMemory),
 * not through the thread pool. Over NBD — nbdcopy's deep, 4-connection writes and qemu-io's unaligned
 * ones — raw and qcow2 images on /dev/shm end up holding exactly what the same writes give a reference
 * file, and a file system that fills up answers the write with ENOSPC while the daemon carries on.
 */
import { test, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { mustRun, run } from '../support/tools.js';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { randomBytes, rng } from '../support/random.js';

const MiB = 1 << 20;
const SIZE = 24 * MiB;
const TMPFS_MAGIC = 0x01021994;

let memoryDir: string | undefined;
let dir: string;

before(async () => {
  // /dev/shm is tmpfs on Linux machines; where it is not, this file has nothing to test.
  memoryDir = await fsp.statfs('/dev/shm').then((s) => (s.type === TMPFS_MAGIC ? '/dev/shm' : undefined), () => undefined);
  if (memoryDir) dir = await fsp.mkdtemp(path.join(memoryDir, 'bm-memory-writes-'));
});

after(async () => {
  if (memoryDir) await fsp.rm(dir, { recursive: true, force: true });
});

/** qemu-io commands that write unaligned ranges over one another (and over what nbdcopy wrote). */
const UNALIGNED = ['write -P 0x5a 12345 70000', 'write -P 0xa5 1048575 3', 'write -z 2000000 131073', 'write -P 0x11 8388607 1048579', 'write -P 0x22 25165823 1'];

for (const format of ['raw', 'qcow2'] as const) {
  test(`${format} on tmpfs: nbdcopy and unaligned qemu-io writes over NBD leave the reference's data`, { timeout: 120_000 }, async (t) => {
    if (!memoryDir) return t.skip('/dev/shm is not tmpfs');
    const src = path.join(dir, `${format}-src.raw`);
    // Data in most of the image, a hole in the middle (nbdcopy zeroes it on the target).
    const data = randomBytes(rng(4242), SIZE);
    data.fill(0, 10 * MiB, 14 * MiB);
    await fsp.writeFile(src, data);
    const image = path.join(dir, `disk.${format}`);
    await mustRun('qemu-img', ['create', '-q', '-f', format, image, String(SIZE)]);
    const sock = path.join(dir, `${format}.nbd.sock`);
    const d = await spawnDaemon(path.join(dir, `${format}.qmp.sock`), [
      '--blockdev', `driver=file,node-name=f0,filename=${image}`,
      '--blockdev', `driver=${format},node-name=d0,file=f0`,
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
    ]);
    const uri = `nbd+unix:///disk?socket=${sock}`;
    try {
      await mustRun('nbdcopy', [src, uri]);
      await mustRun('qemu-io', ['-f', 'raw', ...UNALIGNED.flatMap((c) => ['-c', c]), uri]);
    } finally {
      assert.equal(await d.stop(), 0, `exit code; stderr: ${d.stderr()}`);
    }
    // The reference: the same writes on a copy of the source.
    const reference = path.join(dir, `${format}-reference.raw`);
    await fsp.copyFile(src, reference);
    await mustRun('qemu-io', ['-f', 'raw', ...UNALIGNED.flatMap((c) => ['-c', c]), reference]);
    assert.match(await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', format, reference, image]), /Images are identical/);
    if (format === 'qcow2') assert.match(await mustRun('qemu-img', ['check', image]), /No errors were found/);
  });
}

test('a full tmpfs: the write gets ENOSPC, the export and the daemon go on', { timeout: 120_000 }, async (t) => {
  if (!memoryDir) return t.skip('/dev/shm is not tmpfs');
  // A tmpfs of 1 MiB of its own, under a 4 MiB sparse raw image (root only; else nothing to test).
  const small = path.join(dir, 'small');
  await fsp.mkdir(small);
  const mounted = await run('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', small]);
  if (mounted.code !== 0) return t.skip(`cannot mount a tmpfs: ${mounted.stderr.trim()}`);
  try {
    const image = path.join(small, 'disk.raw');
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', image, String(4 * MiB)]);
    const sock = path.join(dir, 'small.nbd.sock');
    const d = await spawnDaemon(path.join(dir, 'small.qmp.sock'), [
      '--blockdev', `driver=file,node-name=f0,filename=${image}`,
      '--blockdev', 'driver=raw,node-name=d0,file=f0',
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
    ]);
    const uri = `nbd+unix:///disk?socket=${sock}`;
    try {
      // What fits is written; 2 MiB more cannot be.
      await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 512k', uri]);
      const full = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 1M 2M', uri]);
      assert.match(full.stdout + full.stderr, /No space left on device/);
      // The daemon answers, and the export still reads what was written before.
      assert.equal((await d.qmp.execute<unknown[]>('query-block-exports')).length, 1);
      assert.match(await mustRun('qemu-io', ['-f', 'raw', '-c', 'read -P 0x33 0 512k', uri]), /read 524288\/524288 bytes/);
    } finally {
      assert.equal(await d.stop(), 0, `exit code; stderr: ${d.stderr()}`);
    }
  } finally {
    await mustRun('umount', [small]);
  }
});
