/**
 * `bitmirror backup DISK DIR`: full, then incremental backups of a disk into a qcow2 chain in DIR
 * (backup-chain.ts), and `backup list|restore|verify DIR`.
 *
 * A run takes one point with one QMP transaction: blockdev-backup of the disk into the new point's
 * image (sync=full for the first point, else sync=bitmap with the chain's bitmap and bitmap-mode
 * never: the chain's bitmap is read and left as it is) and, at the same instant, a new bitmap that
 * records every change after this point. Only when the job has completed and the image is flushed
 * does the manifest (rewritten atomically) take the point and name the new bitmap; then the old
 * bitmap goes. A run that fails, is cancelled (Ctrl-C) or killed at any moment before the manifest
 * is replaced leaves the chain and the chain's bitmap exactly as they were (the old bitmap was never
 * changed, and kept recording); the next run removes what that run left (its bitmap, its nodes and
 * job in a running daemon, its image) and takes the point again. Nothing is lost: at worst a point is
 * copied twice.
 *
 * DISK is an image file (an embedded daemon opens it; the bitmaps are persistent in a qcow2 image) or,
 * with --qmp SOCKET, a node of a running daemon (which must see DIR: it writes the images).
 * `restore` writes a point through its chain into a new image (raw, or qcow2 by --format) or a block
 * device, thin: the mirror copies only what the chain holds, holes stay holes.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { errorMessage, QmpError } from '../errors.js';
import { CliError, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, exitCodeForSignal, usageError } from './exit-codes.js';
import { Session, type ImageNodes } from './session.js';
import { chooseProgressMode, formatBytes, Progress } from './progress.js';
import { runJob, type JobOutcome } from './job-runner.js';
import { SignalWatch } from './signals.js';
import { parseArgs, type OptionSpec } from './args.js';
import { parseRate } from './copy.js';
import { NBD_CMD } from '../nbd/protocol.js';
import { dirtyRanges, NbdAccess, type Range } from './nbd-access.js';
import { chainPrefix, loadChain, MANIFEST, newChain, pointAt, saveChain, sha256File, syncPath, verifyChain, type BackupChain, type BackupPoint } from './backup-chain.js';

export const BACKUP_USAGE = `Usage: bitmirror backup [options] DISK DIR
       bitmirror backup list DIR
       bitmirror backup restore [--at N] [--format raw|qcow2] DIR DST
       bitmirror backup verify DIR
Back DISK up into the folder DIR: the first run takes a full backup, each next run an incremental one
(only what changed since the last point), as a chain of qcow2 images with a manifest (chain.json).
A failed, cancelled or killed run leaves the chain as it was; the next run takes the point again.

  DISK            an image file (opened by an embedded daemon), or with --qmp a node name
  --qmp SOCKET    a running daemon's QMP socket (unix path or HOST:PORT); it writes DIR's images
  --verify        check the chain's images against their checksums first (refuse to extend a damaged chain)
  --pull          with --qmp: read the point over NBD from the daemon (a fleecing export with the dirty
                  bitmap's extents) and write the images here, instead of the daemon's backup job
  --speed RATE    limit the copy to RATE bytes per second (K, M, G suffixes)
  --progress MODE auto (a bar on a terminal, JSON lines otherwise), bar, json or none

  list            the points, one a line, numbered from 0 (the full backup): time, image size, bytes copied
  restore         write point N (default: the newest) to DST, a new image file or a block device, thin
  verify          check every image of the chain against its checksum

Exit codes: 0 done, 1 failed (the chain is as it was), 2 bad arguments (nothing done), 3 verify found
damage, 130 cancelled by Ctrl-C (143 SIGTERM).
`;

const OPTIONS: Record<string, OptionSpec> = {
  help: { value: false, short: '-h' },
  qmp: { value: true },
  verify: { value: false },
  pull: { value: false },
  speed: { value: true },
  progress: { value: true },
  at: { value: true },
  format: { value: true },
  json: { value: false },
};

export async function backupMain(argv: string[]): Promise<number> {
  let progress: Progress | undefined;
  try {
    const { positional, options } = parseArgs(argv, OPTIONS);
    if (options.has('help')) {
      process.stdout.write(BACKUP_USAGE);
      return EXIT_OK;
    }
    progress = new Progress(chooseProgressModeOrUsage(options.get('progress') as string | undefined));
    const [first, ...rest] = positional;
    const only = (sub: string, allowed: string[]) => {
      for (const k of options.keys()) if (!allowed.includes(k)) throw usageError(`${sub} takes no option --${k}`);
    };
    switch (first) {
      case 'list':
        only('list', ['json']);
        if (rest.length !== 1) throw usageError('list expects DIR');
        return await listPoints(rest[0], options.has('json'));
      case 'verify':
        only('verify', ['progress']);
        if (rest.length !== 1) throw usageError('verify expects DIR');
        return await verifyCommand(rest[0], progress);
      case 'restore': {
        only('restore', ['at', 'format', 'progress']);
        if (rest.length !== 2) throw usageError('restore expects DIR and DST');
        const at = options.get('at') as string | undefined;
        if (at !== undefined && !/^\d+$/.test(at)) throw usageError(`--at: '${at}' is not a point number`);
        const format = (options.get('format') as string | undefined) ?? 'raw';
        if (format !== 'raw' && format !== 'qcow2') throw usageError(`--format must be raw or qcow2 (not '${format}')`);
        return await restore(rest[0], rest[1], { at: at === undefined ? undefined : Number(at), format, progress });
      }
      default: {
        only('backup', ['qmp', 'verify', 'pull', 'speed', 'progress']);
        if (options.has('pull') && !options.has('qmp')) throw usageError('--pull reads from a running daemon: give --qmp SOCKET');
        if (options.has('pull') && options.has('speed')) throw usageError('--speed limits the backup job: not with --pull');
        if (positional.length !== 2) throw usageError(`expected DISK and DIR, got ${positional.length} argument${positional.length === 1 ? '' : 's'}`);
        const speed = options.get('speed') as string | undefined;
        return await takeBackup({ disk: positional[0], dir: positional[1], qmp: options.get('qmp') as string | undefined, verify: options.has('verify'), pull: options.has('pull'), speed, progress });
      }
    }
  } catch (err) {
    progress?.endBar();
    process.stderr.write(`bitmirror backup: ${errorMessage(err)}\n`);
    if (err instanceof CliError) return err.exitCode;
    if (err instanceof QmpError) return EXIT_USAGE;
    return 1;
  }
}

function chooseProgressModeOrUsage(mode: string | undefined): ReturnType<typeof chooseProgressMode> {
  try {
    return chooseProgressMode(mode);
  } catch (err) {
    throw usageError(errorMessage(err));
  }
}

// ---- taking a point -------------------------------------------------------------------------------

interface BackupOptions {
  disk: string;
  dir: string;
  qmp?: string;
  verify: boolean;
  pull: boolean;
  speed?: string;
  progress: Progress;
}

/** What a completed run reports. */
export interface BackupResult {
  status: 'completed';
  point: number;
  kind: BackupPoint['kind'];
  file: string;
  copied: number;
  fileSize: number;
}

