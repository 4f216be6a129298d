/**
 * `null-co` and `null-aio`: a node that stores nothing. Writes succeed and are dropped; reads return
 * zeroes when read-zeroes is set (QEMU's default is false, which returns whatever the buffer held: we
 * return zeroes then too, as leaving uninitialised memory visible has no use here). Every request takes
 * latency-ns first, as in QEMU (what its tests use to slow a job down). The two drivers differ in QEMU
 * only in how they complete requests (a coroutine or an AIO callback), which nothing outside sees.
 */
import { BlockNode, jsonFilename, type BlockStatus, type ImageInfo, type NodeCapabilities } from '../node.js';
import type { BlockDriver } from '../graph.js';
import { bool, int, qemuOptSize } from '../../qapi/schema.js';

export class NullNode extends BlockNode {
  constructor(
    nodeName: string,
    readOnly: boolean,
    readonly driver: 'null-co' | 'null-aio',
    private readonly size: number,
    private readonly readZeroes: boolean,
    /** latency-ns, in milliseconds (0: none). */
    private readonly latencyMs: number,
  ) {
    super(nodeName, readOnly);
  }
  length(): number {
    return this.size;
  }
  /** QEMU's null driver sleeps latency-ns in each read, write, write-zeroes and flush (not in block status). */
  private async latency(): Promise<void> {
    if (this.latencyMs > 0) await new Promise((resolve) => setTimeout(resolve, this.latencyMs));
  }
  protected async doRead(_offset: number, bytes: number): Promise<Buffer> {
    await this.latency();
    return Buffer.alloc(bytes);
  }
  protected async doWrite(): Promise<void> {
    await this.latency();
  }
  protected override async doWriteZeroes(): Promise<void> {
    await this.latency();
  }
  protected async doFlush(): Promise<void> {
    await this.latency();
  }
  /** QEMU's null driver has no mutable_opts: a reopen may not leave out what it was opened with. */
  override resetRefusedOptions(): readonly string[] {
    return ['size', 'latency-ns', 'read-zeroes'];
  }
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
    return { filename: this.filename(), format: this.driver, 'virtual-size': this.size };
  }

  /**
   * QEMU names a null node "null-co://" ("null-aio://") when it was opened on defaults, and otherwise by a json:
   * pseudo-filename of the options that change its data (in the member order QEMU prints them;
   * latency-ns is not one of them).
   */
  private filename(): string {
    const o = this.openOptions;
    const explicit: Record<string, unknown> = {};
    if (o['read-zeroes'] !== undefined) explicit['read-zeroes'] = o['read-zeroes'];
    if (Object.keys(explicit).length === 0 && o.size === undefined) return `${this.driver}://`;
    explicit.driver = this.driver;
    if (o.size !== undefined) explicit.size = o.size;
    return jsonFilename(explicit);
  }
}

function nullDriverNamed(name: 'null-co' | 'null-aio'): BlockDriver {
  return {
    name,
    // size is 'int' in QAPI, read as a size (QemuOpts); QEMU 7.2 aborts on a negative one, we refuse it.
    options: { '*size': int, '*latency-ns': { kind: 'int', name: 'uint64' }, '*read-zeroes': bool },
    async open(nodeName, opts) {
      // QEMU's default size for null-co is 1 GiB; sizes are rounded up to whole 512-byte sectors.
      const size = Math.ceil((qemuOptSize(opts, 'size') ?? 2 ** 30) / 512) * 512;
      const latencyMs = Number((opts['latency-ns'] as number | undefined) ?? 0) / 1e6;
      return new NullNode(nodeName, opts['read-only'] as boolean, name, size, (opts['read-zeroes'] as boolean | undefined) ?? false, latencyMs);
    },
  };
}

export const nullDriver = nullDriverNamed('null-co');
export const nullAioDriver = nullDriverNamed('null-aio');
