/** Helpers shared by the qcow2 interop tests: run peer tools, open nodes in-process, seeded randomness. */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { fileDriver } from '../../src/block/drivers/file.js';
import { rawDriver } from '../../src/block/drivers/raw.js';
import { qcow2Driver } from '../../src/block/drivers/qcow2/index.js';
import type { BlockNode } from '../../src/block/node.js';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const code = err ? ((err as { code?: number }).code ?? 1) : 0;
      resolve({ code: typeof code === 'number' ? code : 1, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

export async function mustRun(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

export async function tempDir(prefix = 'bm-qcow2-'): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export function newGraph(): BlockGraph {
  const g = new BlockGraph();
  g.registerDriver(fileDriver);
  g.registerDriver(rawDriver);
  g.registerDriver(qcow2Driver);
  return g;
}

export async function openQcow2File(g: BlockGraph, filename: string, extra: Record<string, unknown> = {}): Promise<BlockNode> {
  return g.open({ driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename, cache: { 'no-flush': true } }, ...extra });
}

/** xorshift32: a small seeded generator so failures can be replayed. */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

export function randomBytes(rand: () => number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  // Runs of a repeated byte keep failures readable; a per-op random seed byte makes every op distinct.
  let v = Math.floor(rand() * 256);
  for (let i = 0; i < n; i++) {
    if (i % 97 === 0) v = Math.floor(rand() * 256);
    b[i] = v;
  }
  return b;
}
