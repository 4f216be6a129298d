/**
 * Persistent bitmaps of raw images in a sidecar (issue 14 item 4, block/drivers/raw-sidecar.ts),
 * through a real daemon: bitmaps added, written, stored at close and loaded again; in use at SIGKILL
 * they come back consistent and recovered, covering every write (read over bitmirror's NBD export by
 * nbdinfo); written by QEMU after a clean close they load inconsistent; a sidecar beside a copy of
 * the image (cp) is refused with a clear error and nothing changes, one moved with its image (mv)
 * keeps working; removing the last bitmap leaves an empty sidecar; without the option raw keeps
 * QEMU's refusal.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { bitmaps, startDaemon, MiB, KiB } from '../support/daemon.js';
import { errorOf, mustRun, nbdDirtyRangesAt, run, tempDir } from '../support/tools.js';
import type { SpawnedDaemon } from '../../src/daemon/spawn.js';

function rawArgs(img: string, sidecar: string | undefined): string[] {
  const raw = { driver: 'raw', 'node-name': 'q', file: 'f', ...(sidecar ? { '__org.bitmirror_bitmaps': { driver: 'file', filename: sidecar } } : {}) };
  return ['--blockdev', `driver=file,filename=${img},node-name=f`, '--blockdev', JSON.stringify(raw)];
}

async function open(dir: string, img: string, tag: string, sidecar = `${img}.bitmaps`): Promise<SpawnedDaemon> {
  return startDaemon(path.join(dir, `${tag}.sock`), rawArgs(img, sidecar));
}

function bitmapInfo(d: SpawnedDaemon): Promise<Record<string, Record<string, unknown>>> {
  return bitmaps({ d }, 'q');
}

async function write(d: SpawnedDaemon, cmd: string): Promise<void> {
  const out = await d.qmp.hmpOutput(`qemu-io q "${cmd}"`);
  assert.match(out, /^(wrote|discard)/, `${cmd}: ${out}`);
}

/** The dirty ranges of each bitmap (disabled first, as a read-only export wants), exported by the daemon over NBD and mapped by nbdinfo. */
async function exportedDirty(d: SpawnedDaemon, dir: string, names: string[]): Promise<Map<string, Array<[number, number]>>> {
  for (const name of names) await d.qmp.execute('block-dirty-bitmap-disable', { node: 'q', name });
  const sock = path.join(dir, 'nbd.sock');
  await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await d.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'q', writable: false, bitmaps: names });
  const out = new Map<string, Array<[number, number]>>();
  for (const n of names) out.set(n, await nbdDirtyRangesAt(`nbd+unix:///q?socket=${sock}`, n));
  await d.qmp.execute('block-export-del', { id: 'e' });
  await d.qmp.execute('nbd-server-stop');
  return out;
}

const sha = async (f: string): Promise<string> => createHash('sha256').update(await fsp.readFile(f)).digest('hex');

test('raw + sidecar: bitmaps stored at close, recovered after SIGKILL, inconsistent after a QEMU write', { timeout: 120_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-sidecar-');
  try {
    const img = path.join(dir, 'a.raw');
    const sidecar = `${img}.bitmaps`;
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', img, String(64 * MiB)]);
    await fsp.writeFile(sidecar, '');

    let d = await open(dir, img, 'd1');
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'b0', persistent: true });
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'b1', persistent: true, granularity: 1 * MiB });
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'gone', persistent: true });
    await write(d, 'write -P 0x11 0 4k');
    assert.equal(await d.stop(), 0, d.stderr());

    // Stored: loaded consistent with the write, not recovered.
    d = await open(dir, img, 'd2');
    let bms = await bitmapInfo(d);
    assert.deepEqual(Object.keys(bms).sort(), ['b0', 'b1', 'gone']);
    assert.equal(bms.b0.count, 64 * KiB);
    assert.equal(bms.b0['__org.bitmirror_recovered'], undefined);
    assert.equal(bms.b0.persistent, true);
    await d.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'gone' });
    await d.qmp.execute('block-dirty-bitmap-clear', { node: 'q', name: 'b1' });
    await write(d, `write -z ${20 * MiB} 64k`);
    await write(d, `write -P 0x22 ${40 * MiB + 5} 100k`);
    await d.kill();

    // In use at the kill: consistent, recovered, covering every write since each bitmap's last clear.
    d = await open(dir, img, 'd3');
    bms = await bitmapInfo(d);
    assert.deepEqual(Object.keys(bms).sort(), ['b0', 'b1'], 'the removed bitmap stays removed');
    for (const name of ['b0', 'b1']) {
      assert.equal(bms[name].inconsistent, undefined, `${name}: ${JSON.stringify(bms[name])}`);
      assert.equal(bms[name]['__org.bitmirror_recovered'], true);
    }
    assert.match(d.stderr(), /dirty bitmap 'b0' .*recovered/);
    const dirty = await exportedDirty(d, dir, ['b0', 'b1']);
    const since: Record<string, Array<[number, number]>> = { b0: [[0, 4 * KiB], [20 * MiB, 64 * KiB], [40 * MiB + 5, 100 * KiB]], b1: [[20 * MiB, 64 * KiB], [40 * MiB + 5, 100 * KiB]] };
    for (const [name, written] of Object.entries(since)) {
      for (const [o, n] of written) assert.ok(dirty.get(name)!.some(([s, l]) => s <= o && o + n <= s + l), `${name}: ${o}+${n} not in ${JSON.stringify(dirty.get(name))}`);
    }
    assert.equal(await d.stop(), 0, d.stderr());

    // QEMU writes the raw image after a clean close: the bitmaps can no longer be trusted.
    const q = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 8M 4k', img]);
    assert.equal(q.code, 0, q.stderr);
    d = await open(dir, img, 'd4');
    bms = await bitmapInfo(d);
    for (const name of ['b0', 'b1']) assert.equal(bms[name].inconsistent, true, `${name}: ${JSON.stringify(bms[name])}`);
    assert.match(
      (await errorOf(d.qmp.execute('block-dirty-bitmap-clear', { node: 'q', name: 'b0' }))) ?? '',
      /Bitmap 'b0' is inconsistent and cannot be used/,
    );
    // Inconsistent ones stay so across a close; removing them and adding anew starts over.
    assert.equal(await d.stop(), 0, d.stderr());
    d = await open(dir, img, 'd5');
    bms = await bitmapInfo(d);
    assert.equal(bms.b0.inconsistent, true);
    await d.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'b0' });
    await d.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'b1' });
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'b0', persistent: true });
    await write(d, 'write -P 0x44 4M 4k');
    assert.equal(await d.stop(), 0, d.stderr());
    d = await open(dir, img, 'd6');
    bms = await bitmapInfo(d);
    assert.deepEqual(Object.keys(bms), ['b0']);
    assert.equal(bms.b0.count, 64 * KiB);
    assert.equal(bms.b0.inconsistent, undefined);
    assert.equal(await d.stop(), 0, d.stderr());
  } finally {
    await cleanup();
  }
});

