/**
 * blockdev-create {job-id, options: BlockdevCreateOptions}: starts a create job (jobs/create.ts).
 * Supported: `file` (preallocation off|full|falloc; metadata fails as in QEMU's file driver) and `qcow2`
 * (on a node given by name or inline). Every other driver QEMU knows is accepted by the union and
 * refused with "Driver does not support blockdev-create", as QEMU refuses raw and null-co.
 */
import { genericError } from '../errors.js';
import { alternate, any, bool, enumOf, int, size, str, visit, type Members, type Schema } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import { BlockNode, type BdrvChild } from '../block/node.js';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, BLK_PERM_WRITE, unnamedBackend } from '../block/permissions.js';
import { CreateJob, createFile, PREALLOC_MODES, type FileCreateOptions } from '../jobs/create.js';
import { createQcow2, type Qcow2CreateOptions } from '../block/drivers/qcow2/index.js';

/** QEMU's BlockdevDriver enum (7.2 plus what bitmirror adds), the discriminator of the union. */
const BLOCKDEV_DRIVERS = [
  'blkdebug', 'blklogwrites', 'blkreplay', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read',
  'dmg', 'file', 'snapshot-access', 'ftp', 'ftps', 'gluster', 'host_cdrom', 'host_device', 'http', 'https', 'iscsi',
  'luks', 'nbd', 'nfs', 'null-aio', 'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qcow2', 'qed', 'quorum',
  'raw', 'rbd', 'replication', 'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat',
] as const;

const PreallocMode = enumOf('PreallocMode', PREALLOC_MODES);
const BlockdevRef = alternate('BlockdevRef', str, any);

const FILE_CREATE: Members = { filename: str, size, '*preallocation': PreallocMode, '*nocow': bool, '*extent-size-hint': size };
const QCOW2_CREATE: Members = {
  file: BlockdevRef,
  '*data-file': BlockdevRef,
  '*data-file-raw': bool,
  '*extended-l2': bool,
  size,
  '*version': enumOf('BlockdevQcow2Version', ['v2', 'v3']),
  '*backing-file': str,
  '*backing-fmt': enumOf('BlockdevDriver', BLOCKDEV_DRIVERS),
  '*encrypt': any,
  '*cluster-size': size,
  '*preallocation': PreallocMode,
  '*lazy-refcounts': bool,
  '*refcount-bits': int,
  '*compression-type': enumOf('Qcow2CompressionType', ['zlib', 'zstd']),
};

const CREATORS = new Set(['file', 'qcow2']);

export const BLOCKDEV_CREATE_OPTIONS: Schema = {
  kind: 'union',
  name: 'BlockdevCreateOptions',
  base: { driver: enumOf('BlockdevDriver', BLOCKDEV_DRIVERS) },
  discriminator: 'driver',
  variants: { file: FILE_CREATE, qcow2: QCOW2_CREATE },
};

/**
 * The protocol node a format is created on: a node-name, or inline options opened for the job and
 * closed after it. As QEMU's qcow2 create, a BlockBackend takes write and resize on it (sharing
 * everything), so a node that a format node uses is refused with QEMU's permission error, and so is an
 * image another process holds (the file driver's lock error).
 */
async function openCreateTarget(core: Core, ref: unknown): Promise<{ node: BlockNode; release: () => Promise<void> }> {
  if (typeof ref === 'string') {
    const node = core.graph.lookup(ref);
    const edge = node.attachParent(unnamedBackend(), 'root', BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL);
    return { node, release: async () => BlockNode.detachParent(edge) };
  }
  const node = await core.graph.open(ref as Record<string, unknown>);
  let edge: BdrvChild;
  try {
    edge = node.attachParent(unnamedBackend(), 'root', BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL);
  } catch (err) {
    await core.graph.remove(node);
    throw err;
  }
  return {
    node,
    release: async () => {
      BlockNode.detachParent(edge);
      await core.graph.remove(node);
    },
  };
}

export const createCommands: CommandDef[] = [
  command('blockdev-create', { 'job-id': str, options: any }, (args, core) => {
    const opts = visit(BLOCKDEV_CREATE_OPTIONS, args.options, 'options') as Record<string, unknown>;
    const driver = opts.driver as string;
    if (!CREATORS.has(driver)) throw genericError('Driver does not support blockdev-create');
    let work: () => Promise<void>;
    if (driver === 'file') {
      work = () => createFile(opts as unknown as FileCreateOptions);
    } else {
      work = async () => {
        const { node, release } = await openCreateTarget(core, opts.file);
        try {
          const { driver: _d, file: _f, ...rest } = opts;
          await createQcow2(node, rest as unknown as Qcow2CreateOptions);
        } finally {
          await release();
        }
      };
    }
    const job = new CreateJob(core.jobs, args['job-id'] as string, work);
    job.start();
    return {};
  }),
];
