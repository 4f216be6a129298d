/**
 * Pausing a mirror, the same QMP script against qemu-storage-daemon 7.2 and bitmirror: a paused job
 * copies nothing until it is resumed (offset and len stand still), the job's events are QEMU's, and
 * `len` of a source nobody writes to does not move before READY. Many runs, because the defect was a
 * race: block-job-pause right after the job started, and a pause while copies were in flight.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, haveQsd, summarise, eventsUntil, type Env } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

type Program = 'bitmirror' | 'qemu-storage-daemon';
type JobInfo = { offset: number; len: number; busy: boolean; paused: boolean };

async function jobInfo(env: Env): Promise<JobInfo> {
  const jobs = await env.d.qmp.execute<JobInfo[]>('query-block-jobs');
  assert.equal(jobs.length, 1);
  return jobs[0];
}

/** After the job reports 'paused': many monitor round trips later its progress is the same. */
async function standsStill(env: Env, what: string): Promise<void> {
  const before = await jobInfo(env);
  assert.equal(before.paused, true, what);
  for (let i = 0; i < 30; i++) await env.d.qmp.execute('query-version');
  const after = await jobInfo(env);
  assert.deepEqual([after.offset, after.len, after.busy], [before.offset, before.len, false], `${what}: a paused job copies nothing`);
}

/** A qcow2 of `size` over a raw backing file full of data, with a cluster of its own. */
async function sourceOverRaw(env: Env, name: string, size: string): Promise<string> {
  const base = env.f(`${name}.raw`);
  const src = env.f(`${name}.qcow2`);
  await mustRun('qemu-img', ['create', '-f', 'raw', base, size]);
  await mustRun('qemu-io', ['-f', 'raw', '-c', `write -P 0x11 0 ${size}`, base]);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'raw', src]);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 64k 64k', src]);
  return src;
}

async function addTarget(env: Env, node: string, size: string): Promise<void> {
  const file = env.f(`${node}.qcow2`);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', file, size]);
  await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename: file } });
}

/**
 * The job's events until the pause took effect: 'paused', or 'standby' when the job had reached READY
 * before the pause came (a race QEMU has too: its first iteration may copy the whole small image).
 */
async function untilPaused(env: Env, id: string): Promise<string[]> {
  const seen: string[] = [];
  for (;;) {
    const ev = await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id });
    seen.push(String(ev.data?.status));
    if (ev.data?.status === 'paused' || ev.data?.status === 'standby') return seen;
  }
}

/** The two event sequences QEMU gives for a pause at start: paused before READY, or standby after it. */
const PAUSE_SEQUENCES = [
  ['created', 'running', 'paused', 'running', 'ready'],
  ['created', 'running', 'ready', 'standby', 'ready'],
];

async function finish(env: Env, id: string, target: string): Promise<void> {
  await env.d.qmp.execute('block-job-cancel', { device: id });
  await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id, status: 'null' });
  await env.d.qmp.execute('blockdev-del', { 'node-name': target });
}

/** block-job-pause sent right behind blockdev-mirror (pipelined), 1025 KiB qcow2 over raw, `runs` times. */
async function pauseAtStart(program: Program, runs: number): Promise<unknown[]> {
  const env = await setup(`mp-start-${program}`, program);
  const out: unknown[] = [];
  try {
    const { qmp } = env.d;
    const src = await sourceOverRaw(env, 'src', '1025K');
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    for (let i = 0; i < runs; i++) {
      const id = `j${i}`;
      await addTarget(env, `t${i}`, '1025K');
      qmp.events.splice(0);
      const replies = await Promise.all([qmp.request('blockdev-mirror', { 'job-id': id, device: 'src', target: `t${i}`, sync: 'full' }), qmp.request('block-job-pause', { device: id })]);
      assert.deepEqual(replies.map((r) => r.return), [{}, {}]);
      const statuses = await untilPaused(env, id);
      await standsStill(env, `run ${i}`);
      await qmp.execute('block-job-resume', { device: id });
      statuses.push(...summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id, status: 'ready' })));
      assert.ok(PAUSE_SEQUENCES.some((seq) => JSON.stringify(seq) === JSON.stringify(statuses)), `run ${i}: ${statuses.join(' ')}`);
      const info = await jobInfo(env);
      out.push([info.offset, info.len]);
      await finish(env, id, `t${i}`);
    }
  } finally {
    await env.done();
  }
  return out;
}

/** A pause while copies are in flight (64 MiB): it takes effect once they end; len stays the size. */
async function pauseMidCopy(program: Program, runs: number): Promise<unknown[]> {
  const env = await setup(`mp-mid-${program}`, program);
  const out: unknown[] = [];
  try {
    const { qmp } = env.d;
    const src = await sourceOverRaw(env, 'src', '64M');
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    for (let i = 0; i < runs; i++) {
      const id = `j${i}`;
      await addTarget(env, `t${i}`, '64M');
      qmp.events.splice(0);
      await qmp.execute('blockdev-mirror', { 'job-id': id, device: 'src', target: `t${i}`, sync: 'full' });
      const lens = new Set<number>();
      let info = await jobInfo(env);
      while (info.offset === 0) {
        if (info.len) lens.add(info.len);
        info = await jobInfo(env);
      }
      lens.add(info.len);
      await qmp.execute('block-job-pause', { device: id });
      await untilPaused(env, id);
      await standsStill(env, `run ${i}`);
      lens.add((await jobInfo(env)).len);
      await qmp.execute('block-job-resume', { device: id });
      while (!(await qmp.execute<Array<{ ready: boolean }>>('query-block-jobs'))[0].ready) lens.add((await jobInfo(env)).len);
      const ready = await jobInfo(env);
      out.push([[...lens], ready.offset, ready.len]);
      await finish(env, id, `t${i}`);
    }
  } finally {
    await env.done();
  }
  return out;
}

const skip = !haveQsd && 'qemu-storage-daemon not installed';

test('block-job-pause right after blockdev-mirror: paused copies nothing, events as qemu-storage-daemon 7.2 (10 runs)', { skip }, async () => {
  const theirs = await pauseAtStart('qemu-storage-daemon', 10);
  const ours = await pauseAtStart('bitmirror', 10);
  assert.deepEqual(ours, theirs);
  for (const run of ours) assert.deepEqual(run, [1025 * 1024, 1025 * 1024]);
});

test('block-job-pause while copies are in flight: they end, then nothing moves until resumed; len is the size throughout (3 runs)', { skip }, async () => {
  const theirs = await pauseMidCopy('qemu-storage-daemon', 3);
  const ours = await pauseMidCopy('bitmirror', 3);
  assert.deepEqual(ours, theirs);
  for (const run of ours) assert.deepEqual(run, [[64 << 20], 64 << 20, 64 << 20]);
});
