/**
 * The copy engine (block/copy/) on real nodes, without a daemon: qcow2 images made by qemu-img with data
 * written by qemu-io, opened through a BlockGraph; blkdebug for I/O errors. The background walk copies
 * equal data (qemu-img compare), stays within its in-flight bound and buffer budget, chunk locks make
 * a copy-before-write writer and a new copy wait for copies in flight, partial clusters are widened,
 * failures leave their range dirty, and the error policy maps as QEMU's block_job_error_action.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { BLOCK_DRIVERS } from '../../src/daemon/drivers.js';
import type { BlockNode, WriteRequest } from '../../src/block/node.js';
import { BlockCopy, MAX_OFFLOAD_BYTES, type BlockCopyHooks, type BlockCopyOptions } from '../../src/block/copy/block-copy.js';
import { readsAllZeroes, forEachAllocated, chainStatus } from '../../src/block/copy/chain-status.js';
import { errorActionFor, type OnError } from '../../src/block/copy/error-action.js';
import { DirtyBitmap } from '../../src/bitmap/dirty-bitmap.js';
import { BlockIOError } from '../../src/errors.js';

const KiB = 1024;
const MiB = 1 << 20;

interface Env {
  graph: BlockGraph;
  f(name: string): string;
  done(): Promise<void>;
}

function env(): Env {
  const dir = mkdtempSync(join(tmpdir(), 'bm-block-copy-'));
  const graph = new BlockGraph();
  for (const d of BLOCK_DRIVERS) graph.registerDriver(d);
  return {
    graph,
    f: (name) => join(dir, name),
    async done() {
      await graph.closeAll();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

function qemuIo(file: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
}

async function openQcow2(e: Env, nodeName: string, file: string, extra: Record<string, unknown> = {}): Promise<BlockNode> {
  return e.graph.open({ driver: 'qcow2', 'node-name': nodeName, file: { driver: 'file', filename: file }, ...extra });
}

/** A bitmap with a chunk per bit over `node`, all of it dirty unless `dirty` says which ranges are. */
function bitmapFor(node: BlockNode, chunk: number, dirty?: Array<[number, number]>): DirtyBitmap {
  const b = new DirtyBitmap(node, undefined, chunk, node.length());
  for (const [off, len] of dirty ?? [[0, node.length()]]) b.setDirty(off, len);
  return b;
}

function engine(source: BlockNode, target: BlockNode, bitmap: DirtyBitmap, o: Partial<BlockCopyOptions> = {}): BlockCopy {
  return new BlockCopy({
    source,
    target,
    bitmap,
    chunkSize: 64 * KiB,
    bufSize: 16 * MiB,
    maxInFlight: 16,
    maxIoBytes: MiB,
    unmap: true,
    fillPartialClusters: true,
    ...o,
  });
}

/** The background walk to the end, as a job's loop drives it: launch while there is room, else wait for a copy. */
async function copyAll(copy: BlockCopy, bitmap: DirtyBitmap): Promise<void> {
  while (bitmap.count() > 0 || copy.copiesInFlight > 0) {
    while (bitmap.count() > 0 && copy.hasRoom()) if (!(await copy.launchNext())) break;
    await copy.anyEnded();
  }
}

/** Holds a node's writes at beforeWrite until open() (a real write observer, as a job's). */
function writeGate(node: BlockNode, log: string[] = []): { open(): void; arrived: Promise<void>; maxInside: () => number } {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let arrive!: () => void;
  const arrived = new Promise<void>((r) => (arrive = r));
  let inside = 0;
  let maxInside = 0;
  node.addWriteObserver({
    beforeWrite: async () => {
      inside++;
      maxInside = Math.max(maxInside, inside);
      arrive();
      await gate;
    },
    afterWrite: (req: WriteRequest) => {
      inside--;
      log.push(`target ${req.offset}+${req.bytes}`);
    },
  });
  return { open: release, arrived, maxInside: () => maxInside };
}

