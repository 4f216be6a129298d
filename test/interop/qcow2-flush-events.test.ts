/**
 * Flushes a qcow2 node makes of its file while it allocates are its own (issue 10 item 4): as in
 * QEMU, only a flush request made to the qcow2 node raises blkdebug's flush_to_disk below it. A mirror
 * onto a qcow2 target over blkdebug with a rule on flush_to_disk copies every allocating write and
 * fails at the job's flush, with the same events as qemu-storage-daemon 7.2.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { haveQsd, setup, summarise, eventsUntil, type Env } from '../support/daemon.js';
import { mustRun, run } from '../support/tools.js';

async function mirrorOntoFlushRule(program: 'bitmirror' | 'qemu-storage-daemon'): Promise<string[]> {
  const env: Env = await setup('flushev', program);
  try {
    const src = env.f('src.qcow2');
    const tgt = env.f('tgt.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', src, '16M']);
    // Writes that need new L2 tables and data clusters in the target (several L1 entries with 4 KiB clusters).
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 5M 64k', '-c', 'write -P 0x33 9M 4k', '-c', 'write -P 0x44 15M 1M', src]);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', tgt, '16M']);
    const { qmp } = env.d;
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    await qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'tgt',
      file: { driver: 'blkdebug', image: { driver: 'file', filename: tgt }, 'inject-error': [{ event: 'flush_to_disk', errno: 5, once: true }] },
    });
    await qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full' });
    const events = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
    // Every byte was copied before the job failed: the failure is the job's flush, not a data write.
    const completed = events.find((e) => e.event === 'BLOCK_JOB_COMPLETED');
    assert.ok(completed && completed.data!.offset === completed.data!.len, `${program}: all copied before the failure: ${JSON.stringify(completed?.data)}`);
    await qmp.execute('blockdev-del', { 'node-name': 'tgt' });
    await qmp.execute('blockdev-del', { 'node-name': 'src' });
    const cmp = await run('qemu-img', ['compare', src, tgt]);
    assert.equal(cmp.code, 0, `${program}: the target holds the source's data: ${cmp.stdout}${cmp.stderr}`);
    // (len differs: QEMU counts the whole disk for sync=full, bitmirror the allocated part.)
    return summarise(events, ['operation', 'action', 'error']);
  } finally {
    await env.done();
  }
}

test('an allocating qcow2 write raises no flush_to_disk below it: mirror events equal to qemu-storage-daemon 7.2', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await mirrorOntoFlushRule('qemu-storage-daemon');
  const ours = await mirrorOntoFlushRule('bitmirror');
  assert.deepEqual(ours, theirs);
});
