/**
 * Internal snapshots over QMP: `blockdev-snapshot-internal-sync` (a command and a `transaction`
 * action) and `blockdev-snapshot-delete-internal-sync`, with QEMU 7.2's checks in its order and its
 * messages (blockdev.c internal_snapshot_prepare/abort/clean, qmp_blockdev_snapshot_delete_internal_sync).
 * The snapshot itself is the driver's (block/internal-snapshot.ts finds the node that keeps it).
 *
 * As QEMU's action, prepare drains the device and keeps it drained until the transaction is over
 * (new requests wait, block/node.ts holdRequests), so the snapshot and any bitmap or backup the same
 * transaction starts see the same guest writes; abort deletes the snapshot again.
 * The snapshot's date and guest clock are the wall clock, as qemu-storage-daemon 7.2's (it has no
 * guest, its virtual clock reads the real time); no icount (-1).
 */
import { errorCode, genericError, QmpError, strerror } from '../errors.js';
import { str, type Members } from '../qapi/schema.js';
import type { CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode, SnapshotEntry } from '../block/node.js';
import type { TransactionAction } from '../base/transaction.js';
import { canSnapshot, createSnapshot, deleteSnapshot, findSnapshotByIdAndName, snapshotInfo } from '../block/internal-snapshot.js';
import { checkBusy, rootNode } from './mirror.js';

export const BLOCKDEV_SNAPSHOT_INTERNAL: Members = { device: str, name: str };
const BLOCKDEV_SNAPSHOT_DELETE_INTERNAL: Members = { device: str, '*id': str, '*name': str };

/** QEMUSnapshotInfo's name is a char[256]: a longer name is cut to 255 bytes (pstrcpy). */
function snapshotName(name: string): string {
  const b = Buffer.from(name, 'utf8');
  return b.length <= 255 ? name : b.subarray(0, 255).toString('utf8');
}

/** g_get_real_time: microseconds of the wall clock. */
function realTimeMicros(): bigint {
  return BigInt(Math.floor((performance.timeOrigin + performance.now()) * 1000));
}

export function internalSnapshotAction(core: Core, data: Record<string, unknown>): TransactionAction {
  let node: BlockNode | undefined;
  let release: (() => void) | undefined;
  let created: SnapshotEntry | undefined;
  return {
    async prepare() {
      const device = data.device as string;
      const name = data.name as string;
      node = rootNode(core, device);
      // bdrv_drained_begin, paired with clean.
      release = node.holdRequests();
      await node.tracker.drain();
      checkBusy(node, 'internal-snapshot');
      if (node.readOnly) throw genericError(`Device '${device}' is read only`);
      if (!canSnapshot(node)) throw genericError(`Block format '${node.driver}' used by device '${device}' does not support internal snapshots`);
      if (name.length === 0) throw genericError('Name is empty');
      if (findSnapshotByIdAndName(node, undefined, name)) throw genericError(`Snapshot with name '${name}' already exists on device '${device}'`);
      const us = realTimeMicros();
      try {
        created = await createSnapshot(node, {
          name: snapshotName(name),
          dateSec: Number(us / 1_000_000n),
          dateNsec: Number(us % 1_000_000n) * 1000,
          vmClockNsec: us * 1000n,
          icount: 0xffffffffffffffffn,
        });
      } catch (err) {
        if (err instanceof QmpError) throw err;
        throw genericError(`Failed to create snapshot '${name}' on device '${device}': ${strerror(errorCode(err))}`);
      }
    },
    async abort() {
      if (!created || !node) return;
      const sn = created;
      await deleteSnapshot(node, sn.id, sn.name).catch((err: unknown) => {
        process.stderr.write(`Failed to delete snapshot with id '${sn.id}' and name '${sn.name}' on device '' in abort: ${(err as Error).message}\n`);
      });
    },
    clean() {
      release?.();
      release = undefined;
    },
  };
}

/** qmp_blockdev_snapshot_delete_internal_sync: returns the deleted snapshot's SnapshotInfo. */
async function deleteInternal(args: Record<string, unknown>, core: Core): Promise<unknown> {
  const device = args.device as string;
  const id = args.id as string | undefined;
  const name = args.name as string | undefined;
  const node = rootNode(core, device);
  if (id === undefined && name === undefined) throw genericError('Name or id must be provided');
  checkBusy(node, 'internal-snapshot-delete');
  const sn = findSnapshotByIdAndName(node, id, name);
  if (!sn) throw genericError(`Snapshot with id '${id ?? 'null'}' and name '${name ?? 'null'}' does not exist on device '${device}'`);
  await node.drained(() => deleteSnapshot(node, id, name));
  return snapshotInfo(sn);
}

export const internalSnapshotCommands: CommandDef[] = [
  { name: 'blockdev-snapshot-delete-internal-sync', args: BLOCKDEV_SNAPSHOT_DELETE_INTERNAL, handler: deleteInternal },
];
