/**
 * blockdev-backup on a real daemon: the backup is a point-in-time image while writes continue, through
 * the filter and around it (HMP qemu-io on the source node); the successor bitmap while the job runs;
 * the bitmap modes (iotests 257's matrix: sync × bitmap-mode × failure at the start, middle and end of
 * the copy, on the source and on the target, with writes before and during the job) with the counts
 * predicted; an incremental chain (iotests 124) whose images, rebased, equal the source at each point
 * in time; transaction actions and completion-mode grouped.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { KiB, MiB, setup, qcow2, addQcow2, io, flush, assertIdentical, bitmaps, bitmapCount, eventsUntil, summarise, qmpError, type Env } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

const SIZE = 16 * MiB;
const CL = 64 * KiB;
type Write = [pattern: number, offset: number, len: number];

async function writeAll(env: Env, node: string, writes: Write[]): Promise<void> {
  for (const [p, off, len] of writes) await io(env, node, `write -P ${p} ${off} ${len}`);
}

/** The clusters (64 KiB) a set of writes touches. */
function clusters(...groups: Write[][]): Set<number> {
  const s = new Set<number>();
  for (const g of groups) for (const [, off, len] of g) for (let c = Math.floor(off / CL); c * CL < off + len; c++) s.add(c);
  return s;
}

async function backupDone(env: Env, id: string): Promise<string[]> {
  const ev = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id, status: 'concluded' });
  return summarise(ev.filter((e) => e.data?.id === id || e.data?.device === id), ['error']);
}

