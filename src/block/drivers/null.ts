/**
 * `null-co`: a node that stores nothing. Writes succeed and are dropped; reads return zeroes when
 * read-zeroes is set (QEMU's default is false, which returns whatever the buffer held: we return zeroes
 * then too, as leaving uninitialised memory visible has no use here).
 */
import { BlockNode, jsonFilename, type BlockStatus, type ImageInfo, type NodeCapabilities } from '../node.js';
import type { BlockDriver } from '../graph.js';
import { bool, int, qemuOptSize } from '../../qapi/schema.js';

export class NullNode extends BlockNode {
  readonly driver = 'null-co';
  constructor(
    nodeName: string,
    readOnly: boolean,
    private readonly size: number,
    private readonly readZeroes: boolean,
  ) {
    super(nodeName, readOnly);
  }
  length(): number {
    return this.size;
  }
  protected async doRead(_offset: number, bytes: number): Promise<Buffer> {
    return Buffer.alloc(bytes);
  }
  protected async doWrite(): Promise<void> {}
  protected override async doWriteZeroes(): Promise<void> {}
  protected async doFlush(): Promise<void> {}
  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    const n = Math.min(bytes, this.size - offset);
    return this.readZeroes ? { bytes: n, zero: true, data: false, allocated: true } : { bytes: n, zero: false, data: true, allocated: true };
  }
  override hasZeroInit(): boolean {
    return this.readZeroes;
  }
  override capabilities(): NodeCapabilities {
    return { requestAlignment: 1, writeZeroes: true, fastZero: true, discard: false, fua: true, blockStatus: this.readZeroes, resize: false };
  }
  /** Nothing is stored (QEMU's null driver reports 0). */
  override async actualSize(): Promise<number> {
    return 0;
  }
  imageInfo(): ImageInfo {
    return { filename: this.filename(), format: 'null-co', 'virtual-size': this.size };
  }

  /**
   * QEMU names a null-co node "null-co://" when it was opened on defaults, and otherwise by a json:
   * pseudo-filename of the options that differ (in the member order QEMU prints them).
   */
  private filename(): string {
    const o = this.openOptions;
    const explicit: Record<string, unknown> = {};
    if (o['read-zeroes'] !== undefined) explicit['read-zeroes'] = o['read-zeroes'];
    if (o['latency-ns'] !== undefined) explicit['latency-ns'] = o['latency-ns'];
    if (Object.keys(explicit).length === 0 && o.size === undefined) return 'null-co://';
    explicit.driver = 'null-co';
    if (o.size !== undefined) explicit.size = o.size;
    return jsonFilename(explicit);
  }
}

export const nullDriver: BlockDriver = {
  name: 'null-co',
  // size is 'int' in QAPI, read as a size (QemuOpts); QEMU 7.2 aborts on a negative one, we refuse it.
  options: { '*size': int, '*latency-ns': { kind: 'int', name: 'uint64' }, '*read-zeroes': bool },
  async open(nodeName, opts) {
    // QEMU's default size for null-co is 1 GiB; sizes are rounded up to whole 512-byte sectors.
    const size = Math.ceil((qemuOptSize(opts, 'size') ?? 2 ** 30) / 512) * 512;
    return new NullNode(nodeName, opts['read-only'] as boolean, size, (opts['read-zeroes'] as boolean | undefined) ?? false);
  },
};
