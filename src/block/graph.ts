/**
 * The block graph: every node by node-name, the drivers that can open nodes, and the graph operations
 * jobs need (insert a filter above a node, replace one node by another at pivot). blockdev-add,
 * --blockdev and nested child definitions all open nodes through BlockGraph.open().
 */
import { genericError } from '../errors.js';
import { qdictOrder } from '../base/qdict.js';
import { visit, type Members, type Schema, type VisitOptions } from '../qapi/schema.js';
import { BlockNode, type BdrvChild, type ReopenChange } from './node.js';
import { BLK_PERM_ALL, BLK_PERM_RESIZE, BLK_PERM_WRITE, checkNewChild, refreshPermissions, unnamedBackend, type ChildRole } from './permissions.js';
import { BlockdevDriver } from '../qapi/block.js';
import { UserObjects } from './objects.js';
import type { CopyBitmapHost } from './copy/copy-bitmaps.js';

/** What a driver gets to open its children and look up nodes. */
export interface OpenContext {
  readonly graph: BlockGraph;
  /**
   * Open (or look up) a child given as a BlockdevRef: a node-name string, or a nested options object
   * that is opened as a new node with an auto-generated name. `readOnly` is inherited by nested nodes.
   * An existing node is checked first for what the new parent will need of it in `role`, so a conflict
   * is reported (with QEMU's message) before the driver reads anything through it.
   */
  openChild(ref: unknown, readOnly: boolean, childName: string, role: ChildRole): Promise<BlockNode>;
}

/**
 * One node's part of a blockdev-reopen: its new state, its new backing node (null: none) if that
 * changes, and its new file node if that changes (a file link cannot be removed).
 */
interface ReopenPlan {
  node: BlockNode;
  change: ReopenChange;
  backing?: BlockNode | null;
  file?: BlockNode;
}

/** What a driver's create gets: the protocol node a format is written on. */
export interface CreateContext {
  /** The graph the create runs in (its objects: a driver looks up a secret there). */
  readonly graph: BlockGraph;
  /**
   * The node given as a BlockdevRef (a node-name, or options opened for the create and closed after
   * it), held by a BlockBackend that writes and resizes it and shares everything, as QEMU's creates
   * do: a node a format node uses is refused with QEMU's permission error. release() lets go.
   */
  openForCreate(ref: unknown): Promise<{ node: BlockNode; release: () => Promise<void> }>;
}

/**
 * A block driver: the contract between the graph (and the commands and jobs above it) and one image
 * format or protocol. Commands and jobs use drivers only through this and BlockNode's methods (I/O,
 * truncate, capabilities, actualSize, reopen); they import no concrete driver.
 */
export interface BlockDriver {
  /** The QEMU driver name (BlockdevDriver enum value). */
  readonly name: string;
  /** The driver's own members of BlockdevOptions (beyond the common ones). */
  readonly options: Members;
  /** Open a node. `opts` has been checked against `options` and the common members. */
  open(nodeName: string, opts: Record<string, unknown>, ctx: OpenContext): Promise<BlockNode>;
  /** blockdev-create; a driver without it is refused with "Driver does not support blockdev-create". */
  readonly create?: {
    /** The driver's members of BlockdevCreateOptions. */
    readonly options: Members;
    /** Create an image with checked options (`driver` included). */
    run(opts: Record<string, unknown>, ctx: CreateContext): Promise<void>;
  };
}

/** BlockdevOptions members common to every driver (BlockdevOptionsBase). */
export const COMMON_BLOCKDEV_MEMBERS: Members = {
  driver: { kind: 'str' }, // replaced by the enum of registered drivers when the union schema is built
  '*node-name': { kind: 'str' },
  '*discard': { kind: 'enum', name: 'BlockdevDiscardOptions', values: ['ignore', 'unmap'] },
  '*cache': { kind: 'object', name: 'BlockdevCacheOptions', members: { '*direct': { kind: 'bool' }, '*no-flush': { kind: 'bool' } } },
  '*read-only': { kind: 'bool' },
  '*auto-read-only': { kind: 'bool' },
  '*force-share': { kind: 'bool' },
  '*detect-zeroes': { kind: 'enum', name: 'BlockdevDetectZeroesOptions', values: ['off', 'on', 'unmap'] },
};

/** QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'. */
export function idWellFormed(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9\-._]*$/.test(id);
}

