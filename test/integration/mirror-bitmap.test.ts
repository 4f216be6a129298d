/**
 * Mirror with a working bitmap, re-expressing the series' test `tests/mirror-bitmap` (reference §7.1):
 * the three bitmap sync modes emulated with add/merge/clear/remove (never, on-success, always) × failure
 * (simulated cancel at PENDING, intermediate read errors from blkdebug, none), the expected bitmap
 * counts after each mirror, and the chain of incremental targets compared with qemu-img. Plus the API
 * refusals (test_mirror_api and the code-only messages), Proxmox's sync=bitmap/incremental variant,
 * the partial-cluster fill for a no-backing target with coarser clusters, and a 3-step incremental chain.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import {
  KiB,
  MiB,
  SIZE,
  setup,
  qcow2,
  addQcow2,
  io,
  flush,
  assertIdentical,
  compare,
  bitmaps,
  bitmapCount,
  drain,
  eventsUntil,
  summarise,
  qmpError,
  newTarget,
  type Env,
} from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

const GRAN = 64 * KiB;
const CLUSTER = 128 * KiB;
type Write = [pattern: number, offset: number, len?: number];
const G0: Write[] = [[0x49, 0x0000000], [0x6c, 0x0100000], [0x6f, 0x2000000], [0x76, 0x3ff0000]];
const G1: Write[] = [[0x65, 0x0000000], [0x77, 0x00f8000], [0x72, 0x2008000], [0x69, 0x3fe0000]];
const G2: Write[] = [[0x74, 0x0010000], [0x69, 0x00e8000], [0x6e, 0x2018000], [0x67, 0x3fe0000, 128 * KiB]];
const G3: Write[] = [[0xaa, 0x0010000, 192 * KiB], [0xbb, 0x00d8000], [0xcc, 0x2028000], [0xdd, 0x3fc0000]];

async function writeGroup(env: Env, node: string, g: Write[]): Promise<void> {
  for (const [p, off, len] of g) await io(env, node, `write -P ${p} ${off} ${len ?? 64 * KiB}`);
}

/** A qcow2 target with 128K clusters (optionally backed by `backing`), added as `node`. */
async function makeTarget(env: Env, node: string, file: string, backing?: string): Promise<void> {
  await newTarget(env, node, file, SIZE, ['-o', `cluster_size=${CLUSTER}`, ...(backing ? ['-b', backing, '-F', 'qcow2'] : [])]);
}

/**
 * QEMU's reference mirror completes and then deletes the target node; with a pivot the target would take
 * drive0's place, so the reference copy here is a soft cancel after READY: the same complete copy, no pivot.
 */
async function refCopy(env: Env, n: number): Promise<string> {
  const file = env.f(`fmirror${n}.qcow2`);
  const id = `ref_mirror_${n}`;
  await makeTarget(env, `ref_target_${n}`, file);
  await env.d.qmp.execute('blockdev-mirror', { 'job-id': id, device: 'drive0', target: `ref_target_${n}`, sync: 'full' });
  const ready = await env.d.qmp.waitEvent('BLOCK_JOB_READY', { device: id });
  // QEMU 7.2 and the series' .out report len = 64 MiB here (9.x pre-zeroing); bitmirror, like 10.1+,
  // sees that the fresh target reads as zeroes and copies only what is allocated.
  assert.equal(ready.data!.offset, ready.data!.len);
  await env.d.qmp.execute('block-job-cancel', { device: id });
  const ev = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: id });
  assert.equal(ev.data!.error, undefined);
  assert.equal(ev.data!.offset, ev.data!.len);
  await env.d.qmp.execute('blockdev-del', { 'node-name': `ref_target_${n}` });
  return file;
}

type Mode = 'never' | 'on-success' | 'always';
type Failure = 'simulated' | 'intermediate' | null;

/** Pre-process per mode; returns the bitmap name to mirror with. */
async function preBitmap(env: Env, mode: Mode): Promise<string> {
  if (mode === 'always') return 'bitmap0';
  await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'mirror-bitmap', granularity: GRAN });
  await env.d.qmp.execute('block-dirty-bitmap-merge', { node: 'drive0', target: 'mirror-bitmap', bitmaps: ['bitmap0'] });
  return 'mirror-bitmap';
}

