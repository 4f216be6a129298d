/**
 * query-block, query-blockstats and block-set-write-threshold (BLOCK_WRITE_THRESHOLD) against
 * qemu-storage-daemon 7.2 and bitmirror, the same QMP script: replies and events must be equal.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, haveQsd, type Env } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

async function script(program: 'bitmirror' | 'qemu-storage-daemon'): Promise<unknown[]> {
  const env: Env = await setup(`bs-${program}`, program);
  const out: unknown[] = [];
  try {
    const { qmp } = env.d;
    const r = async (cmd: string, args?: Record<string, unknown>) => {
      const rep = await qmp.request(cmd, args);
      out.push([cmd, 'error' in rep ? rep.error : rep.return]);
      return rep;
    };
    const src = env.f('src.raw');
    const tgt = env.f('tgt.raw');
    await mustRun('qemu-img', ['create', '-f', 'raw', src, '8M']);
    await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 8M', src]);
    await mustRun('qemu-img', ['create', '-f', 'raw', tgt, '8M']);
    await r('blockdev-add', { driver: 'raw', 'node-name': 'src', file: { driver: 'file', 'node-name': 'src-file', filename: src } });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'tgt', file: { driver: 'file', 'node-name': 'tgt-file', filename: tgt, discard: 'unmap' } });
    await r('blockdev-add', { driver: 'null-co', 'node-name': 'null0', size: 1048576 });
    await r('query-block');
    await r('query-blockstats');
    await r('query-blockstats', { 'query-nodes': true });
    await r('query-blockstats', { 'query-nodes': false });
    await r('block-set-write-threshold', { 'node-name': 'nope', 'write-threshold': 4096 });
    await r('block-set-write-threshold', { 'node-name': 'tgt', 'write-threshold': 1048576 });
    await r('block-set-write-threshold', { 'node-name': 'null0', 'write-threshold': 4096 });
    await r('block-set-write-threshold', { 'node-name': 'null0', 'write-threshold': 0 });
    const thresholds = async () => (await qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true })).map((n) => [n['node-name'], n.write_threshold]);
    out.push(await thresholds());
    qmp.events.splice(0);
    await r('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full' });
    await qmp.waitEvent('BLOCK_JOB_READY');
    await r('block-job-cancel', { device: 'j' });
    await qmp.waitEvent('JOB_STATUS_CHANGE', { status: 'null' });
    // Whichever copy crossed the threshold first: the event names the node and the threshold, once.
    const crossed = qmp.events.concat().filter((e) => e.event === 'BLOCK_WRITE_THRESHOLD');
    out.push(crossed.map((e) => [e.data?.['node-name'], e.data?.['write-threshold'], (e.data?.['amount-exceeded'] as number) > 0]));
    out.push(await thresholds());
    // Every byte was written: the highest write offsets are the disk's end.
    const stats = await qmp.execute<Array<Record<string, Record<string, unknown>>>>('query-blockstats', { 'query-nodes': true });
    out.push(stats.map((s) => [s['node-name'], s.stats.wr_highest_offset]));
  } finally {
    await env.done();
  }
  return out;
}

test('query-block, query-blockstats, block-set-write-threshold and BLOCK_WRITE_THRESHOLD as qemu-storage-daemon 7.2', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await script('qemu-storage-daemon');
  const ours = await script('bitmirror');
  for (let i = 0; i < Math.max(theirs.length, ours.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
});
