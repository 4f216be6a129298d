/**
 * `bitmirror demo`: shows what bitmirror does, on built-in defaults, in a temporary folder:
 *   1. start a daemon; create a qcow2 disk with blockdev-create; write "guest" data into it;
 *   2. add a dirty bitmap and write more, so it records what changed;
 *   3. live-copy the disk with `bitmirror copy`'s code (against this daemon, as `--qmp` does) while
 *      writes go on: it mirrors, carries the bitmaps onto the copy, switches over and verifies; the
 *      report names each bitmap the copy carries and the bytes it marks dirty;
 *   4. keep writing, then re-sync the copy incrementally: a mirror driven by a bitmap copies only
 *      the clusters that changed;
 *   5. verify everything with QEMU's own tools: qemu-img compare and check, and the bitmaps' digests.
 * Every step talks QMP to a real daemon over a unix socket, exactly as management software would.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { spawnDaemon } from '../daemon/spawn.js';
import type { QmpClient } from '../qmp/client.js';
import { MiB } from '../base/sizes.js';
import { runCopy, type CopyResult } from './copy.js';
import { Progress } from './progress.js';

const run = promisify(execFile);

function step(msg: string): void {
  process.stdout.write(`==> ${msg}\n`);
}

async function have(tool: string): Promise<boolean> {
  try {
    await run('sh', ['-c', `command -v ${tool}`]);
    return true;
  } catch {
    return false;
  }
}

/** blockdev-create a qcow2 image (file node, then the format), wait for the job, dismiss it. */
async function createQcow2(qmp: QmpClient, filename: string, size: number, tag: string): Promise<void> {
  await fsp.writeFile(filename, '');
  await qmp.execute('blockdev-add', { driver: 'file', 'node-name': `${tag}-file`, filename });
  await qmp.execute('blockdev-create', { 'job-id': `create-${tag}`, options: { driver: 'qcow2', file: `${tag}-file`, size } });
  await waitConcluded(qmp, `create-${tag}`);
  await qmp.execute('job-dismiss', { id: `create-${tag}` });
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': tag, file: `${tag}-file`, backing: null });
}

