/**
 * A power cut in simulation (as dm-log-writes or LazyFS): the test-only `recording` filter driver
 * passes every request to its `file` child and logs each write (its bytes), write-zeroes, discard,
 * truncate and flush, with their start and end (and, when asked, its reads: readLog). `rebuildAfterCut`
 * then makes the image a power cut at a chosen point of the log would leave: what a flush had made durable before the cut, plus any
 * subset of the writes that had started by then but were not yet covered by a flush
 * (`pendingWrites` lists them, so a test can try every subset).
 */
import { BlockNode, type BdrvChild, type NodeCapabilities, type WriteFlags } from '../../src/block/node.js';
import { defaultChildPermissions, type Permissions } from '../../src/block/permissions.js';
import type { BlockDriver } from '../../src/block/graph.js';

/** `file`: the file under the recording node (several recording nodes may log, e.g. an image and its sidecar). */
export type LogEvent =
  | { kind: 'write'; file: string; id: number; offset: number; data: Buffer; phase: 'start' | 'end'; fua?: boolean }
  | { kind: 'truncate'; file: string; size: number }
  | { kind: 'flush'; file: string; id: number; phase: 'start' | 'end' };

/** The log every recording node of the process appends to (tests run one scenario at a time). */
export const recordingLog: LogEvent[] = [];

/** The reads (file, offset, bytes) every recording node passes on, while `enabled` (off by default: the power-cut tests read a lot). */
export const readLog: { enabled: boolean; reads: Array<{ file: string; offset: number; bytes: number }> } = { enabled: false, reads: [] };
let nextId = 0;

class RecordingNode extends BlockNode {
  readonly driver = 'recording';
  constructor(nodeName: string, readOnly: boolean, file: BlockNode) {
    super(nodeName, readOnly);
    this.attachChild('file', file, 'filtered');
  }
  override childPermissions(child: BdrvChild, perm: number, shared: number, writable: boolean): Permissions {
    return defaultChildPermissions(child.role, writable, perm, shared, true);
  }
  private get file(): BlockNode {
    return this.child('file')!.node;
  }
  private get target(): string {
    return this.file.imageInfo().filename;
  }
  length(): number {
    return this.file.length();
  }
  override capabilities(): NodeCapabilities {
    return this.file.capabilities();
  }
  // A growable file grows when qcow2 writes past its end (as blkdebug does it). One growth at a time,
  // and only ever growing: two concurrent writes past the end that both saw the old length would
  // otherwise truncate in either order, the later shrinking the file under the other's data.
  private growing: Promise<void> = Promise.resolve();
  private growTo(end: number): Promise<void> {
    const run = this.growing.then(async () => {
      if (end > this.length()) await this.truncate(end);
    });
    this.growing = run.catch(() => undefined);
    return run;
  }
  override async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    if (offset + data.length > this.length()) await this.growTo(offset + data.length);
    return super.write(offset, data, flags);
  }
  override async writeZeroes(offset: number, bytes: number, flags: WriteFlags = {}): Promise<void> {
    if (offset + bytes > this.length()) await this.growTo(offset + bytes);
    return super.writeZeroes(offset, bytes, flags);
  }
  // A FUA write is durable once it has ended (as if a flush of it alone followed).
  private async logged(offset: number, data: Buffer, io: () => Promise<void>, fua = false): Promise<void> {
    const id = nextId++;
    recordingLog.push({ kind: 'write', file: this.target, id, offset, data: Buffer.from(data), phase: 'start', fua });
    await io();
    recordingLog.push({ kind: 'write', file: this.target, id, offset, data, phase: 'end', fua });
  }
  protected doRead(offset: number, bytes: number): Promise<Buffer> {
    if (readLog.enabled) readLog.reads.push({ file: this.target, offset, bytes });
    return this.file.read(offset, bytes);
  }
  protected doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    return this.logged(offset, data, () => this.file.write(offset, data, flags), flags.fua);
  }
  protected override doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    return this.logged(offset, Buffer.alloc(bytes), () => this.file.writeZeroes(offset, bytes, flags), flags.fua);
  }
  // A discarded range reads back as zeroes from a file node (hole punched), or keeps its old bytes.
  protected override doDiscard(offset: number, bytes: number): Promise<void> {
    return this.logged(offset, Buffer.alloc(bytes), () => this.file.discard(offset, bytes));
  }
  protected async doFlush(): Promise<void> {
    const id = nextId++;
    recordingLog.push({ kind: 'flush', file: this.target, id, phase: 'start' });
    await this.file.flush();
    recordingLog.push({ kind: 'flush', file: this.target, id, phase: 'end' });
  }
  protected override async doTruncate(size: number, exact: boolean): Promise<void> {
    await this.file.truncate(size, exact);
    recordingLog.push({ kind: 'truncate', file: this.target, size });
  }
  imageInfo() {
    return { ...this.file.imageInfo() };
  }
}

