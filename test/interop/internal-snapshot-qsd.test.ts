/**
 * Internal qcow2 snapshots over QMP as qemu-storage-daemon 7.2 takes them: the same script —
 * blockdev-snapshot-internal-sync as a command and in transactions (one aborted, whose snapshot goes
 * again), the commands' refusals, blockdev-snapshot-delete-internal-sync by name and by id, the
 * snapshots query-named-block-nodes lists, and a guest (qemu-io on an NBD export, qemu-storage-daemon
 * has no HMP) writing, overwriting compressed clusters, discarding between them — is replayed against
 * both daemons, each on its own copy of an image that already has a snapshot made by
 * `qemu-img snapshot -c`. Replies must be equal (dates and clocks masked); then each image must pass
 * `qemu-img check` with the same counts, `qemu-img snapshot -l` must list the same snapshots, every
 * snapshot applied with `qemu-img snapshot -a` must give back the guest's data as it was when the
 * snapshot was taken (qemu-img compare with a copy read through the export at that moment), and the
 * host file must have the same holes: a deleted snapshot's clusters are discarded on the file exactly
 * when pass-discard-snapshot is on.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { copyFile, stat } from 'node:fs/promises';
import * as path from 'node:path';
import { haveQsd, setup } from '../support/daemon.js';
import { failedSteps, recorder } from '../support/qmp-replay.js';
import { mustRun, qemuIoNbd, run, tempDir } from '../support/tools.js';

const MiB = 1 << 20;
/** 4 KiB clusters: an L2 table maps 2 MiB, so the image has several, some shared and some not. */
const CLUSTER = 4096;
const SIZE = 8 * MiB;
/** The snapshots left at the end, whose data is checked with qemu-img snapshot -a. */
const KEPT = ['pre', 's2', 's4'];

/** SnapshotInfo with the wall-clock members masked (the daemons take their snapshots at different times). */
function maskDates(v: unknown): unknown {
  return JSON.parse(JSON.stringify(v ?? null), (k, x: unknown) => (['date-sec', 'date-nsec', 'vm-clock-sec', 'vm-clock-nsec'].includes(k) ? 'T' : x)) as unknown;
}

interface Outcome {
  replies: unknown[];
  check: Record<string, unknown>;
  list: string[];
  extents: unknown;
  length: number;
}

