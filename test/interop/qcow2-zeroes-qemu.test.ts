/**
 * qcow2 write-zeroes as QEMU 7.2 does it, case by case: the same images, the same zero write once by
 * QEMU's block layer (qemu-io on the file) and once by bitmirror (HMP qemu-io on a node), then the
 * two images must give the same `qemu-img map --output=json` (zero clusters, allocated zero clusters,
 * data, host offsets), the same contents (qemu-img compare) and a clean `qemu-img check`.
 * Cases: aligned and partial-cluster writes, over holes and over data, with and without a backing file
 * (its data under the cluster or not), with MAY_UNMAP allowed (discard=unmap) or not, at the end of
 * an image whose size is not a multiple of the cluster size, and on a v2 image.
 * Then the same over clusters an internal snapshot shares (qemu-img snapshot -c: refcount 2, no COPIED
 * flag), normal, allocated-zero and compressed, where QEMU keeps a shared cluster's offset unless the
 * write may unmap: also the same `qemu-img check --output=json` (allocated clusters, no leaks), and the
 * snapshot still reads as it was taken (qemu-img convert -l).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, io, assertIdentical, type Env } from '../support/daemon.js';
import { readFile } from 'node:fs/promises';
import { mustRun, run } from '../support/tools.js';

interface ZeroCase {
  name: string;
  /** qemu-io commands that put data into the backing file; no backing file when undefined. */
  backing?: string[];
  /** qemu-io commands that prepare the image itself. */
  pre?: string[];
  /** The zero write (qemu-io syntax). */
  op: string;
  discard: 'unmap' | 'ignore';
  size?: string;
  /** qemu-img create -o options of both images. */
  opts?: string;
  /** Take an internal snapshot 's1' after `pre`, then run these qemu-io commands (none when undefined). */
  afterSnapshot?: string[];
}

const CASES: ZeroCase[] = [
  { name: 'aligned, over a hole', op: 'write -z 64k 64k', discard: 'ignore' },
  { name: 'aligned, over a hole, may unmap', op: 'write -z -u 64k 64k', discard: 'unmap' },
  { name: 'partial, into a hole', op: 'write -z 68k 4k', discard: 'ignore' },
  { name: 'partial head and tail, over holes', op: 'write -z 96k 128k', discard: 'unmap' },
  { name: 'aligned, over data', pre: ['write -P 1 64k 64k'], op: 'write -z 64k 64k', discard: 'ignore' },
  { name: 'aligned, over data, may unmap', pre: ['write -P 1 64k 64k'], op: 'write -z -u 64k 64k', discard: 'unmap' },
  { name: 'aligned, over data, -u without discard=unmap', pre: ['write -P 1 64k 64k'], op: 'write -z -u 64k 64k', discard: 'ignore' },
  { name: 'partial, into data', pre: ['write -P 1 64k 64k'], op: 'write -z 68k 4k', discard: 'unmap' },
  { name: 'partial head and tail, over data', pre: ['write -P 1 0 512k'], op: 'write -z 96k 128k', discard: 'ignore' },
  { name: 'partial, into an allocated zero cluster', pre: ['write -P 1 64k 64k', 'write -z 64k 64k'], op: 'write -z 68k 4k', discard: 'ignore' },
  { name: 'partial, into an allocated zero cluster, may unmap', pre: ['write -P 1 64k 64k', 'write -z 64k 64k'], op: 'write -z -u 68k 4k', discard: 'unmap' },
  { name: 'backing: aligned, over a hole', backing: ['write -P 5 0 1M'], op: 'write -z 64k 64k', discard: 'ignore' },
  { name: 'backing: aligned, over a hole, may unmap', backing: ['write -P 5 0 1M'], op: 'write -z -u 64k 64k', discard: 'unmap' },
  { name: 'backing: partial, backing data under the cluster', backing: ['write -P 5 0 1M'], op: 'write -z 68k 4k', discard: 'ignore' },
  { name: 'backing: partial, backing hole under the cluster', backing: ['write -P 5 0 64k'], op: 'write -z 68k 4k', discard: 'ignore' },
  { name: 'backing: partial, backing data only under the write', backing: ['write -P 5 68k 4k'], op: 'write -z 68k 4k', discard: 'unmap' },
  { name: 'backing: partial head and tail', backing: ['write -P 5 0 1M'], op: 'write -z -u 96k 128k', discard: 'unmap' },
  { name: 'backing: aligned, over data', backing: ['write -P 5 0 1M'], pre: ['write -P 1 64k 64k'], op: 'write -z 64k 64k', discard: 'ignore' },
  { name: 'image end: partial last cluster', size: '1001k', op: 'write -z 964k 4k', discard: 'ignore' },
  { name: 'image end: up to the end', size: '1001k', pre: ['write -P 1 900k 101k'], op: 'write -z 900k 101k', discard: 'ignore' },
  // QEMU's get_cluster_table makes the L2 table its own even where no entry changes (image-end-offset).
  { name: 'discard where there is no L2 table', size: '1G', op: 'discard 512M 64k', discard: 'unmap' },
  { name: 'zeroes over zero clusters where there is no L2 table', size: '1G', pre: ['write -z 512M 64k'], op: 'write -z 600M 64k', discard: 'ignore' },
  { name: 'v2: aligned, over data', opts: 'compat=0.10', pre: ['write -P 1 64k 64k'], op: 'write -z 64k 64k', discard: 'ignore' },
  { name: 'v2: partial, into a hole', opts: 'compat=0.10', op: 'write -z 68k 4k', discard: 'ignore' },
  { name: 'v2 with backing: partial head and tail', opts: 'compat=0.10', backing: ['write -P 5 0 1M'], op: 'write -z 96k 128k', discard: 'ignore' },
];

