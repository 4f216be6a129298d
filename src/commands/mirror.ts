/**
 * blockdev-mirror and drive-mirror: argument checks in QEMU's order and words, then a MirrorJob.
 *
 * Beyond QEMU 7.2/upstream (documented in README):
 * - `bitmap` with sync=full: the caller's bitmap is the working bitmap (the unmerged upstream series,
 *   v4 of "mirror: allow specifying working bitmap").
 * - `sync=bitmap|incremental` with `bitmap` and `bitmap-mode`: Proxmox VE's variant.
 * - `__org.bitmirror_fill-partial-clusters` (default true) widens writes into unallocated clusters of a
 *   no-backing target to whole clusters; `__org.bitmirror_allow-coarse-target` (default false) then lets
 *   a caller's bitmap be finer than the target's clusters, which the series refuses. The names follow
 *   QAPI's rule for downstream extensions (a reversed domain name with a leading `__`).
 * - `__org.bitmirror_copy-offload` (default true): data between host files is copied by the kernel
 *   (copy_file_range) where it can; false reads and writes every byte (QEMU's mirror always does).
 * - `__org.bitmirror_carry-bitmaps` (default false): at the pivot or the soft cancel after READY, the
 *   source chain's bitmaps are carried onto the target (bitmap/carry.ts, jobs/mirror.ts).
 */
