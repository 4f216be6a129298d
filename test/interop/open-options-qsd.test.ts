/**
 * Options bitmirror once took without acting on them, against qemu-storage-daemon 7.2: qcow2's
 * metadata cache sizes, cache-clean-interval, overlap-check and lazy-refcounts (checked at open and at
 * reopen), the file driver's pr-manager, block-export-add's id and iothread (checked in QEMU's order)
 * and its writethrough (every write reaches the node below with FUA). The same QMP script runs
 * against both daemons and every reply must be the same: what QEMU refuses is refused with its
 * message, what it takes is taken.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { haveQsd, poll, type Env } from '../support/daemon.js';
import { replayOn, type Replay } from '../support/qmp-replay.js';
import { mustRun } from '../support/tools.js';

const skip = !haveQsd && 'qemu-storage-daemon not installed';

function replay(program: 'bitmirror' | 'qemu-storage-daemon', script: (r: Replay, env: Env) => Promise<void>): Promise<unknown[]> {
  return replayOn(program, 'open-options', script);
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

test('block-export-add: id, node, iothread and server checked in QEMU 7.2\'s order; writethrough=on sends every write down with FUA (nbdkit\'s log), as qemu-storage-daemon 7.2', { skip }, async () => {
  const fuaSeen: Record<string, string[]> = {};
  const script = (program: string) => async (r: Replay, env: Env) => {
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', env.f('a.raw'), '1M']);
    await r.request('blockdev-add', { driver: 'file', 'node-name': 'f', filename: env.f('a.raw') });
    await r.request('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'nope', iothread: 'x' });
    await r.request('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'f', iothread: 'x' });
    await r.request('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'f' });
    await r.request('nbd-server-add', { device: 'nope' });
    await r.request('nbd-server-add', { device: 'f' });
    const sock = env.f('nbd.sock');
    await r.request('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await r.request('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'f' });
    await r.request('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'nope' });
    await r.request('block-export-add', { type: 'nbd', id: 'e 3', 'node-name': 'nope' });
    await r.request('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'f', iothread: 'x', name: 'f' });
    await r.request('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'f', name: 'f' });
    // writethrough: an nbd node on nbdkit (whose log shows each write's FUA flag), exported twice.
    const kitSock = env.f('kit.sock');
    const log = env.f('kit.log');
    // nbdkit forks once it listens; its pid file follows.
    const pidFile = env.f('kit.pid');
    await mustRun('nbdkit', ['-P', pidFile, '-U', kitSock, '--filter=log', 'memory', '1M', `logfile=${log}`]);
    await poll('nbdkit pid file', async () => /^\d+\s*$/.test(await readFile(pidFile, 'utf8').catch(() => '')));
    const kitPid = Number((await readFile(pidFile, 'utf8')).trim());
    try {
      await r.request('blockdev-add', { driver: 'nbd', 'node-name': 'n', server: { type: 'unix', path: kitSock }, export: '' });
      await r.request('block-export-add', { type: 'nbd', id: 'wt', 'node-name': 'n', name: 'wt', writable: true, writethrough: true });
      await r.request('block-export-add', { type: 'nbd', id: 'wb', 'node-name': 'n', name: 'wb', writable: true });
      // qemu-io in writeback mode sends no FUA of its own.
      const guest = (name: string, cmds: string[]) => mustRun('qemu-io', ['-f', 'raw', '-t', 'writeback', ...cmds.flatMap((c) => ['-c', c]), `nbd+unix:///${name}?socket=${sock}`]);
      await guest('wb', ['write -P 1 0 64k', 'write -z 64k 64k']);
      await guest('wt', ['write -P 2 128k 64k', 'write -z 192k 64k']);
      await guest('wb', ['read -P 1 0 64k', 'read -P 2 128k 64k']);
      await r.request('block-export-del', { id: 'wt', mode: 'hard' });
      await r.request('block-export-del', { id: 'wb', mode: 'hard' });
      await poll('exports gone', async () => (await env.d.qmp.execute<unknown[]>('query-block-exports')).length <= 1);
      await r.request('blockdev-del', { 'node-name': 'n' });
    } finally {
      process.kill(kitPid, 'SIGTERM');
      // Gone, so its log is complete before it is read.
      await poll('nbdkit gone', async () => {
        try {
          process.kill(kitPid, 0);
          return false;
        } catch {
          return true;
        }
      });
    }
    // The writes nbdkit saw, as offset and FUA flag (zeroes as Zero), in order.
    const text = await readFile(log, 'utf8');
    fuaSeen[program] = [...text.matchAll(/ (Write|Zero) id=\d+ offset=(0x[0-9a-f]+) count=0x[0-9a-f]+ [^\n]*?fua=(\d)/g)].map((m) => `${m[1]} ${m[2]} fua=${m[3]}`);
  };
  const theirs = await replay('qemu-storage-daemon', script('qemu-storage-daemon'));
  const ours = await replay('bitmirror', script('bitmirror'));
  for (let i = 0; i < Math.max(ours.length, theirs.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
  assert.deepEqual(fuaSeen.bitmirror, fuaSeen['qemu-storage-daemon']);
  assert.deepEqual(fuaSeen.bitmirror, ['Write 0x0 fua=0', 'Zero 0x10000 fua=0', 'Write 0x20000 fua=1', 'Zero 0x30000 fua=1']);
});
