/**
 * snapshot-access: a read-only node that shows the point-in-time image of a copy-before-write filter
 * (its `file`), as QEMU's block/snapshot-access.c: for fleecing without a backing chain, exported over
 * NBD while the guest writes to the live disk. Reads come from the filter's snapshot (old data from its
 * target, the rest from the source while it is unchanged); writes are refused. A `file` that is no
 * copy-before-write node gives ENOTSUP on reads, as QEMU's generic snapshot API does.
 */
import { BlockIOError } from '../../errors.js';
import { BlockNode, type BdrvChild, type BlockStatus, type ImageInfo, type NodeInfo } from '../node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, type Permissions } from '../permissions.js';
import type { BlockDriver } from '../graph.js';
import { BlockdevRef } from '../../qapi/block.js';
import { CopyBeforeWriteNode } from './copy-before-write.js';

export class SnapshotAccessNode extends BlockNode {
  readonly driver = 'snapshot-access';

  constructor(nodeName: string, file: BlockNode) {
    super(nodeName, true);
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
    throw new BlockIOError('EPERM');
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
    return new SnapshotAccessNode(nodeName, file);
  },
};
