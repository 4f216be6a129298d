/**
 * Block permissions, as QEMU 7.2's (block.c, include/block/block-common.h).
 *
 * Every parent of a node reaches it through an edge (BdrvChild) that records what the parent does with
 * the node (`perm`) and what it lets every other parent do (`shared`). A node's cumulative permissions
 * are the union of its parents' `perm` and the intersection of their `shared`; a node passes on to its
 * own children what its role needs given those (childPermissions below). Two parents conflict when one
 * needs what the other does not share. Every graph change (attach, detach, replace, reopen, a job or an
 * export taking a node) is checked by refreshPermissions before it takes effect, and a failed check
 * leaves the permissions — and the image lock bytes the file driver derives from them — as they were.
 *
 * QEMU 7.2 has four permissions: BLK_PERM_GRAPH_MOD was dropped in 7.1 ("block: drop
 * BLK_PERM_GRAPH_MOD"), so there is none for changing a node's children.
 */
import { genericError } from '../errors.js';
import type { BdrvChild, BlockNode } from './node.js';

export const BLK_PERM_CONSISTENT_READ = 0x1;
export const BLK_PERM_WRITE = 0x2;
export const BLK_PERM_WRITE_UNCHANGED = 0x4;
export const BLK_PERM_RESIZE = 0x8;
export const BLK_PERM_ALL = 0xf;

/** QAPI's BlockPermission names for the bits, in bit order (x-debug-query-block-graph). */
export const PERM_QAPI_NAMES = ['consistent-read', 'write', 'write-unchanged', 'resize'];

/** QEMU's names for the permission bits, in bit order (bdrv_perm_names). */
export const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

/** "consistent read, write": the names of the bits set in `perm`, as QEMU lists them in messages. */
export function permNames(perm: number): string {
  return PERM_NAMES.filter((_, i) => perm & (1 << i)).join(', ');
}

export interface Permissions {
  perm: number;
  shared: number;
}

/**
 * What kind of parent holds an edge, for the checks that QEMU makes by the edge's class:
 * - 'backend': a BlockBackend (QEMU's child_root): what a job uses to read its source or write its
 *   target, blockdev-create and block_resize while they run, later NBD exports. A node whose parents are
 *   all backends is a root node; a node with a backend parent cannot be blockdev-del'd ("Node x is in use").
 * - 'job': a block job's claim on a node it works on (child_job: "mirror job 'j'"), which makes the
 *   node no root and keeps it from being deleted.
 * - 'monitor': the reference blockdev-add and --blockdev give the monitor. QEMU keeps it as a plain
 *   reference count, not an edge; here it is an edge that takes nothing and shares everything, so that
 *   "who holds this node" is one list.
 */
export type ParentKind = 'backend' | 'job' | 'monitor';

/** A parent that is not a node. */
export interface ExternalParent {
  readonly kind: ParentKind;
  /** QEMU's get_parent_desc: "an unnamed block device", "mirror job 'j'". */
  describe(): string;
  /** The name x-debug-query-block-graph shows: a job's id; a backend's name ("" when unnamed). */
  readonly name?: string;
}

/** A BlockBackend without a name (QEMU's for jobs, blockdev-create, block_resize, exports). */
export function unnamedBackend(): ExternalParent {
  return { kind: 'backend', describe: () => 'an unnamed block device' };
}

/** A block job's claim on a node (QEMU's block_job_add_bdrv). */
export function jobParent(type: string, id: string): ExternalParent {
  return { kind: 'job', name: id, describe: () => `${type} job '${id}'` };
}

/** The monitor's reference (blockdev-add, --blockdev). */
export const MONITOR_PARENT: ExternalParent = { kind: 'monitor', describe: () => 'the monitor' };

/**
 * What a node does with a child, which decides the permissions it passes down (QEMU's BdrvChildRole):
 * - 'filtered': the child's data is the parent's (filters, raw without offset/size, blkdebug's image);
 * - 'image': the child holds the parent's data and metadata (qcow2's file);
 * - 'data': the child holds data at some shift (raw with offset or size);
 * - 'cow': a backing file, read where the parent has no data.
 * Edges of external parents have role 'root'.
 */
export type ChildRole = 'filtered' | 'image' | 'data' | 'cow' | 'root';

/** Permissions every parent passes through to a filtered child (DEFAULT_PERM_PASSTHROUGH). */
const PASSTHROUGH = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_RESIZE;

/**
 * bdrv_default_perms: what a node with cumulative permissions (`perm`, `shared`) needs on a child of
 * `role`. `writable` is whether the parent node is writable (a format writes metadata even when no one
 * above it writes). raw drops the write and resize that the storage rules add (raw_child_perm).
 */
export function defaultChildPermissions(role: ChildRole, writable: boolean, perm: number, shared: number, rawLike = false): Permissions {
  if (role === 'cow') {
    // bdrv_default_perms_for_cow: consistent read if the parent needs it, nothing else; others may
    // write the backing file only if the parent tolerates changing data.
    return {
      perm: perm & BLK_PERM_CONSISTENT_READ,
      shared: (shared & BLK_PERM_WRITE ? BLK_PERM_WRITE | BLK_PERM_RESIZE : 0) | BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED,
    };
  }
  // bdrv_filter_default_perms.
  let p = perm & PASSTHROUGH;
  let s = (shared & PASSTHROUGH) | (BLK_PERM_ALL & ~PASSTHROUGH);
  if (role === 'image') {
    // Metadata: written whenever the node is writable, always read consistently, never shared for
    // writing or resizing.
    if (writable) p |= BLK_PERM_WRITE | BLK_PERM_RESIZE;
    p |= BLK_PERM_CONSISTENT_READ;
    s &= ~(BLK_PERM_WRITE | BLK_PERM_RESIZE);
  }
  if (role === 'image' || role === 'data') {
    // The format may assume the file's size; writes may extend the file.
    s &= ~BLK_PERM_RESIZE;
    if (p & BLK_PERM_WRITE_UNCHANGED) p |= BLK_PERM_WRITE;
    if (p & BLK_PERM_WRITE) p |= BLK_PERM_RESIZE;
  }
  if (rawLike) p = (p & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE)) | (perm & (BLK_PERM_WRITE | BLK_PERM_RESIZE));
  return { perm: p, shared: s };
}

