/**
 * query-block, query-blockstats, block-set-write-threshold (with its BLOCK_WRITE_THRESHOLD event), as
 * qemu-storage-daemon 7.2 answers them. bitmirror has no guest devices (BlockBackends with a name), so
 * query-block lists none and query-blockstats without query-nodes none; with query-nodes every node has
 * its BlockStats, which at node level (no BlockBackend accounting) are zeroes except wr_highest_offset.
 */
import { genericError } from '../errors.js';
import { bool, str, uint64 } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode, WriteObserver } from '../block/node.js';

/** BlockDeviceStats of a node: QEMU accounts I/O in BlockBackends; a node only knows its highest write. */
function deviceStats(node: BlockNode): Record<string, unknown> {
  const stats: Record<string, unknown> = {};
  for (const op of ['rd', 'wr', 'unmap']) {
    for (const m of ['bytes', 'operations', 'merged', 'total_time_ns']) stats[`${op}_${m}`] = 0;
    stats[`failed_${op}_operations`] = 0;
    stats[`invalid_${op}_operations`] = 0;
  }
  Object.assign(stats, {
    flush_operations: 0,
    flush_total_time_ns: 0,
    failed_flush_operations: 0,
    invalid_flush_operations: 0,
    wr_highest_offset: node.wrHighestOffset,
    timed_stats: [],
    account_invalid: false,
    account_failed: false,
  });
  return stats;
}

/**
 * bdrv_query_bds_stats (node level): the node's stats and, as `parent`, those of the child that holds
 * its data (the primary child when it holds data or is filtered).
 */
function nodeStats(node: BlockNode): Record<string, unknown> {
  const s: Record<string, unknown> = { stats: deviceStats(node), 'node-name': node.nodeName };
  const specific = node.driverSpecificStats();
  if (specific) s['driver-specific'] = specific;
  const dataChild = node.children.find((c) => c.role === 'filtered' || c.role === 'image' || c.role === 'data');
  if (dataChild) s.parent = nodeStats(dataChild.node);
  return s;
}

/** A node's write threshold and the observer that checks writes against it. */
const thresholds = new WeakMap<BlockNode, { offset: number; observer: WriteObserver }>();

/** The write threshold set on a node (0: none), for query-named-block-nodes. */
export function writeThreshold(node: BlockNode): number {
  return thresholds.get(node)?.offset ?? 0;
}

function setWriteThreshold(core: Core, node: BlockNode, offset: number): void {
  const old = thresholds.get(node);
  if (old) node.removeWriteObserver(old.observer);
  thresholds.delete(node);
  if (offset === 0) return;
  // bdrv_write_threshold_check_write: before a write (or discard) that ends past the threshold, the
  // event, and the threshold is cleared so that the monitor is not flooded.
  const observer: WriteObserver = {
    beforeWrite: (req) => {
      const end = req.offset + req.bytes;
      const t = thresholds.get(node);
      if (!t || t.observer !== observer || end <= t.offset) return;
      core.events.emit('BLOCK_WRITE_THRESHOLD', { 'node-name': node.nodeName, 'amount-exceeded': end - t.offset, 'write-threshold': t.offset });
      setWriteThreshold(core, node, 0);
    },
  };
  node.addWriteObserver(observer);
  thresholds.set(node, { offset, observer });
}

export const blockStatsCommands: CommandDef[] = [
  command('query-block', {}, () => []),
  command('query-blockstats', { '*query-nodes': bool }, (args, core) => {
    if (args['query-nodes'] !== true) return [];
    return core.graph.allNodes().map(nodeStats);
  }),
  command('block-set-write-threshold', { 'node-name': str, 'write-threshold': uint64 }, (args, core) => {
    const name = args['node-name'] as string;
    const node = core.graph.find(name);
    if (!node) throw genericError(`Device '${name}' not found`);
    setWriteThreshold(core, node, args['write-threshold'] as number);
    return {};
  }),
];
