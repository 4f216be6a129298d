/**
 * qcow2's runtime options that bitmirror takes without acting on them — the metadata cache sizes,
 * cache-clean-interval, lazy-refcounts — checked as QEMU 7.2 checks them when it opens or reopens
 * an image (read_cache_sizes, qcow2_update_options_prepare), with its messages: a script that QEMU
 * refuses is refused here too, and one that QEMU takes is taken. bitmirror sizes its own caches.
 */
import * as os from 'node:os';
import { genericError } from '../../../errors.js';
import { qdictOrder } from '../../../base/qdict.js';
import { qemuOptSize } from '../../../qapi/schema.js';
import type { Qcow2Header } from './header.js';

const MIN_CLUSTER_SIZE = 512;
/** QEMU's least numbers of cached tables. */
const MIN_L2_CACHE_TABLES = 2;
const MIN_REFCOUNT_CACHE_TABLES = 4;
/** QEMU's default L2 cache limit (32 MiB; enough for 256 GiB at 64 KiB clusters). */
const DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024;
const INT_MAX = 2 ** 31 - 1;
const UINT_MAX = 2 ** 32 - 1;

const SIZE_OPTIONS = ['cache-size', 'l2-cache-size', 'refcount-cache-size', 'l2-cache-entry-size'];

/** Throws QEMU 7.2's error for runtime options it would refuse on this image; returns nothing. */
export function checkRuntimeOptions(opts: Record<string, unknown>, h: Qcow2Header): void {
  // QemuOpts reads the sizes in the order of the options' QDict.
  const sizes: Record<string, number | undefined> = {};
  for (const key of qdictOrder(SIZE_OPTIONS.filter((k) => opts[k] !== undefined))) sizes[key] = qemuOptSize(opts, key);
  const cs = 2 ** h.clusterBits;
  const l2EntryBytes = 8;
  // Every L2 table the image could need, whole clusters.
  const maxL2Cache = Math.ceil((Math.ceil(h.size / cs) * l2EntryBytes) / cs) * cs;
  const minRefcountCache = MIN_REFCOUNT_CACHE_TABLES * cs;
  const combined = sizes['cache-size'];
  let l2 = sizes['l2-cache-size'] ?? 0;
  let refcount = sizes['refcount-cache-size'] ?? 0;
  const l2Set = sizes['l2-cache-size'] !== undefined;
  const refcountSet = sizes['refcount-cache-size'] !== undefined;
  const entrySize = sizes['l2-cache-entry-size'] ?? cs;
  if (combined !== undefined) {
    if (l2Set && refcountSet) throw genericError('cache-size, l2-cache-size and refcount-cache-size may not be set at the same time');
    if (l2Set && l2 > combined) throw genericError('l2-cache-size may not exceed cache-size');
    if (refcount > combined) throw genericError('refcount-cache-size may not exceed cache-size');
    if (l2Set) refcount = combined - l2;
    else if (refcountSet) l2 = combined - refcount;
    else if (combined >= maxL2Cache + minRefcountCache) {
      // As much as the image can use goes to the L2 cache, the rest to refcounts.
      l2 = maxL2Cache;
      refcount = combined - l2;
    } else {
      refcount = Math.min(combined, minRefcountCache);
      l2 = combined - refcount;
    }
  } else {
    if (!l2Set) l2 = Math.min(DEFAULT_L2_CACHE_MAX_SIZE, maxL2Cache);
    if (!refcountSet) refcount = minRefcountCache;
  }
  // More than every L2 table is never cached.
  l2 = Math.min(l2, maxL2Cache);
  if (entrySize < MIN_CLUSTER_SIZE || entrySize > cs || (entrySize & (entrySize - 1)) !== 0) {
    throw genericError(`L2 cache entry size must be a power of two between ${MIN_CLUSTER_SIZE} and the cluster size (${cs})`);
  }
  const l2Tables = Math.max(Math.floor(l2 / entrySize), MIN_L2_CACHE_TABLES);
  if (l2Tables > INT_MAX) throw genericError('L2 cache size too big');
  const refcountTables = Math.max(Math.floor(refcount / cs), MIN_REFCOUNT_CACHE_TABLES);
  if (refcountTables > INT_MAX) throw genericError('Refcount cache size too big');
  // QEMU allocates both caches whole at open; where that allocation fails depends on the host's
  // memory, which bitmirror takes as the line: more than the machine has fails there as here.
  if (l2Tables * entrySize > os.totalmem() || refcountTables * cs > os.totalmem()) throw genericError('Could not allocate metadata caches');
  // A number option: QemuOpts reads a negative one as its 64-bit two's complement.
  const interval = opts['cache-clean-interval'] as number | undefined;
  if (interval !== undefined && (interval < 0 || interval > UINT_MAX)) throw genericError('Cache clean interval too big');
  if (opts['lazy-refcounts'] === true && h.version < 3) throw genericError('Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level');
}
