/**
 * The `file` protocol driver: a regular file (or block device) on the host. Reads and writes go to the
 * file at the same offsets; flush is fdatasync, as in QEMU's file-posix.
 */
import { promises as fsp, constants as fsc } from 'node:fs';
import { genericError, strerror, errorCode } from '../../errors.js';
import { BlockNode, type ImageInfo, type WriteFlags } from '../node.js';
import type { BlockDriver } from '../graph.js';
import { bool, enumOf, str, int } from '../../qapi/schema.js';

export class FileNode extends BlockNode {
  readonly driver = 'file';
  private size: number;

  constructor(
    nodeName: string,
    readOnly: boolean,
    readonly filename: string,
    private readonly fh: fsp.FileHandle,
    size: number,
    private readonly noFlush: boolean,
  ) {
    super(nodeName, readOnly);
    this.size = size;
  }

  length(): number {
    return this.size;
  }

  protected async doRead(offset: number, bytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(bytes);
    let done = 0;
    while (done < bytes) {
      const { bytesRead } = await this.fh.read(buf, done, bytes - done, offset + done);
      if (bytesRead === 0) {
        // Past the end of a file that shrank under us: reads as zeroes, as with a sparse tail.
        buf.fill(0, done);
        break;
      }
      done += bytesRead;
    }
    return buf;
  }

  protected async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
    if (offset + data.length > this.size) this.size = offset + data.length;
    if (flags.fua) await this.doFlush();
  }

  protected async doFlush(): Promise<void> {
    if (this.noFlush || this.readOnly) return;
    await this.fh.datasync();
  }

  /** Protocol nodes grow when a format driver writes past their end (qcow2 allocation). */
  async truncate(newSize: number): Promise<void> {
    await this.fh.truncate(newSize);
    this.size = newSize;
  }

  /** Writes beyond the current end extend the file, as for a growable protocol node in QEMU. */
  override async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    if (offset + data.length > this.size && !this.readOnly && !this.isClosed()) this.size = offset + data.length;
    return super.write(offset, data, flags);
  }

  protected override async doClose(): Promise<void> {
    await this.fh.close();
  }

  override hasZeroInit(): boolean {
    return true;
  }

  imageInfo(): ImageInfo {
    return { filename: this.filename, format: 'file', 'virtual-size': this.size, 'dirty-flag': false };
  }
}

export const fileDriver: BlockDriver = {
  name: 'file',
  options: {
    filename: str,
    '*pr-manager': str,
    '*locking': enumOf('OnOffAuto', ['auto', 'on', 'off']),
    '*aio': enumOf('BlockdevAioOptions', ['threads', 'native', 'io_uring']),
    '*aio-max-batch': int,
    '*drop-cache': bool,
    '*x-check-cache-dropped': bool,
  },
  async open(nodeName, opts) {
    const filename = opts.filename as string;
    let readOnly = opts['read-only'] as boolean;
    const cache = (opts.cache ?? {}) as { direct?: boolean; 'no-flush'?: boolean };
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(filename, readOnly ? fsc.O_RDONLY : fsc.O_RDWR);
    } catch (err) {
      const code = errorCode(err);
      // auto-read-only: fall back to read-only when the file cannot be opened for writing.
      if (!readOnly && opts['auto-read-only'] === true && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM')) {
        fh = await fsp.open(filename, fsc.O_RDONLY).catch((e2) => {
          throw genericError(`Could not open '${filename}': ${strerror(errorCode(e2))}`);
        });
        readOnly = true;
      } else {
        throw genericError(`Could not open '${filename}': ${strerror(code)}`);
      }
    }
    const st = await fh.stat();
    if (st.isDirectory()) {
      await fh.close();
      throw genericError(`'${filename}' is a directory`);
    }
    const size = st.isBlockDevice() ? await blockDeviceSize(fh) : st.size;
    return new FileNode(nodeName, readOnly, filename, fh, size, cache['no-flush'] === true);
  },
};

async function blockDeviceSize(fh: fsp.FileHandle): Promise<number> {
  // fstat reports 0 for block devices; find the end by reading backwards from a large power of two.
  let lo = 0;
  let hi = 2 ** 52;
  const probe = Buffer.alloc(1);
  while (lo < hi) {
    const mid = Math.floor((lo + hi + 1) / 2);
    const { bytesRead } = await fh.read(probe, 0, 1, mid - 1);
    if (bytesRead === 1) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}
