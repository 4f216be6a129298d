/**
 * BlockNode: the one interface every driver (file, raw, qcow2, null-co, blkdebug, nbd) and every filter
 * (mirror-top, copy-before-write) implements. Every byte of guest-visible I/O goes through the public
 * methods here, which do what is common to all nodes (bounds checks, read-only checks, request tracking,
 * write observers) and then call the driver's `do*` hooks. Dirty bitmaps and mirror jobs see writes
 * through WriteObservers, so a write cannot reach a node without being recorded, whatever path it took.
 */
import { BlockIOError, genericError } from '../errors.js';
import { qdictOrder } from '../base/qdict.js';
import { RequestTracker, type TrackedRequest } from './requests.js';
import {
  BLK_PERM_ALL,
  defaultChildPermissions,
  refreshPermissions,
  type ChildRole,
  type ExternalParent,
  type Permissions,
} from './permissions.js';

/** What the block-status query says about a range, as QEMU's BDRV_BLOCK_* flags. */
export interface BlockStatus {
  /** How many bytes from the queried offset share this status (always > 0, never past the end). */
  bytes: number;
  /** Reads as zeroes (BDRV_BLOCK_ZERO). */
  zero: boolean;
  /** Backed by data in the file (BDRV_BLOCK_DATA); false for holes and zero clusters. */
  data: boolean;
  /** Allocated in this node's own layer (BDRV_BLOCK_ALLOCATED): false when it comes from a backing node. */
  allocated: boolean;
  /** For unallocated ranges of a node with a backing chain: how deep the data comes from (0 = unallocated anywhere). */
  depth?: number;
}

/** 'copy': the bytes come from a host file range, copied by the kernel (copy offload); no buffer holds them. */
export type WriteKind = 'write' | 'zero' | 'discard' | 'copy';

export interface WriteFlags {
  /**
   * BDRV_REQ_WRITE_UNCHANGED: the write puts the bytes the node already shows (a copy-on-read copying
   * what a backing file shows into the overlay): no guest-visible byte changes.
   */
  writeUnchanged?: boolean;
  /** Force unit access: the write is durable when it completes. */
  fua?: boolean;
  /** For write-zeroes: the range may be deallocated (BDRV_REQ_MAY_UNMAP). */
  mayUnmap?: boolean;
  /**
   * For write-zeroes: BDRV_REQ_NO_FALLBACK (NBD's FAST_ZERO): zero without writing data or fail with
   * ENOTSUP, so the caller can choose another way (qemu-img convert zeroes a whole target this way
   * first). Refused at once where the node's capabilities say it has no fast zero or the range is not
   * aligned to its request alignment; a driver that would fall back to writing zeroes fails instead.
   */
  noFallback?: boolean;
  /**
   * BDRV_REQ_SERIALISING: wait for every overlapping request in flight (reads included) and make later
   * ones wait. Copy-before-write writes old data into a fleecing image this way, so that a read of the
   * image that went on to its backing (the live source) has ended before the source changes.
   */
  serialising?: boolean;
  /**
   * BDRV_REQ_WRITE_COMPRESSED: store the data compressed (qemu-io `write -c`, a backup with
   * `compress`). Only nodes whose supportsCompressedWrites() says so take it (others: ENOTSUP); the
   * driver decides what it needs (qcow2: whole clusters, into unallocated ones). Write-zeroes ignore it.
   */
  compressed?: boolean;
}

/** Where a node's bytes are stored as they are in a host file, for copy offload (copy_file_range). */
export interface HostRange {
  readonly fd: number;
  readonly offset: number;
  readonly bytes: number;
  /**
   * The bytes cannot change while the node has parents as now (no parent of the file may write it, and
   * no other process) and reading them never waits for a device (the file is in memory): they may be
   * handed to the kernel by reference, as sendfile does (see BlockNode.sendStable).
   */
  readonly stable?: boolean;
}

/** A write-class request as observers see it. `data` is set for kind 'write', `source` for kind 'copy'. */
export interface WriteRequest {
  readonly node: BlockNode;
  readonly kind: WriteKind;
  readonly offset: number;
  readonly bytes: number;
  readonly data?: Buffer;
  readonly source?: HostRange;
  readonly flags: WriteFlags;
}

/**
 * Something that must see every write to a node: dirty bitmaps mark ranges after a write completes;
 * a mirror job waits for overlapping copies before a write and, in write-blocking mode, copies it to
 * the target after. `beforeWrite` may reject to fail the write. Every observer whose `beforeWrite` ran
 * (or that has none and was registered when the write began) gets `afterWrite` exactly once, also when
 * the write failed (`error` set): a failed write may have changed part of the range, so bitmaps mark
 * it anyway, and a job counting writes in flight is never left waiting. The write completes only
 * after every `afterWrite` has; one observer's failing `afterWrite` keeps no other from running (a
 * failed mirror copy must not cost a bitmap its mark), and fails the write.
 */
export interface WriteObserver {
  beforeWrite?(req: WriteRequest): Promise<void> | void;
  afterWrite?(req: WriteRequest, error?: unknown): Promise<void> | void;
  /**
   * Also get `afterWrite` (alone) for the writes already in flight when the observer was added: what
   * dirty bitmaps need, since QEMU marks a write in the bitmaps that exist when it ends, so a bitmap
   * created during a write records it.
   */
  readonly seesWritesInFlight?: boolean;
  /**
   * A format that keeps these persistent bitmaps in its image is about to be resized (qcow2's
   * qcow2_truncate_bitmaps_check): throw QEMU's error when one of them cannot follow.
   */
  beforeResize?(node: BlockNode, storedBitmaps: readonly string[]): void;
  /** The node was resized (truncate): dirty bitmaps follow its size. */
  resized?(node: BlockNode, size: number): void;
}

/**
 * An edge from a parent to a node (QEMU's BdrvChild): a parent node's child ('file', 'backing',
 * 'image'), or a parent that is not a node (a job, a BlockBackend, the monitor's reference) with the
 * name QEMU gives it ('root', 'source', 'target', 'main node'). It records the permissions the parent
 * takes on the node and those it shares with the node's other parents (see permissions.ts).
 */
