/**
 * Core: the state one daemon holds — the block graph, events, the job registry and the bitmap manager
 * — and the hooks that tie them together. It sits above jobs/, bitmap/ and block/ (ARCHITECTURE.md).
 * Commands receive it; the daemon builds it. It holds no protocol code: no JSON, no sockets.
 */
import { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { BLK_PERM_ALL, MONITOR_PARENT } from '../block/permissions.js';
import type { VisitOptions } from '../qapi/schema.js';
import { EventBus } from '../base/events.js';
import { BitmapManager } from '../bitmap/manager.js';
import { loadPersistentBitmaps, persistentBitmapsFollowReopen, storePersistentBitmaps } from '../bitmap/persistence.js';
import { tracer } from '../trace/trace.js';
import { JobRegistry } from '../jobs/registry.js';
import { NbdServer } from '../nbd/server.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import type { CopyBitmap } from '../block/copy/block-copy.js';

/** A character device of the daemon's command line (--chardev), as the QOM tree shows it under /chardevs. */
export interface ChardevInfo {
  id: string;
  /** QOM type: chardev-socket or chardev-stdio. */
  type: 'chardev-socket' | 'chardev-stdio';
  /** A socket's address (SocketAddress, as qom-get `addr` shows it). */
  addr?: Record<string, unknown>;
  /** A client is connected (qom-get `connected`). */
  connected(): boolean;
}

export class Core {
  readonly graph = new BlockGraph();
  readonly events = new EventBus();
  readonly trace = tracer;
  /** Dirty bitmaps of every node, and the write observers that feed them. */
  readonly bitmaps = new BitmapManager();
  /** Called to stop the daemon (QMP quit). Set by the daemon. */
  requestShutdown: () => void = () => undefined;
  /** Actions to run at shutdown before nodes are closed (cancel jobs, stop exports), in registration order. */
  readonly shutdownHooks: Array<() => Promise<void>> = [];
  /** Every job (create, mirror, backup, …) by id; query-jobs, job-* and block-job-* look here. */
  readonly jobs = new JobRegistry(this.events);
  /** The NBD server and its exports (nbd-server-start, block-export-add). */
  readonly nbd = new NbdServer(this.bitmaps, this.events);
  /** The character devices (--chardev), in the order they were given; the daemon fills it. */
  readonly chardevs: ChardevInfo[] = [];

  /**
   * Where the daemon's log lines go (recovered bitmaps, bitmaps lost at close): stderr, prefixed
   * `bitmirror: `. A program embedding a Core (a test) may route them elsewhere.
   */
  log: (line: string) => void = (line) => process.stderr.write(`bitmirror: ${line}\n`);

  constructor() {
    // The copy engine's and copy-before-write's anonymous bitmaps are the manager's, like any other.
    const bitmaps = this.bitmaps;
    const dirty = (bm: CopyBitmap) => bm as DirtyBitmap;
    this.graph.copyBitmaps = {
      createHidden: (node, granularity) => bitmaps.createAnonymous(node, granularity, { disabled: true }),
      release: (bm) => bitmaps.release(dirty(bm)),
      lookup: (node, name) => bitmaps.get(node, name),
      mergeInto: (dst, src) => dirty(dst).hbitmap.merge(dirty(src).hbitmap),
      setAll: (bm) => dirty(bm).setDirty(0, dirty(bm).size),
      granularity: (bm) => dirty(bm).granularity,
    };
    // Jobs first: their abort/clean hooks still need the nodes.
    this.shutdownHooks.push(() => this.jobs.cancelAll());
    // Exports are parents of their nodes: their clients are disconnected and their requests have
    // ended before any node closes.
    this.shutdownHooks.push(() => this.nbd.shutdown());
    // Bitmaps stored in an image are loaded when it opens; persistent ones are written back when the
    // node closes, after its last request ended (see BlockGraph.closeNode). A failure to store them
    // does not keep the node: as QEMU, the lost bitmaps are reported on stderr and the node goes.
    this.graph.afterOpen.push(async (node) => void (await loadPersistentBitmaps(this.bitmaps, node, (line) => this.log(line))));
    this.graph.beforeClose.push(async (node) => {
      try {
        await storePersistentBitmaps(this.bitmaps, node);
      } catch (err) {
        this.log(err instanceof Error ? err.message : String(err));
      }
      this.bitmaps.releaseAll(node);
    });
    // blockdev-reopen: a node going read-only stores its persistent bitmaps first; afterwards they
    // follow its state.
    this.graph.reopenHooks.beforeReadOnly.push((node) => storePersistentBitmaps(this.bitmaps, node));
    this.graph.reopenHooks.afterReopen.push(async (node) => persistentBitmapsFollowReopen(this.bitmaps, node));
  }

  /**
   * blockdev-add and --blockdev: open a node the monitor holds (a parent edge that takes nothing and
   * shares everything); only such nodes may be blockdev-del'd.
   */
  async openForMonitor(opts: Record<string, unknown>, visitOpts: VisitOptions = {}): Promise<BlockNode> {
    const node = await this.graph.open(opts, false, visitOpts);
    node.attachParent(MONITOR_PARENT, 'monitor', 0, BLK_PERM_ALL);
    return node;
  }

  async shutdown(): Promise<void> {
    // No new node (a queued blockdev-add, a job's filter) from here on; jobs are cancelled, then the
    // nodes close, each drained before its bitmaps are stored.
    this.graph.beginShutdown();
    for (const hook of this.shutdownHooks) await hook().catch(() => undefined);
    await this.graph.closeAll();
  }
}
