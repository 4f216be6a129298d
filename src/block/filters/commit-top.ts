/**
 * commit_top: the filter an intermediate block-commit inserts above its top node, as QEMU's
 * block/commit.c does (filter-node-name, or an implicit auto-named node). The overlay reads the chain
 * through it while the committed layers are copied into the base. It gives its parents consistent
 * reads without asking any permission of the chain below, which the commit job claims for itself
 * (the layers above the base may not be read consistently by anybody else while they change). It is
 * taken out of the graph when the job ends: on success the base takes its place.
 */
import { FilterNode } from './filter.js';
import type { BdrvChild, BlockNode } from '../node.js';
import { BLK_PERM_ALL, type Permissions } from '../permissions.js';

export class CommitTopNode extends FilterNode {
  readonly driver = 'commit_top';

  constructor(nodeName: string, top: BlockNode) {
    super(nodeName, top, 'backing');
    // QEMU opens it without BDRV_O_RDWR: it only passes reads on.
    this.readOnly = true;
  }

  /** bdrv_commit_top_child_perm: nothing taken, everything shared. */
  override childPermissions(_child: BdrvChild, _perm: number, _shared: number, _writable: boolean): Permissions {
    return { perm: 0, shared: BLK_PERM_ALL };
  }
}