export class BdrvChild {
  /** Permissions taken (BLK_PERM_*): computed from the parent node's own for node parents. */
  perm = 0;
  /** Permissions the parent lets other parents of the node take. */
  shared = BLK_PERM_ALL;
  /** A frozen link may not be changed or removed (a job relies on it: QEMU's bdrv_freeze_backing_chain). */
  frozen = false;

  constructor(
    readonly name: string,
    readonly parent: BlockNode | ExternalParent,
    public node: BlockNode,
    readonly role: ChildRole,
  ) {}

  /** The parent when it is a node. */
  get parentNode(): BlockNode | undefined {
    return this.parent instanceof BlockNode ? this.parent : undefined;
  }

  /** The kind of a parent that is not a node ('backend', 'job', 'monitor'); undefined for a node parent. */
  get parentKind(): ExternalParent['kind'] | undefined {
    return this.parent instanceof BlockNode ? undefined : this.parent.kind;
  }

  /** How QEMU names the parent in messages: "node 'q1'", "an unnamed block device", "mirror job 'j'". */
  describeParent(): string {
    return this.parent instanceof BlockNode ? `node '${this.parent.nodeName}'` : this.parent.describe();
  }
}

/** The `image` member of query-named-block-nodes (ImageInfo). */
export interface ImageInfo {
  filename: string;
  format: string;
  'virtual-size': number;
  'actual-size'?: number;
  'cluster-size'?: number;
  'dirty-flag'?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'backing-image'?: ImageInfo;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  [key: string]: unknown;
}

/** Options that name children, for every driver that does not say otherwise (childOptionNames). */
const CHILD_OPTION_NAMES = ['file', 'backing', 'image', 'data-file'] as const;

/** QEMU's BlockOpType values that commands check (bdrv_op_is_blocked). */
export type BlockOp =
  | 'drive-del'
  | 'resize'
  | 'mirror-source'
  | 'mirror-target'
  | 'backup-source'
  | 'backup-target'
  | 'commit-source'
  | 'commit-target'
  | 'stream'
  | 'change'
  | 'external-snapshot'
  | 'internal-snapshot'
  | 'internal-snapshot-delete';

/**
 * An internal snapshot as QEMU's QEMUSnapshotInfo has it (a qcow2 snapshot table entry): what
 * query-named-block-nodes lists and blockdev-snapshot-delete-internal-sync returns.
 */
export interface SnapshotEntry {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  /** The guest clock in ns (u64). */
  vmClockNsec: bigint;
  /** u64; 2^64-1 when there is none. */
  icount: bigint;
}
/** What a backing file's blocker lets through (bdrv_backing_attach's bdrv_op_unblock calls). */
const BACKING_ALLOWS: ReadonlySet<BlockOp> = new Set(['commit-target', 'stream', 'backup-source', 'backup-target']);

/** What blockdev-reopen changes on one node: its read-only state and its options (checked). */
export interface ReopenChange {
  readonly readOnly: boolean;
  readonly options: Record<string, unknown>;
}

/** Facts about a node used by jobs and bitmaps (bdrv_get_info). */
export interface NodeInfo {
  /** Cluster size of a format with clusters (qcow2); undefined when the format has none. */
  clusterSize?: number;
}

/**
 * What a node can do well and the limits of its requests (QEMU's BlockLimits and supported flags):
 * what an NBD export announces as transmission flags and block sizes, and what a copy may rely on.
 */
export interface NodeCapabilities {
  /** Smallest unit of I/O; smaller requests are read-modify-write (NBD's minimum block size). */
  requestAlignment: number;
  /** Largest request the node takes at once, in bytes (undefined: no limit of its own). */
  maxTransfer?: number;
  /** Write-zeroes without writing a buffer of zeroes (holes, zero clusters): NBD_FLAG_SEND_WRITE_ZEROES is cheap. */
  writeZeroes: boolean;
  /** Write-zeroes that is fast or fails, never falling back to writing data (BDRV_REQ_NO_FALLBACK, NBD fast zero). */
  fastZero: boolean;
  /** Discard frees space (NBD_FLAG_SEND_TRIM does something). */
  discard: boolean;
  /** Force unit access is native, not a flush after the write (BDRV_REQ_FUA in supported_write_flags). */
  fua: boolean;
  /** Block status knows holes, zeroes and allocation (not "all data"): NBD base:allocation is useful. */
  blockStatus: boolean;
  /** The node can be resized (block_resize). */
  resize: boolean;
  /**
   * Independent transports the node spreads requests over (an NBD node's connections under
   * multi-conn); undefined means one. Over a long link each carries at most one TCP window per round
   * trip, so a copy into the node keeps more in flight by default: 16 copies and two windows per stream.
   */
  streams?: number;
}

export abstract class BlockNode {
  /** QEMU driver name as it appears in query-named-block-nodes (`drv`). */
  abstract readonly driver: string;
  /** The node-name; auto-generated names start with '#'. */
  nodeName: string;
  readOnly: boolean;
  /** Edges to children, in the order QEMU lists them. */
  readonly children: BdrvChild[] = [];
  /**
   * Edges from every parent to this node, newest first (QEMU's order, which decides which of two
   * conflicting parents its messages name first): parent nodes, jobs, BlockBackends, the monitor.
   */
  readonly parents: BdrvChild[] = [];
  /** force-share=on: every parent of this node shares all permissions (read-only nodes only). */
  forceShare = false;
  /** Smallest unit the driver can read or write; the generic layer does read-modify-write around it. */
  requestAlignment = 1;
  /** Reasons this node may not be used by other operations (QEMU's op blockers), keyed by the holder. */
  readonly blockers = new Map<object, string>();
  /** The options the node was opened with, for query-named-block-nodes. */
  openOptions: Record<string, unknown> = {};
  /** Implicit nodes (a mirror's auto-named filter) are hidden from query-block, as in QEMU. */
  implicit = false;

