/**
 * block-commit in the style of iotests 040 (intermediate and active commit, refusals), 224 (the
 * overlay's backing file after a commit) and 258 (commit with writes): every scenario runs the same
 * QMP script against qemu-storage-daemon 7.2 and bitmirror and compares replies and events; the data
 * scenarios end with qemu-img compare against a reference image built by qemu-io from the same
 * writes, and qemu-img check.
 *
 * Small images (4 MiB, 64 KiB clusters). A job is kept running while the test writes by a speed of
 * 1 byte/s (it copies one piece, then waits for the limit), and let go with block-job-set-speed 0.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { haveQsd, setup, eventsUntil, summarise, io, flush, assertIdentical, type Env } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';
import type { QmpEvent } from '../../src/qmp/client.js';

const skip = !haveQsd && 'qemu-storage-daemon not installed';
const SIZE = '4M';

type Program = 'bitmirror' | 'qemu-storage-daemon';

function mask(v: unknown, dir: string): unknown {
  return JSON.parse(JSON.stringify(v ?? null).replaceAll(dir, 'DIR').replace(/#block\d+/g, '#block'));
}

/** A chain base <- mid <- top of qcow2 images, each with its own data (written by qemu-io first). */
async function chain(env: Env, opts: { midWritable?: boolean; baseDebug?: Record<string, unknown> } = {}): Promise<void> {
  const f = env.f;
  await mustRun('qemu-img', ['create', '-f', 'qcow2', f('base.qcow2'), SIZE]);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', f('base.qcow2'), '-F', 'qcow2', f('mid.qcow2')]);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', f('mid.qcow2'), '-F', 'qcow2', f('top.qcow2')]);
  for (const [img, cmds] of Object.entries(LAYER_WRITES)) {
    await mustRun('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), f(`${img}.qcow2`)]);
  }
  const { qmp } = env.d;
  const baseFile = { driver: 'file', filename: f('base.qcow2') };
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: opts.baseDebug ? { driver: 'blkdebug', image: baseFile, ...opts.baseDebug } : baseFile });
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', 'read-only': !opts.midWritable, backing: 'base', file: { driver: 'file', filename: f('mid.qcow2') } });
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: { driver: 'file', filename: f('top.qcow2') } });
}

/** What each layer holds before the daemon starts (later layers cover earlier ones). */
const LAYER_WRITES: Record<string, string[]> = {
  base: ['write -P 0x11 0 4M'],
  mid: ['write -P 0x22 0 1M', 'write -P 0x23 2M 512k', 'write -z 3M 64k'],
  top: ['write -P 0x33 512k 128k', 'write -P 0x34 3M 32k'],
};

