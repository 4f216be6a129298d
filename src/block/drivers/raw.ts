/**
 * The `raw` format driver: the guest sees the child's bytes, optionally a window of them (`offset`,
 * `size`). All I/O passes to the `file` child at the shifted offset.
 */
import { genericError } from '../../errors.js';
import { BlockNode, jsonFilename, type BdrvChild, type ReopenChange, type BlockStatus, type HostRange, type ImageInfo, type NodeCapabilities, type WriteFlags } from '../node.js';
import { jsonOptions } from '../filters/filter.js';
import { defaultChildPermissions, type Permissions } from '../permissions.js';
import type { BlockDriver } from '../graph.js';
import { alternate, int, qemuOptSize } from '../../qapi/schema.js';
import { snapshotInfo, snapshotNode } from '../internal-snapshot.js';

export class RawNode extends BlockNode {
  readonly driver = 'raw';
  constructor(
    nodeName: string,
    readOnly: boolean,
    file: BlockNode,
    /** The window on the file; blockdev-reopen may move it (reopenCommit). */
    private offset: number,
    private size: number | undefined,
  ) {
    super(nodeName, readOnly);
    // Without offset and size raw is all but a filter; with either its file holds data at a shift.
    this.attachChild('file', file, offset === 0 && size === undefined ? 'filtered' : 'data');
  }
  /** raw_child_perm: the storage rules, but write and resize only when a parent needs them. */
  override childPermissions(child: BdrvChild, perm: number, shared: number, writable: boolean): Permissions {
    return defaultChildPermissions(child.role, writable, perm, shared, true);
  }
  private get file(): BlockNode {
    return this.child('file')!.node;
  }
  /** Without a size, the rest of the file past the offset: none when a smaller file came in by reopen. */
  length(): number {
    return this.size ?? Math.max(0, this.file.length() - this.offset);
  }

  // ---- reopen: raw_reopen_prepare takes a new offset and size, checked against the file as it is --------

  override reopenableOptions(): readonly string[] {
    return ['offset', 'size'];
  }
  override reopenCheck(options: Record<string, unknown>): void {
    checkRawWindow(qemuOptSize(options, 'offset') ?? 0, qemuOptSize(options, 'size'), this.file.length());
  }
  override reopenCommit(change: ReopenChange): void {
    super.reopenCommit(change);
    this.offset = qemuOptSize(change.options, 'offset') ?? 0;
    this.size = qemuOptSize(change.options, 'size');
  }

  protected doRead(offset: number, bytes: number): Promise<Buffer> {
    return this.file.read(this.offset + offset, bytes);
  }
  protected override doReadInto(offset: number, buf: Buffer): Promise<void> {
    return this.file.readInto(this.offset + offset, buf);
  }
  protected doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    return this.file.write(this.offset + offset, data, flags);
  }
  protected override doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    return this.file.writeZeroes(this.offset + offset, bytes, flags);
  }
  protected override doDiscard(offset: number, bytes: number): Promise<void> {
    return this.file.discard(this.offset + offset, bytes);
  }
  protected doFlush(): Promise<void> {
    return this.file.flush();
  }
  protected override doMapHost(offset: number, bytes: number): Promise<HostRange | undefined> {
    return this.file.mapHost(this.offset + offset, bytes);
  }
  protected override canWriteHost(offset: number, bytes: number): boolean {
    return this.file.acceptsHostCopy(this.offset + offset, bytes);
  }
  protected override doWriteHost(offset: number, src: HostRange): Promise<void> {
    return this.file.writeHost(this.offset + offset, src);
  }
  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    const st = await this.file.blockStatus(this.offset + offset, bytes);
    return { ...st, allocated: true };
  }
  override capabilities(): NodeCapabilities {
    return { ...this.file.capabilities(), resize: this.size === undefined };
  }
  /** raw_co_truncate: the file is resized by the same amount; a fixed-size window cannot be. */
  protected override async doTruncate(size: number, exact: boolean): Promise<void> {
    if (this.size !== undefined) throw genericError('Cannot resize fixed-size raw disks');
    if (Number.MAX_SAFE_INTEGER - size < this.offset) throw genericError('Disk size too large for the chosen offset');
    await this.file.truncate(size + this.offset, exact);
  }
  override hasZeroInit(): boolean {
    return this.offset === 0 && this.size === undefined && this.file.hasZeroInit();
  }
  imageInfo(): ImageInfo {
    const f = this.file.imageInfo();
    // offset and size are strong options (QEMU's bdrv_refresh_filename): the node is named by a json: filename.
    const window = Object.fromEntries((['offset', 'size'] as const).filter((k) => this.openOptions[k] !== undefined).map((k) => [k, this.openOptions[k]]));
    const filename = Object.keys(window).length > 0 || f.filename.startsWith('json:') ? jsonFilename({ ...window, driver: 'raw', file: jsonOptions(this.file) }) : f.filename;
    const info: ImageInfo = { filename, format: 'raw', 'virtual-size': this.length(), 'dirty-flag': false };
    // The snapshots of the image below, as QEMU lists them through its snapshot fallback.
    const snapshots = snapshotNode(this)?.snapshotList?.() ?? [];
    if (snapshots.length) info.snapshots = snapshots.map(snapshotInfo);
    return info;
  }
}

/** raw_apply_options: the window must lie in the file, and a size be whole 512-byte sectors (QEMU's messages and order). */
function checkRawWindow(offset: number, size: number | undefined, fileLength: number): void {
  if (offset > fileLength) throw genericError(`Offset (${offset}) cannot be greater than size of the containing file (${fileLength})`);
  if (size !== undefined && fileLength - offset < size) {
    throw genericError(`The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the  actual size of the containing file (${fileLength})`);
  }
  if (size !== undefined && size % 512 !== 0) throw genericError('Specified size is not multiple of 512');
}

export const BlockdevRef = alternate('BlockdevRef', { kind: 'str' }, { kind: 'any' });

export const rawDriver: BlockDriver = {
  name: 'raw',
  // QAPI's types are 'int'; the driver reads them as sizes (QemuOpts), which refuses negatives.
  options: { file: BlockdevRef, '*offset': int, '*size': int, '*__org.bitmirror_bitmaps': BlockdevRef },
  async open(nodeName, opts, ctx) {
    const offset = qemuOptSize(opts, 'offset') ?? 0;
    const sz = qemuOptSize(opts, 'size');
    const file = await ctx.openChild(opts.file, opts['read-only'] as boolean, 'file', offset === 0 && sz === undefined ? 'filtered' : 'data');
    checkRawWindow(offset, sz, file.length());
    if (opts['__org.bitmirror_bitmaps'] !== undefined) {
      // Persistent bitmaps in a sidecar (raw-sidecar.ts, which extends RawNode: imported here, when
      // asked for, so that the two modules do not import each other at load time).
      const sidecar = await ctx.openChild(opts['__org.bitmirror_bitmaps'], opts['read-only'] as boolean, 'bitmaps', 'image');
      const { openRawSidecarNode } = await import('./raw-sidecar.js');
      return openRawSidecarNode(nodeName, opts['read-only'] as boolean, file, offset, sz, sidecar);
    }
    return new RawNode(nodeName, opts['read-only'] as boolean, file, offset, sz);
  },
};
