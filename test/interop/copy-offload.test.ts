/**
 * Copy offload in the copy engine: a mirror between host files lets the kernel copy the data
 * (copy_file_range) through qcow2 host clusters (backing chain included), raw and the mirror's filter;
 * with `__org.bitmirror_copy-offload: false`, or when the kernel refuses (EXDEV between two file
 * systems), every byte is read and written instead. Every case ends in qemu-img compare and check.
 * Which path was taken is seen in the block_copy_offload* trace points, read up to the
 * mirror_before_flush line that follows every copy of the job.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp, statfsSync, existsSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { setup, addQcow2, assertIdentical, poll, type Env } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';
import { nativeAddon } from '../../src/block/native.js';

const MiB = 1 << 20;

/** Mirror `src` onto `tgt` to READY, soft-cancel (a full copy, no pivot), drop the target; the trace lines of that job. */
async function mirror(env: Env, job: string, extra: Record<string, unknown> = {}): Promise<string[]> {
  const { qmp } = env.d;
  const before = env.d.stderr().length;
  await qmp.execute('blockdev-mirror', { 'job-id': job, device: 'src', target: 'tgt', sync: 'full', ...extra });
  await qmp.waitEvent('BLOCK_JOB_READY', { device: job });
  await qmp.execute('block-job-cancel', { device: job });
  await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: job });
  await qmp.execute('blockdev-del', { 'node-name': 'tgt' });
  // Trace output is a pipe of its own: wait for the line that comes after every copy of this job.
  const lines = () => env.d.stderr().slice(before).split('\n');
  await poll('mirror_before_flush in the trace', async () => lines().some((l) => l.includes('mirror_before_flush')));
  return lines();
}

async function traced(env: Env): Promise<void> {
  for (const name of ['block_copy_offload*', 'mirror_before_flush']) await env.d.qmp.execute('trace-event-set-state', { name, enable: true });
}

const offloads = (lines: string[]) => lines.filter((l) => /:block_copy_offload /.test(l));
const refusals = (lines: string[]) => lines.filter((l) => /:block_copy_offload_fail /.test(l));

/** A qcow2 over a qcow2 backing file: backing data, overlay data over part of it, a zero cluster, data in a hole. */
async function chainedSource(dir: string): Promise<string> {
  const base = path.join(dir, 'base.qcow2');
  const src = path.join(dir, 'src.qcow2');
  await mustRun('qemu-img', ['create', '-f', 'qcow2', base, '64M']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 12M', '-c', 'write -P 0x12 40M 3M', base]);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', src]);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x21 4M 2M', '-c', 'write -z 1M 256k', '-c', 'write -P 0x22 20M 100k', '-c', 'write -P 0x23 63M 1M', src]);
  return src;
}

/** A traced daemon with the chained source (made in `dir`, default the daemon's) as `src` and a new qcow2 `tgt`. */
async function start(prefix: string, dir?: string): Promise<{ env: Env; src: string; tq: string }> {
  const env = await setup(prefix);
  await traced(env);
  const src = await chainedSource(dir ?? env.dir);
  await addQcow2(env, 'src', src);
  const tq = env.f('tgt.qcow2');
  await mustRun('qemu-img', ['create', '-f', 'qcow2', tq, '64M']);
  await addQcow2(env, 'tgt', tq);
  return { env, src, tq };
}

async function assertClean(file: string): Promise<void> {
  const out = await mustRun('qemu-img', ['check', '-U', file]);
  assert.match(out, /No errors were found/);
}

test('copy offload: qcow2 (with a backing chain) to qcow2, raw to raw, qcow2 to raw: the kernel copies, the data is equal', async () => {
  assert.ok(nativeAddon()?.copyFileRange, 'the native addon has copyFileRange (after an update: npm run build:native)');
  const { env, src, tq } = await start('offload');
  try {
    // qcow2 -> qcow2
    let lines = await mirror(env, 'q2q');
    assert.ok(offloads(lines).length > 0, 'block_copy_offload in the trace');
    assert.deepEqual(refusals(lines), []);
    await assertIdentical(src, tq);
    await assertClean(tq);
    // qcow2 -> raw
    const tr = env.f('tgt.raw');
    await mustRun('qemu-img', ['create', '-f', 'raw', tr, '64M']);
    await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'tgt', file: { driver: 'file', filename: tr } });
    lines = await mirror(env, 'q2r');
    assert.ok(offloads(lines).length > 0);
    assert.deepEqual(refusals(lines), []);
    await assertIdentical(src, tr, ['-F', 'raw']);
    // raw -> raw (through raw's offset window on the target side too)
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'src' });
    const sr = env.f('src.raw');
    await mustRun('qemu-img', ['convert', '-O', 'raw', src, sr]);
    await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'src', file: { driver: 'file', filename: sr } });
    const tr2 = env.f('tgt2.raw');
    await mustRun('qemu-img', ['create', '-f', 'raw', tr2, String(65 * MiB)]);
    await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'tgt', offset: MiB, file: { driver: 'file', filename: tr2 } });
    lines = await mirror(env, 'r2r');
    assert.ok(offloads(lines).length > 0);
    await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', sr, `json:${JSON.stringify({ driver: 'raw', offset: MiB, file: { driver: 'file', filename: tr2 } })}`]);
  } finally {
    await env.done();
  }
});

test('copy offload off (__org.bitmirror_copy-offload: false): every byte read and written, the data is equal', async () => {
  const { env, src, tq } = await start('offload-off');
  try {
    const lines = await mirror(env, 'off', { '__org.bitmirror_copy-offload': false });
    assert.deepEqual(offloads(lines), []);
    assert.deepEqual(refusals(lines), []);
    await assertIdentical(src, tq);
    await assertClean(tq);
  } finally {
    await env.done();
  }
});

// Two file systems: the kernel refuses copy_file_range between them (EXDEV), the engine falls back.
const otherFs = '/dev/shm';
const twoFileSystems = existsSync(otherFs) && statfsSync(otherFs).type !== statfsSync(os.tmpdir()).type;

test('copy offload refused by the kernel (EXDEV between two file systems): falls back to read and write, the data is equal', { skip: !twoFileSystems && `${otherFs} and ${os.tmpdir()} are one file system type` }, async () => {
  const shm = await fsp.mkdtemp(path.join(otherFs, 'bm-offload-'));
  const { env, src, tq } = await start('offload-exdev', shm);
  try {
    const lines = await mirror(env, 'exdev');
    assert.deepEqual(offloads(lines), []);
    assert.ok(refusals(lines).length > 0, 'block_copy_offload_fail in the trace');
    for (const l of refusals(lines)) assert.match(l, /error=EXDEV/);
    await assertIdentical(src, tq);
    await assertClean(tq);
  } finally {
    await env.done();
    await fsp.rm(shm, { recursive: true, force: true });
  }
});