test('a backup is the source at its start while writes continue, through the filter and around it', async () => {
  const env = await setup('backup-pit');
  try {
    const src = await qcow2(env.f('src.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4M', '-c', 'write -P 0x22 8M 2M', '-c', 'write -P 0x33 15M 1M', src]);
    await fsp.copyFile(src, env.f('expected.qcow2'));
    await addQcow2(env, 'src', src);
    await qcow2(env.f('tgt.qcow2'), SIZE);
    await addQcow2(env, 'tgt', env.f('tgt.qcow2'));
    // Slow (one chunk, then a long sleep), so that every write below happens while the job copies.
    await env.d.qmp.execute('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'full', speed: 1, 'filter-node-name': 'cbw' });
    const nodes = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    assert.ok(nodes.some((n) => n['node-name'] === 'cbw' && n.drv === 'copy-before-write'));
    // Through the filter, and on the source node below it (a path QEMU's filter does not see).
    await writeAll(env, 'cbw', [[0xa1, 1 * MiB, 64 * KiB], [0xa2, 8 * MiB + 4096, 4096]]);
    await writeAll(env, 'src', [[0xb1, 2 * MiB + 512, 200 * KiB], [0xb2, 12 * MiB, 1 * MiB], [0xb3, 15 * MiB, 1 * MiB]]);
    await io(env, 'src', 'write -z 3M 512k');
    await io(env, 'src', 'discard 9M 64k');
    await env.d.qmp.execute('block-job-set-speed', { device: 'b', speed: 0 });
    assert.deepEqual((await backupDone(env, 'b')).slice(-4), ['waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded']);
    // The filter is gone; the writes are in the source; the target is the source before them.
    const after = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    assert.ok(!after.some((n) => n['node-name'] === 'cbw'));
    assert.match(await env.d.qmp.hmpOutput('qemu-io src "read -P 0xb3 15M 1M"'), /read 1048576/);
    await flush(env, 'tgt');
    await assertIdentical(env.f('tgt.qcow2'), env.f('expected.qcow2'));
  } finally {
    await env.done();
  }
});

// ---- the bitmap-mode matrix (iotests 257) -------------------------------------------------------

const G1: Write[] = [[0x49, 0, 64 * KiB], [0x6c, 1 * MiB, 128 * KiB], [0x6f, 4 * MiB, 64 * KiB], [0x76, 8 * MiB, 192 * KiB], [0x77, 15 * MiB, 64 * KiB]];
const G2: Write[] = [[0x74, 2 * MiB, 64 * KiB], [0x69, 8 * MiB + 128 * KiB, 4096], [0x6e, 12 * MiB, 64 * KiB]];

type Failure = { where: 'source' | 'target'; at: 'start' | 'middle' | 'end' } | undefined;

/**
 * One backup with sync/mode/failure: G1 written before (in the bitmap), G2 during the job. The job copies
 * one chunk at a time in order (x-perf), so a failure at cluster X leaves exactly the copy set's
 * clusters from X on uncopied. Returns the bitmap's count afterwards.
 */
async function bitmapBackup(sync: 'bitmap' | 'full', mode: 'on-success' | 'never' | 'always', failure: Failure): Promise<{ count: number; predicted: number; events: string[] }> {
  const env = await setup('backup-257');
  try {
    const srcFile = env.f('src.raw');
    await fsp.writeFile(srcFile, Buffer.alloc(0));
    await fsp.truncate(srcFile, SIZE);
    const g1 = [...clusters(G1)].sort((a, b) => a - b);
    // The copy set, in the order the job walks it.
    const copySet = sync === 'bitmap' ? g1 : [...Array(SIZE / CL).keys()];
    // A cluster with data (a zero cluster is written as zeroes, without a read of the source); not the
    // first, which the job may copy before the error is armed.
    const X = failure ? g1[failure.at === 'start' ? 1 : failure.at === 'middle' ? Math.floor(g1.length / 2) : g1.length - 1] : -1;
    // The error is armed (state 2) by a flush of the failing node, after the writes during the job.
    const debug = (fail: boolean) =>
      fail
        ? {
            'inject-error': [{ event: failure!.where === 'source' ? 'read_aio' : 'write_aio', state: 2, sector: (X * CL) / 512, errno: 5 }],
            'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }],
          }
        : undefined;
    const fileOf = (filename: string, fail: boolean) => (fail ? { driver: 'blkdebug', image: { driver: 'file', filename }, ...debug(true) } : { driver: 'file', filename });
    await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'src', file: fileOf(srcFile, failure?.where === 'source') });
    const tgtFile = env.f('tgt.raw');
    await fsp.writeFile(tgtFile, Buffer.alloc(0));
    await fsp.truncate(tgtFile, SIZE);
    await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'tgt', file: fileOf(tgtFile, failure?.where === 'target') });
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'src', name: 'bitmap0', granularity: CL });
    await writeAll(env, 'src', G1);
    assert.equal(await bitmapCount(env, 'src', 'bitmap0'), g1.length * CL);
    await env.d.qmp.execute('blockdev-backup', {
      'job-id': 'b',
      device: 'src',
      target: 'tgt',
      sync,
      bitmap: 'bitmap0',
      'bitmap-mode': mode,
      speed: 1,
      'x-perf': { 'max-workers': 1, 'max-chunk': CL },
    });
    // While the job runs: the user's bitmap is frozen and busy (recording through its successor, as
    // bdrv_dirty_bitmap_recording says), the successor records.
    const during = await bitmaps(env, 'src');
    assert.equal(during.bitmap0.busy, true);
    assert.equal(during.bitmap0.recording, true);
    assert.equal(during.bitmap0.count, g1.length * CL);
    await writeAll(env, 'src', G2);
    const succ = Object.entries(await bitmaps(env, 'src')).filter(([n, b]) => n === '' && b.recording === true);
    assert.equal(succ.length, 1, 'one recording anonymous successor');
    assert.equal(succ[0][1].count, clusters(G2).size * CL);
    if (failure) await io(env, failure.where === 'source' ? 'src' : 'tgt', 'flush');
    await env.d.qmp.execute('block-job-set-speed', { device: 'b', speed: 0 });
    const events = await backupDone(env, 'b');
    const count = await bitmapCount(env, 'src', 'bitmap0');
    const after = await bitmaps(env, 'src');
    assert.equal(after.bitmap0.busy, false);
    assert.equal(after.bitmap0.recording, true);
    assert.deepEqual(Object.keys(after), ['bitmap0'], 'only the user bitmap is left');
    // backup_cleanup_sync_bitmap.
    const ok = failure === undefined;
    const predictedSet = new Set<number>();
    if ((ok || mode === 'always') && mode !== 'never') {
      for (const c of clusters(G2)) predictedSet.add(c);
      if (!ok) for (const c of copySet) if (c >= X && !clusters(G2).has(c)) predictedSet.add(c);
    } else {
      for (const c of clusters(G1, G2)) predictedSet.add(c);
    }
    if (ok) {
      // A successful backup holds the source as it was at the start (G1, not G2).
      await io(env, 'tgt', 'flush');
      const want = env.f('want.raw');
      await fsp.copyFile(srcFile, want);
      for (const [, off, len] of G2) {
        const fh = await fsp.open(want, 'r+');
        await fh.write(Buffer.alloc(len), 0, len, off);
        await fh.close();
      }
      await mustRun('qemu-io', ['-f', 'raw', ...G1.flatMap(([p, off, len]) => ['-c', `write -P ${p} ${off} ${len}`]), want]);
      if (sync !== 'bitmap') await assertIdentical(tgtFile, want, ['-f', 'raw', '-F', 'raw']);
    }
    return { count, predicted: predictedSet.size * CL, events };
  } finally {
    await env.done();
  }
}

