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
import type { BlockNode } from '../block/node.js';
import { CreateJob, createFile, PREALLOC_MODES, type FileCreateOptions } from '../jobs/create.js';
import { createQcow2, type Qcow2CreateOptions } from '../block/drivers/qcow2/index.js';
import { fileNodeBelow, BLK_PERM_ALL, BLK_PERM_RESIZE, BLK_PERM_WRITE } from '../block/drivers/file.js';

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
 * closed after it. QEMU takes write and resize on it, so a node that a format node uses is refused.
 */
async function openCreateTarget(core: Core, ref: unknown): Promise<{ node: BlockNode; release: () => Promise<void> }> {
  if (typeof ref === 'string') {
    const node = core.graph.lookup(ref);
    const parent = [...node.parents][0];
    if (parent) {
      throw genericError(
        `Permission conflict on node '${node.nodeName}': permissions 'write, resize' are both required by an unnamed block device ` +
          `(uses node '${node.nodeName}' as 'root' child) and unshared by node '${parent.parent.nodeName}' (uses node '${node.nodeName}' as '${parent.name}' child).`,
      );
    }
    if (node.readOnly) throw genericError('Block node is read-only');
    return { node, release: claimForCreate(node) };
  }
  const node = await core.graph.open(ref as Record<string, unknown>);
  let releaseClaim: () => Promise<void>;
  try {
    releaseClaim = claimForCreate(node);
  } catch (err) {
    await core.graph.remove(node);
    throw err;
  }
  return {
    node,
    release: async () => {
      await releaseClaim();
      await core.graph.remove(node);
    },
  };
}

/**
 * Take write and resize on the file under `node` (sharing all but resize) for the create, so that a
 * QEMU process or another node using the image makes it fail with QEMU's lock error; released after.
 * A file node that someone already claims is left alone (its claim already excludes others).
 */
function claimForCreate(node: BlockNode): () => Promise<void> {
  const file = fileNodeBelow(node);
  if (!file || file.perm !== 0) return async () => undefined;
  file.setPermissions(BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL & ~BLK_PERM_RESIZE);
  return async () => {
    if (!file.isClosed()) file.setPermissions(0, BLK_PERM_ALL);
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
