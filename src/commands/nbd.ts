/**
 * NBD server and block export commands (qapi/block-export.json): nbd-server-start, nbd-server-stop,
 * block-export-add (type nbd), block-export-del, query-block-exports, and the legacy nbd-server-add /
 * nbd-server-remove, with QEMU 7.2's arguments, checks and messages; bitmirror's
 * __org.bitmirror_query-nbd-server (where the server listens). The server itself is nbd/server.ts.
 */
import { genericError } from '../errors.js';
import { alternate, arrayOf, bool, enumOf, object, str, uint32, visit, type Members, type Schema } from '../qapi/schema.js';
import { SOCKET_ADDRESS, SOCKET_ADDRESS_LEGACY } from '../qapi/socket-address.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import { idWellFormed } from '../block/graph.js';
import type { NbdAddress } from '../nbd/server.js';
import type { ExportBitmapRef } from '../nbd/export.js';
import { BLOCK_DIRTY_BITMAP } from './bitmaps.js';

// ---- schemas --------------------------------------------------------------------------------------

export { SOCKET_ADDRESS };

const NBD_SERVER_START: Members = { addr: SOCKET_ADDRESS_LEGACY, '*tls-creds': str, '*tls-authz': str, '*max-connections': uint32 };

/** NbdServerOptions: --nbd-server's (the address flat). */
export const NBD_SERVER_OPTIONS: Schema = object('NbdServerOptions', {
  addr: SOCKET_ADDRESS,
  '*tls-creds': str,
  '*tls-authz': str,
  '*max-connections': uint32,
});

const BLOCK_DIRTY_BITMAP_OR_STR = alternate('BlockDirtyBitmapOrStr', str, object('BlockDirtyBitmap', BLOCK_DIRTY_BITMAP));

/** BlockExportOptions: block-export-add's argument and --export's value. */
export const BLOCK_EXPORT_OPTIONS: Schema = {
  kind: 'union',
  name: 'BlockExportOptions',
  base: {
    type: enumOf('BlockExportType', ['nbd', 'vhost-user-blk', 'fuse']),
    id: str,
    '*fixed-iothread': bool,
    '*iothread': str,
    'node-name': str,
    '*writable': bool,
    '*writethrough': bool,
  },
  discriminator: 'type',
  variants: {
    nbd: { '*name': str, '*description': str, '*bitmaps': arrayOf(BLOCK_DIRTY_BITMAP_OR_STR), '*allocation-depth': bool },
    'vhost-user-blk': {},
    fuse: {},
  },
};

const NBD_SERVER_ADD: Members = { device: str, '*name': str, '*description': str, '*writable': bool, '*bitmap': str };
const REMOVE_MODE = enumOf('BlockExportRemoveMode', ['safe', 'hard']);

// ---- handlers -------------------------------------------------------------------------------------

/** The address to listen on, from either form of socket address (`data`-wrapped or flat). */
function nbdAddress(addr: Record<string, unknown>): NbdAddress {
  const data = (addr.data ?? addr) as Record<string, unknown>;
  switch (addr.type) {
    case 'unix':
      if (data.abstract) throw genericError('Abstract unix sockets are not supported');
      return { kind: 'unix', path: data.path as string };
    case 'inet': {
      const port = Number(data.port);
      if (!/^\d+$/.test(String(data.port)) || port > 65535) throw genericError(`Failed to parse port '${String(data.port)}'`);
      return { kind: 'tcp', host: (data.host as string) || '0.0.0.0', port };
    }
    default:
      throw genericError(`Socket address type '${String(addr.type)}' is not supported`);
  }
}

/** nbd-server-start and --nbd-server, after their arguments were checked. */
export async function startNbdServer(core: Core, args: Record<string, unknown>): Promise<void> {
  if (args['tls-creds'] !== undefined) throw genericError(`No TLS credentials with id '${String(args['tls-creds'])}'`);
  if (args['tls-authz'] !== undefined) throw genericError("'tls-authz' requires 'tls-creds'");
  await core.nbd.start(nbdAddress(args.addr as Record<string, unknown>), args['max-connections'] as number | undefined);
}

