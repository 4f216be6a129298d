import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { Core } from '../../src/core/core.js';
import { NullNode } from '../../src/block/drivers/null.js';
import type { NodeInfo } from '../../src/block/node.js';
import { visit, object } from '../../src/qapi/schema.js';
import { bitmapCommands } from '../../src/commands/bitmaps.js';
import { transactionCommands } from '../../src/commands/transaction.js';
import type { CommandDef } from '../../src/commands/registry.js';

const MiB = 2 ** 20;

function setup(size = 64 * MiB): { core: Core; node: NullNode } {
  const core = new Core();
  const node = new NullNode('n0', false, 'null-co', size, true, 0);
  core.graph.add(node);
  return { core, node };
}

const table = new Map<string, CommandDef>([...bitmapCommands, ...transactionCommands].map((c) => [c.name, c]));

/** Run a command as the QMP dispatcher would: check the arguments against its schema, then call it. */
async function qmp(core: Core, name: string, args: Record<string, unknown> = {}): Promise<unknown> {
  const cmd = table.get(name);
  assert.ok(cmd, name);
  const checked = visit(object(name, cmd.args), args, '') as Record<string, unknown>;
  return (await cmd.handler(checked, core)) ?? {};
}

async function qmpError(core: Core, name: string, args: Record<string, unknown>): Promise<string> {
  try {
    await qmp(core, name, args);
  } catch (err) {
    assert.equal((err as { errorClass?: string }).errorClass, 'GenericError');
    return (err as Error).message;
  }
  assert.fail(`${name} ${JSON.stringify(args)} succeeded`);
}

test('writes, write-zeroes and discards mark enabled bitmaps only', async () => {
  const { core, node } = setup();
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'a' });
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'off', disabled: true });
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'small', granularity: 512 });
  await node.write(0, Buffer.alloc(512, 0xab));
  await node.write(16 * MiB, Buffer.alloc(256 * 1024, 0xfe));
  await node.writeZeroes(32736 * 1024, 64 * 1024);
  await node.discard(40 * MiB + 100, 10);
  const info = core.bitmaps.info(node);
  assert.deepEqual(info, [
    { name: 'small', recording: true, persistent: false, busy: false, granularity: 512, count: 512 + 256 * 1024 + 64 * 1024 + 512 },
    { name: 'off', recording: false, persistent: false, busy: false, granularity: 65536, count: 0 },
    { name: 'a', recording: true, persistent: false, busy: false, granularity: 65536, count: 458752 + 65536 },
  ]);
  assert.deepEqual(core.bitmaps.info(node), info);
  const a = core.bitmaps.get(node, 'a');
  assert.deepEqual([...a.dirtyAreas()], [
    { offset: 0, bytes: 65536 },
    { offset: 16 * MiB, bytes: 256 * 1024 },
    { offset: 511 * 65536, bytes: 131072 }, // 32736 KiB + 64 KiB straddles two chunks
    { offset: 40 * MiB, bytes: 65536 },
  ]);
  // qcow2 order: chunk 256 (16 MiB) is bit 0 of byte 32.
  const buf = a.toBuffer();
  assert.equal(buf.length, 128);
  assert.equal(buf[0], 1);
  assert.equal(buf[32], 0x0f);
  // Removing the last bitmap drops the observer; writes still work.
  for (const n of ['a', 'off', 'small']) await qmp(core, 'block-dirty-bitmap-remove', { node: 'n0', name: n });
  assert.equal(core.bitmaps.info(node), undefined);
  await node.write(0, Buffer.alloc(512));
});

