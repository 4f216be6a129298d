/**
 * The block graph's permissions against qemu-storage-daemon 7.2: the same QMP script, run against both,
 * must give the same replies — conflicts between two parents of one node, a job's claims on its source
 * and target (blockdev-del, a second user of the target), blockdev-create on a node in use.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { haveQsd } from '../support/tools.js';

const skip = !haveQsd && 'qemu-storage-daemon not installed';

type Program = 'bitmirror' | 'qemu-storage-daemon';
type Script = (q: (cmd: string, args?: Record<string, unknown>) => Promise<unknown>, d: SpawnedDaemon, files: Record<string, string>) => Promise<void>;

/** Fresh images for one run: qcow2 a and b, raw r (1 MiB each). */
async function images(dir: string): Promise<Record<string, string>> {
  const files: Record<string, string> = {};
  for (const [name, fmt] of [['a', 'qcow2'], ['b', 'qcow2'], ['r', 'raw']] as const) {
    files[name] = path.join(dir, `${name}.${fmt}`);
    execFileSync('qemu-img', ['create', '-q', '-f', fmt, files[name], '1M']);
  }
  return files;
}

/** Run `script` against a fresh daemon of `program` and return every reply (return or error). */
async function run(program: Program, script: Script): Promise<unknown[]> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), `bm-graph-${program}-`));
  const files = await images(dir);
  const d = await spawnDaemon(path.join(dir, 'qmp.sock'), [], program);
  const replies: unknown[] = [];
  try {
    await script(
      async (cmd, args) => {
        const r = await d.qmp.request(cmd, args);
        const reply = 'error' in r ? { error: r.error } : { return: r.return };
        replies.push(JSON.parse(JSON.stringify(reply).split(dir).join('<dir>')));
        return r.return;
      },
      d,
      files,
    );
  } finally {
    assert.equal(await d.stop(), 0);
    await fsp.rm(dir, { recursive: true, force: true });
  }
  return replies;
}

async function compare(script: Script): Promise<void> {
  const theirs = await run('qemu-storage-daemon', script);
  const ours = await run('bitmirror', script);
  assert.equal(ours.length, theirs.length);
  for (let i = 0; i < theirs.length; i++) assert.deepEqual(ours[i], theirs[i], `reply ${i}`);
}

/** Wait until query-jobs shows job `id` concluded (both daemons conclude create jobs on their own). */
async function concluded(d: SpawnedDaemon, id: string): Promise<void> {
  for (;;) {
    const jobs = await d.qmp.execute<Array<{ id: string; status: string }>>('query-jobs');
    if (jobs.find((j) => j.id === id)?.status === 'concluded') return;
    await d.qmp.waitEvent('JOB_STATUS_CHANGE', { id });
  }
}

test('permission conflicts between two parents of one node, as qemu-storage-daemon reports them', { skip }, async () => {
  await compare(async (q, d, f) => {
    await q('blockdev-add', { driver: 'file', 'node-name': 'f', filename: f.a });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'q1', file: 'f' });
    // A second writer, and a reader that does not share write, on the file q1 writes.
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'q2', file: 'f' });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'q3', file: 'f', 'read-only': true });
    // raw with no parents takes nothing: no conflict.
    await q('blockdev-add', { driver: 'raw', 'node-name': 'r1', file: 'f' });
    // Read-only with force-share shares everything, but q1 does not share write with it... which it
    // does not need: allowed.
    await q('blockdev-add', { driver: 'file', 'node-name': 'ro', filename: f.b, 'read-only': true });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'w', file: 'ro' });
    // blockdev-create on a node a format uses, and on a node nobody writes.
    await q('blockdev-create', { 'job-id': 'c1', options: { driver: 'qcow2', file: 'f', size: 1048576 } });
    await concluded(d, 'c1');
    await q('query-jobs');
    await q('job-dismiss', { id: 'c1' });
    await q('blockdev-del', { 'node-name': 'f' });
    await q('blockdev-del', { 'node-name': 'r1' });
    await q('blockdev-del', { 'node-name': 'q1' });
    await q('blockdev-del', { 'node-name': 'f' });
  });
});

