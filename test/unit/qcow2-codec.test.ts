/** qcow2 codecs: header round trip, L2 entry decoding, refcount entry widths, structure planning. */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { parseHeader, serializeHeader, type Qcow2Header } from '../../src/block/drivers/qcow2/header.js';
import { decodeL2, encodeEntry, COPIED_HI } from '../../src/block/drivers/qcow2/tables.js';
import { planSelfDescribing, Refcounts } from '../../src/block/drivers/qcow2/refcount.js';
import { parseBitmapDirectory, serializeBitmapDirectory } from '../../src/block/drivers/qcow2/bitmaps.js';
import type { BlockNode } from '../../src/block/node.js';

function header(over: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 30, cryptMethod: 0, l1Size: 2,
    l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, refcountOrder: 4, headerLength: 112,
    compressionType: 0, extraHeaderBytes: Buffer.alloc(0), unknownExtensions: [], featureNames: [], hasDataFileExt: false,
    hasCryptoExt: false, ...over,
  };
}

test('header round trip keeps backing file, format and unknown extensions', () => {
  const h = header({ backingFile: 'base.qcow2', backingFormat: 'qcow2', unknownExtensions: [{ type: 0x12345678, data: Buffer.from('hello') }] });
  const buf = Buffer.alloc(65536);
  serializeHeader(h, 65536).copy(buf);
  const p = parseHeader(buf);
  assert.equal(p.backingFile, 'base.qcow2');
  assert.equal(p.backingFormat, 'qcow2');
  assert.equal(p.unknownExtensions.length, 1);
  assert.equal(p.unknownExtensions[0].data.toString(), 'hello');
  assert.equal(p.featureNames.length, 8);
  assert.equal(p.headerLength, 112);
  assert.equal(p.size, 1 << 30);
});

test('L2 entries: normal, zero-plain, zero-alloc, compressed, reserved bits', () => {
  const t = Buffer.alloc(64);
  encodeEntry(t, 0, 0x50000, COPIED_HI);
  encodeEntry(t, 1, 0, 0, 1);
  encodeEntry(t, 2, 0x60000, COPIED_HI, 1);
  t.writeBigUInt64BE(0x400000000005004fn, 24);
  t.writeBigUInt64BE(0x0000000000050002n, 32);
  assert.deepEqual(decodeL2(t, 0, 16, true), { type: 'normal', offset: 0x50000, copied: true, csize: 0 });
  assert.equal(decodeL2(t, 1, 16, true).type, 'zero-plain');
  assert.equal(decodeL2(t, 2, 16, true).type, 'zero-alloc');
  const c = decodeL2(t, 3, 16, true);
  assert.equal(c.type, 'compressed');
  assert.equal(c.offset, 0x5004f);
  assert.equal(c.csize, 512 - 0x4f);
  assert.match(decodeL2(t, 4, 16, true).reservedBits ?? '', /reserved/);
  assert.equal(decodeL2(t, 4, 16, true).bad, undefined, 'reserved bits do not make reads fail (as QEMU)');
  assert.equal(decodeL2(t, 4, 16, true).type, 'normal');
});

test('refcount entries of every width round trip', () => {
  for (let order = 0; order <= 6; order++) {
    const rc = new Refcounts(() => ({}) as BlockNode, 9, order, 512, 1, [], async () => undefined);
    const block = Buffer.alloc(512);
    const max = Math.min(2 ** rc.bits - 1, 1000);
    for (let i = 0; i < rc.entriesPerBlock; i++) rc.writeEntry(block, i, i % (max + 1));
    for (let i = 0; i < rc.entriesPerBlock; i++) assert.equal(rc.readEntry(block, i), i % (max + 1), `order ${order} entry ${i}`);
  }
});

test('self-describing refcount structure plan covers itself', () => {
  const plan = planSelfDescribing(1000, 1, 256, 64, () => false);
  for (let c = plan.start; c < plan.end; c++) assert.ok(plan.blockIndices.includes(Math.floor(c / 256)));
  assert.ok(plan.tableClusters * 64 > Math.max(...plan.blockIndices));
});

test('bitmap directory round trip', () => {
  const dir = serializeBitmapDirectory([
    { name: 'b0', tableOffset: 0x70000, tableSize: 1, flags: 2, granularityBits: 16 },
    { name: 'a-longer-name', tableOffset: 0x80000, tableSize: 3, flags: 3, granularityBits: 20 },
  ]);
  const bms = parseBitmapDirectory(dir, 2);
  assert.deepEqual(bms.map((b) => [b.name, b.tableOffset, b.tableSize, b.auto, b.inUse, b.granularity]), [
    ['b0', 0x70000, 1, true, false, 65536],
    ['a-longer-name', 0x80000, 3, true, true, 1 << 20],
  ]);
});
