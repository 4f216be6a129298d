/**
 * Mirror benchmark: a full mirror of a qcow2 holding ~1.5 GiB of data into a new qcow2, bitmirror (copy
 * offload on and off) vs qemu-storage-daemon on the same files in the same run, and vs `cp` of the image
 * file; then an incremental mirror (working bitmap with 1% of the clusters dirty) vs the full one. Each
 * mirror runs to READY and is soft-cancelled (a complete copy, no pivot), timed from blockdev-mirror to
 * the end; the daemon's CPU seconds over the same span (user + system, from /proc) are shown too, as
 * they vary far less than wall time on a shared machine. BM_MIRROR_MIB shrinks the data size (default
 * 1536); the files live in TMPDIR (e.g. TMPDIR=/dev/shm for tmpfs, where disk write-back does not blur
 * the numbers).
 */
import { execFile } from 'node:child_process';
import { promises as fsp, readFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon } from '../src/daemon/spawn.js';

export const title = 'mirror: full qcow2 mirror vs qemu-storage-daemon and cp; incremental (1% dirty) vs full';

type Row = Record<string, string | number>;

export function sh(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 << 20 }, (err, stdout, stderr) => (err ? reject(new Error(`${cmd}: ${String(stderr)}`)) : resolve(String(stdout))));
  });
}

export async function have(cmd: string): Promise<boolean> {
  return sh(cmd, ['--version']).then(
    () => true,
    () => false,
  );
}

/** User + system CPU seconds a process has used so far (Linux /proc; NaN elsewhere). */
export function cpuSeconds(pid: number | undefined): number {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100; // clock ticks (USER_HZ = 100 on Linux)
  } catch {
    return NaN;
  }
}

/** One mirror src -> new target through a daemon: wall and daemon CPU seconds. `prepare` runs before timing starts. */
async function timedMirror(
  program: 'bitmirror' | 'qemu-storage-daemon',
  dir: string,
  src: string,
  tgt: string,
  size: number,
  opts: {
    prepare?: (hmp: (c: string) => Promise<string>, exec: (c: string, a: Record<string, unknown>) => Promise<unknown>) => Promise<void>;
    bitmap?: string;
    backing?: string;
    offload?: boolean;
  } = {},
): Promise<{ seconds: number; cpu: number }> {
  await fsp.rm(tgt, { force: true });
  await sh('qemu-img', ['create', '-f', 'qcow2', ...(opts.backing ? ['-b', opts.backing, '-F', 'qcow2'] : []), tgt, String(size)]);
  // Start each run with no dirty page cache: otherwise the first tool run pays for writing back the
  // source image just created (and each later one for the previous run's target).
  await sh('sync', []);
  const d = await spawnDaemon(path.join(dir, `${program}.sock`), [], program);
  try {
    const q = d.qmp;
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: tgt } });
    if (opts.prepare) await opts.prepare((c) => q.hmp(c), (c, a) => q.execute(c, a));
    const c0 = cpuSeconds(d.proc.pid);
    const t0 = performance.now();
    const extra = { ...(opts.bitmap ? { bitmap: opts.bitmap } : {}), ...(opts.offload === false ? { '__org.bitmirror_copy-offload': false } : {}) };
    await q.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', ...extra });
    await q.waitEvent('BLOCK_JOB_READY', { device: 'j' }, 600_000);
    await q.execute('block-job-cancel', { device: 'j' });
    await q.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' }, 600_000);
    await q.execute('blockdev-del', { 'node-name': 'tgt' });
    return { seconds: (performance.now() - t0) / 1000, cpu: cpuSeconds(d.proc.pid) - c0 };
  } finally {
    await d.stop();
  }
}

