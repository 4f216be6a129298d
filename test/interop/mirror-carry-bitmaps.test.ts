/**
 * `__org.bitmirror_carry-bitmaps` on blockdev-mirror and drive-mirror: the source chain's bitmaps
 * (two layers, merged by name; persistent and transient, enabled and disabled, two granularities) end
 * on the target at the pivot — while a guest writes through an NBD export across the switch — and at
 * a soft cancel after READY. Checked on the data: qemu-img info lists the bitmaps, qemu-nbd shows that
 * their dirty ranges cover every write the source recorded and every write during the copy, and
 * qemu-img compare says the target holds the guest's data. Refusals (raw target, inconsistent bitmap)
 * answer job-complete and the soft cancel with the reason, and the source keeps everything.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import { setup, addQcow2, assertIdentical, bitmaps, eventsUntil, flush, io, poll, qmpError, query, type Env, MiB, KiB } from '../support/daemon.js';
import { mustRun, nbdDirtyRanges, qemuIoNbd, rangesCover, run } from '../support/tools.js';

const SIZE = 32 * MiB;
const CARRY = '__org.bitmirror_carry-bitmaps';

interface Info {
  'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[]; granularity: number }> } };
}

/**
 * base.qcow2 (bitmap a: 0..64k dirty) <- top.qcow2 (bitmap a: 1M..+64k; bitmap b, 128k granularity:
 * 1M..+64k and 2M..+4k, then disabled). Returns the paths.
 */
async function makeChain(env: Env): Promise<{ base: string; top: string }> {
  const base = env.f('base.qcow2');
  const top = env.f('top.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(SIZE)]);
  await mustRun('qemu-img', ['bitmap', '--add', base, 'a']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', base]);
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  await mustRun('qemu-img', ['bitmap', '--add', top, 'a']);
  await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', top, 'b']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 1M 64k', top]);
  await mustRun('qemu-img', ['bitmap', '--disable', top, 'b']);
  return { base, top };
}

async function imageBitmaps(file: string): Promise<unknown> {
  const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', file])) as Info;
  return (info['format-specific'].data.bitmaps ?? []).sort((x, y) => x.name.localeCompare(y.name));
}

/** The bitmaps of a node as [name, granularity, persistent, recording], sorted. */
async function shape(env: Env, node: string): Promise<unknown> {
  return Object.values(await bitmaps(env, node))
    .map((b) => [b.name, b.granularity, b.persistent, b.recording])
    .sort((x, y) => String(x[0]).localeCompare(String(y[0])));
}

async function sha(env: Env, node: string, name: string): Promise<string> {
  return (await env.d.qmp.execute<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node, name })).sha256;
}

function assertCovers(ranges: Array<[number, number]>, writes: Array<[number, number]>, what: string): void {
  for (const [o, l] of writes) assert.ok(rangesCover(ranges, o, l), `${what}: [${o}, +${l}) not covered by ${JSON.stringify(ranges)}`);
}

