/**
 * NBD server benchmark: nbdcopy out of an export (into null:, so only the server's side is measured)
 * and into an export (a fresh qcow2 each time), bitmirror vs qemu-storage-daemon vs qemu-nbd serving
 * the same qcow2 in the same run, BM_NBD_RUNS (default 5) rounds with the order reversed every other
 * round: medians and ranges of MiB/s and of the server's CPU seconds, and bitmirror's time ÷ the
 * server's per round. The image holds BM_NBD_MIB (default 512) MiB of data in 1 MiB extents with a hole
 * after each, in TMPDIR (TMPDIR=/dev/shm keeps the disk out of it). Every server announces multi-conn
 * (qemu-nbd with --shared=8), so nbdcopy uses its default 4 connections.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../src/daemon/spawn.js';
import { cpuSeconds, loadNow, median, pairedRatio, sh, spread, type Row } from './support.js';

export const title = 'nbd: nbdcopy out of and into an export, bitmirror vs qemu-storage-daemon vs qemu-nbd';

type Server = 'bitmirror' | 'qemu-storage-daemon' | 'qemu-nbd';

interface Running {
  pid: number | undefined;
  uri: string;
  stop(): Promise<void>;
}

/** Serve `image` (qcow2) as export `name` with `server`, writable or not. */
async function serve(server: Server, dir: string, image: string, writable: boolean): Promise<Running> {
  const sock = path.join(dir, `${server}.nbd.sock`);
  await fsp.rm(sock, { force: true });
  const uri = `nbd+unix:///disk?socket=${sock}`;
  if (server === 'qemu-nbd') {
    // --persistent: nbdcopy connects more than once (a probe, then its connections).
    const args = ['-f', 'qcow2', '-k', sock, '-x', 'disk', '--shared=8', '--persistent', ...(writable ? [] : ['-r']), image];
    const proc: ChildProcess = spawn('qemu-nbd', args, { stdio: 'ignore' });
    for (let i = 0; i < 400 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
    return {
      pid: proc.pid,
      uri,
      async stop() {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM');
        await exited;
      },
    };
  }
  const d: SpawnedDaemon = await spawnDaemon(path.join(dir, `${server}.qmp.sock`), [
    '--blockdev', `driver=file,node-name=f0,filename=${image}`,
    '--blockdev', `driver=qcow2,node-name=d0,file=f0${writable ? '' : ',read-only=on'}`,
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', `type=nbd,id=e0,node-name=d0,name=disk,writable=${writable ? 'on' : 'off'}`,
  ], server);
  return {
    pid: d.proc.pid,
    uri,
    async stop() {
      await d.stop();
    },
  };
}

async function timed(r: Running, args: string[]): Promise<{ seconds: number; cpu: number }> {
  const cpu0 = cpuSeconds(r.pid);
  const t0 = process.hrtime.bigint();
  await sh('nbdcopy', args);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { seconds, cpu: cpuSeconds(r.pid) - cpu0 };
}

export async function run(): Promise<Row[]> {
  const mib = Number(process.env.BM_NBD_MIB ?? 512);
  const runs = Math.max(1, Number(process.env.BM_NBD_RUNS ?? 5));
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-bench-nbd-'));
  try {
    const servers: Server[] = ['bitmirror'];
    for (const s of ['qemu-storage-daemon', 'qemu-nbd'] as const) {
      if (await sh(s, ['--version']).then(() => true, () => false)) servers.push(s);
    }
    // The source: a raw file of random data (compressible data would flatter nobody), then a qcow2 of it
    // with a 1 MiB hole after every 1 MiB of data.
    const raw = path.join(dir, 'src.raw');
    const size = 2 * mib * (1 << 20);
    await sh('qemu-img', ['create', '-q', '-f', 'raw', raw, String(size)]);
    const fh = await fsp.open(raw, 'r+');
    const chunk = Buffer.alloc(1 << 20);
    for (let i = 0; i < mib; i++) {
      for (let j = 0; j < chunk.length; j += 4) chunk.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, j);
      await fh.write(chunk, 0, chunk.length, i * 2 * (1 << 20));
    }
    await fh.close();
    const image = path.join(dir, 'src.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);

    const samples: Record<string, Array<{ seconds: number; cpu: number }>> = {};
    const keep = (key: string, t: { seconds: number; cpu: number }) => (samples[key] ??= []).push(t);
    for (let i = 0; i < runs; i++) {
      for (const s of i % 2 ? [...servers].reverse() : servers) {
        const r = await serve(s, dir, image, false);
        try {
          keep(`${s} out`, await timed(r, [r.uri, 'null:']));
        } finally {
          await r.stop();
        }
        const target = path.join(dir, 'target.qcow2');
        await fsp.rm(target, { force: true });
        await sh('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(size)]);
        const w = await serve(s, dir, target, true);
        try {
          keep(`${s} in`, await timed(w, [raw, w.uri]));
        } finally {
          await w.stop();
        }
      }
    }
    const rows: Row[] = [];
    for (const dirn of ['out', 'in'] as const) {
      const base = samples[`bitmirror ${dirn}`];
      for (const s of servers) {
        const t = samples[`${s} ${dirn}`];
        const rate = t.map((x) => mib / x.seconds);
        const ratio = pairedRatio(base.map((x) => x.seconds), t.map((x) => x.seconds));
        rows.push({
          copy: dirn === 'out' ? 'nbdcopy export -> null:' : 'nbdcopy raw -> export',
          server: s,
          'data MiB': mib,
          'MiB/s': Math.round(median(rate)),
          'MiB/s range': spread(rate, 0),
          'server CPU s': median(t.map((x) => x.cpu)),
          'CPU range': spread(t.map((x) => x.cpu)),
          'bitmirror time ÷ this': s === 'bitmirror' ? '' : `${ratio.median.toFixed(2)} (${ratio.range}) ${ratio.verdict}`,
        });
      }
    }
    rows.push({ copy: `load average ${loadNow()}, ${runs} rounds` });
    return rows;
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
}
