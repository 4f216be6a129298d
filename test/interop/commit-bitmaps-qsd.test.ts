/**
 * Bitmaps through block-commit, on a chain of four layers each holding persistent, recording bitmaps
 * (as libvirt's checkpoints propagated through external snapshots leave them):
 *
 *   libvirt-4 (base): a           libvirt-3: a b        libvirt-2: a b c x       libvirt-1 (active): a b c d
 *
 * - libvirt's recipe (consumers.md §1.1–1.3, qemuBlockBitmapsHandleCommitFinish): for an active commit,
 *   `libvirt-tmp-activewrite` added on the base in a transaction right before job-complete, then one
 *   transaction adding each valid bitmap of the committed layers to the base (persistent, recording,
 *   the topmost layer's granularity) and merging every layer's copy and the tmp bitmap into it, then
 *   removing the tmp bitmap; for an intermediate commit the same merge without the tmp bitmap, between
 *   a blockdev-reopen of the base read-write and one back to read-only. Replayed against
 *   qemu-storage-daemon 7.2 and bitmirror: the replies and job events are equal, and both bases list the
 *   same bitmaps (qemu-img info), covering every write the layers recorded and every guest write.
 * - bitmirror's `__org.bitmirror_carry-bitmaps`: the base ends with every bitmap of the removed layers
 *   (libvirt's recipe drops `x`, which is not on the top layer), covering every recorded write.
 *
 * The guest is an NBD export of the active layer written by qemu-io (qemu-storage-daemon has no HMP):
 * before the commit, while it runs, after READY and after the pivot. Data is checked with qemu-img
 * compare against a raw image made by qemu-img convert of the chain and the same writes by qemu-io.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { haveQsd, setup, eventsUntil, type Env } from '../support/daemon.js';
import { mustRun, nbdDirtyRanges, rangesCover } from '../support/tools.js';
import { assertSameReplay, failedSteps, jobEvents, openLibvirtDisk, recorder } from '../support/qmp-replay.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const TMP = 'libvirt-tmp-activewrite';
const CARRY = '__org.bitmirror_carry-bitmaps';
const skip = !haveQsd && 'qemu-storage-daemon not installed';

/** Layer n (4 = base): its bitmaps, and the write qemu-io makes into it (recorded by them). */
const LAYERS: Record<number, { bitmaps: string[]; write: [number, number] }> = {
  4: { bitmaps: ['a'], write: [0, 64 * 1024] },
  3: { bitmaps: ['a', 'b'], write: [1 * MiB, 64 * 1024] },
  2: { bitmaps: ['a', 'b', 'c', 'x'], write: [2 * MiB, 64 * 1024] },
  1: { bitmaps: ['a', 'b', 'c', 'd'], write: [3 * MiB, 64 * 1024] },
};

const GUEST = { running: 'write -P 0x44 5M 4k', ready: 'write -P 0x55 6M 4k', pivoted: 'write -P 0x66 7M 4k' };
/** The guest's writes into the active layer (recorded there), and the one after the pivot (into the base). */
const GUEST_BEFORE_PIVOT: Array<[number, number]> = [5, 6].map((m) => [m * MiB, 4096]);
const GUEST_AFTER_PIVOT: [number, number] = [7 * MiB, 4096];

const file = (env: Env, n: number) => env.f(`layer${n}.qcow2`);