/** QEMU's bdrv_get_cumulative_perm over the given edge permissions. */
export function cumulative(edges: Iterable<Permissions>): Permissions {
  let perm = 0;
  let shared = BLK_PERM_ALL;
  for (const e of edges) {
    perm |= e.perm;
    shared &= e.shared;
  }
  return { perm, shared };
}

/** What the conflict check needs of an edge (BdrvChild has it). */
export interface PermissionEdge extends Permissions {
  readonly name: string;
  describeParent(): string;
}

/**
 * The check QEMU makes when a node being opened attaches an existing node as its child (bdrv_open_child
 * does it before the driver reads anything): would the new parent conflict with the node's parents, or
 * write a read-only node? A node being opened has no parents yet, so it needs what its role alone asks.
 * Lock bytes are left to the real attach.
 */
export function checkNewChild(child: BlockNode, parentName: string, childName: string, role: ChildRole, parentWritable: boolean): void {
  const p = defaultChildPermissions(role, parentWritable, 0, BLK_PERM_ALL);
  if (child.forceShare) p.shared = BLK_PERM_ALL;
  const edge: PermissionEdge = { name: childName, perm: p.perm, shared: p.shared, describeParent: () => `node '${parentName}'` };
  const parents: PermissionEdge[] = [edge, ...child.parents];
  const conflict = parentConflict(child, parents, (e) => e);
  if (conflict) throw genericError(conflict);
  if (p.perm & (BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED) && child.readOnly) throw genericError('Block node is read-only');
}

/**
 * The check QEMU makes between every ordered pair of a node's parents (bdrv_a_allow_b), in its order:
 * parents newest first, `a` the outer loop. The message is QEMU 7.2's.
 */
export function parentConflict<E extends PermissionEdge>(node: BlockNode, parents: readonly E[], eff: (e: E) => Permissions): string | undefined {
  for (const a of parents) {
    for (const b of parents) {
      if (a === b) continue;
      const bp = eff(b).perm;
      const missing = bp & ~eff(a).shared;
      if (missing === 0) continue;
      const name = node.nodeName;
      return (
        `Permission conflict on node '${name}': permissions '${permNames(missing)}' are both required by ${b.describeParent()} ` +
        `(uses node '${name}' as '${b.name}' child) and unshared by ${a.describeParent()} (uses node '${name}' as '${a.name}' child).`
      );
    }
  }
  return undefined;
}

/** Nodes reachable from `roots` through child edges, parents before children (a topological order). */
function downwardOrder(roots: Iterable<BlockNode>): BlockNode[] {
  const seen = new Set<BlockNode>();
  const post: BlockNode[] = [];
  const visit = (n: BlockNode): void => {
    if (seen.has(n)) return;
    seen.add(n);
    for (const c of n.children) visit(c.node);
    post.push(n);
  };
  for (const r of roots) visit(r);
  return post.reverse();
}

export interface RefreshOptions {
  /**
   * Nodes whose read-only state is about to change (blockdev-reopen): the check uses the new state
   * (`readOnlyAfter`) and QEMU's reopen wording.
   */
  readOnlyAfter?: ReadonlyMap<BlockNode, boolean>;
}

/**
 * QEMU's bdrv_list_refresh_perms over `changed` and everything below: recompute what each node's
 * parents need, check that they agree (and that nobody writes a read-only node), let drivers prepare
 * (the file driver takes its lock bytes), then commit everything. On any failure nothing changes and
 * QEMU's error is thrown. Callers make their graph change first and undo it when this throws.
 */
export function refreshPermissions(changed: Iterable<BlockNode>, opts: RefreshOptions = {}): void {
  const order = downwardOrder(changed);
  const staged = new Map<BdrvChild, Permissions>();
  const eff = (e: BdrvChild): Permissions => staged.get(e) ?? e;
  const prepared: BlockNode[] = [];
  try {
    for (const node of order) {
      const parents = node.parents;
      const conflict = parentConflict(node, parents, eff);
      if (conflict) throw genericError(conflict);
      const { perm, shared } = cumulative(parents.map(eff));
      const readOnly = opts.readOnlyAfter?.get(node) ?? node.readOnly;
      if (perm & (BLK_PERM_WRITE | BLK_PERM_WRITE_UNCHANGED) && readOnly) {
        // bdrv_node_refresh_perm: the reopen wording when the node is writable now but will not be.
        if (node.readOnly) throw genericError('Block node is read-only');
        throw genericError(`Read-only block node '${node.nodeName}' cannot support read-write users`);
      }
      node.permissionsPrepare(perm, shared);
      prepared.push(node);
      for (const c of node.children) {
        const p = node.childPermissions(c, perm, shared, !readOnly);
        // force-share=on on the child: its parent shares everything (bdrv_child_perm).
        if (c.node.forceShare) p.shared = BLK_PERM_ALL;
        staged.set(c, p);
      }
    }
  } catch (err) {
    for (const n of prepared.reverse()) n.permissionsAbort();
    throw err;
  }
  for (const n of prepared) n.permissionsCommit();
  for (const [e, p] of staged) {
    e.perm = p.perm;
    e.shared = p.shared;
  }
}
