/**
 * `bitmirror copy SRC DST`: a whole block copy in one command (libvirt's blockcopy, without losing a
 * bitmap). Against a running daemon (`--qmp SOCKET`: SRC a node name, DST a node or a new image) or
 * on images (an embedded daemon, session.ts): image files, or RBD images by qemu-img's `rbd:` names.
 * Steps: open or create the target (same size as the source; a file of the source's cluster size and
 * format, a qcow2 file for an RBD source with persistent bitmaps; or `--reuse` an existing image),
 * blockdev-mirror with
 * bitmirror's bitmap-carrying extension, progress (progress.ts), at READY the switch (job-complete) or
 * with --no-pivot a consistent copy without switching (soft cancel), then which bitmaps the copy
 * carries, and with --verify a comparison (verify.ts). Ctrl-C cancels the job: the source is untouched,
 * and the message says what is left. Exit codes: exit-codes.ts (README has the table).
 */
import { promises as fsp } from 'node:fs';
import { parseArgs } from 'node:util';
import { errorMessage } from '../errors.js';
import { CliError, EXIT_OK, EXIT_VERIFY, exitCodeForSignal, usageError } from './exit-codes.js';
import { Session, parseImageLocation, removeCreatedImage, type ImageLocation, type ImageNodes, type NodeSummary, type BitmapSummary } from './session.js';
import { chooseProgressMode, formatBytes, Progress } from './progress.js';
import { runJob, type JobOutcome } from './job-runner.js';
import { InterruptedError, SignalWatch } from './signals.js';
import { verifyCopy, VERIFY_BITMAP, type VerifyResult } from './verify.js';

export const COPY_USAGE = `Usage: bitmirror copy [options] SRC DST
Copy a disk live, with its dirty bitmaps: mirror SRC to DST, then switch over to DST.

  SRC, DST        image files or RBD images (an embedded daemon does the copy), or with --qmp a node
                  name (SRC) and a node name or a new image (DST). An RBD image is named as qemu-img
                  names it: rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:conf=CEPH_CONF][:id=USER]
  --qmp SOCKET    a running daemon's QMP socket (a unix socket path, or HOST:PORT)
  --reuse         copy into the existing image DST (same size as SRC); default: create DST with the
                  source's size, cluster size and format (a file from an RBD image: raw, or qcow2
                  to hold its persistent bitmaps; a new RBD image: an RBD source's object size,
                  librbd's default otherwise)
  --node-name N   with --qmp and DST a file: the node name DST gets (default: SRC-copy)
  --shallow       copy only the top image; DST gets SRC's backing file (sync=top)
  --sync-writes   write-blocking mode: guest writes reach the copy before they complete, so the copy
                  keeps up with any write rate
  --speed RATE    limit the copy to RATE bytes per second (suffixes K, M, G: powers of 1024)
  --bitmap NAME   copy only what bitmap NAME of SRC marks dirty (an incremental re-sync of a copy made
                  before; needs --reuse or a DST node). NAME is the mirror's working bitmap: it is
                  empty (and recording) when the copy is done
  --no-pivot      end with a consistent copy and leave SRC in use (no switch)
  --no-bitmaps    do not carry SRC's dirty bitmaps onto DST
  --verify        compare SRC and the copy afterwards (what a live SRC changed meanwhile is skipped)
  --progress MODE auto (a bar on a terminal, JSON lines otherwise), bar, json or none
  -h, --help      this help

Exit codes: 0 done, 1 failed (SRC untouched; the message says what is left), 2 bad arguments
(nothing done), 3 --verify found a difference, 130 cancelled by Ctrl-C (143 SIGTERM).
`;

/**
 * bitmirror's blockdev-mirror extension (issue 13 item 2): every bitmap of the source chain is carried
 * onto the target at the switch (and at a soft cancel after READY).
 */
const CARRY_BITMAPS = '__org.bitmirror_carry-bitmaps';

export interface CopyOptions {
  src: string;
  dst: string;
  qmp?: string;
  reuse: boolean;
  nodeName?: string;
  shallow: boolean;
  syncWrites: boolean;
  speed?: number;
  bitmap?: string;
  pivot: boolean;
  carryBitmaps: boolean;
  verify: boolean;
  progress?: string;
}

/** "10M" → 10485760; plain numbers are bytes. */
export function parseRate(text: string): number {
  const m = /^(\d+)([kKmMgGtT]?)(i?[bB])?(\/s)?$/.exec(text);
  if (!m) throw usageError(`--speed: '${text}' is not a rate (bytes per second, e.g. 10M)`);
  const shift = { '': 0, k: 10, m: 20, g: 30, t: 40 }[m[2].toLowerCase()]!;
  return Number(m[1]) * 2 ** shift;
}

