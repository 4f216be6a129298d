/**
 * The `blkdebug` filter driver: passes I/O to its `image` child and injects errors by rule, as QEMU's
 * blkdebug does, so that job error policies (on-source-error, on-target-error) can be tested.
 *
 * Model (QEMU's): events (BlkdebugEvent) are raised on a node by the code around it. Each event runs
 * the rules registered for it whose `state` matches the current state (0 = any; the state starts at 1):
 * - inject-error rules become the *active* rules (the first inject-error rule an event runs replaces
 *   the whole active set; later ones are added in front);
 * - set-state rules change the state once every rule of the event has run.
 * Each read/write/write-zeroes/discard/flush/block-status on the node then checks the active rules: the
 * first whose iotype matches and whose `sector` (if any) lies inside the request fails it with `errno`
 * (default EIO); a `once` rule is deleted when it fires. Without `immediately` the error is returned
 * after a trip through the event loop, as QEMU returns it after rescheduling.
 *
 * Who raises which event:
 * - the node itself, as QEMU's generic write path does: `pwritev`, `pwritev_zero`, `pwritev_done`,
 *   the `pwritev_rmw_*` events around read-modify-write of an unaligned write, and `none` once at open;
 * - its parent nodes: `flush_to_os` and `flush_to_disk` when a flush request is made to a parent
 *   (generic in QEMU: bdrv_co_flush; a format driver's own flushes of its file while it orders
 *   metadata raise nothing here, as in QEMU);
 *   `read_aio`/`write_aio` when a parent reads or writes through it, as QEMU's raw driver does. Format
 *   drivers that raise their own events (qcow2: l2_load, read_aio for guest data only, cluster_alloc, …)
 *   call registerBlkdebugEventSource(driverName) once and blkdebugEvent(child, event) where QEMU does;
 *   for those parents blkdebug no longer raises read_aio/write_aio itself.
 * A blkdebug node with no parent node (opened directly by qemu-io-like users) gets no read_aio, exactly
 * as in QEMU.
 *
 * Rules come from the options (`inject-error`, `set-state`) and from a `config` file in QEMU's format
 * (docs/devel/blkdebug: `[inject-error]` and `[set-state]` sections of `name = "value"` lines); the
 * legacy filename `blkdebug:CONFIG:IMAGE` (a backing file name, a drive-mirror target) names a blkdebug
 * node with that config over the image file (block/filename.ts).
 *
 * Not supported: breakpoints/suspend (no HMP here),
 * max-transfer, opt-write-zero, max-write-zero, opt-discard and max-discard limits (accepted, checked like QEMU, not enforced), take/unshare-child-perms
 * (bitmirror has no permission system; accepted and ignored).
 */
import { promises as fsp } from 'node:fs';
import { BlockIOError, errorCode, genericError, strerror } from '../../errors.js';
import { errnoCode } from '../native.js';
import { BlockNode, type BlockStatus, type ImageInfo, type NodeCapabilities, type WriteFlags } from '../node.js';
import type { BlockDriver } from '../graph.js';
import { arrayOf, bool, enumOf, int, object, str } from '../../qapi/schema.js';
import { BlockdevRef } from './raw.js';

/** QEMU's BlkdebugEvent enum (qapi/block-core.json), in its order. */
export const BLKDEBUG_EVENTS = [
  'l1_update', 'l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table', 'l2_load', 'l2_update',
  'l2_update_compressed', 'l2_alloc_cow_read', 'l2_alloc_write', 'read_aio', 'read_backing_aio', 'read_compressed',
  'write_aio', 'write_compressed', 'vmstate_load', 'vmstate_save', 'cow_read', 'cow_write', 'reftable_load',
  'reftable_grow', 'reftable_update', 'refblock_load', 'refblock_update', 'refblock_update_part', 'refblock_alloc',
  'refblock_alloc_hookup', 'refblock_alloc_write', 'refblock_alloc_write_blocks', 'refblock_alloc_write_table',
  'refblock_alloc_switch_table', 'cluster_alloc', 'cluster_alloc_bytes', 'cluster_free', 'flush_to_os',
  'flush_to_disk', 'pwritev_rmw_head', 'pwritev_rmw_after_head', 'pwritev_rmw_tail', 'pwritev_rmw_after_tail',
  'pwritev', 'pwritev_zero', 'pwritev_done', 'empty_image_prepare', 'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters', 'cor_write', 'cluster_alloc_space', 'none',
] as const;
export type BlkdebugEvent = (typeof BLKDEBUG_EVENTS)[number];

