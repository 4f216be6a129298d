/**
 * Dirty bitmap commands and transactions over a real QMP socket, side by side with QEMU 7.2's
 * qemu-storage-daemon: the same command sequence must give the same replies (errors word for word,
 * query output, sha256 after the same writes). Writes go through HMP qemu-io on bitmirror and through
 * an NBD export plus qemu-io on QEMU.
 */
import { test, before, after } from 'node:test';
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import { promises as fsp, existsSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';

const MiB = 2 ** 20;
const haveQemu = existsSync('/usr/bin/qemu-storage-daemon') && existsSync('/usr/bin/qemu-io');
const BLOCKDEVS = ['--blockdev', `null-co,node-name=n0,size=${64 * MiB},read-zeroes=on`, '--blockdev', `null-co,node-name=n1,size=${64 * MiB + 512},read-zeroes=on`];

let dir: string;
let bm: SpawnedDaemon;
let qemu: SpawnedDaemon | undefined;

before(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-bitmaps-'));
  bm = await spawnDaemon(path.join(dir, 'bm.sock'), BLOCKDEVS);
  if (haveQemu) {
    qemu = await spawnDaemon(path.join(dir, 'qsd.sock'), BLOCKDEVS, 'qemu-storage-daemon');
    await qemu.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: path.join(dir, 'nbd.sock') } } });
    await qemu.qmp.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'n0', writable: true });
  }
});

after(async () => {
  assert.equal(await bm.stop(), 0, bm.stderr());
  assert.doesNotMatch(bm.stderr(), /internal error/);
  if (qemu) await qemu.stop();
  await fsp.rm(dir, { recursive: true, force: true });
});

type Reply = { return: unknown } | { error: { class: string; desc: string } };

async function call(d: SpawnedDaemon, cmd: string, args?: Record<string, unknown>): Promise<Reply> {
  try {
    return { return: await d.qmp.execute(cmd, args) };
  } catch (err) {
    const e = err as { errorClass?: string; message: string };
    return { error: { class: e.errorClass ?? '?', desc: e.message } };
  }
}

/** Write through each daemon's own path: HMP qemu-io for bitmirror, qemu-io over NBD for QEMU. */
async function write(d: SpawnedDaemon, offset: number, bytes: number): Promise<void> {
  if (d === bm) {
    await bm.qmp.hmp(`qemu-io n0 "write ${offset} ${bytes}"`);
    return;
  }
  const url = `nbd+unix:///n0?socket=${path.join(dir, 'nbd.sock')}`;
  await new Promise<void>((resolve, reject) =>
    execFile('qemu-io', ['-f', 'raw', url, '-c', `write ${offset} ${bytes}`], (err, _out, stderr) => (err ? reject(new Error(stderr)) : resolve())),
  );
}

function bitmapsOf(nodes: unknown, name: string): unknown {
  return (nodes as Array<Record<string, unknown>>).find((n) => n['node-name'] === name)?.['dirty-bitmaps'];
}

const act = (type: string, data: Record<string, unknown>) => ({ type, data });