async function postBitmap(env: Env, mode: Mode, success: boolean): Promise<void> {
  if (mode === 'always') return;
  if (mode === 'on-success' && success) {
    await env.d.qmp.execute('block-dirty-bitmap-clear', { node: 'drive0', name: 'bitmap0' });
    await env.d.qmp.execute('block-dirty-bitmap-merge', { node: 'drive0', target: 'bitmap0', bitmaps: ['mirror-bitmap'] });
  }
  await env.d.qmp.execute('block-dirty-bitmap-remove', { node: 'drive0', name: 'mirror-bitmap' });
}

/** iotests' run_job for a test mirror with auto-finalize=false: returns the event summary. */
async function runJob(env: Env, id: string, cancel: boolean, during?: () => Promise<void>): Promise<string[]> {
  const seen: string[] = [];
  if (during) await during();
  for (;;) {
    const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id });
    for (const e of evs) {
      if (e.event === 'JOB_STATUS_CHANGE') continue;
      seen.push(summarise([e], ['action', 'operation', 'error', 'len', 'offset'])[0]);
    }
    const status = evs.at(-1)!.data!.status;
    if (status === 'ready') await env.d.qmp.execute('job-complete', { id });
    else if (status === 'pending') await env.d.qmp.execute(cancel ? 'job-cancel' : 'job-finalize', { id });
    else if (status === 'null') break;
  }
  return seen;
}

const EXPECT1: Record<Mode, Record<string, number>> = {
  never: { simulated: 393216, intermediate: 393216, none: 393216 },
  'on-success': { simulated: 393216, intermediate: 393216, none: 0 },
  always: { simulated: 0, intermediate: -1, none: 0 },
};

