/**
 * Transaction: an all-or-nothing change made of actions, each with prepare / commit / abort / clean.
 * The one mechanism behind the QMP `transaction` command (commands/transaction.ts), job groups
 * (jobs/txn.ts), and reopen and permission updates of the graph. It is what QEMU 7.2's qmp_transaction
 * does with its action states and its Transaction (util/transactions.c) does for graph changes.
 *
 *   const tran = new Transaction();
 *   try {
 *     tran.add(actionA);
 *     await tran.prepare();          // prepares A
 *     tran.add(actionB);
 *     await tran.prepare();          // prepares B (A is not prepared twice)
 *   } catch (err) {
 *     await tran.abort();            // aborts B then A, then cleans A and B
 *     throw err;
 *   }
 *   await tran.commit();             // commits A then B, then cleans A and B
 *
 * Rules:
 * - prepare runs in the order actions were added; the first one that throws stops the preparing, and
 *   the caller aborts.
 * - abort runs for every action added, newest first: the failing action's own abort included (it undoes
 *   whatever its prepare did before it threw), and actions never prepared too (an action added for a
 *   change the caller has already made, without a prepare, is undone this way).
 * - commit runs in the order added (as qmp_transaction commits in QEMU 7.2), or newest first with
 *   `commitNewestFirst` (as QEMU's Transaction in util/transactions.c, and its job groups, do); commit
 *   and abort must not fail. After either, every action's clean runs in the order added. A transaction
 *   ends once.
 */
export interface TransactionAction {
  /** Make the change, or check that it can be made and reserve what it needs. May throw. */
  prepare?(): void | Promise<void>;
  /** Make the prepared change final. */
  commit?(): void | Promise<void>;
  /** Undo what prepare did (all of it, or the part done before it threw). */
  abort?(): void | Promise<void>;
  /** Release what the action held, after commit or abort. */
  clean?(): void | Promise<void>;
}

export interface TransactionOptions {
  /** Commit newest first, like abort (default: in the order added). */
  commitNewestFirst?: boolean;
}

export class Transaction {
  private readonly actions: TransactionAction[] = [];
  private readonly commitNewestFirst: boolean;
  /** How many of `actions` have been prepared (or have begun to). */
  private prepared = 0;
  private ended = false;

  constructor(opts: TransactionOptions = {}) {
    this.commitNewestFirst = opts.commitNewestFirst ?? false;
  }

  /** Add an action. Its prepare runs at the next prepare(); its abort or commit when the transaction ends. */
  add(action: TransactionAction): void {
    this.checkOpen();
    this.actions.push(action);
  }

  /** Prepare every action added since the last prepare(), in order. Throws the first failure: then abort(). */
  async prepare(): Promise<void> {
    this.checkOpen();
    while (this.prepared < this.actions.length) {
      const action = this.actions[this.prepared++];
      await action.prepare?.();
    }
  }

  /** Commit every action (in the order added, or newest first), then clean them. Call after prepare() succeeded. */
  async commit(): Promise<void> {
    this.end();
    for (const a of this.commitNewestFirst ? [...this.actions].reverse() : this.actions) await a.commit?.();
    await this.clean();
  }

  /** Abort every action, newest first, then clean them in the order added. */
  async abort(): Promise<void> {
    this.end();
    for (const a of [...this.actions].reverse()) await a.abort?.();
    await this.clean();
  }

  private async clean(): Promise<void> {
    for (const a of this.actions) await a.clean?.();
  }

  private checkOpen(): void {
    if (this.ended) throw new Error('transaction already ended');
  }

  private end(): void {
    this.checkOpen();
    this.ended = true;
  }
}

/**
 * Run actions all-or-nothing: add and prepare each in turn (an iterable may build the next action only
 * after the previous one prepared); on the first failure abort all added so far and rethrow, otherwise
 * commit all.
 */
export async function runAllOrNothing(actions: Iterable<TransactionAction>): Promise<void> {
  const tran = new Transaction();
  try {
    for (const action of actions) {
      tran.add(action);
      await tran.prepare();
    }
  } catch (err) {
    await tran.abort();
    throw err;
  }
  await tran.commit();
}