export function parseCopyArgs(argv: string[]): CopyOptions | 'help' {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        help: { type: 'boolean', short: 'h' },
        qmp: { type: 'string' },
        reuse: { type: 'boolean' },
        'node-name': { type: 'string' },
        shallow: { type: 'boolean' },
        'sync-writes': { type: 'boolean' },
        speed: { type: 'string' },
        bitmap: { type: 'string' },
        'no-pivot': { type: 'boolean' },
        'no-bitmaps': { type: 'boolean' },
        verify: { type: 'boolean' },
        progress: { type: 'string' },
      },
    });
  } catch (err) {
    // node's messages ("Unknown option '--x'", "Option '--speed <value>' argument missing"), first line.
    throw usageError(errorMessage(err).split('\n')[0].split('. To specify')[0]);
  }
  const v = parsed.values;
  if (v.help) return 'help';
  const positional = parsed.positionals;
  if (positional.length !== 2) throw usageError(`expected SRC and DST, got ${positional.length} argument${positional.length === 1 ? '' : 's'}`);
  const o: CopyOptions = {
    src: positional[0],
    dst: positional[1],
    qmp: v.qmp,
    reuse: v.reuse ?? false,
    nodeName: v['node-name'],
    shallow: v.shallow ?? false,
    syncWrites: v['sync-writes'] ?? false,
    speed: v.speed === undefined ? undefined : parseRate(v.speed),
    bitmap: v.bitmap,
    pivot: !(v['no-pivot'] ?? false),
    carryBitmaps: !(v['no-bitmaps'] ?? false),
    verify: v.verify ?? false,
    progress: v.progress,
  };
  if (o.bitmap !== undefined && o.shallow) throw usageError('--bitmap and --shallow cannot be combined (a working bitmap needs a full copy)');
  if (o.nodeName !== undefined && o.qmp === undefined) throw usageError('--node-name needs --qmp');
  return o;
}

/** The command: parse, run, print errors; resolves with the exit code. */
export async function copyMain(argv: string[]): Promise<number> {
  let opts: CopyOptions | 'help';
  let progress: Progress;
  try {
    opts = parseCopyArgs(argv);
    if (opts === 'help') {
      process.stdout.write(COPY_USAGE);
      return EXIT_OK;
    }
    progress = new Progress(chooseProgressMode(opts.progress));
  } catch (err) {
    process.stderr.write(`bitmirror copy: ${errorMessage(err)}\n`);
    return err instanceof CliError ? err.exitCode : 2;
  }
  try {
    return await runCopy(opts, progress);
  } catch (err) {
    progress.endBar();
    process.stderr.write(`bitmirror copy: ${errorMessage(err)}\n`);
    return err instanceof CliError ? err.exitCode : 1;
  }
}

/** What a finished copy reports. */
export interface CopyResult {
  status: 'completed';
  source: string;
  target: string;
  /** Bytes the mirror copied. */
  bytes: number;
  pivot: boolean;
  /** The bitmaps on the copy, as carried. */
  bitmaps: BitmapSummary[];
  verify?: VerifyResult;
}

/** What a caller of runCopy (the demo) can do while the copy runs. */
export interface CopyHooks {
  /**
   * At READY, right before the switch (or the soft cancel): the mirror is in sync and still copies
   * every write. The demo writes here, as a guest would while a copy ends.
   */
  beforeSwitch?: () => Promise<void>;
  /**
   * Once the copy has ended (switched, or consistent without a switch), before --verify: what a guest
   * writes then is the live change verify must tell from a difference (tests).
   */
  afterSwitch?: () => Promise<void>;
  /** The finished copy's result (also printed through `progress`). */
  onResult?: (r: CopyResult) => void;
}

/**
 * Run a copy with its options; resolves with the exit code, throws a CliError on failure (after
 * cleaning up: the source untouched, a target this run created removed). Used by the demo too.
 */