async function makeImages(dir: string, tag: string, c: ZeroCase): Promise<string> {
  const size = c.size ?? '1M';
  const o = c.opts ? ['-o', c.opts] : [];
  const img = `${dir}/${tag}.qcow2`;
  if (c.backing) {
    const base = `${dir}/${tag}-base.qcow2`;
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', ...o, base, size]);
    await mustRun('qemu-io', ['-f', 'qcow2', ...c.backing.flatMap((x) => ['-c', x]), base]);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', ...o, '-b', base, '-F', 'qcow2', img, size]);
  } else {
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', ...o, img, size]);
  }
  if (c.pre) await mustRun('qemu-io', ['-f', 'qcow2', ...c.pre.flatMap((x) => ['-c', x]), img]);
  if (c.afterSnapshot) {
    await mustRun('qemu-img', ['snapshot', '-c', 's1', img]);
    if (c.afterSnapshot.length) await mustRun('qemu-io', ['-f', 'qcow2', ...c.afterSnapshot.flatMap((x) => ['-c', x]), img]);
  }
  return img;
}

const map = (img: string): Promise<string> => mustRun('qemu-img', ['map', '--output=json', img]);

/** The zero write by QEMU (qemu-io on the file) and by bitmirror (HMP qemu-io on node `node`). */
async function zeroBoth(env: Env, c: ZeroCase, theirs: string, mine: string, node: string): Promise<void> {
  await mustRun('qemu-io', ['-f', 'qcow2', '-d', c.discard, '-c', c.op, theirs]);
  await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': node, discard: c.discard, file: { driver: 'file', filename: mine } });
  await io(env, node, c.op);
  await env.d.qmp.execute('blockdev-del', { 'node-name': node });
}

test('qcow2 write-zeroes leaves the image as QEMU 7.2 does (qemu-img map, compare, check)', async () => {
  const env = await setup('qcow2-zeroes');
  try {
    for (const [i, c] of CASES.entries()) {
      const theirs = await makeImages(env.dir, `qemu${i}`, c);
      const mine = await makeImages(env.dir, `bm${i}`, c);
      await zeroBoth(env, c, theirs, mine, `n${i}`);
      assert.equal(await map(mine), await map(theirs), `${c.name}: qemu-img map`);
      await assertIdentical(mine, theirs);
      await mustRun('qemu-img', ['check', '-q', mine]);
      assert.deepEqual(await check(mine), await check(theirs), `${c.name}: qemu-img check`);
    }
  } finally {
    await env.done();
  }
});

