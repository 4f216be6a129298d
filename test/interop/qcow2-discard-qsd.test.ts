/**
 * qcow2 passes freed clusters down to its file as QEMU 7.2 does (pass-discard-request/-snapshot/-other):
 * the same QMP script — a file node and a qcow2 node over it, a guest (qemu-io on an NBD export,
 * qemu-storage-daemon has no HMP) discarding and writing zeroes with and without unmap, block_resize
 * shrinking and growing (cutting data, L2 tables, refcount blocks counted in another block),
 * compressed clusters, clusters an internal snapshot shares, a stored bitmap removed, blockdev-reopen of the pass-discard options — is replayed against
 * qemu-storage-daemon 7.2 and bitmirror, each on its own copy of the same image. Then the replies, the
 * guest data (qemu-img compare), `qemu-img check --output=json` and the host file's allocation (its
 * data and hole extents by SEEK_DATA/SEEK_HOLE, `qemu-img map -f raw`, and its length) must be equal.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { copyFile, stat } from 'node:fs/promises';
import * as path from 'node:path';
import { haveQsd, setup } from '../support/daemon.js';
import { failedSteps, recorder, type Replay } from '../support/qmp-replay.js';
import { mustRun, qemuIoNbd, run, tempDir } from '../support/tools.js';

interface DiscardCase {
  name: string;
  /** The file node's discard option. */
  fileDiscard: 'unmap' | 'ignore';
  /** qemu-io commands that fill the image before the daemon opens it, instead of the common ones. */
  prepare?: string[];
  /** Then run on the image (QEMU's own tools, before the daemon opens it). */
  after?: (image: string) => Promise<void>;
  /** Options of the qcow2 node besides driver, node-name and file. */
  qcow2: Record<string, unknown>;
  /** What the guest and the monitor do; `guest` runs qemu-io commands on the export. */
  script: (r: Replay, guest: (...cmds: string[]) => Promise<void>) => Promise<void>;
}

const MiB = 1 << 20;
/** 4 KiB clusters: an L2 table maps 2 MiB and a refcount block counts 8 MiB, so a shrink frees both. */
const CLUSTER = 4096;
const SIZE = 16 * MiB;

/** A guest's discards and zero writes: whole clusters, partial ones, zeroes kept allocated. */
async function guestFrees(guest: (...cmds: string[]) => Promise<void>): Promise<void> {
  await guest('discard 0 1M', 'write -z -u 1M 512k', 'write -z 2M 512k', 'discard 3M 6k', 'write -z -u 3211264 2k');
}

/** The guest's frees, then a shrink that cuts data and L2 tables lying low in the file. */
async function freesThenShrink(r: Replay, guest: (...cmds: string[]) => Promise<void>): Promise<void> {
  await guestFrees(guest);
  await r.request('block_resize', { 'node-name': 'fmt', size: 5 * MiB });
}

/** An image with a stored bitmap 'b0' that has data, removed by the script. */
const withStoredBitmap: Omit<DiscardCase, 'name' | 'qcow2'> = {
  fileDiscard: 'unmap',
  prepare: ['write -P 0x11 0 2M'],
  after: async (image) => {
    await mustRun('qemu-img', ['bitmap', '--add', image, 'b0']);
    await mustRun('qemu-io', ['-c', 'write -P 0x12 0 1M', '-c', 'write -P 0x13 4M 4M', image]);
  },
  script: async (r) => void (await r.request('block-dirty-bitmap-remove', { node: 'fmt', name: 'b0' })),
};