async function scenario(mode: Mode, failure: Failure): Promise<void> {
  const env = await setup('mb');
  try {
    const { qmp } = env.d;
    const img = await qcow2(env.f('img.qcow2'));
    // The series arms blkdebug with a flush (flush_to_disk 1->2); bitmirror's qcow2 flushes its file
    // while allocating clusters, which would arm it during G0. An unaligned 1-byte write (the blkdebug
    // node's read-modify-write, pwritev_rmw_head) that rewrites a byte with its own value arms it here.
    const debug =
      failure === 'intermediate'
        ? {
            align: 512,
            'set-state': [
              { event: 'pwritev_rmw_head', state: 1, new_state: 2 },
              { event: 'read_aio', state: 2, new_state: 3 },
              { event: 'read_aio', state: 3, new_state: 4 },
            ],
            'inject-error': [
              { event: 'read_aio', errno: 5, state: 3, immediately: false, once: true },
              { event: 'read_aio', errno: 5, state: 4, immediately: false, once: true },
            ],
          }
        : undefined;
    await addQcow2(env, 'drive0', img, {}, debug);
    await writeGroup(env, 'drive0', G0);
    assert.deepEqual(await bitmaps(env, 'drive0'), {});
    const fmirror0 = await refCopy(env, 0);
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: GRAN });
    await writeGroup(env, 'drive0', G1);
    assert.equal(await bitmapCount(env, 'drive0', 'bitmap0'), 393216);
    const fmirror1 = await refCopy(env, 1);
    if (failure === 'intermediate') await io(env, 'drive0', 'write -P 0x65 1 1');

    // ---- mirror #1 onto bsync1 (backing fmirror0)
    const bsync1 = env.f('bsync1.qcow2');
    await makeTarget(env, 'mirror_target_1', bsync1, fmirror0);
    let bm = await preBitmap(env, mode);
    drain(env);
    await qmp.execute('blockdev-mirror', {
      'job-id': 'mirror_1',
      device: 'drive0',
      target: 'mirror_target_1',
      sync: 'full',
      bitmap: bm,
      'auto-finalize': false,
      'copy-mode': 'write-blocking',
      'filter-node-name': 'mirror-top',
    });
    const ev1 = await runJob(env, 'mirror_1', failure === 'simulated');
    let offset1 = 0;
    if (failure === null) {
      assert.deepEqual(ev1, ['BLOCK_JOB_READY{len=393216,offset=393216}', 'BLOCK_JOB_PENDING', 'BLOCK_JOB_COMPLETED{len=393216,offset=393216}']);
    } else if (failure === 'simulated') {
      assert.deepEqual(ev1, ['BLOCK_JOB_READY{len=393216,offset=393216}', 'BLOCK_JOB_PENDING', 'BLOCK_JOB_CANCELLED{len=393216,offset=393216}']);
    } else {
      const errs = ev1.filter((e) => e.startsWith('BLOCK_JOB_ERROR'));
      assert.ok(errs.length >= 1, ev1.join(' '));
      for (const e of errs) assert.equal(e, 'BLOCK_JOB_ERROR{action="report",operation="read"}');
      const last = ev1.at(-1)!;
      assert.match(last, /^BLOCK_JOB_COMPLETED\{error="Input\/output error",len=393216,offset=\d+\}$/);
      assert.ok(!ev1.some((e) => e.startsWith('BLOCK_JOB_READY')));
      offset1 = Number(/offset=(\d+)/.exec(last)![1]);
      assert.ok(offset1 >= GRAN && offset1 < 393216, last);
    }
    await qmp.execute('blockdev-del', { 'node-name': 'mirror_target_1' });
    await postBitmap(env, mode, failure === null);
    // The model: an 'always' bitmap keeps exactly what was not copied (the first chunk was, in QEMU's run 1 bit).
    const want1 = EXPECT1[mode][failure ?? 'none'];
    assert.equal(await bitmapCount(env, 'drive0', 'bitmap0'), want1 === -1 ? 393216 - offset1 : want1, ev1.join(' '));

    // ---- mirror #2 onto bsync2, G2 written through the filter while the job runs
    const fmirror2 = await refCopy(env, 2);
    const bsync2 = env.f('bsync2.qcow2');
    const base2 = failure === null || mode === 'always' ? bsync1 : fmirror1;
    await makeTarget(env, 'mirror_target_2', bsync2, base2);
    bm = await preBitmap(env, mode);
    drain(env);
    await qmp.execute('blockdev-mirror', {
      'job-id': 'mirror_2',
      device: 'drive0',
      target: 'mirror_target_2',
      sync: 'full',
      bitmap: bm,
      'auto-finalize': false,
      'copy-mode': 'write-blocking',
      'filter-node-name': 'mirror-top',
    });
    await runJob(env, 'mirror_2', false, async () => {
      await writeGroup(env, 'mirror-top', G2);
      const inUse = (await bitmaps(env, 'drive0'))[bm];
      assert.equal(inUse.busy, true);
      assert.equal(inUse.recording, false);
      assert.equal(inUse.granularity, GRAN);
      if (mode !== 'always') {
        const b0 = (await bitmaps(env, 'drive0')).bitmap0;
        assert.equal(b0.busy, false);
        assert.equal(b0.recording, true);
        if (mode === 'never') assert.equal(b0.count, 655360);
      }
    });
    await qmp.execute('blockdev-del', { 'node-name': 'mirror_target_2' });
    await postBitmap(env, mode, true);
    assert.equal(await bitmapCount(env, 'drive0', 'bitmap0'), mode === 'never' ? 655360 : 0);

    // ---- G3, mirror #3 onto bsync3 (backing bsync2)
    await writeGroup(env, 'drive0', G3);
    const want3 = mode === 'never' ? 983040 : 524288;
    assert.equal(await bitmapCount(env, 'drive0', 'bitmap0'), want3);
    const fmirror3 = await refCopy(env, 3);
    const bsync3 = env.f('bsync3.qcow2');
    await makeTarget(env, 'mirror_target_3', bsync3, bsync2);
    bm = await preBitmap(env, mode);
    drain(env);
    await qmp.execute('blockdev-mirror', {
      'job-id': 'mirror_3',
      device: 'drive0',
      target: 'mirror_target_3',
      sync: 'full',
      bitmap: bm,
      'auto-finalize': false,
      'copy-mode': 'write-blocking',
      'filter-node-name': 'mirror-top',
    });
    const ev3 = await runJob(env, 'mirror_3', false);
    assert.equal(ev3[0], `BLOCK_JOB_READY{len=${want3},offset=${want3}}`);
    await qmp.execute('blockdev-del', { 'node-name': 'mirror_target_3' });
    await postBitmap(env, mode, true);
    assert.equal(await bitmapCount(env, 'drive0', 'bitmap0'), mode === 'never' ? 983040 : 0);
    await qmp.execute('block-dirty-bitmap-remove', { node: 'drive0', name: 'bitmap0' });
    assert.deepEqual(await bitmaps(env, 'drive0'), {});
    await flush(env, 'drive0');

    // ---- verification
    const c1 = await compare(bsync1, fmirror1);
    assert.equal(c1.identical, failure !== 'intermediate', `bsync1 vs fmirror1: ${c1.out}`);
    assert.equal((await compare(bsync2, fmirror2)).identical, false);
    await assertIdentical(bsync3, fmirror3);
    await assertIdentical(img, fmirror3);
  } finally {
    await env.done();
  }
}