export class BlockGraph {
  private readonly drivers = new Map<string, BlockDriver>();
  private readonly nodes = new Map<string, BlockNode>();
  private autoNameCounter = 0;
  /**
   * Where each node stands in QEMU's list of nodes (graph_bdrv_states), which query-named-block-nodes
   * shows newest first: a format node enters after its file but before its backing chain, because QEMU
   * names a node between opening its file and opening its backing file.
   */
  private listOrder = new WeakMap<BlockNode, number>();
  private listCounter = 0;
  /** The user-creatable objects (object-add): throttle groups `throttle` nodes name, secrets drivers look up. */
  readonly objects = new UserObjects();
  /**
   * Run when a node closes (blockdev-del, shutdown), after it stopped taking requests and those in
   * flight ended, before it is flushed and closed: layers above the graph hook in here to let go of
   * what they keep per node (dirty bitmaps are stored and released). A hook reports its own failures;
   * the node closes anyway, as in QEMU (a failing hook's error reaches the caller afterwards).
   */
  readonly beforeClose: Array<(node: BlockNode) => Promise<void>> = [];
  /**
   * The anonymous bitmaps copy-before-write and the copy engine keep on nodes, from the layer that owns
   * dirty bitmaps (the Core installs the BitmapManager's); undefined in a bare graph (unit tests).
   */
  copyBitmaps: CopyBitmapHost | undefined;
  /** Set once closeAll began: the daemon is going away and no node may be opened or added. */
  private shuttingDown = false;
  /** Nodes being closed (or closed) by closeNode, and when that is done. */
  private readonly closing = new WeakMap<BlockNode, Promise<void>>();
  /**
   * Opens and closes under way (a blockdev-add or blockdev-del still running): closeAll waits for them,
   * so that no node opens behind its back and no parent still writes into a child it closes.
   */
  private readonly pending = new Set<Promise<unknown>>();
  /** Nodes entered in the graph by an open that has not finished yet (their names are taken, not found). */
  private readonly opening = new WeakSet<BlockNode>();

  private track<T>(p: Promise<T>): Promise<T> {
    this.pending.add(p);
    const done = () => void this.pending.delete(p);
    p.then(done, done);
    return p;
  }

  /**
   * Run after a node is opened by open() (each nested child too) and entered in the graph; a failing
   * hook fails the open (dirty bitmaps stored in the image are loaded here).
   */
  readonly afterOpen: Array<(node: BlockNode) => Promise<void>> = [];

  /**
   * Close one node: the one way every node closes (blockdev-del, shutdown, an open that failed
   * half-way). First the node stops taking requests and every request in flight ends, write
   * observers included (quiesce), so that dirty bitmaps have seen every write that reached it; only
   * then run the beforeClose hooks (persistent bitmaps are stored), and flush and close the node.
   * Its children are left open: a parent's closing still writes into them (QEMU's bdrv_close drains
   * the node, then its driver's close stores the bitmaps). The node leaves the graph even when a hook
   * or the close fails; the first error is thrown after. Closing a node twice waits for the first.
   */
  private closeNode(node: BlockNode): Promise<void> {
    let closing = this.closing.get(node);
    if (!closing) {
      closing = this.track(this.doCloseNode(node));
      this.closing.set(node, closing);
    }
    return closing;
  }

  private async doCloseNode(node: BlockNode): Promise<void> {
    // Out of the graph at once: lookups by name no longer find it (qemu-io, a second blockdev-del).
    if (this.nodes.get(node.nodeName) === node) this.nodes.delete(node.nodeName);
    await node.quiesce();
    let error: unknown;
    for (const hook of this.beforeClose) {
      try {
        await hook(node);
      } catch (err) {
        error ??= err;
      }
    }
    try {
      await node.close();
    } catch (err) {
      error ??= err;
    }
    if (error !== undefined) throw error;
  }

  /** The BlockdevOptions union, built once per set of drivers (every open and nested child reads it). */
  private optionsSchema: Schema | undefined;

  registerDriver(d: BlockDriver): void {
    this.drivers.set(d.name, d);
    this.optionsSchema = undefined;
  }

  driverNames(): string[] {
    return [...this.drivers.keys()].sort();
  }

  /** The BlockdevOptions union over every registered driver, for argument checking and the schema. */
  blockdevOptionsSchema(): Schema {
    if (this.optionsSchema) return this.optionsSchema;
    const variants: Record<string, Members> = {};
    for (const d of this.drivers.values()) variants[d.name] = d.options;
    return (this.optionsSchema = {
      kind: 'union',
      name: 'BlockdevOptions',
      base: { ...COMMON_BLOCKDEV_MEMBERS, driver: { kind: 'enum', name: 'BlockdevDriver', values: this.driverNames() } },
      discriminator: 'driver',
      variants,
    });
  }

