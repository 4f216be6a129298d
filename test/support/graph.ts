/** A block graph in the test process (no daemon): the drivers the qcow2 tests need. */
import { BlockGraph } from '../../src/block/graph.js';
import { fileDriver } from '../../src/block/drivers/file.js';
import { rawDriver } from '../../src/block/drivers/raw.js';
import { qcow2Driver } from '../../src/block/drivers/qcow2/index.js';
import type { BlockNode } from '../../src/block/node.js';

export function newGraph(): BlockGraph {
  const g = new BlockGraph();
  g.registerDriver(fileDriver);
  g.registerDriver(rawDriver);
  g.registerDriver(qcow2Driver);
  return g;
}

/** Open `filename` as qcow2 node 'd' over a file node (flushes skipped: no crash is simulated here). */
export async function openQcow2File(g: BlockGraph, filename: string, extra: Record<string, unknown> = {}): Promise<BlockNode> {
  return g.open({ driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename, cache: { 'no-flush': true } }, ...extra });
}
