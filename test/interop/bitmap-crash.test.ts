/**
 * Persistent bitmaps after SIGKILL (issue 14): random concurrent writes (one worker writing
 * sequentially), write-zeroes, discards, bitmap clears and merges and flushes through the daemon
 * (HMP qemu-io, QMP), then SIGKILL after a random number of requests, with requests in flight. The next open by bitmirror must bring every persistent bitmap back consistent, and
 * once stored (clean close) QEMU's qemu-nbd must export it covering every byte that differs from a
 * copy of the disk taken at the bitmap's last clear (read through the daemon's NBD export with no
 * request in flight); qemu-img check finds no corruption. Several layouts (qcow2 cluster sizes,
 * granularities; raw with its bitmaps in a sidecar, exported by bitmirror itself). Seeds are
 * printed; a round's layout follows from its seed, so BM_BITMAP_CRASH_SEED replays one (rounds take
 * the seeds from there on); BM_BITMAP_CRASH_ROUNDS sets the number of rounds (default: one per
 * layout; BM_SOAK=1: 1000, three at a time, each with its own daemons and image; BM_BITMAP_CRASH_JOBS
 * sets how many).
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { startDaemon } from '../support/daemon.js';
import { firstUncovered, mustRun, nbdDirtyRanges, nbdDirtyRangesAt, run, tempDir } from '../support/tools.js';
import { rng } from '../support/random.js';
import { KiB, MiB } from '../../src/base/sizes.js';
import type { SpawnedDaemon } from '../../src/daemon/spawn.js';

/** 8 write-intent regions of 4 MiB. */
const SIZE = 32 * MiB;
const haveQemu = ['/usr/bin/qemu-img', '/usr/bin/qemu-io', '/usr/bin/qemu-nbd', '/usr/bin/nbdinfo'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'qemu-img, qemu-io, qemu-nbd or nbdinfo not installed';

/** qcow2 with a cluster size, or raw with its bitmaps in a sidecar (block/drivers/raw-sidecar.ts). */
interface Layout {
  format: 'qcow2' | 'raw';
  cluster: number;
  bitmaps: Array<[string, number]>;
}
const LAYOUTS: Layout[] = [
  { format: 'qcow2', cluster: 64 * KiB, bitmaps: [['b0', 64 * KiB], ['b1', 4 * KiB]] },
  { format: 'qcow2', cluster: 4 * KiB, bitmaps: [['b0', 512], ['b1', 1 * MiB]] },
  { format: 'qcow2', cluster: 2 * MiB, bitmaps: [['b0', 64 * KiB], ['b1', 2 * MiB]] },
  { format: 'raw', cluster: 0, bitmaps: [['b0', 4 * KiB], ['b1', 1 * MiB]] },
];
const label = (l: Layout): string => (l.format === 'raw' ? 'raw + sidecar' : `qcow2, cluster ${l.cluster}`);

function daemonArgs(img: string, layout: Layout): string[] {
  const file = ['--blockdev', `driver=file,filename=${img},node-name=f,discard=unmap`];
  if (layout.format === 'raw') {
    return [...file, '--blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'q', file: 'f', '__org.bitmirror_bitmaps': { driver: 'file', filename: `${img}.bitmaps` } })];
  }
  return [...file, '--blockdev', 'driver=qcow2,file=f,node-name=q,discard=unmap'];
}

/** The disk's guest contents as the daemon serves them over NBD (no request may be in flight). */
async function guestCopy(d: SpawnedDaemon, nbdSock: string, out: string): Promise<Buffer> {
  await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///q?socket=${nbdSock}`, out]);
  const data = await fsp.readFile(out);
  await fsp.rm(out);
  return data;
}

async function oneRound(dir: string, seed: number): Promise<string> {
  const rand = rng(seed);
  const layout = LAYOUTS[seed % LAYOUTS.length];
  const round = seed;
  const img = path.join(dir, `r${round}.img`);
  const fmt = layout.format;
  await mustRun('qemu-img', ['create', '-q', '-f', fmt, ...(fmt === 'qcow2' ? ['-o', `cluster_size=${layout.cluster}`] : []), img, String(SIZE)]);
  await mustRun('qemu-io', ['-f', fmt, '-c', 'write -P 0xee 0 1M', '-c', `write -P 0xef ${SIZE / 2 - 100} 300k`, img]);
  if (fmt === 'qcow2') {
    for (const [name, g] of layout.bitmaps) await mustRun('qemu-img', ['bitmap', '--add', '-g', String(g), img, name]);
  } else {
    // A raw image's bitmaps start in a sidecar stored by a clean close.
    await fsp.writeFile(`${img}.bitmaps`, '');
    const d0 = await startDaemon(path.join(dir, `r${round}a.sock`), daemonArgs(img, layout));
    for (const [name, g] of layout.bitmaps) await d0.qmp.execute('block-dirty-bitmap-add', { node: 'q', name, granularity: g, persistent: true });
    assert.equal(await d0.stop(), 0, d0.stderr());
  }
  const start = path.join(dir, `r${round}.start.raw`);
  await mustRun('qemu-img', ['convert', '-f', fmt, '-O', 'raw', img, start]);
  const initial = await fsp.readFile(start);
  await fsp.rm(start);
  /** Each bitmap's reference: the disk at its last clear. */
  const reference = new Map<string, Buffer>(layout.bitmaps.map(([name]) => [name, initial]));

  const d = await startDaemon(path.join(dir, `r${round}.sock`), daemonArgs(img, layout));
  const liveNbd = path.join(dir, `r${round}.nbd`);
  await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: liveNbd } } });
  await d.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'q', writable: false });
  let killed = false;
  let paused = false;
  let ops = 0;
  // The kill comes after a number of requests the seed draws (then a moment more, with requests in
  // flight): counted, not timed, so a loaded machine's rounds do as much as a quiet one's.
  const killAfter = 30 + Math.floor(rand() * 200);
  let reachKill!: () => void;
  const killDue = new Promise<void>((r) => (reachKill = r));
  const busy = new Set<Promise<unknown>>();
  const names = layout.bitmaps.map(([n]) => n);
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)];

  // A sequential worker writes on from where its last write ended (the write-intent record marks
  // regions ahead of such a stream), starting over somewhere else now and then.
  let streamAt = Math.floor(rand() * SIZE);
  const worker = async (sequential: boolean): Promise<void> => {
    while (!killed) {
      if (paused) {
        await new Promise((r) => setImmediate(r));
        continue;
      }
      const x = rand();
      let bytes = 1 + Math.floor(rand() * (rand() < 0.7 ? 16 * KiB : 1 * MiB));
      let offset = Math.floor(rand() * (SIZE - bytes));
      if (sequential) {
        bytes = 64 * KiB + Math.floor(rand() * 960 * KiB);
        if (streamAt + bytes > SIZE || rand() < 0.02) streamAt = Math.floor(rand() * (SIZE - bytes));
        offset = streamAt;
        streamAt += bytes;
      }
      let p: Promise<unknown>;
      if (sequential) p = d.qmp.hmp(`qemu-io q "write ${x < 0.2 ? '-z' : `-P ${1 + (ops % 250)}`} ${offset} ${bytes}"`);
      else if (x < 0.06) p = d.qmp.hmp('qemu-io q "flush"');
      else if (x < 0.1) p = d.qmp.execute('block-dirty-bitmap-merge', { node: 'q', target: pick(names), bitmaps: [pick(names)] });
      else if (x < 0.2) p = d.qmp.hmp(`qemu-io q "write -z ${offset} ${bytes}"`);
      else if (x < 0.3) p = d.qmp.hmp(`qemu-io q "discard ${offset} ${bytes}"`);
      else p = d.qmp.hmp(`qemu-io q "write -P ${1 + (ops % 250)} ${offset} ${bytes}"`);
      if (++ops === killAfter) reachKill();
      busy.add(p);
      try {
        await p;
      } catch {
        if (!killed) throw new Error(`seed ${seed}: a request failed before the kill`);
        return;
      } finally {
        busy.delete(p);
      }
    }
  };
  // Now and then a bitmap is cleared with nothing in flight, and the disk copied then.
  const clearer = async (): Promise<void> => {
    while (!killed) {
      await new Promise((r) => setTimeout(r, 50 + rand() * 400));
      if (killed) return;
      paused = true;
      while (busy.size) await Promise.allSettled([...busy]);
      if (killed) return;
      const name = pick(names);
      try {
        await d.qmp.execute('block-dirty-bitmap-clear', { node: 'q', name });
        reference.set(name, await guestCopy(d, liveNbd, path.join(dir, `r${round}.clear.raw`)));
      } catch {
        if (!killed) throw new Error(`seed ${seed}: clear failed before the kill`);
      }
      paused = false;
    }
  };
  const all = [worker(false), worker(false), worker(false), worker(true), clearer()];
  // (A request failing before the kill fails the round here rather than leaving it waiting.)
  await Promise.race([killDue, Promise.all(all)]);
  await new Promise((r) => setTimeout(r, rand() * 20));
  killed = true;
  await d.kill();
  await Promise.all(all);

  // The next open brings every bitmap back consistent; a clean close stores them for QEMU.
  const d2 = await startDaemon(path.join(dir, `r${round}b.sock`), daemonArgs(img, layout));
  const nodes = await d2.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
  const bms = (nodes.find((n) => n['node-name'] === 'q')!['dirty-bitmaps'] as Array<Record<string, unknown>>) ?? [];
  assert.deepEqual(bms.map((b) => b.name).sort(), [...names].sort(), `seed ${seed}`);
  for (const b of bms) assert.equal(b.inconsistent, undefined, `seed ${seed}: ${JSON.stringify(b)}`);
  assert.equal(await d2.stop(), 0, `seed ${seed}: ${d2.stderr()}`);
  if (fmt === 'qcow2') {
    const check = await run('qemu-img', ['check', img]);
    // A killed session may leak clusters (exit 3); anything else is corruption.
    assert.ok(check.code === 0 || check.code === 3, `seed ${seed}: qemu-img check exited ${check.code}\n${check.stdout}${check.stderr}`);
  }

  const fin = path.join(dir, `r${round}.final.raw`);
  await mustRun('qemu-img', ['convert', '-f', fmt, '-O', 'raw', img, fin]);
  const now = await fsp.readFile(fin);
  await fsp.rm(fin);
  // The stored bitmaps as exported: by QEMU's qemu-nbd for qcow2, by bitmirror for a raw sidecar
  // (QEMU knows no sidecar).
  const exported = fmt === 'qcow2' ? undefined : await startDaemon(path.join(dir, `r${round}c.sock`), daemonArgs(img, layout));
  const nbdSock = path.join(dir, `r${round}c.nbd`);
  if (exported) {
    for (const name of names) await exported.qmp.execute('block-dirty-bitmap-disable', { node: 'q', name });
    await exported.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } });
    await exported.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'q', writable: false, bitmaps: names });
  }
  let differing = 0;
  for (const [name, g] of layout.bitmaps) {
    const dirty = exported ? await nbdDirtyRangesAt(`nbd+unix:///q?socket=${nbdSock}`, name) : await nbdDirtyRanges(img, name);
    const ref = reference.get(name)!;
    // 512-byte chunks never straddle a granule (granularity >= 512).
    const missed = firstUncovered(now, ref, dirty);
    assert.equal(missed, undefined, `seed ${seed}: bitmap ${name} (granularity ${g}) misses changed bytes at ${missed}; dirty ${JSON.stringify(dirty)}`);
    for (let p = 0; p < SIZE; p += 512) if (now.compare(ref, p, p + 512, p, p + 512) !== 0) differing++;
  }
  if (exported) assert.equal(await exported.stop(), 0, exported.stderr());
  await fsp.rm(img);
  await fsp.rm(`${img}.bitmaps`, { force: true });
  return `${label(layout)}: seed ${seed}, ${ops} requests, ${differing} changed 512-byte chunks covered`;
}

