/**
 * Persistent bitmaps after a power cut, in simulation (issue 14): a qcow2 node over the test-only
 * `recording` filter (test/support/recording.ts) over the file gets random concurrent writes,
 * write-zeroes, discards, flushes and bitmap clears and merges (in-process Core: the daemon's graph,
 * bitmap manager and load/store hooks). The image is then rebuilt as a power cut at a random point of
 * the log leaves it (what flushes made durable, plus any subset of the rest), and opened again by
 * bitmirror: every persistent bitmap loads consistent and, stored and exported by qemu-nbd, covers
 * every byte that differs from the disk at the bitmap's last clear that was durable before the cut
 * (each clear here follows a flush; the disk is read then). qemu-img check finds no corruption.
 * Seeds are printed; BM_POWER_CUT_SEED replays, BM_POWER_CUT_ROUNDS sets the number of cuts.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { Core } from '../../src/core/core.js';
import { BLOCK_DRIVERS } from '../../src/daemon/drivers.js';
import type { BlockNode } from '../../src/block/node.js';
import { mustRun, nbdDirtyRanges, run, tempDir } from '../support/tools.js';
import { rng } from '../support/random.js';
import { recordingDriver, recordingLog, rebuildAfterCut } from '../support/recording.js';
import { KiB, MiB } from '../../src/base/sizes.js';

const SIZE = 64 * MiB;
const haveQemu = ['/usr/bin/qemu-img', '/usr/bin/qemu-io', '/usr/bin/qemu-nbd', '/usr/bin/nbdinfo'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'qemu-img, qemu-io, qemu-nbd or nbdinfo not installed';

const LAYOUTS: Array<{ cluster: number; bitmaps: Array<[string, number]> }> = [
  { cluster: 64 * KiB, bitmaps: [['b0', 64 * KiB], ['b1', 4 * KiB]] },
  { cluster: 4 * KiB, bitmaps: [['b0', 512], ['b1', 1 * MiB]] },
];

function newCore(): Core {
  const core = new Core();
  for (const d of [...BLOCK_DRIVERS, recordingDriver]) core.graph.registerDriver(d);
  return core;
}

/**
 * Where the cut may fall: anywhere after the open has finished (guest writes, flushes, clears, the close),
 * or only among the writes of the open itself (the image marked in use and the write-intent record armed).
 */
type CutWindow = 'after-open' | 'during-open';