for (const mode of ['never', 'on-success', 'always'] as const) {
  for (const failure of ['simulated', 'intermediate', null] as const) {
    test(`mirror-bitmap: bitmap sync mode ${mode}, failure ${failure ?? 'none'}`, () => scenario(mode, failure));
  }
}

test('mirror-bitmap API checks (test_mirror_api) and the code-only messages', async () => {
  const env = await setup('mb-api');
  try {
    const { qmp } = env.d;
    await addQcow2(env, 'drive0', await qcow2(env.f('img.qcow2')));
    await makeTarget(env, 'mirror_target', env.f('t.qcow2'));
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: GRAN });
    const base = { 'job-id': 'api_job', device: 'drive0', target: 'mirror_target', 'copy-mode': 'write-blocking', 'filter-node-name': 'mirror-top' };
    const err = async (args: Record<string, unknown>) => (await qmpError(env, 'blockdev-mirror', { ...base, ...args })).desc;
    assert.equal(await err({ sync: 'full', bitmap: 'bitmap404' }), "Dirty bitmap 'bitmap404' not found");
    for (const sync of ['top', 'none']) {
      for (const bitmap of ['bitmap404', 'bitmap0']) assert.equal(await err({ sync, bitmap }), `Sync mode '${sync}' not supported with bitmap.`);
    }
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap-small', granularity: 65536 });
    assert.equal(
      await err({ sync: 'full', bitmap: 'bitmap-small' }),
      "Bitmap granularity 65536 is not a multiple of the target image's cluster size 131072 and the target image has no backing file",
    );
    // Code-only messages (§1.4).
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'b128', granularity: CLUSTER });
    assert.equal(await err({ sync: 'full', bitmap: 'b128', granularity: CLUSTER }), 'Granularity and bitmap cannot both be set');
    await qmp.execute('block-dirty-bitmap-disable', { node: 'drive0', name: 'b128' });
    assert.equal(await err({ sync: 'full', bitmap: 'b128' }), "Bitmap 'b128' is not enabled");
    await qmp.execute('block-dirty-bitmap-enable', { node: 'drive0', name: 'b128' });
    // Busy: a running job holds it.
    await io(env, 'drive0', 'write -P 1 0 4M');
    await makeTarget(env, 't2', env.f('t2.qcow2'));
    await qmp.execute('blockdev-mirror', { ...base, 'job-id': 'holder', target: 't2', sync: 'full', bitmap: 'b128', speed: 1 });
    const busy = (await bitmaps(env, 'drive0')).b128;
    assert.equal(busy.busy, true);
    assert.equal(busy.recording, false);
    assert.equal(
      (await qmpError(env, 'block-dirty-bitmap-clear', { node: 'drive0', name: 'b128' })).desc,
      "Bitmap 'b128' is currently in use by another operation and cannot be used",
    );
    await qmp.execute('job-cancel', { id: 'holder' });
    await qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'holder' });
    const after = (await bitmaps(env, 'drive0')).b128;
    assert.equal(after.busy, false);
    assert.equal(after.recording, true);
    assert.ok((after.count as number) > 0 && (after.count as number) <= 4 * MiB);
  } finally {
    await env.done();
  }
});

