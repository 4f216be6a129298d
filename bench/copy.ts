/**
 * Copy benchmark: one image copied by every tool that can, in the same run, on the same files —
 *   bitmirror               a full mirror in a fresh daemon (copy offload on: the kernel copies)
 *   bitmirror, offload off  the same with `__org.bitmirror_copy-offload: false` (read + write)
 *   qemu-storage-daemon     the same mirror (QEMU 7.2: read + write, no offload in its mirror)
 *   bitmirror copy          the command-line copy (`bitmirror copy --no-pivot SRC DST`: an embedded
 *                           daemon, the whole process timed, start-up included; same format only)
 *   qemu-img convert        its defaults (8 coroutines, zero detection)
 *   cp                      coreutils' defaults (copy_file_range, holes kept; on XFS --reflink=always)
 * for the cases qcow2→qcow2, raw→raw, qcow2→raw (no cp), a sparse qcow2 (1 MiB of every 10 MiB
 * allocated) and a 4 GiB qcow2, on tmpfs (the headline: no disk write-back to blur it), on an XFS loop
 * file system with reflinks made here, and on the disk (sync and dropped page cache before each run,
 * sync inside each run's time). A mirror runs to READY and is soft-cancelled (a complete copy).
 *
 * Each tool runs BM_COPY_ROUNDS (default 5; fewer only for a quick look) times, the order reversed every other round; a row shows the
 * median and the range of: wall seconds (a daemon's from its command to the job's end; a tool's whole
 * run), CPU seconds per GiB of data copied (the daemon's over that span; a tool's user + system) and peak
 * memory (VmHWM of the daemon, max RSS of the tool); and bitmirror's time and CPU divided by the tool's
 * in the same round, with what that range supports ("< 1 every round", "> 1 every round", "within noise").
 *
 * BM_COPY_MIB (default 1024) sizes the cases; BM_COPY_BIG=0 skips the 4 GiB case (it runs on tmpfs only
 * unless BM_COPY_BIG_FS lists more); BM_COPY_FS picks file systems (default tmpfs,xfs,disk);
 * BM_COPY_CASES picks cases by name (comma-separated substrings, e.g. "raw→raw,sparse").
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { BITMIRROR_BIN } from '../src/daemon/spawn.js';
import {
  GiB,
  MiB,
  have,
  loadNow,
  makeDataImage,
  makeEmptyImage,
  median,
  openBenchFs,
  pairedRatio,
  spread,
  timedBlockJob,
  timedTool,
  type BenchFs,
  type FsKind,
  type Row,
  type Sample,
} from './support.js';

export const title = 'copy: an image copied by bitmirror (offload on/off), qemu-storage-daemon mirror, qemu-img convert, cp';

export interface CopyCase {
  name: string;
  src: 'qcow2' | 'raw';
  tgt: 'qcow2' | 'raw';
  layout: 'dense' | 'sparse';
  /** Virtual size of the image. */
  bytes: number;
}

export type Tool = 'bitmirror' | 'bitmirror, offload off' | 'qemu-storage-daemon' | 'bitmirror copy' | 'qemu-img convert' | 'cp';
const TOOLS: Tool[] = ['bitmirror', 'bitmirror, offload off', 'qemu-storage-daemon', 'bitmirror copy', 'qemu-img convert', 'cp'];

export function copyCases(mib: number, big: boolean): CopyCase[] {
  const bytes = mib * MiB;
  const cases: CopyCase[] = [
    { name: 'qcow2→qcow2', src: 'qcow2', tgt: 'qcow2', layout: 'dense', bytes },
    { name: 'raw→raw', src: 'raw', tgt: 'raw', layout: 'dense', bytes },
    { name: 'qcow2→raw', src: 'qcow2', tgt: 'raw', layout: 'dense', bytes },
    { name: 'sparse qcow2→qcow2 (10% allocated)', src: 'qcow2', tgt: 'qcow2', layout: 'sparse', bytes },
  ];
  if (big) cases.push({ name: '4 GiB qcow2→qcow2', src: 'qcow2', tgt: 'qcow2', layout: 'dense', bytes: 4 * GiB });
  return cases;
}

/** One copy of `src` into `tgt` by `tool` (the target made as a user would first, untimed). */
async function copyOnce(tool: Tool, fs: BenchFs, c: CopyCase, src: string, tgt: string): Promise<Sample> {
  await fsp.rm(tgt, { force: true });
  if (tool === 'bitmirror' || tool === 'bitmirror, offload off' || tool === 'qemu-storage-daemon') {
    await makeEmptyImage(tgt, c.tgt, c.bytes);
    await fs.settle();
    const s = await timedBlockJob(fs.dir, {
      program: tool === 'qemu-storage-daemon' ? tool : 'bitmirror',
      job: 'mirror',
      src: { file: src, format: c.src },
      tgt: { file: tgt, format: c.tgt },
      offload: tool !== 'bitmirror, offload off',
    });
    const t0 = performance.now();
    await fs.finish();
    return { ...s, seconds: s.seconds + (performance.now() - t0) / 1000 };
  }
  await fs.settle();
  const t0 = performance.now();
  const s =
    tool === 'qemu-img convert'
      ? await timedTool('qemu-img', ['convert', '-f', c.src, '-O', c.tgt, src, tgt])
      : tool === 'bitmirror copy'
        ? await timedTool(process.execPath, [BITMIRROR_BIN, 'copy', '--no-pivot', '--progress', 'none', src, tgt])
        : await timedTool('cp', [...(fs.kind === 'xfs' ? ['--reflink=always'] : []), src, tgt]);
  await fs.finish();
  return { ...s, seconds: (performance.now() - t0) / 1000 };
}

