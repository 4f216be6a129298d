/**
 * The `file` protocol driver (a regular file on the host) and `host_device` (a block or character
 * device), as QEMU's file-posix.
 *
 * - Reads and writes go to the file at the same offsets; flush is fdatasync.
 * - Block status comes from lseek(SEEK_DATA/SEEK_HOLE): holes read as zeroes (zero, not data).
 * - Discard punches a hole when the node's `discard` option is 'unmap' (QEMU's default 'ignore' makes
 *   it a no-op); write-zeroes uses FALLOC_FL_ZERO_RANGE, or punches a hole when the caller allows
 *   unmapping and discard=unmap, and falls back to writing zeroes where the file system cannot.
 * - cache.direct=on opens with O_DIRECT: the request alignment is probed (512…4096), I/O goes through
 *   4096-aligned bounce buffers, and a tail that is not a multiple of the alignment (an image whose size
 *   is not) goes through a second, buffered descriptor.
 * - Image locking is QEMU's, byte for byte, so QEMU and bitmirror see each other's claims (below).
 * - `aio` (threads|native|io_uring) is accepted for compatibility; Node's libuv thread pool does the I/O,
 *   except reads of what the page cache already holds, which the event loop copies (readCached), and
 *   writes into a file in memory (tmpfs, ramfs: writeInMemory).
 * - Copy offload: a regular file opened without O_DIRECT is a host range for copies (doMapHost) and
 *   takes host copies with copy_file_range (doWriteHost), which reflinks where the file system can.
 *
 * Locking. QEMU's file-posix turns block permissions into shared OFD locks on single bytes: byte
 * 100+i while it holds permission bit i, byte 200+i while it does not let others have bit i. Bits:
 * 0 consistent read, 1 write, 2 write unchanged, 3 resize. Before using permissions it checks that no
 * other open file description locks 200+i for a bit it wants ("Failed to get "write" lock") or 100+i for
 * a bit it refuses to share ("Failed to get shared "write" lock"). The permissions are the cumulative
 * ones of the node's parents (permissions.ts): a file node nobody uses, or one under a raw node nobody
 * uses, takes no lock byte, as in QEMU; a writable qcow2 above it takes consistent read, write and
 * resize and shares neither write nor resize, so qemu-io/qemu-img cannot write the image and qemu-img
 * info of it needs -U, exactly as for an image a QEMU guest holds.
 */
import { promises as fsp, constants as fsc, readSync, writeSync } from 'node:fs';
import { BlockIOError, genericError, strerror, errorCode, QmpError } from '../../errors.js';
import { PreallocModeEnum, type PreallocMode } from '../../qapi/block.js';
import { BlockNode, protocolLeaf, type BlockStatus, type HostRange, type ImageInfo, type NodeCapabilities, type ReopenChange, type WriteFlags } from '../node.js';
import type { BlockDriver } from '../graph.js';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, BLK_PERM_WRITE, PERM_NAMES } from '../permissions.js';
import { bool, enumOf, str, int, size } from '../../qapi/schema.js';
import { nativeAddon, nativeLoadError, check, errnoCode, isUnsupported, ENXIO, EAGAIN, EACCES } from '../native.js';

/**
 * The largest read tried from the page cache on the event loop (see FileNode.readCached), and the
 * largest write into a file in memory done there (writeInMemory): about 1 ms of copying.
 */
const CACHED_READ_MAX = 4 << 20;

// ---- QEMU's lock bytes ------------------------------------------------------------------------------

export const RAW_LOCK_PERM_BASE = 100;
export const RAW_LOCK_SHARED_BASE = 200;

export type LockingMode = 'auto' | 'on' | 'off';

/** A QmpError that also carries QEMU's hint line, printed by command-line front ends after the message. */
export type HintedError = QmpError & { hint?: string };

function lockError(message: string, errno: number): QmpError {
  // QEMU leaves strerror out when the byte is simply taken (EAGAIN/EACCES).
  if (errno === EAGAIN || errno === EACCES) return genericError(message);
  return genericError(`${message}: ${strerror(errnoCode(errno))}`);
}

/** The lock bytes that express holding `perm` and not sharing ~`shared`. */
function lockBytesFor(perm: number, shared: number): Set<number> {
  const bytes = new Set<number>();
  for (let i = 0; i < PERM_NAMES.length; i++) {
    if (perm & (1 << i)) bytes.add(RAW_LOCK_PERM_BASE + i);
    if (!(shared & (1 << i))) bytes.add(RAW_LOCK_SHARED_BASE + i);
  }
  return bytes;
}

/**
 * The first half of QEMU's raw_handle_perm_lock (RAW_PL_PREPARE): add the lock bytes for (`perm`,
 * `shared`) to those held on fd, then check that no other open file description holds a byte that
 * conflicts with the new permissions. On failure the bytes are back as they were and QEMU's message is
 * thrown with its "Is another process using the image" hint. `held` is updated in place; the bytes no
 * longer needed are dropped by dropImageLocks (commit) — or those newly taken, to abort.
 */
