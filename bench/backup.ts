/**
 * Backup benchmark, same run, same files: a full blockdev-backup of a qcow2 holding BM_BACKUP_MIB MiB of
 * data (default 512) into a new qcow2, bitmirror vs qemu-storage-daemon (alternating, median of
 * BM_BACKUP_ROUNDS, default 3) and vs `cp` of the image file; the same with `compress: true` over
 * BM_BACKUP_COMPRESS_MIB MiB (default 64) of text-like data (deflate shrinks it about 7x; the target's
 * size is shown); then the guest write latency that
 * copy-before-write adds: 4 KiB writes, each to a cluster not yet copied, through an NBD export of the
 * source (qemu-io as the client: its ops/sec per write is the latency), without and with a sync=none
 * backup running, p50 and p99, for both daemons, one at a time (queue depth 1) and 16 in flight
 * (aio_write, what a guest with a queue does), alternating daemons for BM_BACKUP_LAT_ROUNDS rounds
 * (default 3): medians of the rounds' percentiles, and the daemon's CPU time per write.
 *
 * The writes are not FUA (qemu-io -t writeback): with qemu-io's default, writethrough, every write is
 * followed by an fdatasync of the source, the same for both daemons and for both halves, whose time on
 * a shared disk varies by tens of milliseconds and buries the copy's cost (which has no flush).
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon } from '../src/daemon/spawn.js';
import { cpuMeter, have, makeDataImage, makeEmptyImage, median, pct, sh, spread, timedBlockJob, type Row, type Sample } from './support.js';

export const title = 'backup: full backup vs qemu-storage-daemon and cp; write latency added by copy-before-write (p50/p99)';

type Program = 'bitmirror' | 'qemu-storage-daemon';

/** Per-write latencies (ms) of 4 KiB writes at `offsets` through NBD, `depth` at a time, from qemu-io's ops/sec. */
async function writeLatencies(sock: string, offsets: number[], depth: number): Promise<number[]> {
  const cmds =
    depth === 1
      ? offsets.flatMap((o) => ['-c', `write -P 0x5a ${o} 4k`])
      : offsets.flatMap((o, i) => ['-c', `aio_write -P 0x5a ${o} 4k`, ...((i + 1) % depth === 0 || i === offsets.length - 1 ? ['-c', 'aio_flush'] : [])]);
  const out = await sh('qemu-io', ['-t', 'writeback', '-f', 'raw', ...cmds, `nbd+unix:///src?socket=${sock}`]);
  return [...out.matchAll(/and ([\d.]+) ops\/sec/g)].map((m) => 1000 / Number(m[1]));
}

/** One round of one daemon: latencies and CPU ms per write, without a backup and with a sync=none one. */
interface LatencyRound {
  base: number[];
  cbw: number[];
  baseCpuMs: number;
  cbwCpuMs: number;
}

async function latency(program: Program, dir: string, src: string, tgt: string, size: number, writes: number, depth: number): Promise<LatencyRound> {
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', tgt, String(size)]);
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
    const cpu = cpuMeter(d.proc.pid);
    const base = await writeLatencies(sock, clusters.slice(0, writes), depth);
    await q.execute('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'none' });
    const c1 = cpu();
    const cbw = await writeLatencies(sock, clusters.slice(writes), depth);
    const c2 = cpu();
    await q.execute('block-job-cancel', { device: 'j', force: true });
    await q.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'null' }, 60_000);
    await q.execute('block-export-del', { id: 'e' });
    return { base, cbw, baseCpuMs: (c1 * 1000) / writes, cbwCpuMs: ((c2 - c1) * 1000) / writes };
  } finally {
    await d.stop();
  }
}

/** Text-like data, the same for every run: what a compressed backup is for (deflate shrinks it about 7x). */
async function makeTextImage(file: string, bytes: number): Promise<void> {
  const raw = `${file}.raw`;
  const words = ['backup', 'of', 'a', 'qcow2', 'image', 'with', 'compressed', 'clusters', 'packed', 'together'];
  const chunk = Buffer.alloc(1 << 20);
  let seed = 1;
  const fh = await fsp.open(raw, 'w');
  try {
    for (let off = 0; off < bytes; off += chunk.length) {
      for (let p = 0; p < chunk.length; ) {
        seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
        p += chunk.write(`${words[(seed >>> 16) % words.length]} `, p);
      }
      await fh.write(chunk, 0, chunk.length, off);
    }
  } finally {
    await fh.close();
  }
  await sh('qemu-img', ['convert', '-O', 'qcow2', raw, file]);
  await fsp.rm(raw, { force: true });
}