const SNAPSHOT_CASES: ZeroCase[] = [
  { name: 'shared data', pre: ['write -P 1 0 256k'], afterSnapshot: [], op: 'write -z 64k 128k', discard: 'ignore' },
  { name: 'shared data, may unmap', pre: ['write -P 1 0 256k'], afterSnapshot: [], op: 'write -z -u 64k 128k', discard: 'unmap' },
  { name: 'shared data, -u without discard=unmap', pre: ['write -P 1 0 256k'], afterSnapshot: [], op: 'write -z -u 64k 128k', discard: 'ignore' },
  { name: 'shared data, its L2 table already copied', pre: ['write -P 1 0 256k'], afterSnapshot: ['write -P 2 0 64k'], op: 'write -z 0 192k', discard: 'ignore' },
  { name: 'shared data, its L2 table already copied, may unmap', pre: ['write -P 1 0 256k'], afterSnapshot: ['write -P 2 0 64k'], op: 'write -z -u 0 192k', discard: 'unmap' },
  { name: 'shared allocated zero cluster', pre: ['write -P 1 0 256k', 'write -z 64k 64k'], afterSnapshot: [], op: 'write -z 0 256k', discard: 'ignore' },
  { name: 'shared allocated zero cluster, may unmap', pre: ['write -P 1 0 256k', 'write -z 64k 64k'], afterSnapshot: [], op: 'write -z -u 0 256k', discard: 'unmap' },
  { name: 'shared compressed cluster', pre: ['write -c -P 3 0 64k', 'write -c -P 4 64k 64k'], afterSnapshot: [], op: 'write -z 0 128k', discard: 'ignore' },
  { name: 'shared compressed cluster, may unmap', pre: ['write -c -P 3 0 64k', 'write -c -P 4 64k 64k'], afterSnapshot: [], op: 'write -z -u 0 128k', discard: 'unmap' },
  { name: 'compressed cluster, no snapshot', pre: ['write -c -P 3 0 64k', 'write -c -P 4 64k 64k'], op: 'write -z 0 128k', discard: 'ignore' },
  { name: 'partial, into shared data', pre: ['write -P 1 0 256k'], afterSnapshot: [], op: 'write -z 68k 4k', discard: 'unmap' },
  { name: 'shared data, with a backing file', backing: ['write -P 5 0 1M'], pre: ['write -P 1 0 256k'], afterSnapshot: [], op: 'write -z 64k 128k', discard: 'ignore' },
];

/** `qemu-img check --output=json` without the file name. */
async function check(img: string): Promise<Record<string, unknown>> {
  const r = await run('qemu-img', ['check', '--output=json', img]);
  const out = JSON.parse(r.stdout) as Record<string, unknown>;
  delete out.filename;
  return out;
}

/** The internal snapshot 's1' of `img` as a raw file. */
async function snapshotData(img: string): Promise<Buffer> {
  const raw = `${img}.s1.raw`;
  await mustRun('qemu-img', ['convert', '-l', 'snapshot.name=s1', '-O', 'raw', img, raw]);
  return readFile(raw);
}

test('qcow2 write-zeroes over clusters an internal snapshot shares, as QEMU 7.2 (map, check, compare, the snapshot)', async () => {
  const env = await setup('qcow2-zeroes-snap');
  try {
    for (const [i, c] of SNAPSHOT_CASES.entries()) {
      const theirs = await makeImages(env.dir, `qemu${i}`, c);
      const mine = await makeImages(env.dir, `bm${i}`, c);
      const taken = c.afterSnapshot ? await snapshotData(mine) : undefined;
      await zeroBoth(env, c, theirs, mine, `n${i}`);
      assert.equal(await map(mine), await map(theirs), `${c.name}: qemu-img map`);
      await assertIdentical(mine, theirs);
      const ours = await check(mine);
      assert.deepEqual(ours, await check(theirs), `${c.name}: qemu-img check`);
      assert.equal(ours['check-errors'], 0, `${c.name}: check errors`);
      assert.equal(ours.leaks, undefined, `${c.name}: leaks`);
      assert.equal(ours.corruptions, undefined, `${c.name}: corruptions`);
      if (!taken) continue;
      assert.ok((await snapshotData(mine)).equals(taken), `${c.name}: the snapshot reads as it was taken`);
      assert.ok((await snapshotData(theirs)).equals(taken), `${c.name}: QEMU's snapshot reads as it was taken`);
    }
  } finally {
    await env.done();
  }
});
