/**
 * Persistent bitmaps after a power cut, in simulation (issue 14): a qcow2 node, or a raw node with its
 * bitmaps in a sidecar, over the test-only `recording` filter (test/support/recording.ts; image and
 * sidecar each under one) over the file gets random concurrent writes,
 * write-zeroes, discards, flushes and bitmap clears and merges (in-process Core: the daemon's graph,
 * bitmap manager and load/store hooks). The image is then rebuilt as a power cut at some point of the
 * log leaves it (what flushes made durable, plus a subset of the rest) and checked: qemu-img check
 * finds no corruption, QEMU still sees every bitmap (qcow2), and bitmirror loads every persistent bitmap
 * consistent, covering every byte that differs from the disk at the bitmap's last clear that was
 * durable before the cut (each clear here follows a flush; the disk is read then).
 *
 * Two tests: random cuts anywhere in a session (open, requests, close), and every cut point of the
 * open (in-use marking, write-intent arming) and of the close (storing the bitmaps), each with every
 * subset of the writes not yet flushed (a sample when there are many), starting from clean bitmaps
 * and from bitmaps a previous cut left in use. Seeds are printed; BM_POWER_CUT_SEED replays,
 * BM_POWER_CUT_ROUNDS sets the number of random cuts and of every-cut scenarios (BM_SOAK=1: 1000).
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { Core } from '../../src/core/core.js';
import { BLOCK_DRIVERS } from '../../src/daemon/drivers.js';
import type { BlockNode } from '../../src/block/node.js';
import { mustRun, nbdDirtyRanges, run, tempDir } from '../support/tools.js';
import { rng } from '../support/random.js';
import { pendingWrites, recordingDriver, recordingLog, rebuildAfterCut, type LogEvent } from '../support/recording.js';
import { KiB, MiB } from '../../src/base/sizes.js';

const haveQemu = ['/usr/bin/qemu-img', '/usr/bin/qemu-io', '/usr/bin/qemu-nbd', '/usr/bin/nbdinfo'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'qemu-img, qemu-io, qemu-nbd or nbdinfo not installed';
const soak = !!process.env.BM_SOAK;
const seed0 = Number(process.env.BM_POWER_CUT_SEED ?? Date.now() % 1_000_000);

/** qcow2 with a cluster size, or raw with its bitmaps in a sidecar (block/drivers/raw-sidecar.ts). */
interface Layout {
  format: 'qcow2' | 'raw';
  cluster: number;
  bitmaps: Array<[string, number]>;
}
const LAYOUTS: Layout[] = [
  { format: 'qcow2', cluster: 64 * KiB, bitmaps: [['b0', 64 * KiB], ['b1', 4 * KiB]] },
  { format: 'qcow2', cluster: 4 * KiB, bitmaps: [['b0', 512], ['b1', 1 * MiB]] },
  { format: 'raw', cluster: 0, bitmaps: [['b0', 64 * KiB], ['b1', 512]] },
];
const label = (l: Layout): string => (l.format === 'raw' ? 'raw + sidecar' : `qcow2, cluster ${l.cluster}`);
const sidecarOf = (img: string): string => `${img}.bitmaps`;

function newCore(): Core {
  const core = new Core();
  for (const d of [...BLOCK_DRIVERS, recordingDriver]) core.graph.registerDriver(d);
  return core;
}

/**
 * The node's options: the image (and a raw image's sidecar) under the recording filter when
 * `recorded`, else directly on file nodes.
 */
function nodeOptions(img: string, layout: Layout, recorded: boolean): Record<string, unknown> {
  const file = (filename: string, discard = true) => {
    const f = { driver: 'file', filename, ...(discard ? { discard: 'unmap' } : {}) };
    return recorded ? { driver: 'recording', ...(discard ? { discard: 'unmap' } : {}), file: f } : f;
  };
  if (layout.format === 'raw') return { driver: 'raw', 'node-name': 'q', file: file(img), '__org.bitmirror_bitmaps': file(sidecarOf(img), false) };
  return { driver: 'qcow2', 'node-name': 'q', discard: 'unmap', file: file(img) };
}

