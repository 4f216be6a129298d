/**
 * blockdev-backup and drive-backup, and their `transaction` actions: argument checks in QEMU's order
 * and words (blockdev.c's do_backup_common, then block/backup.c's backup_job_create), then a BackupJob.
 *
 * As in QEMU the commands are one-action transactions (blockdev_do_action): the job is made in the
 * action's prepare and started in its commit, so a failing later action of a `transaction` leaves no
 * job behind, and `completion-mode: grouped` puts the backups of one transaction in one job group (one
 * failing job cancels the others, and no bitmap of the group changes: each reclaims its bitmap).
 *
 * Members from upstream QEMU since 7.2 (qemu-storage-daemon 7.2 refuses them as unexpected):
 * `on-cbw-error` (10.1), `discard-source` (9.1), `x-perf.min-cluster-size` (9.2).
 */
import { genericError } from '../errors.js';
import { bool, enumOf, int, object, str, type Members } from '../qapi/schema.js';
import type { CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode } from '../block/node.js';
import { BITMAP_ALLOW_RO, BITMAP_DEFAULT, type DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { checkMinClusterSize, type OnCbwError } from '../block/filters/copy-before-write.js';
import { appendCbw, BackupJob, dropCbw, type BackupSync } from '../jobs/backup.js';
import type { BitmapSyncMode } from '../jobs/mirror.js';
import type { OnError } from '../jobs/job.js';
import { JobTxn } from '../jobs/txn.js';
import type { TransactionAction } from '../base/transaction.js';
import { registerTransactionAction, runTransaction, type TransactionContext } from './transaction.js';
import { checkBusy } from './mirror.js';
import * as path from 'node:path';

const INT_MAX = 2147483647;

const BackupCommon: Members = {
  '*job-id': str,
  device: str,
  sync: enumOf('MirrorSyncMode', ['top', 'full', 'none', 'incremental', 'bitmap']),
  '*speed': int,
  '*bitmap': str,
  '*bitmap-mode': enumOf('BitmapSyncMode', ['on-success', 'never', 'always']),
  '*compress': bool,
  '*on-source-error': enumOf('BlockdevOnError', ['report', 'ignore', 'enospc', 'stop', 'auto']),
  '*on-target-error': enumOf('BlockdevOnError', ['report', 'ignore', 'enospc', 'stop', 'auto']),
  // Upstream since 7.2: QEMU 10.1.
  '*on-cbw-error': enumOf('OnCbwError', ['break-guest-write', 'break-snapshot']),
  '*auto-finalize': bool,
  '*auto-dismiss': bool,
  '*filter-node-name': str,
  // Upstream since 7.2: QEMU 9.1.
  '*discard-source': bool,
  '*x-perf': object('BackupPerf', {
    '*use-copy-range': bool,
    '*max-workers': int,
    '*max-chunk': int,
    // Upstream since 7.2: QEMU 9.2.
    '*min-cluster-size': int,
  }),
};

export const BLOCKDEV_BACKUP: Members = { ...BackupCommon, target: str };
export const DRIVE_BACKUP: Members = { ...BackupCommon, target: str, '*format': str, '*mode': enumOf('NewImageMode', ['existing', 'absolute-paths']) };

/** do_backup_common's bitmap checks: the frozen-to-be bitmap and the effective sync and mode. */
function checkBitmapArgs(core: Core, args: Record<string, unknown>, source: BlockNode): { sync: BackupSync; bitmap?: DirtyBitmap; mode?: BitmapSyncMode } {
  let sync = args.sync as string;
  const name = args.bitmap as string | undefined;
  let mode = args['bitmap-mode'] as BitmapSyncMode | undefined;
  if ((sync === 'bitmap' || sync === 'incremental') && name === undefined) {
    // Before 'incremental' becomes 'bitmap', so that the message names what the caller asked for.
    throw genericError(`must provide a valid bitmap name for '${sync}' sync mode`);
  }
  if (sync === 'incremental') {
    if (mode !== undefined && mode !== 'on-success') throw genericError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    sync = 'bitmap';
    mode = 'on-success';
  }
  let bitmap: DirtyBitmap | undefined;
  if (name !== undefined) {
    bitmap = core.bitmaps.find(source, name);
    if (!bitmap) throw genericError(`Bitmap '${name}' could not be found`);
    if (mode === undefined) throw genericError('Bitmap sync mode must be given when providing a bitmap');
    bitmap.check(BITMAP_ALLOW_RO);
    if (sync === 'none') throw genericError(`sync mode '${sync}' does not produce meaningful bitmap outputs`);
    if (mode === 'never' && sync !== 'bitmap') throw genericError(`Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`);
  }
  if (name === undefined && mode !== undefined) throw genericError('Cannot specify bitmap sync mode without a bitmap');
  return { sync: sync as BackupSync, bitmap, mode };
}

/**
 * do_backup_common + backup_job_create: every check, then the job (created, not started), or an error
 * with nothing changed.
 */
async function createBackupJob(core: Core, args: Record<string, unknown>, source: BlockNode, target: BlockNode, txn: JobTxn | undefined, ownedTarget: boolean): Promise<BackupJob> {
  const perf = (args['x-perf'] ?? {}) as Record<string, number | undefined>;
  // Without max-workers the filter decides (QEMU's 64, for each stream of a target with several).
  const maxWorkers = perf['max-workers'];
  const maxChunk = perf['max-chunk'] ?? 0;
  const { sync, bitmap, mode } = checkBitmapArgs(core, args, source);
  // backup_job_create.
  if (source === target) throw genericError('Source and target cannot be the same');
  if (args.compress === true && !target.supportsCompressedWrites()) {
    // QEMU 7.2 names the target's BlockBackend (bdrv_get_device_name), which a node added by
    // blockdev-add has none of: the message ends with an empty name, as qemu-storage-daemon's does.
    throw genericError('Compression is not supported for this drive ');
  }
  checkBusy(source, 'backup-source');
  checkBusy(target, 'backup-target');
  if (maxWorkers !== undefined && (maxWorkers < 1 || maxWorkers > INT_MAX)) throw genericError(`max-workers must be between 1 and ${INT_MAX}`);
  if (maxChunk < 0) throw genericError('max-chunk must be zero (which means no limit) or positive');
  const minClusterSize = checkMinClusterSize(perf['min-cluster-size']);
  if (bitmap) {
    if (mode !== 'never') bitmap.check(BITMAP_DEFAULT);
    core.bitmaps.createSuccessor(bitmap);
  }
  const undo = async (filter?: Parameters<typeof dropCbw>[1]) => {
    if (filter) await dropCbw(core.graph, filter);
    if (bitmap?.successor) core.bitmaps.reclaim(bitmap);
  };
  if (target.length() !== source.length()) {
    await undo();
    throw genericError('Source and target image have different sizes');
  }
  let filter;
  try {
    filter = appendCbw(core.graph, source, target, {
      filterNodeName: args['filter-node-name'] as string | undefined,
      onCbwError: (args['on-cbw-error'] as OnCbwError | undefined) ?? 'break-guest-write',
      minClusterSize,
      maxWorkers,
      maxChunk,
      discardSource: args['discard-source'] === true,
      compress: args.compress === true,
    });
  } catch (err) {
    await undo();
    throw err;
  }
  let job: BackupJob;
  try {
    if (maxChunk && maxChunk < filter.clusterSize) throw genericError(`Required max-chunk (${maxChunk}) is less than backup cluster size (${filter.clusterSize})`);
    job = new BackupJob(core.jobs, {
      id: (args['job-id'] as string | undefined) ?? '',
      autoFinalize: args['auto-finalize'] as boolean | undefined,
      autoDismiss: args['auto-dismiss'] as boolean | undefined,
      txn,
      graph: core.graph,
      bitmaps: core.bitmaps,
      source,
      target,
      sync,
      syncBitmap: bitmap ? { bitmap, mode: mode! } : undefined,
      filter,
      onSourceError: (args['on-source-error'] as OnError | undefined) ?? 'report',
      onTargetError: (args['on-target-error'] as OnError | undefined) ?? 'report',
      ownedTarget,
    });
  } catch (err) {
    await undo(filter);
    throw err;
  }
  await job.setUp((args.speed as number | undefined) ?? 0, () => job.install());
  return job;
}

/** The job group of a transaction's grouped backups (one per transaction). */
function groupFor(ctx: TransactionContext): JobTxn | undefined {
  if (ctx.completionMode !== 'grouped') return undefined;
  let txn = ctx.shared.get('backup-job-txn') as JobTxn | undefined;
  if (!txn) ctx.shared.set('backup-job-txn', (txn = new JobTxn()));
  return txn;
}

/** The action state: the job is made in prepare, started in commit, cancelled on abort. */
function backupAction(make: () => Promise<BackupJob>): TransactionAction {
  let job: BackupJob | undefined;
  return {
    async prepare() {
      job = await make();
    },
    commit() {
      job?.start();
    },
    async abort() {
      // job_cancel_sync of a job that never started: it ends at once.
      if (job && !job.isConcludedOrNull()) await job.cancel(true);
    },
  };
}

function blockdevBackupAction(core: Core, data: Record<string, unknown>, ctx?: TransactionContext): TransactionAction {
  return backupAction(async () => {
    const source = core.graph.lookup(data.device as string);
    const target = core.graph.lookup(data.target as string);
    return createBackupJob(core, data, source, target, ctx && groupFor(ctx), false);
  });
}

/** drive_backup_prepare: the target image is created (unless mode=existing) and opened for the job. */
function driveBackupAction(core: Core, data: Record<string, unknown>, ctx?: TransactionContext): TransactionAction {
  return backupAction(async () => {
    const source = core.graph.lookup(data.device as string);
    const mode = (data.mode as string | undefined) ?? 'absolute-paths';
    const format = (data.format as string | undefined) ?? (mode === 'existing' ? undefined : source.formatLayer().driver);
    checkBusy(source, 'backup-source');
    let sync = data.sync as string;
    let backing: BlockNode | undefined;
    if (sync === 'top') {
      backing = source.formatLayer().backing();
      if (!backing) sync = 'full';
    }
    if (sync === 'none') backing = source;
    const filename = data.target as string;
    if (mode !== 'existing') {
      if (format !== 'qcow2' && format !== 'raw') throw genericError(`drive-backup: format '${String(format)}' is not supported (qcow2, raw)`);
      const backingFile = backing && format === 'qcow2' ? { filename: path.resolve(backing.imageInfo().filename), format: backing.formatLayer().driver } : undefined;
      await core.graph.createImage(format, filename, source.length(), backingFile);
    }
    // The target's backing is the node already open (the source, or its backing), not the image named
    // in the header opened a second time (which its lock would refuse).
    const target = await core.graph.open({
      driver: format ?? 'raw',
      discard: 'unmap',
      'detect-zeroes': 'unmap',
      file: { driver: 'file', filename },
      ...((format ?? 'raw') === 'qcow2' ? { backing: null } : {}),
    });
    try {
      if (backing && target.formatLayer().driver === 'qcow2') target.formatLayer().attachChild('backing', backing, 'cow');
      return await createBackupJob(core, { ...data, sync }, source, target, ctx && groupFor(ctx), true);
    } catch (err) {
      await core.graph.remove(target).catch(() => undefined);
      throw err;
    }
  });
}

registerTransactionAction({ type: 'blockdev-backup', dataType: 'BlockdevBackup', data: BLOCKDEV_BACKUP, supportsGrouped: true, create: (d, ctx) => blockdevBackupAction(ctx.core, d, ctx) });
registerTransactionAction({ type: 'drive-backup', dataType: 'DriveBackup', data: DRIVE_BACKUP, supportsGrouped: true, create: (d, ctx) => driveBackupAction(ctx.core, d, ctx) });

export const backupCommands: CommandDef[] = [
  // blockdev_do_action: a transaction of one action.
  { name: 'blockdev-backup', args: BLOCKDEV_BACKUP, handler: async (args, core) => (await runTransaction(core, [{ type: 'blockdev-backup', data: args }]), {}) },
  { name: 'drive-backup', args: DRIVE_BACKUP, handler: async (args, core) => (await runTransaction(core, [{ type: 'drive-backup', data: args }]), {}) },
];