/** Full backups with `compress: true`, both daemons alternating: time, CPU and the target's size. */
async function compressedBackups(dir: string, qsd: boolean, rounds: number): Promise<Row[]> {
  const mib = Number(process.env.BM_BACKUP_COMPRESS_MIB ?? 64);
  const src = path.join(dir, 'text.qcow2');
  await makeTextImage(src, mib << 20);
  const daemons: Program[] = ['bitmirror', ...(qsd ? (['qemu-storage-daemon'] as const) : [])];
  const runs: Record<string, Array<Sample & { targetMiB: number }>> = Object.fromEntries(daemons.map((t) => [t, []]));
  for (let r = 0; r < rounds; r++) {
    for (const tool of r % 2 === 1 ? [...daemons].reverse() : daemons) {
      const tgt = path.join(dir, `${tool}-compressed.qcow2`);
      await makeEmptyImage(tgt, 'qcow2', mib << 20);
      await sh('sync', []);
      const s = await timedBlockJob(dir, { program: tool, job: 'backup', compress: true, src: { file: src, format: 'qcow2' }, tgt: { file: tgt, format: 'qcow2' } });
      runs[tool].push({ ...s, targetMiB: (await fsp.stat(tgt)).size / (1 << 20) });
    }
  }
  const bm = median(runs.bitmirror.map((x) => x.seconds));
  return daemons.map((tool) => {
    const secs = runs[tool].map((x) => x.seconds);
    const t = median(secs);
    return {
      case: `compressed full backup ${mib} MiB of text, median of ${rounds}`,
      tool,
      seconds: t,
      range: spread(secs),
      'MiB/s': mib / t,
      'cpu s': median(runs[tool].map((x) => x.cpu)),
      'target MiB': median(runs[tool].map((x) => x.targetMiB)),
      'bitmirror/this': tool === 'bitmirror' ? '' : bm / t,
    };
  });
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
    rows.push(...(await compressedBackups(dir, qsd, rounds)));
    const writes = Number(process.env.BM_BACKUP_WRITES ?? 400);
    const latRounds = Math.max(1, Number(process.env.BM_BACKUP_LAT_ROUNDS ?? 3));
    const daemons = tools.filter((t) => t !== 'cp') as Program[];
    for (const depth of [1, 16]) {
      const got: Record<string, LatencyRound[]> = Object.fromEntries(daemons.map((t) => [t, []]));
      for (let r = 0; r < latRounds; r++) {
        for (const tool of r % 2 === 1 ? [...daemons].reverse() : daemons) got[tool].push(await latency(tool, dir, src, path.join(dir, `${tool}-lat.qcow2`), size, writes, depth));
      }
      for (const tool of daemons) {
        const per = (f: (x: LatencyRound) => number): number[] => got[tool].map(f);
        const added50 = per((x) => pct(x.cbw, 50) - pct(x.base, 50));
        const added99 = per((x) => pct(x.cbw, 99) - pct(x.base, 99));
        rows.push({
          case: `4 KiB writes, ${depth} in flight, ${writes} writes (ms), median of ${latRounds}`,
          tool,
          'p50 no backup': median(per((x) => pct(x.base, 50))),
          'p99 no backup': median(per((x) => pct(x.base, 99))),
          'p50 with cbw': median(per((x) => pct(x.cbw, 50))),
          'p99 with cbw': median(per((x) => pct(x.cbw, 99))),
          'added p50': median(added50),
          'added p50 range': spread(added50),
          'added p99': median(added99),
          'cpu ms/write no backup': median(per((x) => x.baseCpuMs)),
          'cpu ms/write with cbw': median(per((x) => x.cbwCpuMs)),
        });
      }
    }
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
  return rows;
}