  /**
   * The BlockdevCreateOptions union: QEMU accepts every driver of the BlockdevDriver enum in it and
   * refuses those that cannot create when the job runs.
   */
  createOptionsSchema(): Schema {
    const variants: Record<string, Members> = {};
    for (const d of this.drivers.values()) if (d.create) variants[d.name] = d.create.options;
    return { kind: 'union', name: 'BlockdevCreateOptions', base: { driver: BlockdevDriver }, discriminator: 'driver', variants };
  }

  // ---- blockdev-reopen --------------------------------------------------------------------------------

  /**
   * Run around a change of a node's read-only state by blockdev-reopen, for layers above the graph:
   * `beforeReadOnly` while the node is still writable (persistent bitmaps are stored), `afterReopen`
   * once the new state is in place (bitmaps follow: read-only, or marked in use again).
   */
  readonly reopenHooks = {
    beforeReadOnly: [] as Array<(node: BlockNode) => Promise<void>>,
    afterReopen: [] as Array<(node: BlockNode, wasReadOnly: boolean) => Promise<void>>,
  };

  /**
   * bdrv_reopen_multiple for blockdev-reopen: every node of the list takes its new options at once or
   * none does. Checked first, with QEMU's messages: options the driver cannot change, the backing
   * link (changed, detached, or missing), then the permissions of the new graph and read-only states;
   * then each driver prepares, then all commit. `options` were checked against BlockdevOptions.
   */
  async reopen(list: Array<{ node: BlockNode; options: Record<string, unknown> }>): Promise<void> {
    const plans: ReopenPlan[] = [];
    for (const { node, options } of list) this.planReopen(node, options, plans);
    const undo: Array<() => void> = [];
    const touched = new Set<BlockNode>(plans.map((p) => p.node));
    const readOnlyAfter = new Map(plans.map((p) => [p.node, p.change.readOnly]));
    /** Children that lost a parent here: an auto-named one that nothing holds any more goes (refcount). */
    const released: BlockNode[] = [];
    // A node whose file changes is drained around each switch of its link (bdrv_drained_begin): its
    // requests in flight end on the old file and the new ones start on the new file, none in between.
    // Parents first: a parent's requests in flight pass through a child that is drained after it.
    const switching = BlockGraph.parentsFirst(plans.filter((p) => p.file !== undefined).map((p) => p.node));
    // What the node wrote so far is written back to its old file first (bdrv_reopen_prepare flushes).
    for (const n of switching) await n.flush();
    try {
      await BlockGraph.drainedAll(switching, () => {
        for (const p of plans) {
          for (const [name, target] of [['backing', p.backing], ['file', p.file]] as const) {
            if (target === undefined) continue;
            const old = p.node.child(name);
            if (old) touched.add(old.node);
            if (old) released.push(old.node);
            if (target) touched.add(target);
            undo.push(name === 'file' ? p.node.retargetChild('file', target!) : p.node.relinkChild('backing', target ?? undefined, 'cow'));
          }
        }
        refreshPermissions(touched, { readOnlyAfter });
      });
    } catch (err) {
      await BlockGraph.drainedAll(switching, () => {
        for (const u of undo.reverse()) u();
      });
      throw err;
    }
    const prepared: ReopenPlan[] = [];
    try {
      for (const p of plans) {
        if (p.change.readOnly && !p.node.readOnly) for (const hook of this.reopenHooks.beforeReadOnly) await hook(p.node);
        prepared.push(p);
        await p.node.reopenPrepare(p.change);
      }
    } catch (err) {
      for (const p of prepared.reverse()) {
        await p.node.reopenAbort(p.change).catch(() => undefined);
        // Stored bitmaps of a node that stays writable are marked in use again.
        if (p.change.readOnly && !p.node.readOnly) for (const hook of this.reopenHooks.afterReopen) await hook(p.node, false).catch(() => undefined);
      }
      await BlockGraph.drainedAll(switching, () => {
        for (const u of undo.reverse()) u();
        refreshPermissions(touched);
      });
      throw err;
    }
    const wasReadOnly = plans.map((p) => p.node.readOnly);
    // A driver that swaps what its requests use (a file's descriptor) commits with the node drained.
    await BlockGraph.drainedAll(BlockGraph.parentsFirst(plans.filter((p) => p.node.reopenDrains()).map((p) => p.node)), () => {
      for (const p of plans) p.node.reopenCommit(p.change);
    });
    for (const old of released) {
      if (old.parents.length === 0 && this.nodes.get(old.nodeName) === old) await this.remove(old).catch(() => undefined);
    }
    let error: unknown;
    for (const [i, p] of plans.entries()) {
      try {
        await p.node.reopenFinish(p.change, wasReadOnly[i]);
        for (const hook of this.reopenHooks.afterReopen) await hook(p.node, wasReadOnly[i]);
      } catch (err) {
        error ??= err;
      }
    }
    if (error !== undefined) throw error;
  }

