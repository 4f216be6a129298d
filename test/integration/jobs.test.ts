/**
 * blockdev-create and the job commands over a real QMP socket, side by side with QEMU 7.2's
 * qemu-storage-daemon when it is installed: libvirt's image-creation sequence (create the file, add it,
 * create qcow2 on it with cluster-size 65536, poll query-jobs until concluded, job-dismiss, add the
 * qcow2 node with backing: null), plus the refusals around it. Replies and JOB_STATUS_CHANGE events must
 * be the same on both; qemu-img info and check must accept bitmirror's image.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { promises as fsp, existsSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { poll } from '../support/wait.js';

const run = promisify(execFile);
const haveQemu = existsSync('/usr/bin/qemu-storage-daemon') && existsSync('/usr/bin/qemu-img');
const SIZE = 46137344;

type Step = [string, Record<string, unknown>?];
type Record_ = { step: string; reply: unknown; events: unknown[] };

/** Run steps on one daemon; `img` is that daemon's image directory. */
async function drive(d: SpawnedDaemon, dir: string): Promise<Record_[]> {
  const file = path.join(dir, 'disk.qcow2');
  const steps: Step[] = [
    ['blockdev-create', { 'job-id': 'create-libvirt-2-storage', options: { driver: 'file', filename: file, size: 0 } }],
    ['poll', { id: 'create-libvirt-2-storage' }],
    ['job-dismiss', { id: 'create-libvirt-2-storage' }],
    ['blockdev-add', { driver: 'file', 'node-name': 'libvirt-2-storage', filename: file, 'auto-read-only': true, discard: 'unmap' }],
    ['blockdev-create', { 'job-id': 'create-libvirt-2-format', options: { driver: 'qcow2', file: 'libvirt-2-storage', size: SIZE, 'cluster-size': 65536 } }],
    ['poll', { id: 'create-libvirt-2-format' }],
    ['query-block-jobs'],
    ['block-job-dismiss', { id: 'create-libvirt-2-format' }],
    ['job-complete', { id: 'create-libvirt-2-format' }],
    ['blockdev-create', { 'job-id': 'create-libvirt-2-format', options: { driver: 'file', filename: path.join(dir, 'x.img'), size: 0 } }],
    ['job-dismiss', { id: 'create-libvirt-2-format' }],
    ['job-dismiss', { id: 'create-libvirt-2-format' }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'libvirt-2-format', file: 'libvirt-2-storage', 'read-only': false, backing: null }],
    // Refusals.
    ['blockdev-create', { 'job-id': '2bad', options: { driver: 'file', filename: path.join(dir, 'y.img'), size: 0 } }],
    ['blockdev-create', { 'job-id': 'r', options: { driver: 'raw' } }],
    ['blockdev-create', { 'job-id': 'r', options: { driver: 'raw', size: 1 } }],
    ['blockdev-create', { 'job-id': 'r', options: { driver: 'nope' } }],
    ['blockdev-create', { 'job-id': 'r', options: { driver: 'file', filename: path.join(dir, 'y.img'), size: 0, preallocation: 'x' } }],
    ['blockdev-create', { 'job-id': 'r', options: { driver: 'file', size: 0 } }],
    ['blockdev-create', { options: { driver: 'file', filename: 'y', size: 0 } }],
    ['blockdev-create', { 'job-id': 'r', options: 3 }],
    ['job-pause', { id: 'nope' }],
    ['block-job-cancel', { device: 'nope' }],
    ['block-job-set-speed', { device: 'nope', speed: 1 }],
    // A failing create: the job concludes with the error.
    ['blockdev-create', { 'job-id': 'fail', options: { driver: 'file', filename: path.join(dir, 'no', 'such', 'dir.img'), size: 0 } }],
    ['poll', { id: 'fail' }],
    ['job-finalize', { id: 'fail' }],
    ['job-cancel', { id: 'fail' }],
    ['job-dismiss', { id: 'fail' }],
    // preallocation modes.
    ['blockdev-create', { 'job-id': 'full', options: { driver: 'file', filename: path.join(dir, 'full.img'), size: 1048577, preallocation: 'full' } }],
    ['poll', { id: 'full' }],
    ['job-dismiss', { id: 'full' }],
    ['blockdev-create', { 'job-id': 'meta', options: { driver: 'file', filename: path.join(dir, 'meta.img'), size: 65536, preallocation: 'metadata' } }],
    ['poll', { id: 'meta' }],
    ['job-dismiss', { id: 'meta' }],
    ['query-jobs'],
  ];
  const out: Record_[] = [];
  for (const [cmd, args] of steps) {
    let reply: unknown;
    if (cmd === 'poll') {
      const id = args!.id as string;
      await poll(`job ${id} to conclude`, async () => {
        const jobs = (await d.qmp.execute('query-jobs')) as Array<Record<string, unknown>>;
        reply = jobs.find((x) => x.id === id && x.status === 'concluded');
        return reply !== undefined;
      }, undefined, 10);
    } else {
      reply = await d.qmp.request(cmd, args);
      delete (reply as Record<string, unknown>).id;
    }
    const events = d.qmp.events.splice(0).map((e) => ({ event: e.event, data: e.data }));
    // Paths differ between the two daemons' directories.
    out.push(JSON.parse(JSON.stringify({ step: cmd, reply, events }).split(dir).join('<dir>')) as Record_);
  }
  return out;
}

test('libvirt blockdev-create sequence and job commands, as QEMU 7.2 answers them', async () => {
  const base = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-jobs-'));
  const bmDir = path.join(base, 'bm');
  const qDir = path.join(base, 'qemu');
  await fsp.mkdir(bmDir);
  await fsp.mkdir(qDir);
  try {
    const bm = await spawnDaemon(path.join(base, 'bm.sock'));
    const bmOut = await drive(bm, bmDir);
    assert.equal(await bm.stop(), 0, bm.stderr());
    assert.doesNotMatch(bm.stderr(), /internal error/);

    // What must hold whatever QEMU says.
    const byStep = (name: string) => bmOut.filter((r) => r.step === name);
    assert.deepEqual(byStep('poll')[1].reply, { id: 'create-libvirt-2-format', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 });
    assert.deepEqual(
      byStep('blockdev-create')[1].events.concat(byStep('poll')[1].events).map((e) => (e as { data: { status: string } }).data.status),
      ['created', 'running', 'waiting', 'pending', 'concluded'],
    );
    assert.deepEqual(byStep('query-block-jobs')[0].reply, { return: [] });

    const file = path.join(bmDir, 'disk.qcow2');
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', file])).stdout) as Record<string, unknown>;
    assert.equal(info.format, 'qcow2');
    assert.equal(info['virtual-size'], SIZE);
    assert.equal(info['cluster-size'], 65536);
    await run('qemu-img', ['check', file]);
    assert.equal((await fsp.stat(path.join(bmDir, 'full.img'))).size, 1048577);
    assert.equal((await fsp.stat(path.join(bmDir, 'meta.img'))).size, 0);

    if (haveQemu) {
      const q = await spawnDaemon(path.join(base, 'qsd.sock'), [], 'qemu-storage-daemon');
      const qOut = await drive(q, qDir);
      await q.stop();
      // Replies step by step; events as one stream (a fast job's events may land before or after a reply).
      for (let i = 0; i < qOut.length; i++) assert.deepEqual(bmOut[i].reply, qOut[i].reply, `step ${i}: ${qOut[i].step}`);
      assert.deepEqual(
        bmOut.flatMap((r) => r.events),
        qOut.flatMap((r) => r.events),
      );
    }
  } finally {
    await fsp.rm(base, { recursive: true, force: true });
  }
});