test('block copy: the background walk copies a qcow2 with a backing chain, zero clusters and holes to equal data', async () => {
  const e = env();
  try {
    const base = e.f('base.qcow2');
    qemuImg('create', '-f', 'qcow2', base, String(32 * MiB));
    qemuIo(base, 'write -P 0x11 0 8M', 'write -P 0x12 20M 3M');
    qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', e.f('src.qcow2'));
    // Overlay data over part of the backing data, a zero cluster over backing data, data in a hole.
    qemuIo(e.f('src.qcow2'), 'write -P 0x21 4M 2M', 'write -z 1M 256k', 'write -P 0x22 12M 100k', 'write -P 0x23 31M 1M');
    qemuImg('create', '-f', 'qcow2', e.f('tgt.qcow2'), String(32 * MiB));
    const src = await openQcow2(e, 'src', e.f('src.qcow2'), { 'read-only': true });
    const tgt = await openQcow2(e, 'tgt', e.f('tgt.qcow2'));
    assert.equal(await readsAllZeroes(tgt), true, 'a new target reads as zeroes');
    assert.equal(await readsAllZeroes(src), false);
    const bitmap = bitmapFor(src, 64 * KiB, []);
    await forEachAllocated(src, undefined, (off, len) => bitmap.setDirty(off, len));
    const allocated = (8 + 3 + 1) * MiB + 128 * KiB;
    assert.equal(bitmap.count(), allocated, 'allocated anywhere in the chain (4M+2M is inside 0+8M; 12M+100k is two clusters)');
    let progress = 0;
    let launches = 0;
    const copy = engine(src, tgt, bitmap, { hooks: { progress: (n) => (progress += n), launched: () => launches++ } });
    await copyAll(copy, bitmap);
    assert.equal(bitmap.count(), 0);
    assert.equal(progress, allocated);
    assert.equal(launches, 8 + 1 + 3 + 1, 'one launch moves at most maxIoBytes');
    await tgt.flush();
    const zeroRun = await chainStatus(src, MiB, 256 * KiB);
    assert.deepEqual(zeroRun, { bytes: 256 * KiB, zero: true, data: false, depth: 1 }, 'the zero cluster hides backing data');
    const cmp = execFileSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', e.f('src.qcow2'), e.f('tgt.qcow2')], { encoding: 'utf8' });
    assert.match(cmp, /Images are identical/);
  } finally {
    await e.done();
  }
});

test('block copy: never more copies in flight than the bound, nor more bytes than the buffer budget', async () => {
  const e = env();
  try {
    qemuImg('create', '-f', 'qcow2', e.f('src.qcow2'), String(16 * MiB));
    qemuIo(e.f('src.qcow2'), 'write -P 0x5a 0 16M');
    for (const [bound, budget, wantInFlight] of [
      [4, 16 * MiB, 4], // the in-flight bound binds: 4 copies of 1 MiB
      [16, 640 * KiB, 2], // the budget binds: 256 KiB + 256 KiB, the next 256 KiB waits for its budget
    ] as const) {
      qemuImg('create', '-f', 'qcow2', e.f('tgt.qcow2'), String(16 * MiB));
      const src = await openQcow2(e, 'src', e.f('src.qcow2'), { 'read-only': true });
      const tgt = await openQcow2(e, 'tgt', e.f('tgt.qcow2'));
      const gate = writeGate(tgt);
      const bitmap = bitmapFor(src, 64 * KiB);
      let maxCopies = 0;
      let maxBytes = 0;
      const hooks: BlockCopyHooks = {
        launched: () => {
          maxCopies = Math.max(maxCopies, copy.copiesInFlight);
          maxBytes = Math.max(maxBytes, copy.bytesInFlight);
        },
      };
      const copy = engine(src, tgt, bitmap, { maxInFlight: bound, bufSize: budget, maxIoBytes: budget === 16 * MiB ? MiB : 256 * KiB, hooks });
      // With the target's writes held, the walk fills up to its bound and stops.
      while (copy.hasRoom()) assert.equal(await copy.launchNext(), true);
      assert.equal(copy.copiesInFlight, wantInFlight);
      await gate.arrived;
      gate.open();
      await copyAll(copy, bitmap);
      assert.ok(maxCopies <= bound, `copies in flight ${maxCopies} <= ${bound}`);
      assert.ok(maxBytes <= budget, `bytes in flight ${maxBytes} <= ${budget}`);
      assert.ok(gate.maxInside() <= wantInFlight, `target writes at once ${gate.maxInside()}`);
      assert.deepEqual(await tgt.read(0, 16 * MiB), await src.read(0, 16 * MiB));
      await e.graph.remove(tgt);
      await e.graph.remove(src);
    }
  } finally {
    await e.done();
  }
});

