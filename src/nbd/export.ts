/**
 * An NBD export: a node offered under a name, as QEMU's NBDExport. It is a first-class parent of the
 * node (an unnamed BlockBackend edge) with QEMU's permissions: consistent read, write when writable,
 * sharing everything but resize (nbd_export_create forbids resizing while exported). Exported dirty
 * bitmaps are marked busy for the export's lifetime. It answers the questions the protocol asks of an
 * export: its transmission flags, block sizes, metadata contexts, and the extents of each context.
 */
import { genericError } from '../errors.js';
import type { BdrvChild, BlockNode } from '../block/node.js';
import { BlockNode as BlockNodeClass } from '../block/node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_RESIZE, BLK_PERM_WRITE, unnamedBackend } from '../block/permissions.js';
import { chainStatus } from '../block/copy/chain-status.js';
import type { BitmapManager } from '../bitmap/manager.js';
import { BITMAP_ALLOW_RO, type DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import {
  CONTEXT_ALLOCATION_DEPTH,
  CONTEXT_BASE_ALLOCATION,
  CONTEXT_DIRTY_BITMAP_PREFIX,
  NBD_FLAG,
  NBD_MAX_STRING_SIZE,
  NBD_STATE_DIRTY,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  type BlockSizes,
  type Extent,
} from './protocol.js';

/** Largest READ, WRITE or CACHE the server takes (QEMU's NBD_MAX_BUFFER_SIZE), and the maximum it announces. */
export const NBD_MAX_BUFFER_SIZE = 32 << 20;

/** A bitmap to export: by name, found on the node or below it through filters and backing files; or exactly. */
export type ExportBitmapRef = string | { node: string; name: string };

export interface NbdExportOptions {
  id: string;
  /** The export name clients ask for. */
  name: string;
  description?: string;
  node: BlockNode;
  writable: boolean;
  /**
   * block-export-add writethrough: the export's node is used with its write cache off, so every
   * write and write-zeroes reaches stable storage before it is acknowledged (QEMU's BlockBackend adds
   * FUA to each).
   */
  writethrough?: boolean;
  allocationDepth: boolean;
  bitmaps: ExportBitmapRef[];
}

/** A selected or listed metadata context: its id on this server (QEMU's numbering) and what it reports. */
export interface MetaContext {
  id: number;
  name: string;
  kind: 'base' | 'depth' | 'bitmap';
  bitmap?: DirtyBitmap;
}

/** What the export knows of a connection: enough to close it. */
export interface ExportClient {
  /** Close the connection now (block-export-del mode=hard, nbd-server-stop). */
  close(): void;
}

export class NbdExport {
  readonly id: string;
  readonly name: string;
  readonly description: string | undefined;
  readonly node: BlockNode;
  readonly writable: boolean;
  readonly writethrough: boolean;
  readonly allocationDepth: boolean;
  readonly bitmaps: DirtyBitmap[];
  /** Connections in transmission with this export. */
  readonly clients = new Set<ExportClient>();
  /** block-export-del asked for it: no new connection may use it; it goes once its clients have. */
  shuttingDown = false;
  private edge: BdrvChild | undefined;

  private constructor(
    opts: NbdExportOptions,
    bitmaps: DirtyBitmap[],
    private readonly manager: BitmapManager,
  ) {
    this.id = opts.id;
    this.name = opts.name;
    this.description = opts.description;
    this.node = opts.node;
    this.writable = opts.writable;
    this.writethrough = opts.writethrough ?? false;
    this.allocationDepth = opts.allocationDepth;
    this.bitmaps = bitmaps;
  }

  /**
   * Check the options as QEMU's nbd_export_create does, with its messages, then take the node and mark
   * the bitmaps busy. Throws with nothing changed. `findNode` resolves a bitmap's `node` member.
   */
  static create(opts: NbdExportOptions, manager: BitmapManager, findNode: (name: string) => BlockNode): NbdExport {
    if (Buffer.byteLength(opts.name) > NBD_MAX_STRING_SIZE) throw genericError(`export name '${opts.name}' too long`);
    if (opts.description !== undefined && Buffer.byteLength(opts.description) > NBD_MAX_STRING_SIZE) {
      throw genericError(`description '${opts.description}' too long`);
    }
    const bitmaps: DirtyBitmap[] = [];
    for (const ref of opts.bitmaps) {
      const name = typeof ref === 'string' ? ref : ref.name;
      // A name is looked for below the node; {node, name} exactly, with block_dirty_bitmap_lookup's message.
      const bm = typeof ref === 'string' ? findBitmapBelow(manager, opts.node, ref) : manager.find(findNode(ref.node), ref.name);
      if (!bm) throw genericError(typeof ref === 'string' ? `Bitmap '${name}' is not found` : `Dirty bitmap '${name}' not found`);
      bm.check(BITMAP_ALLOW_RO);
      if (!opts.writable && !opts.node.readOnly && bm.enabled) {
        throw genericError(`Enabled bitmap '${name}' incompatible with readonly export`);
      }
      if (bitmaps.includes(bm)) throw genericError(`Bitmap '${name}' is currently in use by another operation and cannot be used`);
      bitmaps.push(bm);
    }
    const exp = new NbdExport(opts, bitmaps, manager);
    // blk_exp_add: consistent read, and write when writable; nbd_export_create then stops sharing resize.
    const perm = BLK_PERM_CONSISTENT_READ | (opts.writable ? BLK_PERM_WRITE : 0);
    exp.edge = opts.node.attachParent(unnamedBackend(), 'root', perm, BLK_PERM_ALL & ~BLK_PERM_RESIZE);
    for (const bm of bitmaps) manager.setBusy(bm, true);
    return exp;
  }

  /** Let go of the node and the bitmaps (the export is gone). */
  release(): void {
    if (this.edge) BlockNodeClass.detachParent(this.edge);
    this.edge = undefined;
    for (const bm of this.bitmaps) this.manager.setBusy(bm, false);
  }

  /** The node the edge now points at (a mirror's completion may have replaced it). */
  get current(): BlockNode {
    return this.edge?.node ?? this.node;
  }

  size(): number {
    return this.current.length();
  }

  /**
   * Transmission flags, as QEMU 7.2's nbd_export_create and nbd_negotiate_send_info: flush, FUA and
   * cache always; trim, write-zeroes and fast-zero when writable, read-only otherwise; DF once
   * structured replies are on. Multi-conn for every export, read-only or writable, as QEMU 7.1+
   * ("nbd/server: Allow MULTI_CONN for shared writable exports"): every connection reaches the node
   * through the same graph, so a flush on one covers writes acknowledged on any other.
   */
  transmissionFlags(structuredReplies: boolean): number {
    let f = NBD_FLAG.HAS_FLAGS | NBD_FLAG.SEND_FLUSH | NBD_FLAG.SEND_FUA | NBD_FLAG.SEND_CACHE | NBD_FLAG.CAN_MULTI_CONN;
    if (this.writable) f |= NBD_FLAG.SEND_TRIM | NBD_FLAG.SEND_WRITE_ZEROES | NBD_FLAG.SEND_FAST_ZERO;
    else f |= NBD_FLAG.READ_ONLY;
    if (structuredReplies) f |= NBD_FLAG.SEND_DF;
    return f;
  }

  /**
   * NBD_INFO_BLOCK_SIZE from the node's capabilities, as QEMU's: the minimum is the node's request
   * alignment when the client can honour block sizes (it asked for them, or used INFO), 1 otherwise
   * (the block layer does read-modify-write around smaller requests); preferred at least 4096; maximum
   * 32 MiB or the node's largest transfer if smaller.
   */
  blockSizes(clientHonoursSizes: boolean): BlockSizes {
    const caps = this.current.capabilities();
    const align = Math.max(1, caps.requestAlignment);
    const minimum = clientHonoursSizes ? align : 1;
    const maximum = Math.max(align, Math.min(NBD_MAX_BUFFER_SIZE, caps.maxTransfer ?? NBD_MAX_BUFFER_SIZE));
    return { minimum, preferred: Math.min(maximum, Math.max(4096, align)), maximum };
  }

  /** Every context this export offers, with QEMU's ids: base:allocation 0, allocation-depth 1, bitmap i 2 + i. */
  contexts(): MetaContext[] {
    const all: MetaContext[] = [{ id: 0, name: CONTEXT_BASE_ALLOCATION, kind: 'base' }];
    if (this.allocationDepth) all.push({ id: 1, name: CONTEXT_ALLOCATION_DEPTH, kind: 'depth' });
    this.bitmaps.forEach((bm, i) => all.push({ id: 2 + i, name: CONTEXT_DIRTY_BITMAP_PREFIX + bm.name, kind: 'bitmap', bitmap: bm }));
    return all;
  }

  /**
   * The contexts a query matches. For LIST an empty leaf is a wildcard ("base:", "qemu:",
   * "qemu:dirty-bitmap:"); for SET a query selects only a context of exactly that name.
   */
  matchContexts(query: string, list: boolean): MetaContext[] {
    const all = this.contexts();
    if (list) {
      if (query === 'base:') return all.filter((c) => c.kind === 'base');
      if (query === 'qemu:') return all.filter((c) => c.kind !== 'base');
      if (query === CONTEXT_DIRTY_BITMAP_PREFIX) return all.filter((c) => c.kind === 'bitmap');
    }
    return all.filter((c) => c.name === query);
  }

  /**
   * The extents of one context over [offset, offset+length): consecutive from offset, equal statuses
   * merged, at most `maxExtents`, each at most `maxExtentLength`. Dirty-bitmap extents are clipped to
   * the request, as QEMU's; the others end where the request does too.
   */
  async extents(ctx: MetaContext, offset: number, length: number, maxExtents: number, maxExtentLength: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = offset + length;
    const add = (bytes: number, flags: number): boolean => {
      const last = out[out.length - 1];
      if (last && last.flags === flags && last.length + bytes <= maxExtentLength) {
        last.length += bytes;
        return true;
      }
      if (out.length >= maxExtents) return false;
      // A run longer than one extent may hold goes into several (only the first may be merged).
      out.push({ length: Math.min(bytes, maxExtentLength), flags });
      return bytes <= maxExtentLength || add(bytes - maxExtentLength, flags);
    };
    if (ctx.kind === 'bitmap') {
      const bm = ctx.bitmap!;
      for (let pos = offset; pos < end; ) {
        const dirtyAt = bm.nextDirty(pos, end - pos);
        const cleanEnd = dirtyAt < 0 || dirtyAt > end ? end : dirtyAt;
        if (cleanEnd > pos) {
          if (!add(cleanEnd - pos, 0)) break;
          pos = cleanEnd;
          continue;
        }
        const zeroAt = bm.nextZero(pos, end - pos);
        const dirtyEnd = zeroAt < 0 || zeroAt > end ? end : zeroAt;
        if (!add(dirtyEnd - pos, NBD_STATE_DIRTY)) break;
        pos = dirtyEnd;
      }
      return out;
    }
    const node = this.current;
    for (let pos = offset; pos < end; ) {
      const st = await chainStatus(node, pos, end - pos);
      const flags = ctx.kind === 'base' ? (st.data ? 0 : NBD_STATE_HOLE) | (st.zero ? NBD_STATE_ZERO : 0) : st.depth;
      if (!add(st.bytes, flags)) break;
      pos += st.bytes;
    }
    return out;
  }
}

/**
 * QEMU's lookup of an exported bitmap by name: the node, then down through filtered and backing
 * children (bdrv_filter_or_cow_bs), so a bitmap on a disk is found through a filter or an overlay above it.
 */
function findBitmapBelow(manager: BitmapManager, node: BlockNode, name: string): DirtyBitmap | undefined {
  for (let n: BlockNode | undefined = node; n; n = n.children.find((c) => c.role === 'filtered' || c.role === 'cow')?.node) {
    const bm = manager.find(n, name);
    if (bm) return bm;
  }
  return undefined;
}
