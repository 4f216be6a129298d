/**
 * Options bitmirror takes without acting on them are still checked as qemu-storage-daemon 7.2 checks
 * them: qcow2's metadata cache sizes, cache-clean-interval, overlap-check and lazy-refcounts, at open
 * and at reopen, and the file driver's pr-manager. The same QMP script runs against both daemons and
 * every reply must be the same: what QEMU refuses is refused with its message, what it takes is taken.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { haveQsd, setup, type Env } from '../support/daemon.js';
import { recorder, type Replay } from '../support/qmp-replay.js';
import { mustRun } from '../support/tools.js';

const skip = !haveQsd && 'qemu-storage-daemon not installed';

async function replay(program: 'bitmirror' | 'qemu-storage-daemon', script: (r: Replay, env: Env) => Promise<void>): Promise<unknown[]> {
  const env = await setup(`open-options-${program === 'bitmirror' ? 'bm' : 'qsd'}`, program);
  try {
    const r = recorder(env);
    await script(r, env);
    return r.replies;
  } finally {
    await env.done();
  }
}

test('qcow2 cache, clean-interval, overlap-check and lazy-refcounts options and file pr-manager: refused and taken as qemu-storage-daemon 7.2', { skip }, async () => {
  const script = async (r: Replay, env: Env) => {
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', env.f('a.qcow2'), '1M']);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', env.f('v2.qcow2'), '1M']);
    await r.request('blockdev-add', { driver: 'file', 'node-name': 'f', filename: env.f('a.qcow2') });
    await r.request('blockdev-add', { driver: 'file', 'node-name': 'f2', filename: env.f('v2.qcow2') });
    const cases: Array<Record<string, unknown>> = [
      { 'cache-size': 1_000_000, 'l2-cache-size': 500_000, 'refcount-cache-size': 500_000 },
      { 'cache-size': 100_000, 'l2-cache-size': 500_000 },
      { 'cache-size': 100, 'refcount-cache-size': 200 },
      { 'cache-size': 100, 'refcount-cache-size': 50 },
      { 'cache-size': 1 },
      { 'cache-size': -1 },
      { 'refcount-cache-size': -5, 'l2-cache-entry-size': -1 },
      { 'l2-cache-entry-size': 1000 },
      { 'l2-cache-entry-size': 256 },
      { 'l2-cache-entry-size': 131072 },
      { 'l2-cache-entry-size': 4096, 'l2-cache-size': 1 },
      // An L2 cache larger than every table of the image is cut to what it can use; refcounts are not.
      { 'l2-cache-size': 10 ** 13 },
      { 'refcount-cache-size': 10 ** 13 },
      { 'cache-size': 10 ** 13 },
      { 'refcount-cache-size': 2 ** 62 },
      { 'cache-clean-interval': -1 },
      { 'cache-clean-interval': 2 ** 32 },
      { 'cache-clean-interval': 2 ** 32 - 1 },
      { 'overlap-check': 'bogus' },
      { 'overlap-check': 'cached' },
      { 'overlap-check': { template: 'all', 'main-header': false } },
      { 'overlap-check': { template: 'bogus' } },
      { 'lazy-refcounts': true },
    ];
    for (const extra of cases) {
      await r.request('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: 'f', ...extra });
      await r.request('blockdev-del', { 'node-name': 'q' });
    }
    // A version 2 image has no lazy refcounts.
    await r.request('blockdev-add', { driver: 'qcow2', 'node-name': 'q2', file: 'f2', 'lazy-refcounts': true });
    await r.request('blockdev-add', { driver: 'qcow2', 'node-name': 'q2', file: 'f2' });
    await r.request('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q2', file: 'f2', 'lazy-refcounts': true }] });
    await r.request('blockdev-del', { 'node-name': 'q2' });
    // The same checks at reopen; a refused reopen changes nothing.
    await r.request('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: 'f', 'cache-size': 1_000_000 });
    for (const extra of [{ 'cache-size': 100, 'refcount-cache-size': 200 }, { 'l2-cache-entry-size': 1000 }, { 'cache-clean-interval': 2 ** 32 }, { 'l2-cache-size': 65536 }]) {
      await r.request('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'f', ...extra }] });
    }
    await r.request('blockdev-del', { 'node-name': 'q' });
    // No persistent reservation manager exists, whatever else is wrong with the node.
    await r.request('blockdev-add', { driver: 'file', 'node-name': 'g', filename: env.f('nope'), 'pr-manager': 'x' });
    await r.request('blockdev-add', { driver: 'file', 'node-name': 'g', filename: env.f('a.qcow2'), 'pr-manager': 'x', aio: 'native' });
    await r.request('blockdev-add', { driver: 'host_device', 'node-name': 'g', filename: env.f('a.qcow2'), 'pr-manager': 'x' });
  };
  const theirs = await replay('qemu-storage-daemon', script);
  const ours = await replay('bitmirror', script);
  for (let i = 0; i < Math.max(ours.length, theirs.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
  // Not all refused: the script also holds options QEMU takes.
  assert.ok(ours.filter((x) => JSON.stringify(x).includes('class')).length > 10);
  assert.ok(ours.filter((x) => JSON.stringify(x) === '["blockdev-add",{}]').length > 5);
});
