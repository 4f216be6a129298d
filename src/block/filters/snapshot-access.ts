/**
 * snapshot-access: a read-only node that shows the point-in-time image of a copy-before-write filter
 * (its `file`), as QEMU's block/snapshot-access.c: for fleecing without a backing chain, exported over
 * NBD while the guest writes to the live disk. Reads come from the filter's snapshot (old data from its
 * target, the rest from the source while it is unchanged); writes and write-zeroes fail ENOTSUP, as
 * QEMU's; a discard (with discard=unmap, as any node's) tells the filter a range of its snapshot is no
 * longer needed (CopyBeforeWriteNode.snapshotDiscard): how a backup with discard-source out of a
 * fleecing image frees the scratch image as it goes. A `file` that is no copy-before-write node gives
 * ENOTSUP, as QEMU's generic snapshot API does.
 */
import { BlockIOError } from '../../errors.js';
import { BlockNode, type BdrvChild, type BlockStatus, type ImageInfo, type NodeInfo } from '../node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, type Permissions } from '../permissions.js';
import type { BlockDriver } from '../graph.js';
import { BlockdevRef } from '../../qapi/block.js';
import { CopyBeforeWriteNode } from './copy-before-write.js';

export class SnapshotAccessNode extends BlockNode {
  readonly driver = 'snapshot-access';

  constructor(nodeName: string, readOnly: boolean, file: BlockNode) {
    super(nodeName, readOnly);
    this.attachChild('file', file, 'data');
  }

  private get file(): BlockNode {
    return this.child('file')!.node;
  }

  length(): number {
    return this.file.length();
  }
  protected async doRead(offset: number, bytes: number): Promise<Buffer> {
    const f = this.file;
    if (!(f instanceof CopyBeforeWriteNode)) throw new BlockIOError('ENOTSUP');
    return f.snapshotRead(offset, bytes);
  }
  protected async doWrite(): Promise<void> {
    throw new BlockIOError('ENOTSUP');
  }
  protected override async doWriteZeroes(): Promise<void> {
    throw new BlockIOError('ENOTSUP');
  }
  /** bdrv_co_pdiscard: ignored unless the node was opened with discard=unmap (BDRV_O_UNMAP). */
  protected override async doDiscard(offset: number, bytes: number): Promise<void> {
    if (this.openOptions.discard !== 'unmap') return;
    const f = this.file;
    if (!(f instanceof CopyBeforeWriteNode)) throw new BlockIOError('ENOTSUP');
    await f.snapshotDiscard(offset, bytes);
  }
  protected async doFlush(): Promise<void> {}
  /** Everything reads as data: holes of the point-in-time image are not tracked. */
  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return { bytes: Math.min(bytes, this.length() - offset), zero: false, data: true, allocated: true };
  }
  /** It reads its file and lets others do anything. */
  override childPermissions(_child: BdrvChild, _perm: number, _shared: number, _writable: boolean): Permissions {
    return { perm: BLK_PERM_CONSISTENT_READ, shared: BLK_PERM_ALL };
  }
  override nodeInfo(): NodeInfo {
    return this.file.nodeInfo();
  }
  imageInfo(): ImageInfo {
    const { 'format-specific': _specific, ...c } = this.file.imageInfo();
    return { ...c, format: this.driver };
  }
  /** Closing it leaves the filter open (blockdev-del of the filter is the caller's). */
  override async close(): Promise<void> {
    await this.quiesce();
  }
}

export const snapshotAccessDriver: BlockDriver = {
  name: 'snapshot-access',
  options: { file: BlockdevRef },
  async open(nodeName, opts, ctx) {
    const file = await ctx.openChild(opts.file, true, 'file', 'data');
    return new SnapshotAccessNode(nodeName, opts['read-only'] as boolean, file);
  },
};