const soak = !!process.env.BM_SOAK;
const rounds = Number(process.env.BM_BITMAP_CRASH_ROUNDS ?? (soak ? 1000 : LAYOUTS.length));
const jobs = Number(process.env.BM_BITMAP_CRASH_JOBS ?? (soak ? 3 : 1));

// The soak (BM_SOAK: 1000 rounds) gets a day's timeout.
test('persistent bitmaps survive SIGKILL: consistent, covering every change since their last clear', { skip, timeout: soak ? 24 * 3_600_000 : 3_600_000 }, async (t) => {
  const { dir, cleanup } = await tempDir('bm-bitmap-crash-');
  try {
    const seed0 = Number(process.env.BM_BITMAP_CRASH_SEED ?? Date.now() % 1_000_000);
    let next = 0;
    let done = 0;
    // `jobs` rounds at a time, each on its own image with its own daemons and sockets.
    const lane = async (): Promise<void> => {
      while (next < rounds) {
        const round = next++;
        const line = await oneRound(dir, seed0 + round);
        t.diagnostic(line);
        // A long soak shows its progress as it goes.
        if (process.env.BM_BITMAP_CRASH_ROUNDS || soak) process.stderr.write(`round ${done}: ${line}\n`);
        done++;
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, Math.min(jobs, rounds)) }, () => lane()));
    t.diagnostic(`${done} rounds (seeds ${seed0}..${seed0 + rounds - 1})`);
  } finally {
    await cleanup();
  }
});