test('carry-bitmaps at the pivot: the chain\'s bitmaps, merged, cover every write; a guest writing across the switch loses nothing', async () => {
  const env = await setup('carry-pivot');
  let stopped = false;
  try {
    const { top } = await makeChain(env);
    const tgt = env.f('tgt.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', tgt, String(SIZE)]);
    const { qmp } = env.d;
    await addQcow2(env, 'src', top);
    await addQcow2(env, 'tgt', tgt, { backing: null });
    // A transient bitmap too: carried as transient.
    await qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 't', granularity: 131072 });
    await io(env, 'src', 'write -P 0x33 3M 4k');
    const sock = env.f('nbd.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'src', writable: true });
    const uri = `nbd+unix:///src?socket=${sock}`;
    const guest: string[] = [];
    const write = async (cmd: string) => {
      guest.push(cmd);
      await qemuIoNbd(uri, [cmd]);
    };

    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 1, 'auto-dismiss': false, [CARRY]: true });
    await write('write -P 0x44 5M 4k');
    assert.equal((await query(env, 'j'))?.ready, false);
    await qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'j' });
    await write('write -P 0x55 6M 4k');

    // A guest writing while the job switches: four writers at once, 16 writes each through the
    // export (writes always in flight), job-complete once the first has written.
    const stream = Array.from({ length: 64 }, (_, i) => `write -P ${0x60 + (i % 32)} ${16 * MiB + i * 128 * KiB} 4k`);
    guest.push(...stream);
    const writers = [0, 1, 2, 3].map((w) => {
      const cmds = stream.filter((_, i) => i % 4 === w);
      const p = spawn('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], { stdio: ['ignore', 'pipe', 'pipe'] });
      const state = { out: '', exited: once(p, 'exit') as Promise<[number]> };
      p.stdout.on('data', (b: Buffer) => (state.out += b.toString()));
      return { p, state };
    });
    await poll('a guest write', () => writers.some((w) => w.state.out.includes('wrote') || w.p.exitCode !== null), 60_000, 1);
    await qmp.execute('job-complete', { id: 'j' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' });
    for (const w of writers) {
      const [code] = await w.state.exited;
      assert.equal(code, 0, w.state.out);
      assert.equal(w.state.out.match(/^wrote /gm)?.length, 16, w.state.out);
    }
    await qmp.execute('job-dismiss', { id: 'j' });
    await write('write -P 0x77 7M 4k');

    assert.deepEqual(await shape(env, 'tgt'), [
      ['a', 65536, true, true],
      ['b', 131072, true, false],
      ['t', 131072, false, true],
    ]);
    // The source keeps its own.
    assert.deepEqual(await shape(env, 'src'), [
      ['a', 65536, true, true],
      ['b', 131072, true, false],
      ['t', 131072, false, true],
    ]);
    await qmp.execute('block-export-del', { id: 'guest' });
    assert.equal(await env.d.stop(), 0, env.d.stderr());
    stopped = true;

    assert.deepEqual(await imageBitmaps(tgt), [
      { name: 'a', flags: ['auto'], granularity: 65536 },
      { name: 'b', flags: [], granularity: 131072 },
    ]);
    await mustRun('qemu-img', ['check', tgt]);
    const writes = [[3 * MiB, 4096], [5 * MiB, 4096], [6 * MiB, 4096], [7 * MiB, 4096], ...stream.map((_, i) => [16 * MiB + i * 128 * KiB, 4096])] as Array<[number, number]>;
    // a: what both layers recorded, and every write since.
    assertCovers(await nbdDirtyRanges(tgt, 'a'), [[0, 65536], [1 * MiB, 65536], ...writes], 'a');
    // b was disabled: exactly what it had recorded.
    assert.deepEqual(await nbdDirtyRanges(tgt, 'b'), [[1 * MiB, 128 * KiB]]);
    // The target holds the guest's data: the source plus what the guest wrote after the switch.
    await mustRun('qemu-io', ['-f', 'qcow2', ...guest.flatMap((c) => ['-c', c]), top]);
    await assertIdentical(top, tgt);
  } finally {
    if (!stopped) await env.d.stop();
    await fsp.rm(env.dir, { recursive: true, force: true });
  }
});