test("a mirror job's claims: blockdev-del of its nodes, a second writer on its target, a target in use", { skip }, async () => {
  await compare(async (q, d, f) => {
    await q('blockdev-add', { driver: 'file', 'node-name': 'f', filename: f.a });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: 'f' });
    await q('blockdev-add', { driver: 'file', 'node-name': 'tf', filename: f.b });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: 'tf' });
    await q('blockdev-add', { driver: 'file', 'node-name': 'rf', filename: f.r });
    // The target's file is used by tgt: the job's target BlockBackend conflicts with it.
    await q('blockdev-mirror', { 'job-id': 'j0', device: 'src', target: 'tf', sync: 'full' });
    await q('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', speed: 1 });
    await q('blockdev-del', { 'node-name': 'src' });
    await q('blockdev-del', { 'node-name': 'tgt' });
    await q('blockdev-del', { 'node-name': 'tf' });
    await q('blockdev-del', { 'node-name': 'f' });
    // A format on the target wants write; the job's writer does not share it.
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'x', file: 'tgt' });
    // raw takes nothing unless asked: allowed; mirroring from it reads the target, which is not shared.
    await q('blockdev-add', { driver: 'raw', 'node-name': 'x2', file: 'tgt' });
    await q('blockdev-mirror', { 'job-id': 'j3', device: 'x2', target: 'rf', sync: 'full' });
    await q('blockdev-mirror', { 'job-id': 'j2', device: 'rf', target: 'src', sync: 'full' });
    await q('blockdev-create', { 'job-id': 'c', options: { driver: 'qcow2', file: 'tf', size: 1048576 } });
    await concluded(d, 'c');
    await q('job-cancel', { id: 'j' });
    await d.qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'j' });
    await q('blockdev-del', { 'node-name': 'x2' });
    await q('blockdev-del', { 'node-name': 'tgt' });
    await q('blockdev-del', { 'node-name': 'src' });
  });
});

test('block_resize grows qcow2 (its L1 table too) and raw, refuses what QEMU refuses; qemu-img check is clean', { skip }, async () => {
  const checks: string[] = [];
  await compare(async (q, d, f) => {
    await q('blockdev-add', { driver: 'file', 'node-name': 'f', filename: f.a });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: 'f' });
    await q('block-dirty-bitmap-add', { node: 'q', name: 'b1', persistent: true });
    await q('block_resize', { 'node-name': 'q', size: 3 << 20 });
    // 600 GiB needs more L1 entries than the 1 MiB image's table has.
    await q('block_resize', { 'node-name': 'q', size: 600 * 2 ** 30 });
    await q('block_resize', { 'node-name': 'q', size: (3 << 20) + 100 });
    await q('block_resize', { 'node-name': 'q', size: -1 });
    await q('block_resize', { device: 'q', size: 4 << 20 });
    await q('block_resize', { 'node-name': 'nope', size: 4 << 20 });
    await q('block_resize', { size: 4 << 20 });
    // The format above the file does not share resize.
    await q('block_resize', { 'node-name': 'f', size: 64 << 20 });
    await q('blockdev-add', { driver: 'file', 'node-name': 'rf', filename: f.r });
    await q('blockdev-add', { driver: 'raw', 'node-name': 'rr', file: 'rf' });
    await q('block_resize', { 'node-name': 'rr', size: (2 << 20) + 7 });
    await q('blockdev-add', { driver: 'raw', 'node-name': 'rw', file: 'rf', size: 4096 });
    await q('block_resize', { 'node-name': 'rw', size: 8192 });
    await q('blockdev-add', { driver: 'null-co', 'node-name': 'n' });
    await q('block_resize', { 'node-name': 'n', size: 8192 });
    await q('blockdev-add', { driver: 'file', 'node-name': 'ro', filename: f.b, 'read-only': true });
    await q('block_resize', { 'node-name': 'ro', size: 8 << 20 });
    // A job's op blocker.
    await q('blockdev-add', { driver: 'null-co', 'node-name': 'tgt', size: 600 * 2 ** 30 });
    await q('blockdev-mirror', { 'job-id': 'j', device: 'q', target: 'tgt', sync: 'none' });
    await q('block_resize', { 'node-name': 'q', size: 601 * 2 ** 30 });
    await q('job-cancel', { id: 'j' });
    await d.qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'j' });
    for (const n of ['q', 'f', 'rr', 'rw', 'rf']) await q('blockdev-del', { 'node-name': n });
    checks.push(execFileSync('qemu-img', ['check', f.a]).toString());
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', f.a]).toString()) as {
      'virtual-size': number;
      'format-specific': { data: { bitmaps: Array<{ name: string }> } };
    };
    assert.equal(info['virtual-size'], 600 * 2 ** 30);
    assert.deepEqual(info['format-specific'].data.bitmaps.map((b) => b.name), ['b1']);
    assert.equal((await fsp.stat(f.r)).size, (2 << 20) + 7);
  });
  for (const c of checks) assert.match(c, /No errors were found on the image/);
});