async function runScript(program: 'bitmirror' | 'qemu-storage-daemon', base: string, dir: string, passDiscardSnapshot: boolean): Promise<Outcome> {
  const env = await setup('isnap', program);
  const image = path.join(dir, `${program}.qcow2`);
  const r = recorder(env);
  try {
    await copyFile(base, image);
    const step = async (cmd: string, args?: Record<string, unknown>) => {
      const rep = await env.d.qmp.request(cmd, args);
      r.replies.push([cmd, maskDates(r.mask('error' in rep ? rep.error : rep.return))]);
      return rep;
    };
    const snapshots = async () => {
      const nodes = (await env.d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string; image: { snapshots?: unknown } }>;
      r.replies.push(['snapshots', maskDates(nodes.find((n) => n['node-name'] === 'fmt')?.image.snapshots)]);
    };
    await step('blockdev-add', { driver: 'file', 'node-name': 'file', filename: image, discard: 'unmap' });
    await step('blockdev-add', { driver: 'qcow2', 'node-name': 'fmt', file: 'file', discard: 'unmap', 'pass-discard-snapshot': passDiscardSnapshot });
    const sock = env.f('nbd.sock');
    await step('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await step('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'fmt', name: 'vda', writable: true });
    const uri = `nbd+unix:///vda?socket=${sock}`;
    const guest = (...cmds: string[]) => qemuIoNbd(uri, cmds);
    // What the guest sees when a snapshot is taken: what `qemu-img snapshot -a` must give back.
    const expect = (name: string) => mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, path.join(dir, `${program}-${name}.raw`)]);
    await snapshots();

    // Over data, a compressed cluster overwritten in part, a discard; then s1.
    await guest('write -P 0x44 0 64k', 'write -P 0x45 4M 8k', 'discard 2M 256k');
    await expect('s1');
    await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: 's1' });
    await guest('write -P 0x55 0 1M', 'write -z -u 3M 128k', 'write -P 0x56 6M 64k', 'write -P 0x57 4200k 8k');
    // s2 in a transaction with a bitmap; s3 in one that aborts (deleted again).
    await expect('s2');
    await step('transaction', { actions: [{ type: 'blockdev-snapshot-internal-sync', data: { device: 'fmt', name: 's2' } }, { type: 'block-dirty-bitmap-add', data: { node: 'fmt', name: 'b0' } }] });
    await step('transaction', { actions: [{ type: 'blockdev-snapshot-internal-sync', data: { device: 'fmt', name: 's3' } }, { type: 'abort', data: {} }] });
    await step('transaction', { actions: [{ type: 'blockdev-snapshot-internal-sync', data: { device: 'fmt', name: 's3' } }], properties: { 'completion-mode': 'grouped' } });
    // The refusals, in QEMU's order of checks.
    await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: 's1' });
    await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: '' });
    await step('blockdev-snapshot-internal-sync', { device: 'file', name: 'x' });
    await step('blockdev-snapshot-internal-sync', { device: 'nowhere', name: 'x' });
    await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt' });
    await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', id: '9' });
    await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', name: 's3' });
    await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', id: '1', name: 's2' });
    await step('blockdev-snapshot-delete-internal-sync', { device: 'file', name: 's1' });
    await snapshots();
    // Most of s1's own clusters overwritten, then s1 deleted: they are freed.
    // (Pieces of at most 1 MiB: how QEMU spreads one larger request over clusters of mixed kinds is
    // not what this test is about.)
    await guest('write -P 0x66 0 1M', 'write -P 0x66 1M 1M', 'write -P 0x66 2M 1M', 'write -P 0x67 4M 256k');
    await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', name: 's1' });
    await snapshots();
    await guest('write -P 0x77 64k 64k', 'write -P 0x78 7M 128k');
    await expect('s4');
    await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: 's4' });
    // The id of a deleted snapshot is taken again when it was the largest.
    await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: 's5' });
    await guest('write -P 0x79 5M 1M');
    await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', id: '5', name: 's5' });
    await snapshots();
    await step('block-export-del', { id: 'guest' });
    await step('nbd-server-stop');
    await step('blockdev-del', { 'node-name': 'fmt' });
    await step('blockdev-del', { 'node-name': 'file' });
  } finally {
    await env.done();
  }
  const check = JSON.parse((await run('qemu-img', ['check', '--output=json', image])).stdout) as Record<string, unknown>;
  // "ID TAG VM-SIZE DATE ..." lines: id and tag.
  const list = (await mustRun('qemu-img', ['snapshot', '-l', image]))
    .split('\n')
    .slice(2)
    .filter((l) => l.trim())
    .map((l) => l.split(/\s+/).slice(0, 2).join(' '));
  const extents = JSON.parse(await mustRun('qemu-img', ['map', '-f', 'raw', '--output=json', image])) as unknown;
  return { replies: r.replies, check: { ...check, filename: undefined }, list, extents, length: (await stat(image)).size };
}

/** qemu-storage-daemon's host extents per pass-discard-snapshot: the option must make a difference. */
const extentsBySetting = new Map<boolean, unknown>();

