/** Run peer tools (qemu-img, qemu-io, …) and make temporary directories. */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a program; resolves with its exit code and output (never rejects). */
export function run(cmd: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? 1) : 0;
      resolve({ code: typeof code === 'number' ? code : 1, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/** Run a program that must succeed; resolves with its stdout. */
export async function mustRun(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** A new directory under the system's temp dir, and how to remove it. */
export async function tempDir(prefix = 'bm-test-'): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** Dirty extents of a bitmap as qemu-nbd exports it: [offset, length] pairs, merged. */
export async function nbdDirtyRanges(img: string, name: string): Promise<Array<[number, number]>> {
  return nbdinfoDirtyRanges(['--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', name, img, ']'], name);
}

/** Dirty extents of a bitmap an NBD server (at `uri`) exports, as nbdinfo maps them: [offset, length] pairs, merged. */
export async function nbdDirtyRangesAt(uri: string, name: string): Promise<Array<[number, number]>> {
  return nbdinfoDirtyRanges([uri], name);
}

async function nbdinfoDirtyRanges(server: string[], name: string): Promise<Array<[number, number]>> {
  const out = await mustRun('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, '--json', ...server]);
  const ranges: Array<[number, number]> = [];
  for (const e of JSON.parse(out) as Array<{ offset: number; length: number; type: number }>) {
    if (!(e.type & 1)) continue;
    const last = ranges[ranges.length - 1];
    if (last && last[0] + last[1] === e.offset) last[1] += e.length;
    else ranges.push([e.offset, e.length]);
  }
  return ranges;
}

/** The message a promise rejects with, or undefined when it resolves (a command that may be refused). */
export async function errorOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    return (err as Error).message;
  }
}

/** Whether qemu-storage-daemon runs here (the comparisons with QEMU skip without it). */
export const haveQsd = await run('qemu-storage-daemon', ['--version']).then((r) => r.code === 0);

/** qemu-io on an NBD export (a guest writing through it): runs `cmds` in order; fails on an error. */
export async function qemuIoNbd(uri: string, cmds: string[]): Promise<string> {
  const out = await mustRun('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri]);
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${uri}: ${out}`);
  return out;
}

/** Whether the [offset, length] ranges (sorted, merged) cover [offset, offset+bytes). */
export function rangesCover(ranges: Array<[number, number]>, offset: number, bytes: number): boolean {
  let at = offset;
  for (const [o, l] of ranges) {
    if (o > at) break;
    if (o + l > at) at = o + l;
    if (at >= offset + bytes) return true;
  }
  return at >= offset + bytes;
}

/**
 * The first 512-byte chunk of `now` that differs from `ref` and that the sorted, merged [offset,
 * length] `ranges` do not cover; undefined when every changed chunk is covered. One pass over both.
 */
export function firstUncovered(now: Buffer, ref: Buffer, ranges: Array<[number, number]>): number | undefined {
  let r = 0;
  for (let p = 0; p < now.length; p += 512) {
    if (now.compare(ref, p, p + 512, p, p + 512) === 0) continue;
    while (r < ranges.length && ranges[r][0] + ranges[r][1] <= p) r++;
    if (r === ranges.length || ranges[r][0] > p) return p;
  }
  return undefined;
}