export function prepareImageLocks(fd: number, filename: string, held: Set<number>, perm: number, shared: number): void {
  const n = nativeAddon();
  if (!n) throw genericError(`Cannot lock '${filename}': ${nativeLoadError() ?? 'native addon unavailable'}`);
  const want = lockBytesFor(perm, shared);
  const before = new Set(held);
  try {
    for (const off of [...want].sort((a, b) => a - b)) {
      if (held.has(off)) continue;
      const r = n.lockByte(fd, off, false);
      if (r < 0) throw lockError(`Failed to lock byte ${off}`, -r);
      held.add(off);
    }
    for (let i = 0; i < PERM_NAMES.length; i++) {
      if (!(perm & (1 << i))) continue;
      const r = n.testByte(fd, RAW_LOCK_SHARED_BASE + i, true);
      if (r !== 0) throw lockError(`Failed to get "${PERM_NAMES[i]}" lock`, r > 0 ? EAGAIN : -r);
    }
    for (let i = 0; i < PERM_NAMES.length; i++) {
      if (shared & (1 << i)) continue;
      const r = n.testByte(fd, RAW_LOCK_PERM_BASE + i, true);
      if (r !== 0) throw lockError(`Failed to get shared "${PERM_NAMES[i]}" lock`, r > 0 ? EAGAIN : -r);
    }
  } catch (err) {
    dropImageLocks(fd, held, before);
    if (err instanceof QmpError) (err as HintedError).hint = `Is another process using the image [${filename}]?`;
    throw err;
  }
}

/** Release every byte in `held` that is not in `keep` (commit: the new set; abort: the old one). */
export function dropImageLocks(fd: number, held: Set<number>, keep: ReadonlySet<number>): void {
  const n = nativeAddon();
  if (!n) return;
  for (const off of [...held]) {
    if (!keep.has(off)) {
      n.unlockByte(fd, off);
      held.delete(off);
    }
  }
}

/** prepareImageLocks and its commit in one step, for a descriptor outside the graph (blockdev-create). */
export function applyImageLocks(fd: number, filename: string, held: Set<number>, perm: number, shared: number): void {
  prepareImageLocks(fd, filename, held, perm, shared);
  dropImageLocks(fd, held, lockBytesFor(perm, shared));
}

/** The file node at the bottom of `node`'s data path (through raw and filters), if its bytes live in one. */
export function fileNodeBelow(node: BlockNode): FileNode | undefined {
  const leaf = protocolLeaf(node);
  return leaf instanceof FileNode ? leaf : undefined;
}

// ---- the node -------------------------------------------------------------------------------------

export interface FileNodeOptions {
  noFlush: boolean;
  /** discard=unmap: discard and write-zeroes with may-unmap punch holes. */
  discardUnmap: boolean;
  /** cache.direct=on: the descriptor has O_DIRECT. */
  direct: boolean;
  /** Regular file (false for block devices: no SEEK_DATA games, no zero-init). */
  regular: boolean;
  /** force-share=on (read-only): claims share everything, as qemu-img -U. */
  forceShare: boolean;
  /** Whether permissions are expressed as lock bytes (locking=on, or auto with OFD support). */
  locking: boolean;
  /** The file lies in memory (tmpfs, ramfs): reading it never waits for a device. */
  inMemory?: boolean;
}

/** statfs f_type of the memory file systems (linux/magic.h). */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

const MEM_ALIGN = 4096;

export class FileNode extends BlockNode {
  /** 'file' for a regular file, 'host_device' for a device (QEMU's two drivers over host files). */
  readonly driver: 'file' | 'host_device';
  private size: number;
  /** Cleared when the file system turns out not to support them. */
  private canSeekHoles = true;
  /**
   * QEMU's block-status cache (block/io.c, bdrv_bsc_*): the last data extent SEEK_HOLE found. On tmpfs
   * SEEK_HOLE walks the page cache up to the next hole, so asking it chunk by chunk through a large
   * data extent is quadratic (a 1 GiB raw mirror on tmpfs spent 7.9 CPU seconds there). Writes only
   * add data, so the extent stays data until something may make holes: write-zeroes, discard, a host
   * copy (a reflink copies holes), truncate — each forgets it (and bumps the generation, so that a
   * lookup racing with it does not store an extent seen before it).
   */
  private dataExtent: { start: number; end: number } | undefined;
  private dataExtentGeneration = 0;
  private holeMakersInFlight = 0;
  private canZeroRange = true;
  private canPunch = true;
  /** For O_DIRECT: a buffered descriptor for the unaligned tail of an image. */
  private tailFh: fsp.FileHandle | undefined;
  /** The cumulative permissions of the node's parents (QEMU's BLK_PERM_* bits), as last committed. */
  perm = 0;
  shared = BLK_PERM_ALL;
  /** Lock bytes currently held on the descriptor. */
  private readonly lockBytes = new Set<number>();
  /** Between prepare and commit/abort: the bytes held before, and the permissions being set. */
  private pending: { before: Set<number>; perm: number; shared: number } | undefined;

  constructor(
    nodeName: string,
    readOnly: boolean,
    readonly filename: string,
    private fh: fsp.FileHandle,
    size: number,
    readonly fileOptions: FileNodeOptions,
  ) {
    super(nodeName, readOnly);
    this.size = size;
    this.driver = fileOptions.regular ? 'file' : 'host_device';
  }

