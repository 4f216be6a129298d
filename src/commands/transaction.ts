/**
 * `transaction` (reference §2.5): run several actions all-or-nothing. Each action kind makes a state
 * with prepare/commit/abort/clean, run by base/transaction.ts: prepares run in order, and the first
 * failure aborts every action prepared so far, the failing one included, in reverse order, then cleans
 * them all. Otherwise every action commits, in order, then cleans.
 *
 * Kinds register themselves with registerTransactionAction(), so backup and snapshot actions can be
 * added by their own modules; the argument schema (the TransactionAction union) is built from the
 * registered kinds when first read after a kind is added.
 */
import { genericError } from '../errors.js';
import { enumOf, object, type Members, type Schema } from '../qapi/schema.js';
import type { CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import {
  BLOCK_DIRTY_BITMAP,
  BLOCK_DIRTY_BITMAP_ADD,
  BLOCK_DIRTY_BITMAP_MERGE,
  addAction,
  clearAction,
  disableAction,
  enableAction,
  mergeAction,
  removeAction,
} from './bitmaps.js';
import { runAllOrNothing, type TransactionAction } from '../base/transaction.js';

export type CompletionMode = 'individual' | 'grouped';

/** What every action of one transaction shares. */
export interface TransactionContext {
  readonly core: Core;
  readonly completionMode: CompletionMode;
  /** Per-transaction scratch space for kinds that coordinate (e.g. a job group for grouped backups). */
  readonly shared: Map<string, unknown>;
}

export interface TransactionActionKind {
  /** The TransactionActionKind value ("block-dirty-bitmap-add"). */
  readonly type: string;
  /** QAPI name of the data type, for errors and the schema ("BlockDirtyBitmapAdd"). */
  readonly dataType: string;
  /** Members of `data`: the same as the command's arguments. */
  readonly data: Members;
  /** Whether completion-mode=grouped is allowed (backup actions only, as in QEMU). */
  readonly supportsGrouped?: boolean;
  /** Build the state for one action; nothing may happen before prepare(). */
  create(data: Record<string, unknown>, ctx: TransactionContext): TransactionAction;
}

const kinds = new Map<string, TransactionActionKind>();
/** The transaction command's arguments, built once per set of kinds (not on every request). */
let argsCache: Members | undefined;

/** Add an action kind (backup, snapshot, …). Kinds appear in the schema in registration order. */
export function registerTransactionAction(kind: TransactionActionKind): void {
  kinds.set(kind.type, kind);
  argsCache = undefined;
}

function transactionActionSchema(): Schema {
  const variants: Record<string, Members> = {};
  for (const k of kinds.values()) variants[k.type] = { data: object(k.dataType, k.data) };
  return {
    kind: 'union',
    name: 'TransactionAction',
    base: { type: enumOf('TransactionActionKind', [...kinds.keys()]) },
    discriminator: 'type',
    variants,
  };
}

function transactionArgs(): Members {
  return (argsCache ??= {
    actions: { kind: 'array', of: transactionActionSchema() },
    '*properties': object('TransactionProperties', { '*completion-mode': enumOf('ActionCompletionMode', ['individual', 'grouped']) }),
  });
}

/** A state that checks completion-mode before the action's own prepare (action_check_completion_mode). */
function withModeCheck(kind: TransactionActionKind, ctx: TransactionContext, inner: TransactionAction): TransactionAction {
  if (kind.supportsGrouped || ctx.completionMode === 'individual') return inner;
  return {
    prepare() {
      throw genericError(`Action '${kind.type}' does not support Transaction property completion-mode = ${ctx.completionMode}`);
    },
  };
}

/**
 * Run actions ({type, data} as checked by the schema) all-or-nothing. Exported for callers that
 * build transactions in code (CLI workflows).
 */
export async function runTransaction(core: Core, actions: Array<{ type: string; data: Record<string, unknown> }>, completionMode: CompletionMode = 'individual'): Promise<void> {
  const ctx: TransactionContext = { core, completionMode, shared: new Map() };
  // Each state is built only after the previous action prepared, as QEMU does.
  function* states(): Generator<TransactionAction> {
    for (const a of actions) {
      const kind = kinds.get(a.type);
      if (!kind) throw genericError(`Parameter 'type' does not accept value '${a.type}'`);
      yield withModeCheck(kind, ctx, kind.create(a.data ?? {}, ctx));
    }
  }
  await runAllOrNothing(states());
}

// ---- the built-in kinds ---------------------------------------------------------------------------

registerTransactionAction({
  type: 'abort',
  dataType: 'Abort',
  data: {},
  // QEMU's abort action does not check completion-mode: it always fails with its own message.
  supportsGrouped: true,
  create: () => ({
    prepare() {
      throw genericError('Transaction aborted using Abort action');
    },
  }),
});

const bitmapKinds: Array<[string, string, Members, (core: Core, data: Record<string, unknown>) => TransactionAction]> = [
  ['block-dirty-bitmap-add', 'BlockDirtyBitmapAdd', BLOCK_DIRTY_BITMAP_ADD, addAction],
  ['block-dirty-bitmap-remove', 'BlockDirtyBitmap', BLOCK_DIRTY_BITMAP, removeAction],
  ['block-dirty-bitmap-clear', 'BlockDirtyBitmap', BLOCK_DIRTY_BITMAP, clearAction],
  ['block-dirty-bitmap-enable', 'BlockDirtyBitmap', BLOCK_DIRTY_BITMAP, enableAction],
  ['block-dirty-bitmap-disable', 'BlockDirtyBitmap', BLOCK_DIRTY_BITMAP, disableAction],
  ['block-dirty-bitmap-merge', 'BlockDirtyBitmapMerge', BLOCK_DIRTY_BITMAP_MERGE, mergeAction],
];
for (const [type, dataType, data, make] of bitmapKinds) {
  registerTransactionAction({ type, dataType, data, create: (d, ctx) => make(ctx.core, d) });
}

const transactionCommand: CommandDef = {
  name: 'transaction',
  get args(): Members {
    return transactionArgs();
  },
  async handler(args, core) {
    const props = (args.properties ?? {}) as { 'completion-mode'?: CompletionMode };
    await runTransaction(core, args.actions as Array<{ type: string; data: Record<string, unknown> }>, props['completion-mode'] ?? 'individual');
  },
};

export const transactionCommands: CommandDef[] = [transactionCommand];
