/**
 * Backup benchmark, same run, same files: a full blockdev-backup of a qcow2 holding BM_BACKUP_MIB MiB of
 * data (default 512) into a new qcow2, bitmirror vs qemu-storage-daemon (alternating, median of
 * BM_BACKUP_ROUNDS, default 3) and vs `cp` of the image file; then the guest write latency that
 * copy-before-write adds: 4 KiB writes, each to a cluster not yet copied, through an NBD export of the
 * source (qemu-io as the client: its ops/sec per write is the latency), without and with a sync=none
 * backup running, p50 and p99, for both daemons.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon } from '../src/daemon/spawn.js';
import { have, makeDataImage, makeEmptyImage, median, pct, sh, spread, timedBlockJob, type Row, type Sample } from './support.js';

export const title = 'backup: full backup vs qemu-storage-daemon and cp; write latency added by copy-before-write (p50/p99)';

type Program = 'bitmirror' | 'qemu-storage-daemon';

/** Per-write latencies (ms) of 4 KiB writes at `offsets` through NBD, from qemu-io's ops/sec. */
async function writeLatencies(sock: string, offsets: number[]): Promise<number[]> {
  const out = await sh('qemu-io', ['-f', 'raw', ...offsets.flatMap((o) => ['-c', `write -P 0x5a ${o} 4k`]), `nbd+unix:///src?socket=${sock}`]);
  return [...out.matchAll(/and ([\d.]+) ops\/sec/g)].map((m) => 1000 / Number(m[1]));
}

async function latency(program: Program, dir: string, src: string, tgt: string, size: number, writes: number): Promise<{ base: number[]; cbw: number[] }> {
  await sh('qemu-img', ['create', '-f', 'qcow2', tgt, String(size)]);
  const d = await spawnDaemon(path.join(dir, `${program}-lat.sock`), [], program);
  const sock = path.join(dir, `${program}-nbd.sock`);
  try {
    const q = d.qmp;
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: tgt } });
    await q.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await q.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'src', name: 'src', writable: true });
    // Distinct 64 KiB clusters in the data area: the first half without a backup, the rest with one.
    const clusters = Array.from({ length: 2 * writes }, (_, i) => i * 7 * 65536);
    const base = await writeLatencies(sock, clusters.slice(0, writes));
    await q.execute('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'none' });
    const cbw = await writeLatencies(sock, clusters.slice(writes));
    await q.execute('block-job-cancel', { device: 'j', force: true });
    await q.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'null' }, 60_000);
    await q.execute('block-export-del', { id: 'e' });
    return { base, cbw };
  } finally {
    await d.stop();
  }
}

export async function run(): Promise<Row[]> {
  const mib = Number(process.env.BM_BACKUP_MIB ?? 512);
  const dataBytes = mib << 20;
  const size = dataBytes + (256 << 20);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-bench-backup-'));
  const rows: Row[] = [];
  try {
    const src = path.join(dir, 'src.qcow2');
    await makeDataImage(src, 'qcow2', dataBytes, 'dense');
    await sh('qemu-img', ['resize', '-q', src, String(size)]);
    const rounds = Math.max(1, Number(process.env.BM_BACKUP_ROUNDS ?? 3));
    const qsd = await have('qemu-storage-daemon');
    const tools = ['bitmirror', ...(qsd ? ['qemu-storage-daemon'] : []), 'cp'];
    const runs: Record<string, Sample[]> = Object.fromEntries(tools.map((t) => [t, []]));
    for (let r = 0; r < rounds; r++) {
      for (const tool of r % 2 === 1 ? [...tools].reverse() : tools) {
        if (tool === 'cp') {
          const t0 = performance.now();
          await sh('cp', ['--sparse=always', src, path.join(dir, 'cp.qcow2')]);
          runs.cp.push({ seconds: (performance.now() - t0) / 1000, cpu: NaN, peakMiB: NaN });
          await fsp.rm(path.join(dir, 'cp.qcow2'), { force: true });
        } else {
          const tgt = path.join(dir, `${tool}.qcow2`);
          await makeEmptyImage(tgt, 'qcow2', size);
          await sh('sync', []);
          runs[tool].push(await timedBlockJob(dir, { program: tool as Program, job: 'backup', src: { file: src, format: 'qcow2' }, tgt: { file: tgt, format: 'qcow2' } }));
        }
      }
    }
    const bm = median(runs.bitmirror.map((x) => x.seconds));
    for (const tool of tools) {
      const secs = runs[tool].map((x) => x.seconds);
      const t = median(secs);
      rows.push({
        case: `full backup ${mib} MiB, median of ${rounds}`,
        tool,
        seconds: t,
        range: spread(secs),
        'MiB/s': mib / t,
        'cpu s': tool === 'cp' ? '' : median(runs[tool].map((x) => x.cpu)),
        'bitmirror/this': tool === 'bitmirror' ? '' : bm / t,
      });
    }
    const writes = Number(process.env.BM_BACKUP_WRITES ?? 400);
    for (const tool of tools.filter((t) => t !== 'cp') as Program[]) {
      const { base, cbw } = await latency(tool, dir, src, path.join(dir, `${tool}-lat.qcow2`), size, writes);
      rows.push({
        case: `4 KiB write latency, ${writes} writes (ms)`,
        tool,
        'p50 no backup': pct(base, 50),
        'p99 no backup': pct(base, 99),
        'p50 with cbw': pct(cbw, 50),
        'p99 with cbw': pct(cbw, 99),
        'added p50': pct(cbw, 50) - pct(base, 50),
        'added p99': pct(cbw, 99) - pct(base, 99),
      });
    }
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
  return rows;
}
