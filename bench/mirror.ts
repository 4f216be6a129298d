/**
 * Mirror benchmark: the live-mirror view of the copy benchmark (bench/copy.ts, whose helpers and
 * table it shares). First the headline: a full qcow2→qcow2 mirror of BM_MIRROR_MIB (default 1536) MiB
 * of data on tmpfs — bitmirror with copy offload on and off, qemu-storage-daemon's mirror, and for
 * reference `qemu-img convert` and `cp` of the same image — BM_MIRROR_ROUNDS (default 5) alternating
 * rounds, medians and ranges of wall time, CPU seconds per GiB and peak memory, bitmirror's ratios per
 * round. BM_MIRROR_FS adds file systems (e.g. "tmpfs,xfs,disk"; see bench/copy.ts). Then the
 * incremental mirror: a working bitmap with 1% of the clusters dirty, into a target whose backing file
 * is the full copy, against the full mirror in the same rounds (the goal: ≤ 3% of the full one's time).
 */
import * as path from 'node:path';
import { copyCases, runCopyMatrix } from './copy.js';
import { GiB, MiB, makeDataImage, makeEmptyImage, median, openBenchFs, pairedRatio, spread, timedBlockJob, type FsKind, type Row, type Sample } from './support.js';

export const title = 'mirror: full qcow2 mirror vs qemu-storage-daemon, qemu-img convert and cp; incremental (1% dirty) vs full';

/** Full and incremental mirrors on tmpfs, paired by round. */
async function incremental(mib: number, rounds: number): Promise<Row[]> {
  const fs = await openBenchFs('tmpfs', 'mirror-inc', 0);
  if ('skip' in fs) return [{ case: `incremental: skipped (${fs.skip})` }];
  try {
    const dataBytes = mib * MiB;
    const size = dataBytes;
    const src = path.join(fs.dir, 'src.qcow2');
    await makeDataImage(src, 'qcow2', size, 'dense');
    const full = path.join(fs.dir, 'full.qcow2');
    const inc = path.join(fs.dir, 'inc.qcow2');
    const clusters = dataBytes / 65536;
    const dirty = Math.max(1, Math.round(clusters / 100));
    const fullRuns: Sample[] = [];
    const incRuns: Sample[] = [];
    let seed = 12345;
    for (let r = 0; r < rounds; r++) {
      // The full copy first: the incremental target's backing file is this round's full copy.
      await makeEmptyImage(full, 'qcow2', size);
      fullRuns.push(await timedBlockJob(fs.dir, { program: 'bitmirror', job: 'mirror', src: { file: src, format: 'qcow2' }, tgt: { file: full, format: 'qcow2' } }));
      await makeEmptyImage(inc, 'qcow2', size, full);
      const s = await timedBlockJob(fs.dir, {
        program: 'bitmirror',
        job: 'mirror',
        src: { file: src, format: 'qcow2' },
        tgt: { file: inc, format: 'qcow2' },
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
      });
      incRuns.push(s);
    }
    // CPU seconds too: on a loaded machine the wall time of a run this short is mostly waiting for a core.
    const wall = (xs: Sample[]) => xs.map((x) => x.seconds);
    const cpu = (xs: Sample[]) => xs.map((x) => x.cpu);
    const ratio = (f: (xs: Sample[]) => number[]) => {
      const r = pairedRatio(f(incRuns), f(fullRuns));
      return `${r.median.toFixed(3)} (${r.range})`;
    };
    return [
      { case: `full mirror, ${mib} MiB data (tmpfs)`, tool: 'bitmirror', 'wall s': median(wall(fullRuns)), 'wall range': spread(wall(fullRuns)), 'CPU s': median(cpu(fullRuns)), 'CPU range': spread(cpu(fullRuns)) },
      {
        case: `incremental, ${dirty} of ${clusters} clusters dirty`,
        tool: 'bitmirror',
        'wall s': median(wall(incRuns)),
        'wall range': spread(wall(incRuns)),
        'CPU s': median(cpu(incRuns)),
        'CPU range': spread(cpu(incRuns)),
        'incremental÷full wall': ratio(wall),
        'incremental÷full CPU': ratio(cpu),
      },
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