  private readonly observers: WriteObserver[] = [];
  readonly tracker = new RequestTracker();
  /** Set when closing begins (quiesce): from then on every new request is refused. */
  private closing = false;
  private closed = false;
  /**
   * The open has fully succeeded and its write phase ran (activate()). Before that the node has
   * written nothing to its image and must write nothing when it is closed again (a refused open).
   */
  activated = false;

  constructor(nodeName: string, readOnly: boolean) {
    this.nodeName = nodeName;
    this.readOnly = readOnly;
  }

  // ---- driver hooks -------------------------------------------------------------------------------

  /**
   * Optional: the write phase of opening (repairs, in-use flags), run by the graph once the whole open,
   * with the hooks of the layers above, has succeeded. The driver's open only reads and validates, so
   * that a refused open leaves the image as it was.
   */
  protected doActivate?(): Promise<void>;

  /** Virtual size in bytes. */
  abstract length(): number;
  protected abstract doRead(offset: number, bytes: number): Promise<Buffer>;
  /**
   * Optional: read [offset, offset+buf.length) into `buf`, writing every byte of it (zeroes where the
   * node reads as zeroes). Drivers that can read in place implement it; for the others readInto goes
   * through read() (and any override of it) and copies.
   */
  protected doReadInto?(offset: number, buf: Buffer): Promise<void>;
  /**
   * Copy offload, source side (QEMU's copy_range_from): where a prefix of [offset, offset+bytes) is
   * stored as it is in a host file, or undefined when its bytes are not (zeroes, compressed, a driver
   * that changes data, O_DIRECT). Drivers and filters that pass data through unchanged implement it.
   */
  protected doMapHost?(offset: number, bytes: number): Promise<HostRange | undefined>;
  /**
   * Copy offload, target side (QEMU's copy_range_to): write [offset, offset+src.bytes) with the bytes
   * of `src`, copied by the kernel. Called only where canWriteHost said yes.
   */
  protected doWriteHost?(offset: number, src: HostRange): Promise<void>;
  /** Whether doWriteHost can take [offset, offset+bytes) (alignment, what lies below). Default: yes. */
  protected canWriteHost(_offset: number, _bytes: number): boolean {
    return true;
  }
  protected abstract doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void>;
  /** Default: write a buffer of zeroes. Drivers that can do better (holes, zero clusters) override. */
  protected async doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    if (flags.noFallback) throw new BlockIOError('ENOTSUP');
    const chunk = 1 << 20;
    for (let pos = 0; pos < bytes; pos += chunk) {
      const n = Math.min(chunk, bytes - pos);
      await this.doWrite(offset + pos, Buffer.alloc(n), flags);
    }
  }
  /** Default: discard is advisory and may do nothing, as in QEMU. */
  protected async doDiscard(_offset: number, _bytes: number): Promise<void> {}
  protected abstract doFlush(): Promise<void>;
  /** Default: everything is allocated data. */
  protected async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return { bytes: Math.min(bytes, this.length() - offset), zero: false, data: true, allocated: true };
  }
  protected async doClose(): Promise<void> {}

  /**
   * Optional: resize the node to `size` bytes (QEMU's bdrv_co_truncate driver hook); `exact` asks for
   * exactly that size of a protocol node. Drivers without it cannot be resized.
   */
  protected doTruncate?(size: number, exact: boolean): Promise<void>;

  /** The node's ImageInfo for query-named-block-nodes. Format drivers override. */
  abstract imageInfo(): ImageInfo;
  /** bdrv_get_info: cluster size etc. */
  nodeInfo(): NodeInfo {
    return {};
  }
  /**
   * Internal snapshots, for a driver that keeps them in its image (QEMU's bdrv_snapshot_create,
   * _delete and _list; block/internal-snapshot.ts finds the node that answers for a filter or raw).
   * snapshotCreate takes the entry's name, dates, clock and icount; the driver assigns the id.
   * The caller drains the node first (new requests held, those in flight ended: allocations in flight
   * must not link into tables a snapshot now shares); both write the image crash-safely and they throw BlockIOError (errno) on failure.
   */
  snapshotList?(): SnapshotEntry[];
  snapshotCreate?(sn: Omit<SnapshotEntry, 'id' | 'vmStateSize'>): Promise<SnapshotEntry>;
  snapshotDelete?(id: string | undefined, name: string | undefined): Promise<SnapshotEntry>;

  /** Whether the driver can have a backing file (QEMU's supports_backing): qcow2. */
  supportsBacking(): boolean {
    return false;
  }

  /**
   * Optional: record `backingFile` (and its format) as the backing file name in the image's own
   * metadata, or none (undefined): see changeBackingFile.
   */
  protected doChangeBackingFile?(backingFile: string | undefined, backingFormat: string | undefined): Promise<void>;

  /**
   * bdrv_change_backing_file: make the image name `backingFile` of format `backingFormat` as its
   * backing file (the string a later open follows; the qcow2 header), or no backing file. Only the
   * image's record changes: the graph's backing link is BlockGraph.setBacking's. Throws BlockIOError
   * as QEMU's errno: EINVAL for a format without a file, ENOTSUP when the driver records no backing
   * file, EPERM on a read-only node.
   */
  async changeBackingFile(backingFile: string | undefined, backingFormat: string | undefined): Promise<void> {
    if (backingFormat !== undefined && backingFile === undefined) throw new BlockIOError('EINVAL');
    if (this.closing || this.closed) throw new BlockIOError('ENOMEDIUM');
    if (!this.doChangeBackingFile) throw new BlockIOError('ENOTSUP');
    if (this.readOnly) throw new BlockIOError('EPERM');
    await this.doChangeBackingFile(backingFile, backingFormat);
  }

  /** Whether a freshly created image reads as zeroes without writing them (bdrv_has_zero_init). */
  hasZeroInit(): boolean {
    return false;
  }
  /** What the node does well and its request limits. Drivers override; these defaults promise nothing. */
  capabilities(): NodeCapabilities {
    return {
      requestAlignment: this.requestAlignment,
      writeZeroes: false,
      fastZero: false,
      discard: false,
      fua: false,
      blockStatus: false,
      resize: this.doTruncate !== undefined,
    };
  }
  /**
   * Bytes the image takes on the host (bdrv_get_allocated_file_size): a protocol driver knows; others
   * sum their children that hold their data and metadata (a backing file is an image of its own).
   * Undefined when unknown.
   */
  async actualSize(): Promise<number | undefined> {
    let sum: number | undefined;
    for (const c of this.children) {
      if (c.role === 'cow') continue;
      const n = await c.node.actualSize();
      if (n !== undefined) sum = (sum ?? 0) + n;
    }
    return sum;
  }
  /** The child that holds the guest data for filters and raw (file/image), undefined for leaves. */
  primaryChild(): BlockNode | undefined {
    return this.child('file')?.node ?? this.child('image')?.node;
  }
  backing(): BlockNode | undefined {
    return this.child('backing')?.node;
  }

  // ---- graph --------------------------------------------------------------------------------------

  child(name: string): BdrvChild | undefined {
    // A loop, not find(): drivers ask for their children on every request (no closure per call).
    const children = this.children;
    for (let i = 0; i < children.length; i++) if (children[i].name === name) return children[i];
    return undefined;
  }

  /**
   * Attach `node` as this node's child `name` in `role` (replacing any child of that name), after
   * checking the permissions this node then needs on it. Throws QEMU's permission error (or the file
   * driver's lock error) with nothing changed.
   */
  attachChild(name: string, node: BlockNode, role: ChildRole): BdrvChild {
    const old = this.child(name);
    const edge = new BdrvChild(name, this, node, role);
    if (old) this.unlink(old);
    this.link(edge);
    try {
      refreshPermissions(old ? [this, old.node] : [this]);
    } catch (err) {
      this.unlink(edge);
      if (old) this.link(old);
      throw err;
    }
    return edge;
  }

  /** Remove the child `name` and release what this node held on it. */
  detachChild(name: string): void {
    const edge = this.child(name);
    if (!edge) return;
    this.unlink(edge);
    refreshPermissions([edge.node]);
  }

  /**
   * Take this node for a parent that is not a node (a job, a BlockBackend, the monitor) with the given
   * permissions. Throws QEMU's permission error with nothing changed.
   */
  attachParent(parent: ExternalParent, name: string, perm: number, shared: number): BdrvChild {
    const edge = new BdrvChild(name, parent, this, 'root');
    edge.perm = perm;
    edge.shared = shared;
    this.parents.unshift(edge);
    try {
      refreshPermissions([this]);
    } catch (err) {
      this.parents.splice(this.parents.indexOf(edge), 1);
      throw err;
    }
    return edge;
  }

  /** Drop an edge attachParent made (wherever replace moved it since). */
  static detachParent(edge: BdrvChild): void {
    const node = edge.node;
    const i = node.parents.indexOf(edge);
    if (i < 0) return;
    node.parents.splice(i, 1);
    refreshPermissions([node]);
  }

  /** Change what a parent that is not a node takes and shares; throws with nothing changed. */
  static setParentPermissions(edge: BdrvChild, perm: number, shared: number): void {
    const old = { perm: edge.perm, shared: edge.shared };
    edge.perm = perm;
    edge.shared = shared;
    try {
      refreshPermissions([edge.node]);
    } catch (err) {
      edge.perm = old.perm;
      edge.shared = old.shared;
      throw err;
    }
  }

  /**
   * QEMU's bdrv_op_is_blocked: why `op` may not run on this node, if it may not — a job's blocker
   * (blocks everything), or being a backing file (QEMU's backing_blocker, which lets commit, stream
   * and backup through).
   */
  opBlocker(op: BlockOp): string | undefined {
    for (const reason of this.blockers.values()) return reason;
    if (BACKING_ALLOWS.has(op)) return undefined;
    const backingOf = this.parents.find((e) => e.role === 'cow' && e.parentNode)?.parentNode;
    return backingOf ? `node is used as backing hd of '${backingOf.nodeName}'` : undefined;
  }

  /** The edges of parents that are not nodes, of one kind. */
  parentsOfKind(kind: ExternalParent['kind']): BdrvChild[] {
    return this.parents.filter((e) => e.parentKind === kind);
  }

  /** QEMU's bdrv_is_root_node: only BlockBackends (and the monitor's reference) hold this node. */
  isRoot(): boolean {
    return this.parents.every((e) => e.parentKind === 'backend' || e.parentKind === 'monitor');
  }

  /** Link a child edge in both directions (no permission check: callers refresh). */
  private link(edge: BdrvChild): void {
    this.children.push(edge);
    edge.node.parents.unshift(edge);
  }

  private unlink(edge: BdrvChild): void {
    const i = this.children.indexOf(edge);
    if (i >= 0) this.children.splice(i, 1);
    const j = edge.node.parents.indexOf(edge);
    if (j >= 0) edge.node.parents.splice(j, 1);
  }

  // ---- permissions (see permissions.ts) ------------------------------------------------------------

  /**
   * QEMU's bdrv_child_perm: what this node needs on `child` when its own parents need `perm` and share
   * `shared`. `writable` is whether this node is (or, during a reopen, will be) writable. Drivers with
   * needs of their own (the mirror filter while it stops) override.
   */
  childPermissions(child: BdrvChild, perm: number, shared: number, writable: boolean): Permissions {
    return defaultChildPermissions(child.role, writable, perm, shared);
  }

  /**
   * A driver's part of a permission change (bdrv_drv_set_perm): make ready to hold `perm` while sharing
   * `shared` (the file driver takes lock bytes), or throw. Followed by exactly one of commit or abort.
   */
  permissionsPrepare(_perm: number, _shared: number): void {}
  permissionsCommit(): void {}
  permissionsAbort(): void {}

  // ---- observers ----------------------------------------------------------------------------------

  addWriteObserver(o: WriteObserver): void {
    this.observers.push(o);
  }
  removeWriteObserver(o: WriteObserver): void {
    const i = this.observers.indexOf(o);
    if (i >= 0) this.observers.splice(i, 1);
  }

  // ---- holding requests (a graph change in progress) -----------------------------------------------

  /** Set while requests to this node wait (holdRequests); resolves to where they then go. */
  private held?: Promise<BlockNode | undefined>;

  /**
   * Make new requests to this node wait until the returned release is called: QEMU's drained
   * section, for a node that parents were just moved onto (an external snapshot's overlay) while
   * the change may still be undone. Released, they run here — or on `redirect` when given: the
   * change was undone and the parents that sent them are back on that node. Requests already in
   * flight are not affected.
   */
  holdRequests(): (redirect?: BlockNode) => void {
    let release!: (to: BlockNode | undefined) => void;
    const held = new Promise<BlockNode | undefined>((r) => (release = r));
    this.held = held;
    return (redirect) => {
      if (this.held === held) this.held = undefined;
      release(redirect);
    };
  }

  /**
   * Run `change` in a drained section, as QEMU's block_resize does (bdrv_drained_begin): new requests
   * wait (after any other hold in force has ended), every request in flight ends first, and the
   * waiting ones run once `change` is done — checked then, against what it left (a shrunk size).
   */
  async drained<T>(change: () => Promise<T>): Promise<T> {
    while (this.held) await this.held;
    const release = this.holdRequests();
    try {
      await this.tracker.drain();
      return await change();
    } finally {
      release();
    }
  }

  private async afterHold<T>(request: (node: BlockNode) => Promise<T>): Promise<T> {
    const to = await this.held;
    return request(to ?? this);
  }

  // ---- public I/O ---------------------------------------------------------------------------------

  /** `write`: a write, which a node that grows on writes (writesPastEnd) takes beyond its end. */
  private checkRequest(offset: number, bytes: number, write = false): void {
    // A closing node takes no new request: nothing may reach the image after its bitmaps are stored.
    if (this.closing || this.closed) throw new BlockIOError('ENOMEDIUM');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
      throw new BlockIOError('EIO');
    }
    if (offset + bytes > this.length() && !(write && this.writesPastEnd())) throw new BlockIOError('EIO');
  }

  /**
   * Whether a write beyond the end extends the node (a file; a filter over one), so that a format
   * over it allocates clusters past the end of its file whatever sits in between (QEMU checks no end
   * for node-to-node writes).
   */
  writesPastEnd(): boolean {
    return false;
  }

  private checkWritable(): void {
    if (this.readOnly) throw new BlockIOError('EPERM');
  }

  async read(offset: number, bytes: number): Promise<Buffer> {
    if (this.held) return this.afterHold((n) => n.read(offset, bytes));
    this.checkRequest(offset, bytes);
    if (bytes === 0) return Buffer.alloc(0);
    const req = this.tracker.begin('read', offset, bytes);
    try {
      const serialised = this.tracker.waitForSerialising(req);
      if (serialised) await serialised;
      return await this.alignedRead(offset, bytes);
    } finally {
      this.tracker.end(req);
    }
  }

  /**
   * read() into the caller's buffer: [offset, offset+buf.length) lands in `buf`, every byte of it
   * written. For callers that reuse buffers (the mirror's pool), so a read allocates nothing.
   */
  async readInto(offset: number, buf: Buffer): Promise<void> {
    if (this.held) return this.afterHold((n) => n.readInto(offset, buf));
    const bytes = buf.length;
    if (!this.doReadInto) {
      const data = await this.read(offset, bytes);
      data.copy(buf, 0, 0, bytes);
      return;
    }
    this.checkRequest(offset, bytes);
    if (bytes === 0) return;
    const req = this.tracker.begin('read', offset, bytes);
    try {
      const serialised = this.tracker.waitForSerialising(req);
      if (serialised) await serialised;
      const align = this.requestAlignment;
      if (align <= 1 || (offset % align === 0 && bytes % align === 0)) await this.doReadInto(offset, buf);
      else (await this.alignedRead(offset, bytes)).copy(buf, 0, 0, bytes);
    } finally {
      this.tracker.end(req);
    }
  }

  /**
   * Zero-copy reads (the NBD server's sendfile): when all of [offset, +bytes) lies in host ranges
   * whose bytes are stable (HostRange.stable), call `use` with them, in order, synchronously, while
   * this read request is tracked (the files stay open), and return true. False, with nothing done,
   * when some part does not (the caller reads it instead). A writer that appears once `use` has
   * returned overlaps a read whose reply the client has not yet taken, so either data is right for it.
   */
  async sendStable(offset: number, bytes: number, use: (ranges: HostRange[]) => void): Promise<boolean> {
    if (this.held) return this.afterHold((n) => n.sendStable(offset, bytes, use));
    this.checkRequest(offset, bytes);
    if (bytes === 0 || !this.doMapHost) return false;
    const req = this.tracker.begin('read', offset, bytes);
    try {
      const serialised = this.tracker.waitForSerialising(req);
      if (serialised) await serialised;
      const ranges: HostRange[] = [];
      for (let pos = offset; pos < offset + bytes; ) {
        const r = await this.doMapHost(pos, offset + bytes - pos);
        if (!r?.stable || r.bytes <= 0) return false;
        const last = ranges[ranges.length - 1];
        if (last && last.fd === r.fd && last.offset + last.bytes === r.offset) ranges[ranges.length - 1] = { ...last, bytes: last.bytes + r.bytes };
        else ranges.push(r);
        pos += r.bytes;
      }
      use(ranges);
      return true;
    } finally {
      this.tracker.end(req);
    }
  }

  /** Copy offload: where a prefix of [offset, offset+bytes) lies in a host file (see doMapHost). */
  async mapHost(offset: number, bytes: number): Promise<HostRange | undefined> {
    this.checkRequest(offset, bytes);
    if (bytes === 0 || !this.doMapHost) return undefined;
    return this.doMapHost(offset, bytes);
  }

  /** Whether writeHost can write [offset, offset+bytes) of this node. */
  acceptsHostCopy(offset: number, bytes: number): boolean {
    return !this.readOnly && !this.closed && this.doWriteHost !== undefined && this.canWriteHost(offset, bytes);
  }

  /**
   * Write [offset, offset+src.bytes) with the bytes of a host file range, copied by the kernel: a write
   * request like any other (tracked, seen by write observers as kind 'copy'). The kernel's refusal
   * (EXDEV, EINVAL, ENOTSUP, ENOSYS) comes back as a BlockIOError with that code.
   */
  async writeHost(offset: number, src: HostRange): Promise<void> {
    if (this.held) return this.afterHold((n) => n.writeHost(offset, src));
    this.checkRequest(offset, src.bytes, true);
    this.checkWritable();
    if (src.bytes === 0) return;
    if (!this.acceptsHostCopy(offset, src.bytes)) throw new BlockIOError('ENOTSUP');
    await this.writeRequest({ node: this, kind: 'copy', offset, bytes: src.bytes, source: src, flags: {} });
  }

  /**
   * Copy offload (QEMU's bdrv_co_copy_range): copy a prefix of [offset, offset+bytes) of this node to
   * the same offsets of `target`, by the kernel, when this node's bytes lie in a host file and the
   * target can take a host copy there. Returns the bytes copied, 0 when there is no offload for this
   * range (nothing changed then). A read request here, a write request on the target.
   */
  async copyRangeTo(offset: number, bytes: number, target: BlockNode): Promise<number> {
    if (this.held) return this.afterHold((n) => n.copyRangeTo(offset, bytes, target));
    this.checkRequest(offset, bytes);
    if (bytes === 0 || !this.doMapHost || !target.acceptsHostCopy(offset, bytes)) return 0;
    const req = this.tracker.begin('read', offset, bytes);
    try {
      const serialised = this.tracker.waitForSerialising(req);
      if (serialised) await serialised;
      const src = await this.doMapHost(offset, bytes);
      if (!src || !target.acceptsHostCopy(offset, src.bytes)) return 0;
      await target.writeHost(offset, src);
      return src.bytes;
    } finally {
      this.tracker.end(req);
    }
  }

  async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    if (this.held) return this.afterHold((n) => n.write(offset, data, flags));
    this.checkRequest(offset, data.length, true);
    this.checkWritable();
    if (data.length === 0) return;
    // detect-zeroes (QEMU's bdrv_aligned_pwritev): a write of nothing but zeroes to a node that zeroes
    // natively becomes a write-zeroes request, which may unmap with detect-zeroes=unmap.
    const detect = this.openOptions['detect-zeroes'];
    if (detect !== undefined && detect !== 'off' && this.capabilities().writeZeroes && isAllZeroes(data)) {
      await this.writeRequest({ node: this, kind: 'zero', offset, bytes: data.length, flags: { ...flags, mayUnmap: detect === 'unmap' } });
      return;
    }
    // bdrv_driver_pwritev_compressed: a driver that cannot compress refuses (after detect-zeroes, as there).
    if (flags.compressed && !this.supportsCompressedWrites()) throw new BlockIOError('ENOTSUP');
    await this.writeRequest({ node: this, kind: 'write', offset, bytes: data.length, data, flags });
  }

  /**
   * Whether writes with the `compressed` flag can be stored compressed here (QEMU's
   * bdrv_supports_compressed_writes): a format that writes compressed clusters, or a filter that
   * forwards such writes to a child that does. Default: no.
   */
  supportsCompressedWrites(): boolean {
    return false;
  }

  async writeZeroes(offset: number, bytes: number, flags: WriteFlags = {}): Promise<void> {
    if (this.held) return this.afterHold((n) => n.writeZeroes(offset, bytes, flags));
    this.checkRequest(offset, bytes, true);
    this.checkWritable();
    if (bytes === 0) return;
    if (flags.noFallback) {
      // bdrv_co_do_pwrite_zeroes: without the driver's fast zero, or for a part of an alignment unit
      // (a read-modify-write), there is nothing but the fallback.
      const caps = this.capabilities();
      const align = this.requestAlignment;
      if (!caps.fastZero || offset % align || bytes % align) throw new BlockIOError('ENOTSUP');
    }
    await this.writeRequest({ node: this, kind: 'zero', offset, bytes, flags });
  }

  async discard(offset: number, bytes: number): Promise<void> {
    if (this.held) return this.afterHold((n) => n.discard(offset, bytes));
    this.checkRequest(offset, bytes);
    this.checkWritable();
    if (bytes === 0) return;
    await this.writeRequest({ node: this, kind: 'discard', offset, bytes, flags: {} });
  }

  /**
   * A flush request (bdrv_co_flush). As in QEMU, the request is announced to the node's primary child
   * (flushParentRequest: blkdebug's flush_to_os/flush_to_disk events) before the driver flushes;
   * flushes a driver makes of its own children (qcow2 ordering its metadata) announce nothing above
   * them, so only requests made to this node are seen one level down.
   */
  async flush(): Promise<void> {
    if (this.held) return this.afterHold((n) => n.flush());
    if (this.closed) return;
    this.primaryChild()?.flushParentRequest();
    await this.doFlush();
  }

  /** A parent node is flushing through this node (see flush); blkdebug raises its flush events here. */
  protected flushParentRequest(): void {}

  /**
   * Resize the node (QEMU's bdrv_co_truncate, what block_resize and image creation use): QEMU's checks
   * and messages, the driver's hook, then observers follow the new size (dirty bitmaps grow clean or
   * shrink). The caller holds resize permission on the node (a BlockBackend, or the format above).
   */
  async truncate(size: number, exact = false): Promise<void> {
    // A closing node takes no resize either: its bitmaps are stored at the size they have then.
    if (this.closing || this.closed) throw genericError('No medium inserted');
    if (!Number.isSafeInteger(size) || size < 0) throw genericError('Image size cannot be negative');
    if (this.readOnly) throw genericError('Image is read-only');
    if (!this.doTruncate) throw genericError('Image format driver does not support resize');
    // Tracked (over no range) so that quiesce waits for it, the bitmaps' resize included.
    const tracked = this.tracker.begin('truncate', 0, 0);
    try {
      await this.doTruncate(size, exact);
      for (const o of [...this.observers]) o.resized?.(this, this.length());
    } finally {
      this.tracker.end(tracked);
    }
  }

  // ---- reopen (blockdev-reopen; see BlockGraph.reopen) -----------------------------------------------

  /**
   * The options that name children (BlockdevRefs) in blockdev-reopen. A driver with an option of
   * such a name that is a plain value (rbd's `image`) overrides.
   */
  childOptionNames(): readonly string[] {
    return CHILD_OPTION_NAMES;
  }

  /**
   * The driver's own options blockdev-reopen may change; every other option given must keep its
   * value ("Cannot change the option 'x'"). Generic ones (read-only, discard, ...) are the graph's.
   */
  reopenableOptions(): readonly string[] {
    return [];
  }

  /**
   * Whether the driver takes part in blockdev-reopen at all (QEMU drivers without bdrv_reopen_prepare,
   * such as copy-on-read and copy-before-write, refuse every reopen).
   */
  supportsReopen(): boolean {
    return true;
  }

  /**
   * The checks of bdrv_reopen_prepare's driver part that need nothing but the new options and the
   * current children (raw's offset and size against its file as it is): throw QEMU's error to refuse.
   * Runs while the reopen is planned, before any child link or permission changes.
   */
  reopenCheck(_options: Record<string, unknown>): void {}

  /**
   * The driver's options that a reopen may not leave out once the node was opened with them
   * (bdrv_reset_options_allowed: those not in the driver's mutable_opts): "Option 'x' cannot be reset
   * to its default value". Checked before anything else of the reopen.
   */
  resetRefusedOptions(): readonly string[] {
    return [];
  }

  /**
   * bdrv_reopen_prepare's driver part, after the permissions of the new state were checked: do what
   * the change needs and can still be undone (a qcow2 going read-only writes back its metadata; a file
   * going read-write opens a writable descriptor). Throws to refuse.
   */
  async reopenPrepare(_change: ReopenChange): Promise<void> {}
  /**
   * After reopenPrepare: whether the commit must happen with the node drained (no request in flight,
   * new ones waiting), as when a file node takes over a new descriptor.
   */
  reopenDrains(): boolean {
    return false;
  }
  /** Make the change (cannot fail). */
  reopenCommit(change: ReopenChange): void {
    this.readOnly = change.readOnly;
    this.openOptions = change.options;
  }
  /** Undo reopenPrepare. */
  async reopenAbort(_change: ReopenChange): Promise<void> {}
  /** After every node of the reopen committed: the write phase of a node that became writable. */
  async reopenFinish(_change: ReopenChange, _wasReadOnly: boolean): Promise<void> {}

  /**
   * Point child `name` at `node`, or remove it (undefined), without checking permissions: for a change
   * its caller checks as a whole (reopen). Returns the undo.
   */
  relinkChild(name: string, node: BlockNode | undefined, role: ChildRole): () => void {
    const old = this.child(name);
    if (old) this.unlink(old);
    const edge = node ? new BdrvChild(name, this, node, role) : undefined;
    if (edge) this.link(edge);
    return () => {
      if (edge) this.unlink(edge);
      if (old) this.link(old);
    };
  }

  /**
   * Point the existing child edge `name` at `node` (QEMU's bdrv_replace_child: the edge, its role and
   * its place stay; what the driver reaches through it changes), without checking permissions: for a
   * change its caller checks as a whole (reopen) with this node drained. Returns the undo.
   */
  retargetChild(name: string, node: BlockNode): () => void {
    const edge = this.child(name);
    if (!edge) throw new Error(`${this.nodeName} has no child '${name}'`);
    const old = edge.node;
    const move = (from: BlockNode, to: BlockNode) => {
      from.parents.splice(from.parents.indexOf(edge), 1);
      edge.node = to;
      to.parents.unshift(edge);
    };
    move(old, node);
    return () => move(node, old);
  }

  /** For a format's doTruncate: let observers refuse a resize of an image that stores these bitmaps. */
  protected checkStoredBitmapsResizable(names: readonly string[]): void {
    if (names.length === 0) return;
    for (const o of this.observers) o.beforeResize?.(this, names);
  }

  /** Block status of [offset, offset+bytes): the status of a prefix of it. */
  async blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    if (this.held) return this.afterHold((n) => n.blockStatus(offset, bytes));
    this.checkRequest(offset, bytes);
    if (bytes === 0) throw new BlockIOError('EINVAL');
    const st = await this.doBlockStatus(offset, bytes);
    if (!(st.bytes > 0) || st.bytes > bytes) throw new Error(`${this.driver}: bad block status length ${st.bytes}`);
    return st;
  }

  /**
   * Whether [offset, offset+bytes) (a prefix of it, `bytes` returned) is allocated in this node or any
   * backing node above `base` (bdrv_is_allocated_above with include_base=false). Used by mirror sync=top/full.
   */
  async isAllocatedAbove(base: BlockNode | undefined, offset: number, bytes: number): Promise<{ allocated: boolean; bytes: number }> {
    let node: BlockNode | undefined = this.formatLayer();
    let want = bytes;
    while (node && node !== base) {
      const st = await node.blockStatus(offset, want);
      if (st.allocated) return { allocated: true, bytes: st.bytes };
      want = st.bytes;
      const next: BlockNode | undefined = node.backing();
      if (!next || offset >= next.length()) break;
      want = Math.min(want, next.length() - offset);
      node = next.formatLayer();
    }
    return { allocated: false, bytes: want };
  }

  /** The node that holds this node's data layer: for filters the first non-filter below; else this. */
  formatLayer(): BlockNode {
    return this;
  }

  /** Run the write phase of opening (once; the graph calls it). */
  async activate(): Promise<void> {
    if (this.activated) return;
    if (this.doActivate) await this.doActivate();
    this.activated = true;
  }

  /**
   * The first step of closing, QEMU's bdrv_drained_begin in bdrv_close: refuse every new request
   * (ENOMEDIUM) and wait until every request in flight has ended, its write observers' afterWrite
   * included, so that dirty bitmaps have marked every write that reached the node. Only this node
   * stops: what its driver does to its children while it closes (storing bitmaps, writing back
   * metadata) goes on. Stays in force until the node is closed; there is no way back.
   */
  async quiesce(): Promise<void> {
    this.closing = true;
    await this.tracker.drain();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.quiesce();
    try {
      if (!this.readOnly) await this.doFlush();
    } finally {
      this.closed = true;
      await this.doClose();
    }
  }

  isClosed(): boolean {
    return this.closed;
  }

  // ---- internals ----------------------------------------------------------------------------------

  /** The end of the furthest write or write-zeroes, failed or not (QEMU's wr_highest_offset). */
  wrHighestOffset = 0;

  /** query-blockstats' `driver-specific` member (BlockStatsSpecific), for drivers that keep any. */
  driverSpecificStats(): Record<string, unknown> | undefined {
    return undefined;
  }

  private async writeRequest(req: WriteRequest): Promise<void> {
    const tracked = this.tracker.begin(req.kind, req.offset, req.bytes);
    // Observers registered when the write begins are the ones that see it end. (Most nodes have none:
    // a copy's target and the files below formats. No copies, closures or loops for them.)
    const observers = this.observers.length > 0 ? this.observers.slice() : NO_OBSERVERS;
    let notified = 0;
    let writeError: unknown;
    try {
      const serialised = this.tracker.waitForSerialising(tracked);
      if (serialised) await serialised;
      if (req.flags.serialising) await this.tracker.serialise(tracked, req.offset, req.bytes);
      for (; notified < observers.length; notified++) {
        const o = observers[notified];
        if (o.beforeWrite) await o.beforeWrite(req);
      }
      await this.alignedWrite(req, tracked);
    } catch (err) {
      writeError = err;
    }
    if (req.kind !== 'discard') this.wrHighestOffset = Math.max(this.wrHighestOffset, req.offset + req.bytes);
    let observerError: unknown;
    try {
      if (observers.length > 0 || this.observers.length > 0) {
        const notify = async (o: WriteObserver): Promise<void> => {
          try {
            if (o.afterWrite) await o.afterWrite(req, writeError);
          } catch (err) {
            observerError ??= err;
          }
        };
        for (let i = 0; i < notified; i++) await notify(observers[i]);
        // Observers added while the write was in flight that want to see it (dirty bitmaps).
        for (const o of [...this.observers]) if (o.seesWritesInFlight && !observers.includes(o)) await notify(o);
      }
    } finally {
      this.tracker.end(tracked);
    }
    const error = writeError ?? observerError;
    if (error !== undefined) throw error;
  }

  private async alignedRead(offset: number, bytes: number): Promise<Buffer> {
    const align = this.requestAlignment;
    if (align <= 1 || (offset % align === 0 && bytes % align === 0)) return this.doRead(offset, bytes);
    const start = offset - (offset % align);
    const end = Math.min(this.length(), Math.ceil((offset + bytes) / align) * align);
    const buf = await this.doRead(start, end - start);
    return buf.subarray(offset - start, offset - start + bytes);
  }

  /** Unaligned writes become a serialising read-modify-write of the aligned range around them. */
  private async alignedWrite(req: WriteRequest, tracked: TrackedRequest): Promise<void> {
    const align = this.requestAlignment;
    const aligned = align <= 1 || (req.offset % align === 0 && req.bytes % align === 0);
    // acceptsHostCopy has checked what a host copy needs, alignment included.
    if (req.kind === 'copy') return this.doWriteHost!(req.offset, req.source!);
    if (aligned || req.kind === 'discard') {
      if (req.kind === 'write') return this.doWrite(req.offset, req.data!, req.flags);
      if (req.kind === 'zero') return this.doWriteZeroes(req.offset, req.bytes, req.flags);
      if (aligned) return this.doDiscard(req.offset, req.bytes);
      // Discard is advisory: shrink to the aligned part.
      const s = Math.ceil(req.offset / align) * align;
      const e = Math.floor((req.offset + req.bytes) / align) * align;
      if (e > s) await this.doDiscard(s, e - s);
      return;
    }
    const start = req.offset - (req.offset % align);
    const end = Math.min(this.length(), Math.ceil((req.offset + req.bytes) / align) * align);
    await this.tracker.serialise(tracked, start, end - start);
    const buf = Buffer.from(await this.doRead(start, end - start));
    if (req.kind === 'write') req.data!.copy(buf, req.offset - start);
    else buf.fill(0, req.offset - start, req.offset - start + req.bytes);
    await this.doWrite(start, buf, req.flags);
  }
}

