/**
 * JobRegistry: every job of a daemon by id, newest first (the order query-jobs lists them, as QEMU's
 * job list does), with QEMU's id checks and lookup errors, and the shutdown path that cancels what is
 * still running.
 */
import { genericError, QmpError } from '../errors.js';
import { idWellFormed } from '../block/graph.js';
import type { EventBus } from '../base/events.js';
import type { Job } from './job.js';

export class JobRegistry {
  /** Newest first. */
  private readonly jobs: Job[] = [];

  constructor(readonly events: EventBus) {}

  /** Check a new job id (job_create): well-formed and not taken. */
  checkNewId(id: string): void {
    if (!idWellFormed(id)) throw genericError(`Invalid job ID '${id}'`);
    if (this.get(id)) throw genericError(`Job ID '${id}' already in use`);
  }

  /** Called by the Job constructor. */
  add(job: Job): void {
    this.checkNewId(job.id);
    this.jobs.unshift(job);
  }

  /** Called when a job is dismissed ('null'). */
  remove(job: Job): void {
    const i = this.jobs.indexOf(job);
    if (i >= 0) this.jobs.splice(i, 1);
  }

  get(id: string): Job | undefined {
    return this.jobs.find((j) => j.id === id);
  }

  /** For job-* commands: "Job not found". */
  find(id: string): Job {
    const j = this.get(id);
    if (!j) throw genericError('Job not found');
    return j;
  }

  /** For block-job-* commands: only block jobs; DeviceNotActive "Block job 'x' not found". */
  findBlockJob(id: string): Job {
    const j = this.get(id);
    if (!j || !j.isBlockJob) throw new QmpError('DeviceNotActive', `Block job '${id}' not found`);
    return j;
  }

  all(): readonly Job[] {
    return [...this.jobs];
  }

  blockJobs(): Job[] {
    return this.jobs.filter((j) => j.isBlockJob);
  }

  /**
   * At shutdown: force-cancel every job that has not concluded and wait (up to `timeoutMs`) until they
   * have, so their abort/clean hooks run before the nodes close (job_cancel_sync_all).
   */
  async cancelAll(timeoutMs = 30_000): Promise<void> {
    const waiting: Array<Promise<void>> = [];
    for (const job of this.all()) {
      if (job.isConcludedOrNull()) continue;
      if (job.status !== 'aborting') await job.cancel(true).catch(() => undefined);
      waiting.push(job.concluded);
    }
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(waiting), new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)))]);
    clearTimeout(timer);
  }
}