test('Proxmox sync=bitmap/incremental: argument checks and bitmap-mode semantics', async () => {
  const env = await setup('mb-pve');
  try {
    const { qmp } = env.d;
    const img = await qcow2(env.f('img.qcow2'));
    await addQcow2(env, 'drive0', img);
    await writeGroup(env, 'drive0', G0);
    await makeTarget(env, 't', env.f('t.qcow2'));
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: GRAN });
    const base = { 'job-id': 'j', device: 'drive0', target: 't' };
    const err = async (args: Record<string, unknown>) => (await qmpError(env, 'blockdev-mirror', { ...base, ...args })).desc;
    assert.equal(await err({ sync: 'bitmap' }), "Must provide a valid bitmap name for 'bitmap' sync mode");
    assert.equal(await err({ sync: 'incremental' }), "Must provide a valid bitmap name for 'incremental' sync mode");
    assert.equal(await err({ sync: 'incremental', bitmap: 'bitmap0', 'bitmap-mode': 'always' }), "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    assert.equal(await err({ sync: 'bitmap', bitmap: 'bitmap0', granularity: GRAN }), 'Granularity and bitmap cannot both be set');
    assert.equal(await err({ sync: 'bitmap', bitmap: 'bitmap0' }), 'bitmap-mode must be specified if a bitmap is provided');
    assert.equal(await err({ sync: 'bitmap', bitmap: 'bitmap404', 'bitmap-mode': 'always' }), "Dirty bitmap 'bitmap404' not found");
    assert.equal(await err({ sync: 'full', 'bitmap-mode': 'always' }), 'Cannot specify bitmap sync mode without a bitmap');
    assert.equal(await err({ sync: 'full', bitmap: 'bitmap0', 'bitmap-mode': 'always' }), "Sync mode 'full' not supported with bitmap.");
    await qmp.execute('blockdev-del', { 'node-name': 't' });

    // Semantics: the job copies the bitmap's chunks (len = its count); the caller's bitmap is busy and
    // keeps recording; at the end never leaves it, on-success/always replace it by what is left (0).
    let prev = env.f('full.qcow2');
    await makeTarget(env, 'full', prev);
    await qmp.execute('blockdev-mirror', { 'job-id': 'full', device: 'drive0', target: 'full', sync: 'full' });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'full' });
    await qmp.execute('block-job-cancel', { device: 'full' });
    await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'full' });
    await qmp.execute('blockdev-del', { 'node-name': 'full' });
    await qmp.execute('block-dirty-bitmap-clear', { node: 'drive0', name: 'bitmap0' });
    let n = 0;
    for (const [sync, mode, want] of [
      ['bitmap', 'never', 393216],
      ['bitmap', 'always', 0],
      ['incremental', undefined, 0],
      ['bitmap', 'on-success', 0],
    ] as const) {
      n++;
      await writeGroup(env, 'drive0', G1);
      const before = await bitmapCount(env, 'drive0', 'bitmap0');
      const file = env.f(`inc${n}.qcow2`);
      await makeTarget(env, `inc${n}`, file, prev);
      drain(env);
      await qmp.execute('blockdev-mirror', { 'job-id': `inc${n}`, device: 'drive0', target: `inc${n}`, sync, bitmap: 'bitmap0', ...(mode ? { 'bitmap-mode': mode } : {}), 'filter-node-name': 'mirror-top' });
      const b = (await bitmaps(env, 'drive0')).bitmap0;
      assert.equal(b.busy, true);
      const ready = await qmp.waitEvent('BLOCK_JOB_READY', { device: `inc${n}` });
      assert.equal(ready.data!.len, before);
      await qmp.execute('block-job-cancel', { device: `inc${n}` });
      await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: `inc${n}` });
      await qmp.execute('blockdev-del', { 'node-name': `inc${n}` });
      const after = await bitmapCount(env, 'drive0', 'bitmap0');
      assert.equal(after, want === 0 ? 0 : before, `${sync} ${mode}`);
      assert.equal((await bitmaps(env, 'drive0')).bitmap0.busy, false);
      await flush(env, 'drive0');
      await assertIdentical(img, file);
      // 'never' leaves the bitmap as it was: the next step copies those chunks again, harmlessly.
      prev = file;
    }
  } finally {
    await env.done();
  }
});