export const BLKDEBUG_IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
export type BlkdebugIOType = (typeof BLKDEBUG_IO_TYPES)[number];
const DEFAULT_IOTYPES: readonly BlkdebugIOType[] = ['read', 'write', 'write-zeroes', 'discard', 'flush'];

const SECTOR = 512;
const INT_MAX = 2 ** 31 - 1;

interface InjectRule {
  kind: 'inject';
  event: BlkdebugEvent;
  state: number;
  iotypes: ReadonlySet<BlkdebugIOType>;
  errno: number;
  once: boolean;
  immediately: boolean;
  /** Byte offset (sector * 512), or undefined for any offset. */
  offset: number | undefined;
}

interface SetStateRule {
  kind: 'set-state';
  event: BlkdebugEvent;
  state: number;
  newState: number;
}

type Rule = InjectRule | SetStateRule;

/** Drivers whose code raises blkdebug events on their children itself (see the module comment). */
const eventSources = new Set<string>();

export function registerBlkdebugEventSource(driverName: string): void {
  eventSources.add(driverName);
}

/**
 * Raise `event` on `node` as QEMU's BLKDBG_EVENT does: on the first blkdebug node found going down
 * through primary children (filters, raw); nothing happens when there is none.
 */
export function blkdebugEvent(node: BlockNode | undefined, event: BlkdebugEvent): void {
  let n = node;
  while (n && !(n instanceof BlkdebugNode)) n = n.primaryChild();
  n?.debugEvent(event);
}

export class BlkdebugNode extends BlockNode {
  readonly driver = 'blkdebug';
  /** QEMU's blkdebug has no mutable_opts: a reopen may not leave out what it was opened with (its rule lists are not checked here). */
  override resetRefusedOptions(): readonly string[] {
    return ['config', 'align', 'max-transfer', 'opt-write-zero', 'max-write-zero', 'opt-discard', 'max-discard'];
  }
  /** Rules per event, newest first (QEMU inserts at the head). */
  private readonly rules = new Map<BlkdebugEvent, Rule[]>();
  /** Active inject-error rules, in the order they are checked. */
  private active: InjectRule[] = [];
  state = 1;

  constructor(
    nodeName: string,
    readOnly: boolean,
    image: BlockNode,
    rules: Rule[],
    align: number,
    private readonly configFile?: string,
  ) {
    super(nodeName, readOnly);
    this.attachChild('image', image, 'filtered');
    for (const r of rules) {
      const list = this.rules.get(r.event) ?? [];
      list.unshift(r);
      this.rules.set(r.event, list);
    }
    this.requestAlignment = Math.max(align, image.requestAlignment);
  }

  private get image(): BlockNode {
    return this.child('image')!.node;
  }

  /** Run the rules of `event` (bdrv_debug_event). */
  debugEvent(event: BlkdebugEvent): void {
    let newState = this.state;
    let injected = 0;
    for (const rule of [...(this.rules.get(event) ?? [])]) {
      if (rule.state !== 0 && rule.state !== this.state) continue;
      if (rule.kind === 'inject') {
        if (++injected === 1) this.active = [];
        this.active.unshift(rule);
      } else {
        newState = rule.newState;
      }
    }
    this.state = newState;
  }

