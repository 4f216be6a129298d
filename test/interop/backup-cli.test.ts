/**
 * `bitmirror backup`: a chain of one full and five incremental backups of a live disk, taken while a
 * writer keeps writing (and one run SIGKILLed half-way, then retried), each point restored and found
 * identical by qemu-img compare to the disk as it was at that point; incrementals read only dirty
 * extents; restores are thin. The file form, list, verify and restore on an image file.
 *
 * The disk as it was at a point: the writer writes one request at a time (each acknowledged before the
 * next), each with a pattern of its own, and logs them. A point-in-time backup therefore equals the disk
 * after exactly the first k writes, for one k between the writes acknowledged before the run started
 * and those issued before it ended. The test finds that k by replaying the log (every write changes
 * what it covers, so neighbouring states differ), writes that state to a raw reference image and lets
 * qemu-img compare it with the restored point. A backup that mixed two moments matches no k.
 *
 * Reads are counted where the disk's data lives: the disk is an nbdkit memory disk (behind the
 * daemon's nbd driver) with nbdkit's log filter, which logs every read. During an incremental run
 * every read must fall in a granule the chain's bitmap marked dirty when the run started or that the
 * writer wrote during the run.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { runCli, startCli, jsonLines } from '../support/cli.js';
import { mustRun, run } from '../support/tools.js';
import { io, KiB, MiB, poll, setup, type Env } from '../support/daemon.js';
import { rng } from '../support/random.js';

const haveNbdkit = await run('nbdkit', ['--version']).then((r) => r.code === 0);
const SIZE = 32 * MiB;
const GRAN = 64 * KiB;

interface Write {
  offset: number;
  length: number;
  /** The byte written, or 0 for a write of zeroes. */
  pattern: number;
  acked: boolean;
}

/** The writer: one write at a time on disk0 through HMP qemu-io, every write logged. */
class Writer {
  readonly log: Write[] = [];
  private stopping = false;
  private running: Promise<void> | undefined;
  private readonly rand = rng(19_2026);

  constructor(private readonly env: Env) {}

  /** One write: data of its own pattern, sometimes zeroes (a write of zeroes over data leaves it zero). */
  async writeOne(): Promise<void> {
    const offset = Math.floor(this.rand() * (SIZE / (4 * KiB) - 64)) * 4 * KiB;
    const length = (1 + Math.floor(this.rand() * 16)) * 4 * KiB;
    const zero = this.rand() < 0.15;
    const pattern = zero ? 0 : 1 + (this.log.length % 255);
    const w: Write = { offset, length, pattern, acked: false };
    this.log.push(w);
    await io(this.env, 'disk0', zero ? `write -z ${offset} ${length}` : `write -P ${pattern} ${offset} ${length}`);
    w.acked = true;
  }

  start(): void {
    this.stopping = false;
    this.running = (async () => {
      while (!this.stopping) {
        await this.writeOne();
        // A pace that leaves most of the disk clean between points (what an incremental is for).
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.running;
  }

  get acked(): number {
    return this.log.filter((w) => w.acked).length;
  }
}

/** The disk after the first k writes of the log. */
function stateAfter(log: Write[], k: number, initial: Buffer): Buffer {
  const disk = Buffer.from(initial);
  for (const w of log.slice(0, k)) disk.fill(w.pattern, w.offset, w.offset + w.length);
  return disk;
}

/** The k in [lo, hi] whose state equals `image`, or -1. */
function matchingPrefix(log: Write[], lo: number, hi: number, image: Buffer, initial: Buffer): number {
  const disk = stateAfter(log, lo, initial);
  for (let k = lo; ; k++) {
    if (disk.equals(image)) return k;
    if (k >= hi) return -1;
    const w = log[k];
    disk.fill(w.pattern, w.offset, w.offset + w.length);
  }
}

/** Granule indexes of a range list. */
function granules(ranges: Array<[number, number]>): Set<number> {
  const out = new Set<number>();
  for (const [off, len] of ranges) for (let g = Math.floor(off / GRAN); g * GRAN < off + len; g++) out.add(g);
  return out;
}

/** Reads nbdkit's log filter recorded (offset, count), from the log's text after `from` bytes. */
function readsIn(logText: string): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const m of logText.matchAll(/ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)/g)) out.push([parseInt(m[1], 16), parseInt(m[2], 16)]);
  return out;
}

