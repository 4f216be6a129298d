/**
 * What the benchmarks share (one place: look here before writing a helper in a benchmark): running
 * peer tools, a process's CPU seconds and peak memory, medians/ranges/paired ratios over alternating
 * rounds, test images with data, the file systems a benchmark runs on (tmpfs, an XFS loop file system
 * with reflinks, the disk), and block jobs (mirror or backup) timed in a fresh daemon or one after
 * another in the same one — bitmirror or qemu-storage-daemon, the same QMP for both.
 *
 * Absolute times on a shared machine are noise: every benchmark alternates the tools in the same run,
 * prints medians with their ranges, and quotes a ratio only with the range of its per-round values.
 */
import { execFile } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync, readFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon } from '../src/daemon/spawn.js';

export type Row = Record<string, string | number>;
export type Daemon = 'bitmirror' | 'qemu-storage-daemon';

export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

/** Run a command; resolves with its stdout, rejects with its stderr. */
export function sh(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 << 20 }, (err, stdout, stderr) =>
      err ? reject(new Error(`${cmd} ${args.join(' ')}: ${String(stderr) || err.message}`)) : resolve(String(stdout)),
    );
  });
}

/** Whether `cmd --version` runs. */
export async function have(cmd: string): Promise<boolean> {
  return sh(cmd, ['--version']).then(
    () => true,
    () => false,
  );
}

/** User + system CPU clock ticks in a /proc …/stat file (USER_HZ = 100 on Linux). */
function statTicks(file: string): number {
  const fields = readFileSync(file, 'utf8').split(') ')[1].split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

/** Each live thread's run time so far in nanoseconds (…/task/TID/schedstat), by thread id. */
function threadRunNs(pid: number | undefined): Map<string, number> {
  const ns = new Map<string, number>();
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      try {
        ns.set(tid, Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]));
      } catch {
        // the thread ended meanwhile
      }
    }
  } catch {
    // no /proc/PID/task (not Linux, or the process is gone)
  }
  return ns;
}

/**
 * The user + system CPU seconds a process uses from now on (Linux /proc; NaN elsewhere): call the
 * returned function to read it. /proc's tick counts have 10 ms steps, too coarse for a job of a few
 * milliseconds, so the meter sums its threads' run times in nanoseconds (schedstat); only when a
 * thread it started with has ended (its time is then only in the process's ticks) does it fall back
 * to the ticks.
 */
export function cpuMeter(pid: number | undefined): () => number {
  const ticks = (): number => {
    try {
      return statTicks(`/proc/${pid}/stat`) / 100;
    } catch {
      return NaN;
    }
  };
  const ticks0 = ticks();
  const ns0 = threadRunNs(pid);
  return () => {
    const ns = threadRunNs(pid);
    let sum = 0;
    for (const [tid, t0] of ns0) {
      const t = ns.get(tid);
      if (t === undefined) return ticks() - ticks0;
      sum += t - t0;
    }
    for (const [tid, t] of ns) if (!ns0.has(tid)) sum += t;
    return ns0.size > 0 ? sum / 1e9 : ticks() - ticks0;
  };
}

/** A process's peak resident memory so far (VmHWM), in MiB; NaN when unknown. */
export function peakMemoryMiB(pid: number | undefined): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** A process's resident memory now (VmRSS), in MiB; NaN when unknown. */
export function residentMiB(pid: number | undefined): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** One timed run: wall seconds, CPU seconds (user + system) and peak memory of the process doing it. */
export interface Sample {
  seconds: number;
  cpu: number;
  peakMiB: number;
}

/** Run a tool under /usr/bin/time: its wall time, CPU seconds (user + system) and peak RSS. */
export function timedTool(cmd: string, args: string[]): Promise<Sample> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    execFile('/usr/bin/time', ['-f', 'BENCH-TIME %U %S %M', '--', cmd, ...args], { maxBuffer: 64 << 20 }, (err, _stdout, stderr) => {
      const seconds = (performance.now() - t0) / 1000;
      const m = /BENCH-TIME ([\d.]+) ([\d.]+) (\d+)/.exec(String(stderr));
      if (err || !m) reject(new Error(`${cmd} ${args.join(' ')}: ${String(stderr) || err?.message}`));
      else resolve({ seconds, cpu: Number(m[1]) + Number(m[2]), peakMiB: Number(m[3]) / 1024 });
    });
  });
}

// ---- statistics over rounds ---------------------------------------------------------------------

export function median(xs: number[]): number {
  const s = xs.filter((x) => !Number.isNaN(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** The p-th percentile (nearest rank). */
export function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((s.length * p) / 100))];
}

/** "min–max" with `digits` decimals; '' when there is no value. */
export function spread(xs: number[], digits = 2): string {
  const v = xs.filter((x) => !Number.isNaN(x));
  if (v.length === 0) return '';
  return `${Math.min(...v).toFixed(digits)}–${Math.max(...v).toFixed(digits)}`;
}

