/**
 * libvirt's `virsh blockcopy … --pivot` of a disk with checkpoints, replayed as libvirt issues it
 * (reference consumers.md §1.3–1.4 a and d), against qemu-storage-daemon 7.2 and bitmirror: the replies
 * and the job events must be equal step by step, and both must leave the copy with the disk's
 * bitmaps and data.
 *
 * The disk is a two-layer chain (libvirt-2 base, libvirt-1 top) with two persistent, recording
 * bitmaps carrying dirty bits ('a' in both layers, 'b' in the top). The guest is an NBD export of the
 * disk's top node written by qemu-io (qemu-storage-daemon has no HMP): it writes before the copy,
 * while it runs, after READY, between the pivot and libvirt's bitmap transaction, and after it.
 * The sequence: blockdev-add of the new storage node, blockdev-create of the qcow2, job-dismiss,
 * blockdev-add of the format node (backing: null), blockdev-mirror sync=full auto-dismiss=false,
 * READY, the `libvirt-tmp-activewrite` transaction, job-complete, query-jobs, job-dismiss,
 * query-named-block-nodes, the bitmap transaction (add each bitmap persistent+recording with the
 * source's granularity, merge every layer's copy and the tmp bitmap, remove the tmp bitmap), the
 * reopens (read-only, as for a read-only disk, and back), blockdev-del of the old chain, quit.
 * Afterwards: qemu-img info lists both bitmaps on the copy, their ranges (qemu-nbd) cover every write
 * the source recorded and every write since, and qemu-img compare says the copy holds the data.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { haveQsd, setup, eventsUntil, poll, type Env } from '../support/daemon.js';
import { mustRun, nbdDirtyRanges, rangesCover } from '../support/tools.js';
import { assertSameReplay, jobEvents, openLibvirtDisk, recorder } from '../support/qmp-replay.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;
const JOB = 'copy-vda-libvirt-1-format';
const TMP = 'libvirt-tmp-activewrite';

/** The writes the guest makes, by phase; the first two are made by qemu-io before the daemon starts. */
const SOURCE_RECORDED: Record<string, Array<[number, number]>> = { a: [[0, 65536], [1 * MiB, 65536]], b: [[1 * MiB, 65536], [2 * MiB, 4096]] };
const GUEST = {
  before: 'write -P 0x33 3M 4k',
  running: 'write -P 0x44 5M 4k',
  ready: 'write -P 0x55 6M 4k',
  pivoted: 'write -P 0x66 7M 4k',
  merged: 'write -P 0x77 8M 4k',
};
const GUEST_RANGES: Array<[number, number]> = [3, 5, 6, 7, 8].map((m) => [m * MiB, 4096]);

interface Info {
  'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[]; granularity: number }> } };
}