async function cli(args: string[]): Promise<string> {
  const r = await runCli(args);
  assert.equal(r.code, 0, `bitmirror ${args.join(' ')}: exit ${r.code}: ${r.stderr}`);
  return r.stdout;
}

interface Chain {
  bitmap: string;
  points: Array<{ file: string; kind: string; copied: number; fileSize: number }>;
}

test('backup: a full and five incrementals of a live disk, one run killed and retried; every point restores to the disk at that point', { skip: !haveNbdkit && 'nbdkit not installed' }, async () => {
  const env = await setup('backup-cli');
  const nbdkitLog = env.f('nbdkit.log');
  const pidFile = env.f('nbdkit.pid');
  const nbdSock = env.f('nbdkit.sock');
  await mustRun('nbdkit', ['--pidfile', pidFile, '-U', nbdSock, '--filter=log', 'memory', String(SIZE), `logfile=${nbdkitLog}`]);
  await poll('nbdkit pid file', async () => /^\d+\s*$/.test(await fsp.readFile(pidFile, 'utf8').catch(() => '')));
  const writer = new Writer(env);
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'disk0', file: { driver: 'nbd', 'node-name': 'disk0-nbd', server: { type: 'unix', path: nbdSock }, export: '' } });
    const sock = env.d.socket;
    const dir = env.f('backups');
    const initial = Buffer.alloc(SIZE);
    // Some data first, and holes (never written) that a thin restore keeps.
    for (let i = 0; i < 20; i++) await writer.writeOne();
    const windows: Array<[number, number]> = [];
    const chainOf = async (): Promise<Chain> => JSON.parse(await fsp.readFile(path.join(dir, 'chain.json'), 'utf8')) as Chain;

    /** One run while the writer writes; returns the window of write counts the point must lie in. */
    const backupRun = async (extra: string[] = []): Promise<void> => {
      const lo = writer.acked;
      await cli(['backup', '--qmp', sock, '--progress', 'json', ...extra, 'disk0', dir]);
      windows.push([lo, writer.log.length]);
    };

    writer.start();
    await backupRun();
    for (let n = 1; n <= 5; n++) {
      // Let the writer dirty some of the disk between points.
      const target = writer.log.length + 15;
      await poll('writes between points', () => Promise.resolve(writer.log.length >= target));
      // The reads of this run (and of a killed one before it): what nbdkit logs from here on. The
      // dirty set when they start: the chain's bitmap now (bitmap show), plus whatever the writer
      // writes until the run ends.
      const chain = await chainOf();
      const firstWrite = writer.log.length;
      const dirtyBefore = JSON.parse(await cli(['bitmap', 'show', '--qmp', sock, 'disk0', chain.bitmap, '--json'])) as { extents: Array<{ offset: number; length: number }>; dirty: number };
      const logFrom = (await fsp.stat(nbdkitLog)).size;
      if (n === 3) {
        // A run killed half-way (slowed down so that it is still copying): the next run retries.
        const killed = startCli(['backup', '--qmp', sock, '--progress', 'json', '--speed', '64K', 'disk0', dir]);
        await killed.waitStdout(/"type":"progress","phase":"point 3 \(incremental\)","done":[1-9]/);
        killed.proc.kill('SIGKILL');
        await killed.exited;
        assert.equal((await chainOf()).points.length, 3, 'the killed run added no point');
      }
      await backupRun();
      const lastWrite = writer.log.length;
      const reads = readsIn((await fsp.readFile(nbdkitLog, 'utf8')).slice(logFrom));
      const allowed = granules(dirtyBefore.extents.map((e) => [e.offset, e.length]));
      for (const w of writer.log.slice(firstWrite - 1, lastWrite)) for (const g of granules([[w.offset, w.length]])) allowed.add(g);
      for (const [off, len] of reads) {
        for (const g of granules([[off, len]])) assert.ok(allowed.has(g), `point ${n} read granule ${g} (offset ${off}), which was not dirty`);
      }
      const readBytes = reads.reduce((s, [, len]) => s + len, 0);
      const point = (await chainOf()).points[n];
      assert.equal(point.kind, 'incremental');
      assert.ok(point.copied >= dirtyBefore.dirty, `point ${n} copied ${point.copied}, less than the ${dirtyBefore.dirty} dirty bytes at its start`);
      assert.ok(point.copied <= allowed.size * GRAN, `point ${n} copied ${point.copied}, more than the ${allowed.size * GRAN} dirty bytes`);
      assert.ok(readBytes <= allowed.size * GRAN && readBytes < SIZE / 2, `point ${n} read ${readBytes} bytes (${reads.length} reads, ${granules(reads).size} granules) of ${allowed.size} dirty granules`);
    }
    await writer.stop();
    // The chain's bitmap is the only one left on the disk.
    const nodes = await env.d.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes', { flat: true });
    assert.deepEqual(nodes.find((x) => x['node-name'] === 'disk0')?.['dirty-bitmaps']?.map((b) => b.name), [(await chainOf()).bitmap]);
    assert.deepEqual(nodes.map((x) => x['node-name']).sort(), ['disk0', 'disk0-nbd']);
    assert.deepEqual(await env.d.qmp.execute('query-jobs'), []);

    const list = (await cli(['backup', 'list', dir])).trimEnd().split('\n');
    assert.equal(list.length, 6);
    list.forEach((line, n) => assert.match(line, new RegExp(`^${n}  \\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z  ${n === 0 ? 'full       ' : 'incremental'}  size .*B  copied .*B  ${n}\\.qcow2$`)));
    assert.equal(JSON.parse((await cli(['backup', 'verify', dir, '--progress', 'json'])).trim().split('\n').pop()!).status, 'verified');

    for (let n = 0; n <= 5; n++) {
      const restored = env.f(`restored-${n}.raw`);
      await cli(['backup', 'restore', '--at', String(n), '--progress', 'none', dir, restored]);
      const image = await fsp.readFile(restored);
      const [lo, hi] = windows[n];
      const k = matchingPrefix(writer.log, lo, hi, image, initial);
      assert.notEqual(k, -1, `point ${n} equals the disk after no number of writes in [${lo}, ${hi}]`);
      const reference = env.f(`reference-${n}.raw`);
      await fsp.writeFile(reference, stateAfter(writer.log, k, initial));
      const cmp = await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', reference, restored]);
      assert.match(cmp, /Images are identical/);
      // Thin: where the disk has holes (granules nobody wrote, until the run ended: a write during
      // the run makes the backup copy the old data, zeroes included), the restored image has holes too.
      const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', '-f', 'raw', restored])) as Array<{ start: number; length: number; data: boolean }>;
      const written = granules(writer.log.slice(0, hi).map((w) => [w.offset, w.length]));
      for (const e of map.filter((x) => x.data)) {
        for (let g = Math.floor(e.start / GRAN); g * GRAN < e.start + e.length; g++) assert.ok(written.has(g), `point ${n}: data at granule ${g}, where nobody wrote`);
      }
      assert.ok(map.some((x) => !x.data), `point ${n} restored with no hole`);
    }
  } finally {
    await writer.stop();
    const pid = Number((await fsp.readFile(pidFile, 'utf8').catch(() => '0')).trim());
    await env.done();
    if (pid) process.kill(pid, 'SIGTERM');
  }
});