async function takeBackup(opts: BackupOptions): Promise<number> {
  const dir = path.resolve(opts.dir);
  await fsp.mkdir(dir, { recursive: true });
  const loaded = await loadChain(dir);
  if (loaded && opts.verify) {
    const problems = await verifyChain(dir, loaded);
    if (problems.length > 0) throw new CliError(`the chain in ${opts.dir} is damaged, not extending it: ${problems.join('; ')}`, EXIT_VERIFY);
  }
  const speed = opts.speed === undefined ? undefined : parseRate(opts.speed);
  const signals = new SignalWatch();
  let session: Session | undefined;
  let target: ImageNodes | undefined;
  let newBitmap: { node: string; name: string } | undefined;
  let outcome: JobOutcome | undefined;
  const fileForm = opts.qmp === undefined;
  try {
    session = await Session.open({ qmp: opts.qmp, signals });
    const s = session;
    let node: string;
    if (fileForm) {
      const disk = path.resolve(opts.disk);
      await fsp.access(disk).catch(() => {
        throw usageError(`cannot open '${opts.disk}': No such file or directory`);
      });
      node = (await s.openImage(disk, 'disk')).node;
    } else node = opts.disk;
    const info = await s.nodeSummary(node);
    const chain = loaded ?? newChain(opts.disk, info.virtualSize);
    if (chain.size !== info.virtualSize) {
      throw usageError(`'${opts.disk}' is ${info.virtualSize} bytes, the chain in ${opts.dir} backs up ${chain.size} bytes: another disk? (use another DIR)`);
    }
    const prefix = chainPrefix(chain);
    if (!fileForm) await removeLeftovers(s, prefix);
    // What a killed run left on the disk: bitmaps of this chain the manifest does not name.
    for (const b of info.bitmaps) {
      if (b.name.startsWith(`${prefix}-`) && b.name !== chain.bitmap) await s.qmp.execute('block-dirty-bitmap-remove', { node, name: b.name });
    }
    const current = info.bitmaps.find((b) => b.name === chain.bitmap);
    const n = chain.points.length;
    // Incremental when the chain has a point and its bitmap is there and usable; otherwise a full
    // backup (the first point, or a new base when the bitmap is gone: the disk changed in unknown ways).
    const incremental = n > 0 && current !== undefined && !current.inconsistent;
    if (n > 0 && !incremental) {
      const why = current === undefined ? `the chain's bitmap ${chain.bitmap ?? ''} is not on the disk` : `the chain's bitmap ${current.name} is inconsistent`;
      opts.progress.message(`${why}: taking a full backup as point ${n}`);
    }
    signals.throwIfSignalled();

    const file = `${n}.qcow2`;
    const filename = path.join(dir, file);
    // An image of this number is what a failed or killed run left: never part of the chain.
    await fsp.rm(filename, { force: true });
    const bitmapName = `${prefix}-${n}`;
    const granularity = current?.granularity ?? 64 * 1024;
    let pointTime = new Date();
    let copied: number;
    if (opts.pull) {
      const pulled = await pullPoint(s, {
        node,
        size: info.virtualSize,
        persistent: info.driver === 'qcow2',
        chainBitmap: incremental ? chain.bitmap : undefined,
        backingFile: incremental ? chain.points[n - 1].file : undefined,
        granularity,
        bitmapName,
        filename,
        prefix,
        progress: opts.progress,
        signals,
        phase: incremental ? `point ${n} (incremental, pull)` : `point ${n} (full, pull)`,
        onBitmap: (b) => (newBitmap = b),
      });
      copied = pulled.copied;
      pointTime = pulled.time;
    } else {
      target = await s.createImage(filename, `${prefix}-${n}`, {
        format: 'qcow2',
        size: info.virtualSize,
        clusterSize: 64 * 1024,
        backingFile: incremental ? chain.points[n - 1].file : undefined,
        backingFormat: incremental ? 'qcow2' : undefined,
      });
      const jobId = `${prefix}-job-${n}`;
      const backupArgs: Record<string, unknown> = {
        'job-id': jobId,
        device: node,
        target: target.node,
        sync: incremental ? 'bitmap' : 'full',
        'auto-dismiss': false,
        ...(incremental ? { bitmap: chain.bitmap, 'bitmap-mode': 'never' } : {}),
        ...(speed !== undefined ? { speed } : {}),
      };
      outcome = await runJob(s.qmp, {
        id: jobId,
        phase: incremental ? `point ${n} (incremental)` : `point ${n} (full)`,
        progress: opts.progress,
        signals,
        start: async () => {
          // One instant: the point, and the bitmap that records every change after it.
          await s.qmp.execute('transaction', {
            actions: [
              { type: 'block-dirty-bitmap-add', data: { node, name: bitmapName, persistent: info.driver === 'qcow2', granularity } },
              { type: 'blockdev-backup', data: backupArgs },
            ],
          });
          newBitmap = { node, name: bitmapName };
          pointTime = new Date();
        },
      });
      if (outcome.status === 'interrupted') throw new CliError('cancelled: the chain and its bitmap are as they were', exitCodeForSignal(outcome.signal ?? 'SIGINT'));
      if (outcome.status === 'failed') throw new CliError(`the backup failed: ${outcome.error ?? 'unknown error'}; the chain and its bitmap are as they were`);

      // The image is complete: close it (written back), make it durable, then commit the point.
      await s.closeImage(target);
      target = undefined;
      copied = outcome.done;
    }
    await syncPath(filename);
    const st = await fsp.stat(filename);
    const point: BackupPoint = { file, time: pointTime.toISOString(), kind: incremental ? 'incremental' : 'full', fileSize: st.size, copied, sha256: await sha256File(filename) };
    const oldBitmap = chain.bitmap;
    chain.points.push(point);
    chain.bitmap = bitmapName;
    await saveChain(dir, chain);
    newBitmap = undefined; // the chain's bitmap now
    if (oldBitmap !== undefined && current !== undefined) await s.qmp.execute('block-dirty-bitmap-remove', { node, name: oldBitmap }).catch(() => undefined);
    const problems = await s.close();
    session = undefined;
    if (problems.length > 0) throw new CliError(`point ${n} is taken, but closing failed: ${problems.join('; ')}`);
    const result: BackupResult = { status: 'completed', point: n, kind: point.kind, file: filename, copied: point.copied, fileSize: point.fileSize };
    opts.progress.result({ ...result }, `point ${n} (${point.kind}): ${formatBytes(point.copied)} copied into ${path.join(opts.dir, file)} (${formatBytes(point.fileSize)})`);
    return signals.signal ? exitCodeForSignal(signals.signal) : EXIT_OK;
  } catch (err) {
    // Undo this run: its bitmap, its image; the chain (manifest, images, bitmap) is untouched.
    if (session) {
      const s = session;
      if (newBitmap) await s.qmp.execute('block-dirty-bitmap-remove', newBitmap).catch(() => undefined);
      if (target) await s.closeImage(target).catch(() => undefined);
      await s.close().catch(() => undefined);
      if (target) await fsp.rm(target.filename, { force: true });
    }
    if (err instanceof CliError || err instanceof QmpError) throw err;
    if (signals.signal) throw new CliError('cancelled: the chain and its bitmap are as they were', exitCodeForSignal(signals.signal));
    throw new CliError(errorMessage(err));
  } finally {
    signals.dispose();
  }
}