for (const sync of ['bitmap', 'full'] as const) {
  for (const mode of ['on-success', 'never', 'always'] as const) {
    if (mode === 'never' && sync !== 'bitmap') continue;
    const failures: Failure[] = [undefined];
    for (const where of ['source', 'target'] as const) for (const at of ['start', 'middle', 'end'] as const) failures.push({ where, at });
    for (const failure of failures) {
      const name = failure ? `${failure.where} error at the ${failure.at}` : 'no failure';
      test(`backup sync=${sync} bitmap-mode=${mode}, ${name}: the bitmap afterwards is as predicted`, async () => {
        const r = await bitmapBackup(sync, mode, failure);
        assert.equal(r.count, r.predicted);
        if (failure) {
          assert.ok(r.events.includes(`BLOCK_JOB_ERROR`), r.events.join(' '));
          assert.ok(r.events.some((e) => e.startsWith('BLOCK_JOB_COMPLETED{error=')), r.events.join(' '));
        } else {
          assert.deepEqual(r.events.slice(-4), ['waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded']);
        }
      });
    }
  }
}

// ---- an incremental chain (iotests 124) ---------------------------------------------------------

test('an incremental chain of backups, rebased, equals the source at each point in time', async () => {
  const env = await setup('backup-124');
  try {
    const src = await qcow2(env.f('src.qcow2'), 64 * MiB);
    await addQcow2(env, 'src', src);
    await env.d.qmp.execute('transaction', {
      actions: [
        { type: 'block-dirty-bitmap-add', data: { node: 'src', name: 'bitmap0' } },
        { type: 'drive-backup', data: { 'job-id': 'full', device: 'src', target: env.f('full.qcow2'), sync: 'full', format: 'qcow2' } },
      ],
    });
    await backupDone(env, 'full');
    const points: string[] = [];
    const triplets: Write[][] = [
      [[0xab, 0, 512], [0xfe, 16 * MiB, 256 * KiB], [0x64, 32736 * KiB, 64 * KiB]],
      [[0x11, 1 * MiB, 64 * KiB], [0x22, 40 * MiB, 128 * KiB]],
      [[0x33, 0, 4096], [0x44, 63 * MiB, 1 * MiB]],
    ];
    let prev = env.f('full.qcow2');
    for (let i = 0; i < triplets.length; i++) {
      await writeAll(env, 'src', triplets[i]);
      if (i === 0) assert.equal(await bitmapCount(env, 'src', 'bitmap0'), 458752);
      const inc = env.f(`inc${i}.qcow2`);
      await mustRun('qemu-img', ['create', '-f', 'qcow2', '-F', 'qcow2', '-b', prev, inc]);
      await addQcow2(env, `inc${i}`, inc, { backing: null });
      await env.d.qmp.execute('blockdev-backup', { 'job-id': `inc${i}`, device: 'src', target: `inc${i}`, sync: 'incremental', bitmap: 'bitmap0' });
      await backupDone(env, `inc${i}`);
      assert.equal(await bitmapCount(env, 'src', 'bitmap0'), 0);
      await env.d.qmp.execute('blockdev-del', { 'node-name': `inc${i}` });
      // The source at this point in time, for the comparison.
      await flush(env, 'src');
      const point = env.f(`point${i}.raw`);
      await mustRun('qemu-img', ['convert', '-U', '-O', 'raw', src, point]);
      points.push(point);
      prev = inc;
    }
    for (let i = 0; i < points.length; i++) await assertIdentical(env.f(`inc${i}.qcow2`), points[i]);
  } finally {
    await env.done();
  }
});