/** An image of `size` bytes with 1 MiB of data and the layout's (empty) persistent bitmaps. */
async function createImage(img: string, layout: Layout, size: number): Promise<void> {
  if (layout.format === 'raw') {
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', img, String(size)]);
    await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0xee 0 1M', img]);
    await fsp.writeFile(sidecarOf(img), '');
    const core = newCore();
    const node = await core.openForMonitor(nodeOptions(img, layout, false));
    for (const [name, g] of layout.bitmaps) await core.bitmaps.add(node, name, { persistent: true, granularity: g });
    await core.shutdown();
    return;
  }
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${layout.cluster}`, img, String(size)]);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xee 0 1M', img]);
  for (const [name, g] of layout.bitmaps) await mustRun('qemu-img', ['bitmap', '--add', '-g', String(g), img, name]);
}

/** The files of an image as they are now (a raw image's sidecar too) and the image's mtime. */
interface ImageFiles {
  files: Map<string, Buffer>;
  mtime: string;
}

async function mtimeOf(img: string): Promise<string> {
  return (await mustRun('stat', ['-c', '%.9Y', img])).trim();
}

async function snapshot(img: string, layout: Layout): Promise<ImageFiles> {
  const files = new Map([[img, await fsp.readFile(img)]]);
  if (layout.format === 'raw') files.set(sidecarOf(img), await fsp.readFile(sidecarOf(img)));
  return { files, mtime: await mtimeOf(img) };
}

/**
 * Put the files as a power cut after `cut` events of `s`'s log leaves them (starting from `before`),
 * keeping the unflushed writes `kept` says. The image's mtime is what it was at the cut: its value at
 * the end of the session once the session had written the image, else the one before (a raw
 * sidecar's binding compares it).
 */
async function applyCut(img: string, before: ImageFiles, s: Session, cut: number, kept: (id: number) => boolean): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const [file, initial] of before.files) {
    const data = rebuildAfterCut(initial, s.log, cut, kept, file);
    await fsp.writeFile(file, data);
    out.set(file, data);
  }
  const imageWritten = s.log.slice(0, cut).some((e) => e.kind === 'write' && e.file === img);
  await mustRun('touch', ['-m', '-d', `@${imageWritten ? s.mtimeAfter : before.mtime}`, img]);
  return out;
}

/** Per bitmap: [log length when its clear was durable, the disk then], oldest first. */
type Clears = Map<string, Array<[number, Buffer]>>;

/** The disk a bitmap must be compared with after a cut at `cut`: the one at its last clear before it. */
function referenceAt(clears: Clears, name: string, cut: number): Buffer {
  return clears
    .get(name)!
    .filter(([at]) => at <= cut)
    .pop()![1];
}

interface Session {
  log: LogEvent[];
  /** The image's mtime after the session. */
  mtimeAfter: string;
  /** Log length when the open had finished, and when the close began. */
  opened: number;
  closing: number;
  clears: Clears;
  ops: number;
}

/**
 * One session through the recording filter: open, `total` requests from three concurrent workers
 * (writes, write-zeroes, discards, flushes, merges; `nbClears` bitmap clears), close. `base` is each
 * bitmap's reference disk at the open (default: the disk as opened).
 */
async function recordedSession(img: string, layout: Layout, rand: () => number, total: number, nbClears: number, base?: Map<string, Buffer>): Promise<Session> {
  const names = layout.bitmaps.map(([n]) => n);
  recordingLog.length = 0;
  const core = newCore();
  const node: BlockNode = await core.openForMonitor(nodeOptions(img, layout, true));
  const opened = recordingLog.length;
  const size = node.length();
  const guest0 = await node.read(0, size);
  const clears: Clears = new Map(names.map((n) => [n, [[0, base?.get(n) ?? guest0]]]));
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)];
  let paused = false;
  const busy = new Set<Promise<unknown>>();
  let ops = 0;
  // Counted, not timed: the seed decides how many requests there are and when the clears come.
  const clearAt = new Set(Array.from({ length: nbClears }, () => Math.floor(rand() * total)));
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
        clears.get(name)!.push([recordingLog.length, await node.read(0, size)]);
        paused = false;
        continue;
      }
      const x = rand();
      const bytes = 1 + Math.floor(rand() * (rand() < 0.7 ? 16 * KiB : 1 * MiB));
      const offset = Math.floor(rand() * (size - bytes));
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
  const closing = recordingLog.length;
  await core.shutdown();
  return { log: recordingLog.slice(), mtimeAfter: await mtimeOf(img), opened, closing, clears, ops };
}

/** QEMU's view of an image after a cut: qemu-img check finds no corruption and lists every bitmap. */
async function checkWithQemu(img: string, layout: Layout, what: string): Promise<void> {
  if (layout.format === 'raw') return; // QEMU knows no sidecar: nothing of it to check
  const names = layout.bitmaps.map(([n]) => n);
  const check = await run('qemu-img', ['check', img]);
  assert.ok(check.code === 0 || check.code === 3, `${what}: qemu-img check exited ${check.code}\n${check.stdout}${check.stderr}`);
  const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', img])) as { 'format-specific': { data: { bitmaps?: Array<{ name: string }> } } };
  const seen = (info['format-specific'].data.bitmaps ?? []).map((b) => b.name);
  for (const name of names) assert.ok(seen.includes(name), `${what}: QEMU no longer sees bitmap ${name} (it sees ${JSON.stringify(seen)})`);
}

/**
 * bitmirror's view: every bitmap loads consistent and covers every 512-byte chunk of the disk that
 * differs from its reference. Returns the number of changed chunks.
 */
async function checkWithBitmirror(img: string, layout: Layout, refs: Map<string, Buffer>, what: string): Promise<number> {
  const core = newCore();
  try {
    const node = await core.openForMonitor(nodeOptions(img, layout, false));
    const now = await node.read(0, node.length());
    let differing = 0;
    for (const [name, ref] of refs) {
      const bm = core.bitmaps.get(node, name);
      assert.equal(bm.inconsistent, false, `${what}: ${name} inconsistent`);
      for (let p = 0; p < now.length; p += 512) {
        if (now.compare(ref, p, p + 512, p, p + 512) === 0) continue;
        differing++;
        assert.ok(bm.isDirty(p), `${what}: bitmap ${name} (granularity ${bm.granularity}) misses changed bytes at ${p}`);
      }
    }
    return differing;
  } finally {
    await core.shutdown();
  }
}

/**
 * A random cut anywhere in a session: the image checked by QEMU, opened (recovered) and stored by
 * bitmirror; then the stored bitmaps checked again, by qemu-nbd's export for qcow2 (QEMU reads what
 * bitmirror stored), by bitmirror for a raw sidecar.
 */
async function randomCut(dir: string, round: number, seed: number): Promise<string> {
  const rand = rng(seed);
  const layout = LAYOUTS[round % LAYOUTS.length];
  const size = 64 * MiB;
  const img = path.join(dir, `p${round}.img`);
  await createImage(img, layout, size);
  const before = await snapshot(img, layout);
  const s = await recordedSession(img, layout, rand, 100 + Math.floor(rand() * 300), 3);

  const cut = Math.floor(rand() * (s.log.length + 1));
  await applyCut(img, before, s, cut, () => rand() < 0.5);
  const what = `seed ${seed}, ${label(layout)} (cut ${cut}/${s.log.length}, open ends at ${s.opened}, close starts at ${s.closing})`;
  const refs = new Map(layout.bitmaps.map(([n]) => [n, referenceAt(s.clears, n, cut)]));
  await checkWithQemu(img, layout, what);
  const differing = await checkWithBitmirror(img, layout, refs, what);
  if (layout.format === 'raw') {
    await checkWithBitmirror(img, layout, refs, `${what}, once stored`);
  } else {
    const check = await run('qemu-img', ['check', img]);
    assert.ok(check.code === 0 || check.code === 3, `${what}: qemu-img check after the store exited ${check.code}\n${check.stdout}${check.stderr}`);
    const raw = path.join(dir, `p${round}.raw`);
    await mustRun('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
    const now = await fsp.readFile(raw);
    await fsp.rm(raw);
    for (const [name, g] of layout.bitmaps) {
      const dirty = await nbdDirtyRanges(img, name);
      const ref = refs.get(name)!;
      for (let p = 0; p < size; p += 512) {
        if (now.compare(ref, p, p + 512, p, p + 512) === 0) continue;
        assert.ok(
          dirty.some(([st, l]) => st <= p && p < st + l),
          `${what}: bitmap ${name} (granularity ${g}) misses changed bytes at ${p} in qemu-nbd's export`,
        );
      }
    }
  }
  for (const f of before.files.keys()) await fsp.rm(f);
  return `${label(layout)}: seed ${seed}, ${s.ops} requests, cut at ${cut}/${s.log.length} events, ${differing} changed 512-byte chunks covered`;
}