export async function runCopy(opts: CopyOptions, progress: Progress, hooks: CopyHooks = {}): Promise<number> {
  const signals = new SignalWatch();
  let session: Session | undefined;
  /** The target image this run created: removed again unless the copy completes. */
  let created: ImageLocation | undefined;
  /** What became of `created` once the copy failed: undefined while nothing was removed. */
  let removal: { error?: string } | undefined;
  let target: ImageNodes | undefined;
  let targetNode: string;
  let outcome: JobOutcome | undefined;
  const fileForm = opts.qmp === undefined;
  /** On failure: close the session (the nodes it opened, an embedded daemon), then remove a target this run created. */
  const abandon = async (): Promise<void> => {
    if (session) await session.close().catch(() => undefined);
    if (created === undefined) return;
    const c = created;
    created = undefined;
    removal = await removeCreatedImage(c).then(
      () => ({}),
      (err: unknown) => ({ error: errorMessage(err) }),
    );
  };
  try {
    session = await Session.open({ qmp: opts.qmp, signals });
    const s = session;
    // The source.
    let sourceNode: string;
    if (fileForm) {
      const src = parseImageLocation(opts.src);
      if (src.kind === 'file') {
        await fsp.access(src.filename).catch(() => {
          throw usageError(`cannot open '${opts.src}': No such file or directory`);
        });
        sourceNode = (await s.openImage(src.filename, 'src')).node;
      } else {
        sourceNode = (
          await s.openRbd(src, 'src').catch((err: unknown) => {
            throw cannotOpen(opts.src, err);
          })
        ).node;
      }
    } else sourceNode = opts.src;
    const source = await s.nodeSummary(sourceNode);
    signals.throwIfSignalled();
    // A mirror with a working bitmap carries none (the daemon refuses both): a re-synced copy keeps its own.
    const carry = opts.carryBitmaps && opts.bitmap === undefined;

    // The target: a node of the daemon, an existing image (--reuse), or a new image like the source.
    const dstIsNode = !fileForm && (await s.hasNode(opts.dst));
    if (dstIsNode) {
      targetNode = opts.dst;
    } else {
      const dst = parseImageLocation(opts.dst);
      const nodeName = fileForm ? 'dst' : (opts.nodeName ?? `${sourceNode}-copy`);
      if (!fileForm && (await s.hasNode(nodeName))) throw usageError(`the daemon already has a node '${nodeName}': name the copy's node with --node-name`);
      if (dst.kind === 'rbd') {
        if (dst.rbd.snapshot !== undefined) throw usageError(`'${opts.dst}' names a snapshot, which is read-only: a copy cannot be written into it`);
        if (opts.shallow) throw usageError('--shallow needs a qcow2 target: an RBD image has no backing file');
        if (opts.reuse) {
          target = await s.openRbd(dst, nodeName).catch((err: unknown) => {
            throw notFound(err) ? usageError(`'${opts.dst}' does not exist (--reuse copies into an existing image)`) : cannotOpen(opts.dst, err);
          });
        } else {
          if (opts.bitmap !== undefined) throw usageError('--bitmap re-syncs an existing copy: give --reuse (or a DST node)');
          // An RBD source's object size carries over; any other source's cluster size is no object size.
          target = await s.createRbd(dst, nodeName, { size: source.virtualSize, clusterSize: source.driver === 'rbd' ? source.clusterSize : undefined }).catch((err: unknown) => {
            // The image is there already: the user's, never touched (not removed on failure either).
            throw /File exists/.test(errorMessage(err)) ? usageError(`'${opts.dst}' exists: use --reuse to copy into it`) : err;
          });
          created = dst;
        }
      } else {
        const exists = await fsp.access(dst.filename).then(() => true, () => false);
        if (opts.reuse) {
          if (!exists) throw usageError(`'${opts.dst}' does not exist (--reuse copies into an existing image)`);
          target = await s.openImage(dst.filename, nodeName);
        } else {
          if (exists) throw usageError(`'${opts.dst}' exists: use --reuse to copy into it`);
          if (opts.bitmap !== undefined) throw usageError('--bitmap re-syncs an existing copy: give --reuse (or a DST node)');
          // An RBD image is raw data; its persistent bitmaps need a format that can hold them.
          const bitmapsToKeep = carry && source.bitmaps.some((b) => b.persistent);
          const format = source.driver === 'qcow2' || (source.driver === 'rbd' && bitmapsToKeep) ? 'qcow2' : 'raw';
          created = dst;
          target = await s.createImage(dst.filename, nodeName, {
            format,
            size: source.virtualSize,
            // A qcow2 source's cluster size (an RBD object, 4 MiB by default, is larger than qcow2 allows).
            clusterSize: source.driver === 'qcow2' ? source.clusterSize : undefined,
            backingFile: opts.shallow && format === 'qcow2' ? source.fullBackingFilename : undefined,
            backingFormat: opts.shallow ? source.backingFormat : undefined,
          });
        }
      }
      targetNode = target.node;
    }
    const targetInfo = await s.nodeSummary(targetNode);
    if (targetInfo.virtualSize !== source.virtualSize) {
      throw usageError(`'${opts.dst}' is ${targetInfo.virtualSize} bytes and '${opts.src}' ${source.virtualSize}: a copy needs the same size`);
    }
    if (carry) {
      // On a node of the user's the daemon alone decides (a raw node may keep bitmaps in a sidecar).
      if (target !== undefined) checkCarriable(source, targetInfo, opts.dst);
      // A reused copy's bitmaps of the source's names describe its old contents, and would record the
      // mirror's own writes; the carry would merge into them. The copy takes the source's instead.
      const stale = targetInfo.bitmaps.filter((b) => source.bitmaps.some((sb) => sb.name === b.name)).map((b) => b.name).sort();
      if (stale.length > 0) {
        progress.message(`replacing the bitmap${stale.length > 1 ? 's' : ''} ${stale.join(', ')} of '${opts.dst}' with the source's`);
        for (const name of stale) await s.qmp.execute('block-dirty-bitmap-remove', { node: targetNode, name });
      }
    }
    signals.throwIfSignalled();

    // The mirror.
    const jobId = fileForm ? 'copy' : `bitmirror-copy-${process.pid}`;
    const args: Record<string, unknown> = {
      'job-id': jobId,
      device: sourceNode,
      target: targetNode,
      sync: opts.shallow ? 'top' : 'full',
      'auto-dismiss': false,
    };
    if (opts.speed !== undefined) args.speed = opts.speed;
    if (opts.syncWrites) args['copy-mode'] = 'write-blocking';
    if (opts.bitmap !== undefined) args.bitmap = opts.bitmap;
    if (carry) args[CARRY_BITMAPS] = true;
    let verifyBitmapAdded = false;
    outcome = await runJob(s.qmp, {
      id: jobId,
      phase: 'copy',
      progress,
      signals,
      start: () => s.qmp.execute('blockdev-mirror', args),
      whenReady: async () => {
        if (opts.verify) {
          // Records every write from here on: the regions a live source changes while and after the
          // copy ends, which the comparison skips (verify.ts).
          await s.qmp.execute('block-dirty-bitmap-add', { node: sourceNode, name: VERIFY_BITMAP, persistent: false });
          // Without the carry, one on the copy too (it also marks the mirror's last writes: more skipped, never less).
          if (!carry) await s.qmp.execute('block-dirty-bitmap-add', { node: targetNode, name: VERIFY_BITMAP, persistent: false });
          verifyBitmapAdded = true;
        }
        await hooks.beforeSwitch?.();
        return opts.pivot ? 'complete' : 'cancel';
      },
    });
    if (outcome.status === 'interrupted') {
      await abandon();
      throw new CliError(`cancelled: ${leftBehind(opts, outcome, removal)}`, exitCodeForSignal(outcome.signal ?? 'SIGINT'));
    }
    if (outcome.status === 'failed') {
      await abandon();
      throw new CliError(`the copy failed: ${outcome.error ?? 'unknown error'}; ${leftBehind(opts, outcome, removal)}`);
    }

    // Done: the copy is consistent (and switched to, unless --no-pivot). What it carries:
    const copied = await s.nodeSummary(targetNode);
    const bitmaps = copied.bitmaps.filter((b) => b.name !== VERIFY_BITMAP).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    const result: CopyResult = { status: 'completed', source: opts.src, target: opts.dst, bytes: outcome.done, pivot: opts.pivot, bitmaps };
    await hooks.afterSwitch?.();
    if (opts.verify) {
      progress.message('verifying: comparing the source and the copy');
      result.verify = await verifyCopy(s, { source: sourceNode, target: targetNode, skipBitmap: verifyBitmapAdded ? VERIFY_BITMAP : undefined, progress, signals });
    }
    if (!fileForm) {
      if (opts.pivot && target) s.keep(target);
    }
    created = undefined; // the copy is complete: it stays, whatever happens next
    const problems = await s.close();
    if (problems.length > 0) throw new CliError(`the copy is complete, but closing failed: ${problems.join('; ')}`);
    hooks.onResult?.(result);
    progress.result({ ...result }, describe(result, opts, targetNode, fileForm));
    if (result.verify && !result.verify.identical) {
      process.stderr.write(`bitmirror copy: verify: the copy differs from the source at offset ${String(result.verify.firstDifference)}\n`);
      return EXIT_VERIFY;
    }
    return signals.signal ? exitCodeForSignal(signals.signal) : EXIT_OK;
  } catch (err) {
    // Clean up: nodes this run opened, the daemon it started, a target it created.
    await abandon();
    if (err instanceof InterruptedError || (signals.signal && !(err instanceof CliError))) {
      throw new CliError(`cancelled: ${leftBehind(opts, outcome, removal)}`, exitCodeForSignal(signals.signal!));
    }
    if (err instanceof CliError) throw err;
    throw new CliError(errorMessage(err));
  } finally {
    signals.dispose();
  }
}