/** block-export-add and --export, after their arguments were checked. */
export function addBlockExport(core: Core, args: Record<string, unknown>): void {
  if (args.type !== 'nbd') throw genericError(`Export type '${String(args.type)}' is not supported`);
  // blk_exp_add's order: the id, the node, the iothread; then the NBD export's own checks (a running
  // server, a free name).
  const id = args.id as string;
  if (!idWellFormed(id)) throw genericError('Invalid block export id');
  if (core.nbd.findById(id)) throw genericError(`Block export id '${id}' is already in use`);
  const nodeName = args['node-name'] as string;
  const node = core.graph.find(nodeName);
  // bdrv_lookup_bs(NULL, node-name): no device name in the message.
  if (!node) throw genericError(`Cannot find device='' nor node-name='${nodeName}'`);
  // bitmirror has no iothread objects: none is found.
  if (args.iothread !== undefined) throw genericError(`iothread "${String(args.iothread)}" not found`);
  if (!core.nbd.running) throw genericError('NBD server not running');
  core.nbd.addExport(
    {
      id: args.id as string,
      name: (args.name as string | undefined) ?? node.nodeName,
      description: args.description as string | undefined,
      node,
      writable: (args.writable as boolean | undefined) ?? false,
      writethrough: (args.writethrough as boolean | undefined) ?? false,
      allocationDepth: (args['allocation-depth'] as boolean | undefined) ?? false,
      bitmaps: (args.bitmaps as ExportBitmapRef[] | undefined) ?? [],
    },
    (name) => {
      const n = core.graph.find(name);
      if (!n) throw genericError(`Node '${name}' not found`);
      return n;
    },
  );
}

export const nbdCommands: CommandDef[] = [
  command('nbd-server-start', NBD_SERVER_START, (args, core) => startNbdServer(core, args)),
  command('nbd-server-stop', {}, (_args, core) => core.nbd.stop()),
  command(
    'block-export-add',
    {},
    (args, core) => addBlockExport(core, visit(BLOCK_EXPORT_OPTIONS, args, '') as Record<string, unknown>),
    { boxed: () => BLOCK_EXPORT_OPTIONS },
  ),
  command('block-export-del', { id: str, '*mode': REMOVE_MODE }, (args, core) => {
    core.nbd.deleteExport(args.id as string, (args.mode as 'safe' | 'hard' | undefined) ?? 'safe');
  }),
  command('query-block-exports', {}, (_args, core) => core.nbd.query()),
  // bitmirror's own: where the NBD server listens (QEMU has no query for it), so that a user-level
  // command (cli/nbd-access.ts) can add an export of its own to a server the user started and read it.
  command('__org.bitmirror_query-nbd-server', {}, (_args, core) => {
    const a = core.nbd.address();
    if (!a) throw genericError('NBD server not running');
    return { addr: a.kind === 'unix' ? { type: 'unix', path: a.path } : { type: 'inet', host: a.host, port: String(a.port) } };
  }),
  // The legacy commands: an export whose id is its name (the device's name by default).
  command('nbd-server-add', NBD_SERVER_ADD, (args, core) => {
    // qmp_nbd_server_add looks the device up (by device or node name), then asks for the server.
    const device = args.device as string;
    if (!core.graph.find(device)) throw genericError(`Cannot find device='${device}' nor node-name='${device}'`);
    if (!core.nbd.running) throw genericError('NBD server not running');
    const name = (args.name as string | undefined) ?? (args.device as string);
    addBlockExport(core, {
      type: 'nbd',
      id: name,
      'node-name': args.device,
      name,
      description: args.description,
      writable: args.writable,
      bitmaps: args.bitmap === undefined ? undefined : [args.bitmap],
    });
  }),
  command('nbd-server-remove', { name: str, '*mode': REMOVE_MODE }, (args, core) => {
    core.nbd.deleteExport(args.name as string, (args.mode as 'safe' | 'hard' | undefined) ?? 'safe');
  }),
];