  /** raw_check_perm: take the lock bytes of the new permissions (as well as the old ones for now). */
  override permissionsPrepare(perm: number, shared: number): void {
    const before = new Set(this.lockBytes);
    if (this.fileOptions.locking && !this.isClosed()) prepareImageLocks(this.fh.fd, this.filename, this.lockBytes, perm, shared);
    this.pending = { before, perm, shared };
  }

  /** raw_set_perm: drop the bytes the new permissions do not need. */
  override permissionsCommit(): void {
    const p = this.pending;
    if (!p) return;
    this.pending = undefined;
    this.perm = p.perm;
    this.shared = p.shared;
    if (this.fileOptions.locking && !this.isClosed()) dropImageLocks(this.fh.fd, this.lockBytes, lockBytesFor(p.perm, p.shared));
  }

  /** raw_abort_perm_update: back to the bytes held before. */
  override permissionsAbort(): void {
    const p = this.pending;
    if (!p) return;
    this.pending = undefined;
    if (this.fileOptions.locking && !this.isClosed()) dropImageLocks(this.fh.fd, this.lockBytes, p.before);
  }

  // ---- reopen -------------------------------------------------------------------------------------

  /** Whether the descriptor was opened for writing (a read-only open has O_RDONLY). */
  private fdWritable = !this.readOnly;
  /** A descriptor opened by reopenPrepare (and its O_DIRECT alignment), taken over by reopenCommit. */
  private reopenFh: { fh: fsp.FileHandle; writable: boolean; direct: boolean; alignment: number } | undefined;
  /** Descriptors reopenCommit replaced, closed by reopenFinish (commit itself cannot wait). */
  private retiredFhs: fsp.FileHandle[] = [];

  override reopenableOptions(): readonly string[] {
    return ['drop-cache', 'x-check-cache-dropped'];
  }

  /** QEMU 7.2's file driver lets a reopen leave out only x-check-cache-dropped of its own options (probed on qemu-storage-daemon 7.2). */
  override resetRefusedOptions(): readonly string[] {
    return ['filename', 'aio', 'aio-max-batch', 'locking', 'drop-cache', 'pr-manager'];
  }

