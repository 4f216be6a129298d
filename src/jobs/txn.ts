/**
 * Job transactions: a group of jobs that finalizes or aborts together (QEMU's JobTxn). Every job is in
 * one: a job started on its own gets a group of its own. backup's `completion-mode: grouped` puts the
 * jobs of one `transaction` command in a shared group.
 *
 * - A job whose run ends successfully waits ('waiting') until every job of the group has ended; then all
 *   move to 'pending' together. If none of them has auto-finalize=false the group finalizes at once;
 *   otherwise it waits for job-finalize on any one of them.
 * - Finalizing runs every job's prepare(); if one fails the group aborts. Otherwise each job commits,
 *   cleans up, reports BLOCK_JOB_COMPLETED and concludes.
 * - If one job fails or is force-cancelled (also while pending), the group aborts: the other jobs are
 *   force-cancelled, and once every run has ended each job aborts, cleans up, reports
 *   BLOCK_JOB_CANCELLED (or BLOCK_JOB_COMPLETED with its error) and concludes.
 */
import type { Job } from './job.js';

export class JobTxn {
  readonly jobs = new Set<Job>();
  /** Set once the group has started to abort: jobs ending later join the abort. */
  aborting = false;
  /** Serialises finalize and abort, whose hooks may await I/O. */
  private lock: Promise<void> = Promise.resolve();

  add(job: Job): void {
    if (this.aborting) throw new Error('cannot add a job to an aborting transaction');
    this.jobs.add(job);
  }

  private serialised(fn: () => Promise<void>): Promise<void> {
    const run = this.lock.then(fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  /** A job's run ended with success (job_completed_txn_success). */
  async jobSucceeded(job: Job): Promise<void> {
    if (this.aborting) return this.abort(job);
    job.transition('waiting');
    for (const other of this.jobs) if (!other.isCompleted()) return;
    for (const other of this.jobs) other.transitionToPending();
    if ([...this.jobs].every((j) => j.autoFinalize)) await this.finalize();
  }

  /** Finalize the whole group: job-finalize, or automatically (job_do_finalize). */
  finalize(): Promise<void> {
    return this.serialised(async () => {
      if (this.aborting) return;
      const jobs = [...this.jobs];
      for (const job of jobs) {
        try {
          await job.runPrepare();
        } catch (err) {
          job.fail(err);
          job.transition('aborting');
          await this.abortLocked(job);
          return;
        }
      }
      for (const job of jobs) await job.finalizeSingle();
    });
  }

  /** A job failed or was force-cancelled: abort the whole group (job_completed_txn_abort). */
  abort(job: Job): Promise<void> {
    if (this.aborting) return Promise.resolve();
    return this.serialised(() => this.abortLocked(job));
  }

  private async abortLocked(job: Job): Promise<void> {
    if (this.aborting) return;
    this.aborting = true;
    for (const other of this.jobs) if (other !== job && !other.isConcludedOrNull()) other.cancelForTxnAbort();
    for (const other of this.jobs) await other.runEnded;
    for (const other of [...this.jobs]) {
      other.markAborted();
      await other.finalizeSingle();
    }
  }

  remove(job: Job): void {
    this.jobs.delete(job);
  }
}
