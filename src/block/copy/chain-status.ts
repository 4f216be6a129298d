/**
 * Block status through a backing chain, for copies: whether a range reads as zeroes from the top
 * node's point of view (the first layer that has it allocated decides, below the last one it reads as
 * zeroes), whether a whole node reads as zeroes, and which ranges are allocated above a base.
 */
import type { BlockNode } from '../node.js';

/**
 * Block status of `top` through its backing chain (bdrv_block_status_above to the bottom): for a prefix
 * of [offset, +bytes) (`bytes` returned), whether it reads as zeroes and whether it is data, as decided
 * by the first layer that has it allocated (below the last layer: as that layer says), and the depth of
 * that layer (1 = `top`, 2 = its backing node, …; 0 = allocated nowhere). Copies use `zero`; NBD's
 * base:allocation and qemu:allocation-depth contexts use all of it.
 */
export async function chainStatus(top: BlockNode, offset: number, bytes: number): Promise<{ bytes: number; zero: boolean; data: boolean; depth: number }> {
  let node: BlockNode | undefined = top.formatLayer();
  let want = bytes;
  for (let depth = 1; node; depth++) {
    const st = await node.blockStatus(offset, want);
    if (st.allocated) return { bytes: st.bytes, zero: st.zero, data: st.data, depth };
    if (!node.backing()) return { bytes: st.bytes, zero: st.zero, data: st.data, depth: 0 };
    want = st.bytes;
    const next: BlockNode = node.backing()!;
    if (offset >= next.length()) return { bytes: want, zero: true, data: false, depth: 0 };
    want = Math.min(want, next.length() - offset);
    node = next.formatLayer();
  }
  return { bytes: want, zero: false, data: true, depth: 0 };
}

/**
 * QEMU's is_zero (qcow2): whether all of [offset, +bytes) of `top` reads as zeroes, from block status
 * through its chain alone (no data is read). The part past the node's end counts as zeroes.
 */
export async function readsAsZeroes(top: BlockNode, offset: number, bytes: number): Promise<boolean> {
  const end = Math.min(offset + bytes, top.length());
  for (let pos = offset; pos < end; ) {
    const st = await chainStatus(top, pos, end - pos);
    if (!st.zero) return false;
    pos += st.bytes;
  }
  return true;
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
