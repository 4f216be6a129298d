/**
 * The cost of write-intent tracking for persistent bitmaps (issue 14, qcow2/write-intent.ts), in the
 * same run: the same writes into a fresh 1 GiB qcow2 image with one enabled persistent bitmap (64 KiB
 * granularity), once with the bitmap loaded from the image (write-intent armed: the first write to
 * each region waits for a durable header write, unless a sequential writer found it marked ahead),
 * once the same without marking ahead, once with that write made durable the old way (write +
 * fdatasync of the whole file, as where pwritev2 RWF_DSYNC is missing), and once with the bitmap
 * added after open (the same marking in memory, no record). In-process Core (graph + bitmap
 * manager + the load/store hooks).
 *
 *   seq write   1 GiB in 1 MiB requests, 16 in flight (allocating)
 *   4k write    65536 requests of 4 KiB, 16 in flight, scattered (offset k*STRIDE mod size)
 *
 * Goals: ≤ 5 % sequential, ≤ 15 % random 4 KiB. Cache: O_DIRECT (when the file system allows it)
 * and the page cache; each side is the median of REPEAT alternating runs.
 * Runs alone as `node dist/bench/bitmaps.js`.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Core } from '../src/core/core.js';
import { BLOCK_DRIVERS } from '../src/daemon/drivers.js';
import type { BlockNode } from '../src/block/node.js';
import { nativeAddon } from '../src/block/native.js';
import { sh, type Row } from './support.js';

export const title = 'persistent bitmaps: write-intent tracking on vs off (1 GiB qcow2, depth 16)';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const SIZE = GiB;
const DEPTH = 16;
const SMALL = 4096;
const SMALL_OPS = 65536;
const STRIDE = 257 * SMALL;
/** Runs per side and case (BM_BENCH_REPEAT). */
const REPEAT = Number(process.env.BM_BENCH_REPEAT ?? 3);


/** `count` requests, DEPTH at a time: seconds in all, and per-request latencies in ms. */
async function timed(count: number, op: (i: number) => Promise<unknown>): Promise<{ s: number; lat: number[] }> {
  let next = 0;
  const lat: number[] = [];
  const t0 = process.hrtime.bigint();
  const worker = async () => {
    while (next < count) {
      const i = next++;
      const a = process.hrtime.bigint();
      await op(i);
      lat.push(Number(process.hrtime.bigint() - a) / 1e6);
    }
  };
  await Promise.all(Array.from({ length: DEPTH }, worker));
  return { s: Number(process.hrtime.bigint() - t0) / 1e9, lat: lat.sort((x, y) => x - y) };
}

/**
 * off: no record; on: the record, each update one RWF_DSYNC write, regions marked ahead of
 * sequential writers; on-no-ahead: the same without marking ahead; on-fdatasync: each update a
 * write + fdatasync.
 */
type Side = 'off' | 'on' | 'on-no-ahead' | 'on-fdatasync';

interface Result {
  s: number;
  lat: number[];
  /** The write-intent record's counts (WriteIntentRecord.counts), when armed. */
  counts?: { recordWrites: number; waitingWrites: number };
}

async function session(file: string, direct: boolean, side: Side, work: (n: BlockNode) => Promise<{ s: number; lat: number[] }>): Promise<Result> {
  const intent = side !== 'off';
  await fsp.rm(file, { force: true });
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(SIZE)]);
  if (intent) await sh('qemu-img', ['bitmap', '--add', '-g', '65536', file, 'b0']);
  const core = new Core();
  for (const d of BLOCK_DRIVERS) core.graph.registerDriver(d);
  const n = await core.openForMonitor({ driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: file, cache: { direct } } });
  if (!intent) await core.bitmaps.add(n, 'b0', { persistent: true, granularity: 65536 });
  // The file driver's fallback when the kernel refuses RWF_DSYNC (a private switch, poked for the bench).
  if (side === 'on-fdatasync') (n.child('file')!.node as unknown as { canDsyncWrite: boolean }).canDsyncWrite = false;
  const record = (n as unknown as { writeIntent?: { lookAhead: boolean; counts: Result['counts'] } }).writeIntent;
  if (side === 'on-no-ahead') record!.lookAhead = false;
  const r = await work(n);
  const counts = record?.counts && { ...record.counts };
  await core.shutdown();
  return { ...r, counts };
}