test('block_resize of a qcow2 whose persistent bitmap is inconsistent is refused, as QEMU refuses it', { skip }, async () => {
  await compare(async (q, _d, f) => {
    // A bitmap left in use by a daemon that was killed: inconsistent when the image opens again.
    execFileSync('qemu-img', ['bitmap', '--add', f.a, 'b0']);
    const killed = await spawnDaemon(`${f.a}.sock`, ['--blockdev', `driver=qcow2,node-name=q,file.driver=file,file.filename=${f.a}`], 'qemu-storage-daemon');
    await killed.kill();
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: f.a } });
    await q('block_resize', { 'node-name': 'q', size: 2 << 20 });
    await q('block-dirty-bitmap-remove', { node: 'q', name: 'b0' });
    await q('block_resize', { 'node-name': 'q', size: 2 << 20 });
    await q('blockdev-del', { 'node-name': 'q' });
    assert.match(execFileSync('qemu-img', ['check', f.a]).toString(), /No errors were found on the image/);
  });
});

/** qemu-img info's bitmaps of an image: name and flags, in the order qemu-img lists them. */
function storedBitmaps(file: string): Array<{ name: string; flags: string[] }> {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', file]).toString()) as {
    'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[] }> } };
  };
  return (info['format-specific'].data.bitmaps ?? []).map((b) => ({ name: b.name, flags: b.flags }));
}

