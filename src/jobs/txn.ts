/**
 * Job transactions: a group of jobs that finalizes or aborts together (QEMU's JobTxn). Every job is in
 * one: a job started on its own gets a group of its own. backup's `completion-mode: grouped` puts the
 * jobs of one `transaction` command in a shared group.
 *
 * - A job whose run ends successfully waits ('waiting') until every job of the group has ended; then all
 *   move to 'pending' together. If none of them has auto-finalize=false the group finalizes at once;
 *   otherwise it waits for job-finalize on any one of them.
 * - Finalizing is a Transaction (base/transaction.ts) with one action per job: every job's prepare runs;
 *   if one fails the group aborts. Otherwise each job commits, cleans up, reports BLOCK_JOB_COMPLETED
 *   and concludes.
 * - If one job fails or is force-cancelled (also while pending), the group aborts: the other jobs are
 *   force-cancelled, and once every run has ended each job aborts, cleans up, reports
 *   BLOCK_JOB_CANCELLED (or BLOCK_JOB_COMPLETED with its error) and concludes.
 *
 * Order, as QEMU 7.2's (checked with two grouped backups on qemu-storage-daemon): the jobs of a group
 * become pending, commit and abort newest first (QEMU keeps the group's list newest first). Prepare
 * runs in the order the jobs joined; only mirror has a prepare step, and mirror is never grouped.
 *
 * The group knows its jobs only as JobTxnMember, the part of a job it drives (Job implements it with
 * private methods), so that Job keeps its finalization steps to itself.
 */
import { Transaction } from '../base/transaction.js';

/** What a job group needs from each of its jobs. */
export interface JobTxnMember {
  readonly autoFinalize: boolean;
  /** Resolves when the job's run has returned or thrown (or it was cancelled before it started). */
  readonly runEnded: Promise<void>;
  /** The run has ended and the job is being or has been finalized (job_is_completed). */
  isCompleted(): boolean;
  isConcludedOrNull(): boolean;
  /** The run ended with success while others of the group still run: 'waiting'. */
  toWaiting(): void;
  /** Every run of the group has ended: 'pending'. */
  toPending(): void;
  /** The job's prepare hook; when it fails, the job has recorded the error and is 'aborting'. */
  prepare(): Promise<void>;
  /** Another job of the group failed: force-cancel this one (no verb checks). */
  cancelForAbort(): void;
  /** commit, clean, the completion event, concluded. */
  finalizeCommitted(): Promise<void>;
  /** Mark the job aborted (cancelled unless it failed itself), then abort, clean, event, concluded. */
  finalizeAborted(): Promise<void>;
}

export class JobTxn {
  private readonly members = new Set<JobTxnMember>();
  /** Set once the group has started to abort: jobs ending later join the abort. */
  aborting = false;
  /** Serialises finalize and abort, whose hooks may await I/O. */
  private lock: Promise<void> = Promise.resolve();

  add(member: JobTxnMember): void {
    if (this.aborting) throw new Error('cannot add a job to an aborting transaction');
    this.members.add(member);
  }

  remove(member: JobTxnMember): void {
    this.members.delete(member);
  }

  private serialised(fn: () => Promise<void>): Promise<void> {
    const run = this.lock.then(fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  /** The finalization of every job of the group as one transaction. */
  private transaction(): Transaction {
    const tran = new Transaction({ commitNewestFirst: true });
    for (const m of this.members) {
      tran.add({ prepare: () => m.prepare(), commit: () => m.finalizeCommitted(), abort: () => m.finalizeAborted() });
    }
    return tran;
  }

  /** A job's run ended with success (job_completed_txn_success). */
  async jobSucceeded(member: JobTxnMember): Promise<void> {
    if (this.aborting) return this.abort(member);
    member.toWaiting();
    for (const other of this.members) if (!other.isCompleted()) return;
    for (const other of [...this.members].reverse()) other.toPending();
    if ([...this.members].every((m) => m.autoFinalize)) await this.finalize();
  }

  /** Finalize the whole group: job-finalize, or automatically (job_do_finalize). */
  finalize(): Promise<void> {
    return this.serialised(async () => {
      if (this.aborting) return;
      const tran = this.transaction();
      try {
        await tran.prepare();
      } catch {
        // The failing job has recorded its error; every job of the group aborts.
        this.aborting = true;
        await tran.abort();
        return;
      }
      await tran.commit();
    });
  }

  /** A job failed or was force-cancelled: abort the whole group (job_completed_txn_abort). */
  abort(member: JobTxnMember): Promise<void> {
    if (this.aborting) return Promise.resolve();
    return this.serialised(async () => {
      if (this.aborting) return;
      this.aborting = true;
      for (const other of this.members) if (other !== member && !other.isConcludedOrNull()) other.cancelForAbort();
      for (const other of this.members) await other.runEnded;
      await this.transaction().abort();
    });
  }
}
