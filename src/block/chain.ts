/**
 * Walking backing chains as QEMU's block layer does (block.c's bdrv_filter_or_cow_bs, bdrv_skip_filters,
 * bdrv_chain_contains, bdrv_find_overlay, bdrv_find_base, bdrv_find_backing_image): what the chain
 * operations (snapshots, change-backing-file, block-stream, block-commit) use to find their nodes.
 * A chain goes down through backing links ('cow' children) of format nodes and through the filtered
 * child of filters; a raw node over a file is no chain link (its file holds its data).
 */
import { promises as fsp } from 'node:fs';
import type { BdrvChild, BlockNode } from './node.js';
import { genericError } from '../errors.js';
import { FilterNode } from './filters/filter.js';
import { hasProtocol, resolveBackingFilename } from './filename.js';

/** Whether QEMU counts the node as a filter (is_filter): mirror_top, copy-before-write, throttle, copy-on-read. */
export function isFilter(node: BlockNode): boolean {
  return node instanceof FilterNode;
}

/** bdrv_filter_or_cow_bs: the next node down the chain: a filter's child, else the backing node. */
export function filterOrCowChild(node: BlockNode): BlockNode | undefined {
  return node instanceof FilterNode ? node.filtered : node.backing();
}

/** bdrv_skip_filters: the first node at or below `node` that is no filter. */
export function skipFilters(node: BlockNode): BlockNode;
export function skipFilters(node: BlockNode | undefined): BlockNode | undefined;
export function skipFilters(node: BlockNode | undefined): BlockNode | undefined {
  let n = node;
  while (n instanceof FilterNode) n = n.filtered;
  return n;
}

/** bdrv_backing_chain_next: the next format layer below `node` (filters skipped on both sides). */
export function backingChainNext(node: BlockNode): BlockNode | undefined {
  return skipFilters(skipFilters(node).backing());
}

/** bdrv_chain_contains: whether `node` is `top` or lies below it through filters and backing links. */
export function chainContains(top: BlockNode, node: BlockNode | undefined): boolean {
  for (let n: BlockNode | undefined = top; n; n = filterOrCowChild(n)) if (n === node) return true;
  return false;
}

/**
 * bdrv_find_overlay: the format layer of `active`'s chain whose backing is `node`, if any; with no
 * `node`, the bottom layer of the chain.
 */
export function findOverlay(active: BlockNode, node: BlockNode | undefined): BlockNode | undefined {
  const target = skipFilters(node);
  for (let n: BlockNode | undefined = skipFilters(active); n; ) {
    const next = backingChainNext(n);
    if (next === target) return n;
    n = next;
  }
  return undefined;
}

/** bdrv_find_base: the bottom format layer of `node`'s chain (`node` itself when it has no backing). */
export function findBase(node: BlockNode): BlockNode {
  let n = skipFilters(node);
  for (let next = backingChainNext(n); next; next = backingChainNext(n)) n = next;
  return n;
}

/**
 * bdrv_find_backing_image: the backing node of the first layer below `active` (it included) whose
 * image names `name` as its backing file. As QEMU: a name with a protocol (or a layer whose recorded
 * name has one) compares as written, also with the layer's resolved backing file name; any other
 * name is resolved against the layer's directory and compared, both sides canonical (realpath), with
 * the layer's recorded backing file name resolved likewise. Layers named by a json: pseudo-filename
 * have no directory and are skipped.
 */
export async function findBackingImage(active: BlockNode, name: string): Promise<BlockNode | undefined> {
  const realpath = (p: string) => fsp.realpath(p).catch(() => undefined);
  for (let n: BlockNode | undefined = skipFilters(active); n && n.backing(); n = backingChainNext(n)) {
    const info = n.imageInfo();
    const recorded = info['backing-filename'];
    const full = info['full-backing-filename'];
    if (hasProtocol(name) || (recorded !== undefined && hasProtocol(recorded))) {
      if (name === recorded || name === full) return n.backing();
      continue;
    }
    if (info.filename.startsWith('json:') || full === undefined) continue;
    const wanted = await realpath(resolveBackingFilename(info.filename, name));
    if (wanted !== undefined && wanted === (await realpath(full))) return n.backing();
  }
  return undefined;
}

/** Links frozen by freezeChain, to give to unfreezeChain. */
export type Frozen = BdrvChild[];

/**
 * bdrv_freeze_backing_chain: freeze every chain link (backing links and filters' children) of the nodes
 * from `top` down to, not including, `stop` (to the bottom of the chain when undefined), so that neither
 * blockdev-reopen nor a graph change moves them while a job relies on them. A link frozen already (by
 * another job) fails with QEMU's message, with nothing frozen.
 */
export function freezeChain(top: BlockNode, stop: BlockNode | undefined): Frozen {
  const links: BdrvChild[] = [];
  for (let n: BlockNode | undefined = top; n && n !== stop; n = filterOrCowChild(n)) {
    const next = filterOrCowChild(n);
    const link = n.children.find((c) => c.node === next && (c.role === 'cow' || c.role === 'filtered'));
    if (!link) break;
    if (link.frozen) throw genericError(`Cannot change '${link.name}' link from '${n.nodeName}' to '${link.node.nodeName}'`);
    links.push(link);
  }
  for (const l of links) l.frozen = true;
  return links;
}

/** Unfreeze what freezeChain froze (the list is emptied: a second call does nothing). */
export function unfreezeChain(links: Frozen): void {
  for (const l of links.splice(0)) l.frozen = false;
}