test('block-dirty-bitmap-add checks and messages', async () => {
  const { core, node } = setup();
  assert.equal(await qmpError(core, 'block-dirty-bitmap-add', { node: 'nx', name: '' }), 'Bitmap name cannot be empty');
  assert.equal(await qmpError(core, 'block-dirty-bitmap-add', { node: 'nx', name: 'a' }), "Cannot find device='nx' nor node-name='nx'");
  for (const g of [0, 256, 1000, 3000, 65535]) {
    assert.equal(await qmpError(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: g }), 'Granularity must be power of 2 and at least 512');
  }
  assert.equal(await qmpError(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'a', persistent: true }), "Can't store persistent bitmaps to n0: Operation not supported");
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: 2 ** 31 });
  assert.equal(await qmpError(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'a' }), 'Bitmap already exists: a');
  const long = 'x'.repeat(1024);
  assert.equal(await qmpError(core, 'block-dirty-bitmap-add', { node: 'n0', name: long }), `Bitmap name too long: ${long}`);
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: long.slice(1) });
  // Default granularity: cluster size clamped to [4 KiB, 64 KiB], 64 KiB if unknown.
  assert.equal(core.bitmaps.defaultGranularity(node), 65536);
  class Clustered extends NullNode {
    constructor(private readonly cs: number) {
      super(`c${cs}`, false, 'null-co', MiB, true, 0);
    }
    override nodeInfo(): NodeInfo {
      return { clusterSize: this.cs };
    }
  }
  assert.equal(core.bitmaps.defaultGranularity(new Clustered(512)), 4096);
  assert.equal(core.bitmaps.defaultGranularity(new Clustered(16384)), 16384);
  assert.equal(core.bitmaps.defaultGranularity(new Clustered(2 * MiB)), 65536);
});

test('lookups, busy, readonly and inconsistent checks', async () => {
  const { core, node } = setup();
  assert.equal(await qmpError(core, 'block-dirty-bitmap-remove', { node: 'nx', name: 'a' }), "Node 'nx' not found");
  assert.equal(await qmpError(core, 'block-dirty-bitmap-clear', { node: 'n0', name: 'zz' }), "Dirty bitmap 'zz' not found");
  assert.equal(await qmpError(core, 'x-debug-block-dirty-bitmap-sha256', { node: 'nx', name: 'a' }), "Node 'nx' not found");
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'a' });
  const a = core.bitmaps.get(node, 'a');
  core.bitmaps.setBusy(a, true);
  const busy = "Bitmap 'a' is currently in use by another operation and cannot be used";
  for (const c of ['block-dirty-bitmap-remove', 'block-dirty-bitmap-clear', 'block-dirty-bitmap-enable', 'block-dirty-bitmap-disable']) {
    assert.equal(await qmpError(core, c, { node: 'n0', name: 'a' }), busy, c);
  }
  core.bitmaps.setBusy(a, false);
  a.readonly = true;
  const ro = "Bitmap 'a' is readonly and cannot be modified";
  assert.equal(await qmpError(core, 'block-dirty-bitmap-clear', { node: 'n0', name: 'a' }), ro);
  assert.equal(await qmpError(core, 'block-dirty-bitmap-remove', { node: 'n0', name: 'a' }), ro);
  await qmp(core, 'block-dirty-bitmap-disable', { node: 'n0', name: 'a' });
  await qmp(core, 'block-dirty-bitmap-enable', { node: 'n0', name: 'a' });
  // A read-only bitmap forbids writes to the node.
  await assert.rejects(node.write(0, Buffer.alloc(512)), { code: 'EPERM' });
  a.readonly = false;
  a.inconsistent = true;
  a.persistent = true;
  try {
    await qmp(core, 'block-dirty-bitmap-enable', { node: 'n0', name: 'a' });
    assert.fail('enable of an inconsistent bitmap');
  } catch (err) {
    assert.equal((err as Error).message, "Bitmap 'a' is inconsistent and cannot be used");
    assert.equal((err as { hint?: string }).hint, 'Try block-dirty-bitmap-remove to delete this bitmap from disk');
  }
  assert.deepEqual(core.bitmaps.info(node)?.[0], { name: 'a', recording: true, persistent: true, busy: false, granularity: 65536, count: 0, inconsistent: true });
  await qmp(core, 'block-dirty-bitmap-remove', { node: 'n0', name: 'a' });
});

