/**
 * The bitmaps a copy needs from the layer above (bitmap/, which block/ must not import): QEMU's
 * block-copy and copy-before-write keep anonymous, non-recording dirty bitmaps on their nodes (the copy
 * bitmap on the source, the done and access bitmaps on the filter), which query-named-block-nodes
 * shows; and copy-before-write's `bitmap` option names a user's bitmap. The Core installs the one
 * implementation (the BitmapManager's) on the graph as BlockGraph.copyBitmaps.
 */
import type { BlockNode } from '../node.js';
import type { CopyBitmap } from './block-copy.js';

export interface CopyBitmapHost {
  /** A new anonymous bitmap on `node` that records no writes, all clean, listed with the node's bitmaps. */
  createHidden(node: BlockNode, granularity: number): CopyBitmap;
  /** Drop a bitmap createHidden made. */
  release(bm: CopyBitmap): void;
  /** block_dirty_bitmap_lookup: the named bitmap of the node, or QEMU's error. */
  lookup(node: BlockNode, name: string): CopyBitmap;
  /** OR the bits of `src` into `dst` (granularities may differ), without the user-level checks. */
  mergeInto(dst: CopyBitmap, src: CopyBitmap): void;
  /** Set every bit. */
  setAll(bm: CopyBitmap): void;
  /** The bitmap's granularity in bytes. */
  granularity(bm: CopyBitmap): number;
}
