/**
 * NBD server benchmark: nbdcopy out of an export (into null:, so only the server's side is measured)
 * and into an export (a fresh qcow2 each time), bitmirror vs qemu-storage-daemon vs qemu-nbd serving
 * the same qcow2 in the same run, BM_NBD_RUNS (default 5) rounds with the order reversed every other
 * round: medians and ranges of MiB/s and of the server's CPU seconds, and bitmirror's time ÷ the
 * server's per round. The image holds BM_NBD_MIB (default 512) MiB of data in 1 MiB extents with a hole
 * after each, in TMPDIR (TMPDIR=/dev/shm keeps the disk out of it). Every server announces multi-conn
 * (qemu-nbd with --shared=8), so nbdcopy uses its default 4 connections. Each server copies twice:
 * first as it starts (what a one-shot export costs, a JIT's warm-up included), then again (a
 * long-running server; into the export, over the clusters the first copy allocated).
 *
 * Then the client side: a mirror (to READY, as timedBlockJob) of BM_NBD_MIRROR_MIB (default 256: the
 * round trips every job makes at its start and end weigh less) MiB of data in 1 MiB extents into a
 * bitmirror export reached over TCP through a relay that adds 20 ms each way and lets each connection
 * have one TCP window (the kernel's socket buffer limit) unacknowledged, as a real link does
 * (test/support/delay-relay.ts), by bitmirror's nbd node (its default connections, and one connection
 * as QEMU's client has, which also gives the mirror QEMU's depth: what multi-conn and the depth per
 * connection bring) and by qemu-storage-daemon's, a fresh target each time, the same rounds. And memory: each server's VmRSS with 100 idle clients (handshake done,
 * no request) against its VmRSS before they came.
 *
 * BM_NBD_PARTS (comma-separated: nbdcopy, mirror, memory; default all) runs some parts only;
 * BM_NBD_LAYOUT=dense makes the data one contiguous run (no holes: a mirror's larger requests show).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as net from 'node:net';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnDaemon, type SpawnedDaemon } from '../src/daemon/spawn.js';
import { NbdClientConnection } from '../src/nbd/client.js';
import { cpuMeter, loadNow, median, pairedRatio, residentMiB, sh, spread, timedBlockJob, type Row, type Sample } from './support.js';

export const title = 'nbd: nbdcopy out of and into an export, bitmirror vs qemu-storage-daemon vs qemu-nbd';

type Server = 'bitmirror' | 'qemu-storage-daemon' | 'qemu-nbd';

interface Running {
  pid: number | undefined;
  uri: string;
  stop(): Promise<void>;
}

/** Clients of the memory measurement. */
const IDLE_CLIENTS = 100;

/**
 * Serve `image` (qcow2) as export `disk` with `server`, writable or not, on a unix socket or (`tcpPort`)
 * on 127.0.0.1; every server takes at least IDLE_CLIENTS + 1 clients at once.
 */
