/**
 * Block status through a backing chain, for copies: whether a range reads as zeroes from the top
 * node's point of view (the first layer that has it allocated decides, below the last one it reads as
 * zeroes), whether a whole node reads as zeroes, and which ranges are allocated above a base.
 */
import type { BlockNode } from '../node.js';

/** Whether [offset, +bytes) of `top` (a prefix of it, `bytes` returned) reads as zeroes, through its backing chain. */
export async function chainStatus(top: BlockNode, offset: number, bytes: number): Promise<{ bytes: number; zero: boolean }> {
  let node: BlockNode | undefined = top.formatLayer();
  let want = bytes;
  while (node) {
    const st = await node.blockStatus(offset, want);
    if (st.allocated || !node.backing()) return { bytes: st.bytes, zero: st.zero };
    want = st.bytes;
    const next: BlockNode = node.backing()!;
    if (offset >= next.length()) return { bytes: want, zero: true };
    want = Math.min(want, next.length() - offset);
    node = next.formatLayer();
  }
  return { bytes: want, zero: false };
}

/** Block status is asked about at most this much at a time, so that a stop request is seen between steps. */
const STATUS_STEP = 1 << 30;

/**
 * bdrv_co_is_all_zeroes: whether the whole node reads as zeroes, from block status alone. False when
 * `stop()` becomes true on the way.
 */
export async function readsAllZeroes(node: BlockNode, stop: () => boolean = () => false): Promise<boolean> {
  const size = node.length();
  for (let offset = 0; offset < size; ) {
    if (stop()) return false;
    const st = await chainStatus(node, offset, Math.min(size - offset, STATUS_STEP));
    if (!st.zero) return false;
    offset += st.bytes;
  }
  return true;
}

/**
 * Call `mark(offset, bytes)` for every range of `top` allocated in it or a backing node above `base`
 * (all of the chain when `base` is undefined): what a copy with sync=top (or full) must copy. Stops
 * early when `stop()` becomes true.
 */
export async function forEachAllocated(
  top: BlockNode,
  base: BlockNode | undefined,
  mark: (offset: number, bytes: number) => void,
  stop: () => boolean = () => false,
): Promise<void> {
  const size = top.length();
  for (let offset = 0; offset < size; ) {
    if (stop()) return;
    const st = await top.isAllocatedAbove(base, offset, Math.min(size - offset, STATUS_STEP));
    if (st.allocated) mark(offset, st.bytes);
    offset += st.bytes;
  }
}
