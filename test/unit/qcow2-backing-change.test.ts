/**
 * Rewriting a qcow2 header's backing file name and format (backingChangeWrites): when the extension
 * area beyond the first sector stays where it is, a crash at any point of the writes — between them,
 * or inside one torn at any sector boundary — leaves a header that parses as either the old one or
 * the new one, with every other extension intact. A change that moves the later extensions (a
 * backing format extension added or removed) is one write of the whole header, as QEMU's.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { backingChangeWrites, parseHeader, serializeHeader, type Qcow2Header } from '../../src/block/drivers/qcow2/header.js';

const CS = 65536;

function header(over: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 30, cryptMethod: 0, l1Size: 2,
    l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 1n, refcountOrder: 4, headerLength: 112,
    compressionType: 0, extraHeaderBytes: Buffer.alloc(0), unknownExtensions: [{ type: 0x62697477, data: Buffer.alloc(300, 7) }],
    featureNames: [], hasDataFileExt: false, hasCryptoExt: false,
    bitmaps: { nbBitmaps: 2, directorySize: 96, directoryOffset: 0x50000 },
    ...over,
  };
}

/** The first cluster as the disk holds it after applying `writes`, the last one cut after `keep` bytes. */
function apply(disk: Buffer, writes: Array<{ offset: number; data: Buffer }>, upTo: number, keep: number): Buffer {
  const d = Buffer.from(disk);
  writes.slice(0, upTo).forEach((w) => w.data.copy(d, w.offset));
  if (upTo < writes.length) writes[upTo].data.copy(d, writes[upTo].offset, 0, keep);
  return d;
}

/** Every state a crash can leave: each write done or not, the one in progress torn at any 512-byte boundary of the disk. */
function* crashStates(disk: Buffer, writes: Array<{ offset: number; data: Buffer }>): Generator<Buffer> {
  for (let i = 0; i <= writes.length; i++) {
    if (i === writes.length) {
      yield apply(disk, writes, i, 0);
      break;
    }
    const w = writes[i];
    const cuts = new Set([0]);
    for (let b = Math.ceil(w.offset / 512) * 512; b < w.offset + w.data.length; b += 512) cuts.add(b - w.offset);
    for (const keep of cuts) yield apply(disk, writes, i, keep);
  }
}

const cases: Array<[string, Partial<Qcow2Header>, string | undefined, string | undefined]> = [
  ['name replaced, same format', { backingFile: 'base.qcow2', backingFormat: 'qcow2' }, '/images/a/much/longer/path/to/the/new/base.qcow2', 'qcow2'],
  ['name shortened', { backingFile: '/images/a/much/longer/path/to/the/old/base.qcow2', backingFormat: 'qcow2' }, 'b.qcow2', 'qcow2'],
  ['format of the same length', { backingFile: 'base.raw', backingFormat: 'raw' }, 'base.qcow2', 'qcow2'],
  ['name added to a header that has a format', { backingFormat: 'qcow2' }, 'base.qcow2', 'qcow2'],
];

test('a change that moves the extensions is one write of the whole header (QEMU)', () => {
  for (const [before, name, format] of [
    [{ backingFile: 'base.qcow2', backingFormat: 'qcow2' }, undefined, undefined],
    [{}, 'base.qcow2', 'qcow2'],
  ] as const) {
    const old = header(before);
    const disk = Buffer.alloc(CS);
    serializeHeader(old, CS).copy(disk);
    const next = serializeHeader({ ...old, backingFile: name, backingFormat: format }, CS);
    assert.deepEqual(backingChangeWrites(disk, next, 112, CS), [{ offset: 0, data: next }]);
  }
});

for (const [what, before, name, format] of cases) {
  test(`a crash while the backing file changes leaves the old or the new header: ${what}`, () => {
    const old = header(before);
    const disk = Buffer.alloc(CS);
    serializeHeader(old, CS).copy(disk);
    const next = serializeHeader({ ...old, backingFile: name, backingFormat: format }, CS);
    const writes = backingChangeWrites(disk, next, 112, CS);
    const seen = new Set<string>();
    for (const state of crashStates(disk, writes)) {
      const h = parseHeader(state);
      const got = `${h.backingFile ?? '-'}|${h.backingFormat ?? '-'}`;
      assert.ok(got === `${old.backingFile ?? '-'}|${old.backingFormat ?? '-'}` || got === `${name ?? '-'}|${format ?? '-'}`, `${what}: ${got}`);
      assert.deepEqual(h.bitmaps && { n: h.bitmaps.nbBitmaps, off: h.bitmaps.directoryOffset }, { n: 2, off: 0x50000 });
      assert.deepEqual(h.unknownExtensions.map((e) => e.data.length), [300]);
      seen.add(got);
    }
    // The last state is the new header.
    const last = parseHeader(apply(disk, writes, writes.length, 0));
    assert.equal(last.backingFile, name);
    assert.equal(last.backingFormat, format);
    assert.ok(seen.size <= 2);
  });
}

test('a backing file change that keeps the extension area beyond the first sector takes two writes, the switch within one sector', () => {
  const old = header({ backingFile: 'base.qcow2', backingFormat: 'qcow2' });
  const disk = Buffer.alloc(CS);
  serializeHeader(old, CS).copy(disk);
  const writes = backingChangeWrites(disk, serializeHeader({ ...old, backingFile: 'other.qcow2' }, CS), 112, CS);
  assert.equal(writes.length, 2);
  assert.equal(writes[1].offset, 0);
  assert.ok(writes[1].data.length <= 512);
});
