/**
 * QMP under a flood (issue 18): one client sends "1," N times (each "1" and each "," gets an error
 * reply) and half-closes, while another client on a second monitor runs query-version in a loop.
 * Reported for bitmirror and qemu-storage-daemon on the same input: time until the flood's last reply,
 * the daemon's CPU seconds for it, and the other client's round-trip times meanwhile. BM_QMP_FLOOD sets
 * N (default 20000, the 40 KB).
 */
import * as net from 'node:net';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { spawnDaemon } from '../src/daemon/spawn.js';
import { cpuMeter, type Row } from './support.js';

export const title = 'qmp: a flood of error replies on one monitor, query-version latency on another';


async function flood(program: 'bitmirror' | 'qemu-storage-daemon', n: number, dir: string): Promise<Row> {
  const second = path.join(dir, `${program}-2.sock`);
  const d = await spawnDaemon(path.join(dir, `${program}.sock`), ['--chardev', `socket,path=${second},server=on,wait=off,id=mon1`, '--monitor', 'chardev=mon1'], program);
  try {
    const sock = net.createConnection(second);
    await new Promise((r) => sock.once('connect', r));
    let lines = 0;
    sock.on('data', (b: Buffer) => {
      for (let i = b.indexOf(10); i >= 0; i = b.indexOf(10, i + 1)) lines++;
    });
    const closed = new Promise((r) => sock.once('close', r));
    const cpuUsed = cpuMeter(d.proc.pid);
    const t0 = performance.now();
    sock.end('{"execute":"qmp_capabilities"}' + '1,'.repeat(n));
    let done = false;
    let wall = 0;
    void closed.then(() => {
      done = true;
      wall = performance.now() - t0;
    });
    const rtts: number[] = [];
    while (!done) {
      const t = performance.now();
      await d.qmp.execute('query-version');
      rtts.push(performance.now() - t);
    }
    const cpu = cpuUsed();
    rtts.sort((a, b) => a - b);
    return {
      program,
      inputs: n,
      replies: lines - 2,
      'flood wall ms': Math.round(wall),
      'daemon CPU s': cpu,
      'other client max ms': rtts.at(-1) ?? NaN,
      'other client median ms': rtts[rtts.length >> 1] ?? NaN,
    };
  } finally {
    await d.stop();
  }
}

export async function run(): Promise<Row[]> {
  const n = Number(process.env.BM_QMP_FLOOD ?? 20000);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-bench-qmp-'));
  const rows = [await flood('bitmirror', n, dir)];
  let haveQsd = true;
  try {
    execFileSync('qemu-storage-daemon', ['--version']);
  } catch {
    haveQsd = false;
  }
  if (haveQsd) rows.push(await flood('qemu-storage-daemon', n, dir));
  await fsp.rm(dir, { recursive: true, force: true });
  return rows;
}
