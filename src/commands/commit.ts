/**
 * block-commit: QEMU's qmp_block_commit, its checks in QEMU's order and words, then a commit job for an
 * intermediate top (jobs/commit.ts) or, when top is the active layer (someone writes it), an active
 * commit: a mirror of top into the base (jobs/mirror.ts) that becomes READY and pivots on job-complete.
 *
 * Beyond QEMU: `__org.bitmirror_carry-bitmaps` (default false): every dirty bitmap of the layers that
 * leave the chain is carried into the base at the instant of the chain change, merged into the base's
 * bitmap of the same name (bitmap/carry.ts). `backing-mask-protocol` is upstream's (9.0), which
 * qemu-storage-daemon 7.2 refuses as an unexpected parameter.
 */
import { genericError, QmpError } from '../errors.js';
import { bool, int, str } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode } from '../block/node.js';
import { BLK_PERM_WRITE } from '../block/permissions.js';
import { idWellFormed } from '../block/graph.js';
import { chainContains, filterOrCowChild, findBackingImage, findBase, findOverlay, skipFilters } from '../block/chain.js';
import { CommitJob } from '../jobs/commit.js';
import { DEFAULT_MIRROR_BUF_SIZE, MirrorJob } from '../jobs/mirror.js';
import type { OnError } from '../jobs/job.js';
import { BlockdevOnErrorEnum, checkBusy } from './mirror.js';

const CARRY = '__org.bitmirror_carry-bitmaps';

/** qmp_get_root_bs, with block-commit's DeviceNotFound for a name that is no node at all. */
function rootNode(core: Core, name: string): BlockNode {
  const node = core.graph.find(name);
  if (!node) throw new QmpError('DeviceNotFound', `Device '${name}' not found`);
  if (!node.isRoot()) throw genericError('Need a root block node');
  return node;
}

/** bdrv_lookup_bs(NULL, name): a node by node-name only. */
function nodeByName(core: Core, name: string): BlockNode {
  const node = core.graph.find(name);
  if (!node) throw genericError(`Cannot find device='' nor node-name='${name}'`);
  return node;
}

/** Whether a parent of the node writes it (bdrv_get_cumulative_perm has WRITE). */
function hasWriter(node: BlockNode): boolean {
  return node.parents.some((e) => (e.perm & BLK_PERM_WRITE) !== 0);
}

/** A filter-node-name QEMU would refuse (bdrv_assign_node_name). */
function checkFilterName(core: Core, name: string | undefined): void {
  if (name === undefined) return;
  if (!idWellFormed(name)) throw genericError(`Invalid node-name: '${name}'`);
  if (core.graph.find(name)) throw genericError(`Duplicate nodes with node-name='${name}'`);
}

