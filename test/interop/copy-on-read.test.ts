/**
 * The copy-on-read filter reads once, as QEMU's bdrv_co_do_copy_on_readv: a read through it reads its
 * chunks through the filtered node (which reads what it lacks from below) and writes that same data
 * into the node; it does not read the copy back. The base's and the top's files sit under `recording`
 * nodes logging every read: each base data cluster the reads need is read once, and no read touches
 * the clusters the copies went to in the top (where qemu-img map finds them afterwards). The data read
 * is the base's, and the top holds it (qemu-io, with the backing file removed).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { mustRun, tempDir } from '../support/tools.js';
import { newGraph } from '../support/graph.js';
import { readLog, recordingDriver, recordingLog } from '../support/recording.js';
import { copyOnReadDriver } from '../../src/block/filters/copy-on-read.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** The host clusters (offset in the file, length) of an image's data, by qemu-img map. */
async function hostData(img: string): Promise<Array<{ guest: number; host: number; length: number }>> {
  const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', img])) as Array<{ start: number; length: number; data: boolean; depth: number; offset?: number }>;
  return map.filter((m) => m.data && m.depth === 0 && m.offset !== undefined).map((m) => ({ guest: m.start, host: m.offset!, length: m.length }));
}

test('copy-on-read: a read through the filter reads the base once, returns its data and copies it into the top without reading it back', async () => {
  const { dir, cleanup } = await tempDir('bm-cor-');
  const g = newGraph();
  g.registerDriver(recordingDriver);
  g.registerDriver(copyOnReadDriver);
  try {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(4 * MiB)]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 128k', '-c', 'write -P 0x6b 1M 64k', '-c', 'write -z 2M 64k', base]);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    const logged = (filename: string) => ({ driver: 'recording', file: { driver: 'file', filename, cache: { 'no-flush': true } } });
    await g.open({ driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: logged(base) });
    await g.open({ driver: 'qcow2', 'node-name': 'top', backing: 'base', file: logged(top) });
    const cor = await g.open({ driver: 'copy-on-read', 'node-name': 'cor', file: 'top' });

    readLog.reads.length = 0;
    readLog.enabled = true;
    // Whole chunks, a part of a chunk (the whole chunk is copied), and a chunk of zeroes.
    assert.ok((await cor.read(0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x5a)));
    const part = Buffer.alloc(8 * KiB);
    await cor.readInto(1028 * KiB, part);
    assert.ok(part.equals(Buffer.alloc(8 * KiB, 0x6b)));
    assert.ok((await cor.read(2 * MiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB)));
    readLog.enabled = false;
    await g.closeAll();

    const reads = readLog.reads.splice(0);
    const readsOver = (file: string, host: number, length: number) => reads.filter((r) => r.file === file && r.offset < host + length && host < r.offset + r.bytes).length;
    // The base's data clusters the reads needed: each read once.
    const baseData = await hostData(base);
    for (const guest of [0, 1 * MiB]) {
      const c = baseData.find((m) => m.guest <= guest && guest < m.guest + m.length)!;
      const host = c.host + (guest - c.guest);
      assert.equal(readsOver(base, host, 64 * KiB), 1, `reads of the base's cluster of guest offset ${guest}`);
    }
    // The copies: where the top holds them, never read.
    const topData = await hostData(top);
    assert.deepEqual(topData.map((m) => [m.guest, m.length]).sort((a, b) => a[0] - b[0]), [[0, 64 * KiB], [1 * MiB, 64 * KiB]]);
    for (const m of topData) assert.equal(readsOver(top, m.host, m.length), 0, `reads of the top's copy at guest offset ${m.guest}`);

    // The top holds the data on its own, and the zero chunk as zeroes.
    await mustRun('qemu-img', ['rebase', '-u', '-b', '', top]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x5a 0 64k', '-c', 'read -P 0 64k 64k', '-c', 'read -P 0x6b 1M 64k', '-c', 'read -P 0 2M 64k', top]);
    await mustRun('qemu-img', ['check', top]);
  } finally {
    readLog.enabled = false;
    recordingLog.length = 0;
    await g.closeAll();
    await cleanup();
  }
});