/**
 * --pull: the point read over NBD, as a pull-mode backup client reads it. In the disk's daemon: a
 * scratch image and a copy-before-write filter on the disk (the point: from here the filter keeps the
 * disk's old data for the point-in-time view), a snapshot-access node showing that view, exported
 * with a frozen copy of the chain's bitmap. This process reads the dirty extents' data (everything, for
 * a full point) and writes it into the point's image, which an embedded daemon of its own serves
 * over NBD. The new bitmap is added just before the filter: a write in between is in both, so the
 * bitmap is a superset of the changes after the point (an extra copy next time, nothing missed).
 */
async function pullPoint(
  s: Session,
  a: {
    node: string;
    size: number;
    persistent: boolean;
    chainBitmap?: string;
    backingFile?: string;
    granularity: number;
    bitmapName: string;
    filename: string;
    prefix: string;
    progress: Progress;
    signals: SignalWatch;
    phase: string;
    onBitmap: (b: { node: string; name: string }) => void;
  },
): Promise<{ copied: number; time: Date }> {
  const scratchFile = path.join(path.dirname(a.filename), `.scratch-${path.basename(a.filename)}`);
  const cbw = `${a.prefix}-cbw`;
  const snap = `${a.prefix}-snap`;
  const added: string[] = [];
  let scratch: ImageNodes | undefined;
  let access: NbdAccess | undefined;
  let local: Session | undefined;
  let localAccess: NbdAccess | undefined;
  let complete = false;
  try {
    await fsp.rm(scratchFile, { force: true });
    scratch = await s.createImage(scratchFile, `${a.prefix}-scratch`, { format: 'qcow2', size: a.size });
    await s.qmp.execute('block-dirty-bitmap-add', { node: a.node, name: a.bitmapName, persistent: a.persistent, granularity: a.granularity });
    a.onBitmap({ node: a.node, name: a.bitmapName });
    await s.qmp.execute('blockdev-add', { driver: 'copy-before-write', 'node-name': cbw, file: a.node, target: scratch.node });
    added.push(cbw);
    const time = new Date();
    await s.qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': snap, file: cbw });
    added.push(snap);
    access = await NbdAccess.start(s.qmp, 'pull');
    const source = await access.open(snap);
    const ranges: Range[] =
      a.chainBitmap !== undefined ? await dirtyRanges(await access.open(snap, { bitmap: { name: a.chainBitmap, granularity: a.granularity, node: a.node } }), a.size) : [[0, a.size]];
    local = await Session.open({ signals: a.signals });
    await local.createImage(a.filename, 'point', {
      format: 'qcow2',
      size: a.size,
      clusterSize: 64 * 1024,
      backingFile: a.backingFile,
      backingFormat: a.backingFile !== undefined ? 'qcow2' : undefined,
    });
    localAccess = await NbdAccess.start(local.qmp, 'point');
    const target = await localAccess.open('point', { writable: true });
    const total = ranges.reduce((n, [b, e]) => n + (e - b), 0);
    let done = 0;
    a.progress.update({ phase: a.phase, done, total });
    for (const [begin, end] of ranges) {
      for (let off = begin; off < end; off += PULL_CHUNK) {
        a.signals.throwIfSignalled();
        const len = Math.min(PULL_CHUNK, end - off);
        const { data } = await source.request(NBD_CMD.READ, off, len);
        // Cluster by cluster: data is written, zeroes only over an older point (a zero cluster hides
        // the backing file's data); a full point's new image reads zeroes already (it stays thin).
        for (let at = 0; at < len; at += PULL_CLUSTER) {
          const piece = data!.subarray(at, Math.min(len, at + PULL_CLUSTER));
          if (!piece.every((b) => b === 0)) await target.request(NBD_CMD.WRITE, off + at, piece.length, 0, piece);
          else if (a.backingFile !== undefined) await target.request(NBD_CMD.WRITE_ZEROES, off + at, piece.length);
        }
        done += len;
        a.progress.update({ phase: a.phase, done, total }, done === total);
      }
    }
    await target.request(NBD_CMD.FLUSH, 0, 0);
    await localAccess.close();
    localAccess = undefined;
    const problems = await local.close();
    local = undefined;
    if (problems.length > 0) throw new CliError(`cannot close the point's image: ${problems.join('; ')}`);
    complete = true;
    return { copied: done, time };
  } finally {
    await localAccess?.close().catch(() => undefined);
    await local?.close().catch(() => undefined);
    if (!complete) await fsp.rm(a.filename, { force: true });
    await access?.close().catch(() => undefined);
    for (const n of added.reverse()) await s.qmp.execute('blockdev-del', { 'node-name': n }).catch(() => undefined);
    if (scratch) await s.closeImage(scratch).catch(() => undefined);
    await fsp.rm(scratchFile, { force: true });
  }
}