test('block copy: a piece read and written takes a buffer of its size, an offloaded one none', async () => {
  const e = env();
  try {
    // 64 KiB of data at the start of every 256 KiB: each 1 MiB copy reads four 64 KiB pieces.
    qemuImg('create', '-f', 'qcow2', e.f('src.qcow2'), String(16 * MiB));
    qemuIo(e.f('src.qcow2'), ...Array.from({ length: 64 }, (_, i) => `write -P ${i + 1} ${i * 256 * KiB} 64k`));
    for (const offload of [false, true]) {
      qemuImg('create', '-f', 'qcow2', e.f('tgt.qcow2'), String(16 * MiB));
      const src = await openQcow2(e, 'src', e.f('src.qcow2'), { 'read-only': true });
      const tgt = await openQcow2(e, 'tgt', e.f('tgt.qcow2'));
      const gate = writeGate(tgt);
      const bitmap = bitmapFor(src, 64 * KiB);
      let maxBuffers = 0;
      const copy = engine(src, tgt, bitmap, { offload, hooks: { progress: () => (maxBuffers = Math.max(maxBuffers, copy.bufferBytes)) } });
      // 16 copies of 1 MiB in flight, each with its first piece read and its write held.
      while (copy.hasRoom()) assert.equal(await copy.launchNext(), true);
      assert.equal(copy.copiesInFlight, 16);
      await gate.arrived;
      gate.open();
      await copyAll(copy, bitmap);
      if (offload) {
        assert.equal(maxBuffers, 0, 'the kernel copied every piece: no buffer');
      } else {
        assert.ok(maxBuffers > 0 && maxBuffers <= 16 * 64 * KiB, `buffers ${maxBuffers} <= 16 pieces of 64 KiB (not 16 of the 1 MiB largest piece)`);
      }
      assert.deepEqual(await tgt.read(0, 16 * MiB), await src.read(0, 16 * MiB));
      copy.release();
      await e.graph.remove(tgt);
      await e.graph.remove(src);
    }
  } finally {
    await e.done();
  }
});