test('backup of an image file: full, incremental, list, verify finds damage, restore --at, a run that fails changes nothing', async () => {
  const env = await setup('backup-file');
  try {
    const disk = env.f('disk.qcow2');
    const dir = env.f('b');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', disk, '8M']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 5M 64k', disk]);
    await cli(['backup', '--progress', 'none', disk, dir]);
    await mustRun('qemu-img', ['convert', '-O', 'raw', disk, env.f('ref0.raw')]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 3 512k 64k', '-c', 'write -z 5M 64k', '-c', 'write -P 4 7M 4k', disk]);
    const out = jsonLines(await cli(['backup', '--progress', 'json', disk, dir]));
    const result = out.find((l) => l.type === 'result')!;
    assert.deepEqual([result.point, result.kind, result.copied], [1, 'incremental', 3 * 64 * KiB]);
    await mustRun('qemu-img', ['convert', '-O', 'raw', disk, env.f('ref1.raw')]);
    // The image keeps one bitmap, the chain's, persistent and empty (nothing written since).
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', disk])) as { 'format-specific': { data: { bitmaps: Array<{ name: string; flags: string[] }> } } };
    assert.deepEqual(info['format-specific'].data.bitmaps.map((b) => b.flags), [['auto']]);
    for (const n of [0, 1]) {
      await cli(['backup', 'restore', '--at', String(n), '--progress', 'none', dir, env.f(`r${n}.raw`)]);
      assert.match(await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', env.f(`ref${n}.raw`), env.f(`r${n}.raw`)]), /Images are identical/);
    }
    await cli(['backup', 'restore', '--format', 'qcow2', '--progress', 'none', dir, env.f('r.qcow2')]);
    assert.match(await mustRun('qemu-img', ['compare', '-F', 'raw', env.f('r.qcow2'), env.f('ref1.raw')]), /Images are identical/);
    // The qcow2 restore is thin: 1 MiB + 64k + 64k + 4k (in 64 KiB clusters) allocated, not 8 MiB.
    const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', env.f('r.qcow2')])) as Array<{ length: number; data: boolean }>;
    assert.ok(map.filter((e) => e.data).reduce((s, e) => s + e.length, 0) <= 1 * MiB + 3 * 64 * KiB);
    // A damaged image: verify says which, and backup --verify refuses to extend the chain.
    const before = await fsp.readFile(path.join(dir, 'chain.json'), 'utf8');
    const fh = await fsp.open(path.join(dir, '1.qcow2'), 'r+');
    await fh.write(Buffer.from([0x5a]), 0, 1, (await fh.stat()).size - 100);
    await fh.close();
    const verify = await runCli(['backup', 'verify', '--progress', 'none', dir]);
    assert.equal(verify.code, 3);
    assert.match(verify.stderr, /point 1: 1\.qcow2 does not match its checksum/);
    const refused = await runCli(['backup', '--verify', '--progress', 'none', disk, dir]);
    assert.equal(refused.code, 3);
    assert.equal(await fsp.readFile(path.join(dir, 'chain.json'), 'utf8'), before);
    const bad = await runCli(['backup', 'restore', '--at', '7', dir, env.f('x.raw')]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /no point 7: the chain has points 0 to 1/);
  } finally {
    await env.done();
  }
});