test('raw + sidecar: a sidecar beside a copy of its image is refused and left alone; moved with its image it keeps working', { timeout: 120_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-sidecar-bind-');
  try {
    const img = path.join(dir, 'a.raw');
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', img, String(16 * MiB)]);
    await fsp.writeFile(`${img}.bitmaps`, '');
    let d = await open(dir, img, 'd1');
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'b0', persistent: true });
    await write(d, 'write -P 0x11 1M 4k');
    assert.equal(await d.stop(), 0, d.stderr());

    // cp: a new inode. The daemon refuses to open the node, and the sidecar is not touched.
    const copy = path.join(dir, 'copy.raw');
    await fsp.copyFile(img, copy);
    await fsp.copyFile(`${img}.bitmaps`, `${copy}.bitmaps`);
    const before = await sha(`${copy}.bitmaps`);
    d = await startDaemon(path.join(dir, 'd2.sock'), []);
    await d.qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'f', filename: copy });
    const err = await errorOf(d.qmp.execute('blockdev-add', JSON.parse(rawArgs(copy, `${copy}.bitmaps`)[3]) as Record<string, unknown>));
    assert.match(err ?? '', /^Bitmap sidecar '.*copy\.raw\.bitmaps' does not belong to '.*copy\.raw': it was written for a disk of 16777216 bytes in inode \d+, this one has 16777216 bytes in inode \d+ .*remove the sidecar/);
    assert.equal((await d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true })).length, 1, 'no node left behind');
    assert.equal(await d.stop(), 0, d.stderr());
    assert.equal(await sha(`${copy}.bitmaps`), before);

    // A sidecar of another size (truncated elsewhere) is refused the same way.
    await fsp.truncate(img, 32 * MiB);
    d = await startDaemon(path.join(dir, 'd3.sock'), []);
    await d.qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'f', filename: img });
    assert.match((await errorOf(d.qmp.execute('blockdev-add', JSON.parse(rawArgs(img, `${img}.bitmaps`)[3]) as Record<string, unknown>))) ?? '', /does not belong to .*this one has 33554432 bytes/);
    assert.equal(await d.stop(), 0, d.stderr());
    await fsp.truncate(img, 16 * MiB);

    // mv (same file system): the inode and mtime stay; the bitmaps come back... except the
    // truncations above changed the mtime, which is what a foreign write looks like: inconsistent.
    const moved = path.join(dir, 'moved.raw');
    await fsp.rename(img, moved);
    await fsp.rename(`${img}.bitmaps`, `${moved}.bitmaps`);
    d = await open(dir, moved, 'd4');
    assert.equal((await bitmapInfo(d)).b0.inconsistent, true);
    await d.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'b0' });
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'b0', persistent: true });
    await write(d, 'write -P 0x22 2M 4k');
    assert.equal(await d.stop(), 0, d.stderr());
    const again = path.join(dir, 'again.raw');
    await fsp.rename(moved, again);
    await fsp.rename(`${moved}.bitmaps`, `${again}.bitmaps`);
    d = await open(dir, again, 'd5');
    const bms = await bitmapInfo(d);
    assert.equal(bms.b0.inconsistent, undefined, JSON.stringify(bms.b0));
    assert.equal(bms.b0.count, 64 * KiB);
    assert.equal(await d.stop(), 0, d.stderr());
  } finally {
    await cleanup();
  }
});

test('raw without a sidecar keeps QEMU\'s refusal of persistent bitmaps', { timeout: 60_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-sidecar-none-');
  try {
    const img = path.join(dir, 'a.raw');
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', img, String(16 * MiB)]);
    const d = await startDaemon(path.join(dir, 'd.sock'), rawArgs(img, undefined));
    assert.equal(await errorOf(d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'b0', persistent: true })), "Can't store persistent bitmaps to q: Operation not supported");
    assert.equal(await d.stop(), 0, d.stderr());
  } finally {
    await cleanup();
  }
});