async function blockCommit(args: Record<string, unknown>, core: Core): Promise<void> {
  const device = args.device as string;
  const topNode = args['top-node'] as string | undefined;
  const topName = args.top as string | undefined;
  const baseNode = args['base-node'] as string | undefined;
  const baseName = args.base as string | undefined;
  const backingFile = args['backing-file'] as string | undefined;
  const onError = (args['on-error'] as OnError | undefined) ?? 'report';
  const filterNodeName = args['filter-node-name'] as string | undefined;
  const speed = (args.speed as number | undefined) ?? 0;
  const carry = args[CARRY] === true;

  // libvirt probes for block-commit by the DeviceNotFound class: the device is looked up first.
  const bs = rootNode(core, device);
  checkBusy(bs, 'commit-source');

  let top: BlockNode | undefined = bs;
  if (topNode !== undefined && topName !== undefined) throw genericError("'top-node' and 'top' are mutually exclusive");
  if (topNode !== undefined) {
    top = nodeByName(core, topNode);
    if (!chainContains(bs, top)) throw genericError(`'${topNode}' is not in this backing file chain`);
  } else if (topName !== undefined && bs.imageInfo().filename !== topName) {
    top = await findBackingImage(bs, topName);
  }
  if (!top) throw genericError(`Top image file ${topName ?? 'NULL'} not found`);

  let base: BlockNode;
  if (baseNode !== undefined && baseName !== undefined) throw genericError("'base-node' and 'base' are mutually exclusive");
  if (baseNode !== undefined) {
    base = nodeByName(core, baseNode);
    if (!chainContains(top, base)) throw genericError(`'${baseNode}' is not in this backing file chain`);
  } else if (baseName !== undefined) {
    const found = await findBackingImage(top, baseName);
    if (!found) throw genericError(`Can't find '${baseName}' in the backing chain`);
    base = found;
  } else {
    base = findBase(top);
  }

  // Every node from top down to the base (inclusive) must allow being committed into.
  const end = filterOrCowChild(base);
  for (let n: BlockNode | undefined = top; n && n !== end; n = filterOrCowChild(n)) checkBusy(n, 'commit-target');
  if (top === base) throw genericError('cannot commit an image into itself');

  const common = {
    autoFinalize: args['auto-finalize'] as boolean | undefined,
    autoDismiss: args['auto-dismiss'] as boolean | undefined,
    graph: core.graph,
    bitmaps: core.bitmaps,
  };

  // Active commit whenever someone writes top, and always for the active layer itself.
  const active = skipFilters(top) === skipFilters(bs);
  if (active || hasWriter(top)) {
    if (backingFile !== undefined) {
      throw genericError(active ? "'backing-file' specified, but 'top' is the active layer" : "'backing-file' specified, but 'top' has a writer on it");
    }
    // The job is named after the device (bdrv_get_device_name: no device has a name here).
    const id = (args['job-id'] as string | undefined) ?? '';
    // commit_active_start: the base becomes writable first; mirror_start_job names the filter, then
    // creates the job.
    const baseWasReadOnly = base.readOnly;
    if (baseWasReadOnly) await core.graph.setReadOnly(base, false);
    let job: MirrorJob;
    try {
      checkFilterName(core, filterNodeName);
      const granularity = core.bitmaps.defaultGranularity(base);
      job = new MirrorJob(core.jobs, {
        ...common,
        id,
        source: top,
        target: base,
        sync: 'full',
        granularity,
        bufSize: Math.ceil(DEFAULT_MIRROR_BUF_SIZE / granularity) * granularity,
        onSourceError: onError,
        onTargetError: onError,
        copyMode: 'background',
        unmap: true,
        targetIsZero: false,
        filterNodeName,
        fillPartialClusters: false,
        copyOffload: true,
        commit: { baseWasReadOnly },
        carryBitmaps: carry,
      });
    } catch (err) {
      if (baseWasReadOnly) await core.graph.setReadOnly(base, true).catch(() => undefined);
      throw err;
    }
    try {
      await job.setUp(speed, () => job.install());
    } catch (err) {
      if (baseWasReadOnly) await core.graph.setReadOnly(base, true).catch(() => undefined);
      throw err;
    }
    job.start();
    return;
  }

  const overlay = findOverlay(bs, top);
  if (overlay) checkBusy(overlay, 'commit-target');
  const job = new CommitJob(core.jobs, {
    ...common,
    id: (args['job-id'] as string | undefined) ?? '',
    device: bs,
    top,
    base,
    backingFile,
    backingMaskProtocol: args['backing-mask-protocol'] === true,
    onError,
    filterNodeName,
    carryBitmaps: carry,
  });
  await job.setUp(speed, () => job.install(() => checkFilterName(core, filterNodeName)));
  job.start();
}

export const commitCommands: CommandDef[] = [
  command(
    'block-commit',
    {
      '*job-id': str,
      device: str,
      '*base-node': str,
      '*base': str,
      '*top-node': str,
      '*top': str,
      '*backing-file': str,
      '*backing-mask-protocol': bool,
      '*speed': int,
      '*on-error': BlockdevOnErrorEnum,
      '*filter-node-name': str,
      '*auto-finalize': bool,
      '*auto-dismiss': bool,
      [`*${CARRY}`]: bool,
    },
    async (args, core) => {
      await blockCommit(args, core);
      return {};
    },
  ),
];