/** A raw reference image with the chain's data as top shows it, then `more` writes applied in order. */
async function reference(env: Env, more: string[]): Promise<string> {
  const ref = env.f('ref.raw');
  await mustRun('qemu-img', ['create', '-f', 'raw', ref, SIZE]);
  const cmds = [...LAYER_WRITES.base, ...LAYER_WRITES.mid, ...LAYER_WRITES.top, ...more];
  await mustRun('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), ref]);
  return ref;
}

async function checkClean(file: string): Promise<void> {
  assert.match(await mustRun('qemu-img', ['check', '-U', file]), /No errors were found on the image/);
}

/** Image info as qemu-img reads the header: the backing file a later open follows. */
async function backingOf(file: string): Promise<string | undefined> {
  const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', file])) as { 'backing-filename'?: string };
  return info['backing-filename'];
}

/**
 * Without the paused/running pairs QEMU 7.2 emits while it drains the graph around a command (a
 * reopen, a failed job start): bitmirror drains nothing and emits none.
 */
function withoutDrainPairs(events: QmpEvent[]): QmpEvent[] {
  const out: QmpEvent[] = [];
  for (const e of events) {
    const last = out[out.length - 1];
    if (e.event === 'JOB_STATUS_CHANGE' && e.data?.status === 'running' && last?.event === 'JOB_STATUS_CHANGE' && last.data?.status === 'paused') {
      out.pop();
      continue;
    }
    out.push(e);
  }
  return out;
}

interface Run {
  replies: unknown[];
  events: unknown[];
}

/** Run `body` against one program, recording masked replies and summarised events. */
type Body = (env: Env, r: (cmd: string, args?: Record<string, unknown>) => Promise<unknown>, ev: (events: QmpEvent[]) => void, program: Program) => Promise<void>;

async function runWith(program: Program, body: Body, fields: string[]): Promise<Run> {
  const env = await setup(`commit-${program === 'bitmirror' ? 'bm' : 'qsd'}`, program);
  const out: Run = { replies: [], events: [] };
  try {
    const r = async (cmd: string, args?: Record<string, unknown>) => {
      const rep = await env.d.qmp.request(cmd, args);
      const v = 'error' in rep ? { error: rep.error } : rep.return;
      // (query-named-block-nodes differs in members outside this test's subject: the tests pick from it.)
      if (cmd !== 'query-named-block-nodes') out.replies.push([cmd, mask(v, env.dir)]);
      return 'error' in rep ? undefined : rep.return;
    };
    await body(env, r, (events) => out.events.push(summarise(withoutDrainPairs(events), fields)), program);
  } finally {
    await env.done();
  }
  return out;
}

async function same(body: Body, fields = ['error', 'len', 'offset', 'operation', 'action']): Promise<Run> {
  const theirs = await runWith('qemu-storage-daemon', body, fields);
  const ours = await runWith('bitmirror', body, fields);
  for (let i = 0; i < Math.max(theirs.replies.length, ours.replies.length); i++) assert.deepEqual(ours.replies[i], theirs.replies[i], `reply ${i}`);
  assert.deepEqual(ours.events, theirs.events);
  return ours;
}

test('block-commit refusals, as qemu-storage-daemon 7.2 words them', { skip }, async () => {
  await same(async (env, r) => {
    await chain(env);
    const C = (a: Record<string, unknown>) => r('block-commit', { 'job-id': 'j', device: 'top', ...a });
    await C({ device: 'nope' });
    await C({ device: 'mid' });
    await C({ 'top-node': 'top', 'base-node': 'top' });
    await C({ 'top-node': 'base' });
    await C({ 'top-node': 'nope' });
    await C({ 'base-node': 'nope' });
    await C({ top: 'x' });
    await C({ base: 'x' });
    await C({ base: 'x', 'base-node': 'base' });
    await C({ top: 'x', 'top-node': 'base' });
    await C({ 'top-node': 'mid', 'base-node': 'mid' });
    await C({ 'top-node': 'mid', 'base-node': 'top' });
    await C({ 'backing-file': 'x' });
    await C({ 'job-id': undefined, 'top-node': 'mid' });
    await C({ 'job-id': undefined });
    await C({ 'job-id': '1x', 'top-node': 'mid' });
    await C({ 'top-node': 'mid', speed: -1 });
    await C({ speed: -1 });
    await C({ 'top-node': 'mid', 'filter-node-name': 'base' });
    await C({ 'filter-node-name': 'mid' });
    await C({ 'filter-node-name': '#x' });
    // Nothing changed: the base is read-only again, no filter, no job.
    await r('query-jobs');
    const nodes = (await r('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    assert.deepEqual(
      nodes.filter((n) => !String(n['node-name']).startsWith('#')).map((n) => [n['node-name'], n.ro]),
      [
        ['top', false],
        ['mid', true],
        ['base', true],
      ],
    );
  });
});

test('intermediate commit (iotests 040/224): states, events, the chain after it, and writes below the filter', { skip }, async () => {
  let ref = '';
  await same(async (env, r, ev, program) => {
    await chain(env, { midWritable: true });
    ref = await reference(env, ['write -P 0x55 1536k 64k', 'write -P 0x44 64k 64k', 'write -P 0x66 1M 64k']);
    await r('block-commit', { 'job-id': 'j', device: 'top', 'top-node': 'mid', speed: 1, 'auto-dismiss': false, 'filter-node-name': 'ct' });
    ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'running' }));
    // A second commit, a deletion, a consistent reader of the committed layer: refused while it runs.
    await r('block-commit', { 'job-id': 'k', device: 'top', 'top-node': 'mid' });
    await r('blockdev-del', { 'node-name': 'mid' });
    await r('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: env.f('top.qcow2'), backing: 'base' }] });
    // Writes while it runs: through the overlay (above the filter), and into the committed layer
    // itself, behind the copy (64k) and ahead of it (1M), where top does not cover it.
    if (program === 'bitmirror') {
      await io(env, 'top', 'write -P 0x55 1536k 64k');
      await io(env, 'mid', 'write -P 0x44 64k 64k');
      await io(env, 'mid', 'write -P 0x66 1M 64k');
    }
    await r('block-job-set-speed', { device: 'j', speed: 0 });
    ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' }));
    await r('query-jobs');
    await r('blockdev-del', { 'node-name': 'mid' });
    await r('job-dismiss', { id: 'j' });
    await r('blockdev-del', { 'node-name': 'mid' });
    const nodes = (await r('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    assert.deepEqual(
      nodes.filter((n) => !String(n['node-name']).startsWith('#')).map((n) => [n['node-name'], n.ro, n.backing_file]),
      [
        ['top', false, env.f('base.qcow2')],
        ['base', true, undefined],
      ],
    );
    if (program === 'bitmirror') {
      await flush(env, 'top', 'base');
      // The header names the base: qemu-img follows it.
      assert.equal(await backingOf(env.f('top.qcow2')), env.f('base.qcow2'));
      await assertIdentical(env.f('top.qcow2'), ref);
      await checkClean(env.f('top.qcow2'));
      await checkClean(env.f('base.qcow2'));
    }
    // (Only bitmirror's script writes during the job: the progress numbers differ.)
  }, ['error']);
});

test('active commit (iotests 040): READY, writes through the filter, to the active layer itself and to a layer below it, pivot on job-complete', { skip }, async () => {
  let ref = '';
  await same(async (env, r, ev, program) => {
    await chain(env, { midWritable: true });
    // The last one goes into mid where top has no data: QEMU's mirror does not see it.
    const writes = ['write -P 0x77 0 64k', 'write -P 0x78 2M 128k', 'write -P 0x79 3M 64k', 'write -z 512k 64k', 'write -P 0x7a 1280k 64k'];
    ref = await reference(env, writes);
    await r('block-commit', { 'job-id': 'a', device: 'top', 'filter-node-name': 'ff', 'auto-dismiss': false });
    ev(await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'a' }));
    // Before the pivot: the base is writable, mid and top are claimed.
    await r('blockdev-del', { 'node-name': 'mid' });
    await r('block-commit', { 'job-id': 'b', device: 'ff' });
    if (program === 'bitmirror') {
      await io(env, 'ff', writes[0]);
      await io(env, 'top', writes[1]);
      await io(env, 'ff', writes[2]);
      await io(env, 'top', writes[3]);
      await io(env, 'mid', writes[4]);
    }
    await r('job-complete', { id: 'a' });
    ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'a', status: 'concluded' }));
    const nodes = (await r('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    assert.deepEqual(
      nodes.filter((n) => !String(n['node-name']).startsWith('#')).map((n) => [n['node-name'], n.ro]),
      [
        ['top', false],
        ['mid', false],
        ['base', false],
      ],
    );
    await r('job-dismiss', { id: 'a' });
    await r('blockdev-del', { 'node-name': 'top' });
    await r('blockdev-del', { 'node-name': 'mid' });
    if (program === 'bitmirror') {
      await flush(env, 'base');
      await assertIdentical(env.f('base.qcow2'), ref);
      await checkClean(env.f('base.qcow2'));
    }
  }, ['error']);
});

