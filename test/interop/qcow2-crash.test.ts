/**
 * Crash consistency of the qcow2 driver (formats.md §1.9) through the daemon: random writes and
 * write-zeroes of random sizes (HMP qemu-io, several in flight, in-flight requests never overlap),
 * flushes now and then, then SIGKILL at a random moment. Afterwards `qemu-img check` may report leaks
 * but no corruption, and every write acknowledged before a successful flush reads back (qemu-io read -P,
 * and byte by byte from a `qemu-img convert` copy, allowing for writes issued after it). Repeated with
 * several cluster sizes and refcount widths; seeds are printed so that a failure can be replayed.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { mustRun, run, tempDir } from '../support/tools.js';
import { rng } from '../support/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 96 * MiB;
const haveQemu = ['/usr/bin/qemu-img', '/usr/bin/qemu-io'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'qemu-img/qemu-io not installed';

interface Write {
  seq: number;
  offset: number;
  bytes: number;
  /** The byte written (0 for write-zeroes). */
  pattern: number;
  issuedAt: number;
  /** Order of completion (acknowledgement), or undefined if never acknowledged. */
  doneAt?: number;
  durable: boolean;
}

const CONFIGS: Array<{ opts: string; label: string }> = [
  { opts: 'cluster_size=65536', label: '64k clusters' },
  { opts: 'cluster_size=4096', label: '4k clusters' },
  { opts: 'cluster_size=65536,refcount_bits=1', label: '64k clusters, 1-bit refcounts' },
  { opts: 'cluster_size=512', label: '512 B clusters' },
  { opts: 'cluster_size=2097152', label: '2M clusters' },
  { opts: 'cluster_size=16384,refcount_bits=64', label: '16k clusters, 64-bit refcounts' },
];

const timings: string[] = [];