/**
 * A ratio a/b over paired rounds (the same round, alternating order): its median, its range, and what
 * the range supports — "< 1" or "> 1" only when every round agrees, else "within noise". The range has
 * `digits` decimals.
 */
export function pairedRatio(a: number[], b: number[], digits = 2): { median: number; range: string; verdict: string } {
  const r = a.map((x, i) => x / b[i]).filter((x) => Number.isFinite(x));
  if (r.length === 0) return { median: NaN, range: '', verdict: '' };
  const lo = Math.min(...r);
  const hi = Math.max(...r);
  return { median: median(r), range: spread(r, digits), verdict: hi < 1 ? '< 1 every round' : lo > 1 ? '> 1 every round' : 'within noise' };
}

/** The load average now, for the tables' captions. */
export function loadNow(): string {
  return os.loadavg().map((x) => x.toFixed(1)).join(' ');
}

// ---- images --------------------------------------------------------------------------------------

/**
 * Create an image of `size` bytes with data: 'dense' writes every byte, 'sparse' writes 1 MiB of every
 * 10 MiB (10% allocated). Each MiB-sized piece gets its own non-zero byte pattern. Returns the data bytes.
 */
export async function makeDataImage(file: string, format: 'qcow2' | 'raw', size: number, layout: 'dense' | 'sparse'): Promise<number> {
  await sh('qemu-img', ['create', '-q', '-f', format, file, String(size)]);
  const cmds: string[] = [];
  let data = 0;
  const piece = layout === 'dense' ? 256 * MiB : MiB;
  const step = layout === 'dense' ? piece : 10 * MiB;
  for (let off = 0, i = 0; off < size; off += step, i++) {
    const n = Math.min(piece, size - off);
    cmds.push('-c', `write -P ${(i % 250) + 1} ${off} ${n}`);
    data += n;
  }
  // qemu-io takes the commands in batches (a command line has its limits).
  for (let k = 0; k < cmds.length; k += 400) await sh('qemu-io', ['-f', format, ...cmds.slice(k, k + 400), file]);
  return data;
}

/** An empty image to copy into (what a user creates before a mirror). */
export async function makeEmptyImage(file: string, format: 'qcow2' | 'raw', size: number, backing?: string): Promise<void> {
  await fsp.rm(file, { force: true });
  await sh('qemu-img', ['create', '-q', '-f', format, ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), file, String(size)]);
}

// ---- file systems --------------------------------------------------------------------------------

export type FsKind = 'tmpfs' | 'xfs' | 'disk';

/** A directory on one kind of file system for a benchmark's files; `close` removes it (and unmounts). */
export interface BenchFs {
  kind: FsKind;
  dir: string;
  /** What the tables call it. */
  label: string;
  /** Before each timed run: on the disk, write back and drop the page cache, so no run pays for another's dirty pages. */
  settle(): Promise<void>;
  /** After each timed run, inside the timing: on the disk, write back what the run left dirty. */
  finish(): Promise<void>;
  close(): Promise<void>;
}

async function dropCaches(): Promise<boolean> {
  await sh('sync', []);
  try {
    await fsp.writeFile('/proc/sys/vm/drop_caches', '1\n');
    return true;
  } catch {
    return false;
  }
}

/**
 * Make the file system of `kind` for a benchmark, or say why not (undefined + a reason). The XFS one
 * is a loop file system with reflinks (mkfs.xfs -m reflink=1), its backing file in /dev/shm (so the
 * disk's write-back does not blur it) or TMPDIR, `sizeBytes` large; it needs root and xfsprogs.
 */
export async function openBenchFs(kind: FsKind, name: string, sizeBytes: number): Promise<BenchFs | { skip: string }> {
  const noop = async () => undefined;
  if (kind === 'tmpfs') {
    if (!existsSync('/dev/shm')) return { skip: 'no /dev/shm' };
    const dir = await fsp.mkdtemp(path.join('/dev/shm', `bm-bench-${name}-`));
    return { kind, dir, label: 'tmpfs (/dev/shm)', settle: noop, finish: noop, close: () => fsp.rm(dir, { recursive: true, force: true }) };
  }
  if (kind === 'disk') {
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), `bm-bench-${name}-`));
    const dropped = await dropCaches();
    return {
      kind,
      dir,
      label: `disk (${os.tmpdir()}; sync${dropped ? ' + drop_caches' : ', page cache not dropped (no permission)'} before each run, sync inside the timing)`,
      settle: async () => void (await dropCaches()),
      finish: async () => void (await sh('sync', [])),
      close: () => fsp.rm(dir, { recursive: true, force: true }),
    };
  }
  if (!(await sh('mkfs.xfs', ['-V']).then(() => true, () => false))) return { skip: 'mkfs.xfs not installed (Debian: xfsprogs)' };
  const base = existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const work = await fsp.mkdtemp(path.join(base, `bm-bench-${name}-xfs-`));
  const img = path.join(work, 'xfs.img');
  const mnt = path.join(work, 'mnt');
  try {
    await fsp.mkdir(mnt);
    await sh('truncate', ['-s', String(sizeBytes), img]);
    await sh('mkfs.xfs', ['-q', '-m', 'reflink=1', img]);
    await sh('mount', ['-o', 'loop', img, mnt]);
  } catch (err) {
    await fsp.rm(work, { recursive: true, force: true });
    return { skip: `cannot make an XFS loop file system here: ${(err as Error).message.split('\n')[0]}` };
  }
  return {
    kind,
    dir: mnt,
    label: `XFS loop (reflink=1, backing file in ${base})`,
    settle: noop,
    finish: noop,
    close: async () => {
      await sh('umount', [mnt]).catch(() => sh('umount', ['-l', mnt]));
      await fsp.rm(work, { recursive: true, force: true });
    },
  };
}

