/**
 * The `throttle` filter driver: passes I/O to its `file` child within the limits of a throttle group
 * (object-add throttle-group): the usual way to set I/O limits on a disk, and the way tests slow a job
 * down. Reads count as reads, writes, write-zeroes and discards as writes; flushes are not limited.
 */
import { genericError } from '../../errors.js';
import { str } from '../../qapi/schema.js';
import type { BlockDriver } from '../graph.js';
import type { HostRange, ImageInfo, ReopenChange, WriteFlags } from '../node.js';
import type { ThrottleGroup } from '../throttle-group.js';
import type { UserObjects } from '../objects.js';
import { BlockdevRef } from '../drivers/raw.js';
import { FilterNode, filterJsonFilename } from './filter.js';
import type { BlockNode } from '../node.js';

export class ThrottleNode extends FilterNode {
  readonly driver = 'throttle';
  private released = false;

  constructor(
    nodeName: string,
    child: BlockNode,
    private group: ThrottleGroup,
    /** Where blockdev-reopen looks up a new group. */
    private readonly objects: UserObjects,
  ) {
    super(nodeName, child, 'file');
    group.users++;
  }

  // ---- reopen: throttle_reopen_prepare takes another group --------------------------------------------

  override reopenableOptions(): readonly string[] {
    return ['throttle-group'];
  }
  override reopenCheck(options: Record<string, unknown>): void {
    const id = options['throttle-group'] as string;
    if (!this.objects.throttleGroup(id)) throw genericError(`Throttle group '${id}' does not exist`);
  }
  /** Requests already admitted by the old group go on; new ones queue in the new group. */
  override reopenCommit(change: ReopenChange): void {
    super.reopenCommit(change);
    const next = this.objects.throttleGroup(change.options['throttle-group'] as string)!;
    if (next === this.group || this.released) return;
    this.group.users--;
    next.users++;
    this.group = next;
  }

  protected override async doRead(offset: number, bytes: number): Promise<Buffer> {
    await this.group.admit(false, bytes);
    return super.doRead(offset, bytes);
  }
  protected override async doReadInto(offset: number, buf: Buffer): Promise<void> {
    await this.group.admit(false, buf.length);
    return super.doReadInto(offset, buf);
  }
  protected override async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    await this.group.admit(true, data.length);
    return super.doWrite(offset, data, flags);
  }
  protected override async doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    await this.group.admit(true, bytes);
    return super.doWriteZeroes(offset, bytes, flags);
  }
  protected override async doDiscard(offset: number, bytes: number): Promise<void> {
    await this.group.admit(true, bytes);
    return super.doDiscard(offset, bytes);
  }

  /** QEMU's throttle forwards compressed writes (throttle_co_pwritev_compressed). */
  override supportsCompressedWrites(): boolean {
    return this.filtered.supportsCompressedWrites();
  }

  // No copy offload through the limits (QEMU's throttle driver has no copy_range either): the copy
  // engine then reads and writes, and the group sees every byte.
  protected override doMapHost(): Promise<HostRange | undefined> {
    return Promise.resolve(undefined);
  }
  protected override canWriteHost(): boolean {
    return false;
  }

  override async close(): Promise<void> {
    await super.close();
    if (!this.released) this.group.users--;
    this.released = true;
  }

  override imageInfo(): ImageInfo {
    // The group is an option of the node: QEMU names it by a json: filename.
    const filename = filterJsonFilename(this, { 'throttle-group': this.group.id });
    return { ...super.imageInfo(), filename };
  }
}

export const throttleDriver: BlockDriver = {
  name: 'throttle',
  options: { 'throttle-group': str, file: BlockdevRef },
  async open(nodeName, opts, ctx) {
    // As QEMU: the child first, then the group.
    const file = await ctx.openChild(opts.file, opts['read-only'] as boolean, 'file', 'filtered');
    const id = opts['throttle-group'] as string;
    const group = ctx.graph.objects.throttleGroup(id);
    if (!group) throw genericError(`Throttle group '${id}' does not exist`);
    return new ThrottleNode(nodeName, file, group, ctx.graph.objects);
  },
};
