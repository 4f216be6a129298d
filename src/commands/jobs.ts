/**
 * Job commands (reference §5): query-jobs, query-block-jobs, the generic job-* verbs, the block-job-*
 * family and block-job-change. job-* look jobs up by id ("Job not found"); block-job-* see only block
 * jobs (DeviceNotActive "Block job 'x' not found", also for a create job, as QEMU 7.2 answers).
 */
import { genericError } from '../errors.js';
import { bool, enumOf, int, str, visit, type Schema } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import { JOB_TYPES } from '../jobs/job.js';

/** BlockJobChangeOptions: a union on the job type; only mirror has members (copy-mode). */
const BLOCK_JOB_CHANGE_OPTIONS: Schema = {
  kind: 'union',
  name: 'BlockJobChangeOptions',
  base: { id: str, type: enumOf('JobType', JOB_TYPES) },
  discriminator: 'type',
  variants: { mirror: { 'copy-mode': enumOf('MirrorCopyMode', ['background', 'write-blocking']) } },
};

export const jobCommands: CommandDef[] = [
  command('query-jobs', {}, (_args, core) => core.jobs.all().map((j) => j.jobInfo())),
  command('query-block-jobs', {}, (_args, core) => core.jobs.blockJobs().map((j) => j.blockJobInfo())),

  // ---- generic job verbs ----
  command('job-pause', { id: str }, (args, core) => {
    core.jobs.find(args.id as string).userPause();
    return {};
  }),
  command('job-resume', { id: str }, (args, core) => {
    core.jobs.find(args.id as string).userResume();
    return {};
  }),
  command('job-cancel', { id: str }, async (args, core) => {
    await core.jobs.find(args.id as string).cancel(true);
    return {};
  }),
  command('job-complete', { id: str }, async (args, core) => {
    await core.jobs.find(args.id as string).complete();
    return {};
  }),
  command('job-finalize', { id: str }, async (args, core) => {
    await core.jobs.find(args.id as string).finalize();
    return {};
  }),
  command('job-dismiss', { id: str }, (args, core) => {
    core.jobs.find(args.id as string).dismiss();
    return {};
  }),

  // ---- block-job family ----
  command('block-job-set-speed', { device: str, speed: int }, (args, core) => {
    core.jobs.findBlockJob(args.device as string).setSpeed(args.speed as number);
    return {};
  }),
  command('block-job-cancel', { device: str, '*force': bool }, async (args, core) => {
    const device = args.device as string;
    const force = (args.force as boolean | undefined) ?? false;
    const job = core.jobs.findBlockJob(device);
    if (job.userPaused && !force) throw genericError(`The block job for device '${device}' is currently paused`);
    await job.cancel(force);
    return {};
  }),
  command('block-job-pause', { device: str }, (args, core) => {
    core.jobs.findBlockJob(args.device as string).userPause();
    return {};
  }),
  command('block-job-resume', { device: str }, (args, core) => {
    core.jobs.findBlockJob(args.device as string).userResume();
    return {};
  }),
  command('block-job-complete', { device: str }, async (args, core) => {
    await core.jobs.findBlockJob(args.device as string).complete();
    return {};
  }),
  command('block-job-finalize', { id: str }, async (args, core) => {
    await core.jobs.findBlockJob(args.id as string).finalize();
    return {};
  }),
  command('block-job-dismiss', { id: str }, (args, core) => {
    core.jobs.findBlockJob(args.id as string).dismiss();
    return {};
  }),
  command(
    'block-job-change',
    {},
    async (args, core) => {
      const opts = visit(BLOCK_JOB_CHANGE_OPTIONS, args, '') as Record<string, unknown>;
      const job = core.jobs.findBlockJob(opts.id as string);
      if (job.type !== opts.type) throw genericError(`Job '${job.id}' is '${job.type}' job, not '${String(opts.type)}'`);
      await job.change(opts);
      return {};
    },
    { boxed: () => BLOCK_JOB_CHANGE_OPTIONS },
  ),
];