test('completion-mode grouped: one failing backup cancels the group and no bitmap changes', async () => {
  const env = await setup('backup-grouped');
  try {
    const a = await qcow2(env.f('a.qcow2'), SIZE);
    const b = await qcow2(env.f('b.qcow2'), SIZE);
    await addQcow2(env, 'a', a);
    // Reads of b fail once armed (state 2, by a flush after the writes below).
    await addQcow2(env, 'b', b, {}, { 'inject-error': [{ event: 'read_aio', state: 2, errno: 5 }], 'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }] });
    await qcow2(env.f('ta.qcow2'), SIZE);
    await qcow2(env.f('tb.qcow2'), SIZE);
    await addQcow2(env, 'ta', env.f('ta.qcow2'));
    await addQcow2(env, 'tb', env.f('tb.qcow2'));
    for (const n of ['a', 'b']) await env.d.qmp.execute('block-dirty-bitmap-add', { node: n, name: 'bm' });
    await io(env, 'a', 'write -P 1 0 1M');
    await io(env, 'b', 'write -P 2 0 1M');
    await io(env, 'b', 'flush');
    await env.d.qmp.execute('transaction', {
      actions: [
        { type: 'blockdev-backup', data: { 'job-id': 'ja', device: 'a', target: 'ta', sync: 'incremental', bitmap: 'bm', speed: 1 } },
        { type: 'blockdev-backup', data: { 'job-id': 'jb', device: 'b', target: 'tb', sync: 'incremental', bitmap: 'bm' } },
      ],
      properties: { 'completion-mode': 'grouped' },
    });
    // jb fails on its read error; the group aborts: ja is cancelled.
    const all = await eventsUntil(env, 'BLOCK_JOB_CANCELLED', { device: 'ja' });
    const jb = summarise(all.filter((e) => e.data?.id === 'jb' || e.data?.device === 'jb'), ['action', 'operation']);
    assert.ok(jb.includes('BLOCK_JOB_ERROR{action="report",operation="read"}'), jb.join(' '));
    assert.ok(all.some((e) => e.event === 'BLOCK_JOB_COMPLETED' && e.data?.device === 'jb' && typeof e.data.error === 'string'));
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'ja', status: 'null' });
    assert.deepEqual(await env.d.qmp.execute('query-jobs'), []);
    assert.equal(await bitmapCount(env, 'a', 'bm'), 1 * MiB);
    assert.equal(await bitmapCount(env, 'b', 'bm'), 1 * MiB);
    // completion-mode grouped is refused for actions other than backups.
    const r = await env.d.qmp.request('transaction', {
      actions: [{ type: 'block-dirty-bitmap-clear', data: { node: 'a', name: 'bm' } }],
      properties: { 'completion-mode': 'grouped' },
    });
    assert.equal((r as { error: { desc: string } }).error.desc, "Action 'block-dirty-bitmap-clear' does not support Transaction property completion-mode = grouped");
  } finally {
    await env.done();
  }
});