test('backup: Ctrl-C cancels a run cleanly (exit 130), the chain and its bitmap stay as they were, the next run takes the point', async () => {
  const env = await setup('backup-sigint');
  try {
    const img = env.f('d.qcow2');
    const dir = env.f('b');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', img, '8M']);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
    const sock = env.d.socket;
    await io(env, 'disk0', 'write -P 7 0 1M');
    await cli(['backup', '--qmp', sock, '--progress', 'none', 'disk0', dir]);
    await io(env, 'disk0', 'write -P 8 2M 4M');
    const chainBefore = await fsp.readFile(path.join(dir, 'chain.json'), 'utf8');
    const run = startCli(['backup', '--qmp', sock, '--progress', 'json', '--speed', '256K', 'disk0', dir]);
    await run.waitStdout(/"type":"progress","phase":"point 1 \(incremental\)","done":[1-9]/);
    run.proc.kill('SIGINT');
    assert.equal(await run.exited, 130);
    assert.match(run.stderr(), /cancelled: the chain and its bitmap are as they were/);
    assert.equal(await fsp.readFile(path.join(dir, 'chain.json'), 'utf8'), chainBefore);
    assert.deepEqual((await fsp.readdir(dir)).sort(), ['0.qcow2', 'chain.json']);
    const chain = JSON.parse(chainBefore) as Chain;
    const nodes = await env.d.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; count: number }> }>>('query-named-block-nodes', { flat: true });
    assert.deepEqual(nodes.filter((x) => x['node-name'].startsWith('bitmirror-backup-')), [], 'the run closed its nodes');
    const bitmapsNow = nodes.find((x) => x['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? [];
    assert.deepEqual(bitmapsNow.map((b) => [b.name, b.count]), [[chain.bitmap, 4 * MiB]], 'the chain bitmap still marks the 4 MiB written');
    assert.deepEqual(await env.d.qmp.execute('query-jobs'), []);
    await cli(['backup', '--qmp', sock, '--progress', 'none', 'disk0', dir]);
    await cli(['backup', 'restore', '--progress', 'none', dir, env.f('r.raw')]);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'disk0' });
    assert.match(await mustRun('qemu-img', ['compare', '-F', 'raw', img, env.f('r.raw')]), /Images are identical/);
  } finally {
    await env.done();
  }
});

