/**
 * Internal snapshots through the graph, as QEMU's block/snapshot.c: a node whose driver keeps no
 * snapshots hands the request to its only data child (bdrv_snapshot_fallback: a raw node's or a
 * filter's file, a filter's backing), so a throttle node over a qcow2 node snapshots the qcow2 image.
 * The drivers' side is BlockNode.snapshotList/Create/Delete (qcow2: drivers/qcow2/snapshots.ts).
 */
import { BlockIOError, genericError, strerror } from '../errors.js';
import type { BlockNode, SnapshotEntry } from './node.js';
import { isFilter } from './chain.js';

/** bdrv_snapshot_fallback: the child that answers for `node`, if exactly one child holds its data. */
export function snapshotFallback(node: BlockNode): BlockNode | undefined {
  const fallback = node.child('file') ?? (isFilter(node) ? node.child('backing') : undefined);
  if (!fallback) return undefined;
  for (const c of node.children) if (c !== fallback && c.role !== 'cow') return undefined;
  return fallback.node;
}

/** The node whose driver keeps the snapshots `node` shows (itself, or down its fallbacks). */
export function snapshotNode(node: BlockNode): BlockNode | undefined {
  for (let n: BlockNode | undefined = node; n; n = snapshotFallback(n)) if (n.snapshotList) return n;
  return undefined;
}

/** bdrv_can_snapshot: writable, and some node at or below it keeps snapshots. */
export function canSnapshot(node: BlockNode): boolean {
  return !node.readOnly && snapshotNode(node) !== undefined && !snapshotNode(node)!.readOnly;
}

/** bdrv_snapshot_list: the snapshots, or ENOTSUP. */
export function listSnapshots(node: BlockNode): SnapshotEntry[] {
  const n = snapshotNode(node);
  if (!n) throw new BlockIOError('ENOTSUP');
  return n.snapshotList!();
}

/**
 * bdrv_snapshot_find_by_id_and_name: the first snapshot with that id and/or name, undefined when
 * none; a node that keeps none fails as QEMU's ("Failed to get a snapshot list: …").
 */
export function findSnapshotByIdAndName(node: BlockNode, id: string | undefined, name: string | undefined): SnapshotEntry | undefined {
  let list: SnapshotEntry[];
  try {
    list = listSnapshots(node);
  } catch (err) {
    throw genericError(`Failed to get a snapshot list: ${strerror((err as BlockIOError).code ?? 'EIO')}`);
  }
  if (id === undefined && name === undefined) return undefined;
  return list.find((sn) => (id === undefined || sn.id === id) && (name === undefined || sn.name === name));
}

/** bdrv_snapshot_create. */
export function createSnapshot(node: BlockNode, sn: Omit<SnapshotEntry, 'id' | 'vmStateSize'>): Promise<SnapshotEntry> {
  const n = snapshotNode(node);
  if (!n?.snapshotCreate) throw new BlockIOError('ENOTSUP');
  return n.snapshotCreate(sn);
}

/** bdrv_snapshot_delete (its errors are the driver's messages). */
export function deleteSnapshot(node: BlockNode, id: string | undefined, name: string | undefined): Promise<SnapshotEntry> {
  const n = snapshotNode(node);
  if (!n?.snapshotDelete) throw genericError(`Block format '${node.driver}' used by device '${node.nodeName}' does not support internal snapshot deletion`);
  return n.snapshotDelete(id, name);
}

/** QAPI SnapshotInfo, members in QEMU's order (icount only when there is one). */
export function snapshotInfo(sn: SnapshotEntry): Record<string, unknown> {
  const info: Record<string, unknown> = {
    id: sn.id,
    name: sn.name,
    'vm-state-size': sn.vmStateSize,
    'date-sec': sn.dateSec,
    'date-nsec': sn.dateNsec,
    'vm-clock-sec': Number(sn.vmClockNsec / 1_000_000_000n),
    'vm-clock-nsec': Number(sn.vmClockNsec % 1_000_000_000n),
  };
  if (sn.icount !== 0xffffffffffffffffn) info.icount = Number(sn.icount);
  return info;
}
