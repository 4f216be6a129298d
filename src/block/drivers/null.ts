/**
 * `null-co`: a node that stores nothing. Writes succeed and are dropped; reads return zeroes when
 * read-zeroes is set (QEMU's default is false, which returns whatever the buffer held: we return zeroes
 * then too, as leaving uninitialised memory visible has no use here).
 */
import { BlockNode, type BlockStatus, type ImageInfo } from '../node.js';
import type { BlockDriver } from '../graph.js';
import { bool, size } from '../../qapi/schema.js';

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
  imageInfo(): ImageInfo {
    return { filename: `null-co://`, format: 'null-co', 'virtual-size': this.size, 'dirty-flag': false };
  }
}

export const nullDriver: BlockDriver = {
  name: 'null-co',
  options: { '*size': size, '*latency-ns': { kind: 'int', name: 'uint64' }, '*read-zeroes': bool },
  async open(nodeName, opts) {
    // QEMU's default size for null-co is 1 GiB; sizes are rounded up to whole 512-byte sectors.
    const size = Math.ceil(((opts.size as number | undefined) ?? 2 ** 30) / 512) * 512;
    return new NullNode(nodeName, opts['read-only'] as boolean, size, (opts['read-zeroes'] as boolean | undefined) ?? false);
  },
};
