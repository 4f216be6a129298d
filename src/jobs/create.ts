/**
 * blockdev-create's job and the `file` driver's image creation.
 *
 * QEMU's create job is not a block job: it emits only JOB_STATUS_CHANGE (no BLOCK_JOB_* events), is not
 * listed by query-block-jobs, and block-job-* commands do not find it. It auto-finalizes and waits for
 * job-dismiss. Its progress is 0/1 until the driver's create has returned, then 1/1 (also on failure).
 *
 * File creation follows file-posix: create (O_CREAT, mode 0644, keeping an existing file), take the
 * write and resize lock bytes and check nobody else holds conflicting ones, truncate to 0, then grow to
 * the size with the preallocation mode. A failure leaves what QEMU leaves: the (empty) file exists.
 */
import { promises as fsp, constants as fsc } from 'node:fs';
import { genericError, errorCode, strerror } from '../errors.js';
import { Job } from './job.js';
import type { JobRegistry } from './registry.js';
import { nativeAddon, errnoCode } from '../block/native.js';
import { applyImageLocks } from '../block/drivers/file.js';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, BLK_PERM_WRITE } from '../block/permissions.js';

export type PreallocMode = 'off' | 'metadata' | 'falloc' | 'full';
export const PREALLOC_MODES: readonly PreallocMode[] = ['off', 'metadata', 'falloc', 'full'];

export class CreateJob extends Job {
  readonly type = 'create';
  override readonly isBlockJob = false;

  constructor(
    registry: JobRegistry,
    id: string,
    private readonly work: () => Promise<void>,
  ) {
    super(registry, { id, autoFinalize: true, autoDismiss: false });
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(1);
    try {
      await this.work();
    } finally {
      this.progressUpdate(1);
    }
  }
}

/** BlockdevCreateOptionsFile. */
export interface FileCreateOptions {
  filename: string;
  size: number;
  preallocation?: PreallocMode;
  /** Accepted and ignored (btrfs only in QEMU). */
  nocow?: boolean;
  'extent-size-hint'?: number;
}

const ZERO_CHUNK = 1 << 20;

function osError(prefix: string, err: unknown): Error {
  return genericError(`${prefix}: ${strerror(errorCode(err))}`);
}

/** Create (or re-create) a host file of `size` bytes, as QEMU's file driver does for blockdev-create. */
export async function createFile(opts: FileCreateOptions): Promise<void> {
  const { filename, size } = opts;
  const prealloc = opts.preallocation ?? 'off';
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(filename, fsc.O_RDWR | fsc.O_CREAT, 0o644);
  } catch (err) {
    throw osError(`Could not create '${filename}'`, err);
  }
  try {
    // Take write+resize and refuse to share resize, then check nobody else conflicts (a node open
    // read-write on the same file, here or in a QEMU process, holds the write lock).
    if (nativeAddon()) applyImageLocks(fh.fd, filename, new Set(), BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL & ~BLK_PERM_RESIZE);
    try {
      await fh.truncate(0);
    } catch (err) {
      throw osError('Could not resize file', err);
    }
    await growFile(fh, size, prealloc);
  } finally {
    // Closing the descriptor drops its lock bytes.
    await fh.close().catch(() => undefined);
  }
}

/** Grow an empty file to `size` with the preallocation mode (raw_regular_truncate from length 0). */
async function growFile(fh: fsp.FileHandle, size: number, prealloc: PreallocMode): Promise<void> {
  switch (prealloc) {
    case 'off':
      try {
        await fh.truncate(size);
      } catch (err) {
        throw osError('Could not resize file', err);
      }
      return;
    case 'full':
      try {
        await fh.truncate(size);
      } catch (err) {
        throw osError('Could not resize file', err);
      }
      try {
        const zeroes = Buffer.alloc(Math.min(ZERO_CHUNK, Math.max(size, 1)));
        for (let pos = 0; pos < size; ) {
          const n = Math.min(zeroes.length, size - pos);
          const { bytesWritten } = await fh.write(zeroes, 0, n, pos);
          pos += bytesWritten;
        }
        await fh.sync();
      } catch (err) {
        await fh.truncate(0).catch(() => undefined);
        throw osError('Could not write zeros for preallocation', err);
      }
      return;
    case 'falloc': {
      const n = nativeAddon();
      if (!n) throw genericError('Could not preallocate new data: Operation not supported');
      if (size === 0) return;
      const r = await n.fallocate(fh.fd, 0, 0, size);
      if (r < 0) {
        await fh.truncate(0).catch(() => undefined);
        throw genericError(`Could not preallocate new data: ${strerror(errnoCode(-r))}`);
      }
      return;
    }
    default:
      throw genericError(`Unsupported preallocation mode: ${prealloc}`);
  }
}
