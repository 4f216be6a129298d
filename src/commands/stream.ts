/**
 * block-stream: QEMU 7.2's qmp_block_stream and stream_start — the argument checks in its order and
 * words, the copy-on-read filter above the node, then a StreamJob.
 *
 * Beyond QEMU 7.2:
 * - `backing-mask-protocol` (upstream QEMU since 8.x): record "raw", not a protocol driver's name, as
 *   the base's format when the base is a protocol node. qemu-storage-daemon 7.2 refuses the member.
 * - `__org.bitmirror_carry-bitmaps` (bool, default false): the named bitmaps of the layers the stream
 *   removes are carried into the node (bitmap/carry.ts) at the instant the chain is shortened, merged
 *   by name with the node's own: every write any of them recorded stays recorded.
 */
import { genericError } from '../errors.js';
import { bool, enumOf, int, str, type Members } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode } from '../block/node.js';
import { chainContains, filterOrCowChild, findBackingImage, findOverlay, isFilter } from '../block/chain.js';
import { idWellFormed } from '../block/graph.js';
import { CopyOnReadNode } from '../block/filters/copy-on-read.js';
import { StreamJob } from '../jobs/stream.js';
import type { OnError } from '../jobs/job.js';
import { planCarry, sourceChainLayers } from '../bitmap/carry.js';
import { checkBusy } from './mirror.js';
import { nodeByName } from './chain.js';

const CARRY = '__org.bitmirror_carry-bitmaps';

const BLOCK_STREAM: Members = {
  '*job-id': str,
  device: str,
  '*base': str,
  '*base-node': str,
  '*backing-file': str,
  '*backing-mask-protocol': bool,
  '*bottom': str,
  '*speed': int,
  '*on-error': enumOf('BlockdevOnError', ['report', 'ignore', 'enospc', 'stop', 'auto']),
  '*filter-node-name': str,
  '*auto-finalize': bool,
  '*auto-dismiss': bool,
  [`*${CARRY}`]: bool,
};

async function blockStream(core: Core, args: Record<string, unknown>): Promise<void> {
  const device = args.device as string;
  const baseName = args.base as string | undefined;
  const baseNodeName = args['base-node'] as string | undefined;
  const bottomName = args.bottom as string | undefined;
  const backingFile = args['backing-file'] as string | undefined;
  if (baseName !== undefined && baseNodeName !== undefined) throw genericError("'base' and 'base-node' cannot be specified at the same time");
  if (baseName !== undefined && bottomName !== undefined) throw genericError("'base' and 'bottom' cannot be specified at the same time");
  if (bottomName !== undefined && baseNodeName !== undefined) throw genericError("'bottom' and 'base-node' cannot be specified at the same time");
  const bs = core.graph.lookup(device);
  let base: BlockNode | undefined;
  if (baseName !== undefined) {
    base = await findBackingImage(bs, baseName);
    if (!base) throw genericError(`Can't find '${baseName}' in the backing chain`);
  }
  if (baseNodeName !== undefined) {
    base = nodeByName(core, baseNodeName);
    if (bs === base || !chainContains(bs, base)) throw genericError(`Node '${baseNodeName}' is not a backing image of '${device}'`);
  }
  let bottom: BlockNode | undefined;
  if (bottomName !== undefined) {
    bottom = nodeByName(core, bottomName);
    if (isFilter(bottom)) throw genericError(`Node '${bottomName}' is a filter, use a non-filter node as 'bottom'`);
    if (!chainContains(bs, bottom)) throw genericError(`Node '${bottomName}' is not in a chain starting from '${device}'`);
  }
  // Op blockers on the whole chain between the node and its base (or the bottom).
  const iterEnd = bottom ? filterOrCowChild(bottom) : base;
  for (let n: BlockNode | undefined = bs; n && n !== iterEnd; n = filterOrCowChild(n)) checkBusy(n, 'stream');
  if (!base && backingFile !== undefined) throw genericError('backing file specified, but streaming the entire chain');

  // stream_start.
  let baseOverlay: BlockNode;
  let aboveBase: BlockNode;
  if (bottom) {
    baseOverlay = aboveBase = bottom;
  } else {
    const overlay = findOverlay(bs, base);
    if (!overlay) throw genericError(`'${base!.nodeName}' is not in the backing chain of '${bs.nodeName}'`);
    baseOverlay = overlay;
    // The node directly above the base: the overlay, or a filter between them.
    aboveBase = overlay;
    while (filterOrCowChild(aboveBase) !== base) aboveBase = filterOrCowChild(aboveBase)!;
  }
  const carry = args[CARRY] === true;
  if (carry) await planCarry(core.bitmaps, removedLayers(bs, aboveBase), bs);
  const filterNodeName = args['filter-node-name'] as string | undefined;
  if (filterNodeName !== undefined) {
    // bdrv_insert_node's words.
    if (!idWellFormed(filterNodeName)) throw genericError(`Could not create node: Invalid node-name: '${filterNodeName}'`);
    if (core.graph.find(filterNodeName)) throw genericError(`Could not create node: Duplicate nodes with node-name='${filterNodeName}'`);
  }
  const wasReadOnly = bs.readOnly;
  if (wasReadOnly) await core.graph.setReadOnly(bs, false);
  const restore = async () => {
    if (wasReadOnly) await core.graph.setReadOnly(bs, true).catch(() => undefined);
  };
  let filter: CopyOnReadNode | undefined;
  try {
    filter = new CopyOnReadNode(filterNodeName ?? core.graph.generateNodeName(), bs, baseOverlay);
    if (filterNodeName === undefined) filter.implicit = true;
    core.graph.insertFilter(filter, bs);
  } catch (err) {
    if (filter) {
      await filter.close().catch(() => undefined);
      filter.detachChild('file');
    }
    await restore();
    throw err;
  }
  let job: StreamJob;
  try {
    job = new StreamJob(core.jobs, {
      id: (args['job-id'] as string | undefined) ?? '',
      autoFinalize: args['auto-finalize'] as boolean | undefined,
      autoDismiss: args['auto-dismiss'] as boolean | undefined,
      graph: core.graph,
      bitmaps: carry ? core.bitmaps : undefined,
      top: bs,
      baseOverlay,
      aboveBase,
      base: bottom ? undefined : base,
      filter,
      backingFile,
      backingMaskProtocol: args['backing-mask-protocol'] === true,
      onError: (args['on-error'] as OnError | undefined) ?? 'report',
      topWasReadOnly: wasReadOnly,
    });
  } catch (err) {
    await StreamJob.dropFilter(core.graph, filter);
    await restore();
    throw err;
  }
  await job.setUp((args.speed as number | undefined) ?? 0, () => job.install());
  job.start();
}

/** The layers a stream removes from the chain: below the node, down to the base (not included). */
function removedLayers(bs: BlockNode, aboveBase: BlockNode): BlockNode[] {
  const below = filterOrCowChild(bs.formatLayer());
  if (!below) return [];
  return sourceChainLayers(below, filterOrCowChild(aboveBase));
}

export const streamCommands: CommandDef[] = [
  command('block-stream', BLOCK_STREAM, async (args, core) => {
    await blockStream(core, args);
    return {};
  }),
];