test('blockdev-reopen read-only <-> read-write of a qcow2 with persistent bitmaps, and options that cannot change', { skip }, async () => {
  const seen: Record<string, unknown[]> = {};
  const run1 = (program: string): Script => async (q, _d, f) => {
    const infos: unknown[] = (seen[program] = []);
    execFileSync('qemu-img', ['bitmap', '--add', f.a, 'b0']);
    await q('blockdev-add', { driver: 'file', 'node-name': 'f', filename: f.a });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': true });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': false }] });
    // Writable now: the stored bitmap is in use on disk, and a new persistent one can be added.
    infos.push(storedBitmaps(f.a));
    await q('block-dirty-bitmap-add', { node: 'q', name: 'b1', persistent: true });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': true }] });
    // Read-only again: both stored, neither in use.
    infos.push(storedBitmaps(f.a));
    await q('block-dirty-bitmap-clear', { node: 'q', name: 'b1' });
    // Options that cannot change, and the ones qcow2 can.
    await q('blockdev-reopen', { options: [{ driver: 'raw', 'node-name': 'q', file: 'f' }] });
    await q('blockdev-reopen', { options: [{ driver: 'file', 'node-name': 'f', filename: f.b }] });
    await q('blockdev-reopen', { options: [{ driver: 'file', 'node-name': 'f', filename: f.a, locking: 'off' }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': false, 'lazy-refcounts': true }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'nope', file: 'f' }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', file: 'f' }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'x' }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q' }] });
    // The file cannot become read-only under a writer; together with it, it can.
    await q('blockdev-reopen', { options: [{ driver: 'file', 'node-name': 'f', filename: f.a, 'read-only': true }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': true }, { driver: 'file', 'node-name': 'f', filename: f.a, 'read-only': true }] });
    // A writer on a read-only file is refused; both writable again, file first.
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': false }] });
    await q('blockdev-reopen', { options: [{ driver: 'file', 'node-name': 'f', filename: f.a, 'read-only': false }, { driver: 'qcow2', 'node-name': 'q', file: 'f', 'read-only': false }] });
    await q('block-dirty-bitmap-add', { node: 'q', name: 'b2', persistent: true });
    infos.push(storedBitmaps(f.a));
    await q('blockdev-del', { 'node-name': 'q' });
    await q('blockdev-del', { 'node-name': 'f' });
    infos.push(storedBitmaps(f.a));
    assert.match(execFileSync('qemu-img', ['check', f.a]).toString(), /No errors were found on the image/);
  };
  const theirs = await run('qemu-storage-daemon', run1('qemu-storage-daemon'));
  const ours = await run('bitmirror', run1('bitmirror'));
  for (let i = 0; i < theirs.length; i++) assert.deepEqual(ours[i], theirs[i], `reply ${i}`);
  assert.deepEqual(seen.bitmirror, seen['qemu-storage-daemon']);
  assert.deepEqual(seen.bitmirror[1], [
    { name: 'b0', flags: ['auto'] },
    { name: 'b1', flags: ['auto'] },
  ]);
});

test('blockdev-reopen changes and detaches a backing file, as qemu-storage-daemon 7.2', { skip }, async () => {
  const backings: Record<string, unknown[]> = {};
  const script = (program: string): Script => async (q, d, f) => {
    const seen: unknown[] = (backings[program] = []);
    const base = `${f.a}.base.qcow2`;
    const top = `${f.a}.top.qcow2`;
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '1M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', base]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 0 64k', f.b]);
    const backingOf = async () => {
      const nodes = await d.qmp.execute<Array<{ 'node-name': string; image: { 'backing-image'?: { filename: string } } }>>('query-named-block-nodes');
      return nodes.find((n) => n['node-name'] === 'top')?.image['backing-image']?.filename ?? null;
    };
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'base', file: { driver: 'file', filename: base } });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'base2', file: { driver: 'file', filename: f.b } });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', 'node-name': 'topf', filename: top }, backing: 'base' });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: 'topf', backing: 'base2' }] });
    seen.push(await backingOf());
    await q('blockdev-del', { 'node-name': 'base2' });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: 'topf', backing: null }] });
    seen.push(await backingOf());
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: 'topf' }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: 'topf', backing: 'nope' }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: 'topf', backing: 'top' }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: 'topf', backing: { driver: 'null-co' } }] });
    await q('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': 'top', file: 'topf', backing: 'base' }] });
    seen.push(await backingOf());
    // top reads through to its backing file again; base cannot go while top uses it.
    await q('blockdev-del', { 'node-name': 'base' });
    await q('blockdev-del', { 'node-name': 'top' });
    await q('blockdev-del', { 'node-name': 'base' });
  };
  const theirs = await run('qemu-storage-daemon', script('qemu-storage-daemon'));
  const ours = await run('bitmirror', script('bitmirror'));
  for (let i = 0; i < theirs.length; i++) assert.deepEqual(ours[i], theirs[i], `reply ${i}`);
  const mask = (v: unknown[]) => v.map((x) => (typeof x === 'string' ? path.basename(x.replace(/.*"filename": "([^"]+)".*/, '$1')) : x));
  assert.deepEqual(mask(backings.bitmirror), ['b.qcow2', null, 'a.qcow2.base.qcow2']);
  assert.deepEqual(mask(backings['qemu-storage-daemon']), ['b.qcow2', null, 'a.qcow2.base.qcow2']);
});

interface XdbgGraph {
  nodes: Array<{ id: number; type: string; name: string }>;
  edges: Array<{ parent: number; child: number; name: string; perm: string[]; 'shared-perm': string[] }>;
}

/**
 * x-debug-query-block-graph without what QEMU does not keep stable: ids and list order (a hash table's),
 * and generated node names. Each node gets a label from its path: a named node its name, an anonymous
 * one "PARENT/EDGE" from its first node parent, a backend "backend>CHILD"; the edges are listed by
 * those labels, sorted.
 */