  /**
   * Run `change` (synchronous) with `nodes` drained: their new requests wait, those in flight end
   * first; the waiting ones then run against what `change` left (QEMU's bdrv_drained_begin/end).
   */
  private static async drainedAll(nodes: BlockNode[], change: () => void): Promise<void> {
    if (nodes.length === 0) return change();
    const [first, ...rest] = nodes;
    await first.drained(() => BlockGraph.drainedAll(rest, change));
  }

  /** Options every node may change in blockdev-reopen (bdrv_reopen_prepare's own). */
  private static readonly GENERIC_REOPENABLE = new Set(['driver', 'node-name', 'read-only', 'auto-read-only', 'discard', 'detect-zeroes', 'cache', 'force-share']);

  /**
   * Check one node's new options (and those of children opened with it, given nested), adding the
   * plans to `out`. Options that cannot change are reported as QEMU's check meets them: flattened
   * (`file.driver`), in QDict order, the first that differs.
   */
  private planReopen(node: BlockNode, opts: Record<string, unknown>, out: ReopenPlan[]): void {
    const old = node.openOptions;
    const cannot = (key: string) => genericError(`Cannot change the option '${key}'`);
    /** Flattened options that differ from the node's and that nothing below may change. */
    const changed: string[] = [];
    const refused = new Set(node.resetRefusedOptions());
    for (const key of qdictOrder(Object.keys(old))) {
      if (refused.has(key) && opts[key] === undefined) throw genericError(`Option '${key}' cannot be reset to its default value`);
    }
    if (opts.driver !== node.driver) throw cannot('driver');
    const readOnly = (opts['read-only'] as boolean | undefined) ?? false;
    checkDetectZeroes(opts);
    // The driver's part of bdrv_reopen_prepare comes before the force-share check and the children.
    if (!node.supportsReopen()) throw genericError(`Block format '${node.driver}' used by node '${node.nodeName}' does not support reopening files`);
    node.reopenCheck(opts);
    if (((opts['force-share'] as boolean | undefined) ?? false) !== node.forceShare) throw genericError('Cannot change force-share option');
    const plan: ReopenPlan = { node, change: { readOnly, options: opts } };
    const childOptions = node.childOptionNames();
    for (const key of childOptions) {
      const current = node.child(key);
      const value = opts[key];
      if (value === undefined) {
        // Omitting backing keeps nothing: it must be named (or null) while the node has one, or its
        // image names one.
        if (key === 'backing' && (node.backing() || node.imageInfo()['backing-filename'] !== undefined)) {
          throw genericError(`backing is missing for '${node.nodeName}'`);
        }
        continue;
      }
      if (value !== null && typeof value === 'object') {
        // Nested options reopen a child that was opened from nested options too (its own checks name
        // its options without the prefix, as QEMU's do); a child given by reference, or none, keeps
        // them as the parent's flattened options, which cannot change.
        if (current && isPlainObject(old[key])) this.planReopen(current.node, value as Record<string, unknown>, out);
        else changed.push(...flattened(value as Record<string, unknown>, `${key}.`).map(([k]) => k));
        continue;
      }
      if (key !== 'backing' && key !== 'file') {
        if (typeof value === 'string' && !this.find(value)) throw genericError(`Cannot find device='' nor node-name='${value}'`);
        if (typeof value !== 'string' || value !== current?.node.nodeName) throw cannot(key);
        continue;
      }
      // bdrv_reopen_parse_file_or_backing: for 'backing' null detaches; a node-name attaches that node
      // (the schema has no null for 'file': a file link is replaced, never removed).
      const target = value === null ? null : this.find(value as string);
      if (target === undefined) throw genericError(`Cannot find device='' nor node-name='${String(value)}'`);
      // The child as the user knows it: below any job's implicit filters.
      let named = current?.node;
      while (named?.implicit) named = named.primaryChild();
      if ((target ?? undefined) === named) continue;
      if (target && BlockGraph.reachesAfter(target, node, out)) {
        throw genericError(`Making '${target.nodeName}' a ${key} child of '${node.nodeName}' would create a cycle`);
      }
      // A job's implicit filter (stream's copy-on-read, a mirror's top) is not the user's to replace.
      if (current?.node.implicit) throw genericError(`Cannot replace implicit ${key} child of ${node.nodeName}`);
      if (current?.frozen) {
        throw genericError(`Cannot change frozen '${key}' link from '${node.nodeName}' to '${current.node.nodeName}'`);
      }
      if (key === 'backing') plan.backing = target;
      else if (!current) throw cannot(key);
      else plan.file = target!;
    }
    const driverOwn = new Set(node.reopenableOptions());
    for (const key of Object.keys(opts)) {
      if (childOptions.includes(key) || driverOwn.has(key)) continue;
      // An empty object (`cache: {}`) flattens to no option of the generic code: it stays and differs.
      const empty = isPlainObject(opts[key]) && Object.keys(opts[key]).length === 0;
      if (BlockGraph.GENERIC_REOPENABLE.has(key) && !empty) continue;
      const before = new Map(flattened({ [key]: old[key] }, ''));
      for (const [k, v] of flattened({ [key]: opts[key] }, '')) if (JSON.stringify(v) !== JSON.stringify(before.get(k))) changed.push(k);
    }
    if (changed.length > 0) throw cannot(qdictOrder(changed)[0]);
    out.push(plan);
  }