test('partial-cluster fill: no-backing target, 128K clusters, 64K bitmap, allow-coarse-target', async () => {
  const env = await setup('mb-fill');
  try {
    const { qmp } = env.d;
    const img = await qcow2(env.f('img.qcow2'));
    await addQcow2(env, 'drive0', img);
    await io(env, 'drive0', 'write -P 0x11 0 4M');
    await io(env, 'drive0', 'write -P 0x12 32M 1M');
    const full = await refCopy(env, 0);
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: GRAN });
    await writeGroup(env, 'drive0', G1);
    const diff = env.f('diff.qcow2');
    await makeTarget(env, 'diff', diff);
    await qmp.execute('blockdev-mirror', {
      'job-id': 'j',
      device: 'drive0',
      target: 'diff',
      sync: 'full',
      bitmap: 'bitmap0',
      '__org.bitmirror_allow-coarse-target': true,
      'copy-mode': 'write-blocking',
      'filter-node-name': 'mirror-top',
    });
    // A write after the job started (synchronous, unaligned to the 128K clusters) is widened too.
    await io(env, 'mirror-top', 'write -P 0x13 40M 64k');
    await io(env, 'drive0', 'write -P 0x14 3M 4k');
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    await qmp.execute('block-job-cancel', { device: 'j' });
    await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    await qmp.execute('blockdev-del', { 'node-name': 'diff' });
    await flush(env, 'drive0');
    // Every cluster the diff holds holds the source's full data: on top of the full copy it is the source.
    await mustRun('qemu-img', ['rebase', '-u', '-b', full, '-F', 'qcow2', diff]);
    await assertIdentical(img, diff);
    // And it holds only the touched clusters (a diff, not a full copy).
    const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', diff])) as Array<{ start: number; length: number; depth: number; data: boolean }>;
    const own = map.filter((m) => m.depth === 0 && m.data).reduce((s, m) => s + m.length, 0);
    assert.ok(own > 0 && own <= 8 * CLUSTER, `diff holds ${own} bytes`);
  } finally {
    await env.done();
  }
});

test('incremental chain: full mirror, then three bitmap mirrors onto targets backed by the previous one', async () => {
  const env = await setup('mb-chain');
  try {
    const { qmp } = env.d;
    const img = await qcow2(env.f('img.qcow2'));
    await addQcow2(env, 'drive0', img);
    await io(env, 'drive0', 'write -P 0x01 0 3M');
    await io(env, 'drive0', 'write -P 0x02 50M 200k');
    let prev = await refCopy(env, 0);
    await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: GRAN });
    const rounds: string[][] = [
      ['write -P 0x21 100k 5000', 'write -z 1M 64k', 'write -P 0x22 63M 1M'],
      ['discard 2M 128k', 'write -P 0x23 10M 3', 'write -P 0x24 50M 64k'],
      ['write -P 0x25 0 512', 'write -P 0x26 33M 300k', 'write -z 10M 1M'],
    ];
    for (let i = 0; i < rounds.length; i++) {
      for (const w of rounds[i]) await io(env, 'drive0', w);
      const count = await bitmapCount(env, 'drive0', 'bitmap0');
      await qmp.execute('block-dirty-bitmap-add', { node: 'drive0', name: 'mirror-bitmap', granularity: GRAN });
      await qmp.execute('block-dirty-bitmap-merge', { node: 'drive0', target: 'mirror-bitmap', bitmaps: ['bitmap0'] });
      await qmp.execute('block-dirty-bitmap-clear', { node: 'drive0', name: 'bitmap0' });
      const file = env.f(`inc${i}.qcow2`);
      await makeTarget(env, `inc${i}`, file, prev);
      await qmp.execute('blockdev-mirror', { 'job-id': `inc${i}`, device: 'drive0', target: `inc${i}`, sync: 'full', bitmap: 'mirror-bitmap' });
      const ready = await qmp.waitEvent('BLOCK_JOB_READY', { device: `inc${i}` });
      assert.equal(ready.data!.len, count);
      await qmp.execute('block-job-cancel', { device: `inc${i}` });
      await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: `inc${i}` });
      assert.equal(await bitmapCount(env, 'drive0', 'mirror-bitmap'), 0);
      await qmp.execute('block-dirty-bitmap-remove', { node: 'drive0', name: 'mirror-bitmap' });
      await qmp.execute('blockdev-del', { 'node-name': `inc${i}` });
      await flush(env, 'drive0');
      await assertIdentical(img, file);
      prev = file;
    }
    assert.equal(await bitmapCount(env, 'drive0', 'bitmap0'), 0);
  } finally {
    await env.done();
  }
});