function toolLabel(tool: Tool, fs: BenchFs): string {
  return tool === 'cp' && fs.kind === 'xfs' ? 'cp --reflink=always' : tool;
}

/** Run `cases` on one file system, every tool `rounds` times alternating; rows per case and tool. */
async function runOnFs(fs: BenchFs, cases: CopyCase[], tools: Tool[], rounds: number): Promise<Row[]> {
  const rows: Row[] = [];
  for (const c of cases) {
    const src = path.join(fs.dir, `src.${c.src}`);
    const tgt = path.join(fs.dir, `tgt.${c.tgt}`);
    const data = await makeDataImage(src, c.src, c.bytes, c.layout);
    // cp and bitmirror copy keep the format (the latter creates DST in SRC's format).
    const caseTools = tools.filter((t) => (t !== 'cp' && t !== 'bitmirror copy') || c.src === c.tgt);
    const runs = new Map<Tool, Sample[]>(caseTools.map((t) => [t, []]));
    const loads: string[] = [];
    for (let r = 0; r < rounds; r++) {
      for (const tool of r % 2 ? [...caseTools].reverse() : caseTools) runs.get(tool)!.push(await copyOnce(tool, fs, c, src, tgt));
      loads.push(loadNow().split(' ')[0]);
    }
    await fsp.rm(tgt, { force: true });
    await fsp.rm(src, { force: true });
    const gib = data / GiB;
    const bm = runs.get('bitmirror');
    for (const tool of caseTools) {
      const s = runs.get(tool)!;
      const secs = s.map((x) => x.seconds);
      const cpu = s.map((x) => x.cpu / gib);
      const ratio = (mine: number[], theirs: number[]): string => {
        if (!bm || tool === 'bitmirror') return '';
        const r = pairedRatio(mine, theirs);
        return r.range ? `${r.median.toFixed(2)} (${r.range}) ${r.verdict}` : '';
      };
      rows.push({
        fs: fs.kind,
        case: `${c.name}, ${(data / MiB).toFixed(0)} MiB data`,
        tool: toolLabel(tool, fs),
        'wall s': median(secs),
        'wall range': spread(secs),
        'MiB/s': Math.round(data / MiB / median(secs)),
        'CPU s/GiB': median(cpu),
        'CPU range': spread(cpu),
        'peak MiB': Math.round(median(s.map((x) => x.peakMiB))),
        'peak range': spread(s.map((x) => x.peakMiB), 0),
        'bitmirror÷this wall': ratio(bm?.map((x) => x.seconds) ?? [], secs),
        'bitmirror÷this CPU': ratio(bm?.map((x) => x.cpu) ?? [], s.map((x) => x.cpu)),
        'load (1 min)': spread(loads.map(Number), 1),
      });
    }
    // Each case's results as soon as it is done (the table comes at the end): a long run that is
    // stopped early still says what it measured.
    for (const r of rows.slice(-caseTools.length)) {
      process.stdout.write(`    ${r.case} | ${r.tool}: wall ${Number(r['wall s']).toFixed(2)} s (${r['wall range']}), CPU ${Number(r['CPU s/GiB']).toFixed(2)} s/GiB (${r['CPU range']}), peak ${r['peak MiB']} MiB (${r['peak range']})${r['bitmirror÷this wall'] ? `, bitmirror÷this wall ${r['bitmirror÷this wall']}, CPU ${r['bitmirror÷this CPU']}` : ''}\n`);
    }
  }
  return rows;
}

/**
 * The matrix: every case on every file system of `fsKinds` (the big case only on `bigFs`), `rounds`
 * alternating rounds. A file system that cannot be made here gives a row saying why.
 */
export async function runCopyMatrix(o: { name: string; fsKinds: FsKind[]; cases: CopyCase[]; bigFs: FsKind[]; rounds: number; tools?: Tool[] }): Promise<Row[]> {
  const qsdInstalled = await have('qemu-storage-daemon');
  const tools = (o.tools ?? TOOLS).filter((t) => t !== 'qemu-storage-daemon' || qsdInstalled);
  const rows: Row[] = [];
  for (const kind of o.fsKinds) {
    const cases = o.cases.filter((c) => c.bytes < 4 * GiB || o.bigFs.includes(kind));
    if (cases.length === 0) continue;
    const fsBytes = Math.max(...cases.map((c) => c.bytes)) * 3 + GiB;
    const fs = await openBenchFs(kind, o.name, fsBytes);
    if ('skip' in fs) {
      rows.push({ fs: kind, case: `skipped: ${fs.skip}` });
      continue;
    }
    try {
      process.stdout.write(`  ${fs.label}: ${cases.map((c) => c.name).join(', ')} × ${tools.length} tools × ${o.rounds} rounds (load ${loadNow()})\n`);
      rows.push(...(await runOnFs(fs, cases, tools, o.rounds)));
    } finally {
      await fs.close();
    }
  }
  if (!qsdInstalled) rows.push({ case: 'qemu-storage-daemon not installed: its rows are missing' });
  return rows;
}

export async function run(): Promise<Row[]> {
  const mib = Number(process.env.BM_COPY_MIB ?? 1024);
  const rounds = Math.max(1, Number(process.env.BM_COPY_ROUNDS ?? 5));
  const fsKinds = (process.env.BM_COPY_FS ?? 'tmpfs,xfs,disk').split(',').filter(Boolean) as FsKind[];
  const want = (process.env.BM_COPY_CASES ?? '').split(',').filter(Boolean);
  const cases = copyCases(mib, process.env.BM_COPY_BIG !== '0').filter((c) => want.length === 0 || want.some((w) => c.name.includes(w)));
  const bigFs = (process.env.BM_COPY_BIG_FS ?? 'tmpfs').split(',') as FsKind[];
  return runCopyMatrix({ name: 'copy', fsKinds, cases, bigFs, rounds });
}