export const recordingDriver: BlockDriver = {
  name: 'recording',
  options: { file: { kind: 'any' } },
  async open(nodeName, opts, ctx) {
    const file = await ctx.openChild(opts.file, opts['read-only'] as boolean, 'file', 'filtered');
    return new RecordingNode(nodeName, opts['read-only'] as boolean, file);
  },
};

/** The events of `log` before `cut` on `file` (all files when undefined). */
function eventsBefore(log: LogEvent[], cut: number, file: string | undefined): LogEvent[] {
  return log.slice(0, cut).filter((e) => file === undefined || e.file === file);
}

/** The writes of `events` made durable: ended before a flush that also ended, or ended with FUA. */
function durableWrites(events: LogEvent[]): Set<number> {
  const ended = new Set<number>();
  const durable = new Set<number>();
  const flushStartEnded = new Map<number, Set<number>>();
  for (const e of events) {
    if (e.kind === 'write' && e.phase === 'end') ended.add(e.id);
    if (e.kind === 'write' && e.phase === 'end' && e.fua) durable.add(e.id);
    if (e.kind === 'flush' && e.phase === 'start') flushStartEnded.set(e.id, new Set(ended));
    if (e.kind === 'flush' && e.phase === 'end') for (const id of flushStartEnded.get(e.id) ?? []) durable.add(id);
  }
  return durable;
}

/**
 * The writes (to `file`, when several are logged) a power cut after `cut` events of `log` may or may
 * not have kept: those that had started but that no completed flush covers, in the order they started.
 */
export function pendingWrites(log: LogEvent[], cut: number, file?: string): number[] {
  const events = eventsBefore(log, cut, file);
  const durable = durableWrites(events);
  const out: number[] = [];
  for (const e of events) {
    if (e.kind === 'write' && e.phase === 'start' && !durable.has(e.id)) out.push(e.id);
  }
  return out;
}

/**
 * The file (`file`, when several are logged) a power cut after `cut` events of `log` leaves, starting
 * from `initial`: every write that ended before a flush (of that file) that started and ended before
 * the cut, and each other write that started before the cut when `kept(id)` says so (e.g. at random,
 * or one subset of pendingWrites), applied in the order they started.
 */
export function rebuildAfterCut(initial: Buffer, log: LogEvent[], cut: number, kept: (writeId: number) => boolean, file?: string): Buffer {
  const events = eventsBefore(log, cut, file);
  const durable = durableWrites(events);
  let size = initial.length;
  for (const e of events) {
    if (e.kind === 'write' && e.phase === 'start') size = Math.max(size, e.offset + e.data.length);
    if (e.kind === 'truncate') size = e.size;
  }
  const out = Buffer.alloc(size);
  initial.copy(out, 0, 0, Math.min(size, initial.length));
  for (const e of events) {
    if (e.kind !== 'write' || e.phase !== 'start') continue;
    if (durable.has(e.id) || kept(e.id)) e.data.copy(out, e.offset, 0, Math.max(0, Math.min(e.data.length, size - e.offset)));
  }
  return out;
}
