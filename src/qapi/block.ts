/**
 * QAPI types of the block layer that drivers and commands share (qapi/block-core.json): the
 * BlockdevDriver enum, PreallocMode, BlockdevRef.
 */
import { alternate, any, enumOf, str } from './schema.js';

/** QEMU 7.2's BlockdevDriver enum: every driver the QAPI unions accept (bitmirror opens some of them). */
export const BLOCKDEV_DRIVER_NAMES = [
  'blkdebug', 'blklogwrites', 'blkreplay', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read',
  'dmg', 'file', 'snapshot-access', 'ftp', 'ftps', 'gluster', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi',
  'luks', 'nbd', 'nfs', 'null-aio', 'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qcow2', 'qed', 'quorum',
  'raw', 'rbd', 'replication', 'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
] as const;
export const BlockdevDriver = enumOf('BlockdevDriver', BLOCKDEV_DRIVER_NAMES);

export type PreallocMode = 'off' | 'metadata' | 'falloc' | 'full';
export const PREALLOC_MODES: readonly PreallocMode[] = ['off', 'metadata', 'falloc', 'full'];
export const PreallocModeEnum = enumOf('PreallocMode', PREALLOC_MODES);

/** A child given by node-name or by nested options. */
export const BlockdevRef = alternate('BlockdevRef', str, any);
