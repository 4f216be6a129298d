/**
 * mirror_top: the filter a mirror job inserts above its source, as in QEMU, so that management
 * software sees the same graph (filter-node-name, implicit auto-named node). It only passes I/O down:
 * the job observes writes on the source node itself, so writes that bypass the filter (HMP qemu-io on
 * the source, a second export) are mirrored too — see jobs/mirror.ts.
 */
import { FilterNode } from './filter.js';
import type { BdrvChild, BlockNode } from '../node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_WRITE, refreshPermissions, type Permissions } from '../permissions.js';

export class MirrorTopNode extends FilterNode {
  readonly driver = 'mirror_top';
  /** The job is ending: the filter forwards no permission to the source any more (QEMU's s->stop). */
  private stopped = false;

  /**
   * @param commit an active commit's filter (mirror_top's is_commit): the chain below changes, so it asks
   *   no consistent read of it, and it lets it be written (the job writes the base, which is in it).
   */
  constructor(
    nodeName: string,
    source: BlockNode,
    private readonly commit = false,
  ) {
    super(nodeName, source, 'backing');
  }

  /** Stop passing permissions down, so the source can take the filter's parents (or be replaced). */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    refreshPermissions([this]);
  }

  override childPermissions(child: BdrvChild, perm: number, shared: number, writable: boolean): Permissions {
    if (this.stopped) return { perm: 0, shared: BLK_PERM_ALL };
    const p = super.childPermissions(child, perm, shared, writable);
    if (this.commit) return { perm: p.perm & ~BLK_PERM_CONSISTENT_READ, shared: p.shared | BLK_PERM_WRITE };
    return p;
  }
}