test('intermediate commit with auto-finalize=false: PENDING, job-cancel there leaves the chain as it was; job-finalize drops the layer', { skip }, async () => {
  await same(async (env, r, ev, program) => {
    await chain(env, { midWritable: true });
    const ref = await reference(env, ['write -P 0x5c 1280k 64k']);
    for (const how of ['cancel', 'finalize'] as const) {
      await r('block-commit', { 'job-id': 'p', device: 'top', 'top-node': 'mid', 'auto-finalize': false });
      ev(await eventsUntil(env, 'BLOCK_JOB_PENDING', { id: 'p' }));
      await r('blockdev-del', { 'node-name': 'mid' });
      // A write into the committed layer while the job waits in PENDING (bitmirror copies it before it completes).
      if (program === 'bitmirror' && how === 'finalize') await io(env, 'mid', 'write -P 0x5c 1280k 64k');
      await r(how === 'cancel' ? 'job-cancel' : 'job-finalize', { id: 'p' });
      ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'p', status: 'null' }));
      const nodes = (await r('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
      const top = nodes.find((n) => n['node-name'] === 'top');
      assert.equal(top?.backing_file, env.f(how === 'cancel' ? 'mid.qcow2' : 'base.qcow2'));
      assert.equal(nodes.find((n) => n['node-name'] === 'base')?.ro, true);
    }
    if (program === 'bitmirror') {
      await flush(env, 'top', 'base');
      await assertIdentical(env.f('top.qcow2'), ref);
      await checkClean(env.f('base.qcow2'));
    }
  }, ['error']);
});

test('active commit cancelled before and after READY: the base read-only again after a failure (upstream), writable after a soft cancel', { skip }, async () => {
  await same(async (env, r, ev, program) => {
    await chain(env);
    await r('block-commit', { 'job-id': 'a', device: 'top', speed: 1 });
    ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'a', status: 'running' }));
    await r('block-job-cancel', { device: 'a' });
    ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'a', status: 'null' }));
    let nodes = (await r('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    // QEMU 7.2 leaves the base writable; upstream since (mirror_exit_common's base_ro) makes it
    // read-only again, as bitmirror does.
    assert.equal(nodes.find((n) => n['node-name'] === 'base')?.ro, program === 'bitmirror');
    await r('block-commit', { 'job-id': 'a', device: 'top' });
    ev(await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'a' }));
    await r('block-job-cancel', { device: 'a' });
    ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'a', status: 'null' }));
    nodes = (await r('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
    assert.equal(nodes.find((n) => n['node-name'] === 'base')?.ro, false);
    // (How far a throttled job got before the cancel is timing: progress is left out.)
  }, ['error']);
});

