/**
 * Snapshots as commands and `transaction` actions: the internal ones are internal-snapshot.ts's,
 * registered here so that the action kinds come in QEMU's order.
 *
 * External snapshots: `blockdev-snapshot` (the overlay is a node already added) and
 * `blockdev-snapshot-sync` (the overlay image is created and opened), as commands and as `transaction`
 * actions, with QEMU 7.2's checks, order and messages (external_snapshot_prepare/commit/abort/clean).
 *
 * prepare: the node is flushed, the overlay checked (no consistent-read user, no filter, no backing of
 *   its own, a format with backing files), then appended above the node in one synchronous step
 *   (BlockGraph.append: the node becomes the overlay's backing, its parents move to the overlay). The
 *   requests that had reached the node before that step end before prepare returns, and requests that
 *   reach the overlay wait (BlockNode.holdRequests) until the whole transaction is over, as QEMU's
 *   drained section: every write acknowledged before the snapshot is in the node, every later one
 *   goes to the overlay, and a bitmap added to the overlay in the same transaction records them all.
 * commit: the node is reopened read-only (errors ignored, as QEMU).
 * abort: the overlay is taken out again; requests it held go to the node (their parents are back
 *   there). A blockdev-snapshot-sync overlay is closed; its image file stays, as in QEMU.
 *
 * Downstream extension `__org.bitmirror_carry-bitmaps` (bool, default false): every recording,
 * consistent named bitmap of the node gets a new, empty bitmap of the same name, granularity and
 * persistence on the overlay, created at the instant of the switch — what libvirt does by hand with
 * block-dirty-bitmap-add actions after its snapshot (consumers.md §1.1), built in.
 */
import { errorCode, genericError, strerror } from '../errors.js';
import { bool, enumOf, str, type Members } from '../qapi/schema.js';
import type { CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode } from '../block/node.js';
import { BLK_PERM_CONSISTENT_READ, cumulative } from '../block/permissions.js';
import { isFilter } from '../block/chain.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import type { TransactionAction } from '../base/transaction.js';
import { registerTransactionAction, runTransaction } from './transaction.js';
import { checkBusy } from './mirror.js';
import { BLOCKDEV_SNAPSHOT_INTERNAL, internalSnapshotAction, internalSnapshotCommands } from './internal-snapshot.js';
import * as path from 'node:path';

export const CARRY_BITMAPS = '__org.bitmirror_carry-bitmaps';

const BLOCKDEV_SNAPSHOT: Members = { node: str, overlay: str, [`*${CARRY_BITMAPS}`]: bool };
const BLOCKDEV_SNAPSHOT_SYNC: Members = {
  '*device': str,
  '*node-name': str,
  'snapshot-file': str,
  '*snapshot-node-name': str,
  '*format': str,
  '*mode': enumOf('NewImageMode', ['existing', 'absolute-paths']),
  [`*${CARRY_BITMAPS}`]: bool,
};

/**
 * bdrv_lookup_bs(device, node-name): a device is a BlockBackend name, and bitmirror has no named
 * BlockBackends (as qemu-storage-daemon), so only the node-name can find a node.
 */