/** The driver's message for an image that is not there (a file's, rbd's "error reading header from …"). */
function notFound(err: unknown): boolean {
  return /No such file or directory/.test(errorMessage(err));
}

/** An image that cannot be opened: a usage error when it does not exist, a failure otherwise (a cluster down). */
function cannotOpen(name: string, err: unknown): CliError {
  const text = `cannot open '${name}': ${errorMessage(err)}`;
  return notFound(err) ? usageError(text) : new CliError(text);
}

/** The formats whose images store persistent bitmaps (qcow2 in the image, rbd in the image's metadata). */
const BITMAP_FORMATS = ['qcow2', 'rbd'];

/** A bitmap that cannot be carried fails here, before anything is copied (the daemon would refuse the switch). */
function checkCarriable(source: NodeSummary, target: NodeSummary, dst: string): void {
  const persistent = source.bitmaps.filter((b) => b.persistent).map((b) => b.name).sort();
  if (persistent.length > 0 && !BITMAP_FORMATS.includes(target.driver)) {
    throw usageError(
      `cannot carry the persistent bitmap${persistent.length > 1 ? 's' : ''} ${persistent.join(', ')} onto '${dst}': a ${target.driver} image cannot store bitmaps (use a qcow2 target, or --no-bitmaps)`,
    );
  }
  const inconsistent = source.bitmaps.filter((b) => b.inconsistent).map((b) => b.name).sort();
  if (inconsistent.length > 0) throw usageError(`cannot carry the inconsistent bitmap${inconsistent.length > 1 ? 's' : ''} ${inconsistent.join(', ')} (remove ${inconsistent.length > 1 ? 'them' : 'it'}, or --no-bitmaps)`);
}