import { genericError } from '../errors.js';
import { bool, enumOf, int, str, uint32, type Members } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode, BlockOp } from '../block/node.js';
import { BITMAP_ALLOW_RO, BITMAP_DEFAULT, type DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { STREAM_BUF_SIZE } from '../block/copy/block-copy.js';
import { DEFAULT_MIRROR_BUF_SIZE, MirrorJob, type BitmapSyncMode, type CopyMode, type MirrorSync } from '../jobs/mirror.js';
import type { OnError } from '../jobs/job.js';
import { protocolOptions } from '../block/filename.js';
import * as path from 'node:path';

const MirrorSyncMode = enumOf('MirrorSyncMode', ['top', 'full', 'none', 'incremental', 'bitmap']);
export const BlockdevOnErrorEnum = enumOf('BlockdevOnError', ['report', 'ignore', 'enospc', 'stop', 'auto']);
const MirrorCopyModeEnum = enumOf('MirrorCopyMode', ['background', 'write-blocking']);
const BitmapSyncModeEnum = enumOf('BitmapSyncMode', ['on-success', 'never', 'always']);
const FILL = '__org.bitmirror_fill-partial-clusters';
const COARSE = '__org.bitmirror_allow-coarse-target';
const OFFLOAD = '__org.bitmirror_copy-offload';
const CARRY = '__org.bitmirror_carry-bitmaps';

const COMMON: Members = {
  '*job-id': str,
  device: str,
  '*replaces': str,
  sync: MirrorSyncMode,
  '*speed': int,
  '*bitmap': str,
  '*bitmap-mode': BitmapSyncModeEnum,
  '*granularity': uint32,
  '*buf-size': int,
  '*on-source-error': BlockdevOnErrorEnum,
  '*on-target-error': BlockdevOnErrorEnum,
  '*copy-mode': MirrorCopyModeEnum,
  '*auto-finalize': bool,
  '*auto-dismiss': bool,
  [`*${FILL}`]: bool,
  [`*${COARSE}`]: bool,
  [`*${OFFLOAD}`]: bool,
  [`*${CARRY}`]: bool,
};

/** The device must be a root node (nothing above it), as qmp_get_root_bs requires. */
export function rootNode(core: Core, name: string): BlockNode {
  const node = core.graph.lookup(name);
  // A parent node or a job's claim makes a node no root (the filter and the target of a running mirror).
  if (!node.isRoot()) throw genericError('Need a root block node');
  return node;
}

/** bdrv_op_is_blocked: a node a job uses (or a backing file, for some jobs) refuses `op`, with the reason. */
export function checkBusy(node: BlockNode, op: BlockOp): void {
  const reason = node.opBlocker(op);
  if (reason) throw genericError(`Node '${node.nodeName}' is busy: ${reason}`);
}

interface BitmapChoice {
  workingBitmap?: DirtyBitmap;
  syncBitmap?: { bitmap: DirtyBitmap; mode: BitmapSyncMode };
  sync: MirrorSync;
}

/** The bitmap arguments, both variants, with their checks in the order their patches make them. */
async function chooseBitmap(core: Core, args: Record<string, unknown>, source: BlockNode, target: BlockNode): Promise<BitmapChoice> {
  const sync = args.sync as string;
  const name = args.bitmap as string | undefined;
  const mode = args['bitmap-mode'] as BitmapSyncMode | undefined;
  const granularity = args.granularity as number | undefined;
  if (sync === 'bitmap' || sync === 'incremental') {
    // Proxmox VE's variant.
    if (name === undefined) throw genericError(`Must provide a valid bitmap name for '${sync}' sync mode`);
    if (sync === 'incremental' && mode !== undefined && mode !== 'on-success') throw genericError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    if (granularity) throw genericError('Granularity and bitmap cannot both be set');
    const effective = sync === 'incremental' ? 'on-success' : mode;
    if (effective === undefined) throw genericError('bitmap-mode must be specified if a bitmap is provided');
    const bm = core.bitmaps.find(source, name);
    if (!bm) throw genericError(`Dirty bitmap '${name}' not found`);
    bm.check(BITMAP_ALLOW_RO);
    return { syncBitmap: { bitmap: bm, mode: effective }, sync: 'full' };
  }
  if (mode !== undefined && name === undefined) throw genericError('Cannot specify bitmap sync mode without a bitmap');
  if (name === undefined) return { sync: sync as MirrorSync };
  // The working-bitmap series (v4).
  if (mode !== undefined) throw genericError(`Sync mode '${sync}' not supported with bitmap.`);
  if (sync !== 'full') throw genericError(`Sync mode '${sync}' not supported with bitmap.`);
  if (granularity) throw genericError('Granularity and bitmap cannot both be set');
  const bm = core.bitmaps.find(source, name);
  if (!bm) throw genericError(`Dirty bitmap '${name}' not found`);
  if (!target.formatLayer().backing() && args[COARSE] !== true) {
    const cs = target.nodeInfo().clusterSize;
    if (cs !== undefined && (bm.granularity < cs || bm.granularity % cs !== 0)) {
      throw genericError(`Bitmap granularity ${bm.granularity} is not a multiple of the target image's cluster size ${cs} and the target image has no backing file`);
    }
  }
  bm.check(BITMAP_DEFAULT);
  if (!bm.enabled) throw genericError(`Bitmap '${name}' is not enabled`);
  return { workingBitmap: bm, sync: 'full' };
}

/** bdrv_get_default_bitmap_granularity(target): cluster size clamped to [4K, 64K], 64K if unknown. */
function defaultGranularity(target: BlockNode): number {
  const cs = target.nodeInfo().clusterSize;
  if (!cs) return 65536;
  return Math.min(65536, Math.max(4096, cs));
}

/** blockdev_mirror_common: the checks, then the job. */
async function startMirror(
  core: Core,
  args: Record<string, unknown>,
  source: BlockNode,
  target: BlockNode,
  extra: { unmap: boolean; targetIsZero: boolean; filterNodeName?: string; ownedTarget?: boolean; backingAtCompletion?: BlockNode },
): Promise<MirrorJob> {
  checkBusy(source, 'mirror-source');
  checkBusy(target, 'mirror-target');
  if (target.parentsOfKind('backend').length > 0) throw genericError('Cannot mirror to an attached block device');
  const sync0 = args.sync as string;
  if (sync0 !== 'bitmap' && sync0 !== 'incremental' && args.bitmap === undefined && args['bitmap-mode'] !== undefined) {
    throw genericError('Cannot specify bitmap sync mode without a bitmap');
  }
  let granularity = (args.granularity as number | undefined) ?? 0;
  if (granularity !== 0 && (granularity < 512 || granularity > 64 * 1048576)) throw genericError("Parameter 'granularity' expects a value in range [512B, 64MB]");
  if (granularity & (granularity - 1)) throw genericError("Parameter 'granularity' expects a power of 2");
  const choice = await chooseBitmap(core, args, source, target);
  let sync = choice.sync;
  if (sync === 'top' && !source.formatLayer().backing()) sync = 'full';
  let replaces: BlockNode | undefined;
  if (args.replaces !== undefined) {
    const name = args.replaces as string;
    replaces = core.graph.find(name);
    if (!replaces) throw genericError(`Failed to find node with node-name='${name}'`);
    // bdrv_recurse_can_replace, checked before the size as QEMU does: only the source itself (or the
    // data node under a filter source) can be replaced without an abrupt change of visible data.
    if (replaces !== source && replaces !== source.formatLayer()) {
      throw genericError(`Cannot replace '${name}' by a node mirrored from '${source.nodeName}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data`);
    }
    if (replaces.length() !== target.length()) throw genericError('cannot replace image with a mirror image of different size');
  }
  const bufSize = (args['buf-size'] as number | undefined) ?? 0;
  if (bufSize < 0) throw genericError("Invalid parameter 'buf-size'");
  if (source === target) throw genericError("Can't mirror node into itself");
  if (target.formatLayer() !== target && source.formatLayer().backing() && isInChain(source, target)) {
    throw genericError("Cannot mirror to a filter on top of a node in the source's backing chain");
  }
  const bm = choice.workingBitmap ?? choice.syncBitmap?.bitmap;
  // The job's own bitmap is busy while it runs and means "still to copy" afterwards: nothing to carry.
  if (bm && args[CARRY] === true) throw genericError(`'${CARRY}' cannot be used with 'bitmap'`);
  if (bm) granularity = bm.granularity;
  if (!granularity) granularity = defaultGranularity(target);
  // Without buf-size: QEMU's default, or STREAM_BUF_SIZE for each stream the target spreads requests
  // over (an NBD node's connections; the job keeps QEMU's 16 copies in flight per stream too), so that
  // every connection of a copy over a long link has its TCP window's worth to send. Over the bench's
  // 20 ms link (bench/nbd.ts, 256 MiB in 1 MiB extents, 4 connections, 5 rounds) 239 MiB/s (206-249)
  // against 173 (158-210) with QEMU's 16 MiB and 16 copies for all four. 16 MiB per connection (64
  // MiB) was no faster than 8 MiB per connection and held 32 MiB more in buffers: same run, 6 rounds,
  // the mirroring daemon's peak 89 against 121 MiB, time 1.03 (0.92-1.27) of 32 MiB's in 1 MiB
  // extents and 0.97 (0.93-1.19) with BM_NBD_LAYOUT=dense (16 MiB in all, with 64 copies: 0.89
  // (0.84-0.98), slower). Numbers at NBD_DEFAULT_CONNECTIONS.
  const streams = target.capabilities().streams ?? 1;
  const buf = Math.ceil((bufSize || Math.max(DEFAULT_MIRROR_BUF_SIZE, STREAM_BUF_SIZE * streams)) / granularity) * granularity;
  const job = new MirrorJob(core.jobs, {
    id: (args['job-id'] as string | undefined) ?? '',
    autoFinalize: args['auto-finalize'] as boolean | undefined,
    autoDismiss: args['auto-dismiss'] as boolean | undefined,
    graph: core.graph,
    bitmaps: core.bitmaps,
    source,
    target,
    replaces,
    sync,
    granularity,
    bufSize: buf,
    onSourceError: (args['on-source-error'] as OnError | undefined) ?? 'report',
    onTargetError: (args['on-target-error'] as OnError | undefined) ?? 'report',
    copyMode: (args['copy-mode'] as CopyMode | undefined) ?? 'background',
    unmap: extra.unmap,
    targetIsZero: extra.targetIsZero,
    filterNodeName: extra.filterNodeName,
    workingBitmap: choice.workingBitmap,
    syncBitmap: choice.syncBitmap,
    fillPartialClusters: (args[FILL] as boolean | undefined) ?? true,
    // On by default on every file system, decided from `npm run bench -- copy` (bitmirror ÷ bitmirror
    // with offload off, per round, same run, 1 GiB unless said, load ~20-30 on 2 cores): XFS with
    // reflinks 0.06-0.48 of the time (raw and qcow2); tmpfs raw→raw 0.82-0.91 of the CPU (qcow2→qcow2
    // within noise, median 0.79); ext4 (the disk, sync and dropped caches around each run) qcow2→qcow2
    // 512 MiB 0.30-0.80 of the CPU, 1 GiB 0.88-1.52 and 2 GiB 0.64-1.25 of the time (within noise),
    // raw→raw 0.43-1.09. Offload never lost in every round, so no file system is excluded; between plain
    // ext4 files, copy_file_range and read + write of 1 MiB pieces (16 at a time) took the same time.
    copyOffload: (args[OFFLOAD] as boolean | undefined) ?? true,
    carryBitmaps: (args[CARRY] as boolean | undefined) ?? false,
    ownedTarget: extra.ownedTarget,
    backingAtCompletion: extra.backingAtCompletion,
  });
  await job.setUp((args.speed as number | undefined) ?? 0, () => {
    if (extra.filterNodeName !== undefined && core.graph.find(extra.filterNodeName)) throw genericError(`Duplicate nodes with node-name='${extra.filterNodeName}'`);
    job.install();
  });
  job.start();
  return job;
}

function isInChain(top: BlockNode, node: BlockNode): boolean {
  for (let n: BlockNode | undefined = top.formatLayer().backing(); n; n = n.formatLayer().backing()) {
    if (node.formatLayer() === n) return true;
  }
  return false;
}

export const mirrorCommands: CommandDef[] = [
  command(
    'blockdev-mirror',
    { ...COMMON, target: str, '*filter-node-name': str, '*target-is-zero': bool },
    async (args, core) => {
      const source = rootNode(core, args.device as string);
      const target = core.graph.lookup(args.target as string);
      await startMirror(core, args, source, target, {
        unmap: true,
        targetIsZero: (args['target-is-zero'] as boolean | undefined) ?? false,
        filterNodeName: args['filter-node-name'] as string | undefined,
      });
      return {};
    },
  ),
  command(
    'drive-mirror',
    {
      ...COMMON,
      target: str,
      '*format': str,
      '*node-name': str,
      '*mode': enumOf('NewImageMode', ['existing', 'absolute-paths']),
      '*unmap': bool,
    },
    async (args, core) => {
      const source = rootNode(core, args.device as string);
      if (args.replaces !== undefined && args['node-name'] === undefined) throw genericError('a node-name must be provided when replacing a named node of the graph');
      const mode = (args.mode as string | undefined) ?? 'absolute-paths';
      const format = (args.format as string | undefined) ?? source.formatLayer().driver;
      if (format !== 'qcow2' && format !== 'raw') throw genericError(`drive-mirror: format '${format}' is not supported (qcow2, raw)`);
      const filename = args.target as string;
      let sync = args.sync as string;
      const backing = source.formatLayer().backing();
      if (sync === 'top' && !backing) sync = 'full';
      if (mode === 'absolute-paths') {
        await createImage(core, filename, format, source, sync === 'top' ? backing : sync === 'none' ? source : undefined);
      }
      // The node-name is the caller's or generated by the graph ('#block…', which callers cannot give).
      const nodeName = args['node-name'] as string | undefined;
      // A new image runs without its backing file, which it gets at completion: the source itself
      // (sync=none) or the source's backing (sync=top), as QEMU does — opening the source's image a
      // second time would fail on its own lock. An existing image keeps the backing file in its header
      // for top and none; a full copy stands alone.
      const newImage = mode === 'absolute-paths';
      const backingAtCompletion = newImage ? (sync === 'none' ? source : sync === 'top' ? backing : undefined) : undefined;
      const target = await core.graph.open({
        driver: format,
        ...(nodeName !== undefined ? { 'node-name': nodeName } : {}),
        // A legacy 'blkdebug:CONFIG:IMAGE' target is a blkdebug node over the image, as QEMU opens it.
        file: protocolOptions(filename),
        ...(format === 'qcow2' && (sync === 'full' || newImage) ? { backing: null } : {}),
      });
      try {
        await startMirror(core, { ...args, sync }, source, target, {
          unmap: (args.unmap as boolean | undefined) ?? true,
          targetIsZero: mode !== 'existing' && target.hasZeroInit(),
          ownedTarget: true,
          backingAtCompletion,
        });
      } catch (err) {
        await core.graph.remove(target).catch(() => undefined);
        throw err;
      }
      return {};
    },
  ),
];

/** drive-mirror with mode=absolute-paths creates the target image (the size of the source). */
async function createImage(core: Core, filename: string, format: string, source: BlockNode, backing: BlockNode | undefined): Promise<void> {
  const backingFile = backing && format === 'qcow2' ? { filename: path.resolve(backing.imageInfo().filename), format: backing.formatLayer().driver } : undefined;
  await core.graph.createImage(format, filename, source.length(), backingFile);
}