test('carry-bitmaps at a soft cancel after READY (blockdev-mirror and drive-mirror): the copy gets the bitmaps as of then', async () => {
  const env = await setup('carry-soft');
  try {
    const { top } = await makeChain(env);
    const tgt = env.f('tgt.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', tgt, String(SIZE)]);
    const { qmp } = env.d;
    await addQcow2(env, 'src', top);
    await addQcow2(env, 'tgt', tgt, { backing: null });
    await io(env, 'src', 'write -P 0x33 3M 4k');
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 1, [CARRY]: true });
    await io(env, 'src', 'write -P 0x44 5M 4k');
    await qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'j' });
    await io(env, 'src', 'write -P 0x55 6M 4k');
    const srcA = await sha(env, 'src', 'a');
    await qmp.execute('block-job-cancel', { device: 'j' });
    const ev = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
    assert.ok(ev.some((e) => e.event === 'BLOCK_JOB_COMPLETED'), 'a soft cancel after READY completes');
    assert.deepEqual(await shape(env, 'tgt'), [
      ['a', 65536, true, true],
      ['b', 131072, true, false],
    ]);
    // No pivot: the source is still the node written, and keeps its bitmaps unchanged.
    assert.equal(await sha(env, 'src', 'a'), srcA);
    await flush(env, 'src');
    await qmp.execute('blockdev-del', { 'node-name': 'tgt' });
    await assertIdentical(top, tgt);
    // A write after the cancel is the source's: not in the copy's bitmaps.
    await io(env, 'src', 'write -P 0x99 9M 4k');
    assert.deepEqual(await imageBitmaps(tgt), [
      { name: 'a', flags: ['auto'], granularity: 65536 },
      { name: 'b', flags: [], granularity: 131072 },
    ]);
    const a = await nbdDirtyRanges(tgt, 'a');
    assertCovers(a, [[0, 65536], [1 * MiB, 65536], [3 * MiB, 4096], [5 * MiB, 4096], [6 * MiB, 4096]], 'a');
    assert.ok(!rangesCover(a, 9 * MiB, 4096), 'a write after the cancel is not in the copy');

    // drive-mirror: the image it creates gets them, stored when the job closes it.
    const copy = env.f('copy.qcow2');
    await qmp.execute('drive-mirror', { 'job-id': 'd', device: 'src', target: copy, format: 'qcow2', sync: 'full', [CARRY]: true });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'd' });
    await qmp.execute('block-job-cancel', { device: 'd' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'd', status: 'null' });
    await flush(env, 'src');
    await assertIdentical(top, copy);
    assert.deepEqual(await imageBitmaps(copy), [
      { name: 'a', flags: ['auto'], granularity: 65536 },
      { name: 'b', flags: [], granularity: 131072 },
    ]);
    assertCovers(await nbdDirtyRanges(copy, 'a'), [[0, 65536], [1 * MiB, 65536], [3 * MiB, 4096], [5 * MiB, 4096], [6 * MiB, 4096], [9 * MiB, 4096]], 'a (drive-mirror)');
  } finally {
    await env.done();
  }
});