/**
 * QEMU's json: pseudo-filename for a node it cannot name by a file name: the options as JSON with
 * QEMU's spacing (`{"a": 1, "b": {"c": null}}`), members in QEMU's (QDict) order.
 */
export function jsonFilename(options: Record<string, unknown>): string {
  const enc = (v: unknown): string => {
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
      const o = v as Record<string, unknown>;
      return `{${qdictOrder(Object.keys(o))
        .map((k) => `${JSON.stringify(k)}: ${enc(o[k])}`)
        .join(', ')}}`;
    }
    if (Array.isArray(v)) return `[${v.map(enc).join(', ')}]`;
    return JSON.stringify(v);
  };
  return `json:${enc(options)}`;
}

/** The node at the bottom of `node`'s data path through primary children (filters, raw): where its bytes live. */
export function protocolLeaf(node: BlockNode): BlockNode {
  let n = node;
  for (let c = n.primaryChild(); c; c = n.primaryChild()) n = c;
  return n;
}

/** writeRequest's observers of a node that has none. */
const NO_OBSERVERS: readonly WriteObserver[] = [];

/** Zeroes to compare data with (memcmp through Buffer.equals: far faster than a loop in JS). */
const ZEROES = Buffer.alloc(1 << 20);

/** Whether every byte of `data` is zero. */
export function isAllZeroes(data: Buffer): boolean {
  for (let pos = 0; pos < data.length; pos += ZEROES.length) {
    const n = Math.min(ZEROES.length, data.length - pos);
    if (!data.subarray(pos, pos + n).equals(ZEROES.subarray(0, n))) return false;
  }
  return true;
}