/** What --pull reads at a time, and the unit it tells data from zeroes in (the images' cluster size). */
const PULL_CHUNK = 4 * 1024 * 1024;
const PULL_CLUSTER = 64 * 1024;

/**
 * In a running daemon, what a killed run of this chain left: its job (cancelled, dismissed) and the
 * nodes of its image (deleted), so that the image can be written again.
 */
async function removeLeftovers(s: Session, prefix: string): Promise<void> {
  const jobs = await s.qmp.execute<Array<{ id: string; status: string }>>('query-jobs');
  for (const j of jobs.filter((x) => x.id.startsWith(`${prefix}-job-`))) {
    if (j.status !== 'concluded') {
      const concluded = s.qmp.waitEvent('JOB_STATUS_CHANGE', { id: j.id, status: 'concluded' }, 3600_000);
      await s.qmp.execute('job-cancel', { id: j.id });
      await concluded;
    }
    await s.qmp.execute('job-dismiss', { id: j.id });
  }
  const nodes = await s.qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
  const ours = nodes.map((x) => x['node-name']).filter((name) => name.startsWith(`${prefix}-`));
  // Format nodes before their file nodes.
  for (const name of ours.filter((x) => !x.endsWith('-file'))) await s.qmp.execute('blockdev-del', { 'node-name': name });
  for (const name of ours.filter((x) => x.endsWith('-file'))) await s.qmp.execute('blockdev-del', { 'node-name': name });
}

