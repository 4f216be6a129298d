/**
 * The qcow2 format driver. `qcow2Driver` opens nodes (blockdev-add driver=qcow2); `createQcow2` formats
 * a protocol node (blockdev-create). See node.ts for I/O, open.ts for open-time checks.
 */
import type { BlockDriver } from '../../graph.js';
import { alternate, any, bool, enumOf, int, object, size, str, type Members } from '../../../qapi/schema.js';
import { BlockdevDriver, BlockdevRef, PreallocModeEnum } from '../../../qapi/block.js';
import { openQcow2 } from './open.js';
import { createQcow2, type Qcow2CreateOptions } from './create.js';

export { createQcow2, type Qcow2CreateOptions } from './create.js';
export { Qcow2Node, type BitmapToStore, type BitmapToKeep } from './node.js';
export type { StoredBitmap } from './bitmaps.js';

const Qcow2OverlapCheckMode = enumOf('Qcow2OverlapCheckMode', ['none', 'constant', 'cached', 'all']);

const BlockdevRefOrNull = alternate('BlockdevRefOrNull', str, { kind: 'null' }, any);

/** BlockdevCreateOptionsQcow2. */
const CREATE_OPTIONS: Members = {
  file: BlockdevRef,
  '*data-file': BlockdevRef,
  '*data-file-raw': bool,
  '*extended-l2': bool,
  size,
  '*version': enumOf('BlockdevQcow2Version', ['v2', 'v3']),
  '*backing-file': str,
  '*backing-fmt': BlockdevDriver,
  '*encrypt': any,
  '*cluster-size': size,
  '*preallocation': PreallocModeEnum,
  '*lazy-refcounts': bool,
  '*refcount-bits': int,
  '*compression-type': enumOf('Qcow2CompressionType', ['zlib', 'zstd']),
};

export const qcow2Driver: BlockDriver = {
  name: 'qcow2',
  options: {
    file: BlockdevRef,
    '*backing': BlockdevRefOrNull,
    '*lazy-refcounts': bool,
    '*pass-discard-request': bool,
    '*pass-discard-snapshot': bool,
    '*pass-discard-other': bool,
    // No discard-no-unref: it came with QEMU 8.1 (and changed meaning in 8.2: whether the discard
    // still reaches the file); 7.2 refuses it as an unexpected parameter, and so does bitmirror.
    '*overlap-check': alternate(
      'Qcow2OverlapChecks',
      object('Qcow2OverlapCheckFlags', {
        '*template': Qcow2OverlapCheckMode,
        ...Object.fromEntries(
          ['main-header', 'active-l1', 'active-l2', 'refcount-table', 'refcount-block', 'snapshot-table', 'inactive-l1', 'inactive-l2', 'bitmap-directory'].map((k) => [`*${k}`, bool]),
        ),
      }),
      Qcow2OverlapCheckMode,
    ),
    '*cache-size': int,
    '*l2-cache-size': int,
    '*l2-cache-entry-size': int,
    '*refcount-cache-size': int,
    '*cache-clean-interval': int,
    '*encrypt': object('BlockdevQcow2Encryption', { format: enumOf('BlockdevQcow2EncryptionFormat', ['aes', 'luks']), '*key-secret': str }),
    '*data-file': BlockdevRef,
  },
  async open(nodeName, opts, ctx) {
    // The permissions qcow2 takes on its file (write and resize when writable, sharing neither, so
    // qemu-img/qemu-io cannot write the image behind our back) follow from its child role: 'image'.
    return openQcow2(nodeName, opts, ctx);
  },
  create: {
    options: CREATE_OPTIONS,
    async run(opts, ctx) {
      const { node, release } = await ctx.openForCreate(opts.file);
      try {
        const { driver: _driver, file: _file, ...rest } = opts;
        await createQcow2(node, rest as Qcow2CreateOptions);
      } finally {
        await release();
      }
    },
  },
};
