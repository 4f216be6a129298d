/**
 * Persistent dirty bitmaps across open and close (formats.md §2.5, reference §2.4): what the bitmap
 * layer does with a node that implements PersistentBitmapStore (qcow2).
 *
 *   loadPersistentBitmaps   after the node is opened: one persistent DirtyBitmap per stored bitmap
 *                           (enabled = the 'auto' flag); in_use on disk → inconsistent (empty,
 *                           disabled, only removable), unless the image's write-intent record
 *                           covers it: then it comes back consistent, recovered (logged through
 *                           `log`); a read-only node → readonly bitmaps.
 *   storePersistentBitmaps  before the node is closed: the persistent bitmaps' bits are written back
 *                           and in_use cleared. A failure is thrown with QEMU's wording ("Lost
 *                           persistent bitmaps during inactivation of node ...") and never ignored.
 */
import { genericError, type QmpError } from '../errors.js';
import type { BlockNode } from '../block/node.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import type { BitmapManager } from './manager.js';
import { persistentStore } from '../block/bitmap-store.js';

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Load the node's stored bitmaps into the manager. On failure nothing is left attached and the error is thrown. */
export async function loadPersistentBitmaps(manager: BitmapManager, node: BlockNode, log?: (line: string) => void): Promise<DirtyBitmap[]> {
  const store = persistentStore(node);
  if (!store?.loadPersistentDirtyBitmaps) return [];
  const created: DirtyBitmap[] = [];
  try {
    const list = await store.loadPersistentDirtyBitmaps();
    for (const s of list) {
      const bm = manager.create(node, s.name, s.granularity, { persistent: true, disabled: !s.enabled || s.inconsistent });
      created.push(bm);
      if (s.inconsistent) bm.inconsistent = true;
      else if (s.data) bm.loadFromBuffer(s.data);
      if (s.recovered) {
        bm.recovered = true;
        log?.(`node '${node.nodeName}': dirty bitmap '${s.name}' was in use when the image was last written and is recovered from its write-intent record (${s.recovered.regions} region(s) of ${s.recovered.regionSize} bytes marked dirty, ${bm.count()} bytes dirty)`);
      }
      if (node.readOnly) bm.readonly = true;
    }
    return created;
  } catch (err) {
    for (const bm of created) manager.release(bm);
    throw genericError(`Could not load persistent bitmaps of node '${node.nodeName}': ${message(err)}`);
  }
}

/**
 * The node's persistent bitmaps that are written back at close (not read-only, not inconsistent, not
 * being removed), in the manager's order: newest first, as QEMU walks them. The store keeps the place
 * of bitmaps already in the image and appends new ones in this order, so three bitmaps added a, b, c
 * are stored c, b, a (qemu-img info lists them so) and, loaded again (each new one at the head of the
 * list, as QEMU does), listed a, b, c by query-named-block-nodes: QEMU 7.2's orders.
 */
function bitmapsToStore(manager: BitmapManager, node: BlockNode): DirtyBitmap[] {
  return manager.list(node).filter((b) => b.persistent && b.name !== undefined && !b.readonly && !b.inconsistent && !b.skipStore);
}

/**
 * Write the node's persistent bitmaps into its image (qcow2_store_persistent_dirty_bitmaps). Nodes
 * without persistent storage, and read-only nodes with only read-only bitmaps, are left alone.
 */
export async function storePersistentBitmaps(manager: BitmapManager, node: BlockNode): Promise<void> {
  // A node whose open failed before its write phase has written nothing: its image keeps what it had.
  if (!node.activated) return;
  const store = persistentStore(node);
  const list = bitmapsToStore(manager, node);
  if (!store?.storePersistentDirtyBitmaps) {
    if (list.length) throw lostError(node, `Can't store persistent bitmaps to ${node.nodeName}`);
    return;
  }
  if (node.readOnly) {
    if (list.length) throw lostError(node, 'No write access');
    return;
  }
  try {
    await store.storePersistentDirtyBitmaps(
      list.map((b) => ({ name: b.name!, granularity: b.granularity, auto: b.enabled, data: b.toBuffer() })),
    );
  } catch (err) {
    throw lostError(node, message(err));
  }
}

function lostError(node: BlockNode, msg: string): QmpError {
  return genericError(`Lost persistent bitmaps during inactivation of node '${node.nodeName}': ${msg}`);
}

/**
 * After blockdev-reopen changed a node's read-only state (qcow2_reopen_bitmaps_ro/rw): its persistent
 * bitmaps are read-only with it, or writable again (the image marked them in use on disk then).
 * Going read-only, storePersistentBitmaps ran first, while the node could still write.
 */
export function persistentBitmapsFollowReopen(manager: BitmapManager, node: BlockNode): void {
  for (const bm of manager.list(node)) if (bm.persistent && !bm.inconsistent) bm.readonly = node.readOnly;
}
