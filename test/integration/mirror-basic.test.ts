/**
 * The mirror job against a real daemon, in the style of QEMU's iotests 041, 218 and 219: writes in every
 * phase (before the job, while converging, after READY), complete with pivot, cancel in each phase,
 * pause/resume, set-speed, auto-finalize/auto-dismiss sequences, and start-time refusals. Every test
 * ends with qemu-img compare where the images must be equal.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import {
  KiB,
  MiB,
  SIZE,
  io,
  assertIdentical,
  compare,
  flush,
  query,
  eventsUntil,
  summarise,
  drain,
  qmpError,
  newTarget,
  poll,
  bitmaps,
  type Env,
  withSourceAndTarget,
} from '../support/daemon.js';

async function blockFile(env: Env, node: string): Promise<string | undefined> {
  const nodes = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
  return nodes.map((n) => n['node-name']).find((n) => n === node) as string | undefined;
}

test('full mirror with writes before, while converging and after READY; complete pivots', async () => {
  await withSourceAndTarget('m-complete', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x11 0 1M');
    await io(env, 'src', 'write -P 0x12 30M 64k');
    await io(env, 'src', 'write -z 40M 1M');
    await io(env, 'src', 'write -P 0x13 63M 1M');
    // A speed limit holds the job in 'running' so that writes land while it converges.
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 512 * KiB, 'filter-node-name': 'top' });
    await poll('progress', async () => ((await query(env, 'j'))?.offset as number) > 0);
    const before = await query(env, 'j');
    assert.equal(before?.status, 'running');
    assert.equal(before?.ready, false);
    // Converging: through the filter, directly on the source, unaligned, zeroes, discard.
    await io(env, 'top', 'write -P 0x21 0 4k');
    await io(env, 'src', 'write -P 0x22 1000 3000');
    await io(env, 'top', 'write -P 0x23 20M 200k');
    await io(env, 'src', 'write -z 63M 4k');
    await io(env, 'src', 'discard 30M 64k');
    const mid = await query(env, 'j');
    assert.ok((mid?.len as number) > (mid?.offset as number));
    await qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    const ready = await query(env, 'j');
    assert.equal(ready?.ready, true);
    assert.equal(ready?.offset, ready?.len);
    // After READY (background mode): tracked and copied.
    await io(env, 'top', 'write -P 0x31 5M 128k');
    await io(env, 'src', 'write -P 0x32 6M 512');
    await qmp.execute('job-complete', { id: 'j' });
    const ev = await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    assert.equal(ev.data?.error, undefined);
    assert.equal(ev.data?.offset, ev.data?.len);
    // Pivot: the filter is gone and the source node is no longer in use by the job.
    assert.equal(await blockFile(env, 'top'), undefined);
    assert.deepEqual(await qmp.execute('query-block-jobs'), []);
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});

test('cancel before READY (soft and force) gives BLOCK_JOB_CANCELLED and leaves the source in place', async () => {
  for (const force of [false, true]) {
    await withSourceAndTarget('m-cancel0', async (env, src, tgt) => {
      const { qmp } = env.d;
      await io(env, 'src', 'write -P 0x11 0 4M');
      await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 64 * KiB, 'buf-size': 64 * KiB });
      await poll('progress', async () => ((await query(env, 'j'))?.offset as number) > 0);
      await qmp.execute('block-job-cancel', { device: 'j', ...(force ? { force } : {}) });
      const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
      const names = summarise(evs);
      assert.deepEqual(names, ['created', 'running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
      const c = evs.find((e) => e.event === 'BLOCK_JOB_CANCELLED')!;
      assert.ok((c.data!.offset as number) < (c.data!.len as number));
      assert.equal(c.data!.speed, 64 * KiB);
      // The source is still the node, writable, and the filter is gone.
      await io(env, 'src', 'write -P 0x44 0 4k');
      await flush(env, 'src', 'tgt');
      assert.equal((await compare(src, tgt)).identical, false);
    });
  }
});

test('soft cancel after READY completes without pivot and leaves a consistent target', async () => {
  await withSourceAndTarget('m-cancel1', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x11 0 2M');
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'filter-node-name': 'top' });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    await io(env, 'top', 'write -P 0x22 1M 64k');
    await io(env, 'src', 'write -P 0x23 3M 4k');
    drain(env);
    await qmp.execute('block-job-cancel', { device: 'j' });
    const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
    assert.deepEqual(summarise(evs), ['waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
    const done = evs.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!;
    assert.equal(done.data!.error, undefined);
    // No pivot: the source node is still there and usable; the target equals it.
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
    await io(env, 'src', 'write -P 0x55 0 4k');
    await flush(env, 'src', 'tgt');
      assert.equal((await compare(src, tgt)).identical, false);
  });
});

test('force cancel after READY (block-job-cancel force, job-cancel) gives BLOCK_JOB_CANCELLED', async () => {
  for (const how of ['block-job-cancel', 'job-cancel']) {
    await withSourceAndTarget('m-cancel2', async (env) => {
      const { qmp } = env.d;
      await io(env, 'src', 'write -P 0x11 0 1M');
      await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full' });
      await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
      drain(env);
      if (how === 'job-cancel') await qmp.execute('job-cancel', { id: 'j' });
      else await qmp.execute('block-job-cancel', { device: 'j', force: true });
      const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
      assert.deepEqual(summarise(evs), ['aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null'], how);
    });
  }
});

test('pause and resume in running (paused) and ready (standby); offset frozen while paused', async () => {
  await withSourceAndTarget('m-pause', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x11 0 8M');
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 1 * MiB, 'buf-size': 64 * KiB });
    await poll('progress', async () => ((await query(env, 'j'))?.offset as number) > 0);
    await qmp.execute('block-job-pause', { device: 'j' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'paused' });
    const e1 = await qmpError(env, 'block-job-pause', { device: 'j' });
    assert.equal(e1.desc, 'Job is already paused');
    const e2 = await qmpError(env, 'block-job-cancel', { device: 'j' });
    assert.equal(e2.desc, "The block job for device 'j' is currently paused");
    const a = (await query(env, 'j'))!;
    assert.equal(a.paused, true);
    await new Promise((r) => setTimeout(r, 300));
    const b = (await query(env, 'j'))!;
    assert.equal(b.offset, a.offset);
    await io(env, 'src', 'write -P 0x77 7M 64k');
    await qmp.execute('job-resume', { id: 'j' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'running' });
    await qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    await qmp.execute('job-pause', { id: 'j' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'standby' });
    await io(env, 'src', 'write -P 0x78 2M 64k');
    const e3 = await qmpError(env, 'job-resume', { id: 'nope' });
    assert.equal(e3.desc, 'Job not found');
    await qmp.execute('block-job-resume', { device: 'j' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'ready' });
    const e4 = await qmpError(env, 'block-job-resume', { device: 'j' });
    assert.equal(e4.desc, "Can't resume a job that was not paused");
    await qmp.execute('block-job-complete', { device: 'j' });
    await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});

test('auto-finalize=false, auto-dismiss=false: full event sequence, verb refusals, finalize and dismiss', async () => {
  await withSourceAndTarget('m-219', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x11 0 4M');
    await qmp.execute('blockdev-mirror', { 'job-id': 'job0', device: 'src', target: 'tgt', sync: 'full', speed: 1 * MiB, 'auto-finalize': false, 'auto-dismiss': false });
    await qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'job0', status: 'running' });
    for (const verb of ['complete', 'finalize', 'dismiss']) {
      const e = await qmpError(env, `job-${verb}`, { id: 'job0' });
      assert.equal(e.desc, `Job 'job0' in state 'running' cannot accept command verb '${verb}'`);
    }
    await qmp.execute('block-job-set-speed', { device: 'job0', speed: 0 });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'job0' });
    for (const verb of ['finalize', 'dismiss']) {
      const e = await qmpError(env, `job-${verb}`, { id: 'job0' });
      assert.equal(e.desc, `Job 'job0' in state 'ready' cannot accept command verb '${verb}'`);
    }
    drain(env);
    await qmp.execute('job-complete', { id: 'job0' });
    let evs = await eventsUntil(env, 'BLOCK_JOB_PENDING', { id: 'job0' });
    assert.deepEqual(summarise(evs), ['waiting', 'pending', 'BLOCK_JOB_PENDING']);
    const jobs = await qmp.execute<Array<Record<string, unknown>>>('query-jobs');
    assert.equal(jobs[0].status, 'pending');
    // Not pivoted yet: the target is held by the job but equal.
    await qmp.execute('job-finalize', { id: 'job0' });
    evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'job0', status: 'concluded' });
    assert.deepEqual(summarise(evs), ['BLOCK_JOB_COMPLETED', 'concluded']);
    const q = await qmp.execute<Array<Record<string, unknown>>>('query-jobs');
    assert.equal(q[0].status, 'concluded');
    assert.equal(q[0].error, undefined);
    await qmp.execute('job-dismiss', { id: 'job0' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'job0', status: 'null' });
    assert.deepEqual(await qmp.execute('query-jobs'), []);
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});

test('job-cancel in PENDING aborts: BLOCK_JOB_CANCELLED and no pivot', async () => {
  await withSourceAndTarget('m-pend', async (env) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x11 0 1M');
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'auto-finalize': false, 'filter-node-name': 'top' });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    await qmp.execute('job-complete', { id: 'j' });
    await qmp.waitEvent('BLOCK_JOB_PENDING', { id: 'j' });
    drain(env);
    await qmp.execute('job-cancel', { id: 'j' });
    const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
    assert.deepEqual(summarise(evs), ['aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
    // The source is unchanged in the graph: it can be mirrored again.
    assert.equal(await blockFile(env, 'top'), undefined);
    assert.deepEqual(Object.keys(await bitmaps(env, 'src')), []);
    await qmp.execute('blockdev-mirror', { 'job-id': 'j2', device: 'src', target: 'tgt', sync: 'full' });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j2' });
    await qmp.execute('job-cancel', { id: 'j2' });
    await qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'j2' });
  });
});

test('start-time refusals with QEMU messages', async () => {
  await withSourceAndTarget('m-refuse', async (env) => {
    const { qmp } = env.d;
    await newTarget(env, 'small', env.f('small.qcow2'), SIZE / 2);
    const base = { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full' };
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ ...base, device: 'nope' }, "Cannot find device='nope' nor node-name='nope'"],
      [{ ...base, target: 'nope' }, "Cannot find device='nope' nor node-name='nope'"],
      [{ ...base, target: 'src' }, "Can't mirror node into itself"],
      [{ ...base, speed: -1 }, "Parameter 'speed' expects a non-negative value"],
      [{ ...base, granularity: 100 }, "Parameter 'granularity' expects a value in range [512B, 64MB]"],
      [{ ...base, granularity: 128 * MiB }, "Parameter 'granularity' expects a value in range [512B, 64MB]"],
      [{ ...base, granularity: 3 * 4096 }, "Parameter 'granularity' expects a power of 2"],
      [{ ...base, 'buf-size': -1 }, "Invalid parameter 'buf-size'"],
      [{ ...base, sync: 'incremental' }, "Must provide a valid bitmap name for 'incremental' sync mode"],
      [{ ...base, 'job-id': '1bad' }, "Invalid job ID '1bad'"],
      [{ ...base, replaces: 'nope' }, "Failed to find node with node-name='nope'"],
      [{ ...base, replaces: 'small' }, "Cannot replace 'small' by a node mirrored from 'src', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data"],
    ];
    for (const [args, msg] of cases) {
      const e = await qmpError(env, 'blockdev-mirror', args);
      assert.equal(e.desc, msg, JSON.stringify(args));
    }
    // Size mismatch: detected when the job runs.
    drain(env);
    await qmp.execute('blockdev-mirror', { ...base, target: 'small' });
    const ev = await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    assert.equal(ev.data?.error, 'Source and target image have different sizes');
    // Busy source and target, duplicate job id (the same checks are compared with QEMU in test/interop).
    await io(env, 'src', 'write -P 0x11 0 4M');
    await qmp.execute('blockdev-mirror', { ...base, speed: 1 });
    await newTarget(env, 'tgt2', env.f('tgt2.qcow2'));
    await newTarget(env, 'src2', env.f('src2.qcow2'));
    assert.equal((await qmpError(env, 'blockdev-mirror', { ...base, 'job-id': 'k', target: 'tgt2' })).desc, 'Need a root block node');
    assert.equal((await qmpError(env, 'blockdev-mirror', { ...base, device: 'src2', target: 'tgt2' })).desc, "Job ID 'j' already in use");
    assert.equal((await qmpError(env, 'blockdev-mirror', { ...base, 'job-id': 'k', device: 'src2' })).desc, "Node 'tgt' is busy: block device is in use by block job: mirror");
    assert.equal((await qmpError(env, 'block-job-complete', { device: 'j' })).desc, "Job 'j' in state 'running' cannot accept command verb 'complete'");
    const nf = await qmpError(env, 'block-job-cancel', { device: 'nope' });
    assert.deepEqual(nf, { class: 'DeviceNotActive', desc: "Block job 'nope' not found" });
    await qmp.execute('job-cancel', { id: 'j' });
    await qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'j' });
  });
});
