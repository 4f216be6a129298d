/**
 * Carrying dirty bitmaps across a change of the backing chain: the named bitmaps of the layers that
 * leave the guest's path (a mirror's source chain at its pivot, the layers a commit removes, …) are
 * put onto the node that takes their place, merged across layers by name, so that no write a bitmap
 * recorded is forgotten and every later write is recorded on the node that now takes the writes.
 *
 * How to use it (one primitive for every chain change; mirror's `__org.bitmirror_carry-bitmaps`,
 * block-commit and block-stream use it):
 *
 *   const plan = await planCarry(bitmaps, layers, destination); // validates; throws QmpError, changes nothing
 *   …wait until no write is in flight on the layers (a write recorded only on a layer after the
 *    carry would be recorded nowhere on the destination)…
 *   const done = commitCarry(bitmaps, plan);   // synchronous: re-checks, then carries (throws with nothing changed)
 *   switchTheGraph();                          // in the same synchronous block: no write can slip between
 *   // if the caller's own step fails later: done.undo()
 *
 * or, when the switch is itself synchronous and nothing has to be waited for in between,
 * `await carryBitmaps(bitmaps, layers, destination, switchTheGraph)`.
 *
 * `layers` are the nodes whose bitmaps move, top first (sourceChainLayers() lists a chain's); the
 * destination may be one of them (a commit's base): its own bitmaps then stay and the others are merged in.
 *
 * Rules (README, "Carrying dirty bitmaps"):
 * - Every named bitmap of the layers is carried; bitmaps of one name in several layers become one
 *   bitmap holding the union of their bits. Its granularity, persistence and enabled state are those
 *   of the topmost layer that has it. Anonymous bitmaps (jobs' own) stay where they are.
 * - A bitmap that is inconsistent or in use by another operation (busy) cannot be carried.
 * - A persistent bitmap needs a destination that can store it (qcow2 v3, writable, within qcow2's
 *   limits); a raw destination refuses it with QEMU's words ("Can't store persistent bitmaps to …").
 * - A name the destination already has: when that bitmap has the same granularity and persistence and
 *   may be modified, the carried bits are merged into it (the union: nothing recorded is forgotten) and
 *   it takes the carried enabled state; otherwise the carry is refused. The destination's other
 *   bitmaps are left alone.
 * - The layers keep their bitmaps (a carry copies): if the layers are used again, nothing is lost there.
 * - Bitmaps of different sizes merge over the destination's length: a smaller layer's bitmap covers
 *   its own length, bits beyond the destination's end are dropped.
 */
import { genericError, type QmpError } from '../errors.js';
import type { BlockNode } from '../block/node.js';
import { persistentStore } from '../block/bitmap-store.js';
import { FilterNode } from '../block/filters/filter.js';
import { BITMAP_BUSY, BITMAP_DEFAULT, BITMAP_INCONSISTENT, type DirtyBitmap } from './dirty-bitmap.js';
import type { BitmapManager } from './manager.js';
import type { HBitmap } from '../base/hbitmap.js';

/** One bitmap the destination gets: the layers' bitmaps of one name, merged. */
export interface CarriedBitmap {
  readonly name: string;
  readonly granularity: number;
  readonly persistent: boolean;
  readonly enabled: boolean;
  /** The layers' bitmaps of this name, top first. */
  readonly sources: readonly DirtyBitmap[];
  /** The destination's bitmap of this name, merged into (the clash rule); undefined: a new one is made. */
  readonly existing?: DirtyBitmap;
}

/** What planCarry checked and commitCarry does. */
export interface CarryPlan {
  readonly layers: readonly BlockNode[];
  readonly destination: BlockNode;
  readonly bitmaps: readonly CarriedBitmap[];
}

/** The outcome of commitCarry. */
export interface CarryDone {
  /** The destination's bitmaps that now hold the carried bits (new or merged into), in plan order. */
  readonly carried: DirtyBitmap[];
  /** Take the carry back (the caller's later step failed): new bitmaps released, merged ones restored. */
  undo(): void;
}

