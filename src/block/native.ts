/**
 * The native addon (native/bitmirror_native.c, built by `npm run build:native`, part of `npm ci`):
 * the Linux syscalls Node's fs module lacks. The addon returns negative errnos; this wrapper turns
 * them into BlockIOErrors with the errno's code name. When the addon was not built, nativeAddon()
 * returns undefined and callers fall back to portable behaviour (no holes, no locks).
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { constants as osc } from 'node:os';
import { BlockIOError } from '../errors.js';

interface NativeAddon {
  lockByte(fd: number, offset: number, exclusive: boolean): number;
  unlockByte(fd: number, offset: number): number;
  testByte(fd: number, offset: number, exclusive: boolean): number;
  ofdSupported(fd: number): number;
  seek(fd: number, offset: number, whence: number): Promise<number>;
  fallocate(fd: number, mode: number, offset: number, len: number): Promise<number>;
  /** copy_file_range until `len` bytes are copied: the count (short at the source's end), or -errno. */
  copyFileRange(fdIn: number, offsetIn: number, fdOut: number, offsetOut: number, len: number): Promise<number>;
  /**
   * pwritev2(RWF_DSYNC) of the whole buffer: bytes written, or -errno. Durable on return (per-write
   * O_DSYNC), without writing back the file's other dirty pages; missing in addons built before it.
   */
  pwriteDsync?(fd: number, buf: Buffer, offset: number): Promise<number>;
  /**
   * Synchronous: the prefix of [offset, +buf.length) read without waiting for a device (the page
   * cache's pages, preadv2 RWF_NOWAIT; all of it on tmpfs/ramfs), or -errno; missing in addons built before it.
   */
  readCached?(fd: number, buf: Buffer, offset: number): number;
  /** dup(fd) (close-on-exec): a second descriptor of the same open file, or -errno; missing in addons built before it. */
  dupFd?(fd: number): number;
  /**
   * Synchronous: `head`, then [offset, +bytes) of `fileFd` by reference (sendfile), into the
   * non-blocking socket `sockFd`, as far as it takes them now: the bytes sent (short when the socket is
   * full), or -errno when none were; missing in addons built before it.
   */
  sendFile?(sockFd: number, head: Buffer, fileFd: number, offset: number, bytes: number): number;
  /** setsockopt SO_SNDBUF (the kernel doubles it and caps it at net.core.wmem_max): 0 or -errno; missing in addons built before it. */
  setSendBuffer?(fd: number, bytes: number): number;
  alignedBuffer(size: number, align: number): Buffer;
  bufferAddress(buf: Buffer): number;
  readonly SEEK_DATA: number;
  readonly SEEK_HOLE: number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly O_DIRECT: number;
}

/** Where an addon is, relative to this module both in src/ (tsx, tests) and in dist/src/. */
const BUILD_DIRS = ['../../native/build/Release/', '../../../native/build/Release/'];

interface Loaded<T> {
  addon?: T;
  error?: string;
}

/** Load native/build/Release/<name>.node (or the file `override` names) once; say why when it is not there. */
function loadAddon<T>(name: string, override: string | undefined): Loaded<T> {
  const require = createRequire(import.meta.url);
  const paths = override ? [override] : BUILD_DIRS.map((d) => fileURLToPath(new URL(`${d}${name}.node`, import.meta.url)));
  for (const p of paths) {
    if (!existsSync(p)) continue;
    try {
      return { addon: require(p) as T };
    } catch (err) {
      return { error: `cannot load ${p}: ${(err as Error).message}` };
    }
  }
  return { error: `native addon ${name} not built (run 'npm run build:native'); looked in ${paths.join(', ')}` };
}

let loaded: Loaded<NativeAddon> | undefined;

/** The addon, or undefined when it is not built (nativeLoadError() says why). */
export function nativeAddon(): NativeAddon | undefined {
  loaded ??= loadAddon<NativeAddon>('bitmirror_native', process.env.BITMIRROR_NATIVE_ADDON);
  return loaded.addon;
}

export function nativeLoadError(): string | undefined {
  nativeAddon();
  return loaded?.error;
}

/** A librbd completion or control call result: bytes (or 0), or a negative errno. */
type RbdResult = Promise<number>;
/** An open image (librados cluster handle, pool I/O context and rbd_image_t) inside the addon. */
export type RbdHandle = { readonly __brand: 'RbdHandle' };
/** Which step of connect/open/create failed: the driver words QEMU's message for it. */
export type RbdStage = 'conf' | 'setting' | 'connect' | 'pool' | 'namespace' | 'open' | 'create' | 'remove';

