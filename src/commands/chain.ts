/**
 * Commands that edit backing chains in place: `change-backing-file` (QEMU 7.2's checks, order and
 * messages). The snapshot commands and the chain jobs (block-stream, block-commit) build on the
 * same primitives: BlockGraph.setBacking (the graph's link), BlockNode.changeBackingFile (the image's
 * record), BlockGraph.setReadOnly, and block/chain.ts (walking a chain).
 */
import { errorCode, genericError, strerror } from '../errors.js';
import { str } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import type { BlockNode } from '../block/node.js';
import { chainContains, findBase } from '../block/chain.js';
import { checkBusy, rootNode } from './mirror.js';

/** bdrv_lookup_bs(NULL, name): a node by node-name only, QEMU's message naming no device. */
export function nodeByName(core: Core, name: string): BlockNode {
  const node = core.graph.find(name);
  if (!node) throw genericError(`Cannot find device='' nor node-name='${name}'`);
  return node;
}

/**
 * qmp_change_backing_file: `image-node-name` (in the chain of the root node `device`) records
 * `backing-file` as its backing file; a read-only image is reopened read-write for the write and
 * read-only again after. As QEMU 7.2 (and upstream), the format recorded with it is the image's own
 * driver name, not the backing node's.
 */
async function changeBackingFile(core: Core, device: string, imageNodeName: string, backingFile: string): Promise<void> {
  const root = rootNode(core, device);
  const image = nodeByName(core, imageNodeName);
  if (findBase(image) === image) throw genericError('not allowing backing file change on an image without a backing file');
  checkBusy(root, 'change');
  if (!chainContains(root, image)) throw genericError(`'${device}' and image file are not in the same chain`);
  const wasReadOnly = image.readOnly;
  if (wasReadOnly) await core.graph.setReadOnly(image, false);
  let error: unknown;
  try {
    await image.changeBackingFile(backingFile, image.driver);
  } catch (err) {
    error = genericError(`Could not change backing file to '${backingFile}': ${strerror(errorCode(err))}`);
  }
  // The image goes back to read-only whether or not the change was made.
  if (wasReadOnly) await core.graph.setReadOnly(image, true);
  if (error) throw error;
}

export const chainCommands: CommandDef[] = [
  command('change-backing-file', { device: str, 'image-node-name': str, 'backing-file': str }, async (args, core) => {
    await changeBackingFile(core, args.device as string, args['image-node-name'] as string, args['backing-file'] as string);
  }),
];