test('block copy: while the kernel copies, a run covers up to MAX_OFFLOAD_BYTES (or maxOffloadBytes); through a buffer or paced by a speed limit, maxIoBytes', async () => {
  const e = env();
  try {
    // 48 MiB of data, then 4 MiB of compressed clusters (no host range: read and written), then data.
    qemuImg('create', '-f', 'qcow2', e.f('src.qcow2'), String(64 * MiB));
    qemuIo(e.f('src.qcow2'), 'write -P 0x11 0 48M', 'write -c -P 0x22 48M 4M', 'write -P 0x33 52M 12M');
    const cases = [
      { name: 'offload', o: {}, largest: MAX_OFFLOAD_BYTES },
      { name: 'offload, max 4 MiB', o: { maxOffloadBytes: 4 * MiB }, largest: 4 * MiB },
      { name: 'offload, paced', o: {}, paced: true, largest: MiB },
      { name: 'read and written', o: { offload: false }, largest: MiB },
    ];
    for (const c of cases) {
      qemuImg('create', '-f', 'qcow2', e.f('tgt.qcow2'), String(64 * MiB));
      const src = await openQcow2(e, 'src', e.f('src.qcow2'), { 'read-only': true });
      const tgt = await openQcow2(e, 'tgt', e.f('tgt.qcow2'));
      const bitmap = bitmapFor(src, 64 * KiB);
      const runs: Array<[number, number]> = [];
      let maxBytes = 0;
      const copy = engine(src, tgt, bitmap, {
        ...c.o,
        hooks: {
          launched: (offset, bytes) => {
            runs.push([offset, bytes]);
            maxBytes = Math.max(maxBytes, copy.bytesInFlight);
          },
          paced: () => c.paced === true,
        },
      });
      await copyAll(copy, bitmap);
      const largest = Math.max(...runs.map(([, b]) => b));
      assert.ok(maxBytes <= 16 * MiB, `${c.name}: bytes in flight ${maxBytes} <= the 16 MiB budget`);
      assert.equal(largest, c.largest, `${c.name}: largest run in ${JSON.stringify(runs)}`);
      if (c.largest > MiB) {
        // The first runs are 1 MiB (nothing known yet); once the kernel has copied, runs grow; after
        // the compressed part they are 1 MiB until it copies again.
        const big = runs.filter(([, b]) => b === c.largest).length;
        assert.ok(big >= 2, `${c.name}: ${big} runs of the largest size in ${JSON.stringify(runs)}`);
        assert.ok(runs.length < 56, `${c.name}: ${runs.length} runs for 64 MiB (1 MiB runs would be 64)`);
      } else {
        assert.equal(runs.length, 64, `${c.name}: 1 MiB runs`);
      }
      assert.deepEqual(await tgt.read(0, 64 * MiB), await src.read(0, 64 * MiB));
      copy.release();
      await e.graph.remove(tgt);
      await e.graph.remove(src);
    }
  } finally {
    await e.done();
  }
});

test('block copy: a copy-before-write writer waits for the copy in flight on its range, and the target keeps the old data', async () => {
  const e = env();
  try {
    qemuImg('create', '-f', 'qcow2', e.f('src.qcow2'), String(4 * MiB));
    qemuIo(e.f('src.qcow2'), 'write -P 0x0d 0 4M');
    qemuImg('create', '-f', 'qcow2', e.f('tgt.qcow2'), String(4 * MiB));
    const src = await openQcow2(e, 'src', e.f('src.qcow2'));
    const tgt = await openQcow2(e, 'tgt', e.f('tgt.qcow2'));
    const bitmap = bitmapFor(src, 64 * KiB);
    const copy = engine(src, tgt, bitmap, { maxIoBytes: 256 * KiB });
    const log: string[] = [];
    // Copy-before-write: the old data of a range goes to the target before a write changes it.
    src.addWriteObserver({
      beforeWrite: async (req) => {
        log.push('cbw start');
        await copy.copyNow(req.offset, req.bytes);
        log.push('cbw done');
      },
    });
    const gate = writeGate(tgt, log);
    // A background copy of [0, 256k) is held at its target write; its bits are clean already.
    assert.equal(await copy.launchNext(), true);
    await gate.arrived;
    assert.equal(bitmap.isDirty(0), false);
    const guestWrite = src.write(64 * KiB, Buffer.alloc(64 * KiB, 0xee)).then(() => log.push('guest write done'));
    gate.open();
    await guestWrite;
    await copyAll(copy, bitmap);
    // Without the chunk lock the writer would not wait: its copyNow sees clean bits and returns at
    // once, before the held target write (file I/O) can have ended.
    assert.deepEqual(log.slice(0, 4), ['cbw start', 'target 0+262144', 'cbw done', 'guest write done']);
    assert.deepEqual(await tgt.read(0, 4 * MiB), Buffer.alloc(4 * MiB, 0x0d), 'the target holds the data from before the write');
    assert.deepEqual(await src.read(64 * KiB, 64 * KiB), Buffer.alloc(64 * KiB, 0xee));
    // A write to a range not yet copied copies it first (copyNow does the copy itself).
    const bitmap2 = bitmapFor(src, 64 * KiB, [[MiB, MiB]]);
    const copy2 = engine(src, tgt, bitmap2);
    await tgt.writeZeroes(0, 4 * MiB);
    await copy2.copyNow(MiB + 100, 10);
    assert.equal(bitmap2.count(), MiB - 64 * KiB);
    assert.deepEqual(await tgt.read(MiB, 64 * KiB), Buffer.alloc(64 * KiB, 0x0d));
    assert.deepEqual(await tgt.read(MiB + 64 * KiB, 64 * KiB), Buffer.alloc(64 * KiB), 'only the written chunk was copied');
  } finally {
    await e.done();
  }
});

