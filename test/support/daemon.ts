/**
 * A daemon in a temp dir (Env) and what tests do with it: qcow2 images made by qemu-img, writes
 * through HMP qemu-io, job and bitmap queries, event collection, and qemu-img compare. Used by the
 * mirror tests (integration) and the comparisons with qemu-storage-daemon (interop).
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as assert from 'node:assert/strict';
import { after } from 'node:test';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import type { QmpEvent } from '../../src/qmp/client.js';
import { KiB, MiB } from '../../src/base/sizes.js';
import { mustRun, run } from './tools.js';

export { KiB, MiB };
/** The default image size. */
export const SIZE = 64 * MiB;

export { haveQsd } from './tools.js';

/** Daemons started by this test file that may still run. */
const live = new Set<SpawnedDaemon>();
// A test that fails before stopping its daemon would otherwise leave the file waiting on it for ever.
after(async () => {
  for (const d of live) await d.kill();
});

/** spawnDaemon, and the daemon is killed after the file's last test if the test did not stop it. */
export async function startDaemon(...args: Parameters<typeof spawnDaemon>): Promise<SpawnedDaemon> {
  const d = await spawnDaemon(...args);
  live.add(d);
  d.proc.once('exit', () => live.delete(d));
  return d;
}

export interface Env {
  dir: string;
  d: SpawnedDaemon;
  f(name: string): string;
  /** stop the daemon and remove the directory. */
  done(): Promise<void>;
}

export async function setup(prefix: string, program: 'bitmirror' | 'qemu-storage-daemon' = 'bitmirror'): Promise<Env> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), `bm-${prefix}-`));
  const d = await startDaemon(path.join(dir, 'qmp.sock'), [], program);
  return {
    dir,
    d,
    f: (name) => path.join(dir, name),
    async done() {
      const code = await d.stop();
      await fsp.rm(dir, { recursive: true, force: true });
      assert.equal(code, 0, `daemon exit code; stderr: ${d.stderr()}`);
    },
  };
}

export async function qcow2(file: string, size = SIZE, opts: string[] = []): Promise<string> {
  await mustRun('qemu-img', ['create', '-f', 'qcow2', ...opts, file, String(size)]);
  return file;
}

/** blockdev-add a qcow2 over file (or over blkdebug with `debug` options). */
export async function addQcow2(env: Env, node: string, file: string, extra: Record<string, unknown> = {}, debug?: Record<string, unknown>): Promise<void> {
  const fileNode = { driver: 'file', filename: file };
  const child = debug ? { driver: 'blkdebug', image: fileNode, ...debug } : fileNode;
  await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': node, file: child, ...extra });
}

/** HMP qemu-io; fails the test when qemu-io reports an error. */
export async function io(env: Env, node: string, cmd: string): Promise<string> {
  const out = await env.d.qmp.hmpOutput(`qemu-io ${node} "${cmd}"`);
  if (!/^(wrote|read|discard|flush)|^$/.test(out) || /error|failed/i.test(out)) throw new Error(`qemu-io ${node} ${cmd}: ${out}`);
  return out;
}

/** Write back the nodes' metadata caches so that qemu-img sees what the daemon wrote. */
export async function flush(env: Env, ...nodes: string[]): Promise<void> {
  for (const n of nodes) await io(env, n, 'flush');
}

export async function compare(a: string, b: string, extra: string[] = []): Promise<{ identical: boolean; out: string }> {
  const r = await run('qemu-img', ['compare', '-U', ...extra, a, b]);
  return { identical: r.code === 0, out: r.stdout + r.stderr };
}

export async function assertIdentical(a: string, b: string, extra: string[] = []): Promise<void> {
  const r = await compare(a, b, extra);
  assert.ok(r.identical, `qemu-img compare ${a} ${b}: ${r.out}`);
}

export async function query<T = Record<string, unknown>>(env: Env, id: string): Promise<T | undefined> {
  const jobs = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-block-jobs');
  return jobs.find((j) => j.device === id) as T | undefined;
}

/** The bitmaps of a node, by name (anonymous ones under ''), from query-named-block-nodes. */
export async function bitmaps(env: Pick<Env, 'd'>, node: string): Promise<Record<string, Record<string, unknown>>> {
  const nodes = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
  const n = nodes.find((x) => x['node-name'] === node);
  const out: Record<string, Record<string, unknown>> = {};
  for (const b of (n?.['dirty-bitmaps'] ?? []) as Array<Record<string, unknown>>) out[(b.name as string | undefined) ?? ''] = b;
  return out;
}

export async function bitmapCount(env: Env, node: string, name: string): Promise<number> {
  const b = (await bitmaps(env, node))[name];
  assert.ok(b, `bitmap ${name} on ${node}`);
  return b.count as number;
}

/** Wait for the job's JOB_STATUS_CHANGE to `status`. */
export async function waitStatus(env: Env, id: string, status: string, timeoutMs = 60_000): Promise<void> {
  await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id, status }, timeoutMs);
}

export { poll } from './wait.js';

/** Summarise events: status changes as their status, block-job events as NAME{selected fields}. */
export function summarise(events: QmpEvent[], fields: string[] = []): string[] {
  return events.map((e) => {
    if (e.event === 'JOB_STATUS_CHANGE') return String(e.data?.status);
    const sel = fields.filter((f) => e.data && f in e.data).map((f) => `${f}=${JSON.stringify(e.data![f])}`);
    return sel.length ? `${e.event}{${sel.join(',')}}` : e.event;
  });
}

/** Take every event received so far (consuming them). */
export function drain(env: Env): QmpEvent[] {
  return env.d.qmp.events.splice(0);
}

/** Wait for an event and drain everything up to and including it; returns the drained list. */
export async function eventsUntil(env: Env, name: string, match: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<QmpEvent[]> {
  const seen: QmpEvent[] = [];
  const end = Date.now() + timeoutMs;
  for (;;) {
    const q = env.d.qmp.events;
    while (q.length) {
      const e = q.shift()!;
      seen.push(e);
      if (e.event === name && Object.entries(match).every(([k, v]) => e.data?.[k] === v)) return seen;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${name}; saw ${summarise(seen).join(' ')}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The QMP error of a command that must fail. */
export async function qmpError(env: Env, cmd: string, args: Record<string, unknown>): Promise<{ class: string; desc: string }> {
  const r = await env.d.qmp.request(cmd, args);
  assert.ok('error' in r, `${cmd} ${JSON.stringify(args)} should fail, got ${JSON.stringify(r)}`);
  return r.error as { class: string; desc: string };
}

/** Create a qcow2 image and add it as `node`, with qemu-img options. */
export async function newTarget(env: Env, node: string, file: string, size = SIZE, opts: string[] = []): Promise<void> {
  await qcow2(file, size, opts);
  await addQcow2(env, node, file);
}

/** A daemon with a 64 MiB qcow2 source `src` and an empty qcow2 target `tgt`, torn down afterwards. */
export async function withSourceAndTarget(prefix: string, fn: (env: Env, src: string, tgt: string) => Promise<void>): Promise<void> {
  const env = await setup(prefix);
  try {
    const src = await qcow2(env.f('src.qcow2'));
    await addQcow2(env, 'src', src);
    const tgt = env.f('tgt.qcow2');
    await newTarget(env, 'tgt', tgt);
    await fn(env, src, tgt);
  } finally {
    await env.done();
  }
}