export async function run(): Promise<Row[]> {
  const mib = Number(process.env.BM_MIRROR_MIB ?? 1536);
  const dataBytes = mib << 20;
  const size = dataBytes + (512 << 20);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-bench-mirror-'));
  const rows: Row[] = [];
  try {
    const src = path.join(dir, 'src.qcow2');
    await sh('qemu-img', ['create', '-f', 'qcow2', src, String(size)]);
    // Data in 256 MiB writes with varying patterns.
    const cmds: string[] = [];
    for (let off = 0, i = 1; off < dataBytes; off += 256 << 20, i++) cmds.push('-c', `write -P ${i} ${off} ${Math.min(256 << 20, dataBytes - off)}`);
    await sh('qemu-io', ['-f', 'qcow2', ...cmds, src]);
    const mb = dataBytes / (1 << 20);

    // Shared machines make single runs noisy (qemu-storage-daemon's own time varied 1.3–5.3 s for the
    // same copy): run the tools in alternating order for several rounds and compare medians.
    const rounds = Math.max(1, Number(process.env.BM_MIRROR_ROUNDS ?? 3));
    const qsdInstalled = await have('qemu-storage-daemon');
    const OFF = 'bitmirror, offload off';
    const tools = ['bitmirror', OFF, 'qemu-storage-daemon', 'cp'].filter((t) => t !== 'qemu-storage-daemon' || qsdInstalled);
    const runs: Record<string, Array<{ seconds: number; cpu: number }>> = Object.fromEntries(tools.map((t) => [t, []]));
    const runCp = async () => {
      const t0 = performance.now();
      await sh('cp', ['--sparse=always', src, path.join(dir, 'cp.qcow2')]);
      const t = (performance.now() - t0) / 1000;
      await fsp.rm(path.join(dir, 'cp.qcow2'), { force: true });
      return { seconds: t, cpu: NaN };
    };
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 1 ? [...tools].reverse() : tools;
      for (const tool of order) {
        if (tool === 'cp') runs.cp.push(await runCp());
        else {
          const program = tool === 'qemu-storage-daemon' ? tool : 'bitmirror';
          // The last bitmirror target stays: the incremental case below uses it as its backing file.
          const tgt = path.join(dir, program === 'bitmirror' ? 'bm.qcow2' : 'qsd.qcow2');
          await fsp.rm(tgt, { force: true });
          runs[tool].push(await timedMirror(program, dir, src, tgt, size, { offload: tool !== OFF }));
        }
      }
    }
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    const spread = (xs: number[]) => `${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)}`;
    const bm = median(runs.bitmirror.map((x) => x.seconds));
    for (const tool of tools) {
      const secs = runs[tool].map((x) => x.seconds);
      const cpus = runs[tool].map((x) => x.cpu);
      const t = median(secs);
      rows.push({
        case: `full mirror ${mb} MiB, median of ${rounds}`,
        tool,
        seconds: t,
        range: spread(secs),
        'MiB/s': mb / t,
        'cpu s': tool === 'cp' ? '' : median(cpus),
        'cpu range': tool === 'cp' ? '' : spread(cpus),
        'bitmirror/this': tool === 'bitmirror' ? '' : bm / t,
      });
    }
    if (!qsdInstalled) rows.push({ case: `full mirror ${mb} MiB`, tool: 'qemu-storage-daemon (not installed)', seconds: 0 });

    // Incremental: 1% of the data clusters (64 KiB) dirtied after the bitmap is added.
    const clusters = dataBytes / 65536;
    const dirty = Math.max(1, Math.round(clusters / 100));
    const inc = await timedMirror('bitmirror', dir, src, path.join(dir, 'inc.qcow2'), size, {
      bitmap: 'b0',
      backing: path.join(dir, 'bm.qcow2'),
      prepare: async (hmp, exec) => {
        await exec('block-dirty-bitmap-add', { node: 'src', name: 'b0', granularity: 65536 });
        let seed = 12345;
        for (let i = 0; i < dirty; i++) {
          seed = (seed * 1103515245 + 12345) & 0x7fffffff;
          await hmp(`qemu-io src "write -P 0xee ${(seed % clusters) * 65536} 64k"`);
        }
      },
    });
    rows.push({ case: `incremental, ${dirty} of ${clusters} clusters dirty`, tool: 'bitmirror', seconds: inc.seconds, 'MiB/s': (dirty * 64) / 1024 / inc.seconds, 'cpu s': inc.cpu, 'full/incremental': bm / inc.seconds });
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
  return rows;
}