test('merge: strings and {node, name}, different granularities, target unchanged on error', async () => {
  const { core, node } = setup();
  const other = new NullNode('n1', false, 'null-co', 64 * MiB + 512, true, 0);
  core.graph.add(other);
  const same = new NullNode('n2', false, 'null-co', 64 * MiB, true, 0);
  core.graph.add(same);
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'd', granularity: 65536 });
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 's1', granularity: 4096 });
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n2', name: 's2', granularity: 1048576 });
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n1', name: 'c' });
  const d = core.bitmaps.get(node, 'd');
  core.bitmaps.disable(d);
  await node.write(4096, Buffer.alloc(4096));
  await same.write(10 * MiB, Buffer.alloc(1));
  const before = d.sha256();
  assert.equal(await qmpError(core, 'block-dirty-bitmap-merge', { node: 'n0', target: 'd', bitmaps: ['s1', 'zz'] }), "Dirty bitmap 'zz' not found");
  assert.equal(await qmpError(core, 'block-dirty-bitmap-merge', { node: 'n0', target: 'd', bitmaps: ['s1', { node: 'nx', name: 'zz' }] }), "Node 'nx' not found");
  assert.equal(
    await qmpError(core, 'block-dirty-bitmap-merge', { node: 'n0', target: 'd', bitmaps: ['s1', { node: 'n1', name: 'c' }] }),
    "Bitmaps are of different sizes (destination size is 67108864, source size is 67109376) and can't be merged",
  );
  assert.equal(await qmpError(core, 'block-dirty-bitmap-merge', { node: 'n0', target: 'zz', bitmaps: [] }), "Dirty bitmap 'zz' not found");
  assert.equal(d.sha256(), before);
  assert.equal(d.count(), 0);
  assert.equal(core.bitmaps.list(node).length, 2, 'the scratch bitmap is released');
  await qmp(core, 'block-dirty-bitmap-merge', { node: 'n0', target: 'd', bitmaps: ['s1', { node: 'n2', name: 's2' }] });
  assert.deepEqual([...d.dirtyAreas()], [
    { offset: 0, bytes: 65536 },
    { offset: 10 * MiB, bytes: MiB },
  ]);
  // The merge ORs: the target keeps its bits.
  await qmp(core, 'block-dirty-bitmap-clear', { node: 'n0', name: 's1' });
  await qmp(core, 'block-dirty-bitmap-merge', { node: 'n0', target: 'd', bitmaps: ['s1'] });
  assert.equal(d.count(), 65536 + MiB);
});

test('x-debug-block-dirty-bitmap-sha256 matches QEMU 7.2', async () => {
  const { core } = setup();
  core.graph.add(new NullNode('n1', false, 'null-co', 67109376, true, 0));
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'a', granularity: 2 ** 31 });
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n1', name: 'c', granularity: 65536 });
  // Values from qemu-storage-daemon 7.2 with the same null-co nodes and empty bitmaps.
  assert.deepEqual(await qmp(core, 'x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'a' }), { sha256: 'af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc' });
  assert.deepEqual(await qmp(core, 'x-debug-block-dirty-bitmap-sha256', { node: 'n1', name: 'c' }), { sha256: 'b707241545a346265aab1ffb32ff64b55bf8f8dc1b56a46ef33ce3d15db11d33' });
});