// ---- list, verify, restore ------------------------------------------------------------------------

async function chainOf(dir: string): Promise<BackupChain> {
  const chain = await loadChain(path.resolve(dir));
  if (!chain) throw usageError(`${dir} has no backup chain (no ${MANIFEST})`);
  return chain;
}

async function listPoints(dir: string, json: boolean): Promise<number> {
  const chain = await chainOf(dir);
  if (json) {
    process.stdout.write(`${JSON.stringify(chain.points.map((p, n) => ({ point: n, ...p })))}\n`);
    return EXIT_OK;
  }
  for (const [n, p] of chain.points.entries()) {
    process.stdout.write(`${n}  ${p.time}  ${p.kind.padEnd(11)}  size ${formatBytes(p.fileSize).padStart(10)}  copied ${formatBytes(p.copied).padStart(10)}  ${p.file}\n`);
  }
  return EXIT_OK;
}

async function verifyCommand(dir: string, progress: Progress): Promise<number> {
  const chain = await chainOf(dir);
  const problems = await verifyChain(path.resolve(dir), chain, (n) => progress.update({ phase: 'verify', done: n, total: chain.points.length }));
  progress.update({ phase: 'verify', done: chain.points.length, total: chain.points.length }, true);
  if (problems.length > 0) {
    progress.endBar();
    for (const p of problems) process.stderr.write(`bitmirror backup: verify: ${p}\n`);
    return EXIT_VERIFY;
  }
  progress.result({ status: 'verified', points: chain.points.length }, `${chain.points.length} point${chain.points.length === 1 ? '' : 's'}: every image matches its checksum`);
  return EXIT_OK;
}