async function oneCut(dir: string, round: number, seed: number, window: CutWindow = 'after-open'): Promise<string> {
  const rand = rng(seed);
  const layout = LAYOUTS[round % LAYOUTS.length];
  const img = path.join(dir, `p${round}.qcow2`);
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${layout.cluster}`, img, String(SIZE)]);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xee 0 1M', img]);
  for (const [name, g] of layout.bitmaps) await mustRun('qemu-img', ['bitmap', '--add', '-g', String(g), img, name]);
  const initialFile = await fsp.readFile(img);
  const names = layout.bitmaps.map(([n]) => n);

  recordingLog.length = 0;
  const core = newCore();
  const node: BlockNode = await core.openForMonitor({ driver: 'qcow2', 'node-name': 'q', discard: 'unmap', file: { driver: 'recording', discard: 'unmap', file: { driver: 'file', filename: img, discard: 'unmap' } } });
  const opened = recordingLog.length;
  const guest0 = await node.read(0, SIZE);
  /** Per bitmap: [log length when its clear was durable, the disk then]. */
  const clears = new Map<string, Array<[number, Buffer]>>(names.map((n) => [n, [[0, guest0]]]));
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)];
  let paused = false;
  const busy = new Set<Promise<unknown>>();
  let ops = 0;
  // Counted, not timed: the seed decides how many requests there are and when the clears come.
  const total = 100 + Math.floor(rand() * 300);
  const clearAt = new Set(Array.from({ length: 3 }, () => Math.floor(rand() * total)));
  const worker = async () => {
    while (ops < total) {
      if (paused) {
        await new Promise((r) => setImmediate(r));
        continue;
      }
      if (clearAt.delete(ops)) {
        // A clear with nothing in flight, after a flush: the disk then is the bitmap's reference.
        paused = true;
        while (busy.size) await Promise.allSettled([...busy]);
        const name = pick(names);
        await node.flush();
        core.bitmaps.clear(core.bitmaps.get(node, name));
        clears.get(name)!.push([recordingLog.length, await node.read(0, SIZE)]);
        paused = false;
        continue;
      }
      const x = rand();
      const bytes = 1 + Math.floor(rand() * (rand() < 0.7 ? 16 * KiB : 1 * MiB));
      const offset = Math.floor(rand() * (SIZE - bytes));
      let p: Promise<unknown>;
      if (x < 0.06) p = node.flush();
      else if (x < 0.1) p = Promise.resolve().then(() => core.bitmaps.merge(core.bitmaps.get(node, pick(names)), core.bitmaps.get(node, pick(names))));
      else if (x < 0.2) p = node.writeZeroes(offset, bytes, {});
      else if (x < 0.3) p = node.discard(offset, bytes);
      else p = node.write(offset, Buffer.alloc(bytes, 1 + (ops % 250)));
      ops++;
      busy.add(p);
      await p.finally(() => busy.delete(p));
    }
  };
  await Promise.all([worker(), worker(), worker()]);
  const log = recordingLog.slice();
  await core.shutdown();

  // The power cut: at a random point of the chosen window of the log.
  const cut = window === 'after-open' ? opened + Math.floor(rand() * (log.length - opened + 1)) : Math.floor(rand() * (opened + 1));
  await fsp.writeFile(img, rebuildAfterCut(initialFile, log, cut, rand));

  const core2 = newCore();
  const node2 = await core2.openForMonitor({ driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: img } });
  for (const name of names) {
    const bm = core2.bitmaps.get(node2, name);
    assert.equal(bm.inconsistent, false, `seed ${seed}: ${name} inconsistent (cut ${cut}/${log.length})`);
  }
  await core2.shutdown();
  const check = await run('qemu-img', ['check', img]);
  assert.ok(check.code === 0 || check.code === 3, `seed ${seed}: qemu-img check exited ${check.code}\n${check.stdout}${check.stderr}`);
  const raw = path.join(dir, `p${round}.raw`);
  await mustRun('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
  const now = await fsp.readFile(raw);
  await fsp.rm(raw);
  let differing = 0;
  for (const [name, g] of layout.bitmaps) {
    const dirty = await nbdDirtyRanges(img, name);
    const ref = clears
      .get(name)!
      .filter(([at]) => at <= cut)
      .pop()![1];
    for (let p = 0; p < SIZE; p += 512) {
      if (now.compare(ref, p, p + 512, p, p + 512) === 0) continue;
      differing++;
      assert.ok(
        dirty.some(([s, l]) => s <= p && p < s + l),
        `seed ${seed}: bitmap ${name} (granularity ${g}) misses changed bytes at ${p} (cut ${cut}/${log.length})`,
      );
    }
  }
  await fsp.rm(img);
  return `cluster ${layout.cluster}: seed ${seed}, ${ops} requests, cut at ${cut}/${log.length} events, ${differing} changed 512-byte chunks covered`;
}

test('persistent bitmaps survive a simulated power cut: consistent, covering every change since their last durable clear', { skip, timeout: 3_600_000 }, async (t) => {
  const { dir, cleanup } = await tempDir('bm-power-cut-');
  try {
    const seed0 = Number(process.env.BM_POWER_CUT_SEED ?? Date.now() % 1_000_000);
    const rounds = Number(process.env.BM_POWER_CUT_ROUNDS ?? 4);
    for (let round = 0; round < rounds; round++) {
      const line = await oneCut(dir, round, seed0 + round);
      t.diagnostic(line);
      if (process.env.BM_POWER_CUT_ROUNDS) process.stderr.write(`cut ${round}: ${line}\n`);
    }
  } finally {
    await cleanup();
  }
});

// Known gap (issue 14, seed 900124): marking the bitmaps in use at open follows QEMU 7.2's sequence (clear
// autoclear bit 0, rewrite the directory, set the bit again); a cut between those writes leaves the bitmaps
// extension ignored, so the bitmaps are gone (QEMU 7.2 has the same window). Run as a todo until the
// in-use flags are written in place.
test('persistent bitmaps survive a power cut during the open that marks them in use', { skip, todo: 'the bitmaps extension can be lost by a cut during activation (issue 14)', timeout: 3_600_000 }, async (t) => {
  const { dir, cleanup } = await tempDir('bm-power-cut-open-');
  try {
    const seed0 = Number(process.env.BM_POWER_CUT_SEED ?? Date.now() % 1_000_000);
    for (let round = 0; round < 2; round++) t.diagnostic(await oneCut(dir, round, seed0 + round, 'during-open'));
  } finally {
    await cleanup();
  }
});