function lookupDeviceOrNode(core: Core, device: string | undefined, nodeName: string | undefined): BlockNode {
  const node = nodeName !== undefined ? core.graph.find(nodeName) : undefined;
  if (!node) throw genericError(`Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
  return node;
}

/** The overlay checks of external_snapshot_prepare, in QEMU's order. */
function checkOverlay(overlay: BlockNode): void {
  if (cumulative(overlay.parents).perm & BLK_PERM_CONSISTENT_READ) throw genericError('The overlay is already in use');
  if (isFilter(overlay)) throw genericError('Filters cannot be used as overlays');
  if (overlay.backing()) throw genericError('The overlay already has a backing image');
  if (!overlay.supportsBacking()) throw genericError('The overlay does not support backing images');
}

/** The node's recording, consistent named bitmaps (what libvirt propagates into a new overlay). */
function recordingBitmaps(core: Core, node: BlockNode): DirtyBitmap[] {
  return core.bitmaps.list(node).filter((bm) => bm.name !== undefined && bm.enabled && !bm.inconsistent);
}

function snapshotAction(core: Core, data: Record<string, unknown>, sync: boolean): TransactionAction {
  let node: BlockNode | undefined;
  let overlay: BlockNode | undefined;
  /** The overlay was opened by this action (blockdev-snapshot-sync): closed again on abort. */
  let opened = false;
  let undoAppend: (() => void) | undefined;
  let releaseHeld: ((redirect?: BlockNode) => void) | undefined;
  const carried: DirtyBitmap[] = [];
  return {
    async prepare() {
      node = sync ? lookupDeviceOrNode(core, data.device as string | undefined, data['node-name'] as string | undefined) : core.graph.lookup(data.node as string);
      checkBusy(node, 'external-snapshot');
      if (!node.readOnly) {
        try {
          await node.flush();
        } catch (err) {
          throw genericError(`Write to node '${node.nodeName}' failed: ${strerror(errorCode(err))}`);
        }
      }
      if (sync) {
        overlay = await openSyncOverlay(core, node, data);
        opened = true;
      } else {
        overlay = core.graph.lookup(data.overlay as string);
      }
      checkOverlay(overlay);
      const release = overlay.holdRequests();
      try {
        undoAppend = core.graph.append(overlay, node);
      } catch (err) {
        release();
        throw err;
      }
      releaseHeld = release;
      // What was written to the node before the switch has landed in it before the snapshot is reported.
      await node.tracker.writesEnded();
      if (data[CARRY_BITMAPS] === true) {
        for (const bm of recordingBitmaps(core, node)) {
          carried.push(await core.bitmaps.add(overlay, bm.name!, { granularity: bm.granularity, persistent: bm.persistent }));
        }
      }
    },
    async commit() {
      // external_snapshot_commit: the old active layer goes read-only; a failure is ignored.
      await core.graph.setReadOnly(node!, true).catch(() => undefined);
    },
    async abort() {
      for (const bm of carried) core.bitmaps.release(bm);
      if (undoAppend) {
        undoAppend();
        undoAppend = undefined;
        releaseHeld?.(node);
        releaseHeld = undefined;
      }
      if (opened && overlay) await core.graph.remove(overlay).catch(() => undefined);
    },
    clean() {
      releaseHeld?.();
    },
  };
}

/**
 * blockdev-snapshot-sync's overlay: the image is created (mode absolute-paths, the default) naming
 * the node's file name and format as its backing file, then opened without its backing file (the
 * node is attached instead) under `snapshot-node-name`. Checks and messages as QEMU's.
 */
async function openSyncOverlay(core: Core, node: BlockNode, data: Record<string, unknown>): Promise<BlockNode> {
  const format = (data.format as string | undefined) ?? 'qcow2';
  const snapshotNodeName = data['snapshot-node-name'] as string | undefined;
  const file = data['snapshot-file'] as string;
  if (data['node-name'] !== undefined && snapshotNodeName === undefined) throw genericError('New overlay node-name missing');
  if (snapshotNodeName !== undefined && core.graph.find(snapshotNodeName)) throw genericError('New overlay node-name already in use');
  if (((data.mode as string | undefined) ?? 'absolute-paths') !== 'existing') {
    // bdrv_img_create's checks.
    if (!core.graph.driverNames().includes(format)) throw genericError(`Unknown file format '${format}'`);
    if (format !== 'qcow2') throw genericError(`Backing file not supported for file format '${format}'`);
    await core.graph.createImage(format, file, node.length(), { filename: node.imageInfo().filename, format: node.driver });
  }
  return core.graph.open({
    driver: format,
    ...(snapshotNodeName !== undefined ? { 'node-name': snapshotNodeName } : {}),
    file: { driver: 'file', filename: path.resolve(file) },
    ...(format === 'qcow2' ? { backing: null } : {}),
    'read-only': node.readOnly,
  });
}

registerTransactionAction({ type: 'blockdev-snapshot', dataType: 'BlockdevSnapshot', data: BLOCKDEV_SNAPSHOT, create: (d, ctx) => snapshotAction(ctx.core, d, false) });
registerTransactionAction({ type: 'blockdev-snapshot-internal-sync', dataType: 'BlockdevSnapshotInternal', data: BLOCKDEV_SNAPSHOT_INTERNAL, create: (d, ctx) => internalSnapshotAction(ctx.core, d) });
registerTransactionAction({ type: 'blockdev-snapshot-sync', dataType: 'BlockdevSnapshotSync', data: BLOCKDEV_SNAPSHOT_SYNC, create: (d, ctx) => snapshotAction(ctx.core, d, true) });

export const snapshotCommands: CommandDef[] = [
  // blockdev_do_action: a transaction of one action.
  { name: 'blockdev-snapshot', args: BLOCKDEV_SNAPSHOT, handler: async (args, core) => (await runTransaction(core, [{ type: 'blockdev-snapshot', data: args }]), {}) },
  { name: 'blockdev-snapshot-sync', args: BLOCKDEV_SNAPSHOT_SYNC, handler: async (args, core) => (await runTransaction(core, [{ type: 'blockdev-snapshot-sync', data: args }]), {}) },
  {
    name: 'blockdev-snapshot-internal-sync',
    args: BLOCKDEV_SNAPSHOT_INTERNAL,
    handler: async (args, core) => (await runTransaction(core, [{ type: 'blockdev-snapshot-internal-sync', data: args }]), {}),
  },
  ...internalSnapshotCommands,
];