test('sync=top copies what the top layer allocates; drive-backup creates its target; on-source-error=stop pauses with the bitmap frozen', async () => {
  const env = await setup('backup-top');
  try {
    const base = await qcow2(env.f('base.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 16M', base]);
    const top = env.f('top.qcow2');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', '-F', 'qcow2', '-b', base, top]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x02 1M 1M', '-c', 'write -P 0x03 9M 64k', top]);
    // The source, with a read error armed by a flush (for the stop below).
    await addQcow2(env, 'top', top, {}, { 'inject-error': [{ event: 'read_aio', state: 2, errno: 5, once: true }], 'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }] });
    // sync=top with drive-backup: the new image gets the source's backing; only the top's clusters are copied.
    await env.d.qmp.execute('drive-backup', { 'job-id': 't', device: 'top', target: env.f('t.qcow2'), sync: 'top', format: 'qcow2' });
    const ev = await eventsUntil(env, 'BLOCK_JOB_COMPLETED', { device: 't' });
    const done = ev.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!;
    assert.equal(done.data?.len, 1 * MiB + 64 * KiB);
    assert.equal(done.data?.offset, 1 * MiB + 64 * KiB);
    const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', env.f('t.qcow2')])) as Record<string, unknown>;
    assert.equal(info['backing-filename'], base);
    await assertIdentical(env.f('t.qcow2'), top);
    // iotests 124: on-source-error=stop pauses the job; the bitmap is busy and recording; resume ends it.
    await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'top', name: 'b' });
    await io(env, 'top', 'write -P 0x04 2M 448k');
    await io(env, 'top', 'flush');
    await qcow2(env.f('inc.qcow2'), SIZE);
    await addQcow2(env, 'inc', env.f('inc.qcow2'));
    await env.d.qmp.execute('blockdev-backup', { 'job-id': 'i', device: 'top', target: 'inc', sync: 'incremental', bitmap: 'b', 'on-source-error': 'stop' });
    const stopped = summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'i', status: 'paused' }), ['action', 'operation']);
    assert.ok(stopped.includes('BLOCK_JOB_ERROR{action="stop",operation="read"}'), stopped.join(' '));
    const b = (await bitmaps(env, 'top')).b;
    assert.deepEqual([b.busy, b.recording, b.count], [true, true, 458752]);
    await env.d.qmp.execute('block-job-resume', { device: 'i' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'i', status: 'null' });
    const after = (await bitmaps(env, 'top')).b;
    assert.deepEqual([after.busy, after.count], [false, 0]);
    await flush(env, 'inc');
    const r = await mustRun('qemu-io', ['-r', '-U', '-f', 'qcow2', '-c', 'read -P 0x04 2M 448k', env.f('inc.qcow2')]);
    assert.match(r, /read 458752/);
  } finally {
    await env.done();
  }
});