/** Where the base image keeps guest offset `offset` (its data clusters are allocated by qemu-io). */
async function hostOffset(file: string, offset: number): Promise<number> {
  const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', file])) as Array<{ start: number; length: number; offset?: number }>;
  const e = map.find((m) => m.start <= offset && offset < m.start + m.length && m.offset !== undefined)!;
  return e.offset! + (offset - e.start);
}

for (const mode of ['intermediate', 'active'] as const) {
  for (const policy of ['stop', 'report'] as const) {
    test(`${mode} commit, a write error injected by blkdebug into the base, on-error=${policy} (iotests 040 style)`, { skip }, async () => {
      await same(
        async (env, r, ev, program) => {
          // Made twice (once per program) with the same layout: the sector of guest offset 2M in base.qcow2.
          await mustRun('qemu-img', ['create', '-f', 'qcow2', env.f('probe.qcow2'), SIZE]);
          await mustRun('qemu-io', ['-f', 'qcow2', '-c', LAYER_WRITES.base[0], env.f('probe.qcow2')]);
          const sector = (await hostOffset(env.f('probe.qcow2'), 2 << 20)) / 512;
          await chain(env, { baseDebug: { 'inject-error': [{ event: 'write_aio', errno: 5, sector, once: true }] } });
          const ref = await reference(env, []);
          await r('block-commit', { 'job-id': 'e', device: 'top', ...(mode === 'intermediate' ? { 'top-node': 'mid' } : {}), 'on-error': policy, 'auto-dismiss': false });
          if (policy === 'stop') {
            ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'e', status: 'paused' }));
            const jobs = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-block-jobs');
            assert.deepEqual([jobs[0].status, jobs[0]['io-status'], jobs[0].paused], ['paused', 'failed', true]);
            await r('job-resume', { id: 'e' });
            if (mode === 'active') {
              ev(await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'e' }));
              await r('job-complete', { id: 'e' });
            }
          }
          ev(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'e', status: 'concluded' }));
          await r('job-dismiss', { id: 'e' });
          const nodes = (await r('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
          const ro = (name: string) => nodes.find((n) => n['node-name'] === name)?.ro;
          // A failed commit leaves the chain as it was (an intermediate one's base read-only again; an
          // active one's too in bitmirror, as upstream QEMU); a finished active commit's base is the active layer.
          if (mode === 'intermediate' || program === 'bitmirror') assert.equal(ro('base'), !(mode === 'active' && policy === 'stop'));
          if (program === 'bitmirror') {
            const disk = mode === 'active' && policy === 'stop' ? 'base' : 'top';
            await flush(env, disk);
            await assertIdentical(env.f(`${disk}.qcow2`), ref);
            for (const img of ['top', 'mid', 'base']) await checkClean(env.f(`${img}.qcow2`));
          }
        },
        ['error', 'operation', 'action'],
      );
    });
  }
}

test('intermediate commit into a protocol node: backing-mask-protocol (upstream 9.0) records raw, not file, as the backing format', async () => {
  for (const mask of [false, true]) {
    const env = await setup('commit-mask');
    try {
      const f = env.f;
      await mustRun('qemu-img', ['create', '-f', 'raw', f('base.raw'), SIZE]);
      await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', f('base.raw'), '-F', 'raw', f('mid.qcow2')]);
      await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', f('mid.qcow2'), '-F', 'qcow2', f('top.qcow2')]);
      await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 64k 64k', f('mid.qcow2')]);
      const { qmp } = env.d;
      await qmp.execute('blockdev-add', { driver: 'file', 'node-name': 'base', filename: f('base.raw'), 'read-only': true });
      await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', 'read-only': true, backing: 'base', file: { driver: 'file', filename: f('mid.qcow2') } });
      await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: { driver: 'file', filename: f('top.qcow2') } });
      await qmp.execute('block-commit', { 'job-id': 'j', device: 'top', 'top-node': 'mid', 'backing-mask-protocol': mask });
      await waitStatusNull(env, 'j');
      await flush(env, 'top');
      const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', f('top.qcow2')])) as Record<string, unknown>;
      assert.deepEqual([info['backing-filename'], info['backing-filename-format']], [f('base.raw'), mask ? 'raw' : 'file']);
      const out = await io(env, 'top', 'read -P 0x22 64k 64k');
      assert.match(out, /read 65536\/65536/);
    } finally {
      await env.done();
    }
  }
});

async function waitStatusNull(env: Env, id: string): Promise<void> {
  const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id, status: 'null' });
  const done = evs.find((e) => e.event === 'BLOCK_JOB_COMPLETED');
  assert.equal(done?.data?.error, undefined, JSON.stringify(done?.data));
}