  /** rule_check: throw the error of the first active rule matching this request. */
  private async ruleCheck(offset: number, bytes: number, iotype: BlkdebugIOType): Promise<void> {
    const rule = this.active.find(
      (r) => (r.offset === undefined || (bytes > 0 && r.offset >= offset && r.offset < offset + bytes)) && r.iotypes.has(iotype),
    );
    if (!rule || rule.errno === 0) return;
    if (rule.once) {
      this.active.splice(this.active.indexOf(rule), 1);
      const list = this.rules.get(rule.event)!;
      list.splice(list.indexOf(rule), 1);
    }
    if (!rule.immediately) await new Promise<void>((resolve) => setImmediate(resolve));
    throw new BlockIOError(errnoCode(rule.errno));
  }

  /** Whether a parent node reads and writes through us without raising events itself (like raw). */
  private parentNeedsIoEvents(): boolean {
    for (const edge of this.parents) if (edge.parentNode && !eventSources.has(edge.parentNode.driver)) return true;
    return false;
  }

  length(): number {
    return this.image.length();
  }

  override primaryChild(): BlockNode | undefined {
    return this.image;
  }

  override formatLayer(): BlockNode {
    return this.image.formatLayer();
  }

  override async write(offset: number, data: Buffer, flags: WriteFlags = {}): Promise<void> {
    if (this.parentNeedsIoEvents()) this.debugEvent('write_aio');
    this.rmwEvents(offset, data.length);
    await this.growFor(offset + data.length);
    return super.write(offset, data, flags);
  }

  override async writeZeroes(offset: number, bytes: number, flags: WriteFlags = {}): Promise<void> {
    this.rmwEvents(offset, bytes);
    await this.growFor(offset + bytes);
    return super.writeZeroes(offset, bytes, flags);
  }

  /**
   * A growable image (a file node) grows when a format driver above writes past its end (qcow2
   * allocating clusters); without this every allocating write through blkdebug failed with EIO.
   */
  private async growFor(end: number): Promise<void> {
    if (end > this.length() && !this.readOnly && this.image.capabilities().resize) await this.image.truncate(end);
  }

  override capabilities(): NodeCapabilities {
    return { ...this.image.capabilities(), requestAlignment: this.requestAlignment };
  }
  /** blkdebug_co_truncate: the image is resized. */
  protected override doTruncate(size: number, exact: boolean): Promise<void> {
    return this.image.truncate(size, exact);
  }

  override async read(offset: number, bytes: number): Promise<Buffer> {
    if (this.parentNeedsIoEvents()) this.debugEvent('read_aio');
    return super.read(offset, bytes);
  }

  /** bdrv_co_flush of a parent raises these on its primary child (this node) before flushing. */
  protected override flushParentRequest(): void {
    this.debugEvent('flush_to_os');
    this.debugEvent('flush_to_disk');
  }

  /** The events QEMU raises around the read-modify-write of an unaligned write's head and tail. */
  private rmwEvents(offset: number, bytes: number): void {
    const align = this.requestAlignment;
    if (align <= 1 || bytes === 0) return;
    if (offset % align !== 0) {
      this.debugEvent('pwritev_rmw_head');
      this.debugEvent('pwritev_rmw_after_head');
    }
    const end = offset + bytes;
    if (end % align !== 0 && (offset % align === 0 || Math.floor(offset / align) !== Math.floor(end / align))) {
      this.debugEvent('pwritev_rmw_tail');
      this.debugEvent('pwritev_rmw_after_tail');
    }
  }

  protected async doRead(offset: number, bytes: number): Promise<Buffer> {
    await this.ruleCheck(offset, bytes, 'read');
    return this.image.read(offset, bytes);
  }

