/**
 * Active mirroring (copy-mode=write-blocking) in the style of iotest 151 and tests/mirror-change-copy-mode:
 * writes before the job, while converging and after READY, through the filter node and directly to the
 * source node (which bitmirror mirrors too); after READY the job's bitmap stays clean and the target
 * reads each write as soon as it completes. block-job-change background → write-blocking.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { KiB, MiB, io, flush, assertIdentical, query, poll, bitmaps, qmpError, type Env, withSourceAndTarget } from '../support/daemon.js';

/** The job's own bitmap lives on the filter node (anonymous), as in QEMU since 8.2. */
async function jobDirty(env: Env, filter: string): Promise<number> {
  const b = (await bitmaps(env, filter))[''];
  assert.ok(b, 'job bitmap on the filter');
  return b.count as number;
}

/** The target reads back `pattern` at [off, +len) right now (before any further job progress). */
async function targetHas(env: Env, node: string, pattern: string, off: string, len: string): Promise<void> {
  const out = await env.d.qmp.hmpOutput(`qemu-io ${node} "read -P ${pattern} ${off} ${len}"`);
  assert.match(out, /^read /, `${node} ${pattern}@${off}: ${out}`);
}

test('write-blocking: writes in every phase, through the filter and to the source; bitmap clean after READY', async () => {
  await withSourceAndTarget('ma-151', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x01 0 8M');
    // Before the job.
    await io(env, 'src', 'write -P 0x02 8M 4M');
    await io(env, 'src', 'write -z 12M 4M');
    await qmp.execute('blockdev-mirror', {
      'job-id': 'j',
      device: 'src',
      target: 'tgt',
      sync: 'full',
      'copy-mode': 'write-blocking',
      'filter-node-name': 'top',
      speed: 1 * MiB,
      'buf-size': 256 * KiB,
    });
    await poll('progress', async () => ((await query(env, 'j'))?.offset as number) > 0);
    assert.equal((await query(env, 'j'))!.ready, false);
    // While converging: aligned, unaligned (into dirty areas), zeroes, discard; both paths.
    await io(env, 'top', 'write -P 0x03 24M 1M');
    await io(env, 'src', 'write -P 0x04 25M 64k');
    await io(env, 'top', 'write -P 0x05 1049642 1');
    await io(env, 'src', 'write -P 0x06 7M 3000');
    await io(env, 'top', 'write -z 26M 128k');
    await io(env, 'src', 'discard 8M 64k');
    await qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    await poll('actively synced', async () => (await query(env, 'j'))!['actively-synced'] === true);
    // After READY: every write lands on the target before it completes; the bitmap stays clean.
    const writes: Array<[string, string, string, string]> = [
      ['top', '0x07', '40M', '1M'],
      ['src', '0x08', '41M', '64k'],
      ['top', '0x09', '42M', '512'],
      ['src', '0x0a', '43M', '100k'],
      ['top', '0x0b', '1050000', '3'],
      ['src', '0x0c', '9000000', '70000'],
    ];
    for (const [node, p, off, len] of writes) {
      await io(env, node, `write -P ${p} ${off} ${len}`);
      await targetHas(env, 'tgt', p, off, len);
      assert.equal(await jobDirty(env, 'top'), 0, `after ${node} ${off}`);
      assert.equal((await query(env, 'j'))!['actively-synced'], true);
    }
    await io(env, 'src', 'write -z 50M 64k');
    await io(env, 'top', 'write -z 44M 512');
    assert.equal(await jobDirty(env, 'top'), 0);
    await qmp.execute('job-complete', { id: 'j' });
    const done = await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    assert.equal(done.data!.error, undefined);
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});

test('write-blocking: 1-byte write into a dirty area while throttled (151 testUnalignedActiveIO)', async () => {
  await withSourceAndTarget('ma-unal', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x01 0 2M');
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'copy-mode': 'write-blocking', 'buf-size': 256 * KiB, speed: 1, 'filter-node-name': 'top' });
    await io(env, 'top', 'write -P 0x02 1048618 1');
    await io(env, 'src', 'write -P 0x03 1048620 1');
    await qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    await qmp.execute('job-complete', { id: 'j' });
    await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});

test('write-blocking: many concurrent overlapping writes after READY (151 testIntersectingActiveIO)', async () => {
  await withSourceAndTarget('ma-conc', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x01 0 4M');
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'copy-mode': 'write-blocking', 'filter-node-name': 'top' });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    const ws: Promise<string>[] = [];
    for (let i = 0; i < 24; i++) {
      const node = i % 2 ? 'top' : 'src';
      ws.push(io(env, node, `write -P ${i + 16} ${1 * MiB + i * 24 * KiB} ${96 * KiB}`));
    }
    await Promise.all(ws);
    assert.equal(await jobDirty(env, 'top'), 0);
    await qmp.execute('block-job-cancel', { device: 'j' });
    await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});

test('block-job-change background -> write-blocking: actively-synced, then writes reach the target at once', async () => {
  await withSourceAndTarget('ma-change', async (env, src, tgt) => {
    const { qmp } = env.d;
    await io(env, 'src', 'write -P 0x01 0 4M');
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'filter-node-name': 'top' });
    assert.equal((await query(env, 'j'))!['actively-synced'], false);
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    assert.equal((await query(env, 'j'))!['actively-synced'], false);
    // Background: a write after READY makes the bitmap dirty until the job copies it.
    await io(env, 'src', 'write -P 0x02 10M 1M');
    await io(env, 'top', 'write -P 0x03 11M 1M');
    await qmp.execute('block-job-change', { id: 'j', type: 'mirror', 'copy-mode': 'background' });
    await qmp.execute('block-job-change', { id: 'j', type: 'mirror', 'copy-mode': 'write-blocking' });
    await poll('actively synced', async () => (await query(env, 'j'))!['actively-synced'] === true);
    const e = await qmpError(env, 'block-job-change', { id: 'j', type: 'mirror', 'copy-mode': 'background' });
    assert.equal(e.desc, "Change to copy mode 'background' is not implemented");
    for (const [node, p, off] of [['src', '0x04', '20M'], ['top', '0x05', '21M']]) {
      await io(env, node, `write -P ${p} ${off} 64k`);
      await targetHas(env, 'tgt', p, off, '64k');
      assert.equal(await jobDirty(env, 'top'), 0);
    }
    await qmp.execute('block-job-cancel', { device: 'j' });
    const done = await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    assert.equal(done.data!.error, undefined);
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});

test('background mode: writes directly to the source after READY are mirrored too (no filter involved)', async () => {
  await withSourceAndTarget('ma-direct', async (env, src, tgt) => {
    const { qmp } = env.d;
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full' });
    await qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    for (let i = 0; i < 8; i++) await io(env, 'src', `write -P ${0x30 + i} ${i * 7}M 1000`);
    await io(env, 'src', 'write -z 7M 500');
    await qmp.execute('job-complete', { id: 'j' });
    await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt);
  });
});
