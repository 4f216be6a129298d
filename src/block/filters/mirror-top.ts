/**
 * mirror_top: the filter a mirror job inserts above its source, as in QEMU, so that management
 * software sees the same graph (filter-node-name, implicit auto-named node). It only passes I/O down:
 * the job observes writes on the source node itself, so writes that bypass the filter (HMP qemu-io on
 * the source, a second export) are mirrored too — see jobs/mirror.ts.
 */
import { FilterNode } from './filter.js';
import type { BlockNode } from '../node.js';

export class MirrorTopNode extends FilterNode {
  readonly driver = 'mirror_top';
  constructor(nodeName: string, source: BlockNode) {
    super(nodeName, source, 'backing');
  }
}
