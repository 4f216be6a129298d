/**
 * Dirty bitmap commands (reference §2.1): block-dirty-bitmap-add|remove|clear|enable|disable|merge and
 * x-debug-block-dirty-bitmap-sha256, with QEMU's lookups, checks and messages. Each operation is also
 * a transaction action (prepare/commit/abort/clean, reference §2.5) that transaction.ts registers.
 */
import { genericError } from '../errors.js';
import { alternate, bool, object, str, uint32, type Members } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode } from '../block/node.js';
import type { DirtyBitmap } from '../bitmap/dirty-bitmap.js';
import { BITMAP_DEFAULT } from '../bitmap/dirty-bitmap.js';
import type { HBitmap } from '../base/hbitmap.js';
import { runAllOrNothing, type TransactionAction } from '../base/transaction.js';

// ---- argument schemas -----------------------------------------------------------------------------

export const BLOCK_DIRTY_BITMAP: Members = { node: str, name: str };
export const BLOCK_DIRTY_BITMAP_ADD: Members = { node: str, name: str, '*granularity': uint32, '*persistent': bool, '*disabled': bool };
const BLOCK_DIRTY_BITMAP_OR_STR = alternate('BlockDirtyBitmapOrStr', str, object('BlockDirtyBitmap', BLOCK_DIRTY_BITMAP));
export const BLOCK_DIRTY_BITMAP_MERGE: Members = { node: str, target: str, bitmaps: { kind: 'array', of: BLOCK_DIRTY_BITMAP_OR_STR } };

// ---- lookups --------------------------------------------------------------------------------------

/**
 * block_dirty_bitmap_lookup: the node (by node-name) and its named bitmap. Unlike blockdev lookups
 * the message is "Node 'x' not found".
 */
export function lookupBitmap(core: Core, nodeName: string, name: string): { node: BlockNode; bitmap: DirtyBitmap } {
  const node = core.graph.find(nodeName);
  if (!node) throw genericError(`Node '${nodeName}' not found`);
  return { node, bitmap: core.bitmaps.get(node, name) };
}

// ---- the operations, as transaction actions --------------------------------------------------------

export function addAction(core: Core, a: Record<string, unknown>): TransactionAction {
  let created: DirtyBitmap | undefined;
  return {
    async prepare() {
      const name = a.name as string;
      if (name === '') throw genericError('Bitmap name cannot be empty');
      const node = core.graph.lookup(a.node as string);
      created = await core.bitmaps.add(node, name, {
        granularity: a.granularity as number | undefined,
        persistent: a.persistent as boolean | undefined,
        disabled: a.disabled as boolean | undefined,
      });
    },
    abort() {
      if (created) core.bitmaps.release(created);
    },
  };
}

export function removeAction(core: Core, a: Record<string, unknown>): TransactionAction {
  let bm: DirtyBitmap | undefined;
  return {
    async prepare() {
      const { bitmap } = lookupBitmap(core, a.node as string, a.name as string);
      await core.bitmaps.remove(bitmap, false);
      bm = bitmap;
      bm.skipStore = true;
      bm.busy = true;
    },
    commit() {
      if (!bm) return;
      bm.busy = false;
      core.bitmaps.release(bm);
    },
    abort() {
      if (!bm) return;
      bm.skipStore = false;
      bm.busy = false;
    },
  };
}

export function clearAction(core: Core, a: Record<string, unknown>): TransactionAction {
  let bm: DirtyBitmap | undefined;
  let backup: HBitmap | undefined;
  return {
    prepare() {
      const { bitmap } = lookupBitmap(core, a.node as string, a.name as string);
      backup = core.bitmaps.clear(bitmap, true);
      bm = bitmap;
    },
    abort() {
      if (bm && backup) bm.restore(backup);
    },
    clean() {
      backup = undefined;
    },
  };
}

function enableDisableAction(core: Core, a: Record<string, unknown>, enable: boolean): TransactionAction {
  let bm: DirtyBitmap | undefined;
  let wasDisabled = false;
  return {
    prepare() {
      const { bitmap } = lookupBitmap(core, a.node as string, a.name as string);
      wasDisabled = bitmap.disabled;
      if (enable) core.bitmaps.enable(bitmap);
      else core.bitmaps.disable(bitmap);
      bm = bitmap;
    },
    abort() {
      if (bm) bm.disabled = wasDisabled;
    },
  };
}

export function enableAction(core: Core, a: Record<string, unknown>): TransactionAction {
  return enableDisableAction(core, a, true);
}

export function disableAction(core: Core, a: Record<string, unknown>): TransactionAction {
  return enableDisableAction(core, a, false);
}

/**
 * block_dirty_bitmap_merge: OR the sources into an anonymous scratch bitmap of the target's
 * granularity, then that into the target, so that the target is unchanged on any error. Sources are
 * names on `node` or {node, name} anywhere.
 */
export function mergeAction(core: Core, a: Record<string, unknown>): TransactionAction {
  let dst: DirtyBitmap | undefined;
  let backup: HBitmap | undefined;
  return {
    prepare() {
      const { node, bitmap: target } = lookupBitmap(core, a.node as string, a.target as string);
      target.check(BITMAP_DEFAULT);
      const scratch = core.bitmaps.create(node, undefined, target.granularity, { disabled: true });
      try {
        for (const s of a.bitmaps as Array<string | { node: string; name: string }>) {
          let src: DirtyBitmap | undefined;
          if (typeof s === 'string') {
            src = core.bitmaps.find(node, s);
            if (!src) throw genericError(`Dirty bitmap '${s}' not found`);
          } else {
            src = lookupBitmap(core, s.node, s.name).bitmap;
          }
          core.bitmaps.merge(scratch, src);
        }
        backup = core.bitmaps.merge(target, scratch, true);
        dst = target;
      } finally {
        core.bitmaps.release(scratch);
      }
    },
    abort() {
      if (dst && backup) dst.restore(backup);
    },
    clean() {
      backup = undefined;
    },
  };
}

/** Run one action on its own (the command outside a transaction): a transaction of one. */
function runAlone(action: TransactionAction): Promise<void> {
  return runAllOrNothing([action]);
}

// ---- commands -------------------------------------------------------------------------------------

export const bitmapCommands: CommandDef[] = [
  command('block-dirty-bitmap-add', BLOCK_DIRTY_BITMAP_ADD, async (args, core) => {
    await runAlone(addAction(core, args));
  }),
  command('block-dirty-bitmap-remove', BLOCK_DIRTY_BITMAP, async (args, core) => {
    const { bitmap } = lookupBitmap(core, args.node as string, args.name as string);
    await core.bitmaps.remove(bitmap, true);
  }),
  command('block-dirty-bitmap-clear', BLOCK_DIRTY_BITMAP, async (args, core) => {
    const { bitmap } = lookupBitmap(core, args.node as string, args.name as string);
    core.bitmaps.clear(bitmap);
  }),
  command('block-dirty-bitmap-enable', BLOCK_DIRTY_BITMAP, async (args, core) => {
    await runAlone(enableAction(core, args));
  }),
  command('block-dirty-bitmap-disable', BLOCK_DIRTY_BITMAP, async (args, core) => {
    await runAlone(disableAction(core, args));
  }),
  command('block-dirty-bitmap-merge', BLOCK_DIRTY_BITMAP_MERGE, async (args, core) => {
    await runAlone(mergeAction(core, args));
  }),
  command('x-debug-block-dirty-bitmap-sha256', BLOCK_DIRTY_BITMAP, (args, core) => {
    const { bitmap } = lookupBitmap(core, args.node as string, args.name as string);
    return { sha256: bitmap.sha256() };
  }),
];