  /**
   * bdrv_reopen_set_read_only: reopen `node` read-only or read-write with its other options as they
   * are (its children by reference; a file child opened with it follows, as QEMU's inherited options
   * do). What change-backing-file, snapshots and chain jobs use on a backing file. Throws QEMU's
   * reopen errors with nothing changed.
   */
  async setReadOnly(node: BlockNode, readOnly: boolean): Promise<void> {
    if (node.readOnly === readOnly) return;
    await this.reopen([{ node, options: BlockGraph.optionsWithReadOnly(node, readOnly) }]);
  }

  /** A node's open options with `read-only` set, children by name (implicit ones nested, following). */
  private static optionsWithReadOnly(node: BlockNode, readOnly: boolean): Record<string, unknown> {
    const opts: Record<string, unknown> = { ...node.openOptions, 'read-only': readOnly };
    for (const key of node.childOptionNames()) {
      const child = node.child(key);
      if (!child) continue;
      const implicit = child.node.nodeName.startsWith('#') && child.node.parents.length === 1;
      opts[key] = key !== 'backing' && implicit && child.node.readOnly !== readOnly ? BlockGraph.optionsWithReadOnly(child.node, readOnly) : child.node.nodeName;
    }
    if (!node.backing() && node.imageInfo()['backing-filename'] !== undefined) opts.backing = null;
    return opts;
  }

  /**
   * bdrv_set_backing_hd: make `backing` the backing child of `node` (undefined: none) in the graph.
   * The image's own record of its backing file is not touched (BlockNode.changeBackingFile does
   * that). QEMU's checks and messages: a frozen link, a driver without backing files, a cycle; then
   * the permissions of the new graph (the file driver's lock bytes follow). On any of them nothing
   * changes. Returns the undo, for a transaction's abort.
   */
  setBacking(node: BlockNode, backing: BlockNode | undefined): () => void {
    const current = node.child('backing');
    if (current?.node === backing) return () => undefined;
    if (current?.frozen) throw genericError(`Cannot change frozen 'backing' link from '${node.nodeName}' to '${current.node.nodeName}'`);
    if (backing && !node.supportsBacking()) throw genericError(`Driver '${node.driver}' of node '${node.nodeName}' does not support backing files`);
    if (backing && BlockGraph.reaches(backing, node)) {
      throw genericError(`Making '${backing.nodeName}' a backing child of '${node.nodeName}' would create a cycle`);
    }
    const touched = [node, ...(current ? [current.node] : []), ...(backing ? [backing] : [])];
    const undo = node.relinkChild('backing', backing, 'cow');
    try {
      refreshPermissions(touched);
    } catch (err) {
      undo();
      throw err;
    }
    return () => {
      undo();
      refreshPermissions(touched);
    };
  }

  /** Whether `to` is `from` or below it. */
  private static reaches(from: BlockNode, to: BlockNode): boolean {
    return from === to || from.children.some((c) => BlockGraph.reaches(c.node, to));
  }

  /**
   * reaches() in the graph as the reopen's earlier nodes leave it (`plans`: their new backing and file
   * links): QEMU applies each node's links before it checks the next node's.
   */
  private static reachesAfter(from: BlockNode, to: BlockNode, plans: readonly ReopenPlan[]): boolean {
    if (from === to) return true;
    const plan = plans.find((p) => p.node === from);
    return from.children.some((c) => {
      const next = c.name === 'backing' && plan?.backing !== undefined ? plan.backing : c.name === 'file' && plan?.file ? plan.file : c.node;
      return next !== null && BlockGraph.reachesAfter(next, to, plans);
    }) || (plan?.backing != null && !from.child('backing') && BlockGraph.reachesAfter(plan.backing, to, plans));
  }

  /** Whether the driver can create images (blockdev-create). */
  canCreate(driver: string): boolean {
    return this.drivers.get(driver)?.create !== undefined;
  }