/** What an unfinished copy leaves: the source is always untouched. `removal`: what became of a target this run created. */
function leftBehind(opts: CopyOptions, outcome: JobOutcome | undefined, removal: { error?: string } | undefined): string {
  const parts = [`'${opts.src}' is untouched`];
  if (removal !== undefined) {
    parts.push(removal.error === undefined ? `the incomplete copy '${opts.dst}' was removed` : `the incomplete copy '${opts.dst}' could not be removed (${removal.error}): remove it`);
  } else {
    if (outcome?.ready) parts.push(`'${opts.dst}' holds what was copied but is no consistent copy (the job ended without its switch)`);
    else {
      const copied = outcome ? ` (${formatBytes(outcome.done)} of ${formatBytes(outcome.total)} copied)` : '';
      parts.push(`'${opts.dst}' is an incomplete copy${copied}, not usable as it is`);
    }
  }
  if (opts.bitmap !== undefined) parts.push(`bitmap '${opts.bitmap}' still marks what is left to copy: run the same command again to finish`);
  return parts.join('; ');
}

function describe(r: CopyResult, opts: CopyOptions, targetNode: string, fileForm: boolean): string {
  const lines = [`copied '${r.source}' to '${r.target}': ${formatBytes(r.bytes)} mirrored, ${r.pivot ? 'switched over to the copy' : 'consistent copy, no switch (--no-pivot)'}`];
  if (!fileForm && r.pivot) lines.push(`the source's users now use node '${targetNode}'; node '${opts.src}' is still open, unused`);
  if (r.bitmaps.length === 0) lines.push('bitmaps on the copy: none');
  else {
    lines.push('bitmaps on the copy:');
    for (const b of r.bitmaps) {
      lines.push(`  ${b.name}: ${formatBytes(b.count)} dirty (${b.count} bytes), granularity ${formatBytes(b.granularity)}, ${b.persistent ? 'persistent' : 'not persistent'}, ${b.recording ? 'recording' : 'disabled'}`);
    }
  }
  if (r.verify) {
    const v = r.verify;
    lines.push(
      v.identical
        ? `verify: identical (${formatBytes(v.compared)} compared${v.skipped > 0 ? `, ${formatBytes(v.skipped)} skipped: written while the copy ended` : ''})`
        : `verify: DIFFERENT at offset ${String(v.firstDifference)}`,
    );
  }
  return lines.join('\n');
}