async function serve(server: Server, dir: string, image: string, writable: boolean, tcpPort?: number): Promise<Running> {
  const sock = path.join(dir, `${server}.nbd.sock`);
  await fsp.rm(sock, { force: true });
  const uri = `nbd+unix:///disk?socket=${sock}`;
  const addr = tcpPort === undefined ? `addr.type=unix,addr.path=${sock}` : `addr.type=inet,addr.host=127.0.0.1,addr.port=${tcpPort}`;
  if (server === 'qemu-nbd') {
    // --persistent: nbdcopy connects more than once (a probe, then its connections).
    const args = ['-f', 'qcow2', '-k', sock, '-x', 'disk', `--shared=${IDLE_CLIENTS + 8}`, '--persistent', ...(writable ? [] : ['-r']), image];
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
    '--nbd-server', `${addr},max-connections=${IDLE_CLIENTS + 8}`,
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
  const cpu = cpuMeter(r.pid);
  const t0 = process.hrtime.bigint();
  await sh('nbdcopy', args);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { seconds, cpu: cpu() };
}

/** A free TCP port on 127.0.0.1 (bound and released). */
async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

/** The 20 ms relay (a process of its own, as on another host) in front of 127.0.0.1:`target`; returns its port and a stop. */
async function startRelay(target: number): Promise<{ port: number; stop: () => void }> {
  const script = fileURLToPath(new URL('../test/support/delay-relay.js', import.meta.url));
  const proc = spawn(process.execPath, [script, '127.0.0.1', '0', '127.0.0.1', String(target), '20'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    proc.stdout!.on('data', (d: Buffer) => {
      out += String(d);
      const m = /listening (\d+)/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    proc.once('exit', () => reject(new Error('delay relay exited')));
  });
  return { port, stop: () => proc.kill('SIGTERM') };
}

/** Who mirrors over the link: bitmirror's nbd node (its default connections, or one as QEMU's client), or qemu-storage-daemon's. */
type Mirrorer = 'bitmirror' | 'bitmirror, 1 connection' | 'qemu-storage-daemon';

/**
 * One mirror through the 20 ms link: `who` mirrors `source` into a fresh qcow2 that a bitmirror
 * daemon exports over TCP, reached through the relay by the program's nbd node.
 */
async function mirrorOverLink(who: Mirrorer, dir: string, source: string, size: number): Promise<Sample> {
  const target = path.join(dir, 'mirror-target.qcow2');
  await fsp.rm(target, { force: true });
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(size)]);
  const port = await freePort();
  const exp = await serve('bitmirror', dir, target, true, port);
  const relay = await startRelay(port);
  try {
    const nbd = {
      driver: 'nbd',
      server: { type: 'inet', host: '127.0.0.1', port: String(relay.port) },
      export: 'disk',
      ...(who === 'bitmirror, 1 connection' ? { '__org.bitmirror_connections': 1 } : {}),
    };
    const program = who === 'qemu-storage-daemon' ? who : 'bitmirror';
    return await timedBlockJob(dir, { program, job: 'mirror', src: { file: source, format: 'qcow2' }, tgt: { file: '', format: 'raw', options: nbd } });
  } finally {
    relay.stop();
    await exp.stop();
  }
}

/** VmRSS of `server` exporting `image` before and with IDLE_CLIENTS clients connected (handshake done) and idle. */
async function idleMemory(server: Server, dir: string, image: string): Promise<{ before: number; idle: number }> {
  const r = await serve(server, dir, image, false);
  const clients: NbdClientConnection[] = [];
  try {
    // Settle after start-up (a first client, gone), then measure.
    await (await NbdClientConnection.open({ kind: 'unix', path: r.uri.split('socket=')[1] }, 'disk')).close();
    const before = residentMiB(r.pid);
    for (let i = 0; i < IDLE_CLIENTS; i++) clients.push(await NbdClientConnection.open({ kind: 'unix', path: r.uri.split('socket=')[1] }, 'disk'));
    return { before, idle: residentMiB(r.pid) };
  } finally {
    for (const c of clients) await c.close();
    await r.stop();
  }
}

export async function run(): Promise<Row[]> {
  const parts = new Set((process.env.BM_NBD_PARTS ?? 'nbdcopy,mirror,memory').split(',').map((p) => p.trim()));
  const mirrorMib = Number(process.env.BM_NBD_MIRROR_MIB ?? 256);
  // The mirror's source is cut from the same data: without nbdcopy only that much is needed.
  const mib = Number(process.env.BM_NBD_MIB ?? (parts.has('nbdcopy') ? Math.max(512, mirrorMib) : mirrorMib));
  const runs = Math.max(1, Number(process.env.BM_NBD_RUNS ?? 5));
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-bench-nbd-'));
  try {
    const servers: Server[] = ['bitmirror'];
    for (const s of ['qemu-storage-daemon', 'qemu-nbd'] as const) {
      if (await sh(s, ['--version']).then(() => true, () => false)) servers.push(s);
    }
    // The source: a raw file of random data (compressible data would flatter nobody), then a qcow2 of it
    // with a 1 MiB hole after every 1 MiB of data (BM_NBD_LAYOUT=dense: no holes, one contiguous run).
    const stride = process.env.BM_NBD_LAYOUT === 'dense' ? 1 : 2;
    const raw = path.join(dir, 'src.raw');
    const size = stride * mib * (1 << 20);
    await sh('qemu-img', ['create', '-q', '-f', 'raw', raw, String(size)]);
    const fh = await fsp.open(raw, 'r+');
    const chunk = Buffer.alloc(1 << 20);
    for (let i = 0; i < mib; i++) {
      for (let j = 0; j < chunk.length; j += 4) chunk.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, j);
      await fh.write(chunk, 0, chunk.length, i * stride * (1 << 20));
    }
    await fh.close();
    const image = path.join(dir, 'src.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);

    const samples: Record<string, Array<{ seconds: number; cpu: number }>> = {};
    const keep = (key: string, t: { seconds: number; cpu: number }) => (samples[key] ??= []).push(t);
    for (let i = 0; i < (parts.has('nbdcopy') ? runs : 0); i++) {
      for (const s of i % 2 ? [...servers].reverse() : servers) {
        const r = await serve(s, dir, image, false);
        try {
          keep(`${s} out`, await timed(r, [r.uri, 'null:']));
          keep(`${s} out again`, await timed(r, [r.uri, 'null:']));
        } finally {
          await r.stop();
        }
        const target = path.join(dir, 'target.qcow2');
        await fsp.rm(target, { force: true });
        await sh('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(size)]);
        const w = await serve(s, dir, target, true);
        try {
          keep(`${s} in`, await timed(w, [raw, w.uri]));
          keep(`${s} in again`, await timed(w, [raw, w.uri]));
        } finally {
          await w.stop();
        }
      }
    }
    // The client side: mirrors over the 20 ms link, alternating, in the same run.
    const mirrorSource = path.join(dir, 'mirror-src.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, mirrorSource]);
    await sh('qemu-img', ['resize', '-q', '-f', 'qcow2', '--shrink', mirrorSource, String(stride * mirrorMib * (1 << 20))]);
    // The mirroring daemon's peak memory: the depth a mirror keeps in flight is buffers.
    const mirrorPeak: Record<string, number[]> = {};
    const mirrorers: Mirrorer[] = ['bitmirror', 'bitmirror, 1 connection', ...(servers.includes('qemu-storage-daemon') ? (['qemu-storage-daemon'] as const) : [])];
    for (let i = 0; i < (parts.has('mirror') ? runs : 0); i++) {
      for (const p of i % 2 ? [...mirrorers].reverse() : mirrorers) {
        const m = await mirrorOverLink(p, dir, mirrorSource, stride * mirrorMib * (1 << 20));
        keep(`${p} mirror`, m);
        (mirrorPeak[p] ??= []).push(m.peakMiB);
      }
    }
    const memory: Array<{ server: Server; before: number; idle: number }> = [];
    for (const s of parts.has('memory') ? servers : []) memory.push({ server: s, ...(await idleMemory(s, dir, image)) });

    const rows: Row[] = [];
    const copyNames = {
      out: 'nbdcopy export -> null:',
      'out again': 'the same, again (a warm server)',
      in: 'nbdcopy raw -> export',
      'in again': 'the same, again (a warm server, allocated clusters)',
    };
    for (const dirn of parts.has('nbdcopy') ? (['out', 'out again', 'in', 'in again'] as const) : []) {
      const base = samples[`bitmirror ${dirn}`];
      for (const s of servers) {
        const t = samples[`${s} ${dirn}`];
        const rate = t.map((x) => mib / x.seconds);
        const ratio = pairedRatio(base.map((x) => x.seconds), t.map((x) => x.seconds));
        rows.push({
          copy: copyNames[dirn],
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
    const base = samples['bitmirror mirror'];
    for (const p of parts.has('mirror') ? mirrorers : []) {
      const t = samples[`${p} mirror`];
      const rate = t.map((x) => mirrorMib / x.seconds);
      const ratio = pairedRatio(base.map((x) => x.seconds), t.map((x) => x.seconds));
      rows.push({
        copy: 'mirror to READY into a bitmirror export over a 20 ms link (nbd node; CPU and peak: the mirroring daemon)',
        server: p,
        'data MiB': mirrorMib,
        'MiB/s': Math.round(median(rate)),
        'MiB/s range': spread(rate, 0),
        'server CPU s': median(t.map((x) => x.cpu)),
        'CPU range': spread(t.map((x) => x.cpu)),
        'peak MiB': Math.round(median(mirrorPeak[p])),
        'peak range': spread(mirrorPeak[p], 0),
        'bitmirror time ÷ this': p === 'bitmirror' ? '' : `${ratio.median.toFixed(2)} (${ratio.range}) ${ratio.verdict}`,
      });
    }
    for (const m of memory) {
      rows.push({ copy: `VmRSS MiB with ${IDLE_CLIENTS} idle clients (before them)`, server: m.server, 'data MiB': `${m.idle.toFixed(1)} (${m.before.toFixed(1)})`, 'MiB/s': '', 'server CPU s': '' });
    }
    rows.push({ copy: `load average ${loadNow()}, ${runs} rounds` });
    return rows;
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
}