  /** Run a driver's create (blockdev-create's job, drive-mirror's new image). */
  async create(opts: Record<string, unknown>): Promise<void> {
    const create = this.drivers.get(opts.driver as string)?.create;
    if (!create) throw genericError('Driver does not support blockdev-create');
    await create.run(opts, { graph: this, openForCreate: (ref) => this.openForCreate(ref) });
  }

  /** CreateContext.openForCreate. */
  private async openForCreate(ref: unknown): Promise<{ node: BlockNode; release: () => Promise<void> }> {
    const claim = (node: BlockNode) => node.attachParent(unnamedBackend(), 'root', BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL);
    if (typeof ref === 'string') {
      const node = this.lookup(ref);
      const edge = claim(node);
      return { node, release: async () => BlockNode.detachParent(edge) };
    }
    const node = await this.open(ref as Record<string, unknown>);
    let edge: BdrvChild;
    try {
      edge = claim(node);
    } catch (err) {
      await this.remove(node);
      throw err;
    }
    return {
      node,
      release: async () => {
        BlockNode.detachParent(edge);
        await this.remove(node);
      },
    };
  }

  /**
   * bdrv_img_create for drive-mirror's new images: an image of `format` at `filename` of `size` bytes,
   * naming `backing` (a file name and format) in its header when given. raw images are plain files.
   */
  async createImage(format: string, filename: string, size: number, backing?: { filename: string; format: string }): Promise<void> {
    if (format === 'raw') return this.create({ driver: 'file', filename, size });
    await this.create({ driver: 'file', filename, size: 0 });
    await this.create({
      driver: format,
      file: { driver: 'file', filename },
      size,
      ...(backing ? { 'backing-file': backing.filename, 'backing-fmt': backing.format } : {}),
    });
  }

  /** All nodes in creation order (query-named-block-nodes lists newest first; callers reverse). */
  allNodes(): BlockNode[] {
    const order = (n: BlockNode) => this.listOrder.get(n) ?? 0;
    return [...this.nodes.values()].filter((n) => !this.opening.has(n)).sort((a, b) => order(a) - order(b));
  }

  /**
   * The node of that name. A node whose open is still under way is not found: nothing may write to it
   * before its stored bitmaps are loaded (a write then would be in the image but not in them).
   */
  find(nodeName: string): BlockNode | undefined {
    const n = this.nodes.get(nodeName);
    return n && !this.opening.has(n) ? n : undefined;
  }

  /** bdrv_lookup_bs for a node-name-only world: QEMU's message names both device and node-name. */
  lookup(name: string): BlockNode {
    const n = this.find(name);
    if (!n) throw genericError(`Cannot find device='${name}' nor node-name='${name}'`);
    return n;
  }

  generateNodeName(): string {
    // QEMU's generated names are '#block' followed by a number; '#' makes them impossible for users.
    return `#block${String(++this.autoNameCounter * 1).padStart(3, '0')}`;
  }

  /**
   * Open a node from checked BlockdevOptions. Nested child definitions become nodes of their own with
   * generated names. Two phases: every node is opened (drivers read and validate, afterOpen hooks
   * load) before any is activated (the write phase, BlockNode.activate). On failure every node opened
   * on the way is closed again: nothing is left behind, and a node never activated writes nothing.
   */
  async open(opts: Record<string, unknown>, inheritedReadOnly = false, visitOpts: VisitOptions = {}): Promise<BlockNode> {
    this.checkNotShuttingDown();
    return this.track(this.openTree(opts, inheritedReadOnly, visitOpts));
  }

  private async openTree(opts: Record<string, unknown>, inheritedReadOnly: boolean, visitOpts: VisitOptions): Promise<BlockNode> {
    const opened: BlockNode[] = [];
    try {
      const checked = visit(this.blockdevOptionsSchema(), opts, '', visitOpts) as Record<string, unknown>;
      const node = await this.openInner(checked, inheritedReadOnly, opened, '', visitOpts);
      // Everything is opened, checked and loaded: only now may the nodes write (children first).
      for (const n of opened) await n.activate();
      for (const n of opened) this.opening.delete(n);
      return node;
    } catch (err) {
      for (const n of opened.reverse()) {
        await this.closeNode(n).catch(() => undefined);
        BlockGraph.detachChildren(n);
      }
      throw err;
    }
  }