test('carry-bitmaps refusals: a raw target and an inconsistent bitmap refuse job-complete and the soft cancel with the reason, a bitmap busy at the switch fails the job unswitched; the source keeps everything', async () => {
  const env = await setup('carry-refuse');
  try {
    const { top } = await makeChain(env);
    const { qmp } = env.d;
    const raw = env.f('tgt.raw');
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', raw, String(SIZE)]);
    await addQcow2(env, 'src', top);
    await qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'rawtgt', file: { driver: 'file', filename: raw } });
    const before = [await shape(env, 'src'), await sha(env, 'src', 'b')];

    assert.deepEqual(await qmpError(env, 'blockdev-mirror', { 'job-id': 'x', device: 'src', target: 'rawtgt', sync: 'full', bitmap: 'a', [CARRY]: true }), {
      class: 'GenericError',
      desc: "'__org.bitmirror_carry-bitmaps' cannot be used with 'bitmap'",
    });
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'rawtgt', sync: 'full', [CARRY]: true });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'j' });
    const why = "Cannot carry dirty bitmap 'a' of node 'src' to node 'rawtgt': Can't store persistent bitmaps to rawtgt: Operation not supported";
    assert.deepEqual(await qmpError(env, 'job-complete', { id: 'j' }), { class: 'GenericError', desc: why });
    assert.deepEqual(await qmpError(env, 'block-job-cancel', { device: 'j' }), { class: 'GenericError', desc: why });
    // The job is still ready, nothing switched; a write still reaches the source and the copy.
    assert.equal((await query(env, 'j'))?.ready, true);
    await io(env, 'src', 'write -P 0x33 3M 4k');
    await qmp.execute('block-job-cancel', { device: 'j', force: true });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
    const nodes = await qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    assert.ok(!nodes.some((n) => n.drv === 'mirror_top'));
    assert.equal((await bitmaps(env, 'rawtgt'))['a'], undefined);
    assert.deepEqual([await shape(env, 'src'), await sha(env, 'src', 'b')], before);

    // A bitmap that becomes busy after job-complete (auto-finalize off: an export takes it while the
    // job is pending) fails the job at the switch, before anything switched.
    const q = env.f('tgt2.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', q, String(SIZE)]);
    await addQcow2(env, 'tgt2', q, { backing: null });
    await qmp.execute('blockdev-mirror', { 'job-id': 'p', device: 'src', target: 'tgt2', sync: 'full', 'auto-finalize': false, [CARRY]: true });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'p' });
    await qmp.execute('job-complete', { id: 'p' });
    await eventsUntil(env, 'BLOCK_JOB_PENDING', { id: 'p' });
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: env.f('nbd.sock') } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'src', bitmaps: ['a'], writable: true });
    await io(env, 'src', 'write -P 0x34 4M 4k');
    await qmp.execute('job-finalize', { id: 'p' });
    const done = (await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'p', status: 'null' })).find((e) => e.event === 'BLOCK_JOB_COMPLETED');
    assert.equal(done?.data?.error, "Cannot carry dirty bitmap 'a' of node 'src' to node 'tgt2': Bitmap 'a' is currently in use by another operation and cannot be used");
    assert.deepEqual(await bitmaps(env, 'tgt2'), {});
    // No pivot: the export still reads the source, and the source's bitmaps are all there.
    assert.ok(!(await qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true })).some((n) => n.drv === 'mirror_top'));
    assert.deepEqual(await shape(env, 'src'), before[0]);
    await qmp.execute('block-export-del', { id: 'e' });
    await eventsUntil(env, 'BLOCK_EXPORT_DELETED', { id: 'e' });

    // An inconsistent bitmap in the chain: its image's writer was killed while it had it in use.
    const bad = env.f('bad.qcow2');
    const badTgt = env.f('bad-tgt.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', bad, String(SIZE)]);
    await mustRun('qemu-img', ['bitmap', '--add', bad, 'good']);
    await mustRun('qemu-img', ['bitmap', '--add', bad, 'broken']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', '-c', 'sigraise 9', bad]);
    await mustRun('qemu-img', ['bitmap', '--remove', bad, 'good']);
    await mustRun('qemu-img', ['bitmap', '--add', bad, 'good']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 2M 4k', bad]);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', badTgt, String(SIZE)]);
    await addQcow2(env, 'bad', bad);
    await addQcow2(env, 'badtgt', badTgt);
    assert.equal((await bitmaps(env, 'bad'))['broken'].inconsistent, true);
    await qmp.execute('blockdev-mirror', { 'job-id': 'k', device: 'bad', target: 'badtgt', sync: 'full', [CARRY]: true });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'k' });
    assert.deepEqual(await qmpError(env, 'job-complete', { id: 'k' }), {
      class: 'GenericError',
      desc: "Cannot carry dirty bitmap 'broken' of node 'bad' to node 'badtgt': Bitmap 'broken' is inconsistent and cannot be used",
    });
    assert.deepEqual(await bitmaps(env, 'badtgt'), {});
    // Once the user removes it, the completion carries the rest.
    await qmp.execute('block-dirty-bitmap-remove', { node: 'bad', name: 'broken' });
    await qmp.execute('job-complete', { id: 'k' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'k', status: 'null' });
    assert.deepEqual(await shape(env, 'badtgt'), [['good', 65536, true, true]]);
  } finally {
    await env.done();
  }
});

