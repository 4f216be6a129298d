/**
 * A filter node: sits above another node (its child) and passes every request down, so that jobs can
 * put themselves in the I/O path (mirror-top, copy-before-write) and be taken out again at the end.
 * Guest-visible data is the child's; block status, sizes and cluster facts are the child's too.
 */
import { BlockNode, jsonFilename, type BlockStatus, type HostRange, type ImageInfo, type NodeCapabilities, type NodeInfo, type WriteFlags } from '../node.js';

/**
 * A node's options as QEMU writes them into a json: pseudo-filename: a json: name parsed back, a file
 * by its file name, a format or filter by its driver over its file child.
 */
export function jsonOptions(node: BlockNode): Record<string, unknown> {
  const filename = node.imageInfo().filename;
  if (filename.startsWith('json:')) return JSON.parse(filename.slice(5)) as Record<string, unknown>;
  const child = node.primaryChild();
  if (!child) return { driver: node.driver, filename };
  return { driver: node.driver, file: jsonOptions(child) };
}

/** The json: pseudo-filename of a filter with `own` options (its driver and child added after them). */
export function filterJsonFilename(filter: FilterNode, own: Record<string, unknown> = {}): string {
  return jsonFilename({ ...own, driver: filter.driver, file: jsonOptions(filter.filtered) });
}

export abstract class FilterNode extends BlockNode {
  /** QEMU's filters hold their child as 'backing' (mirror_top) or 'file' (copy-before-write). */
  constructor(
    nodeName: string,
    child: BlockNode,
    private readonly childRole: 'backing' | 'file',
  ) {
    super(nodeName, child.readOnly);
    this.attachChild(childRole, child, 'filtered');
  }

  /** The filtered node. */
  get filtered(): BlockNode {
    return this.child(this.childRole)!.node;
  }

  override primaryChild(): BlockNode | undefined {
    return this.filtered;
  }
  /** A filter has no backing file of its own, even when its child edge is called 'backing'. */
  override backing(): BlockNode | undefined {
    return undefined;
  }
  override formatLayer(): BlockNode {
    return this.filtered.formatLayer();
  }
  override isAllocatedAbove(base: BlockNode | undefined, offset: number, bytes: number): Promise<{ allocated: boolean; bytes: number }> {
    return this.filtered.isAllocatedAbove(base, offset, bytes);
  }

  override writesPastEnd(): boolean {
    return this.filtered.writesPastEnd();
  }

  length(): number {
    return this.filtered.length();
  }
  protected doRead(offset: number, bytes: number): Promise<Buffer> {
    return this.filtered.read(offset, bytes);
  }
  protected override doReadInto(offset: number, buf: Buffer): Promise<void> {
    return this.filtered.readInto(offset, buf);
  }
  protected doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    return this.filtered.write(offset, data, flags);
  }
  protected override doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    return this.filtered.writeZeroes(offset, bytes, flags);
  }
  protected override doDiscard(offset: number, bytes: number): Promise<void> {
    return this.filtered.discard(offset, bytes);
  }
  protected doFlush(): Promise<void> {
    return this.filtered.flush();
  }
  // Copy offload passes through: a filter does not change data. (One that must see the data of a
  // write, as copy-before-write must copy before it, overrides these.)
  protected override doMapHost(offset: number, bytes: number): Promise<HostRange | undefined> {
    return this.filtered.mapHost(offset, bytes);
  }
  protected override canWriteHost(offset: number, bytes: number): boolean {
    return this.filtered.acceptsHostCopy(offset, bytes);
  }
  protected override doWriteHost(offset: number, src: HostRange): Promise<void> {
    return this.filtered.writeHost(offset, src);
  }
  protected override doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return this.filtered.blockStatus(offset, bytes);
  }
  /** A filter never owns its child's lifetime: closing it must not close the source. */
  override async close(): Promise<void> {
    await this.quiesce();
  }
  override nodeInfo(): NodeInfo {
    return this.filtered.nodeInfo();
  }
  override hasZeroInit(): boolean {
    return this.filtered.hasZeroInit();
  }
  override capabilities(): NodeCapabilities {
    return this.filtered.capabilities();
  }
  /** bdrv_co_truncate on a filter without a truncate of its own: the filtered node is resized. */
  protected override doTruncate(size: number, exact: boolean): Promise<void> {
    return this.filtered.truncate(size, exact);
  }
  imageInfo(): ImageInfo {
    // QEMU shows the filtered node's image under the filter's format name, without format details.
    const { 'format-specific': _specific, ...c } = this.filtered.imageInfo();
    return { ...c, format: this.driver };
  }
}