test('on-cbw-error: break-guest-write fails the write; break-snapshot lets it through and fails the backup', async () => {
  const env = await setup('backup-cbw-error');
  try {
    const src = await qcow2(env.f('src.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4M', src]);
    await addQcow2(env, 'src', src);
    for (const mode of ['break-guest-write', 'break-snapshot'] as const) {
      const tgtFile = env.f(`${mode}.raw`);
      await fsp.writeFile(tgtFile, Buffer.alloc(0));
      await fsp.truncate(tgtFile, SIZE);
      // Every write to the target fails once armed (a flush of the target).
      await env.d.qmp.execute('blockdev-add', {
        driver: 'raw',
        'node-name': mode,
        file: { driver: 'blkdebug', image: { driver: 'file', filename: tgtFile }, 'inject-error': [{ event: 'write_aio', state: 2, errno: 28 }], 'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }] },
      });
      await io(env, mode, 'flush');
      await env.d.qmp.execute('blockdev-backup', { 'job-id': mode, device: 'src', target: mode, sync: 'none', 'on-cbw-error': mode });
      const out = await env.d.qmp.hmpOutput('qemu-io src "write -P 0x22 1M 4k"');
      if (mode === 'break-guest-write') {
        assert.match(out, /write failed: No space left on device/);
        assert.match(await env.d.qmp.hmpOutput('qemu-io src "read -P 0x11 1M 4k"'), /read 4096/);
        await env.d.qmp.execute('block-job-cancel', { device: mode, force: true });
        const ev = summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: mode, status: 'null' }));
        assert.ok(ev.includes('BLOCK_JOB_CANCELLED'), ev.join(' '));
      } else {
        assert.match(out, /wrote 4096/);
        assert.match(await env.d.qmp.hmpOutput('qemu-io src "read -P 0x22 1M 4k"'), /read 4096/);
        const ev = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: mode, status: 'null' });
        const done = ev.find((e) => e.event === 'BLOCK_JOB_COMPLETED');
        assert.equal(done?.data?.error, 'No space left on device');
      }
    }
  } finally {
    await env.done();
  }
});

test('discard-source (upstream 9.1): the target is the source at the start, the source is left unallocated; a read-only source is refused', async () => {
  const env = await setup('backup-discard-source');
  try {
    const src = await qcow2(env.f('src.qcow2'), SIZE);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4M', '-c', 'write -P 0x22 8M 2M', '-c', 'write -P 0x33 15M 1M', src]);
    await fsp.copyFile(src, env.f('expected.qcow2'));
    // The filter discards with write permission on the source: a read-only source cannot give it.
    await addQcow2(env, 'ro', env.f('expected.qcow2'), { 'read-only': true });
    await qcow2(env.f('tgt.qcow2'), SIZE);
    await addQcow2(env, 'tgt', env.f('tgt.qcow2'));
    const refused = await qmpError(env, 'blockdev-backup', { 'job-id': 'r', device: 'ro', target: 'tgt', sync: 'full', 'discard-source': true, 'filter-node-name': 'f' });
    assert.deepEqual(refused, { class: 'GenericError', desc: 'Block node is read-only' });
    const nodes = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    assert.ok(!nodes.some((n) => n['node-name'] === 'f'));
    assert.deepEqual(await env.d.qmp.execute('query-block-jobs'), []);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'ro' });

    await addQcow2(env, 'src', src, { discard: 'unmap' });
    // Slow (one chunk, then a long sleep): the writes below land while the job copies.
    await env.d.qmp.execute('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'tgt', sync: 'full', speed: 1, 'discard-source': true });
    // A whole cluster: its old data is copied, the cluster discarded, then the write lands.
    await io(env, 'src', 'write -P 0xa1 1M 64k');
    // A cluster the job copies later, written around the filter too.
    await io(env, 'src', 'write -P 0xa2 12M 64k');
    await env.d.qmp.execute('block-job-set-speed', { device: 'b', speed: 0 });
    assert.deepEqual((await backupDone(env, 'b')).slice(-4), ['waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded']);
    await flush(env, 'tgt');
    await assertIdentical(env.f('tgt.qcow2'), env.f('expected.qcow2'));
    assert.match(await io(env, 'src', 'read -P 0xa1 1M 64k'), /read 65536/);
    assert.match(await io(env, 'src', 'read -P 0xa2 12M 64k'), /read 65536/);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'src' });
    await mustRun('qemu-img', ['check', '-f', 'qcow2', src]);
    // What the backup copied is gone from the source: only the two clusters written afterwards hold data.
    const map = JSON.parse(await mustRun('qemu-img', ['map', '-f', 'qcow2', '--output=json', src])) as Array<{ start: number; length: number; data: boolean }>;
    const data = map.filter((e) => e.data).map((e) => [e.start, e.length]);
    assert.deepEqual(data, [
      [1 * MiB, 64 * KiB],
      [12 * MiB, 64 * KiB],
    ]);
  } finally {
    await env.done();
  }
});