function canonicalGraph(g: XdbgGraph): string[] {
  const byId = new Map(g.nodes.map((n) => [n.id, n]));
  const labels = new Map<number, string>();
  const label = (id: number, seen = new Set<number>()): string => {
    const known = labels.get(id);
    if (known !== undefined) return known;
    const n = byId.get(id)!;
    let l: string;
    if (n.type === 'block-job') l = `job:${n.name}`;
    else if (n.type === 'block-backend') {
      const e = g.edges.find((x) => x.parent === id);
      l = `backend>${e && !seen.has(e.child) ? label(e.child, new Set([...seen, id])) : '?'}`;
    } else if (!n.name.startsWith('#')) l = n.name;
    else {
      const e = g.edges.find((x) => x.child === id && byId.get(x.parent)!.type === 'block-driver' && !seen.has(x.parent));
      l = e ? `${label(e.parent, new Set([...seen, id]))}/${e.name}` : '#anon';
    }
    labels.set(id, l);
    return l;
  };
  return g.edges
    .map((e) => `${label(e.parent)} -${e.name}-> ${label(e.child)} perm=${e.perm.join(',')} shared=${e['shared-perm'].join(',')}`)
    .sort();
}

/** The canonical graphs `script` sees at each `snap()`, on both daemons; they must be equal. */
async function compareGraphs(script: (q: Parameters<Script>[0], snap: () => Promise<void>, f: Record<string, string>, d: SpawnedDaemon) => Promise<void>): Promise<void> {
  const seen: Record<Program, string[][]> = { bitmirror: [], 'qemu-storage-daemon': [] };
  const replies: Partial<Record<Program, unknown[]>> = {};
  for (const program of ['qemu-storage-daemon', 'bitmirror'] as const) {
    replies[program] = await run(program, async (q, d, f) => {
      await script(q, async () => void seen[program].push(canonicalGraph((await d.qmp.execute('x-debug-query-block-graph')) as XdbgGraph)), f, d);
    });
  }
  assert.deepEqual(replies.bitmirror, replies['qemu-storage-daemon']);
  assert.deepEqual(seen.bitmirror, seen['qemu-storage-daemon']);
  assert.ok(seen.bitmirror.length > 0);
}

test('x-debug-query-block-graph: a backing chain and an NBD export give the graph qemu-storage-daemon gives', { skip }, async () => {
  await compareGraphs(async (q, snap, f) => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', f.a, '-F', 'qcow2', f.b]);
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: f.b } });
    await snap();
    await q('blockdev-add', { driver: 'raw', 'node-name': 'r', file: { driver: 'file', filename: f.r } });
    await q('nbd-server-start', { addr: { type: 'unix', data: { path: path.join(path.dirname(f.a), 'nbd.sock') } } });
    await q('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'r', writable: true });
    await q('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'top' });
    await snap();
    await q('block-export-del', { id: 'e' });
    await snap();
  });
});

test('x-debug-query-block-graph: the graph of a mirror job and of a backup job, as qemu-storage-daemon gives it', { skip }, async () => {
  await compareGraphs(async (q, snap, f, d) => {
    // 16 MiB of data: QEMU's backup copies its first 1 MiB chunk before the rate limit holds it.
    for (const [file, fmt] of [[f.a, 'qcow2'], [f.b, 'qcow2'], [f.r, 'raw']]) execFileSync('qemu-img', ['create', '-q', '-f', fmt, file, '16M']);
    execFileSync('qemu-io', ['-c', 'write -P 7 0 16M', f.a]);
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: f.a } });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: f.b } });
    await q('blockdev-add', { driver: 'raw', 'node-name': 'bk', file: { driver: 'file', filename: f.r } });
    // speed 1: the job stays running while the graph is read.
    await q('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'tgt', sync: 'full', speed: 1 });
    await snap();
    const cancelled = d.qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'm' });
    await q('block-job-cancel', { device: 'm', force: true });
    await cancelled;
    await q('blockdev-backup', { 'job-id': 'b', device: 'src', target: 'bk', sync: 'full', speed: 1 });
    await snap();
  });
});