  protected async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    this.debugEvent('pwritev');
    try {
      await this.ruleCheck(offset, data.length, 'write');
      await this.image.write(offset, data, flags);
    } finally {
      this.debugEvent('pwritev_done');
    }
  }

  protected override async doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    this.debugEvent('pwritev_zero');
    try {
      await this.ruleCheck(offset, bytes, 'write-zeroes');
      await this.image.writeZeroes(offset, bytes, flags);
    } finally {
      this.debugEvent('pwritev_done');
    }
  }

  protected override async doDiscard(offset: number, bytes: number): Promise<void> {
    await this.ruleCheck(offset, bytes, 'discard');
    await this.image.discard(offset, bytes);
  }

  protected async doFlush(): Promise<void> {
    await this.ruleCheck(0, 0, 'flush');
    await this.image.flush();
  }

  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    await this.ruleCheck(offset, bytes, 'block-status');
    return this.image.blockStatus(offset, bytes);
  }

  override hasZeroInit(): boolean {
    return this.image.hasZeroInit();
  }

  override nodeInfo() {
    return this.image.nodeInfo();
  }

  /** blkdebug is a protocol driver that cannot tell (bdrv_get_allocated_file_size: -ENOTSUP). */
  override async actualSize(): Promise<number | undefined> {
    return undefined;
  }

  imageInfo(): ImageInfo {
    const i = this.image.imageInfo();
    // With a config file over a plain file, QEMU names the node by the legacy filename.
    const filename = this.configFile !== undefined && !i.filename.startsWith('json:') ? `blkdebug:${this.configFile}:${i.filename}` : i.filename;
    return { filename, format: 'blkdebug', 'virtual-size': this.length(), 'dirty-flag': false };
  }
}

const BlkdebugEventSchema = enumOf('BlkdebugEvent', BLKDEBUG_EVENTS);
const BlockPermission = enumOf('BlockPermission', ['consistent-read', 'write', 'write-unchanged', 'resize']);

function checkLimit(opts: Record<string, unknown>, name: string, align: number): number {
  const v = (opts[name] as number | undefined) ?? 0;
  if (v && (v < 0 || v >= INT_MAX || v % align !== 0)) throw genericError(`Cannot meet constraints with ${name} ${v}`);
  return v;
}

/** The options of each section of a config file, and how to read their values. */
const CONFIG_SECTIONS: Record<'inject-error' | 'set-state', Record<string, 'event' | 'int' | 'bool' | 'iotype'>> = {
  'inject-error': { event: 'event', state: 'int', iotype: 'iotype', errno: 'int', sector: 'int', once: 'bool', immediately: 'bool' },
  'set-state': { event: 'event', state: 'int', new_state: 'int' },
};

/**
 * Read a blkdebug config file (QEMU's config format: `[section]` headers, `name = "value"` lines, `#`
 * comments) into inject-error and set-state rule options, with QEMU's messages for what it refuses.
 */
async function readConfig(file: string): Promise<Record<'inject-error' | 'set-state', Record<string, unknown>[]>> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    throw genericError(`Could not read blkdebug config file: ${strerror(errorCode(err))}`);
  }
  const out: Record<'inject-error' | 'set-state', Record<string, unknown>[]> = { 'inject-error': [], 'set-state': [] };
  let section: Record<string, unknown> | undefined;
  let kinds: Record<string, string> | undefined;
  const lines = text.split('\n');
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n].trim();
    if (line === '' || line.startsWith('#')) continue;
    const header = /^\[([^\]"]+)\]$/.exec(line);
    if (header) {
      const name = header[1].trim();
      if (name !== 'inject-error' && name !== 'set-state') throw genericError(`${file}:${n + 1}: no group definition for '${name}'`);
      section = {};
      kinds = CONFIG_SECTIONS[name];
      out[name].push(section);
      continue;
    }
    const kv = /^([A-Za-z0-9_-]+)\s*=\s*"([^"]*)"$/.exec(line);
    if (!kv || !section || !kinds) throw genericError(`${file}:${n + 1}: parse error`);
    const [, key, raw] = kv;
    const kind = kinds[key];
    if (!kind) throw genericError(`Invalid parameter '${key}'`);
    if (kind === 'event') {
      if (!(BLKDEBUG_EVENTS as readonly string[]).includes(raw)) throw genericError(`Invalid event name "${raw}"`);
      section[key] = raw;
    } else if (kind === 'iotype') {
      if (!(BLKDEBUG_IO_TYPES as readonly string[]).includes(raw)) throw genericError(`Parameter 'iotype' does not accept value '${raw}'`);
      section[key] = raw;
    } else if (kind === 'bool') {
      if (raw !== 'on' && raw !== 'off' && raw !== 'yes' && raw !== 'no' && raw !== 'true' && raw !== 'false') throw genericError(`Parameter '${key}' expects 'on' or 'off'`);
      section[key] = raw === 'on' || raw === 'yes' || raw === 'true';
    } else {
      if (!/^-?(0x[0-9a-fA-F]+|\d+)$/.test(raw)) throw genericError(`Parameter '${key}' expects a number`);
      section[key] = Number(raw);
    }
  }
  for (const [name, list] of Object.entries(out)) {
    for (const r of list) if (r.event === undefined) throw genericError(`Parameter 'event' is missing in ${name}`);
  }
  return out;
}