  /**
   * raw_reopen_prepare: a new descriptor when the node becomes writable with a read-only one, or when
   * cache.direct changes (O_DIRECT, its alignment probed again). The lock bytes move to the new
   * descriptor (the permission refresh already set them for the new state on the old one): the old
   * descriptor's bytes are dropped first — two descriptions of one file conflict with each other as
   * with anyone — and taken back if the new one cannot get them. Going read-only keeps a writable
   * descriptor: nothing is written through it any more.
   */
  override async reopenPrepare(change: ReopenChange): Promise<void> {
    const direct = ((change.options.cache ?? {}) as { direct?: boolean }).direct === true;
    const writable = this.fdWritable || !change.readOnly;
    if (writable === this.fdWritable && direct === this.fileOptions.direct) return;
    const n = nativeAddon();
    if (direct && !n) throw genericError(`cache.direct=on is not available: ${nativeLoadError()}`);
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.filename, (writable ? fsc.O_RDWR : fsc.O_RDONLY) | (direct ? n!.O_DIRECT : 0));
    } catch (err) {
      throw genericError(`Could not reopen file: ${strerror(errorCode(err))}`);
    }
    let alignment = 1;
    try {
      if (direct) alignment = await probeDirectAlignment(fh);
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw genericError(`Could not reopen file: ${strerror(errorCode(err))}`);
    }
    if (this.fileOptions.locking) {
      dropImageLocks(this.fh.fd, this.lockBytes, new Set());
      try {
        prepareImageLocks(fh.fd, this.filename, this.lockBytes, this.perm, this.shared);
      } catch (err) {
        await fh.close().catch(() => undefined);
        this.lockBytes.clear();
        prepareImageLocks(this.fh.fd, this.filename, this.lockBytes, this.perm, this.shared);
        throw err;
      }
    }
    this.reopenFh = { fh, writable, direct, alignment };
  }

  /** A new descriptor is taken over with no request in flight on the old one (their buffers follow O_DIRECT or not). */
  override reopenDrains(): boolean {
    return this.reopenFh !== undefined;
  }

  override reopenCommit(change: ReopenChange): void {
    super.reopenCommit(change);
    this.forgetDataExtent();
    const next = this.reopenFh;
    if (next) {
      const old = this.fh;
      this.fh = next.fh;
      this.reopenFh = undefined;
      this.fdWritable = next.writable;
      this.fileOptions.direct = next.direct;
      this.requestAlignment = next.alignment;
      this.retiredFhs.push(old);
      if (this.tailFh) this.retiredFhs.push(this.tailFh);
      this.tailFh = undefined;
    }
    this.fileOptions.noFlush = ((change.options.cache ?? {}) as { 'no-flush'?: boolean })['no-flush'] === true;
    this.fileOptions.discardUnmap = change.options.discard === 'unmap';
  }

  /**
   * The old descriptors are closed before blockdev-reopen replies, as QEMU's raw_reopen_commit closes
   * them: a caller that checks the open files after the reply (or takes a lock another descriptor of
   * ours still held) sees only the new one.
   */
  override async reopenFinish(): Promise<void> {
    const retired = this.retiredFhs.splice(0);
    await Promise.all(retired.map((fh) => fh.close().catch(() => undefined)));
  }

  override async reopenAbort(): Promise<void> {
    const next = this.reopenFh;
    if (!next) return;
    this.reopenFh = undefined;
    if (this.fileOptions.locking) {
      dropImageLocks(next.fh.fd, this.lockBytes, new Set());
      prepareImageLocks(this.fh.fd, this.filename, this.lockBytes, this.perm, this.shared);
    }
    await next.fh.close().catch(() => undefined);
  }

  /** The OS file descriptor (for tests and diagnostics). */
  get fd(): number {
    return this.fh.fd;
  }

  /**
   * The length in whole 512-byte sectors, as QEMU's bdrv_getlength gives it (total_sectors): a file
   * whose size is not a multiple of 512 reads as zeroes up to the next boundary, and its users (a format,
   * an NBD export, query-named-block-nodes) see the rounded length as in QEMU.
   */
  length(): number {
    return Math.ceil(this.size / 512) * 512;
  }

  protected async doRead(offset: number, bytes: number): Promise<Buffer> {
    if (this.fileOptions.direct) return this.directRead(offset, bytes);
    const buf = Buffer.allocUnsafe(bytes);
    const cached = this.readCached(offset, buf);
    if (cached < bytes) await readFully(this.fh, buf, cached, bytes - cached, offset + cached);
    return buf;
  }

  protected override async doReadInto(offset: number, buf: Buffer): Promise<void> {
    const bytes = buf.length;
    if (this.fileOptions.direct) {
      // In place when the buffer meets O_DIRECT's rules (the mirror's pool is page-aligned); else bounce.
      if (bytes % this.requestAlignment === 0 && nativeAddon()!.bufferAddress(buf) % MEM_ALIGN === 0) await readFully(this.fh, buf, 0, bytes, offset, true);
      else (await this.directRead(offset, bytes)).copy(buf, 0, 0, bytes);
      return;
    }
    const cached = this.readCached(offset, buf);
    if (cached < bytes) await readFully(this.fh, buf, cached, bytes - cached, offset + cached);
  }

  /** The addon's readCached works here (unknown until tried; false once the kernel or file system refused it). */
  private canReadCached = true;

  /**
   * Read what the page cache already holds of [offset, +buf.length) into buf on the event loop (the
   * addon's readCached never waits for a device) and return how many bytes that was: the caller reads
   * the rest through the thread pool. A read from the pool costs two context switches and a promise
   * settled from another thread, as much CPU as copying a few hundred KiB; an NBD export or a copy whose
   * source is cached (just written, or on tmpfs) spent more of its time there than copying the data.
   * Reads above CACHED_READ_MAX go to the pool whole, so that one copy never holds the loop for long.
   */
  private readCached(offset: number, buf: Buffer): number {
    if (buf.length > CACHED_READ_MAX) return 0;
    if (this.fileOptions.inMemory) return readInMemory(this.fh.fd, buf, offset);
    const n = nativeAddon();
    if (!this.canReadCached || !n?.readCached) return 0;
    const r = n.readCached(this.fh.fd, buf, offset);
    if (r >= 0) return r;
    if (isUnsupported(r)) this.canReadCached = false;
    return 0;
  }

  protected async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    if (flags.fua && !this.fileOptions.direct && (await this.writeDurable(offset, data))) return;
    if (this.fileOptions.direct) await this.directWrite(offset, data);
    else if (this.fileOptions.inMemory && data.length <= CACHED_READ_MAX) writeInMemory(this.fh.fd, data, offset);
    else await writeFully(this.fh, data, 0, data.length, offset);
    if (offset + data.length > this.size) this.size = offset + data.length;
    if (flags.fua) await this.doFlush();
  }

  /** pwritev2 RWF_DSYNC works here (unknown until tried; false once the kernel or file system refused it). */
  private canDsyncWrite = true;

  /**
   * A write durable on return without a flush of the whole file (FUA): pwritev2 with RWF_DSYNC, per-write
   * O_DSYNC. fdatasync would also write back every page the guest dirtied in the page cache, which made
   * each write-intent record update cost as much as a guest flush. False when it is not available (the
   * caller writes and flushes).
   */
  private async writeDurable(offset: number, data: Buffer): Promise<boolean> {
    const n = nativeAddon();
    if (!this.canDsyncWrite || !n?.pwriteDsync) return false;
    const r = await n.pwriteDsync(this.fh.fd, data, offset);
    if (isUnsupported(r)) {
      this.canDsyncWrite = false;
      return false;
    }
    check(r);
    if (offset + data.length > this.size) this.size = offset + data.length;
    return true;
  }

  // O_DIRECT: memory, offset and length must all be aligned. The generic layer aligns offset and length
  // to requestAlignment, except at the end of an image whose size is not a multiple of it.
  private async directRead(offset: number, bytes: number): Promise<Buffer> {
    const n = nativeAddon()!;
    const align = this.requestAlignment;
    const padded = Math.ceil(bytes / align) * align;
    const buf = n.alignedBuffer(padded, MEM_ALIGN);
    await readFully(this.fh, buf, 0, padded, offset, true);
    return buf.subarray(0, bytes);
  }

  private async directWrite(offset: number, data: Buffer): Promise<void> {
    const n = nativeAddon()!;
    const align = this.requestAlignment;
    const head = Math.floor(data.length / align) * align;
    if (head > 0) {
      const aligned = n.bufferAddress(data) % MEM_ALIGN === 0;
      const buf = aligned ? data : n.alignedBuffer(head, MEM_ALIGN);
      if (!aligned) data.copy(buf, 0, 0, head);
      await writeFully(this.fh, buf, 0, head, offset);
    }
    if (head < data.length) {
      this.tailFh ??= await fsp.open(this.filename, fsc.O_RDWR);
      await writeFully(this.tailFh, data, head, data.length - head, offset + head);
      await this.tailFh.datasync();
    }
  }

  /** Copy offload needs the page cache (no O_DIRECT), a regular file and the addon. */
  private hostCopies(): boolean {
    return this.fileOptions.regular && !this.fileOptions.direct && nativeAddon()?.copyFileRange !== undefined;
  }

  protected override async doMapHost(offset: number, bytes: number): Promise<HostRange | undefined> {
    // The rounded tail past the end of the file has no host bytes to copy: read (zeroes) instead.
    if (!this.hostCopies() || offset >= this.size) return undefined;
    return { fd: this.fh.fd, offset, bytes: Math.min(bytes, this.size - offset), stable: this.bytesStable() };
  }

  /**
   * HostRange.stable: the file is in memory, and no parent of the node writes it or lets anyone else
   * write it (so no other process may either: the lock bytes refuse write sharing). A read-only qcow2
   * over the file is such a parent (a format never shares write on its file); an export of a raw file
   * shares write, as QEMU's, so its bytes are not stable.
   */
  private bytesStable(): boolean {
    return this.fileOptions.inMemory === true && this.fileOptions.locking && !this.isClosed() && (this.perm & BLK_PERM_WRITE) === 0 && (this.shared & BLK_PERM_WRITE) === 0;
  }

  protected override canWriteHost(): boolean {
    return this.hostCopies();
  }

  protected override doWriteHost(offset: number, src: HostRange): Promise<void> {
    return this.makingHoles(() => this.writeHostMakingHoles(offset, src));
  }

  private async writeHostMakingHoles(offset: number, src: HostRange): Promise<void> {
    const copied = check(await nativeAddon()!.copyFileRange(src.fd, src.offset, this.fh.fd, offset, src.bytes));
    // Short only at the end of the source file: the range was not all there.
    if (copied < src.bytes) throw new BlockIOError('EIO', `copy_file_range copied ${copied} of ${src.bytes} bytes`);
  }

  protected async doFlush(): Promise<void> {
    if (this.fileOptions.noFlush || this.readOnly) return;
    await this.fh.datasync();
  }

  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    const n = nativeAddon();
    // Past the end of the file (the rounded tail): a hole that reads as zeroes.
    if (offset >= this.size) return { bytes: Math.min(bytes, this.length() - offset), zero: true, data: false, allocated: true };
    const end = Math.min(offset + bytes, this.size);
    const data = { bytes: end - offset, zero: false, data: true, allocated: true };
    if (!n || !this.canSeekHoles || !this.fileOptions.regular) return data;
    const cached = this.dataExtent;
    if (cached && offset >= cached.start && offset < cached.end) return { ...data, bytes: Math.min(cached.end, end) - offset };
    const generation = this.dataExtentGeneration;
    const d = await n.seek(this.fh.fd, offset, n.SEEK_DATA);
    if (d === -ENXIO) {
      // No data at or after offset: a hole up to the end of the file (or we are past its end).
      return { bytes: end - offset, zero: true, data: false, allocated: true };
    }
    if (d < 0) {
      if (isUnsupported(d)) this.canSeekHoles = false;
      return data;
    }
    if (d > offset) return { bytes: Math.min(d, end) - offset, zero: true, data: false, allocated: true };
    // offset is in data: it lasts until the next hole (there is always one at the end of the file).
    const h = await n.seek(this.fh.fd, offset, n.SEEK_HOLE);
    if (h <= offset) return data; // raced with a concurrent change, or an error: say data
    if (generation === this.dataExtentGeneration && this.holeMakersInFlight === 0) this.dataExtent = { start: offset, end: h };
    return { bytes: Math.min(h, end) - offset, zero: false, data: true, allocated: true };
  }

  protected override async doDiscard(offset: number, bytes: number): Promise<void> {
    if (!this.fileOptions.discardUnmap) return;
    // Counted as QEMU's raw_account_discard does: a discard the file system cannot do failed.
    let ok = false;
    try {
      // As raw_co_pdiscard: the hole is punched keeping the file's size, even where the range reaches
      // our end, which is rounded up to 512 (a qcow2 file ending mid-sector stays as long as it was).
      ok = await this.punchHole(offset, bytes, false);
    } finally {
      if (ok) {
        this.discardStats['discard-nb-ok']++;
        this.discardStats['discard-bytes-ok'] += bytes;
      } else this.discardStats['discard-nb-failed']++;
    }
  }

  /** Discards that reached the file, for query-blockstats' driver-specific member. */
  private readonly discardStats = { 'discard-nb-ok': 0, 'discard-nb-failed': 0, 'discard-bytes-ok': 0 };

  override driverSpecificStats(): Record<string, unknown> {
    return { driver: 'file', ...this.discardStats };
  }

  /** Punch a hole; false when the file system cannot (discard is advisory, so that is no error). */
  /** Something may make holes: the cached data extent no longer holds (see dataExtent). */
  private forgetDataExtent(): void {
    this.dataExtent = undefined;
    this.dataExtentGeneration++;
  }

  /**
   * Run an operation that may make holes: the cached extent is forgotten before it and after it,
   * and no lookup stores one while it runs.
   */
  private async makingHoles<T>(op: () => Promise<T>): Promise<T> {
    this.forgetDataExtent();
    this.holeMakersInFlight++;
    try {
      return await op();
    } finally {
      this.holeMakersInFlight--;
      this.forgetDataExtent();
    }
  }

  /** `extend`: a range that reaches our end makes the file that long (a zero write does, a discard not). */
  private punchHole(offset: number, bytes: number, extend: boolean): Promise<boolean> {
    return this.makingHoles(() => this.punchHoleMakingHoles(offset, bytes, extend));
  }

  private async punchHoleMakingHoles(offset: number, bytes: number, extend: boolean): Promise<boolean> {
    const n = nativeAddon();
    if (!n || !this.canPunch || !this.fileOptions.regular) return false;
    const r = await n.fallocate(this.fh.fd, n.FALLOC_FL_PUNCH_HOLE | n.FALLOC_FL_KEEP_SIZE, offset, bytes);
    if (r < 0) {
      if (isUnsupported(r)) {
        this.canPunch = false;
        return false;
      }
      check(r);
    }
    if (extend) await this.extendTo(offset + bytes);
    return true;
  }

  /** KEEP_SIZE leaves a file shorter than a range that reached our (in-memory) end: grow it. */
  private async extendTo(end: number): Promise<void> {
    if (end < this.size) return;
    const st = await this.fh.stat();
    if (st.size < end) await this.fh.truncate(end);
  }

  protected override doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    return this.makingHoles(() => this.writeZeroesMakingHoles(offset, bytes, flags));
  }

  private async writeZeroesMakingHoles(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    const n = nativeAddon();
    if (n && this.fileOptions.regular) {
      if (flags.mayUnmap && this.fileOptions.discardUnmap && (await this.punchHole(offset, bytes, true))) return;
      if (this.canZeroRange) {
        const r = await n.fallocate(this.fh.fd, n.FALLOC_FL_ZERO_RANGE, offset, bytes);
        if (r === 0) {
          if (flags.fua) await this.doFlush();
          return;
        }
        if (!isUnsupported(r)) check(r);
        this.canZeroRange = false;
      }
    }
    // With noFallback the default (writing zeroes) fails with ENOTSUP.
    await super.doWriteZeroes(offset, bytes, flags);
  }

  /** ftruncate (raw_co_truncate with preallocation off): grow with a hole, or shrink. */
  protected override doTruncate(size: number): Promise<void> {
    return this.makingHoles(() => this.truncateMakingHoles(size));
  }

  private async truncateMakingHoles(size: number): Promise<void> {
    try {
      await this.fh.truncate(size);
    } catch (err) {
      throw genericError(`Failed to resize file: ${strerror(errorCode(err))}`);
    }
    this.size = size;
  }

  override capabilities(): NodeCapabilities {
    const native = nativeAddon() !== undefined && this.fileOptions.regular;
    return {
      requestAlignment: this.requestAlignment,
      writeZeroes: native && this.canZeroRange,
      fastZero: native && this.canZeroRange,
      discard: native && this.canPunch && this.fileOptions.discardUnmap,
      fua: false,
      blockStatus: native && this.canSeekHoles,
      resize: true,
    };
  }

  /** The blocks the file takes on the host (st_blocks). */
  override async actualSize(): Promise<number | undefined> {
    try {
      return (await this.fh.stat()).blocks * 512;
    } catch {
      return undefined;
    }
  }

  /** Writes beyond the current end extend the file, as for a growable protocol node in QEMU. */
  override writesPastEnd(): boolean {
    return this.fileOptions.regular;
  }
  override async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    if (offset + data.length > this.size && !this.readOnly && !this.isClosed()) this.size = offset + data.length;
    return super.write(offset, data, flags);
  }

  /** The same for host copies. */
  override async writeHost(offset: number, src: HostRange): Promise<void> {
    if (offset + src.bytes > this.size && !this.readOnly && !this.isClosed()) this.size = offset + src.bytes;
    return super.writeHost(offset, src);
  }

  protected override async doClose(): Promise<void> {
    // Closing the descriptor releases its OFD locks.
    await this.tailFh?.close();
    await this.fh.close();
  }

  override hasZeroInit(): boolean {
    return this.fileOptions.regular;
  }

  imageInfo(): ImageInfo {
    return { filename: this.filename, format: 'file', 'virtual-size': this.length(), 'dirty-flag': false };
  }
}

