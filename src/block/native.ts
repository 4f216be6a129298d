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
  alignedBuffer(size: number, align: number): Buffer;
  bufferAddress(buf: Buffer): number;
  readonly SEEK_DATA: number;
  readonly SEEK_HOLE: number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly O_DIRECT: number;
}

/** Where the addon is, relative to this module both in src/ (tsx, tests) and in dist/src/. */
const CANDIDATES = ['../../native/build/Release/bitmirror_native.node', '../../../native/build/Release/bitmirror_native.node'];

let addon: NativeAddon | null | undefined;
let loadError: string | undefined;

/** The addon, or undefined when it is not built (loadError() says why). */
export function nativeAddon(): NativeAddon | undefined {
  if (addon !== undefined) return addon ?? undefined;
  addon = null;
  const require = createRequire(import.meta.url);
  const override = process.env.BITMIRROR_NATIVE_ADDON;
  const paths = override ? [override] : CANDIDATES.map((c) => fileURLToPath(new URL(c, import.meta.url)));
  for (const p of paths) {
    if (!existsSync(p)) continue;
    try {
      addon = require(p) as NativeAddon;
      return addon;
    } catch (err) {
      loadError = `cannot load ${p}: ${(err as Error).message}`;
      return undefined;
    }
  }
  loadError = `native addon not built (run 'npm run build:native'); looked in ${paths.join(', ')}`;
  return undefined;
}

export function nativeLoadError(): string | undefined {
  nativeAddon();
  return loadError;
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