test('x-debug-query-block-graph: the graph of an intermediate and of an active block-commit, as qemu-storage-daemon gives it', { skip }, async () => {
  await compareGraphs(async (q, snap, f, d) => {
    // base (a) <- mid (b) <- top, each with data so that the throttled jobs stay running.
    execFileSync('qemu-io', ['-c', 'write -P 1 0 1M', f.a]);
    const mid = path.join(path.dirname(f.a), 'mid.qcow2');
    const top = path.join(path.dirname(f.a), 'top.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', f.a, '-F', 'qcow2', mid]);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', top]);
    execFileSync('qemu-io', ['-c', 'write -P 2 0 1M', mid]);
    execFileSync('qemu-io', ['-c', 'write -P 3 0 1M', top]);
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: { driver: 'file', filename: f.a } });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'mid', 'read-only': true, backing: 'base', file: { driver: 'file', filename: mid } });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'top', backing: 'mid', file: { driver: 'file', filename: top } });
    await q('block-commit', { 'job-id': 'c', device: 'top', 'top-node': 'mid', speed: 1, 'filter-node-name': 'ct', 'auto-dismiss': false });
    await snap();
    // Finished but not dismissed: the job still holds what it claimed.
    await q('block-job-set-speed', { device: 'c', speed: 0 });
    await d.qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'c', status: 'concluded' });
    await snap();
    await q('job-dismiss', { id: 'c' });
    await snap();
    await q('block-commit', { 'job-id': 'a', device: 'top', speed: 1, 'filter-node-name': 'at' });
    await snap();
    const cancelled = d.qmp.waitEvent('BLOCK_JOB_CANCELLED', { device: 'a' });
    await q('block-job-cancel', { device: 'a', force: true });
    await cancelled;
    // (No snapshot after the cancel: QEMU 7.2 leaves the base writable, bitmirror read-only again as
    // upstream QEMU does since.)
  });
});

/** What a shrink left in an image, as the peer tools show it (nothing that names the directory). */
function imageState(file: string): Record<string, unknown> {
  const check = JSON.parse(execFileSync('qemu-img', ['check', '--output=json', file]).toString()) as Record<string, unknown>;
  delete check.filename;
  const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file]).toString()) as Record<string, unknown>;
  return {
    check,
    map: execFileSync('qemu-img', ['map', '--output=json', file]).toString(),
    size: info['virtual-size'],
    fileSize: execFileSync('stat', ['-c', '%s', file]).toString(),
    header: execFileSync('head', ['-c', '104', file]).toString('hex'),
  };
}

/** An image's data (or an internal snapshot's) as raw bytes, converted by qemu-img. */
function rawOf(file: string, snapshot?: string): Buffer {
  const out = `${file}.${snapshot ?? 'active'}.raw`;
  execFileSync('qemu-img', ['convert', ...(snapshot ? ['-l', `snapshot.name=${snapshot}`] : []), '-O', 'raw', file, out]);
  const data = readFileSync(out);
  rmSync(out);
  return data;
}