const CASES: DiscardCase[] = [
  {
    name: 'discard=unmap on both: requests and a shrink punch holes',
    fileDiscard: 'unmap',
    qcow2: { discard: 'unmap' },
    script: freesThenShrink,
  },
  {
    name: 'pass-discard-request=off: clusters freed, the file keeps them; a shrink still discards',
    fileDiscard: 'unmap',
    qcow2: { discard: 'unmap', 'pass-discard-request': false },
    script: freesThenShrink,
  },
  {
    name: 'the qcow2 node without discard=unmap: write -z -u frees, nothing reaches the file',
    fileDiscard: 'unmap',
    qcow2: {},
    script: freesThenShrink,
  },
  {
    name: 'the file node with discard=ignore: its discards do nothing',
    fileDiscard: 'ignore',
    qcow2: { discard: 'unmap', 'pass-discard-other': true },
    script: freesThenShrink,
  },
  {
    name: 'pass-discard-other: the old L1 table a grow frees',
    fileDiscard: 'unmap',
    qcow2: { discard: 'unmap', 'pass-discard-other': true },
    script: async (r, guest) => {
      await guest('discard 8M 1M');
      await r.request('block_resize', { 'node-name': 'fmt', size: 4096 * MiB });
      await guest('write -P 0x22 12M 64k', 'discard 10M 64k');
    },
  },
  {
    name: 'pass-discard-other off (default): the old L1 table stays in the file',
    fileDiscard: 'unmap',
    qcow2: { discard: 'unmap' },
    script: async (r, guest) => {
      await r.request('block_resize', { 'node-name': 'fmt', size: 4096 * MiB });
      await guest('write -P 0x22 12M 64k', 'discard 10M 64k');
    },
  },
  {
    // A host cluster packed with compressed clusters is discarded once none of them is left.
    name: 'compressed clusters: the host cluster goes when the last one in it is discarded',
    fileDiscard: 'unmap',
    prepare: ['write -P 0x11 8M 8M', 'write -c -P 0x33 4M 256k', 'write -P 0x12 0 4M', 'write -P 0x12 4352k 3840k'],
    qcow2: { discard: 'unmap' },
    script: async (_r, guest) => {
      await guest('discard 4M 64k', 'write -z -u 4160k 32k');
      await guest('discard 4192k 128k', 'write -z 4320k 32k');
    },
  },
  {
    // QEMU's amend allocates the new refcount blocks in the lowest free clusters: holes in the range
    // the first block counts. A shrink to 1 MiB then drops the blocks of the ranges cut off, counted
    // in that first block: their counts go and they are discarded, whatever the pass-discard options.
    name: 'a shrink drops refcount blocks counted in another block',
    fileDiscard: 'unmap',
    prepare: ['write -P 0x11 0 12M'],
    after: async (image) => {
      await mustRun('qemu-io', ['-d', 'unmap', '-c', 'discard 512k 256k', '-c', 'discard 2M 256k', image]);
      await mustRun('qemu-img', ['amend', '-o', 'refcount_bits=32', image]);
    },
    qcow2: {},
    script: async (r) => void (await r.request('block_resize', { 'node-name': 'fmt', size: 1 * MiB })),
  },
  {
    // A stored bitmap's data clusters always go (QEMU's clear_bitmap_table), its table and the old
    // directory are 'other'.
    name: 'a persistent bitmap removed: its data clusters are discarded',
    ...withStoredBitmap,
    qcow2: {},
  },
  {
    name: 'a persistent bitmap removed, pass-discard-other: its table and the directory too',
    ...withStoredBitmap,
    qcow2: { 'pass-discard-other': true },
  },
  {
    // Clusters and L2 tables an internal snapshot shares only lose a reference: nothing to discard.
    name: 'clusters an internal snapshot shares stay in the file',
    fileDiscard: 'unmap',
    after: (image) => mustRun('qemu-img', ['snapshot', '-c', 's1', image]).then(() => undefined),
    qcow2: { discard: 'unmap', 'pass-discard-other': true },
    script: freesThenShrink,
  },
  {
    name: 'blockdev-reopen switches pass-discard-request',
    fileDiscard: 'unmap',
    qcow2: { discard: 'unmap', 'pass-discard-request': false },
    script: async (r, guest) => {
      await guest('discard 0 1M');
      await r.request('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'fmt', file: 'file', discard: 'unmap', 'pass-discard-request': true }] });
      await guest('discard 2M 1M');
      // Back to the default, which follows discard=unmap: on.
      await r.request('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'fmt', file: 'file', discard: 'unmap' }] });
      await guest('discard 4M 1M');
      await r.request('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'fmt', file: 'file', discard: 'ignore', 'pass-discard-request': true }] });
      await guest('write -z -u 6M 1M');
    },
  },
];

interface Outcome {
  replies: unknown[];
  check: unknown;
  /** The host file's data and hole extents, as qemu-img map reads them (SEEK_DATA/SEEK_HOLE). */
  extents: unknown;
  length: number;
}

/** Runs the case on a copy of `base` and describes the image after it was closed; a copy of it goes to `keep`. */
async function runCase(c: DiscardCase, program: 'bitmirror' | 'qemu-storage-daemon', base: string, keep: string): Promise<Outcome> {
  const env = await setup('discard', program);
  try {
    const image = env.f('disk.qcow2');
    await copyFile(base, image);
    const r = recorder(env);
    await r.request('blockdev-add', { driver: 'file', 'node-name': 'file', filename: image, discard: c.fileDiscard });
    await r.request('blockdev-add', { driver: 'qcow2', 'node-name': 'fmt', file: 'file', ...c.qcow2 });
    const sock = env.f('nbd.sock');
    await r.request('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    // The guest: an export while it runs (a writable export does not share resize: block_resize
    // needs it gone, on both daemons).
    const guest = async (...cmds: string[]) => {
      await r.request('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'fmt', name: 'vda', writable: true });
      await qemuIoNbd(`nbd+unix:///vda?socket=${sock}`, cmds);
      const deleted = env.d.qmp.waitEvent('BLOCK_EXPORT_DELETED', { id: 'guest' });
      await r.request('block-export-del', { id: 'guest' });
      await deleted;
    };
    await c.script(r, guest);
    await r.request('nbd-server-stop');
    // Closed: everything the daemon does to the file is done.
    await r.request('blockdev-del', { 'node-name': 'fmt' });
    await r.request('blockdev-del', { 'node-name': 'file' });
    const check = JSON.parse((await run('qemu-img', ['check', '--output=json', image])).stdout) as Record<string, unknown>;
    const extents = JSON.parse(await mustRun('qemu-img', ['map', '-f', 'raw', '--output=json', image])) as unknown;
    const length = (await stat(image)).size;
    await copyFile(image, keep);
    return { replies: r.mask(r.replies) as unknown[], check: { ...check, filename: undefined }, extents, length };
  } finally {
    await env.done();
  }
}

for (const c of CASES) {
  test(`qcow2 discard passthrough as qemu-storage-daemon 7.2: ${c.name}`, { skip: !haveQsd, timeout: 120_000 }, async (t) => {
    const { dir, cleanup } = await tempDir();
    t.after(cleanup);
    // The image both start from: data everywhere, so that each freed cluster is a hole to punch; the
    // upper half written first, so that what a shrink cuts lies low in the file, under data kept
    // (the file's tail is cut off anyway).
    const base = path.join(dir, 'base.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, base, String(SIZE)]);
    const prepare = c.prepare ?? [`write -P 0x11 ${SIZE / 2} ${SIZE / 2}`, `write -P 0x12 0 ${SIZE / 2}`];
    await mustRun('qemu-io', ['-f', 'qcow2', ...prepare.flatMap((cmd) => ['-c', cmd]), base]);
    await c.after?.(base);
    const theirs = await runCase(c, 'qemu-storage-daemon', base, path.join(dir, 'theirs.qcow2'));
    const ours = await runCase(c, 'bitmirror', base, path.join(dir, 'ours.qcow2'));
    assert.deepEqual(failedSteps(theirs.replies), [], 'the script runs on qemu-storage-daemon');
    assert.deepEqual(ours.replies, theirs.replies);
    assert.equal((theirs.check as { corruptions?: number }).corruptions ?? 0, 0, 'qemu-storage-daemon left a corrupt image');
    assert.deepEqual(ours.check, theirs.check, 'qemu-img check --output=json');
    const cmp = await run('qemu-img', ['compare', path.join(dir, 'ours.qcow2'), path.join(dir, 'theirs.qcow2')]);
    assert.equal(cmp.code, 0, `guest data: ${cmp.stdout}${cmp.stderr}`);
    assert.deepEqual(ours.extents, theirs.extents, 'host file allocation');
    assert.equal(ours.length, theirs.length, 'host file length');
  });
}

// discard-no-unref came with QEMU 8.1: 7.2 refuses it at blockdev-add and at blockdev-reopen.
test('qcow2 discard-no-unref is refused as by qemu-storage-daemon 7.2', { skip: !haveQsd, timeout: 60_000 }, async (t) => {
  const { dir, cleanup } = await tempDir();
  t.after(cleanup);
  const image = path.join(dir, 'disk.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(SIZE)]);
  const replies: unknown[][] = [];
  for (const program of ['qemu-storage-daemon', 'bitmirror'] as const) {
    const env = await setup('discard-no-unref', program);
    try {
      const r = recorder(env);
      await r.request('blockdev-add', { driver: 'file', 'node-name': 'file', filename: image });
      await r.request('blockdev-add', { driver: 'qcow2', 'node-name': 'fmt', file: 'file', 'discard-no-unref': true });
      await r.request('blockdev-add', { driver: 'qcow2', 'node-name': 'fmt', file: 'file' });
      await r.request('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'fmt', file: 'file', 'discard-no-unref': false }] });
      await r.request('blockdev-del', { 'node-name': 'fmt' });
      await r.request('blockdev-del', { 'node-name': 'file' });
      replies.push(r.replies);
    } finally {
      await env.done();
    }
  }
  assert.equal(failedSteps(replies[0]).length, 2);
  assert.deepEqual(replies[1], replies[0]);
});
