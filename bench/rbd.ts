/**
 * RBD benchmark: a full mirror qcow2 → RBD and RBD → qcow2 of BM_RBD_MIB (default 512) MiB of data,
 * bitmirror's rbd driver (librbd's asynchronous calls, the mirror's requests in flight) against
 * qemu-storage-daemon 7.2's (Debian's qemu-block-extra), alternating in BM_RBD_ROUNDS (default 3)
 * rounds on a throwaway single-node Ceph (test/support/ceph-fixture.sh: one OSD on memstore, so the
 * cluster is as fast as this machine's memory and CPU allow). The qcow2 side lives on tmpfs.
 * Medians and ranges of wall time, CPU seconds and peak memory; bitmirror's ratio per round.
 */
import { mkdtempSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { GiB, MiB, have, makeDataImage, makeEmptyImage, median, openBenchFs, pairedRatio, sh, spread, timedBlockJob, type Daemon, type JobImage, type Row, type Sample } from './support.js';

export const title = 'rbd: full mirror qcow2 → RBD and RBD → qcow2, bitmirror vs qemu-storage-daemon (memstore OSD)';

const FIXTURE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../test/support/ceph-fixture.sh');

/** bitmirror's wall time over qemu-storage-daemon's, paired by round: median (range). */
function ratio(ours: number[], theirs: Sample[]): string {
  const r = pairedRatio(ours, theirs.map((x) => x.seconds));
  return `${r.median.toFixed(3)} (${r.range})`;
}

export async function run(): Promise<Row[]> {
  const mib = Number(process.env.BM_RBD_MIB ?? 512);
  const rounds = Math.max(1, Number(process.env.BM_RBD_ROUNDS ?? 3));
  if (!(await have('ceph')) || !(await sh('sh', ['-c', 'command -v ceph-osd']).then(() => true, () => false))) return [{ case: 'skipped: Ceph not installed (scripts/install-deps.sh)' }];
  const fs = await openBenchFs('tmpfs', 'rbd', 3 * mib * MiB);
  if ('skip' in fs) return [{ case: `skipped (${fs.skip})` }];
  const cephDir = mkdtempSync('/tmp/bm-ceph-');
  try {
    // Room in the OSD's memory for the images of both tools at once.
    process.env.CEPH_FIXTURE_MEM_MB = String(Math.max(3072, 6 * mib));
    const conf = /CEPH_CONF=(.*)/.exec(await sh('bash', [FIXTURE, 'start', cephDir]))![1];
    const rbd = (...args: string[]) => sh('rbd', ['-c', conf, ...args]);
    const rbdNode = (image: string): JobImage => ({ file: '', format: 'raw', options: { driver: 'rbd', pool: 'rbd', image, conf } });
    const size = mib * MiB;
    const src = path.join(fs.dir, 'src.qcow2');
    await makeDataImage(src, 'qcow2', size, 'dense');
    // The RBD source of the way back, written once by QEMU's rbd driver.
    await sh('qemu-img', ['convert', '-O', 'raw', '-f', 'qcow2', src, `rbd:rbd/back-src:conf=${conf}`]);
    const tools: Daemon[] = ['bitmirror', 'qemu-storage-daemon'];
    const runs = new Map<string, Sample[]>();
    const add = (k: string, s: Sample) => runs.set(k, [...(runs.get(k) ?? []), s]);
    for (let r = 0; r < rounds; r++) {
      for (const program of r % 2 ? [...tools].reverse() : tools) {
        await rbd('create', '--size', `${mib}M`, 'rbd/fwd');
        add(`to:${program}`, await timedBlockJob(fs.dir, { program, job: 'mirror', src: { file: src, format: 'qcow2' }, tgt: rbdNode('fwd') }));
        await rbd('rm', '--no-progress', 'rbd/fwd');
        const back = path.join(fs.dir, 'back.qcow2');
        await makeEmptyImage(back, 'qcow2', size);
        add(`from:${program}`, await timedBlockJob(fs.dir, { program, job: 'mirror', src: rbdNode('back-src'), tgt: { file: back, format: 'qcow2' } }));
      }
    }
    const rows: Row[] = [];
    for (const [dir, label] of [['to', `qcow2 → RBD, ${mib} MiB`], ['from', `RBD → qcow2, ${mib} MiB`]] as const) {
      const ours = runs.get(`${dir}:bitmirror`)!;
      const theirs = runs.get(`${dir}:qemu-storage-daemon`)!;
      for (const [program, xs] of [['bitmirror', ours], ['qemu-storage-daemon', theirs]] as const) {
        const secs = xs.map((x) => x.seconds);
        rows.push({
          case: label,
          tool: program,
          'wall s': median(secs),
          'wall range': spread(secs),
          'MiB/s': Math.round(mib / median(secs)),
          'CPU s/GiB': median(xs.map((x) => (x.cpu * GiB) / size)),
          'peak MiB': Math.round(median(xs.map((x) => x.peakMiB))),
          ...(program === 'bitmirror' ? { 'bitmirror÷qsd': ratio(secs, theirs) } : {}),
        });
      }
    }
    return rows;
  } finally {
    await sh('bash', [FIXTURE, 'clean', cephDir]).catch(() => undefined);
    await fs.close();
  }
}