/** Every subset of `ids` when there are at most 16, else none, all and 14 random ones; only none and all when not `full`. */
function subsetsOf(ids: number[], rand: () => number, full: boolean): Array<Set<number>> {
  if (!full) return ids.length ? [new Set<number>(), new Set(ids)] : [new Set<number>()];
  if (ids.length <= 4) return Array.from({ length: 2 ** ids.length }, (_, m) => new Set(ids.filter((_, i) => m & (1 << i))));
  return [new Set<number>(), new Set(ids), ...Array.from({ length: 14 }, () => new Set(ids.filter(() => rand() < 0.5)))];
}

/** The every-cut scenarios: [layout, start]; CI runs the first four, the soak cycles through all. */
const EVERY_CUT: Array<[number, 'clean' | 'recovered']> = [
  [0, 'clean'],
  [1, 'recovered'],
  [2, 'clean'],
  [2, 'recovered'],
  [0, 'recovered'],
  [1, 'clean'],
];

/**
 * Every cut point of the open and of the close of one session (with a few requests between), each
 * with every subset of the writes not yet flushed. `start`: clean bitmaps, or bitmaps left in use with
 * a write-intent record by a random cut in a previous session (so the open recovers them).
 */
async function everyCut(dir: string, round: number, seed: number): Promise<string> {
  const rand = rng(seed);
  const [li, start] = EVERY_CUT[round % EVERY_CUT.length];
  const layout = LAYOUTS[li];
  const names = layout.bitmaps.map(([n]) => n);
  const img = path.join(dir, `e${round}.img`);
  await createImage(img, layout, 16 * MiB);
  let base: Map<string, Buffer> | undefined;
  if (start === 'recovered') {
    const before = await snapshot(img, layout);
    const s1 = await recordedSession(img, layout, rand, 60, 1);
    const cut1 = s1.opened + Math.floor(rand() * (s1.closing - s1.opened + 1));
    await applyCut(img, before, s1, cut1, () => rand() < 0.5);
    base = new Map(names.map((n) => [n, referenceAt(s1.clears, n, cut1)]));
  }
  const before = await snapshot(img, layout);
  const s = await recordedSession(img, layout, rand, 20, 1, base);
  const cuts = [...Array.from({ length: s.opened + 1 }, (_, i) => i), ...Array.from({ length: s.log.length - s.closing + 1 }, (_, i) => s.closing + i)];
  const seen = new Set<string>();
  let images = 0;
  for (const cut of cuts) {
    // The open: every subset of what is not yet flushed. The close (many more writes): every cut point
    // with none or all of them in CI, every subset (or a sample) in the soak.
    for (const kept of subsetsOf(pendingWrites(s.log, cut), rand, cut <= s.opened || soak)) {
      const files = await applyCut(img, before, s, cut, (id) => kept.has(id));
      const hash = createHash('sha1');
      for (const data of files.values()) hash.update(data);
      const key = hash.digest('hex');
      if (seen.has(key)) continue;
      seen.add(key);
      images++;
      const what = `seed ${seed}, ${label(layout)}, ${start} (cut ${cut}/${s.log.length}, open ends at ${s.opened}, close starts at ${s.closing}, kept writes ${[...kept].join(',') || 'none'})`;
      await checkWithQemu(img, layout, what);
      await checkWithBitmirror(img, layout, new Map(names.map((n) => [n, referenceAt(s.clears, n, cut)])), what);
    }
  }
  for (const f of before.files.keys()) await fsp.rm(f);
  return `${label(layout)}, ${start}: seed ${seed}, ${cuts.length} cut points (open ${s.opened + 1}, close ${s.log.length - s.closing + 1}), ${images} distinct images`;
}