  private async openInner(
    opts: Record<string, unknown>,
    inheritedReadOnly: boolean,
    opened: BlockNode[],
    path: string,
    visitOpts: VisitOptions,
  ): Promise<BlockNode> {
    const driver = this.drivers.get(opts.driver as string);
    if (!driver) throw genericError(`Unknown driver '${String(opts.driver)}'`);
    let nodeName = opts['node-name'] as string | undefined;
    if (nodeName !== undefined) {
      if (!idWellFormed(nodeName)) throw genericError(`Invalid node-name: '${nodeName}'`);
      if (this.nodes.has(nodeName)) throw genericError(`Duplicate nodes with node-name='${nodeName}'`);
    } else {
      nodeName = this.generateNodeName();
    }
    const readOnly = (opts['read-only'] as boolean | undefined) ?? inheritedReadOnly;
    let place: number | undefined;
    const takePlace = () => (place ??= ++this.listCounter);
    const ctx: OpenContext = {
      graph: this,
      openChild: async (ref, childReadOnly, childName, role) => {
        if (role === 'cow') takePlace();
        if (typeof ref === 'string') {
          const child = this.lookup(ref);
          checkNewChild(child, nodeName, childName, role, !readOnly);
          return child;
        }
        const childPath = path ? `${path}.${childName}` : childName;
        const checked = visit(this.blockdevOptionsSchema(), ref, childPath, visitOpts) as Record<string, unknown>;
        return this.openInner(checked, childReadOnly, opened, childPath, visitOpts);
      },
    };
    const node = await driver.open(nodeName, { ...opts, 'read-only': readOnly }, ctx);
    try {
      // After the children opened, as QEMU (bdrv_open_common runs once `file` is open).
      checkDetectZeroes(opts);
    } catch (err) {
      await node.close();
      throw err;
    }
    node.openOptions = opts;
    node.forceShare = opts['force-share'] === true;
    // A name may have been taken while the driver awaited I/O.
    if (this.nodes.has(nodeName)) {
      await node.close();
      throw genericError(`Duplicate nodes with node-name='${nodeName}'`);
    }
    this.nodes.set(nodeName, node);
    this.listOrder.set(node, takePlace());
    this.opening.add(node);
    opened.push(node);
    for (const hook of this.afterOpen) await hook(node);
    return node;
  }

  /** Drop a node added with add() that never went into use, without closing it. */
  forget(node: BlockNode): void {
    if (this.nodes.get(node.nodeName) === node) this.nodes.delete(node.nodeName);
  }

  /** Add a node built in code (filters, job targets) under its name. */
  add(node: BlockNode): void {
    this.checkNotShuttingDown();
    if (this.nodes.has(node.nodeName)) throw genericError(`Duplicate nodes with node-name='${node.nodeName}'`);
    this.nodes.set(node.nodeName, node);
    this.listOrder.set(node, ++this.listCounter);
  }

  /**
   * Close `node` and drop it from the graph, then do the same for children that nothing else holds
   * (nested nodes opened with it), as QEMU's refcounting does.
   */
  async remove(node: BlockNode): Promise<void> {
    await this.closeNode(node).finally(() => this.removeOrphanedChildren(node));
  }

  private async removeOrphanedChildren(node: BlockNode): Promise<void> {
    const children = node.children.map((c) => c.node);
    BlockGraph.detachChildren(node);
    for (const c of children) {
      if (c.parents.length === 0 && this.nodes.get(c.nodeName) === c) await this.remove(c);
    }
  }

  /** Let go of every child of a node that is closed or failed to open (releasing its permissions). */
  static detachChildren(node: BlockNode): void {
    for (const c of [...node.children]) {
      try {
        node.detachChild(c.name);
      } catch {
        // Dropping permissions cannot conflict; a child that fails to unlock is closed later anyway.
      }
    }
  }

  /**
   * bdrv_replace_node: make every parent that uses `from` use `to` instead — parent nodes and
   * BlockBackends (an export or a guest follows a pivot) — except edges owned by `except` (a filter
   * keeps its own child) or by `to` itself. Job claims and the monitor's reference stay with the node
   * they were made on, as QEMU's stay_at_node parents do. The permissions are checked first: on a
   * conflict nothing moves and QEMU's error is thrown. Returns the edges that moved.
   */
  replace(from: BlockNode, to: BlockNode, except?: BlockNode): BdrvChild[] {
    // A parent below `to` stays (should_update_child): a fleecing image that is copy-before-write's
    // target and has the source as its backing must not get the filter above it as backing (a loop).
    const below = BlockGraph.descendants(to);
    const moving = from.parents.filter(
      (e) => e.parent !== except && e.parent !== to && e.parentKind !== 'job' && e.parentKind !== 'monitor' && !(e.parentNode && below.has(e.parentNode)),
    );
    for (const e of moving) {
      if (e.frozen) throw genericError(`Cannot change '${e.name}' link to '${to.nodeName}'`);
    }
    BlockGraph.moveParents(moving, from, to);
    try {
      refreshPermissions([to, from]);
    } catch (err) {
      BlockGraph.moveParents(moving, to, from);
      throw err;
    }
    return moving;
  }