export async function run(): Promise<Row[]> {
  const base = process.env.BM_BENCH_DIR ?? os.tmpdir();
  const dir = await fsp.mkdtemp(path.join(base, 'bm-bench-bitmaps-'));
  const rows: Row[] = [];
  try {
    const file = path.join(dir, 'b.qcow2');
    // O_DIRECT (what VMs use: cache=none) when the file system allows it, and the page cache too.
    await fsp.writeFile(path.join(dir, 'probe'), Buffer.alloc(4096));
    const directWorks = await sh('qemu-io', ['-t', 'none', '-f', 'raw', '-c', 'read 0 4k', path.join(dir, 'probe')]).then(
      () => true,
      () => false,
    );
    const aligned = (n: number, fill: number) => (nativeAddon()?.alignedBuffer(n, 4096) ?? Buffer.alloc(n)).fill(fill);
    const seqBuf = aligned(MiB, 0x5a);
    const smallBuf = aligned(SMALL, 0xa5);
    const cases: Array<[string, number, number, (n: BlockNode) => Promise<{ s: number; lat: number[] }>]> = [
      ['seq write 1 GiB (1 MiB)', SIZE / MiB, SIZE, (n) => timed(SIZE / MiB, (i) => n.write(i * MiB, seqBuf))],
      ['4k write, scattered', SMALL_OPS, SMALL_OPS * SMALL, (n) => timed(SMALL_OPS, (i) => n.write((i * STRIDE) % SIZE, smallBuf))],
    ];
    for (const direct of directWorks ? [true, false] : [false])
      for (const [name, ops, bytes, work] of cases) {
        // Alternating runs, the median of each side: the machine's noise hits both alike.
        const offs: Result[] = [];
        const ons: Result[] = [];
        const noAheads: Result[] = [];
        const syncs: Result[] = [];
        for (let k = 0; k < REPEAT; k++) {
          offs.push(await session(file, direct, 'off', work));
          ons.push(await session(file, direct, 'on', work));
          noAheads.push(await session(file, direct, 'on-no-ahead', work));
          syncs.push(await session(file, direct, 'on-fdatasync', work));
        }
        const median = (xs: Result[]) => [...xs].sort((a, b) => a.s - b.s)[Math.floor(xs.length / 2)];
        const off = median(offs);
        const on = median(ons);
        const sync = median(syncs);
        const noAhead = median(noAheads);
      const pct = (p: number, l: number[]) => l[Math.min(l.length - 1, Math.floor(p * l.length))];
      rows.push({
        name,
        cache: direct ? 'none (O_DIRECT)' : 'writeback',
        ops,
        'off MiB/s': bytes / MiB / off.s,
        'on MiB/s': bytes / MiB / on.s,
        'off avg ms': off.lat.reduce((a, b) => a + b, 0) / off.lat.length,
        'on avg ms': on.lat.reduce((a, b) => a + b, 0) / on.lat.length,
        'off p99 ms': pct(0.99, off.lat),
        'on p99 ms': pct(0.99, on.lat),
        'cost % (time)': ((on.s - off.s) / off.s) * 100,
        'no look-ahead MiB/s': bytes / MiB / noAhead.s,
        'no look-ahead cost %': ((noAhead.s - off.s) / off.s) * 100,
        // Independent of the machine's load: how often a write waited for a record write.
        'on record writes': on.counts?.recordWrites ?? 0,
        'on waiting writes': on.counts?.waitingWrites ?? 0,
        'no look-ahead record writes': noAhead.counts?.recordWrites ?? 0,
        'no look-ahead waiting writes': noAhead.counts?.waitingWrites ?? 0,
        'fdatasync MiB/s': bytes / MiB / sync.s,
        'fdatasync cost %': ((sync.s - off.s) / off.s) * 100,
      });
    }
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
  return rows;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  run().then(
    (rows) => {
      for (const r of rows) process.stdout.write(`${JSON.stringify(r)}\n`);
    },
    (err: unknown) => {
      process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
      process.exit(1);
    },
  );
}
