/**
 * Which freed host clusters qcow2 discards on its file (QEMU's discard passthrough), and the queue of
 * those ranges until the refcount update that freed them is done.
 *
 * Every place that lowers a refcount says why (FreeReason, QEMU's qcow2_discard_type); a cluster whose
 * refcount reaches zero is discarded on the file when that reason passes:
 * - 'never': never (a replaced cluster on overwrite, an allocation given back after a failed write);
 * - 'always': always (the clusters and tables a shrink cuts off);
 * - 'request': pass-discard-request, by default on exactly when the node has discard=unmap (guest
 *   discards, and zero writes that may unmap);
 * - 'snapshot': pass-discard-snapshot, default on (internal snapshot operations; bitmirror does none
 *   yet, the option is kept for them);
 * - 'other': pass-discard-other, default off (metadata freed otherwise: an old L1 or refcount table,
 *   a shared L2 table copied, bitmap tables and directories).
 * Defaults as QEMU 7.2's qcow2_update_options, which blockdev-reopen runs again (an option left out
 * goes back to its default). The discard on the file only punches a hole when the file node itself
 * has discard=unmap; it is advisory, so its failure is ignored (as qcow2_process_discards does).
 */
import type { BlockNode } from '../../node.js';

export type FreeReason = 'never' | 'always' | 'request' | 'snapshot' | 'other';

export type DiscardPassthrough = Readonly<Record<FreeReason, boolean>>;

/** The passthrough a qcow2 node's options give (at open and at every reopen). */
export function discardPassthrough(opts: Record<string, unknown>): DiscardPassthrough {
  const flag = (name: string, dflt: boolean) => (typeof opts[name] === 'boolean' ? (opts[name] as boolean) : dflt);
  return {
    never: false,
    always: true,
    request: flag('pass-discard-request', opts.discard === 'unmap'),
    snapshot: flag('pass-discard-snapshot', true),
    other: flag('pass-discard-other', false),
  };
}

/**
 * Host ranges freed and still to be discarded. Filled while refcounts are
 * lowered and issued once the update is done (QEMU batches a whole discard or zero request the same
 * way), always before the metadata lock is released: no cluster in the queue can be allocated again
 * before its discard has reached the file.
 */
export class PendingDiscards {
  private ranges: Array<{ offset: number; bytes: number }> = [];
  /** Open batches: while one is open, `issue` leaves the queue for the outermost to send. */
  private depth = 0;

  /** `fileOf`: the image file, as the node's file link has it now. */
  constructor(private readonly fileOf: () => BlockNode) {}

  private get file(): BlockNode {
    return this.fileOf();
  }

  /** Queue [offset, +bytes); a range continuing the last one queued extends it (the common case). */
  add(offset: number, bytes: number): void {
    const last = this.ranges[this.ranges.length - 1];
    if (last && last.offset + last.bytes === offset) last.bytes += bytes;
    else this.ranges.push({ offset, bytes });
  }

  /**
   * Run `fn` with discards held back, then send everything it freed. When it fails, nothing is
   * sent (as QEMU's qcow2_process_discards after an error): what it freed is left as it is.
   */
  async batch<T>(fn: () => Promise<T>): Promise<T> {
    this.depth++;
    let result: T;
    try {
      result = await fn();
    } catch (err) {
      if (--this.depth === 0) this.ranges = [];
      throw err;
    }
    this.depth--;
    await this.issue();
    return result;
  }

  /** Send the queued discards to the file, unless a batch is open. */
  async issue(): Promise<void> {
    if (this.depth > 0 || this.ranges.length === 0) return;
    // In file order, adjacent and overlapping ranges merged: one request per run of freed clusters.
    const sorted = this.ranges.sort((a, b) => a.offset - b.offset);
    this.ranges = [];
    const ranges: Array<{ offset: number; bytes: number }> = [];
    for (const r of sorted) {
      const prev = ranges[ranges.length - 1];
      if (prev && r.offset <= prev.offset + prev.bytes) prev.bytes = Math.max(prev.bytes, r.offset + r.bytes - prev.offset);
      else ranges.push({ ...r });
    }
    for (const r of ranges) {
      // Cut to the file's end: a range past it has nothing to give back (and the request would fail).
      const bytes = Math.min(r.bytes, this.file.length() - r.offset);
      if (bytes > 0) await this.file.discard(r.offset, bytes).catch(() => undefined);
    }
  }
}
