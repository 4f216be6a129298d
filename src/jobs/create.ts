/**
 * blockdev-create's job and the `file` driver's image creation.
 *
 * QEMU's create job is not a block job: it emits only JOB_STATUS_CHANGE (no BLOCK_JOB_* events), is not
 * listed by query-block-jobs, and block-job-* commands do not find it. It auto-finalizes and waits for
 * job-dismiss. Its progress is 0/1 until the driver's create has returned, then 1/1 (also on failure).
 * What it creates is the driver's business (BlockDriver.create: the file driver's in drivers/file.ts,
 * qcow2's in drivers/qcow2/); the job only runs it.
 */
import { Job } from './job.js';
import type { JobRegistry } from './registry.js';

export class CreateJob extends Job {
  readonly type = 'create';
  override readonly isBlockJob = false;

  constructor(
    registry: JobRegistry,
    id: string,
    private readonly work: () => Promise<void>,
  ) {
    super(registry, { id, autoFinalize: true, autoDismiss: false });
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(1);
    try {
      await this.work();
    } finally {
      this.progressUpdate(1);
    }
  }
}
