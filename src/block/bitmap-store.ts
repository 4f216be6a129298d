/**
 * The persistent-bitmap store: what a node that can keep dirty bitmaps in its image (qcow2) offers the
 * bitmap layer above it. The block layer defines it so that drivers implement it without importing
 * bitmap/ (which sits above block/); bitmap/manager.ts and bitmap/persistence.ts call it.
 */
import type { BlockNode } from './node.js';

/**
 * What a node that can persist bitmaps (qcow2) offers; the manager calls these when present.
 * Nodes without them cannot have persistent bitmaps, as in QEMU ("Can't store persistent bitmaps").
 */
export interface PersistentBitmapStore {
  /**
   * Throw (QmpError with QEMU's message) when a new persistent bitmap cannot be stored;
   * `persistentNames` are the node's persistent bitmaps in memory (they count toward the limits).
   */
  canStoreNewDirtyBitmap(name: string, granularity: number, persistentNames?: string[]): void | Promise<void>;
  /** Remove a persistent bitmap from the image (block-dirty-bitmap-remove). */
  removePersistentDirtyBitmap?(name: string): void | Promise<void>;
  /**
   * The bitmaps stored in the image, in storage order, read when the node is opened. A read-write
   * node marks them in use on disk before returning (a crash then leaves them inconsistent).
   */
  loadPersistentDirtyBitmaps?(): Promise<LoadedDirtyBitmap[]>;
  /**
   * Write these bitmaps back (the node is closing) and mark them consistent; stored bitmaps not in
   * the list (inconsistent ones) are kept as they are.
   */
  /**
   * Before a write, write-zeroes or discard of [offset, offset+bytes) is performed: make sure a
   * crash after it leaves the range recoverable into the stored bitmaps (the node's write-intent
   * record). Undefined when there is nothing to wait for.
   */
  markWriteIntent?(offset: number, bytes: number): Promise<void> | undefined;
  storePersistentDirtyBitmaps?(list: Array<{ name: string; granularity: number; auto: boolean; data: Buffer }>): Promise<void>;
}

/** A bitmap found in an image. Inconsistent ones (in use on disk at open) have no data. */
export interface LoadedDirtyBitmap {
  name: string;
  granularity: number;
  enabled: boolean;
  inconsistent: boolean;
  /** Serialized bits (qcow2 order: bit n in byte n/8, least significant first). */
  data?: Buffer;
  /**
   * Set when the bitmap was in use when its last writer died and came back from the write-intent
   * record: its stored bits with `regions` regions of `regionSize` bytes marked dirty.
   */
  recovered?: { regions: number; regionSize: number };
}

/** The node as a bitmap store, or undefined when it cannot keep bitmaps in its image. */
export function persistentStore(node: BlockNode): PersistentBitmapStore | undefined {
  const n = node as Partial<PersistentBitmapStore>;
  return typeof n.canStoreNewDirtyBitmap === 'function' ? (n as PersistentBitmapStore) : undefined;
}