const rounds = Number(process.env.BM_POWER_CUT_ROUNDS ?? (soak ? 1000 : LAYOUTS.length));

test('persistent bitmaps survive a simulated power cut anywhere: consistent, covering every change since their last durable clear', { skip, timeout: 24 * 3_600_000 }, async (t) => {
  const { dir, cleanup } = await tempDir('bm-power-cut-');
  try {
    for (let round = 0; round < rounds; round++) {
      const line = await randomCut(dir, round, seed0 + round);
      t.diagnostic(line);
      if (process.env.BM_POWER_CUT_ROUNDS || soak) process.stderr.write(`cut ${round}: ${line}\n`);
    }
  } finally {
    await cleanup();
  }
});

test('a power cut at any point of the open (in-use marking) or of the close (storing) loses no bitmap and leaves none claimed consistent but missing changes', { skip, timeout: 24 * 3_600_000 }, async (t) => {
  const { dir, cleanup } = await tempDir('bm-power-cut-every-');
  try {
    // CI: clean and recovered bitmaps across the layouts; the soak: every combination, many seeds.
    const scenarios = soak ? rounds : 4;
    for (let round = 0; round < scenarios; round++) {
      const line = await everyCut(dir, round, seed0 + round);
      t.diagnostic(line);
      if (soak) process.stderr.write(`every-cut ${round}: ${line}\n`);
    }
  } finally {
    await cleanup();
  }
});
