/**
 * The qcow2 internal snapshot table codec (block/drivers/qcow2/snapshots.ts): a table written by
 * `qemu-img snapshot -c` reads back with QEMU's fields, writes back byte for byte, and QEMU's rules for
 * ids and lookups.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { findSnapshot, newSnapshotId, NO_ICOUNT, parseSnapshotTable, serializeSnapshotTable, snapshotTableSize } from '../../src/block/drivers/qcow2/snapshots.js';
import { mustRun, tempDir } from '../support/tools.js';

test('a snapshot table qemu-img wrote reads back and is written back unchanged', async (t) => {
  const { dir, cleanup } = await tempDir();
  t.after(cleanup);
  const image = path.join(dir, 'a.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
  for (const name of ['first', 'zweiter-schnappschuss', 'x']) await mustRun('qemu-img', ['snapshot', '-c', name, image]);
  const file = await readFile(image);
  const nb = file.readUInt32BE(60);
  const at = Number(file.readBigUInt64BE(64));
  const list = parseSnapshotTable(file.subarray(at), nb, 1 << 20);
  assert.deepEqual(list.map((s) => [s.id, s.name, s.l1Size, s.diskSize, s.icount, s.vmStateSize, s.extraDataSize]), [
    ['1', 'first', 1, 1 << 20, 0n, 0, 24],
    ['2', 'zweiter-schnappschuss', 1, 1 << 20, 0n, 0, 24],
    ['3', 'x', 1, 1 << 20, 0n, 0, 24],
  ]);
  const size = snapshotTableSize(list);
  assert.ok(serializeSnapshotTable(list).equals(file.subarray(at, at + size)));
  assert.equal(newSnapshotId(list), '4');
  assert.equal(findSnapshot(list, undefined, 'x'), 2);
  assert.equal(findSnapshot(list, '2', 'x'), -1);
  assert.equal(findSnapshot(list, undefined, undefined), -1);
});

test('short extra data: no icount, the disk size the image has; written back with 24 bytes', () => {
  const entry = Buffer.alloc(40 + 16 + 1 + 1);
  entry.writeBigUInt64BE(0x30000n, 0);
  entry.writeUInt32BE(1, 8);
  entry.writeUInt16BE(1, 12);
  entry.writeUInt16BE(1, 14);
  entry.writeUInt32BE(16, 36);
  entry.writeBigUInt64BE(7n, 40);
  entry.write('9a', 56, 'latin1');
  const [sn] = parseSnapshotTable(entry, 1, 1 << 20);
  assert.deepEqual([sn.id, sn.name, sn.vmStateSize, sn.diskSize, sn.icount], ['9', 'a', 7, 0, NO_ICOUNT]);
  const out = serializeSnapshotTable([sn]);
  assert.equal(out.readUInt32BE(36), 24);
  assert.equal(out.readBigUInt64BE(56), NO_ICOUNT);
  assert.equal(newSnapshotId([sn, { ...sn, id: 'abc' }]), '10');
});
