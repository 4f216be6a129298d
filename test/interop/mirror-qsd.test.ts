/**
 * The same mirror QMP script against qemu-storage-daemon 7.2 and bitmirror: start-time refusals, verb
 * refusals and the event sequences (auto-finalize=false/auto-dismiss=false, cancel before and after
 * READY, job-cancel in PENDING) must be equal. Data is written by qemu-io before the daemon starts.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, haveQsd, summarise, eventsUntil, type Env } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

async function script(program: 'bitmirror' | 'qemu-storage-daemon'): Promise<unknown[]> {
  const env: Env = await setup(`mq-${program}`, program);
  const out: unknown[] = [];
  try {
    const { qmp } = env.d;
    const src = env.f('src.qcow2');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', src, '64M']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x22 40M 1M', src]);
    for (const [name, size] of [['tgt', '64M'], ['small', '32M'], ['tgt2', '64M']] as const) await mustRun('qemu-img', ['create', '-f', 'qcow2', env.f(`${name}.qcow2`), size]);
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    for (const name of ['tgt', 'small', 'tgt2']) await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': name, file: { driver: 'file', filename: env.f(`${name}.qcow2`) } });
    const r = async (cmd: string, args: Record<string, unknown>) => {
      const rep = await qmp.request(cmd, args);
      out.push([cmd, 'error' in rep ? rep.error : rep.return]);
    };
    const base = { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full' };
    await r('blockdev-mirror', { ...base, device: 'nope' });
    await r('blockdev-mirror', { ...base, target: 'nope' });
    await r('blockdev-mirror', { ...base, target: 'src' });
    await r('blockdev-mirror', { ...base, speed: -1 });
    await r('blockdev-mirror', { ...base, granularity: 100 });
    await r('blockdev-mirror', { ...base, granularity: 12288 });
    await r('blockdev-mirror', { ...base, 'buf-size': -1 });
    // (sync=incremental/bitmap differ on purpose: bitmirror has Proxmox's variant.)
    await r('blockdev-mirror', { ...base, 'job-id': '1bad' });
    await r('blockdev-mirror', { ...base, replaces: 'nope' });
    await r('blockdev-mirror', { ...base, replaces: 'small' });
    await r('block-job-cancel', { device: 'nope' });
    await r('job-cancel', { id: 'nope' });
    // Size mismatch fails when the job runs.
    env.d.qmp.events.splice(0);
    await r('blockdev-mirror', { ...base, target: 'small' });
    out.push(summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' }), ['error']));
    // A throttled job with auto-finalize/dismiss off: verb refusals, then the whole sequence.
    await r('blockdev-mirror', { ...base, speed: 1, 'auto-finalize': false, 'auto-dismiss': false, 'filter-node-name': 'top' });
    await r('blockdev-mirror', { ...base, 'job-id': 'k', target: 'tgt2' });
    await r('blockdev-mirror', { ...base, device: 'top', target: 'tgt2' });
    await r('blockdev-mirror', { ...base, 'job-id': 'k', device: 'tgt2', target: 'tgt' });
    for (const v of ['complete', 'finalize', 'dismiss']) await r(`job-${v}`, { id: 'j' });
    await r('block-job-set-speed', { device: 'j', speed: 0 });
    await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'j' });
    for (const v of ['finalize', 'dismiss']) await r(`job-${v}`, { id: 'j' });
    await r('job-pause', { id: 'j' });
    await r('job-pause', { id: 'j' });
    await r('block-job-cancel', { device: 'j' });
    await r('job-resume', { id: 'j' });
    await r('job-complete', { id: 'j' });
    out.push(summarise(await eventsUntil(env, 'BLOCK_JOB_PENDING', { id: 'j' })));
    await r('job-finalize', { id: 'j' });
    out.push(summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' })));
    await r('job-dismiss', { id: 'j' });
    out.push(summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' })));
    // After the pivot 'tgt' took src's place (it is no root any more? it has no parent here): mirror
    // the target onward into tgt2, cancel before READY, after READY soft and force, and in PENDING.
    for (const [how, when] of [
      ['soft', 'before'],
      ['soft', 'after'],
      ['force', 'after'],
      ['job-cancel', 'pending'],
    ] as const) {
      await r('blockdev-mirror', { 'job-id': 'c', device: 'tgt', target: 'tgt2', sync: 'full', ...(when === 'before' ? { speed: 65536, 'buf-size': 65536 } : {}), ...(when === 'pending' ? { 'auto-finalize': false } : {}) });
      if (when !== 'before') await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'c' });
      if (when === 'pending') {
        await r('job-complete', { id: 'c' });
        await eventsUntil(env, 'BLOCK_JOB_PENDING', { id: 'c' });
      }
      env.d.qmp.events.splice(0);
      if (how === 'job-cancel') await r('job-cancel', { id: 'c' });
      else await r('block-job-cancel', { device: 'c', force: how === 'force' });
      out.push([how, when, summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'c', status: 'null' }))]);
    }
  } finally {
    await env.done();
  }
  return out;
}

test('mirror QMP script: replies and event sequences equal to qemu-storage-daemon 7.2', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await script('qemu-storage-daemon');
  const ours = await script('bitmirror');
  for (let i = 0; i < Math.max(theirs.length, ours.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
});
