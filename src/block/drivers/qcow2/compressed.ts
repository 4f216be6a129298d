/**
 * Compressed clusters: raw deflate (zlib windowBits 12, no header), decoded until one full cluster is
 * out, and encoded as QEMU's qcow2_compress does (default level, windowBits 12, memLevel 9) for
 * compressed writes. zstd (compression_type 1) needs a codec Node 20 does not have, so such images
 * are refused.
 */
import { constants as zlibConstants, deflateRaw, inflateRawSync } from 'node:zlib';
import { promisify } from 'node:util';
import { BlockIOError, genericError } from '../../../errors.js';

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export function checkCompressionType(type: number): void {
  if (type === COMPRESSION_ZLIB) return;
  if (type === COMPRESSION_ZSTD) {
    throw genericError("qcow2: compression type 'zstd' is not supported by this build (Node.js 20 has no zstd decoder)");
  }
  throw genericError(`Unknown compression type ${type}`);
}

const deflateRawAsync = promisify(deflateRaw);

/**
 * Encode one cluster (`data` is exactly one cluster) for a compressed write, on libuv's thread pool
 * (QEMU compresses on a worker thread too): the deflate stream, or undefined when it is not smaller
 * than the cluster (QEMU's qcow2_co_compress into cluster_size - 1 bytes failing with -ENOMEM), in
 * which case the caller writes the cluster uncompressed.
 */
export async function compressCluster(data: Buffer): Promise<Buffer | undefined> {
  const out = await deflateRawAsync(data, { level: zlibConstants.Z_DEFAULT_COMPRESSION, windowBits: 12, memLevel: 9 });
  return out.length < data.length ? out : undefined;
}

/** Decode one compressed cluster from `data` (the bytes read at its offset) into `clusterSize` bytes. */
export function decompressCluster(data: Buffer, clusterSize: number): Buffer {
  let out: Buffer;
  try {
    // The stored size is rounded up to whole sectors, so trailing garbage after the stream is normal;
    // zlib stops at the end of the deflate stream and maxOutputLength bounds a malicious one.
    out = inflateRawSync(data, { windowBits: 12, maxOutputLength: clusterSize, finishFlush: 2 /* Z_SYNC_FLUSH */ });
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE') {
      throw new BlockIOError('EIO', 'qcow2: compressed cluster expands beyond the cluster size');
    }
    throw new BlockIOError('EIO', `qcow2: compressed cluster cannot be decoded: ${(err as Error).message}`);
  }
  if (out.length < clusterSize) throw new BlockIOError('EIO', 'qcow2: compressed cluster is truncated');
  return out;
}
