/**
 * blockdev-add, blockdev-del, blockdev-reopen, block_resize and query-named-block-nodes, with QEMU's
 * checks and messages.
 */
import { genericError } from '../errors.js';
import { any, arrayOf, bool, int, str, visit, type Schema } from '../qapi/schema.js';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, PERM_QAPI_NAMES, unnamedBackend, type ExternalParent } from '../block/permissions.js';
import { command, type CommandDef } from './registry.js';
import { writeThreshold } from './block-stats.js';
import type { Core } from '../core/core.js';
import { BlockNode, type ImageInfo } from '../block/node.js';

/**
 * BlockdevOptions as QEMU's QAPI visitor checks them, children given nested included (a BlockdevRef's
 * object branch is BlockdevOptions too): blockdev-reopen takes nothing it would not open, and names
 * the nested member in its error ("Parameter 'options[0].file.driver' is missing"). blockdev-add
 * checks nested children when it opens them, under the same names.
 */
function visitNestedOptions(schema: Schema, raw: unknown, path: string): Record<string, unknown> {
  const options = visit(schema, raw, path) as Record<string, unknown>;
  if (schema.kind !== 'union') return options;
  const members = { ...schema.base, ...(schema.variants[options[schema.discriminator] as string] ?? {}) };
  for (const [member, type] of Object.entries(members)) {
    const name = member.replace(/^\*/, '');
    const value = options[name];
    const isRef = type.kind === 'alternate' && type.name.startsWith('BlockdevRef');
    if (isRef && value !== null && typeof value === 'object' && !Array.isArray(value)) options[name] = visitNestedOptions(schema, value, `${path}.${name}`);
  }
  return options;
}

async function imageInfoWithSizes(node: BlockNode, flat: boolean): Promise<ImageInfo> {
  const info = { ...node.imageInfo() };
  const size = await node.actualSize();
  if (size !== undefined) info['actual-size'] = size;
  const backing = node.backing();
  // flat: no backing images (the format driver's ImageInfo may carry one).
  if (flat) delete info['backing-image'];
  else if (backing) info['backing-image'] = await imageInfoWithSizes(backing, false);
  return info;
}

function backingDepth(node: BlockNode): number {
  let depth = 0;
  for (let b = node.backing(); b; b = b.backing()) depth++;
  return depth;
}

/** A permission mask as x-debug-query-block-graph lists it: highest bit first, as QEMU builds the list. */
function permList(perm: number): string[] {
  return PERM_QAPI_NAMES.filter((_, i) => perm & (1 << i)).reverse();
}

/**
 * XDbgBlockGraph: every node, every parent that is not a node (block backends: jobs' and exports';
 * jobs, one graph node per job id) and every edge with its permissions. Ids are numbered from 1 in the
 * order QEMU's xdbg_graph_add_node meets them: backends, then jobs, then nodes. The monitor's reference
 * is not an edge in QEMU and is left out. The numbering and the list order are not stable in QEMU (it
 * walks a hash table), so scripts match nodes by name.
 */
function blockGraph(core: Core): unknown {
  const nodes = core.graph.allNodes();
  const ids = new Map<unknown, number>();
  const out: { nodes: { id: number; type: string; name: string }[]; edges: unknown[] } = { nodes: [], edges: [] };
  const add = (key: unknown, type: string, name: string): number => {
    let id = ids.get(key);
    if (id === undefined) {
      id = ids.size + 1;
      ids.set(key, id);
      out.nodes.push({ id, type, name });
    }
    return id;
  };
  const external = (p: ExternalParent): number =>
    p.kind === 'job' ? add(`job:${p.name ?? ''}`, 'block-job', p.name ?? '') : add(p, 'block-backend', p.name ?? '');
  const edges = nodes.flatMap((n) => n.parents.filter((e) => e.parentKind !== 'monitor'));
  for (const kind of ['backend', 'job'] as const) {
    for (const e of edges) if (e.parentKind === kind) external(e.parent as ExternalParent);
  }
  for (const n of nodes) add(n, 'block-driver', n.nodeName);
  for (const e of edges) {
    const parent = e.parentNode ? add(e.parentNode, 'block-driver', e.parentNode.nodeName) : external(e.parent as ExternalParent);
    out.edges.push({ parent, child: add(e.node, 'block-driver', e.node.nodeName), name: e.name, perm: permList(e.perm), 'shared-perm': permList(e.shared) });
  }
  return out;
}