async function readFully(fh: fsp.FileHandle, buf: Buffer, start: number, bytes: number, pos: number, direct = false): Promise<void> {
  let done = 0;
  while (done < bytes) {
    const { bytesRead } = await fh.read(buf, start + done, bytes - done, pos + done);
    done += bytesRead;
    // With O_DIRECT a short read only happens at the end of the file (and a retry would be unaligned).
    if (bytesRead === 0 || (direct && done < bytes)) {
      // Past the end of the file (a sparse tail, or a file that shrank under us): zeroes.
      buf.fill(0, start + done, start + bytes);
      break;
    }
  }
}

/**
 * A write into a file in memory (tmpfs, ramfs), on the event loop: it never waits for a device, and
 * the thread pool's hand-off (a wake-up of a pool thread, two context switches, the loop woken
 * again) cost more than copying the bytes. nbdcopy of 512 MiB into a fresh qcow2 on tmpfs exported by
 * a fresh daemon, 4 alternating rounds, load 3-4 on 2 cores: daemon CPU 0.71-0.96 s against
 * 0.89-1.09 s through the pool; a second copy over the allocated clusters 0.41-0.59 s against 0.54-0.65 s.
 */
function writeInMemory(fd: number, buf: Buffer, pos: number): void {
  for (let done = 0; done < buf.length; ) done += writeSync(fd, buf, done, buf.length - done, pos + done);
}