/** rados_conf_set pairs a connect applies after the conf file: name, value, name, value … (or null). */
export type RbdSettings = string[] | null;

/** The result of a connect: `setting` is the failed pair's index when `stage` is 'setting'. */
export interface RbdConnectResult {
  ret: number;
  stage?: RbdStage;
  setting?: number;
}

/**
 * native/bitmirror_rbd.c: librbd for the rbd driver, a separate addon built only where librbd-dev is
 * installed. I/O calls are librbd's asynchronous ones, completed on the event loop; control calls
 * run on libuv's thread pool. Everything resolves (never rejects) with a result or a negative errno.
 */
export interface RbdAddon {
  open(conf: string | null, user: string | null, pool: string, namespace: string | null, image: string, snapshot: string | null, readOnly: boolean, settings: RbdSettings): Promise<RbdConnectResult & { handle?: RbdHandle }>;
  create(conf: string | null, user: string | null, pool: string, namespace: string | null, image: string, size: number, order: number, settings: RbdSettings): Promise<RbdConnectResult>;
  /** rbd_remove: delete an image and all its data (fails with -EBUSY while a client has it open). */
  remove(conf: string | null, user: string | null, pool: string, namespace: string | null, image: string, settings: RbdSettings): Promise<RbdConnectResult>;
  close(h: RbdHandle): RbdResult;
  resize(h: RbdHandle, size: number): RbdResult;
  stat(h: RbdHandle): Promise<{ size: number; objectSize: number; features: number; flags: number } | number>;
  /** Extents of [offset, offset+length) from rbd_diff_iterate2 (whole objects), flat: offset, length, exists… (at most 64). */
  diff(h: RbdHandle, offset: number, length: number): Promise<number[] | number>;
  metadataGet(h: RbdHandle, key: string): Promise<string | number>;
  metadataSet(h: RbdHandle, key: string, value: string): RbdResult;
  metadataRemove(h: RbdHandle, key: string): RbdResult;
  metadataList(h: RbdHandle): Promise<Record<string, string> | number>;
  /** kind: RBD_AIO_*; `data` is the buffer (read, write) or a length (write-zeroes, discard). */
  aio(h: RbdHandle, kind: number, offset: number, data: Buffer | number, flags: number): RbdResult;
  readonly FEATURE_FAST_DIFF: number;
  readonly FEATURE_OBJECT_MAP: number;
  readonly FLAG_FAST_DIFF_INVALID: number;
  readonly FLAG_OBJECT_MAP_INVALID: number;
  readonly WRITE_ZEROES_FLAG_THICK_PROVISION: number;
}

/** The `kind` argument of RbdAddon.aio (the addon's aio_kind). */
export const RBD_AIO = { read: 0, write: 1, writeZeroes: 2, discard: 3, flush: 4 } as const;

let loadedRbd: Loaded<RbdAddon> | undefined;

/** The librbd addon, or the reason it is not there. */
export function rbdAddon(): Loaded<RbdAddon> {
  loadedRbd ??= loadAddon<RbdAddon>('bitmirror_rbd', process.env.BITMIRROR_RBD_ADDON);
  return loadedRbd;
}

const ERRNO_NAMES = new Map<number, string>();
for (const [name, n] of Object.entries(osc.errno)) if (!ERRNO_NAMES.has(n)) ERRNO_NAMES.set(n, name);
// Linux has one number for both; QEMU says ENOTSUP (and strerror() in errors.ts knows that name).
ERRNO_NAMES.set(osc.errno.EOPNOTSUPP, 'ENOTSUP');

/** The code name of a positive errno number ('EIO' for 5): the one errno-number table (the OS's). */
export function errnoCode(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `E${errno}`;
}

/** Throw a BlockIOError for a negative errno result; return non-negative results unchanged. */
export function check(result: number): number {
  if (result < 0) throw new BlockIOError(errnoCode(-result));
  return result;
}

export const ENXIO = osc.errno.ENXIO;
export const EAGAIN = osc.errno.EAGAIN;
export const EACCES = osc.errno.EACCES;
export const ENOTSUP = osc.errno.EOPNOTSUPP;
export const EINVAL = osc.errno.EINVAL;
export const ENOSYS = osc.errno.ENOSYS;

/** Whether a negative result means "this file system cannot do that" rather than an I/O error. */
export function isUnsupported(result: number): boolean {
  return result === -ENOTSUP || result === -ENOSYS || result === -EINVAL;
}