/** BlockDeviceInfo, as QEMU's query-named-block-nodes shows it. */
export async function blockDeviceInfo(core: Core, node: BlockNode, flat: boolean): Promise<Record<string, unknown>> {
  const opts = node.openOptions;
  const cache = (opts.cache ?? {}) as { direct?: boolean; 'no-flush'?: boolean };
  const image = await imageInfoWithSizes(node, flat);
  const info: Record<string, unknown> = {
    'iops_rd': 0,
    'detect_zeroes': (opts['detect-zeroes'] as string | undefined) ?? 'off',
    image,
    'iops_wr': 0,
    ro: node.readOnly,
    'node-name': node.nodeName,
    // QEMU counts the backing images of the ImageInfo it builds, which flat leaves out: 0 when flat.
    'backing_file_depth': flat ? 0 : backingDepth(node),
    drv: node.driver,
    iops: 0,
    'bps_wr': 0,
    'write_threshold': writeThreshold(node),
    encrypted: false,
    bps: 0,
    'bps_rd': 0,
    cache: { 'no-flush': cache['no-flush'] ?? false, direct: cache.direct ?? false, writeback: true },
    file: image.filename,
  };
  // The backing node's file name, only when there is a backing node (QEMU 7.2: not the name the
  // image records, which may be relative, and nothing for an image opened without its backing).
  const backingFile = node.backing()?.imageInfo().filename;
  if (backingFile !== undefined) info['backing_file'] = backingFile;
  const bitmaps = core.bitmaps.info(node);
  if (bitmaps !== undefined) info['dirty-bitmaps'] = bitmaps;
  return info;
}

export const blockdevCommands: CommandDef[] = [
  command(
    'blockdev-add',
    {},
    async (args, core) => {
      await core.openForMonitor(args);
      return {};
    },
    { boxed: (core) => core.graph.blockdevOptionsSchema() },
  ),
  command('blockdev-del', { 'node-name': str }, async (args, core) => {
    const name = args['node-name'] as string;
    const node = core.graph.find(name);
    if (!node) throw genericError(`Failed to find node with node-name='${name}'`);
    // QEMU's order: a BlockBackend (a job's, an export's), op blockers, the monitor's reference, others.
    if (node.parentsOfKind('backend').length > 0) throw genericError(`Node ${name} is in use`);
    const blocked = node.opBlocker('drive-del');
    if (blocked) throw genericError(`Node '${name}' is busy: ${blocked}`);
    const monitorRef = node.parentsOfKind('monitor')[0];
    if (!monitorRef) throw genericError(`Node ${name} is not owned by the monitor`);
    if (node.parents.length > 1) throw genericError(`Block device ${name} is in use`);
    // The node goes even when storing its persistent bitmaps fails (reported on stderr), as in QEMU.
    BlockNode.detachParent(monitorRef);
    await core.graph.remove(node);
    return {};
  }),
  command('block_resize', { '*device': str, '*node-name': str, size: int }, async (args, core) => {
    const device = args.device as string | undefined;
    const nodeName = args['node-name'] as string | undefined;
    const size = args.size as number;
    // bdrv_lookup_bs: there are no devices (BlockBackends with names) here, so only node-name finds one.
    const node = nodeName !== undefined ? core.graph.find(nodeName) : undefined;
    if (!node) throw genericError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
    // After the lookup, as QEMU's qmp_block_resize.
    if (size < 0) throw genericError("Parameter 'size' expects a >0 size");
    // An op blocker (a job on the node) refuses with QEMU's words, which print the absent device as '(null)'.
    if (node.opBlocker('resize')) throw genericError(`Device '${device ?? '(null)'}' is in use`);
    // A BlockBackend that resizes and shares everything, for the time of the resize.
    const edge = node.attachParent(unnamedBackend(), 'root', BLK_PERM_RESIZE, BLK_PERM_ALL);
    try {
      // Drained, as QEMU's qmp_block_resize: no request checked against the old size may still be
      // on its way (a write past a new, smaller end would land after the crop).
      await node.drained(() => node.truncate(size));
    } finally {
      BlockNode.detachParent(edge);
    }
    return {};
  }),
  command('blockdev-reopen', { options: arrayOf(any) }, async (args, core) => {
    const list: Array<{ node: BlockNode; options: Record<string, unknown> }> = [];
    for (const [i, raw] of (args.options as unknown[]).entries()) {
      const options = visitNestedOptions(core.graph.blockdevOptionsSchema(), raw, `options[${i}]`);
      const name = options['node-name'] as string | undefined;
      if (name === undefined) throw genericError('node-name not specified');
      const node = core.graph.find(name);
      if (!node) throw genericError(`Failed to find node with node-name='${name}'`);
      list.push({ node, options });
    }
    await core.graph.reopen(list);
    return {};
  }),
  command('query-named-block-nodes', { '*flat': bool }, async (args, core) => {
    const flat = (args.flat as boolean | undefined) ?? false;
    const nodes = core.graph.allNodes().reverse();
    const out: unknown[] = [];
    for (const n of nodes) out.push(await blockDeviceInfo(core, n, flat));
    return out;
  }),
  command('x-debug-query-block-graph', {}, async (_args, core) => blockGraph(core)),
];