async function restore(dirArg: string, dst: string, opts: { at?: number; format: 'raw' | 'qcow2'; progress: Progress }): Promise<number> {
  const dir = path.resolve(dirArg);
  const chain = await chainOf(dir);
  const n = pointAt(chain, opts.at);
  const dstPath = path.resolve(dst);
  const st = await fsp.stat(dstPath).catch(() => undefined);
  if (st && !st.isBlockDevice()) throw usageError(`'${dst}' exists: restore writes a new image file or a block device`);
  const signals = new SignalWatch();
  let session: Session | undefined;
  let created = false;
  try {
    session = await Session.open({ signals });
    const s = session;
    // The point, read through its chain (its backing files, read-only).
    const point = await s.openImage(path.join(dir, chain.points[n].file), 'point', { readOnly: true });
    let dstNode: string;
    if (st) {
      // A block device: written in place (raw).
      await s.qmp.execute('blockdev-add', { driver: 'host_device', 'node-name': 'dst-file', filename: dstPath });
      await s.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'dst', file: 'dst-file' });
      dstNode = 'dst';
    } else {
      created = true;
      dstNode = (await s.createImage(dstPath, 'dst', { format: opts.format, size: chain.size })).node;
    }
    signals.throwIfSignalled();
    // A mirror copies what the point holds and skips what reads as zeroes on a new image: thin.
    const outcome = await runJob(s.qmp, {
      id: 'restore',
      phase: `restore point ${n}`,
      progress: opts.progress,
      signals,
      start: () => s.qmp.execute('blockdev-mirror', { 'job-id': 'restore', device: point.node, target: dstNode, sync: 'full', 'auto-dismiss': false }),
      whenReady: () => 'cancel',
    });
    if (outcome.status === 'interrupted') throw new CliError(`cancelled${created ? `: the incomplete '${dst}' was removed` : `: '${dst}' is incomplete`}`, exitCodeForSignal(outcome.signal ?? 'SIGINT'));
    if (outcome.status === 'failed') throw new CliError(`the restore failed: ${outcome.error ?? 'unknown error'}`);
    created = false;
    const problems = await s.close();
    session = undefined;
    if (problems.length > 0) throw new CliError(`the restore is complete, but closing failed: ${problems.join('; ')}`);
    opts.progress.result({ status: 'completed', point: n, target: dst, copied: outcome.done }, `point ${n} restored to ${dst} (${formatBytes(outcome.done)} written)`);
    return EXIT_OK;
  } catch (err) {
    if (session) await session.close().catch(() => undefined);
    if (created) await fsp.rm(dstPath, { force: true });
    if (err instanceof CliError || err instanceof QmpError) throw err;
    if (signals.signal) throw new CliError('cancelled', exitCodeForSignal(signals.signal));
    throw new CliError(errorMessage(err));
  } finally {
    signals.dispose();
  }
}