  /** Point parent edges of `a` at `b` (no permission check: callers refresh). */
  private static moveParents(edges: BdrvChild[], a: BlockNode, b: BlockNode): void {
    for (const e of edges) {
      a.parents.splice(a.parents.indexOf(e), 1);
      e.node = b;
    }
    // Moved parents come first at the new node, in their old order (QEMU re-inserts each at the head).
    b.parents.unshift(...edges);
  }

  /**
   * bdrv_append: put `overlay` above `node` — `node` becomes its backing child (setBacking's checks)
   * and every parent of `node` that should follow moves to `overlay` (replace's rules: job claims and
   * the monitor's reference stay). What an external snapshot does. Throws with nothing changed;
   * returns the undo (the moved parents go back, the backing link is dropped).
   */
  append(overlay: BlockNode, node: BlockNode): () => void {
    const undoBacking = this.setBacking(overlay, node);
    let moved: BdrvChild[];
    try {
      moved = this.replace(node, overlay, overlay);
    } catch (err) {
      undoBacking();
      throw err;
    }
    return () => {
      BlockGraph.moveParents(
        moved.filter((e) => e.node === overlay),
        overlay,
        node,
      );
      undoBacking();
      refreshPermissions([overlay, node]);
    };
  }

  /** Every node reachable from `node` through children (not `node` itself unless in a loop). */
  private static descendants(node: BlockNode): Set<BlockNode> {
    const seen = new Set<BlockNode>();
    const stack = node.children.map((c) => c.node);
    while (stack.length) {
      const n = stack.pop()!;
      if (seen.has(n)) continue;
      seen.add(n);
      for (const c of n.children) stack.push(c.node);
    }
    return seen;
  }

  /**
   * Put `filter` (already holding `node` as its child) in `node`'s place: every parent that should
   * follow moves to the filter (bdrv_append). Throws with nothing changed.
   */
  insertFilter(filter: BlockNode, node: BlockNode): void {
    this.add(filter);
    try {
      this.replace(node, filter, filter);
    } catch (err) {
      this.forget(filter);
      throw err;
    }
  }

  /**
   * Close every node (shutdown), each as closeNode does, parents before children so that a format
   * driver can still write its bitmaps and metadata into its file, and every node's own requests
   * (those from its parents included) have ended before its bitmaps are stored. From the start no
   * node may be opened or added (a command still queued when the daemon stops cannot open an image).
   */
  async closeAll(): Promise<void> {
    this.beginShutdown();
    for (;;) {
      // An open or a blockdev-del under way finishes first: its nodes are then closed here, or gone.
      while (this.pending.size) await Promise.allSettled([...this.pending]);
      const nodes = this.allNodes();
      if (nodes.length === 0) return;
      for (const n of BlockGraph.parentsFirst(nodes)) await this.closeNode(n).catch(() => undefined);
    }
  }

  /** From now on no node may be opened or added (the daemon is stopping; jobs are being cancelled). */
  beginShutdown(): void {
    this.shuttingDown = true;
  }

  /** `nodes` ordered so that every node comes before its children (a depth-first post-order, reversed). */
  private static parentsFirst(nodes: BlockNode[]): BlockNode[] {
    const done = new Set<BlockNode>();
    const postOrder: BlockNode[] = [];
    const visitNode = (n: BlockNode): void => {
      if (done.has(n)) return;
      done.add(n);
      for (const c of n.children) visitNode(c.node);
      postOrder.push(n);
    };
    for (const n of nodes) visitNode(n);
    const wanted = new Set(nodes);
    return postOrder.reverse().filter((n) => wanted.has(n));
  }

  private checkNotShuttingDown(): void {
    if (this.shuttingDown) throw genericError('The daemon is shutting down');
  }
}

/** QEMU's bdrv_parse_detect_zeroes: unmapping zeroes needs discard=unmap on the same node. */
function checkDetectZeroes(opts: Record<string, unknown>): void {
  if (opts['detect-zeroes'] === 'unmap' && opts.discard !== 'unmap') {
    throw genericError('setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
  }
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** Options as QEMU's qdict_flatten gives them: dotted names for nested ones (an empty object keeps its own name). */
function flattened(opts: Record<string, unknown>, prefix: string): Array<[string, unknown]> {
  const out: Array<[string, unknown]> = [];
  for (const [k, v] of Object.entries(opts)) {
    if (isPlainObject(v) && Object.keys(v).length > 0) out.push(...flattened(v, `${prefix}${k}.`));
    else out.push([`${prefix}${k}`, v]);
  }
  return out;
}