test('transactions are all-or-nothing (iotest 236 shape)', async () => {
  const { core, node } = setup();
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'A' });
  await qmp(core, 'block-dirty-bitmap-add', { node: 'n0', name: 'B' });
  for (const off of [0, 1, 2, 3]) await node.write(off * 4 * MiB, Buffer.alloc(65536));
  const snapshot = () => JSON.stringify(core.bitmaps.info(node));
  const initial = snapshot();
  const act = (type: string, data: Record<string, unknown>) => ({ type, data });
  assert.equal(
    await qmpError(core, 'transaction', {
      actions: [act('block-dirty-bitmap-disable', { node: 'n0', name: 'B' }), act('block-dirty-bitmap-add', { node: 'n0', name: 'C' }), act('block-dirty-bitmap-clear', { node: 'n0', name: 'A' }), act('abort', {})],
    }),
    'Transaction aborted using Abort action',
  );
  assert.equal(snapshot(), initial);
  // A failing action's own work and everything before it is undone; remove + later failure keeps the bitmap.
  assert.equal(
    await qmpError(core, 'transaction', {
      actions: [act('block-dirty-bitmap-remove', { node: 'n0', name: 'B' }), act('block-dirty-bitmap-merge', { node: 'n0', target: 'A', bitmaps: ['B'] })],
    }),
    "Bitmap 'B' is currently in use by another operation and cannot be used",
  );
  assert.equal(snapshot(), initial);
  assert.equal(
    await qmpError(core, 'transaction', { actions: [act('block-dirty-bitmap-add', { node: 'n0', name: 'T' })], properties: { 'completion-mode': 'grouped' } }),
    "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped",
  );
  assert.equal(await qmpError(core, 'transaction', { actions: [act('abort', {})], properties: { 'completion-mode': 'grouped' } }), 'Transaction aborted using Abort action');
  assert.equal(await qmpError(core, 'transaction', { actions: [{ type: 'abort' }] }), "Parameter 'actions[0].data' is missing");
  assert.equal(snapshot(), initial);
  // Now for real: disable B, add C, disable C, enable C.
  await qmp(core, 'transaction', {
    actions: [act('block-dirty-bitmap-disable', { node: 'n0', name: 'B' }), act('block-dirty-bitmap-add', { node: 'n0', name: 'C' }), act('block-dirty-bitmap-disable', { node: 'n0', name: 'C' }), act('block-dirty-bitmap-enable', { node: 'n0', name: 'C' })],
  });
  await node.write(20 * MiB, Buffer.alloc(3 * 65536));
  assert.deepEqual(
    core.bitmaps.info(node)?.map((b) => [b.name, b.count, b.recording]),
    [
      ['C', 196608, true],
      ['B', 262144, false],
      ['A', 458752, true],
    ],
  );
  // [add D disabled, merge B and C into D, abort] rolls back; then for real D == A.
  const mk = [act('block-dirty-bitmap-add', { node: 'n0', name: 'D', disabled: true }), act('block-dirty-bitmap-merge', { node: 'n0', target: 'D', bitmaps: ['B', 'C'] })];
  await qmpError(core, 'transaction', { actions: [...mk, act('abort', {})] });
  assert.equal(core.bitmaps.find(node, 'D'), undefined);
  await qmp(core, 'transaction', { actions: mk });
  assert.equal((await qmp(core, 'x-debug-block-dirty-bitmap-sha256', { node: 'n0', name: 'D' }) as { sha256: string }).sha256, core.bitmaps.get(node, 'A').sha256());
  // add then remove in one transaction; remove then clear fails on busy.
  await qmp(core, 'transaction', { actions: [act('block-dirty-bitmap-add', { node: 'n0', name: 'E' }), act('block-dirty-bitmap-remove', { node: 'n0', name: 'E' })] });
  assert.equal(core.bitmaps.find(node, 'E'), undefined);
  await qmp(core, 'transaction', { actions: [act('block-dirty-bitmap-clear', { node: 'n0', name: 'A' }), act('block-dirty-bitmap-remove', { node: 'n0', name: 'B' })] });
  assert.equal(core.bitmaps.get(node, 'A').count(), 0);
  assert.equal(core.bitmaps.find(node, 'B'), undefined);
});

test('job API: anonymous bitmaps, copies and successors', async () => {
  const { core, node } = setup();
  const bm = await core.bitmaps.add(node, 'bitmap0');
  await node.write(0, Buffer.alloc(65536));
  const anon = core.bitmaps.createAnonymous(node);
  assert.equal(anon.name, undefined);
  const frozen = core.bitmaps.copy(bm);
  assert.equal(frozen.enabled, false);
  await node.write(MiB, Buffer.alloc(1));
  assert.equal(anon.count(), 65536);
  assert.equal(frozen.count(), 65536);
  assert.equal(bm.count(), 131072);
  assert.deepEqual(core.bitmaps.info(node)?.[0], { recording: false, persistent: false, busy: false, granularity: 65536, count: 65536 });
  core.bitmaps.release(frozen);
  core.bitmaps.release(anon);
  anon.resetDirtyInside(100, MiB);
  // Backup: freeze bitmap0, record into the successor, then fail (reclaim) or succeed (abdicate).
  const succ = core.bitmaps.createSuccessor(bm);
  assert.deepEqual(bm.info(), { name: 'bitmap0', recording: true, persistent: false, busy: true, granularity: 65536, count: 131072 });
  await node.write(2 * MiB, Buffer.alloc(1));
  assert.equal(succ.count(), 65536);
  assert.equal(bm.count(), 131072);
  core.bitmaps.reclaim(bm);
  assert.equal(bm.count(), 196608);
  assert.equal(bm.busy, false);
  assert.equal(bm.enabled, true);
  core.bitmaps.createSuccessor(bm);
  await node.write(3 * MiB, Buffer.alloc(1));
  const next = core.bitmaps.abdicate(bm);
  assert.equal(next.name, 'bitmap0');
  assert.equal(next.count(), 65536);
  assert.equal(core.bitmaps.list(node).length, 1);
  assert.equal(core.bitmaps.get(node, 'bitmap0'), next);
  // Resize follows the node.
  core.bitmaps.truncate(node, 128 * MiB);
  assert.equal(next.size, 128 * MiB);
});