/**
 * readCached of a file in memory: a plain pread on the event loop. The addon's preadv2(RWF_NOWAIT)
 * is refused there and only then falls back, three system calls a read where one does. Returns
 * what was read (short at the end of the file, or after an error: the caller reads the rest, and
 * meets the error, through the pool).
 */
function readInMemory(fd: number, buf: Buffer, pos: number): number {
  let done = 0;
  try {
    while (done < buf.length) {
      const n = readSync(fd, buf, done, buf.length - done, pos + done);
      if (n === 0) break;
      done += n;
    }
  } catch {
    // Left to the pool's read.
  }
  return done;
}

async function writeFully(fh: fsp.FileHandle, buf: Buffer, start: number, bytes: number, pos: number): Promise<void> {
  let done = 0;
  while (done < bytes) {
    const { bytesWritten } = await fh.write(buf, start + done, bytes - done, pos + done);
    done += bytesWritten;
  }
}

/**
 * QEMU's raw_probe_alignment for O_DIRECT: the smallest of 512…4096 that a read accepts. A read
 * at offset 0 is checked for alignment before end-of-file, so an empty file probes as well.
 */
async function probeDirectAlignment(fh: fsp.FileHandle): Promise<number> {
  const n = nativeAddon()!;
  const buf = n.alignedBuffer(MEM_ALIGN, MEM_ALIGN);
  for (const align of [512, 1024, 2048, 4096]) {
    try {
      await fh.read(buf, 0, align, 0);
      return align;
    } catch (err) {
      if (errorCode(err) !== 'EINVAL') throw err;
    }
  }
  return MEM_ALIGN;
}