async function makeDisk(env: Env): Promise<{ base: string; top: string; copy: string }> {
  const base = env.f('base.qcow2');
  const top = env.f('top.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(SIZE)]);
  await mustRun('qemu-img', ['bitmap', '--add', base, 'a']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', base]);
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  await mustRun('qemu-img', ['bitmap', '--add', top, 'a']);
  await mustRun('qemu-img', ['bitmap', '--add', top, 'b']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 1M 64k', top]);
  await mustRun('qemu-img', ['bitmap', '--disable', top, 'a']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x23 2M 4k', top]);
  await mustRun('qemu-img', ['bitmap', '--enable', top, 'a']);
  // libvirt creates the local file before it adds the storage node.
  const copy = env.f('copy.qcow2');
  await fsp.writeFile(copy, '');
  return { base, top, copy };
}

interface Run {
  replies: unknown[];
  events: string[];
  env: Env;
  files: { base: string; top: string; copy: string };
}

async function replay(program: 'bitmirror' | 'qemu-storage-daemon'): Promise<Run> {
  const env = await setup(`libvirt-copy-${program}`, program);
  const files = await makeDisk(env);
  const { qmp } = env.d;
  const rec = recorder(env);
  const { replies, request: r } = rec;
  /** query-named-block-nodes as libvirt reads it for bitmaps: node, driver, read-only, bitmaps. */
  const nodes = async () => {
    const list = await qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    replies.push([
      'query-named-block-nodes',
      list.map((n) => [n['node-name'], n.drv, n.ro, n['dirty-bitmaps'] ?? []]).sort((x, y) => String(x[0]).localeCompare(String(y[0]))),
    ]);
  };
  // The running domain's disk: libvirt's node names, the backing chain opened by libvirt.
  const guest = await openLibvirtDisk(rec, [files.top, files.base], env.f('nbd.sock'));
  await guest(GUEST.before);

  // virsh blockcopy vda copy.qcow2 --bandwidth … (a): size the target, create it, mirror.
  await nodes();
  await r('blockdev-add', { driver: 'file', filename: files.copy, 'node-name': 'libvirt-3-storage', 'auto-read-only': true, discard: 'unmap' });
  await r('blockdev-create', { 'job-id': 'create-libvirt-3-format', options: { driver: 'qcow2', file: 'libvirt-3-storage', size: SIZE, 'cluster-size': 65536 } });
  await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'create-libvirt-3-format', status: 'concluded' });
  await r('job-dismiss', { id: 'create-libvirt-3-format' });
  await r('blockdev-add', { 'node-name': 'libvirt-3-format', 'read-only': false, driver: 'qcow2', file: 'libvirt-3-storage', backing: null });
  await r('blockdev-mirror', { 'job-id': JOB, device: 'libvirt-1-format', target: 'libvirt-3-format', replaces: 'libvirt-1-format', speed: 1, sync: 'full', 'auto-finalize': true, 'auto-dismiss': false });
  await guest(GUEST.running);
  const running = await qmp.execute<Array<Record<string, unknown>>>('query-block-jobs');
  replies.push(['query-block-jobs', running.map((j) => [j.device, j.type, j.ready, j.status])]);
  await r('block-job-set-speed', { device: JOB, speed: 0 });
  await eventsUntil(env, 'BLOCK_JOB_READY', { device: JOB });
  const [atReady] = await qmp.execute<Array<{ offset: number; len: number }>>('query-block-jobs');
  await guest(GUEST.ready);
  // The mirror copies that write in the background; once it has (the job counted its 64 KiB chunk and
  // its offset caught up), the tmp bitmap added next records only what comes after: QEMU marks the
  // target's bitmaps with the job's copies.
  await poll('the write after READY copied', async () => {
    const [j] = await qmp.execute<Array<{ offset: number; len: number }>>('query-block-jobs');
    return j.len >= atReady.len + 65536 && j.offset === j.len;
  });

  // virsh blockjob vda --pivot (d): the tmp bitmap, job-complete; on concluded query-jobs, job-dismiss.
  await r('transaction', { actions: [{ type: 'block-dirty-bitmap-add', data: { node: 'libvirt-3-format', name: TMP, persistent: false, disabled: false } }] });
  await r('job-complete', { id: JOB });
  await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: JOB, status: 'concluded' });
  await guest(GUEST.pivoted);
  const jobs = await qmp.execute<Array<Record<string, unknown>>>('query-jobs');
  replies.push(['query-jobs', jobs.map((j) => [j.id, j.type, j.status, j.error])]);
  await r('job-dismiss', { id: JOB });
  // qemuBlockJobProcessEventCompletedCopyBitmaps: the bitmap data, then one transaction.
  await nodes();
  const merge = (name: string, layers: string[]) => ({
    type: 'block-dirty-bitmap-merge',
    data: { node: 'libvirt-3-format', target: name, bitmaps: [...layers.map((node) => ({ node, name })), { node: 'libvirt-3-format', name: TMP }] },
  });
  await r('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'libvirt-3-format', name: 'a', persistent: true, disabled: false, granularity: 65536 } },
      merge('a', ['libvirt-1-format', 'libvirt-2-format']),
      { type: 'block-dirty-bitmap-add', data: { node: 'libvirt-3-format', name: 'b', persistent: true, disabled: false, granularity: 65536 } },
      merge('b', ['libvirt-1-format']),
      { type: 'block-dirty-bitmap-remove', data: { node: 'libvirt-3-format', name: TMP } },
    ],
  });
  await guest(GUEST.merged);
  await nodes();
  // The reopens: read-only (as for a read-only disk, once the guest has detached), then back.
  await r('block-export-del', { id: 'guest' });
  await eventsUntil(env, 'BLOCK_EXPORT_DELETED', { id: 'guest' });
  const reopen = (ro: boolean) => r('blockdev-reopen', { options: [{ 'node-name': 'libvirt-3-format', driver: 'qcow2', 'read-only': ro, file: 'libvirt-3-storage', backing: null }] });
  await reopen(true);
  await nodes();
  await reopen(false);
  await nodes();
  // The old chain is unplugged.
  for (const n of ['libvirt-1-format', 'libvirt-1-storage', 'libvirt-2-format', 'libvirt-2-storage']) await r('blockdev-del', { 'node-name': n });
  await nodes();
  await r('nbd-server-stop');
  const events = jobEvents(qmp.events.splice(0));
  return { replies, events, env, files };
}

/** What both daemons must have left: the bitmaps in the copy, covering every write, and the data. */
async function checkCopy({ files }: Run, who: string): Promise<void> {
  const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', files.copy])) as Info;
  assert.deepEqual(
    (info['format-specific'].data.bitmaps ?? []).sort((x, y) => x.name.localeCompare(y.name)),
    [
      { name: 'a', flags: ['auto'], granularity: 65536 },
      { name: 'b', flags: ['auto'], granularity: 65536 },
    ],
    who,
  );
  await mustRun('qemu-img', ['check', files.copy]);
  for (const name of ['a', 'b']) {
    const ranges = await nbdDirtyRanges(files.copy, name);
    for (const [o, l] of [...SOURCE_RECORDED[name], ...GUEST_RANGES]) assert.ok(rangesCover(ranges, o, l), `${who}: bitmap ${name} misses [${o}, +${l}): ${JSON.stringify(ranges)}`);
  }
  // The copy is the disk plus what the guest wrote after the pivot.
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', GUEST.pivoted, '-c', GUEST.merged, files.top]);
  const cmp = await mustRun('qemu-img', ['compare', files.top, files.copy]);
  assert.match(cmp, /Images are identical/, who);
}

test("libvirt's block copy with bitmaps (blockdev-reopen era): replies equal qemu-storage-daemon 7.2's, and the copy has both bitmaps and the data", { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await replay('qemu-storage-daemon');
  assert.equal(await theirs.env.d.stop(), 0, theirs.env.d.stderr());
  const ours = await replay('bitmirror');
  assert.equal(await ours.env.d.stop(), 0, ours.env.d.stderr());
  try {
    if (process.env.BM_SHOW_REPLAY) console.log(JSON.stringify({ replies: ours.replies, events: ours.events }, null, 1));
    assertSameReplay(ours, theirs);
    await checkCopy(theirs, 'qemu-storage-daemon');
    await checkCopy(ours, 'bitmirror');
  } finally {
    await fsp.rm(theirs.env.dir, { recursive: true, force: true });
    await fsp.rm(ours.env.dir, { recursive: true, force: true });
  }
});