async function makeChain(env: Env): Promise<string> {
  for (const n of [4, 3, 2, 1]) {
    const f = file(env, n);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', ...(n < 4 ? ['-b', file(env, n + 1), '-F', 'qcow2'] : []), f, String(SIZE)]);
    for (const b of LAYERS[n].bitmaps) await mustRun('qemu-img', ['bitmap', '--add', f, b]);
    const [o, l] = LAYERS[n].write;
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${n}${n} ${o} ${l}`, f]);
  }
  // The reference: the disk as the guest sees it now; the guest's writes are added at the end.
  const ref = env.f('ref.raw');
  await mustRun('qemu-img', ['convert', '-O', 'raw', file(env, 1), ref]);
  return ref;
}

/** Which layers recorded writes under `name` (every layer that has the bitmap recorded its own write). */
function recorded(name: string, layers: number[]): Array<[number, number]> {
  return layers.filter((n) => LAYERS[n].bitmaps.includes(name)).map((n) => LAYERS[n].write);
}

type Mode = 'active' | 'intermediate';
type Recipe = 'libvirt' | 'carry';

interface Run {
  replies: unknown[];
  events: string[];
  env: Env;
  ref: string;
}

/** libvirt's bitmap transaction for a finished commit of `top`..above-base into the base. */
function libvirtMergeActions(nodes: Array<Record<string, unknown>>, topLayer: number, active: boolean): unknown[] {
  const bitmapsOf = (n: number) => ((nodes.find((x) => x['node-name'] === `libvirt-${n}-format`)?.['dirty-bitmaps'] ?? []) as Array<{ name?: string; granularity: number; recording: boolean; persistent: boolean }>).filter((b) => b.name);
  const committed = [topLayer, ...[2, 3].filter((n) => n > topLayer)];
  const actions: unknown[] = [];
  // qemuBlockGetBitmapMergeActions: the bitmaps of the top layer that form a valid chain (recording,
  // persistent, contiguous from the top); each layer that has one contributes it.
  for (const bm of bitmapsOf(topLayer)) {
    const name = bm.name!;
    const sources = committed.filter((n) => bitmapsOf(n).some((b) => b.name === name));
    if (!bitmapsOf(4).some((b) => b.name === name)) {
      actions.push({ type: 'block-dirty-bitmap-add', data: { node: 'libvirt-4-format', name, persistent: true, disabled: false, granularity: bm.granularity } });
    }
    const merge = sources.map((n) => ({ node: `libvirt-${n}-format`, name }));
    if (active) merge.push({ node: 'libvirt-4-format', name: TMP });
    actions.push({ type: 'block-dirty-bitmap-merge', data: { node: 'libvirt-4-format', target: name, bitmaps: merge } });
  }
  if (active) actions.push({ type: 'block-dirty-bitmap-remove', data: { node: 'libvirt-4-format', name: TMP } });
  return actions;
}

async function replay(program: 'bitmirror' | 'qemu-storage-daemon', mode: Mode, recipe: Recipe): Promise<Run> {
  const env = await setup(`commit-bm-${program === 'bitmirror' ? 'bm' : 'qsd'}`, program);
  const ref = await makeChain(env);
  const { qmp } = env.d;
  const rec = recorder(env);
  const { replies, request: r, mask } = rec;
  const nodes = () => qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
  // The running domain's disk, as libvirt opens it.
  const guest = await openLibvirtDisk(rec, [1, 2, 3, 4].map((n) => file(env, n)), env.f('nbd.sock'));
  const guestWrites: string[] = [];
  const write = async (cmd: string) => {
    await guest(cmd);
    guestWrites.push(cmd);
  };

  const top = mode === 'active' ? 1 : 2;
  const job = `commit-vda-libvirt-${top}-format`;
  // virsh blockcommit vda --top … --base … [--active]: libvirt names the nodes.
  await r('block-commit', {
    'job-id': job,
    device: 'libvirt-1-format',
    'top-node': `libvirt-${top}-format`,
    'base-node': 'libvirt-4-format',
    speed: 1,
    'auto-finalize': true,
    'auto-dismiss': false,
    ...(recipe === 'carry' ? { [CARRY]: true } : {}),
  });
  await write(GUEST.running);
  await r('block-job-set-speed', { device: job, speed: 0 });
  if (mode === 'active') {
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: job });
    await write(GUEST.ready);
    // virsh blockjob --pivot: the tmp bitmap on the base, then job-complete.
    if (recipe === 'libvirt') await r('transaction', { actions: [{ type: 'block-dirty-bitmap-add', data: { node: 'libvirt-4-format', name: TMP, persistent: false, disabled: false } }] });
    await r('job-complete', { id: job });
  }
  await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: job, status: 'concluded' });
  await write(GUEST.pivoted);
  const jobs = await qmp.execute<Array<Record<string, unknown>>>('query-jobs');
  replies.push(['query-jobs', jobs.map((j) => [j.id, j.type, j.status, j.error])]);
  if (recipe === 'libvirt') {
    // qemuBlockJobProcessEventCompletedCommitBitmaps.
    const actions = libvirtMergeActions(await nodes(), top, mode === 'active');
    replies.push(['actions', actions]);
    const reopen = (ro: boolean) => r('blockdev-reopen', { options: [{ 'node-name': 'libvirt-4-format', driver: 'qcow2', 'read-only': ro, file: 'libvirt-4-storage', backing: null }] });
    if (mode === 'intermediate') await reopen(false);
    await r('transaction', { actions });
    if (mode === 'intermediate') await reopen(true);
  }
  await r('job-dismiss', { id: job });
  // The committed layers are unplugged (for an active commit the old top too).
  const gone = mode === 'active' ? [1, 2, 3] : [2, 3];
  for (const n of gone) for (const k of ['format', 'storage']) await r('blockdev-del', { 'node-name': `libvirt-${n}-${k}` });
  const left = await nodes();
  replies.push(['nodes', left.filter((n) => !String(n['node-name']).startsWith('#')).map((n) => [n['node-name'], n.ro, n.backing_file ? mask(n.backing_file) : null])]);
  await r('block-export-del', { id: 'guest' });
  await eventsUntil(env, 'BLOCK_EXPORT_DELETED', { id: 'guest' });
  await r('nbd-server-stop');
  const events = jobEvents(qmp.events.splice(0));
  assert.equal(await env.d.stop(), 0, env.d.stderr());
  await mustRun('qemu-io', ['-f', 'raw', ...guestWrites.flatMap((c) => ['-c', c]), ref]);
  return { replies, events, env, ref };
}

/** The base holds `names`, each covering every write the committed layers (and the base) recorded, and the guest's. */
async function checkBase(run: Run, mode: Mode, names: string[], who: string): Promise<void> {
  const { env } = run;
  const base = file(env, 4);
  const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', base])) as { 'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[] }> } } };
  assert.deepEqual(
    (info['format-specific'].data.bitmaps ?? []).map((b) => [b.name, b.flags]).sort(),
    names.map((n) => [n, ['auto']]).sort(),
    who,
  );
  assert.match(await mustRun('qemu-img', ['check', base]), /No errors were found/);
  const layers = mode === 'active' ? [1, 2, 3, 4] : [2, 3, 4];
  for (const name of names) {
    const ranges = await nbdDirtyRanges(base, name);
    // After an active commit the base's bitmaps hold the guest's writes too: those the active layer's
    // bitmap of that name recorded before the pivot, and the base's every one after it.
    const guest = mode === 'active' ? [...(LAYERS[1].bitmaps.includes(name) ? GUEST_BEFORE_PIVOT : []), GUEST_AFTER_PIVOT] : [];
    const must = [...recorded(name, layers), ...guest];
    for (const [o, l] of must) assert.ok(rangesCover(ranges, o, l), `${who}: bitmap ${name} misses [${o}, +${l}): ${JSON.stringify(ranges)}`);
  }
  // The data: the base (active) or the active layer over it (intermediate) is the disk with the guest's writes.
  const disk = mode === 'active' ? base : file(env, 1);
  assert.match(await mustRun('qemu-img', ['compare', disk, run.ref]), /Images are identical/, who);
  if (mode === 'intermediate') assert.equal((JSON.parse(await mustRun('qemu-img', ['info', '--output=json', disk])) as { 'backing-filename': string })['backing-filename'], base);
}

for (const mode of ['active', 'intermediate'] as const) {
  test(`libvirt's ${mode} block-commit recipe with checkpoint bitmaps on four layers: as qemu-storage-daemon 7.2, every bitmap of the top layer kept in the base`, { skip }, async () => {
    const theirs = await replay('qemu-storage-daemon', mode, 'libvirt');
    const ours = await replay('bitmirror', mode, 'libvirt');
    try {
      assertSameReplay(ours, theirs);
      // libvirt keeps the bitmaps of the top layer; `x` (not on it) is dropped, by QEMU as by bitmirror.
      const names = mode === 'active' ? ['a', 'b', 'c', 'd'] : ['a', 'b', 'c', 'x'];
      await checkBase(theirs, mode, names, 'qemu-storage-daemon');
      await checkBase(ours, mode, names, 'bitmirror');
    } finally {
      await fsp.rm(theirs.env.dir, { recursive: true, force: true });
      await fsp.rm(ours.env.dir, { recursive: true, force: true });
    }
  });

  test(`${mode} block-commit with __org.bitmirror_carry-bitmaps: the base holds every bitmap of every removed layer, covering every recorded write`, async () => {
    const ours = await replay('bitmirror', mode, 'carry');
    try {
      assert.deepEqual(failedSteps(ours.replies), []);
      await checkBase(ours, mode, mode === 'active' ? ['a', 'b', 'c', 'd', 'x'] : ['a', 'b', 'c', 'x'], 'bitmirror');
    } finally {
      await fsp.rm(ours.env.dir, { recursive: true, force: true });
    }
  });
}