// ---- blockdev-create --------------------------------------------------------------------------------

/** BlockdevCreateOptionsFile. */
export interface FileCreateOptions {
  filename: string;
  size: number;
  preallocation?: PreallocMode;
  /** Accepted and ignored (btrfs only in QEMU). */
  nocow?: boolean;
  'extent-size-hint'?: number;
}

const ZERO_CHUNK = 1 << 20;

function osError(prefix: string, err: unknown): Error {
  return genericError(`${prefix}: ${strerror(errorCode(err))}`);
}

/**
 * Create (or re-create) a host file of `size` bytes, as QEMU's file-posix does for blockdev-create:
 * create (O_CREAT, mode 0644, keeping an existing file), take the write and resize lock bytes and check
 * nobody else holds conflicting ones, truncate to 0, then grow to the size with the preallocation mode.
 * A failure leaves what QEMU leaves: the (empty) file exists.
 */
export async function createFile(opts: FileCreateOptions): Promise<void> {
  const { filename, size } = opts;
  const prealloc = opts.preallocation ?? 'off';
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(filename, fsc.O_RDWR | fsc.O_CREAT, 0o644);
  } catch (err) {
    throw osError(`Could not create '${filename}'`, err);
  }
  try {
    // Take write+resize and refuse to share resize, then check nobody else conflicts (a node open
    // read-write on the same file, here or in a QEMU process, holds the write lock).
    if (nativeAddon()) applyImageLocks(fh.fd, filename, new Set(), BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL & ~BLK_PERM_RESIZE);
    try {
      await fh.truncate(0);
    } catch (err) {
      throw osError('Could not resize file', err);
    }
    await growFile(fh, size, prealloc);
  } finally {
    // Closing the descriptor drops its lock bytes.
    await fh.close().catch(() => undefined);
  }
}