test('carry-bitmaps with sync=top (drive-mirror, pivot): only the top layer\'s bitmaps go; the backing chain keeps its own', async () => {
  const env = await setup('carry-top');
  let stopped = false;
  try {
    const { top, base } = await makeChain(env);
    const { qmp } = env.d;
    await addQcow2(env, 'src', top);
    await io(env, 'src', 'write -P 0x33 3M 4k');
    // The guest: an export, which the pivot moves to the copy (and which keeps it open).
    const sock = env.f('nbd.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'src', name: 'vda', writable: true });
    const copy = env.f('copy.qcow2');
    await qmp.execute('drive-mirror', { 'job-id': 'd', device: 'src', target: copy, format: 'qcow2', sync: 'top', 'node-name': 'copy', [CARRY]: true });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'd' });
    await qmp.execute('job-complete', { id: 'd' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'd', status: 'null' });
    await qemuIoNbd(`nbd+unix:///vda?socket=${sock}`, ['write -P 0x77 7M 4k']);
    assert.deepEqual(await shape(env, 'copy'), [
      ['a', 65536, true, true],
      ['b', 131072, true, false],
    ]);
    assert.equal(await env.d.stop(), 0, env.d.stderr());
    stopped = true;
    const a = await nbdDirtyRanges(copy, 'a');
    assertCovers(a, [[1 * MiB, 65536], [3 * MiB, 4096], [7 * MiB, 4096]], 'a');
    assert.ok(!rangesCover(a, 0, 65536), "the base's bitmap stays in the base");
    assert.deepEqual(await nbdDirtyRanges(base, 'a'), [[0, 65536]]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 7M 4k', top]);
    await assertIdentical(top, copy);
  } finally {
    if (!stopped) await env.d.stop();
    await fsp.rm(env.dir, { recursive: true, force: true });
  }
});

test('carry-bitmaps: guest writes that arrive while the job switches wait and then go to the target', async () => {
  const env = await setup('carry-held');
  let stopped = false;
  try {
    const { top } = await makeChain(env);
    const tgt = env.f('tgt.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', tgt, String(SIZE)]);
    const { qmp } = env.d;
    await addQcow2(env, 'src', top);
    // A slow target (4 MiB/s): the switch has dirty data to copy first, and takes its time.
    await qmp.execute('object-add', { 'qom-type': 'throttle-group', id: 'tg', limits: { 'bps-write': 4 * MiB } });
    await qmp.execute('blockdev-add', { driver: 'throttle', 'node-name': 'slow', 'throttle-group': 'tg', file: { driver: 'qcow2', 'node-name': 'tgt', backing: null, file: { driver: 'file', filename: tgt } } });
    const sock = env.f('nbd.sock');
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'src', name: 'vda', writable: true });
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'slow', sync: 'full', 'auto-finalize': false, [CARRY]: true });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'j' });
    await qmp.execute('job-complete', { id: 'j' });
    await eventsUntil(env, 'BLOCK_JOB_PENDING', { id: 'j' });
    // A discard while the job is pending leaves 4 MiB dirty (a discarded range is copied, not mirrored
    // as it happens): the switch copies it at 4 MiB/s before it can happen.
    await io(env, 'src', 'discard 8M 4M');
    const finalized = qmp.execute('job-finalize', { id: 'j' });
    // The guest writes meanwhile through the filter: held until the pivot, then written to the target.
    const guest = ['write -P 0x71 20M 4k', 'write -P 0x72 21M 64k'];
    await qemuIoNbd(`nbd+unix:///vda?socket=${sock}`, guest);
    await finalized;
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' });
    assert.deepEqual(await shape(env, 'tgt'), [
      ['a', 65536, true, true],
      ['b', 131072, true, false],
    ]);
    await qmp.execute('block-export-del', { id: 'guest' });
    assert.equal(await env.d.stop(), 0, env.d.stderr());
    stopped = true;
    assertCovers(await nbdDirtyRanges(tgt, 'a'), [[0, 65536], [1 * MiB, 65536], [20 * MiB, 4096], [21 * MiB, 65536]], 'a');
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'discard 8M 4M', ...guest.flatMap((c) => ['-c', c]), top]);
    await assertIdentical(top, tgt);
  } finally {
    if (!stopped) await env.d.stop();
    await fsp.rm(env.dir, { recursive: true, force: true });
  }
});