/**
 * The nodes of a chain from `top` down to (not including) `base`: `top`, the filters below it and
 * each layer's format node, top first — the nodes whose bitmaps a chain change carries. Without
 * `base` the whole chain.
 */
export function sourceChainLayers(top: BlockNode, base?: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  const add = (n: BlockNode) => {
    if (!out.includes(n)) out.push(n);
  };
  for (let n: BlockNode | undefined = top; n && n !== base; ) {
    // A filter and the nodes below it down to the format node are one layer: each may hold bitmaps.
    for (let f: BlockNode = n; ; f = (f as FilterNode).filtered) {
      if (f === base) return out;
      add(f);
      if (f === f.formatLayer() || !(f instanceof FilterNode)) break;
    }
    const next: BlockNode | undefined = n.formatLayer().backing();
    if (!next || next === base || next.formatLayer() === base) break;
    n = next;
  }
  return out;
}

function refusal(bm: { name: string }, layer: BlockNode, destination: BlockNode, why: string): QmpError {
  return genericError(`Cannot carry dirty bitmap '${bm.name}' of node '${layer.nodeName}' to node '${destination.nodeName}': ${why}`);
}

function why(check: () => void): string | undefined {
  try {
    check();
    return undefined;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
}

/** The layers' named bitmaps grouped by name, in the order a top-down walk meets them. */
function collect(manager: BitmapManager, layers: readonly BlockNode[], destination: BlockNode): Map<string, DirtyBitmap[]> {
  const byName = new Map<string, DirtyBitmap[]>();
  for (const layer of layers) {
    if (layer === destination) continue;
    // The manager lists newest first; a carry keeps the layer's creation order (oldest first).
    for (const bm of manager.list(layer).reverse()) {
      if (bm.name === undefined) continue;
      const list = byName.get(bm.name);
      if (list) list.push(bm);
      else byName.set(bm.name, [bm]);
    }
  }
  return byName;
}

/** The checks that need no I/O: the layers' bitmaps and the destination's clashes. Throws the first refusal. */
function checkSync(manager: BitmapManager, destination: BlockNode, name: string, sources: readonly DirtyBitmap[]): DirtyBitmap | undefined {
  const top = sources[0];
  for (const bm of sources) {
    const w = why(() => bm.check(BITMAP_BUSY | BITMAP_INCONSISTENT));
    if (w) throw refusal({ name }, bm.node, destination, w);
  }
  const existing = manager.find(destination, name);
  if (existing) {
    const clash = (what: string) => refusal({ name }, top.node, destination, `node '${destination.nodeName}' already has a bitmap '${name}' ${what}`);
    if (existing.granularity !== top.granularity) throw clash(`with granularity ${existing.granularity} (carried: ${top.granularity})`);
    if (existing.persistent !== top.persistent) throw clash(existing.persistent ? 'that is persistent (carried: not persistent)' : 'that is not persistent (carried: persistent)');
    const w = why(() => existing.check(BITMAP_DEFAULT));
    if (w) throw clash(`that cannot be merged into: ${w}`);
  }
  return existing;
}

/**
 * Check that every named bitmap of `layers` can be carried onto `destination` and say how. Throws the
 * first refusal (QmpError, GenericError) and changes nothing.
 */
export async function planCarry(manager: BitmapManager, layers: readonly BlockNode[], destination: BlockNode): Promise<CarryPlan> {
  const planned: CarriedBitmap[] = [];
  const newPersistent: string[] = [];
  for (const [name, sources] of collect(manager, layers, destination)) {
    const top = sources[0];
    const existing = checkSync(manager, destination, name, sources);
    if (top.persistent && !existing) {
      const store = persistentStore(destination);
      if (!store) throw refusal({ name }, top.node, destination, `Can't store persistent bitmaps to ${destination.nodeName}: Operation not supported`);
      if (destination.readOnly) throw refusal({ name }, top.node, destination, `node '${destination.nodeName}' is read-only`);
      // The destination's persistent bitmaps and the ones carried before this one count toward the limits.
      const names = [
        ...manager
          .list(destination)
          .filter((b) => b.persistent && b.name !== undefined)
          .map((b) => b.name!),
        ...newPersistent,
      ];
      try {
        await store.canStoreNewDirtyBitmap(name, top.granularity, names);
      } catch (err) {
        throw refusal({ name }, top.node, destination, err instanceof Error ? err.message : String(err));
      }
      newPersistent.push(name);
    }
    planned.push({ name, granularity: top.granularity, persistent: top.persistent, enabled: top.recording, sources, existing });
  }
  return { layers: [...layers], destination, bitmaps: planned };
}

/** OR `src` into `dst` over dst's length (sizes may differ along a chain). */
function mergeBits(dst: DirtyBitmap, src: DirtyBitmap): void {
  if (src.size === dst.size) {
    dst.hbitmap.merge(src.hbitmap);
    return;
  }
  for (const a of src.dirtyAreas(0, Math.min(src.size, dst.size))) dst.setDirty(a.offset, Math.min(a.bytes, dst.size - a.offset));
}

/**
 * Carry as planned, synchronously: first check again what may have changed since planCarry (a bitmap
 * removed, made busy, a name taken on the destination) and throw with nothing changed; then create
 * or merge into the destination's bitmaps. Call it in the same synchronous block as the switch that
 * sends writes to the destination, once no write is in flight on the layers.
 */
export function commitCarry(manager: BitmapManager, plan: CarryPlan): CarryDone {
  const { destination } = plan;
  const now = collect(manager, plan.layers, destination);
  for (const c of plan.bitmaps) {
    const sources = now.get(c.name);
    const same = sources && sources.length === c.sources.length && sources.every((b, i) => b === c.sources[i]);
    if (!same) throw genericError(`The dirty bitmaps of node '${c.sources[0].node.nodeName}' changed while being carried to node '${destination.nodeName}' (bitmap '${c.name}'); nothing was carried`);
    const existing = checkSync(manager, destination, c.name, sources);
    if (existing !== c.existing) throw genericError(`Node '${destination.nodeName}' got or lost a bitmap '${c.name}' while bitmaps were being carried to it; nothing was carried`);
  }
  for (const name of now.keys()) {
    if (!plan.bitmaps.some((c) => c.name === name)) throw genericError(`Node '${now.get(name)![0].node.nodeName}' got a bitmap '${name}' while bitmaps were being carried to node '${destination.nodeName}'; nothing was carried`);
  }
  const carried: DirtyBitmap[] = [];
  const created: DirtyBitmap[] = [];
  const restore: Array<{ bm: DirtyBitmap; bits: HBitmap; disabled: boolean }> = [];
  for (const c of plan.bitmaps) {
    let dst = c.existing;
    if (dst) restore.push({ bm: dst, bits: dst.cloneBits(), disabled: dst.disabled });
    else {
      dst = manager.create(destination, c.name, c.granularity, { persistent: c.persistent, disabled: !c.enabled });
      created.push(dst);
    }
    for (const src of c.sources) mergeBits(dst, src);
    dst.disabled = !c.enabled;
    carried.push(dst);
  }
  return {
    carried,
    undo() {
      for (const bm of created) manager.release(bm);
      for (const r of restore) {
        r.bm.restore(r.bits);
        r.bm.disabled = r.disabled;
      }
    },
  };
}

/**
 * planCarry, then commitCarry and `atSwitch` in one synchronous block (the carry is undone when
 * `atSwitch` throws). For callers that have nothing to wait for between the checks and the switch.
 */
export async function carryBitmaps(manager: BitmapManager, layers: readonly BlockNode[], destination: BlockNode, atSwitch?: () => void): Promise<CarryDone> {
  const plan = await planCarry(manager, layers, destination);
  const done = commitCarry(manager, plan);
  try {
    atSwitch?.();
  } catch (err) {
    done.undo();
    throw err;
  }
  return done;
}