/** The sequence both daemons run; each step's reply is compared. */
const STEPS: Array<[string, Record<string, unknown>] | ['write', number, number] | ['query']> = [
  ['block-dirty-bitmap-add', { node: 'n0', name: '' }],
  ['block-dirty-bitmap-add', { node: 'nx', name: 'a' }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: 1000 }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: 256 }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'a', persistent: true }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'x'.repeat(1024) }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'A' }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'A' }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'B', granularity: 512 }],
  ['block-dirty-bitmap-add', { node: 'n0', name: 'off', disabled: true }],
  ['block-dirty-bitmap-add', { node: 'n1', name: 'c' }],
  ['write', 0, 512],
  ['write', 16 * MiB, 256 * 1024],
  ['write', 32736 * 1024, 64 * 1024],
  ['query'],
  ['block-dirty-bitmap-remove', { node: 'nx', name: 'A' }],
  ['block-dirty-bitmap-remove', { node: 'n0', name: 'zz' }],
  ['block-dirty-bitmap-clear', { node: 'n0', name: 'zz' }],
  ['block-dirty-bitmap-enable', { node: 'n0', name: 'zz' }],
  ['block-dirty-bitmap-merge', { node: 'n0', target: 'zz', bitmaps: ['A'] }],
  ['block-dirty-bitmap-merge', { node: 'n0', target: 'off', bitmaps: ['A', 'zz'] }],
  ['block-dirty-bitmap-merge', { node: 'n0', target: 'off', bitmaps: [{ node: 'nx', name: 'A' }] }],
  ['block-dirty-bitmap-merge', { node: 'n0', target: 'off', bitmaps: ['B', { node: 'n1', name: 'c' }] }],
  ['x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'off' }],
  ['block-dirty-bitmap-merge', { node: 'n0', target: 'off', bitmaps: ['B', { node: 'n0', name: 'A' }] }],
  ['x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'A' }],
  ['x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'B' }],
  ['x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'off' }],
  ['x-debug-block-dirty-bitmap-sha256', { node: 'nx', name: 'A' }],
  ['transaction', { actions: [act('block-dirty-bitmap-disable', { node: 'n0', name: 'A' }), act('block-dirty-bitmap-add', { node: 'n0', name: 'C' }), act('block-dirty-bitmap-clear', { node: 'n0', name: 'B' }), act('abort', {})] }],
  ['transaction', { actions: [act('block-dirty-bitmap-add', { node: 'n0', name: 'T' })], properties: { 'completion-mode': 'grouped' } }],
  ['transaction', { actions: [act('block-dirty-bitmap-remove', { node: 'n0', name: 'B' }), act('block-dirty-bitmap-clear', { node: 'n0', name: 'B' })] }],
  ['transaction', { actions: [act('block-dirty-bitmap-add', { node: 'n0', name: 'D' })] }],
  ['transaction', { actions: [{ type: 'abort' }] }],
  ['transaction', { actions: [] }],
  ['query'],
  ['transaction', { actions: [act('block-dirty-bitmap-disable', { node: 'n0', name: 'A' }), act('block-dirty-bitmap-clear', { node: 'n0', name: 'B' }), act('block-dirty-bitmap-add', { node: 'n0', name: 'C', granularity: 4096 }), act('block-dirty-bitmap-merge', { node: 'n0', target: 'C', bitmaps: ['A'] }), act('block-dirty-bitmap-remove', { node: 'n0', name: 'D' })] }],
  ['write', 40 * MiB, 3 * 65536],
  ['query'],
  ['x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'C' }],
  ['block-dirty-bitmap-enable', { node: 'n0', name: 'A' }],
  ['block-dirty-bitmap-remove', { node: 'n0', name: 'A' }],
  ['block-dirty-bitmap-remove', { node: 'n0', name: 'B' }],
  ['block-dirty-bitmap-remove', { node: 'n0', name: 'C' }],
  ['block-dirty-bitmap-remove', { node: 'n0', name: 'off' }],
  ['block-dirty-bitmap-remove', { node: 'n0', name: 'x'.repeat(1023) }],
  ['query'],
];

async function runSteps(d: SpawnedDaemon): Promise<unknown[]> {
  const out: unknown[] = [];
  for (const step of STEPS) {
    if (step[0] === 'write') {
      await write(d, step[1] as number, step[2] as number);
    } else if (step[0] === 'query') {
      const r = await call(d, 'query-named-block-nodes');
      out.push('return' in r ? { n0: bitmapsOf(r.return, 'n0') ?? null, n1: bitmapsOf(r.return, 'n1') ?? null } : r);
    } else {
      out.push(await call(d, step[0], step[1] as Record<string, unknown>));
    }
  }
  return out;
}

test('bitmap commands over QMP give the same replies as qemu-storage-daemon', { skip: !haveQemu && 'qemu-storage-daemon or qemu-io not installed' }, async () => {
  const mine = await runSteps(bm);
  const theirs = await runSteps(qemu!);
  for (let i = 0; i < STEPS.length; i++) {
    assert.deepEqual(mine[i], theirs[i], `step ${i}: ${JSON.stringify(STEPS[i]).slice(0, 200)}`);
  }
});

test('writes mark bitmaps on bitmirror alone (iotest 124 counts)', async () => {
  const q = bm.qmp;
  await q.execute('block-dirty-bitmap-add', { node: 'n1', name: 'inc' });
  for (const [off, len] of [
    [0, 512],
    [16 * MiB, 256 * 1024],
    [32736 * 1024, 64 * 1024],
  ]) {
    await q.hmp(`qemu-io n1 "write ${off} ${len}"`);
  }
  const nodes = await q.execute('query-named-block-nodes');
  const list = bitmapsOf(nodes, 'n1') as Array<Record<string, unknown>>;
  const inc = list.find((b) => b.name === 'inc');
  assert.equal(inc?.count, 458752);
  await q.execute('block-dirty-bitmap-remove', { node: 'n1', name: 'inc' });
});
