/**
 * The command table: every QMP command bitmirror answers, collected from the per-domain modules.
 */
import type { CommandDef } from './registry.js';
import { blockdevCommands } from './blockdev.js';
import { hmpCommands } from './hmp.js';
import { miscCommands } from './misc.js';
import { bitmapCommands } from './bitmaps.js';
import { transactionCommands } from './transaction.js';
import { jobCommands } from './jobs.js';
import { createCommands } from './create.js';
import { mirrorCommands } from './mirror.js';
import { objectCommands } from './objects.js';
import { qomCommands } from './qom.js';
import { blockStatsCommands } from './block-stats.js';
import { nbdCommands } from './nbd.js';
import { backupCommands } from './backup.js';
import { chainCommands } from './chain.js';
import { commitCommands } from './commit.js';
import { snapshotCommands } from './snapshot.js';
import { streamCommands } from './stream.js';

export function allCommands(): CommandDef[] {
  const table: CommandDef[] = [];
  table.push(...miscCommands(() => table), ...blockdevCommands, ...hmpCommands, ...bitmapCommands, ...transactionCommands, ...jobCommands, ...createCommands, ...mirrorCommands, ...objectCommands, ...qomCommands, ...blockStatsCommands, ...nbdCommands, ...backupCommands, ...chainCommands, ...commitCommands, ...snapshotCommands, ...streamCommands);
  return table;
}
