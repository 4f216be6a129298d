/**
 * A qcow2 image whose active L1 table reaches past the end of its file (cut off by a truncation, or
 * its offset pointing past the end): QEMU 7.2 opens it (qcow2_validate_table checks only alignment and
 * size), reads the entries past the end as zeroes (unallocated), and a write that needs such an entry
 * writes it there, growing the file. bitmirror does the same: reads equal qemu-io's, and the same
 * writes by qemu-io and by bitmirror on twin images leave byte-identical files, about which qemu-img
 * check says the same.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { copyFile, open, readFile, truncate } from 'node:fs/promises';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph, openQcow2File } from '../support/graph.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

interface Case {
  /** Makes the image. */
  make(img: string): Promise<void>;
  /** [offset, length, pattern] writes made on both twins. */
  writes: Array<[number, number, number]>;
  /** [offset, length] reads that must give zeroes (as qemu-io reads them) before any write. */
  zeroes: Array<[number, number]>;
}

async function header(img: string): Promise<{ l1Offset: number; l1Size: number }> {
  const h = (await readFile(img)).subarray(0, 72);
  return { l1Size: h.readUInt32BE(36), l1Offset: Number(h.readBigUInt64BE(40)) };
}

const CASES: Record<string, Case> = {
  // 4 GiB at 4 KiB clusters: a 16 KiB (4-cluster) L1 table at the end of the file, cut after its first cluster.
  'cut off by a truncation': {
    async make(img) {
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, String(4 * GiB)]);
      const { l1Offset, l1Size } = await header(img);
      assert.equal(l1Size * 8, 16 * KiB);
      await truncate(img, l1Offset + 4 * KiB);
    },
    writes: [[0, 64 * KiB, 0x11], [4 * GiB - 64 * KiB, 64 * KiB, 0x22]],
    zeroes: [[0, 64 * KiB], [4 * GiB - 64 * KiB, 64 * KiB]],
  },
  // Data at 0, then the L1 table's offset set to 64 MiB (the file is 448 KiB): the data is no longer mapped.
  'pointing past the end': {
    async make(img) {
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(1 * GiB)]);
      await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 128k', img]);
      const fh = await open(img, 'r+');
      const off = Buffer.alloc(8);
      off.writeBigUInt64BE(BigInt(64 * MiB));
      await fh.write(off, 0, 8, 40);
      await fh.close();
    },
    writes: [[0, 64 * KiB, 0x11], [512 * MiB, 64 * KiB, 0x22]],
    zeroes: [[0, 128 * KiB], [512 * MiB, 64 * KiB]],
  },
};

async function check(img: string): Promise<{ code: number; out: string }> {
  const r = await run('qemu-img', ['check', img]);
  return { code: r.code, out: r.stdout + r.stderr };
}

for (const [name, c] of Object.entries(CASES)) {
  test(`qcow2 with its L1 table ${name}: opened, read and written as QEMU 7.2 does`, async () => {
    const { dir, cleanup } = await tempDir('bm-l1-eof-');
    try {
      const img = path.join(dir, 'img.qcow2');
      await c.make(img);
      const pristine = await readFile(img);
      // QEMU opens it and reads zeroes there.
      await mustRun('qemu-io', ['-r', '-f', 'qcow2', ...c.zeroes.flatMap(([o, l]) => ['-c', `read -P 0 ${o} ${l}`]), img]);

      // bitmirror, read-only: the same zeroes, the file untouched.
      let g = newGraph();
      const ro = await openQcow2File(g, img, { 'read-only': true });
      for (const [o, l] of c.zeroes) assert.ok((await ro.read(o, l)).equals(Buffer.alloc(l)), `read ${o}+${l}`);
      await g.closeAll();
      assert.ok((await readFile(img)).equals(pristine), 'read-only open changed the file');

      // The same writes by qemu-io and by bitmirror on twins: the same bytes, the same verdict of qemu-img check.
      const theirs = path.join(dir, 'theirs.qcow2');
      await copyFile(img, theirs);
      await mustRun('qemu-io', ['-f', 'qcow2', ...c.writes.flatMap(([o, l, p]) => ['-c', `write -P ${p} ${o} ${l}`]), theirs]);
      g = newGraph();
      const rw = await openQcow2File(g, img);
      for (const [o, l, p] of c.writes) await rw.write(o, Buffer.alloc(l, p));
      for (const [o, l, p] of c.writes) assert.ok((await rw.read(o, l)).equals(Buffer.alloc(l, p)), `read back ${o}+${l}`);
      await g.closeAll();
      assert.ok((await readFile(img)).equals(await readFile(theirs)), 'the files differ from what qemu-io made');
      assert.deepEqual(await check(img), await check(theirs));
      await mustRun('qemu-io', ['-r', '-f', 'qcow2', ...c.writes.flatMap(([o, l, p]) => ['-c', `read -P ${p} ${o} ${l}`]), img]);
    } finally {
      await cleanup();
    }
  });
}
