/**
 * The permission model without a daemon: QEMU's rules for what a node passes to its children, conflicts
 * between parents with QEMU's messages, nothing changed by a failed graph change, and the file driver's
 * lock bytes following the cumulative permissions of the file node's parents.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { BlockNode } from '../../src/block/node.js';
import { nullDriver } from '../../src/block/drivers/null.js';
import { rawDriver } from '../../src/block/drivers/raw.js';
import { fileDriver, FileNode } from '../../src/block/drivers/file.js';
import {
  BLK_PERM_ALL,
  BLK_PERM_CONSISTENT_READ as READ,
  BLK_PERM_RESIZE as RESIZE,
  BLK_PERM_WRITE as WRITE,
  BLK_PERM_WRITE_UNCHANGED as WRITE_UNCHANGED,
  defaultChildPermissions,
  jobParent,
  MONITOR_PARENT,
  permNames,
  unnamedBackend,
} from '../../src/block/permissions.js';
import { nativeAddon } from '../../src/block/native.js';

function graph(): BlockGraph {
  const g = new BlockGraph();
  for (const d of [nullDriver, rawDriver, fileDriver]) g.registerDriver(d);
  return g;
}

test('what a node passes to its children follows QEMU 7.2 (bdrv_default_perms)', () => {
  // A writable qcow2 nobody uses still writes metadata: read, write, resize; shares neither write nor resize.
  assert.deepEqual(defaultChildPermissions('image', true, 0, BLK_PERM_ALL), { perm: READ | WRITE | RESIZE, shared: READ | WRITE_UNCHANGED });
  assert.deepEqual(defaultChildPermissions('image', false, 0, BLK_PERM_ALL), { perm: READ, shared: READ | WRITE_UNCHANGED });
  // A filter passes its parents' needs through, and shares what they share.
  assert.deepEqual(defaultChildPermissions('filtered', true, READ | WRITE, READ | WRITE_UNCHANGED), { perm: READ | WRITE, shared: READ | WRITE_UNCHANGED });
  // A backing file is read consistently if the parent reads; written by others only if the parent tolerates it.
  assert.deepEqual(defaultChildPermissions('cow', true, READ | WRITE | RESIZE, READ), { perm: READ, shared: READ | WRITE_UNCHANGED });
  assert.deepEqual(defaultChildPermissions('cow', true, READ, BLK_PERM_ALL), { perm: READ, shared: BLK_PERM_ALL });
  // raw with an offset: data role, but write and resize only when a parent asks.
  assert.deepEqual(defaultChildPermissions('data', true, READ, BLK_PERM_ALL, true), { perm: READ, shared: READ | WRITE | WRITE_UNCHANGED });
  assert.equal(permNames(READ | WRITE | RESIZE), 'consistent read, write, resize');
});

test('two writers on one node conflict, named as QEMU names them, and nothing changes', async () => {
  const g = graph();
  const n = await g.open({ driver: 'null-co', 'node-name': 'n', size: 1 << 20 });
  const r = await g.open({ driver: 'raw', 'node-name': 'r', file: 'n' });
  assert.deepEqual([r.child('file')!.perm, r.child('file')!.shared], [0, BLK_PERM_ALL], 'raw nobody uses takes nothing');
  const guest = r.attachParent(unnamedBackend(), 'root', READ | WRITE, READ | WRITE_UNCHANGED);
  assert.deepEqual([r.child('file')!.perm, r.child('file')!.shared], [READ | WRITE, READ | WRITE_UNCHANGED], 'raw passes its parent through');
  assert.throws(() => n.attachParent(jobParent('backup', 'j'), 'target', WRITE, BLK_PERM_ALL), {
    message:
      "Permission conflict on node 'n': permissions 'write' are both required by backup job 'j' (uses node 'n' as 'target' child) " +
      "and unshared by node 'r' (uses node 'n' as 'file' child).",
  });
  assert.equal(n.parents.length, 1, 'the failed attach left no edge');
  // The other direction: the newcomer does not share what an existing parent takes.
  assert.throws(() => n.attachParent(unnamedBackend(), 'root', READ, READ), {
    message:
      "Permission conflict on node 'n': permissions 'write' are both required by node 'r' (uses node 'n' as 'file' child) " +
      "and unshared by an unnamed block device (uses node 'n' as 'root' child).",
  });
  // Raising an existing parent's needs is checked the same way and undone on failure.
  const reader = n.attachParent(unnamedBackend(), 'root', READ, BLK_PERM_ALL);
  BlockNode.detachParent(guest);
  assert.deepEqual([r.child('file')!.perm, r.child('file')!.shared], [0, BLK_PERM_ALL], 'detaching releases');
  BlockNode.setParentPermissions(reader, READ | WRITE, READ);
  const w = r.attachParent(unnamedBackend(), 'root', READ, READ | WRITE | WRITE_UNCHANGED);
  assert.throws(() => BlockNode.setParentPermissions(w, READ | WRITE, READ | WRITE | WRITE_UNCHANGED), /permissions 'write' are both required by node 'r'/);
  assert.deepEqual([w.perm, r.child('file')!.perm], [READ, READ], 'the failed change was undone');
  await g.closeAll();
});

test('a read-only node refuses writers; the monitor and job claims take nothing and stay at their node', async () => {
  const g = graph();
  const ro = await g.open({ driver: 'null-co', 'node-name': 'ro', size: 1 << 20, 'read-only': true });
  assert.throws(() => ro.attachParent(unnamedBackend(), 'root', WRITE, BLK_PERM_ALL), { message: 'Block node is read-only' });
  const a = await g.open({ driver: 'null-co', 'node-name': 'a', size: 1 << 20 });
  const b = await g.open({ driver: 'null-co', 'node-name': 'b', size: 1 << 20 });
  a.attachParent(MONITOR_PARENT, 'monitor', 0, BLK_PERM_ALL);
  a.attachParent(jobParent('mirror', 'j'), 'source', 0, READ | WRITE | WRITE_UNCHANGED);
  const top = await g.open({ driver: 'raw', 'node-name': 'top', file: 'a' });
  const guest = a.attachParent(unnamedBackend(), 'root', READ | WRITE, READ | WRITE_UNCHANGED);
  assert.equal(a.isRoot(), false);
  // replace moves the parent node and the BlockBackend, not the job's claim nor the monitor's reference.
  g.replace(a, b);
  assert.equal(top.child('file')!.node, b);
  assert.equal(guest.node, b);
  assert.deepEqual(a.parents.map((e) => e.parentKind), ['job', 'monitor']);
  assert.deepEqual(b.parents.map((e) => e.describeParent()), ['an unnamed block device', "node 'top'"]);
  // A replace that would conflict moves nothing.
  const c = await g.open({ driver: 'null-co', 'node-name': 'c', size: 1 << 20 });
  c.attachParent(jobParent('backup', 'k'), 'target', 0, READ);
  assert.throws(() => g.replace(b, c), /Permission conflict on node 'c': permissions 'write' are both required by/);
  assert.equal(guest.node, b);
  assert.equal(top.child('file')!.node, b);
  await g.closeAll();
});

test('lock bytes of a file node follow its parents, and a failed change keeps the old ones', { skip: !nativeAddon() && 'native addon not built' }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'bm-perm-'));
  const img = join(dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const g = graph();
  try {
    const f = (await g.open({ driver: 'file', 'node-name': 'f', filename: img })) as FileNode;
    const r = await g.open({ driver: 'raw', 'node-name': 'r', file: 'f' });
    assert.deepEqual([f.perm, f.shared], [0, BLK_PERM_ALL]);
    const guest = r.attachParent(unnamedBackend(), 'root', READ | WRITE, READ | WRITE_UNCHANGED);
    assert.deepEqual([f.perm, f.shared], [READ | WRITE, READ | WRITE_UNCHANGED]);
    // A second file node on the same image (another open file description) cannot take write now.
    const f2 = await g.open({ driver: 'file', 'node-name': 'f2', filename: img });
    assert.throws(() => f2.attachParent(unnamedBackend(), 'root', WRITE, BLK_PERM_ALL), { message: 'Failed to get "write" lock' });
    assert.deepEqual([(f2 as FileNode).perm, f2.parents.length], [0, 0]);
    BlockNode.detachParent(guest);
    assert.deepEqual([f.perm, f.shared], [0, BLK_PERM_ALL]);
    f2.attachParent(unnamedBackend(), 'root', WRITE, BLK_PERM_ALL);
  } finally {
    await g.closeAll();
    rmSync(dir, { recursive: true, force: true });
  }
});