export const blkdebugDriver: BlockDriver = {
  name: 'blkdebug',
  options: {
    image: BlockdevRef,
    '*config': str,
    '*align': int,
    '*max-transfer': int,
    '*opt-write-zero': int,
    '*max-write-zero': int,
    '*opt-discard': int,
    '*max-discard': int,
    '*inject-error': arrayOf(
      object('BlkdebugInjectErrorOptions', {
        event: BlkdebugEventSchema,
        '*state': int,
        '*iotype': enumOf('BlkdebugIOType', BLKDEBUG_IO_TYPES),
        '*errno': int,
        '*sector': int,
        '*once': bool,
        '*immediately': bool,
      }),
    ),
    '*set-state': arrayOf(
      object('BlkdebugSetStateOptions', {
        event: BlkdebugEventSchema,
        '*state': int,
        new_state: int,
      }),
    ),
    '*take-child-perms': arrayOf(BlockPermission),
    '*unshare-child-perms': arrayOf(BlockPermission),
  },
  async open(nodeName, opts, ctx) {
    // The config file's rules come before the options' (QEMU reads both into one list, file first).
    const config = opts.config as string | undefined;
    const fromFile = config !== undefined ? await readConfig(config) : { 'inject-error': [], 'set-state': [] };
    const rules: Rule[] = [];
    for (const r of [...fromFile['inject-error'], ...((opts['inject-error'] ?? []) as Record<string, unknown>[])]) {
      const sector = r.sector as number | undefined;
      rules.push({
        kind: 'inject',
        event: r.event as BlkdebugEvent,
        state: (r.state as number | undefined) ?? 0,
        iotypes: new Set(r.iotype !== undefined ? [r.iotype as BlkdebugIOType] : DEFAULT_IOTYPES),
        errno: (r.errno as number | undefined) ?? 5,
        once: r.once === true,
        immediately: r.immediately === true,
        offset: sector === undefined || sector === -1 ? undefined : sector * SECTOR,
      });
    }
    for (const r of [...fromFile['set-state'], ...((opts['set-state'] ?? []) as Record<string, unknown>[])]) {
      rules.push({
        kind: 'set-state',
        event: r.event as BlkdebugEvent,
        state: (r.state as number | undefined) ?? 0,
        newState: r.new_state as number,
      });
    }
    const align = (opts.align as number | undefined) ?? 0;
    if (align && (align < 0 || align >= INT_MAX || (align & (align - 1)) !== 0)) {
      throw genericError(`Cannot meet constraints with align ${align}`);
    }
    const image = await ctx.openChild(opts.image, opts['read-only'] as boolean, 'image', 'filtered');
    const effective = Math.max(align, image.requestAlignment);
    checkLimit(opts, 'max-transfer', effective);
    const optWriteZero = checkLimit(opts, 'opt-write-zero', effective);
    checkLimit(opts, 'max-write-zero', Math.max(optWriteZero, effective));
    const optDiscard = checkLimit(opts, 'opt-discard', effective);
    checkLimit(opts, 'max-discard', Math.max(optDiscard, effective));
    const node = new BlkdebugNode(nodeName, opts['read-only'] as boolean, image, rules, align || 1, config);
    node.debugEvent('none');
    return node;
  },
};