/** Grow an empty file to `size` with the preallocation mode (raw_regular_truncate from length 0). */
async function growFile(fh: fsp.FileHandle, size: number, prealloc: PreallocMode): Promise<void> {
  switch (prealloc) {
    case 'off':
      try {
        await fh.truncate(size);
      } catch (err) {
        throw osError('Could not resize file', err);
      }
      return;
    case 'full':
      try {
        await fh.truncate(size);
      } catch (err) {
        throw osError('Could not resize file', err);
      }
      try {
        const zeroes = Buffer.alloc(Math.min(ZERO_CHUNK, Math.max(size, 1)));
        for (let pos = 0; pos < size; ) {
          const n = Math.min(zeroes.length, size - pos);
          const { bytesWritten } = await fh.write(zeroes, 0, n, pos);
          pos += bytesWritten;
        }
        await fh.sync();
      } catch (err) {
        await fh.truncate(0).catch(() => undefined);
        throw osError('Could not write zeros for preallocation', err);
      }
      return;
    case 'falloc': {
      const n = nativeAddon();
      if (!n) throw genericError('Could not preallocate new data: Operation not supported');
      if (size === 0) return;
      const r = await n.fallocate(fh.fd, 0, 0, size);
      if (r < 0) {
        await fh.truncate(0).catch(() => undefined);
        throw genericError(`Could not preallocate new data: ${strerror(errnoCode(-r))}`);
      }
      return;
    }
    default:
      throw genericError(`Unsupported preallocation mode: ${prealloc}`);
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
  create: {
    options: { filename: str, size, '*preallocation': PreallocModeEnum, '*nocow': bool, '*extent-size-hint': size },
    run: (opts) => createFile(opts as unknown as FileCreateOptions),
  },
  open: (nodeName, opts) => openHostFile('file', nodeName, opts),
};

/** Block and character devices: QEMU's host_device driver (the file driver refuses them). */
export const hostDeviceDriver: BlockDriver = {
  name: 'host_device',
  options: fileDriver.options,
  open: (nodeName, opts) => openHostFile('host_device', nodeName, opts),
};

/**
 * Open a host file: a regular file for the `file` driver, a block or character device for
 * `host_device`; each refuses the other kind with QEMU 7.2's message.
 */
async function openHostFile(kind: 'file' | 'host_device', nodeName: string, opts: Record<string, unknown>): Promise<FileNode> {
  const filename = opts.filename as string;
  let readOnly = opts['read-only'] as boolean;
  const cache = (opts.cache ?? {}) as { direct?: boolean; 'no-flush'?: boolean };
  const direct = cache.direct === true;
  const locking = (opts.locking as LockingMode | undefined) ?? 'auto';
  const forceShare = opts['force-share'] === true;
  if (forceShare && !readOnly) throw genericError('force-share=on can only be used with read-only images');
  // bitmirror has no pr-manager objects (SCSI persistent reservations pass through them), so none is
  // found, as QEMU finds none that was never created; checked before the file is opened, as there.
  if (opts['pr-manager'] !== undefined) throw genericError(`No persistent reservation manager with id '${String(opts['pr-manager'])}'`);
  if (opts.aio === 'native' && !direct) {
    throw genericError('aio=native was specified, but it requires cache.direct=on, which was not specified.');
  }
  const n = nativeAddon();
  if (direct && !n) throw genericError(`cache.direct=on is not available: ${nativeLoadError()}`);
  const extra = direct ? n!.O_DIRECT : 0;

  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(filename, (readOnly ? fsc.O_RDONLY : fsc.O_RDWR) | extra);
  } catch (err) {
    const code = errorCode(err);
    // auto-read-only: fall back to read-only when the file cannot be opened for writing.
    if (!readOnly && opts['auto-read-only'] === true && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM')) {
      fh = await fsp.open(filename, fsc.O_RDONLY | extra).catch((e2) => {
        throw genericError(`Could not open '${filename}': ${strerror(errorCode(e2))}`);
      });
      readOnly = true;
    } else if (direct && code === 'EINVAL') {
      throw genericError(`Could not open '${filename}': filesystem does not support O_DIRECT`);
    } else {
      throw genericError(`Could not open '${filename}': ${strerror(code)}`);
    }
  }
  try {
    const st = await fh.stat();
    if (kind === 'file' && !st.isFile()) throw genericError(`'file' driver requires '${filename}' to be a regular file`);
    if (kind === 'host_device' && !st.isBlockDevice() && !st.isCharacterDevice()) {
      throw genericError(`'host_device' driver requires '${filename}' to be either a character or block device`);
    }
    const size = st.isBlockDevice() ? await blockDeviceSize(fh) : st.size;

    // As in QEMU, a node takes no permissions (so no lock bytes) until a parent needs them
    // (permissions.ts); here we only check that locking is possible.
    let lockingOn = false;
    if (locking !== 'off') {
      const ofd = n ? n.ofdSupported(fh.fd) : -1;
      if (ofd === 0) {
        lockingOn = true;
      } else if (locking === 'on') {
        throw genericError(
          n ? `Failed to lock '${filename}': OFD locks are not supported: ${strerror(errnoCode(-ofd))}` : `Cannot lock '${filename}': ${nativeLoadError()}`,
        );
      }
    }

    const node = new FileNode(nodeName, readOnly, filename, fh, size, {
      noFlush: cache['no-flush'] === true,
      discardUnmap: opts.discard === 'unmap',
      direct,
      regular: st.isFile(),
      forceShare,
      locking: lockingOn,
      inMemory: st.isFile() && (await inMemoryFileSystem(filename)),
    });
    if (direct) node.requestAlignment = await probeDirectAlignment(fh);
    return node;
  } catch (err) {
    await fh.close().catch(() => undefined);
    throw err;
  }
}

/** Whether `filename` lies on tmpfs or ramfs (false when that cannot be told). */
async function inMemoryFileSystem(filename: string): Promise<boolean> {
  try {
    const { type } = await fsp.statfs(filename);
    return type === TMPFS_MAGIC || type === RAMFS_MAGIC;
  } catch {
    return false;
  }
}

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
