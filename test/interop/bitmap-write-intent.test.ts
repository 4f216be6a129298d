/**
 * Persistent bitmaps survive a crash (issue 14, qcow2/write-intent.ts): a daemon killed with SIGKILL
 * while its bitmaps are in use leaves them in use on disk, and the next open by bitmirror brings them
 * back consistent (stored bits ∪ write-intent regions), flagged __org.bitmirror_recovered; QEMU's
 * tools see a valid image throughout; and once QEMU has written the image in between, the record is
 * no longer trusted and the bitmaps load inconsistent as before.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { startDaemon, MiB, KiB } from '../support/daemon.js';
import { mustRun, nbdDirtyRanges, run, tempDir } from '../support/tools.js';
import type { SpawnedDaemon } from '../../src/daemon/spawn.js';

async function open(dir: string, img: string, tag: string): Promise<SpawnedDaemon> {
  return startDaemon(path.join(dir, `${tag}.sock`), ['--blockdev', `driver=file,filename=${img},node-name=f`, '--blockdev', 'driver=qcow2,file=f,node-name=q']);
}

async function bitmapInfo(d: SpawnedDaemon): Promise<Record<string, Record<string, unknown>>> {
  const nodes = await d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
  const q = nodes.find((n) => n['node-name'] === 'q')!;
  return Object.fromEntries(((q['dirty-bitmaps'] ?? []) as Array<Record<string, unknown>>).map((b) => [b.name as string, b]));
}

async function write(d: SpawnedDaemon, cmd: string): Promise<void> {
  const out = await d.qmp.hmpOutput(`qemu-io q "${cmd}"`);
  assert.match(out, /^(wrote|discard)/, `${cmd}: ${out}`);
}

async function checkClean(img: string): Promise<void> {
  const r = await run('qemu-img', ['check', img]);
  assert.equal(r.code, 0, `qemu-img check: ${r.stdout}${r.stderr}`);
}

test('bitmaps in use at SIGKILL load consistent and recovered; QEMU sees a valid image', { timeout: 120_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-intent-');
  try {
    const img = path.join(dir, 'a.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(64 * MiB)]);
    await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
    await mustRun('qemu-img', ['bitmap', '--add', '-g', '1M', img, 'b1']);

    let d = await open(dir, img, 'd1');
    await write(d, 'write -P 0x11 0 4k');
    await write(d, `write -z ${20 * MiB} 64k`);
    await write(d, `write -P 0x22 ${40 * MiB + 5} 100k`);
    await d.kill();
    // QEMU's tools read the image as valid, with the bitmaps in use.
    await checkClean(img);
    const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', img]));
    assert.deepEqual(info['format-specific'].data.bitmaps.map((b: { flags: string[] }) => b.flags), [['in-use', 'auto'], ['in-use', 'auto']]);

    d = await open(dir, img, 'd2');
    const bms = await bitmapInfo(d);
    for (const name of ['b0', 'b1']) {
      assert.equal(bms[name].inconsistent, undefined, `${name}: ${JSON.stringify(bms[name])}`);
      assert.equal(bms[name]['__org.bitmirror_recovered'], true);
      assert.equal(bms[name].recording, true);
    }
    assert.ok((bms.b0.count as number) >= 3 * 64 * KiB, 'every written range is dirty');
    assert.match(d.stderr(), /dirty bitmap 'b0' .*recovered/);
    await d.stop();
    await checkClean(img);
    // Stored by the clean close: QEMU exports the bitmaps with every written range dirty.
    const written: Array<[number, number]> = [[0, 4 * KiB], [20 * MiB, 64 * KiB], [40 * MiB + 5, 100 * KiB]];
    for (const name of ['b0', 'b1']) {
      const dirty = await nbdDirtyRanges(img, name);
      for (const [o, n] of written) assert.ok(dirty.some(([s, l]) => s <= o && o + n <= s + l), `${name}: ${o}+${n} not in ${JSON.stringify(dirty)}`);
    }
    const qsd = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 1M 4k', img]);
    assert.equal(qsd.code, 0, qsd.stderr);
    await checkClean(img);

    // A clean open after QEMU's write: nothing recovered, bitmaps consistent.
    d = await open(dir, img, 'd3');
    const again = await bitmapInfo(d);
    assert.equal(again.b0['__org.bitmirror_recovered'], undefined);
    assert.equal(again.b0.inconsistent, undefined);
    await d.stop();
  } finally {
    await cleanup();
  }
});

test('after QEMU wrote the image, the write-intent record is not trusted: bitmaps load inconsistent', { timeout: 120_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-intent-');
  try {
    const img = path.join(dir, 'a.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(64 * MiB)]);
    await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
    let d = await open(dir, img, 'd1');
    await write(d, 'write -P 0x11 0 4k');
    await d.kill();
    // QEMU opens it read-write and writes: it clears our autoclear bit, and it does not track
    // into in-use bitmaps, so the record must not be trusted afterwards.
    const r = await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x44 ${30 * MiB} 64k`, img]);
    assert.equal(r.code, 0, r.stderr);
    await checkClean(img);
    d = await open(dir, img, 'd2');
    const bms = await bitmapInfo(d);
    assert.equal(bms.b0.inconsistent, true);
    assert.equal(bms.b0['__org.bitmirror_recovered'], undefined);
    await d.stop();
    await checkClean(img);
  } finally {
    await cleanup();
  }
});

test('a bitmap directory cluster with refcount 0 is not reused for a new table; freeing it is logged', { timeout: 60_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-intent-');
  try {
    const img = path.join(dir, 'a.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(64 * MiB)]);
    await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
    // Zero the directory cluster's refcount (16-bit entries in the first refcount block).
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', img]));
    assert.equal(info['cluster-size'], 64 * KiB);
    const fh = await fsp.open(img, 'r+');
    const hdr = Buffer.alloc(4096);
    await fh.read(hdr, 0, 4096, 0);
    let dirOffset = 0;
    for (let off = 112; off + 8 <= 4096; ) {
      const type = hdr.readUInt32BE(off);
      const len = hdr.readUInt32BE(off + 4);
      if (type === 0) break;
      if (type === 0x23852875) dirOffset = Number(hdr.readBigUInt64BE(off + 8 + 16));
      off += 8 + Math.ceil(len / 8) * 8;
    }
    assert.ok(dirOffset > 0);
    const rtOffset = Number(hdr.readBigUInt64BE(48));
    const rt = Buffer.alloc(8);
    await fh.read(rt, 0, 8, rtOffset);
    const block0 = Number(rt.readBigUInt64BE(0));
    await fh.write(Buffer.alloc(2), 0, 2, block0 + (dirOffset / (64 * KiB)) * 2);
    await fh.close();
    const d = await open(dir, img, 'd1');
    await write(d, 'write -P 0x11 0 4k');
    await d.stop();
    assert.match(d.stderr(), /qcow2_free_clusters failed: Invalid argument/);
    // The new table got a cluster of its own with refcount 1: QEMU uses the image without an
    // overlap error, and check finds nothing wrong.
    await checkClean(img);
    const r = await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', img]);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stderr, /overlap/);
    await checkClean(img);
  } finally {
    await cleanup();
  }
});