for (const passDiscardSnapshot of [true, false]) {
  test(`internal snapshots as qemu-storage-daemon 7.2 (pass-discard-snapshot=${passDiscardSnapshot})`, { skip: !haveQsd, timeout: 180_000 }, async (t) => {
    const { dir, cleanup } = await tempDir();
    t.after(cleanup);
    // Data, compressed clusters and zero clusters; a snapshot taken by qemu-img; then data over it.
    const base = path.join(dir, 'base.qcow2');
    // 8-bit refcounts: one refcount block covers the whole file (where QEMU puts a new block while
    // it allocates is the write path's business, not this test's).
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER},refcount_bits=8`, base, String(SIZE)]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4M', '-c', 'write -c -P 0x22 4M 128k', '-c', 'write -z 5M 64k', '-c', 'write -P 0x12 6M 1M', base]);
    await mustRun('qemu-img', ['snapshot', '-c', 'pre', base]);
    for (const p of ['qemu-storage-daemon', 'bitmirror']) await mustRun('qemu-img', ['convert', '-O', 'raw', base, path.join(dir, `${p}-pre.raw`)]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 1M 512k', '-c', 'write -c -P 0x34 4352k 64k', base]);

    const theirs = await runScript('qemu-storage-daemon', base, dir, passDiscardSnapshot);
    const ours = await runScript('bitmirror', base, dir, passDiscardSnapshot);
    assert.equal(failedSteps(theirs.replies).length, 11, 'the refusals (and only they) fail on qemu-storage-daemon');
    for (let i = 0; i < Math.max(theirs.replies.length, ours.replies.length); i++) assert.deepEqual(ours.replies[i], theirs.replies[i], `step ${i}`);
    for (const o of [theirs, ours]) {
      assert.equal(o.check.corruptions ?? 0, 0, 'no corruption');
      assert.equal(o.check.leaks ?? 0, 0, 'no leak');
    }
    assert.deepEqual(ours.check, theirs.check, 'qemu-img check --output=json');
    assert.deepEqual(theirs.list, ['1 pre', '3 s2', '4 s4']);
    assert.deepEqual(ours.list, theirs.list, 'qemu-img snapshot -l');
    // Each snapshot gives back what the guest saw when it was taken.
    for (const program of ['qemu-storage-daemon', 'bitmirror']) {
      for (const name of KEPT) {
        const copy = path.join(dir, `${program}-${name}.qcow2`);
        await copyFile(path.join(dir, `${program}.qcow2`), copy);
        await mustRun('qemu-img', ['snapshot', '-a', name, copy]);
        const cmp = await run('qemu-img', ['compare', '-F', 'raw', copy, path.join(dir, `${program}-${name}.raw`)]);
        assert.equal(cmp.code, 0, `${program}: snapshot ${name}: ${cmp.stdout}${cmp.stderr}`);
        const check = await run('qemu-img', ['check', copy]);
        assert.equal(check.code, 0, `${program}: after snapshot -a ${name}: ${check.stdout}`);
      }
    }
    assert.deepEqual(ours.extents, theirs.extents, 'host file allocation');
    extentsBySetting.set(passDiscardSnapshot, theirs.extents);
    if (extentsBySetting.size === 2) assert.notDeepEqual(extentsBySetting.get(true), extentsBySetting.get(false), 'the deleted snapshots left holes only with pass-discard-snapshot');
    assert.equal(ours.length, theirs.length, 'host file length');
  });
}

// Which nodes can take or delete one: a raw node, a read-only qcow2 node (with a snapshot qemu-img
// made), a throttle filter over a qcow2 node (QEMU's fallback to the filtered node), a node a mirror
// job has a filter above, a node below another: the same replies from both daemons.
test('internal snapshots: the nodes that refuse them and the filters that pass them on, as qemu-storage-daemon 7.2', { skip: !haveQsd, timeout: 120_000 }, async (t) => {
  const { dir, cleanup } = await tempDir();
  t.after(cleanup);
  const replies: unknown[][] = [];
  for (const program of ['qemu-storage-daemon', 'bitmirror'] as const) {
    const env = await setup('isnap-nodes', program);
    try {
      const img = (name: string) => path.join(dir, `${program}-${name}`);
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img('a.qcow2'), '4M']);
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img('t.qcow2'), '4M']);
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img('ro.qcow2'), '4M']);
      await mustRun('qemu-img', ['snapshot', '-c', 'old', img('ro.qcow2')]);
      await mustRun('qemu-img', ['create', '-q', '-f', 'raw', img('r.raw'), '4M']);
      const r = recorder(env);
      const step = async (cmd: string, args?: Record<string, unknown>) => {
        const rep = await env.d.qmp.request(cmd, args);
        r.replies.push([cmd, maskDates(r.mask('error' in rep ? rep.error : rep.return))]);
      };
      await step('blockdev-add', { driver: 'file', 'node-name': 'f', filename: img('a.qcow2') });
      await step('blockdev-add', { driver: 'qcow2', 'node-name': 'fmt', file: 'f' });
      await step('blockdev-add', { driver: 'file', 'node-name': 'rf', filename: img('r.raw') });
      await step('blockdev-add', { driver: 'raw', 'node-name': 'raw', file: 'rf' });
      await step('blockdev-add', { driver: 'file', 'node-name': 'rof', filename: img('ro.qcow2'), 'read-only': true });
      await step('blockdev-add', { driver: 'qcow2', 'node-name': 'ro', file: 'rof', 'read-only': true });
      await step('blockdev-snapshot-internal-sync', { device: 'raw', name: 'x' });
      await step('blockdev-snapshot-delete-internal-sync', { device: 'raw', name: 'x' });
      await step('blockdev-snapshot-internal-sync', { device: 'rf', name: 'x' });
      await step('blockdev-snapshot-internal-sync', { device: 'ro', name: 'x' });
      await step('blockdev-snapshot-delete-internal-sync', { device: 'ro', id: '2' });
      // Through a filter: the snapshot is the qcow2 node's.
      await step('object-add', { 'qom-type': 'throttle-group', id: 'g' });
      await step('blockdev-add', { driver: 'throttle', 'node-name': 'thr', file: 'fmt', 'throttle-group': 'g' });
      // The qcow2 node is below the filter now: no root node.
      await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: 'under' });
      await step('blockdev-snapshot-internal-sync', { device: 'thr', name: 'via' });
      await step('blockdev-snapshot-internal-sync', { device: 'thr', name: 'via' });
      // Listed by the nodes above the qcow2 node too (a raw node over the filter as well).
      await step('blockdev-add', { driver: 'raw', 'node-name': 'top', file: 'thr' });
      const nodes = (await env.d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string; image: { snapshots?: unknown } }>;
      r.replies.push(['snapshots', maskDates(nodes.filter((n) => ['top', 'thr', 'fmt', 'f'].includes(n['node-name'])).map((n) => [n['node-name'], n.image.snapshots]))]);
      await step('blockdev-snapshot-delete-internal-sync', { device: 'top', name: 'via' });
      await step('blockdev-del', { 'node-name': 'top' });
      await step('blockdev-snapshot-delete-internal-sync', { device: 'thr', name: 'via' });
      await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', name: 'via' });
      await step('blockdev-del', { 'node-name': 'thr' });
      await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', id: '1' });
      await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: 'again' });
      // A mirror's filter sits above its source: no root node any more.
      await step('blockdev-add', { driver: 'file', 'node-name': 'tf', filename: img('t.qcow2') });
      await step('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: 'tf' });
      await step('blockdev-mirror', { 'job-id': 'j', device: 'fmt', target: 'tgt', sync: 'full', speed: 1 });
      await step('blockdev-snapshot-internal-sync', { device: 'fmt', name: 'busy' });
      await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', name: 'again' });
      await step('blockdev-snapshot-internal-sync', { device: 'tgt', name: 'busy' });
      const cancelled = env.d.qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'j' });
      await step('block-job-cancel', { device: 'j', force: true });
      await cancelled;
      await step('blockdev-snapshot-delete-internal-sync', { device: 'fmt', name: 'again' });
      for (const n of ['tgt', 'tf', 'fmt', 'f', 'ro', 'rof', 'raw', 'rf']) await step('blockdev-del', { 'node-name': n });
      replies.push(r.replies);
    } finally {
      await env.done();
    }
    await mustRun('qemu-img', ['check', path.join(dir, `${program}-a.qcow2`)]);
  }
  assert.equal(failedSteps(replies[0]).length, 13, `the refusals (and only they) fail on qemu-storage-daemon: ${JSON.stringify(failedSteps(replies[0]))}`);
  for (let i = 0; i < Math.max(replies[0].length, replies[1].length); i++) assert.deepEqual(replies[1][i], replies[0][i], `step ${i}`);
});
