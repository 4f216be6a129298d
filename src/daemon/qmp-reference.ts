/**
 * The text of docs/qmp-reference.md for this daemon: its command table and registered block drivers
 * (blockdev-add's variants) through commands/reference.ts. Used by scripts/gen-qmp-reference.mjs and
 * by the test that keeps the committed file current.
 */
import { Core } from '../core/core.js';
import { allCommands } from '../commands/index.js';
import { qmpReferenceMarkdown } from '../commands/reference.js';
import { BLOCK_DRIVERS } from './drivers.js';

export function qmpReference(): string {
  const core = new Core();
  for (const d of BLOCK_DRIVERS) core.graph.registerDriver(d);
  return qmpReferenceMarkdown(allCommands(), core);
}
