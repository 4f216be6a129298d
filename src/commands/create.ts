/**
 * blockdev-create {job-id, options: BlockdevCreateOptions}: starts a create job (jobs/create.ts) that
 * runs the driver's create (BlockDriver.create). Today `file` (preallocation off|full|falloc; metadata
 * fails as in QEMU's file driver) and `qcow2` (on a node given by name or inline). Every other driver
 * QEMU knows is accepted by the union and refused with "Driver does not support blockdev-create", as
 * QEMU refuses raw and null-co.
 */
import { genericError } from '../errors.js';
import { any, str, visit } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import { CreateJob } from '../jobs/create.js';

export const createCommands: CommandDef[] = [
  command('blockdev-create', { 'job-id': str, options: any }, (args, core) => {
    const opts = visit(core.graph.createOptionsSchema(), args.options, 'options') as Record<string, unknown>;
    // Refused before a job exists, as QEMU's qmp_blockdev_create does.
    if (!core.graph.canCreate(opts.driver as string)) throw genericError('Driver does not support blockdev-create');
    const job = new CreateJob(core.jobs, args['job-id'] as string, () => core.graph.create(opts));
    job.start();
    return {};
  }),
];
