/**
 * `bitmirror demo`: shows what bitmirror does, on built-in defaults, in a temporary folder. It starts a
 * daemon, opens a disk image over QMP, writes "guest" data with qemu-io through HMP and verifies it —
 * through the daemon and, independently, with QEMU's own qemu-io when it is installed.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { spawnDaemon } from '../daemon/spawn.js';

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

export async function runDemo(argv: string[]): Promise<number> {
  const keep = argv.includes('--keep');
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bitmirror-demo-'));
  const disk = path.join(dir, 'disk.raw');
  const size = 64 << 20;
  let failures = 0;
  const check = (ok: boolean, what: string) => {
    process.stdout.write(`    ${ok ? 'ok  ' : 'FAIL'} ${what}\n`);
    if (!ok) failures++;
  };
  step(`working in ${dir}`);
  await fsp.writeFile(disk, '');
  await fsp.truncate(disk, size);
  step('starting bitmirror daemon');
  const d = await spawnDaemon(path.join(dir, 'qmp.sock'));
  try {
    const v = await d.qmp.execute<{ package: string }>('query-version');
    step(`connected over QMP (${v.package})`);
    step('blockdev-add disk0: raw over file');
    await d.qmp.execute('blockdev-add', { 'node-name': 'disk0', driver: 'raw', file: { driver: 'file', filename: disk } });
    const patterns = [
      [0xa1, 0, 1 << 20],
      [0xb2, 8 << 20, 64 << 10],
      [0xc3, 32 << 20, 4 << 20],
    ] as const;
    for (const [p, off, len] of patterns) {
      const out = await d.qmp.hmp(`qemu-io disk0 "write -P 0x${p.toString(16)} ${off} ${len}"`);
      process.stdout.write(`    ${out.split('\r\n')[0]}\n`);
    }
    for (const [p, off, len] of patterns) {
      const out = await d.qmp.hmp(`qemu-io disk0 "read -P 0x${p.toString(16)} ${off} ${len}"`);
      check(!out.includes('Pattern verification failed'), `read back 0x${p.toString(16)} at ${off} through the daemon`);
    }
    const nodes = await d.qmp.execute<Array<{ 'node-name': string; drv: string }>>('query-named-block-nodes', { flat: true });
    step(`nodes: ${nodes.map((n) => `${n['node-name']} (${n.drv})`).join(', ')}`);
    await d.qmp.execute('blockdev-del', { 'node-name': 'disk0' });
  } finally {
    await d.stop();
  }
  if (await have('qemu-io')) {
    step('verifying the image with QEMU qemu-io');
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xa1 0 1M', '-c', 'read -P 0xb2 8M 64k', '-c', 'read -P 0xc3 32M 4M', '-c', 'read -P 0 1M 7M', disk]);
    check(!r.stdout.includes('Pattern verification failed'), 'qemu-io sees the data bitmirror wrote');
  } else {
    step('qemu-io not installed: skipping the independent check');
  }
  if (!keep) await fsp.rm(dir, { recursive: true, force: true });
  step(failures === 0 ? 'demo passed' : `demo FAILED (${failures} checks)`);
  return failures === 0 ? 0 : 1;
}
