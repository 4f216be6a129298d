/**
 * Mirror benchmark: the live-mirror view of the copy benchmark (bench/copy.ts, whose helpers and
 * table it shares). First the headline: a full qcow2→qcow2 mirror of BM_MIRROR_MIB (default 1536) MiB
 * of data on tmpfs — bitmirror with copy offload on and off, qemu-storage-daemon's mirror, and for
 * reference `qemu-img convert` and `cp` of the same image — BM_MIRROR_ROUNDS (default 5) alternating
 * rounds, medians and ranges of wall time, CPU seconds per GiB and peak memory, bitmirror's ratios per
 * round. BM_MIRROR_FS adds file systems (e.g. "tmpfs,xfs,disk"; see bench/copy.ts). Then the
 * incremental mirror: a working bitmap with 1% of the clusters dirty, into a target whose backing file
 * is the full copy, against the full mirror in the same rounds (the goal: ≤ 3% of the full one's time),
 * both in the daemon that ran the full mirror (warm, as a long-running daemon) and in a fresh one.
 */
import * as path from 'node:path';
import { copyCases, runCopyMatrix } from './copy.js';
import { GiB, MiB, makeDataImage, makeEmptyImage, median, openBenchFs, openJobDaemon, pairedRatio, spread, timedBlockJob, type BlockJobRun, type FsKind, type Row, type Sample } from './support.js';

export const title = 'mirror: full qcow2 mirror vs qemu-storage-daemon, qemu-img convert and cp; incremental (1% dirty) vs full';

/**
 * Full and incremental mirrors on tmpfs, paired by round. Each round: the full mirror in a fresh daemon,
 * then in that same daemon (warm: its code compiled and its caches filled, as in a long-running daemon)
 * an incremental mirror, then an incremental mirror in a fresh daemon (the cost a one-shot run pays).
 * Each incremental copies 1% of the clusters, dirtied anew, into a target backed by the round's full copy.
 */
async function incremental(mib: number, rounds: number): Promise<Row[]> {
  const fs = await openBenchFs('tmpfs', 'mirror-inc', 0);
  if ('skip' in fs) return [{ case: `incremental: skipped (${fs.skip})` }];
  try {
    const size = mib * MiB;
    const src = { file: path.join(fs.dir, 'src.qcow2'), format: 'qcow2' } as const;
    await makeDataImage(src.file, 'qcow2', size, 'dense');
    const full = path.join(fs.dir, 'full.qcow2');
    const clusters = size / 65536;
    const dirty = Math.max(1, Math.round(clusters / 100));
    let seed = 12345;
    /** An incremental mirror of `dirty` clusters dirtied now, into a new image backed by the full copy. */
    const incrementalJob = async (name: string): Promise<BlockJobRun> => {
      const tgt = path.join(fs.dir, name);
      await makeEmptyImage(tgt, 'qcow2', size, full);
      return {
        program: 'bitmirror',
        job: 'mirror',
        src,
        tgt: { file: tgt, format: 'qcow2' },
        bitmap: 'b0',
        prepare: async (exec, hmp) => {
          await exec('block-dirty-bitmap-add', { node: 'src', name: 'b0', granularity: 65536 });
          // `dirty` distinct clusters. (The product of a double LCG lost its low bits, and its residues
          // repeated: 164 writes dirtied 83 clusters, half of the 1% the row claimed.)
          const picked = new Set<number>();
          while (picked.size < dirty) {
            seed = (Math.imul(seed, 1103515245) + 12345) & 0x7fffffff;
            picked.add((seed >>> 8) % clusters);
          }
          for (const c of picked) await hmp(`qemu-io src "write -P 0xee ${c * 65536} 64k"`);
        },
      };
    };
    const fullRuns: Sample[] = [];
    const warmRuns: Sample[] = [];
    const freshRuns: Sample[] = [];
    for (let r = 0; r < rounds; r++) {
      const d = await openJobDaemon(fs.dir, 'bitmirror');
      try {
        await makeEmptyImage(full, 'qcow2', size);
        fullRuns.push(await d.time({ program: 'bitmirror', job: 'mirror', src, tgt: { file: full, format: 'qcow2' } }));
        warmRuns.push(await d.time(await incrementalJob('inc-warm.qcow2')));
      } finally {
        await d.stop();
      }
      freshRuns.push(await timedBlockJob(fs.dir, await incrementalJob('inc-fresh.qcow2')));
    }
    // CPU seconds too: on a loaded machine the wall time of a run this short is mostly waiting for a core.
    const wall = (xs: Sample[]) => xs.map((x) => x.seconds);
    const cpu = (xs: Sample[]) => xs.map((x) => x.cpu);
    const ratio = (runs: Sample[], f: (xs: Sample[]) => number[]) => {
      const r = pairedRatio(f(runs), f(fullRuns), 3);
      return `${r.median.toFixed(3)} (${r.range})`;
    };
    const row = (label: string, runs: Sample[], ratios: boolean): Row => ({
      case: label,
      tool: 'bitmirror',
      'wall s': median(wall(runs)),
      'wall range': spread(wall(runs), 3),
      'CPU s': median(cpu(runs)),
      'CPU range': spread(cpu(runs), 3),
      ...(ratios ? { 'incremental÷full wall': ratio(runs, wall), 'incremental÷full CPU': ratio(runs, cpu) } : {}),
    });
    const inc = `incremental, ${dirty} of ${clusters} clusters dirty`;
    return [
      row(`full mirror, ${mib} MiB data (tmpfs)`, fullRuns, false),
      row(`${inc}, warm daemon (after the full mirror)`, warmRuns, true),
      row(`${inc}, fresh daemon`, freshRuns, true),
    ];
  } finally {
    await fs.close();
  }
}

export async function run(): Promise<Row[]> {
  const mib = Number(process.env.BM_MIRROR_MIB ?? 1536);
  const rounds = Math.max(1, Number(process.env.BM_MIRROR_ROUNDS ?? 5));
  const fsKinds = (process.env.BM_MIRROR_FS ?? 'tmpfs').split(',').filter(Boolean) as FsKind[];
  const [headline] = copyCases(mib, false);
  const rows = await runCopyMatrix({ name: 'mirror', fsKinds, cases: [headline], bigFs: [], rounds });
  rows.push(...(await incremental(Math.min(mib, GiB / MiB), rounds)));
  return rows;
}