test('block_resize shrinks qcow2 as QEMU 7.2 does (internal snapshots, persistent bitmaps): same images, data kept, zeroes when grown again', { skip }, async () => {
  const states: Array<Record<string, unknown>> = [];
  await compare(async (q, _d, f) => {
    const MiB = 1 << 20;
    // 4 KiB clusters: an L2 table maps 2 MiB, so the shrinks cut L1 entries and free L2 tables too.
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f.a, '8M']);
    // Data, compressed clusters, a zero cluster, an allocated zero cluster, data near the end.
    const io = ['write -P 1 0 3M', 'write -c -P 2 3M 128k', 'write -z 4M 64k', 'write -P 3 4352k 64k', 'write -z 4352k 64k', 'write -P 4 6M 2M'];
    execFileSync('qemu-io', ['-f', 'qcow2', ...io.flatMap((c) => ['-c', c]), f.a]);
    // b: the same, with an internal snapshot and a write after it (its L2 table copied, others shared).
    execFileSync('cp', [f.a, f.b]);
    execFileSync('qemu-img', ['snapshot', '-c', 's1', f.b]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 5 7M 64k', f.b]);
    const taken = rawOf(f.b, 's1');
    // References: the same shrinks by qemu-img resize --shrink on copies.
    const refA = `${f.a}.ref`;
    const refB = `${f.b}.ref`;
    execFileSync('cp', [f.a, refA]);
    execFileSync('cp', [f.b, refB]);
    execFileSync('qemu-img', ['resize', '-q', '--shrink', refA, String(3 * MiB + 64 * 1024)]);
    execFileSync('qemu-img', ['resize', '-q', '--shrink', refB, String(5 * MiB + 2048)]);

    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'qa', file: { driver: 'file', filename: f.a } });
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'qb', file: { driver: 'file', filename: f.b } });
    await q('block-dirty-bitmap-add', { node: 'qa', name: 'b1', persistent: true });
    await q('block_resize', { 'node-name': 'qa', size: 3 * MiB + 64 * 1024 });
    await q('block_resize', { 'node-name': 'qb', size: 5 * MiB + 2048 });
    await q('blockdev-del', { 'node-name': 'qb' });
    const b = imageState(f.b);
    execFileSync('qemu-img', ['compare', '-q', refB, f.b]);
    // qemu-img reads a snapshot at the image's current size (bdrv_snapshot_load_tmp keeps it).
    const snap = rawOf(f.b, 's1');
    assert.equal(snap.length, 5 * MiB + 2048);
    assert.ok(snap.equals(taken.subarray(0, snap.length)), 'the snapshot reads as it was taken');
    // Grown again: zeroes past the end it was shrunk to.
    await q('block_resize', { 'node-name': 'qa', size: 6 * MiB });
    await q('blockdev-del', { 'node-name': 'qa' });
    const a = imageState(f.a);
    const data = rawOf(f.a);
    const ref = rawOf(refA);
    assert.equal(data.length, 6 * MiB);
    assert.ok(data.subarray(0, ref.length).equals(ref), 'data below the new end');
    assert.ok(data.subarray(ref.length).equals(Buffer.alloc(data.length - ref.length)), 'zeroes past it');
    const bitmaps = (JSON.parse(execFileSync('qemu-img', ['info', '--output=json', f.a]).toString()) as { 'format-specific': { data: { bitmaps: Array<{ name: string }> } } })['format-specific'].data.bitmaps;
    assert.deepEqual(bitmaps.map((x) => x.name), ['b1']);
    // c: 32 MiB of data in 4 KiB clusters needs five refcount blocks (one maps 8 MiB); shrunk to
    // 1 MiB, four count nothing and leave the table, and the file is cut to what is left.
    const fc = path.join(path.dirname(f.a), 'c.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', fc, '32M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 32M', fc]);
    await q('blockdev-add', { driver: 'qcow2', 'node-name': 'qc', file: { driver: 'file', filename: fc } });
    await q('block_resize', { 'node-name': 'qc', size: MiB });
    await q('blockdev-del', { 'node-name': 'qc' });
    assert.ok(rawOf(fc).equals(Buffer.alloc(MiB, 7)));
    const c = { ...imageState(fc), file: execFileSync('sha256sum', [fc]).toString().split(' ')[0] };
    states.push({ a, b, c });
  });
  const [theirs, ours] = states;
  assert.equal((ours as Record<string, Record<string, unknown>>).c.file, (theirs as Record<string, Record<string, unknown>>).c.file, 'c: the same file, byte for byte');
  for (const img of ['a', 'b', 'c']) {
    const t = (theirs as Record<string, Record<string, unknown>>)[img];
    const o = (ours as Record<string, Record<string, unknown>>)[img];
    assert.equal((o.check as Record<string, unknown>)['check-errors'], 0, `${img}: check`);
    assert.equal((o.check as Record<string, unknown>).leaks, undefined, `${img}: leaks`);
    assert.equal((o.check as Record<string, unknown>).corruptions, undefined, `${img}: corruptions`);
    for (const k of ['size', 'map', 'check', 'fileSize', 'header']) assert.deepEqual(o[k], t[k], `${img}: ${k}`);
  }
});
