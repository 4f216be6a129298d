/**
 * mirror_top: the filter a mirror job inserts above its source, as in QEMU, so that management
 * software sees the same graph (filter-node-name, implicit auto-named node). It only passes I/O down:
 * the job observes writes on the source node itself, so writes that bypass the filter (HMP qemu-io on
 * the source, a second export) are mirrored too — see jobs/mirror.ts.
 *
 * While the job switches, the filter holds new writes (QEMU drains for it): the job waits for the
 * writes already on their way to the source, switches, and then lets the held writes go on — to the
 * target when the job pivoted (the filter is out of the graph by then, but these writes were sent to
 * it before), to the source otherwise.
 */
import { FilterNode } from './filter.js';
import type { BdrvChild, BlockNode, HostRange, WriteFlags } from '../node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_WRITE, refreshPermissions, type Permissions } from '../permissions.js';

export class MirrorTopNode extends FilterNode {
  readonly driver = 'mirror_top';
  /** The job is ending: the filter forwards no permission to the source any more (QEMU's s->stop). */
  private stopped = false;
  /** Set while the job switches: writes wait for it before going down. */
  private gate: Promise<void> | undefined;
  private openGate: (() => void) | undefined;
  /** After a pivot: where held and late writes go (the node that took the source's place). */
  private forwardTo: BlockNode | undefined;

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

  /** Hold new writes (the job is about to switch). Writes already past the filter are on the source. */
  holdWrites(): void {
    if (this.gate) return;
    this.gate = new Promise((resolve) => (this.openGate = resolve));
  }

  /** Let held writes go on: to `to` when the job pivoted to it, else to the source. */
  releaseWrites(to?: BlockNode): void {
    if (to) this.forwardTo = to;
    const open = this.openGate;
    this.gate = undefined;
    this.openGate = undefined;
    open?.();
  }

  /** The node a write goes to, once the gate (if any) is open. */
  private async writeNode(): Promise<BlockNode> {
    if (this.gate) await this.gate;
    return this.forwardTo ?? this.filtered;
  }

  protected override doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    if (!this.gate && !this.forwardTo) return this.filtered.write(offset, data, flags);
    return this.writeNode().then((n) => n.write(offset, data, flags));
  }
  protected override doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    if (!this.gate && !this.forwardTo) return this.filtered.writeZeroes(offset, bytes, flags);
    return this.writeNode().then((n) => n.writeZeroes(offset, bytes, flags));
  }
  protected override doDiscard(offset: number, bytes: number): Promise<void> {
    if (!this.gate && !this.forwardTo) return this.filtered.discard(offset, bytes);
    return this.writeNode().then((n) => n.discard(offset, bytes));
  }
  protected override doWriteHost(offset: number, src: HostRange): Promise<void> {
    if (!this.gate && !this.forwardTo) return this.filtered.writeHost(offset, src);
    return this.writeNode().then((n) => n.writeHost(offset, src));
  }
  protected override doFlush(): Promise<void> {
    return (this.forwardTo ?? this.filtered).flush();
  }

  override childPermissions(child: BdrvChild, perm: number, shared: number, writable: boolean): Permissions {
    if (this.stopped) return { perm: 0, shared: BLK_PERM_ALL };
    const p = super.childPermissions(child, perm, shared, writable);
    if (this.commit) return { perm: p.perm & ~BLK_PERM_CONSISTENT_READ, shared: p.shared | BLK_PERM_WRITE };
    return p;
  }
}