async function oneRun(dir: string, round: number, seed: number, opts: string): Promise<{ writes: number; durable: number }> {
  const rand = rng(seed);
  const img = path.join(dir, `c${round}.qcow2`);
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, img, String(SIZE)]);
  // Some data from QEMU first, so that writes also land in allocated clusters and COW partial ones.
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xee 0 1M', '-c', `write -P 0xef ${SIZE / 2 - 100} 300k`, img]);
  const base: Write[] = [
    { seq: -2, offset: 0, bytes: MiB, pattern: 0xee, issuedAt: -2, doneAt: -2, durable: true },
    { seq: -1, offset: SIZE / 2 - 100, bytes: 300 * KiB, pattern: 0xef, issuedAt: -1, doneAt: -1, durable: true },
  ];
  const d = await spawnDaemon(path.join(dir, `c${round}.sock`), ['--blockdev', `driver=file,filename=${img},node-name=f`, '--blockdev', 'driver=qcow2,file=f,node-name=q']);
  const writes: Write[] = [...base];
  const inflight = new Set<Write>();
  let clock = 0;
  let killed = false;
  const killAfter = 300 + rand() * 1700;

  const overlapsInflight = (o: number, n: number) => [...inflight].some((w) => o < w.offset + w.bytes && w.offset < o + n);
  const pickWrite = (seq: number): Write => {
    for (;;) {
      const small = rand() < 0.6;
      const bytes = small ? 1 + Math.floor(rand() * 8 * KiB) : 1 + Math.floor(rand() * 700 * KiB);
      // Hot spots make overwrites likely; elsewhere anywhere in the image.
      const hot = rand() < 0.5;
      const offset = hot ? Math.floor(rand() * 4 * MiB) : Math.floor(rand() * (SIZE - bytes));
      if (overlapsInflight(offset, bytes)) continue;
      const pattern = rand() < 0.1 ? 0 : 1 + (seq % 250);
      return { seq, offset, bytes, pattern, issuedAt: clock++, durable: false };
    }
  };

  const worker = async (): Promise<void> => {
    let seq = writes.length;
    while (!killed) {
      if (rand() < 0.08) {
        // Everything acknowledged before the flush is issued must survive once it returns.
        const before = writes.filter((w) => w.doneAt !== undefined && !w.durable);
        try {
          await d.qmp.hmp('qemu-io q "flush"');
        } catch {
          return;
        }
        if (killed) return;
        for (const w of before) w.durable = true;
        continue;
      }
      const w = pickWrite(seq++);
      writes.push(w);
      inflight.add(w);
      const cmd = w.pattern === 0 ? `write -z ${w.offset} ${w.bytes}` : `write -P ${w.pattern} ${w.offset} ${w.bytes}`;
      let out: string;
      try {
        out = await d.qmp.hmpOutput(`qemu-io q "${cmd}"`);
      } catch {
        return;
      }
      if (killed) return;
      assert.match(out, /^wrote /, `${cmd}: ${out}`);
      w.doneAt = clock++;
      inflight.delete(w);
    }
  };
  const workers = [worker(), worker(), worker(), worker()];
  await new Promise((r) => setTimeout(r, killAfter));
  killed = true;
  await d.kill();
  await Promise.all(workers);
  const t0 = Date.now();
  const phase = (what: string) => timings.push(`${what} ${Date.now() - t0}ms`);

  const check = await run('qemu-img', ['check', img]);
  phase('check');
  assert.ok(check.code === 0 || check.code === 3, `seed ${seed} (${opts}): qemu-img check exited ${check.code}\n${check.stdout}${check.stderr}`);

  // Byte-wise: where a durable write is the newest durable one, the byte is its pattern or that of a
  // write issued after it completed (possibly half done when the process died).
  const raw = path.join(dir, `c${round}.raw`);
  await mustRun('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
  const data = await fsp.readFile(raw);
  phase('convert');
  const durable = writes.filter((w) => w.durable).sort((a, b) => a.doneAt! - b.doneAt!);
  const owner = new Int32Array(SIZE).fill(-1);
  for (const w of durable) owner.fill(writes.indexOf(w), w.offset, w.offset + w.bytes);
  let bad = 0;
  let firstBad = '';
  for (let i = 0; i < SIZE; ) {
    const k = owner[i];
    if (k < 0) {
      i++;
      continue;
    }
    const w = writes[k];
    let j = i;
    while (j < SIZE && owner[j] === k) j++;
    const after = writes.filter((x) => x.issuedAt > w.doneAt! && x.offset < j && i < x.offset + x.bytes);
    for (let p = i; p < j; p++) {
      if (data[p] === w.pattern) continue;
      const ok = after.some((x) => x.pattern === data[p] && p >= x.offset && p < x.offset + x.bytes);
      if (!ok) {
        bad++;
        if (!firstBad) firstBad = `byte ${p} is 0x${data[p].toString(16)}, durable write #${w.seq} (${w.offset}+${w.bytes}) wrote 0x${w.pattern.toString(16)}`;
      }
    }
    i = j;
  }
  assert.equal(bad, 0, `seed ${seed} (${opts}): ${bad} bytes lost; first: ${firstBad}`);

  phase('compare');
  // qemu-io read -P on durable writes that nothing issued later touched.
  const untouched = durable.filter((w) => !writes.some((x) => x.issuedAt > w.doneAt! && x.offset < w.offset + w.bytes && w.offset < x.offset + x.bytes));
  const visible = untouched.filter((w) => {
    const k = writes.indexOf(w);
    for (let p = w.offset; p < w.offset + w.bytes; p++) if (owner[p] !== k) return false;
    return true;
  });
  if (visible.length) {
    const cmds = visible.slice(0, 200).flatMap((w) => ['-c', `read -P ${w.pattern} ${w.offset} ${w.bytes}`]);
    const r = await run('qemu-io', ['-r', '-f', 'qcow2', ...cmds, img]);
    assert.equal(r.code, 0, `seed ${seed}: ${r.stdout}${r.stderr}`);
    assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed/);
  }
  await fsp.rm(raw);
  phase('read -P');
  return { writes: writes.filter((w) => w.doneAt !== undefined).length - base.length, durable: durable.length - base.length };
}

test('qcow2 survives SIGKILL during writes: no corruption, flushed writes read back', { skip, timeout: 240_000 }, async (t) => {
  const { dir, cleanup } = await tempDir('bm-crash-');
  try {
    const seed0 = Number(process.env.BM_CRASH_SEED ?? Date.now() % 1_000_000);
    for (let round = 0; round < CONFIGS.length; round++) {
      const seed = seed0 + round;
      const r = await oneRun(dir, round, seed, CONFIGS[round].opts);
      t.diagnostic(`${CONFIGS[round].label}: seed ${seed}, ${r.writes} writes acknowledged, ${r.durable} flushed; ${timings.splice(0).join(', ')}`);
      await fsp.rm(path.join(dir, `c${round}.qcow2`));
    }
  } finally {
    await cleanup();
  }
});
