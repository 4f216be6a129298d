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
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';

const haveQsd = (() => {
  try {
    execFileSync('qemu-storage-daemon', ['--version']);
    return true;
  } catch {
    return false;
  }
})();
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