test('backup --pull: a full and two incrementals read over NBD from a fleecing export while writes go on; each point restores to the disk at that point', async () => {
  const env = await setup('backup-pull');
  const writer = new Writer(env);
  try {
    const img = env.f('d.qcow2');
    const dir = env.f('b');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', img, String(SIZE)]);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
    const sock = env.d.socket;
    for (let i = 0; i < 20; i++) await writer.writeOne();
    const windows: Array<[number, number]> = [];
    writer.start();
    for (let n = 0; n < 3; n++) {
      const target = writer.log.length + 15;
      await poll('writes between points', () => Promise.resolve(writer.log.length >= target));
      const lo = writer.acked;
      const out = jsonLines(await cli(['backup', '--pull', '--qmp', sock, '--progress', 'json', 'disk0', dir]));
      windows.push([lo, writer.log.length]);
      assert.equal(out.find((l) => l.type === 'result')?.kind, n === 0 ? 'full' : 'incremental');
    }
    await writer.stop();
    // Nothing of the pull is left in the daemon: no scratch, filter, export, server, job or extra bitmap.
    const nodes = await env.d.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes', { flat: true });
    assert.deepEqual(nodes.filter((x) => x['node-name'].startsWith('bitmirror-')), []);
    assert.deepEqual(nodes.find((x) => x['node-name'] === 'disk0')?.['dirty-bitmaps']?.map((b) => b.name), [(JSON.parse(await fsp.readFile(path.join(dir, 'chain.json'), 'utf8')) as Chain).bitmap]);
    assert.deepEqual(await env.d.qmp.execute('query-block-exports'), []);
    assert.deepEqual((await fsp.readdir(dir)).sort(), ['0.qcow2', '1.qcow2', '2.qcow2', 'chain.json']);
    for (let n = 0; n < 3; n++) {
      const restored = env.f(`r${n}.raw`);
      await cli(['backup', 'restore', '--at', String(n), '--progress', 'none', dir, restored]);
      const [lo, hi] = windows[n];
      const k = matchingPrefix(writer.log, lo, hi, await fsp.readFile(restored), Buffer.alloc(SIZE));
      assert.notEqual(k, -1, `point ${n} equals the disk after no number of writes in [${lo}, ${hi}]`);
      await fsp.writeFile(env.f(`ref${n}.raw`), stateAfter(writer.log, k, Buffer.alloc(SIZE)));
      assert.match(await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', env.f(`ref${n}.raw`), restored]), /Images are identical/);
    }
  } finally {
    await writer.stop();
    await env.done();
  }
});