async function waitConcluded(qmp: QmpClient, id: string): Promise<void> {
  for (;;) {
    const jobs = await qmp.execute<Array<{ id: string; status: string; error?: string }>>('query-jobs');
    const j = jobs.find((x) => x.id === id);
    if (!j) throw new Error(`job ${id} vanished`);
    if (j.status === 'concluded') {
      if (j.error) throw new Error(`job ${id} failed: ${j.error}`);
      return;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The bitmap's entry in query-named-block-nodes. */
async function bitmapInfo(qmp: QmpClient, node: string, name: string): Promise<{ count: number; granularity: number } | undefined> {
  const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name?: string; count: number; granularity: number }> }>>('query-named-block-nodes', { flat: true });
  return nodes.find((n) => n['node-name'] === node)?.['dirty-bitmaps']?.find((b) => b.name === name);
}

export async function runDemo(argv: string[]): Promise<number> {
  const keep = argv.includes('--keep');
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bitmirror-demo-'));
  const disk = path.join(dir, 'disk.qcow2');
  const copy = path.join(dir, 'copy.qcow2');
  const size = 256 * MiB;
  let failures = 0;
  const check = (ok: boolean, what: string) => {
    process.stdout.write(`    ${ok ? 'ok  ' : 'FAIL'} ${what}\n`);
    if (!ok) failures++;
  };
  step(`working in ${dir}`);
  const socket = path.join(dir, 'qmp.sock');
  const d = await spawnDaemon(socket);
  const qmp = d.qmp;
  const io = async (node: string, cmd: string) => {
    const out = await qmp.hmpOutput(`qemu-io ${node} "${cmd}"`);
    if (/failed|not found|error/i.test(out)) throw new Error(`qemu-io ${node} "${cmd}": ${out.trim()}`);
    return out;
  };
  try {
    const v = await qmp.execute<{ package: string }>('query-version');
    step(`bitmirror daemon up, QMP connected (${v.package})`);

    step('1. blockdev-create: a 256 MiB qcow2 disk, then guest data written with qemu-io');
    await createQcow2(qmp, disk, size, 'disk0');
    for (let i = 0; i < 32; i++) await io('disk0', `write -P 0x${(0x10 + i).toString(16)} ${i * 4 * MiB} 1M`);
    process.stdout.write('    32 MiB written in 32 extents\n');

    step('2. block-dirty-bitmap-add bm0; more writes are recorded in it');
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bm0', granularity: 65536 });
    for (let i = 0; i < 8; i++) await io('disk0', `write -P 0xb${i} ${(i * 16 + 2) * MiB} 64k`);
    const bm0 = await bitmapInfo(qmp, 'disk0', 'bm0');
    check(bm0?.count === 8 * 65536, `bm0 records 8 changed clusters (count ${bm0?.count})`);

    step('3. live copy with `bitmirror copy`: mirror while the guest keeps writing, carry the bitmaps, switch over');
    let copied: CopyResult | undefined;
    const copyCode = await runCopy(
      { src: 'disk0', dst: copy, qmp: socket, nodeName: 'copy0', reuse: false, shallow: false, syncWrites: false, pivot: true, carryBitmaps: true, verify: true },
      new Progress(process.stdout.isTTY ? 'bar' : 'none'),
      {
        // The guest writes while the copy is in sync and about to switch: the mirror copies each write.
        beforeSwitch: async () => {
          for (let i = 0; i < 4; i++) await io('disk0', `write -P 0xc${i} ${(i * 32 + 1) * MiB} 128k`);
        },
        onResult: (r) => (copied = r),
      },
    );
    check(copyCode === 0 && copied !== undefined, `bitmirror copy switched over to the copy (${String(copied?.bytes)} bytes mirrored)`);
    check(copied?.verify?.identical === true, `bitmirror copy --verify: the copy equals the disk (${String(copied?.verify?.compared)} bytes compared)`);
    for (const b of copied?.bitmaps ?? []) {
      process.stdout.write(`    the copy carries bitmap ${b.name}: ${b.count} bytes dirty (granularity ${b.granularity}, ${b.persistent ? 'persistent' : 'not persistent'}, ${b.recording ? 'recording' : 'disabled'})\n`);
    }
    const srcBm0 = await bitmapInfo(qmp, 'disk0', 'bm0');
    const carried = copied?.bitmaps.find((b) => b.name === 'bm0');
    check(carried !== undefined && carried.count === srcBm0?.count, `the copy carries bm0 with the disk's ${String(srcBm0?.count)} dirty bytes`);
    const [srcSum, dstSum] = await Promise.all([
      qmp.execute<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: 'disk0', name: 'bm0' }),
      qmp.execute<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node: 'copy0', name: 'bm0' }),
    ]);
    check(srcSum.sha256 === dstSum.sha256, 'the copy carries bm0 with the same bits as the disk');

    step('4. incremental re-sync: a bitmap records new writes, a mirror copies only those');
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'resync', granularity: 65536 });
    for (let i = 0; i < 5; i++) await io('disk0', `write -P 0xd${i} ${(i * 40 + 3) * MiB} 64k`);
    const resync = await bitmapInfo(qmp, 'disk0', 'resync');
    await qmp.execute('blockdev-mirror', { 'job-id': 'resync', device: 'disk0', target: 'copy0', sync: 'full', bitmap: 'resync', 'copy-mode': 'write-blocking' });
    const ready2 = await qmp.waitEvent('BLOCK_JOB_READY', { device: 'resync' });
    check(ready2.data?.len === resync?.count, `only the ${String(resync?.count)} dirty bytes were copied (len ${String(ready2.data?.len)})`);
    await qmp.execute('block-job-cancel', { device: 'resync' });
    const done2 = await qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'resync' });
    check(done2.data?.error === undefined, 're-sync finished (soft cancel after READY: consistent copy, no switch)');
    const after = await bitmapInfo(qmp, 'disk0', 'resync');
    check(after?.count === 0, 'the working bitmap is empty again and recording');
    for (const n of ['copy0', 'copy0-file', 'disk0', 'disk0-file']) await qmp.execute('blockdev-del', { 'node-name': n });
  } catch (err) {
    failures++;
    process.stdout.write(`    FAIL ${err instanceof Error ? err.message : String(err)}\n`);
  } finally {
    const code = await d.stop();
    if (code !== 0) {
      failures++;
      process.stdout.write(`    FAIL daemon exited with ${code}: ${d.stderr()}\n`);
    }
  }

  step('5. verification with QEMU\'s tools');
  if (await have('qemu-img')) {
    const cmp = await run('qemu-img', ['compare', disk, copy]).then(
      (r) => r.stdout.trim(),
      (e: { stdout?: string }) => `differ: ${e.stdout ?? ''}`,
    );
    check(cmp === 'Images are identical.', `qemu-img compare disk copy: ${cmp}`);
    for (const img of [disk, copy]) {
      const chk = await run('qemu-img', ['check', img]).then(
        () => 'No errors were found on the image.',
        (e: { stdout?: string }) => `errors: ${e.stdout ?? ''}`,
      );
      check(chk.startsWith('No errors'), `qemu-img check ${path.basename(img)}: ${chk}`);
    }
  } else {
    step('qemu-img not installed: skipping the independent check (bash scripts/install-deps.sh installs it)');
  }
  if (!keep) await fsp.rm(dir, { recursive: true, force: true });
  step(failures === 0 ? 'demo passed' : `demo FAILED (${failures} checks)`);
  return failures === 0 ? 0 : 1;
}