test('block copy: a new copy waits for a writer holding its first chunk, then copies what the writer left dirty', async () => {
  const e = env();
  try {
    qemuImg('create', '-f', 'qcow2', e.f('src.qcow2'), String(MiB));
    qemuIo(e.f('src.qcow2'), 'write -P 0x44 0 1M');
    qemuImg('create', '-f', 'qcow2', e.f('tgt.qcow2'), String(MiB));
    const src = await openQcow2(e, 'src', e.f('src.qcow2'), { 'read-only': true });
    const tgt = await openQcow2(e, 'tgt', e.f('tgt.qcow2'));
    const bitmap = bitmapFor(src, 64 * KiB, [[0, 256 * KiB]]);
    const launched: string[] = [];
    const copy = engine(src, tgt, bitmap, { hooks: { launched: (off, len) => launched.push(`${off}+${len}`) } });
    // A write-blocking mirror write holds chunk 1 while it writes through.
    const held = await copy.locks.acquire(64 * KiB, 64 * KiB);
    const first = await copy.launchNext();
    assert.equal(first, true);
    assert.deepEqual(launched, ['0+65536'], 'the run stops before the held chunk');
    const next = copy.launchNext();
    // Real I/O completes meanwhile; the held chunk still blocks the next copy.
    await tgt.read(0, 64 * KiB);
    await copy.anyEnded();
    assert.deepEqual(launched, ['0+65536']);
    held.release();
    assert.equal(await next, true);
    assert.deepEqual(launched, ['0+65536', '65536+196608']);
    await copyAll(copy, bitmap);
    assert.deepEqual(await tgt.read(0, 256 * KiB), Buffer.alloc(256 * KiB, 0x44));
  } finally {
    await e.done();
  }
});

test('block copy: a write into an unallocated target cluster is widened to the whole cluster (fill-partial-clusters)', async () => {
  const e = env();
  try {
    qemuImg('create', '-f', 'qcow2', e.f('src.qcow2'), String(MiB));
    qemuIo(e.f('src.qcow2'), 'write -P 0x61 0 1M');
    for (const fill of [true, false]) {
      qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=65536', e.f('tgt.qcow2'), String(MiB));
      const src = await openQcow2(e, 'src', e.f('src.qcow2'), { 'read-only': true });
      const tgt = await openQcow2(e, 'tgt', e.f('tgt.qcow2'));
      // Chunks of 4 KiB, finer than the target's clusters: chunk [8k, 12k) and zeroes at [200k, 204k).
      const bitmap = bitmapFor(src, 4 * KiB, [[8 * KiB, 4 * KiB]]);
      const copy = engine(src, tgt, bitmap, { chunkSize: 4 * KiB, fillPartialClusters: fill });
      await copyAll(copy, bitmap);
      await copy.writeTargetZeroes(200 * KiB, 4 * KiB);
      const cluster0 = await tgt.read(0, 64 * KiB);
      const cluster3 = await tgt.read(192 * KiB, 64 * KiB);
      if (fill) {
        assert.deepEqual(cluster0, Buffer.alloc(64 * KiB, 0x61), 'the whole cluster holds source data');
        const want = Buffer.alloc(64 * KiB, 0x61);
        want.fill(0, 8 * KiB, 12 * KiB);
        assert.deepEqual(cluster3, want, 'zeroes widened with source data around them');
      } else {
        const want = Buffer.alloc(64 * KiB);
        want.fill(0x61, 8 * KiB, 12 * KiB);
        assert.deepEqual(cluster0, want, 'only the chunk itself');
        assert.deepEqual(cluster3, Buffer.alloc(64 * KiB));
      }
      // An allocated cluster is not widened again: writing inside it changes only the range.
      await copy.writeTarget(16 * KiB, Buffer.alloc(KiB, 0x77));
      assert.deepEqual(await tgt.read(15 * KiB, 3 * KiB), Buffer.concat([Buffer.alloc(KiB, fill ? 0x61 : 0), Buffer.alloc(KiB, 0x77), Buffer.alloc(KiB, fill ? 0x61 : 0)]));
      await e.graph.remove(tgt);
      await e.graph.remove(src);
    }
  } finally {
    await e.done();
  }
});