// ---- timed block jobs ------------------------------------------------------------------------------

export interface JobImage {
  file: string;
  format: 'qcow2' | 'raw';
  /** Other blockdev options to open the node with instead (e.g. an rbd node); `file`/`format` unused then. */
  options?: Record<string, unknown>;
}

export interface BlockJobRun {
  program: Daemon;
  job: 'mirror' | 'backup';
  src: JobImage;
  tgt: JobImage;
  /** bitmirror: `__org.bitmirror_copy-offload` (default: the daemon's, on). */
  offload?: boolean;
  /** mirror: the bitmap that says what to copy. */
  bitmap?: string;
  /** backup: `compress: true` (compressed qcow2 clusters in the target). */
  compress?: boolean;
  /** Runs before the timing starts (add bitmaps, write data). */
  prepare?: (exec: (cmd: string, args: Record<string, unknown>) => Promise<unknown>, hmp: (cmd: string) => Promise<string>) => Promise<void>;
}

/** A daemon that runs timed block jobs one after another: the first in a fresh process, later ones warm. */
export interface JobDaemon {
  /**
   * Time one job from its command to its end: a mirror runs to READY and is soft-cancelled (a complete
   * copy, no pivot), a backup runs to completion; then the target node is deleted (written back). The
   * source node stays open for the next job (which must use the same source). CPU seconds are the
   * daemon's over that span; peak memory is the daemon's VmHWM at the end (of its whole life so far).
   */
  time(o: BlockJobRun): Promise<Sample>;
  stop(): Promise<void>;
}

/**
 * Start a daemon for timed block jobs. BM_PROFILE_DIR=DIR: every bitmirror daemon writes a V8 CPU
 * profile there (`node --cpu-prof`, at 100 µs intervals; start-up and the untimed steps included), to
 * be opened in Chrome's DevTools or summed by a script.
 */
export async function openJobDaemon(dir: string, program: Daemon): Promise<JobDaemon> {
  const profileDir = process.env.BM_PROFILE_DIR;
  const nodeArgs = profileDir && program === 'bitmirror' ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`, '--cpu-prof-interval=100'] : [];
  const d = await spawnDaemon(path.join(dir, `${program}.sock`), [], program, { nodeArgs });
  const q = d.qmp;
  const node = (name: string, img: JobImage) =>
    q.execute('blockdev-add', { ...(img.options ?? { driver: img.format, file: { driver: 'file', filename: img.file } }), 'node-name': name });
  let src: JobImage | undefined;
  return {
    async time(o) {
      if (o.program !== program) throw new Error(`a ${o.program} job in a ${program} daemon`);
      if (!src) await node('src', (src = o.src));
      else if (JSON.stringify(src) !== JSON.stringify(o.src)) throw new Error('a job daemon keeps one source node');
      await node('tgt', o.tgt);
      if (o.prepare) await o.prepare((c, a) => q.execute(c, a), (c) => q.hmp(c));
      const cpu = cpuMeter(d.proc.pid);
      const t0 = performance.now();
      const extra = { ...(o.bitmap ? { bitmap: o.bitmap } : {}), ...(o.offload === false ? { '__org.bitmirror_copy-offload': false } : {}), ...(o.compress ? { compress: true } : {}) };
      if (o.job === 'mirror') {
        await q.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', ...extra });
        await q.waitEvent('BLOCK_JOB_READY', { device: 'j' }, 1_800_000);
        await q.execute('block-job-cancel', { device: 'j' });
      } else {
        await q.execute('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', ...extra });
      }
      await q.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' }, 1_800_000);
      await q.execute('blockdev-del', { 'node-name': 'tgt' });
      return { seconds: (performance.now() - t0) / 1000, cpu: cpu(), peakMiB: peakMemoryMiB(d.proc.pid) };
    },
    stop: async () => void (await d.stop()),
  };
}

/** One timed block job (see JobDaemon.time) in a fresh daemon of its own. */
export async function timedBlockJob(dir: string, o: BlockJobRun): Promise<Sample> {
  const d = await openJobDaemon(dir, o.program);
  try {
    return await d.time(o);
  } finally {
    await d.stop();
  }
}