test('block copy: a failed read or write leaves the rest of its range dirty and reports the operation', async () => {
  const e = env();
  try {
    qemuImg('create', '-f', 'raw', e.f('src.raw'), String(MiB));
    qemuImg('create', '-f', 'raw', e.f('tgt.raw'), String(MiB));
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 1M', e.f('src.raw')]);
    // Sector 512 (offset 256k) fails on read in the source, once; sector 1024 (512k) fails on write in the target, with ENOSPC.
    const src = await e.graph.open({
      driver: 'raw',
      'node-name': 'src',
      file: { driver: 'blkdebug', image: { driver: 'file', filename: e.f('src.raw') }, 'inject-error': [{ event: 'read_aio', sector: 512, once: true }] },
    });
    const tgt = await e.graph.open({
      driver: 'raw',
      'node-name': 'tgt',
      file: { driver: 'blkdebug', image: { driver: 'file', filename: e.f('tgt.raw') }, 'inject-error': [{ event: 'write_aio', sector: 1024, errno: 28, once: true }] },
    });
    const bitmap = bitmapFor(src, 64 * KiB);
    const failures: string[] = [];
    const copy = engine(src, tgt, bitmap, {
      maxIoBytes: 128 * KiB,
      hooks: {
        failed: (op, err, off, len) => {
          assert.ok(err instanceof BlockIOError);
          failures.push(`${op} ${err.code} ${off}+${len}`);
          // The failed range is dirty again when the hook runs.
          assert.equal(bitmap.isDirty(off), true);
        },
      },
    });
    await copyAll(copy, bitmap);
    failures.sort();
    assert.deepEqual(failures, ['read EIO 262144+131072', 'write ENOSPC 524288+131072']);
    // The rules fired once: a second walk copies what the failures left dirty.
    assert.equal(bitmap.count(), 0);
    assert.deepEqual(await tgt.read(0, MiB), Buffer.alloc(MiB, 0x33));
    // copyNow throws the error instead of reporting it, and leaves the range dirty.
    await e.graph.remove(tgt);
    const tgt2 = await e.graph.open({
      driver: 'raw',
      'node-name': 'tgt2',
      file: { driver: 'blkdebug', image: { driver: 'file', filename: e.f('tgt.raw') }, 'inject-error': [{ event: 'write_aio', once: true }] },
    });
    const bitmap2 = bitmapFor(src, 64 * KiB);
    const copy2 = engine(src, tgt2, bitmap2);
    await assert.rejects(copy2.copyNow(0, 64 * KiB), (err: unknown) => err instanceof BlockIOError && err.code === 'EIO');
    assert.equal(bitmap2.isDirty(0), true);
    await copy2.copyNow(0, 64 * KiB);
    assert.equal(bitmap2.isDirty(0), false);
  } finally {
    await e.done();
  }
});

test('error action: the policy and the error decide, as block_job_error_action', () => {
  const enospc = new BlockIOError('ENOSPC');
  const eio = new BlockIOError('EIO');
  const cases: Array<[OnError, unknown, string]> = [
    ['report', eio, 'report'],
    ['report', enospc, 'report'],
    ['auto', enospc, 'report'],
    ['ignore', eio, 'ignore'],
    ['stop', eio, 'stop'],
    ['stop', enospc, 'stop'],
    ['enospc', enospc, 'stop'],
    ['enospc', eio, 'report'],
    ['enospc', new Error('no code'), 'report'],
  ];
  for (const [policy, err, want] of cases) assert.equal(errorActionFor(policy, err), want, `${policy} on ${String(err)}`);
});
