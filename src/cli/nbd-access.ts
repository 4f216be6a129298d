/**
 * NbdAccess: how a user-level command reads (or writes) a daemon's nodes itself — through the
 * daemon's NBD server, the way any NBD client would. When the user has started the server, it adds
 * its exports to that one (bitmirror's __org.bitmirror_query-nbd-server says where it listens; QEMU
 * has no such query) and leaves the server and the user's exports as they were; otherwise it starts
 * the server on a unix socket in a private temporary directory and stops it afterwards. Its exports
 * (and frozen bitmaps) carry a random part in their names, so they clash neither with the user's nor
 * with another command's at the same time; bitmirror's NBD client connects to them. A bitmap's dirty extents come through the
 * `qemu:dirty-bitmap:` context of a frozen copy of the bitmap (as QEMU, a read-only export of a
 * writable node offers only a disabled bitmap; the copy also leaves the user's bitmap free).
 * close() undoes everything it did, whatever happened before.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { NbdClientConnection, type NbdClientAddress } from '../nbd/client.js';
import { NBD_CMD, NBD_STATE_DIRTY, NBD_STATE_ZERO } from '../nbd/protocol.js';
import { errorMessage } from '../errors.js';
import type { QmpClient } from '../qmp/client.js';
import { CliError } from './exit-codes.js';

/** A byte range [start, end). */
export type Range = [start: number, end: number];

/** Block status asks cover at most this much (the protocol's lengths are 32-bit without extended headers). */
const STATUS_SPAN = 1 << 30;

/** The ranges (sorted, merged) over [0, size) whose block status extents have `flag` set, in the connection's context. */
export async function rangesWithStatus(conn: NbdClientConnection, size: number, flag: number): Promise<Range[]> {
  const ranges: Range[] = [];
  for (let off = 0; off < size; ) {
    const { extents } = await conn.request(NBD_CMD.BLOCK_STATUS, off, Math.min(size - off, STATUS_SPAN));
    if (!extents || extents.length === 0) throw new CliError('the daemon answered block status with no extents');
    for (const e of extents) {
      const end = Math.min(size, off + e.length);
      if (e.flags & flag) {
        const last = ranges[ranges.length - 1];
        if (last && last[1] === off) last[1] = end;
        else ranges.push([off, end]);
      }
      off = end;
      if (off >= size) break;
    }
  }
  return ranges;
}

/** The dirty ranges (sorted, merged) the export's bitmap context reports over [0, size). */
export function dirtyRanges(conn: NbdClientConnection, size: number): Promise<Range[]> {
  return rangesWithStatus(conn, size, NBD_STATE_DIRTY);
}

/** The ranges (sorted, merged) over [0, size) that read as zeroes, by the export's base:allocation context. */
export function zeroRanges(conn: NbdClientConnection, size: number): Promise<Range[]> {
  return rangesWithStatus(conn, size, NBD_STATE_ZERO);
}

/** Where a client of this host reaches a server listening on `host` (a wildcard address is this host). */
function reachable(addr: { type: string; path?: string; host?: string; port?: string }): NbdClientAddress | undefined {
  if (addr.type === 'unix' && addr.path !== undefined) return { kind: 'unix', path: addr.path };
  if (addr.type !== 'inet' || addr.port === undefined) return undefined;
  const host = addr.host === undefined || addr.host === '' || addr.host === '0.0.0.0' ? '127.0.0.1' : addr.host === '::' ? '::1' : addr.host;
  return { kind: 'tcp', host, port: Number(addr.port) };
}

export class NbdAccess {
  private readonly exports: string[] = [];
  private readonly conns: NbdClientConnection[] = [];
  private readonly frozen: Array<{ node: string; name: string }> = [];
  /** Names this access's exports and frozen bitmaps apart from the user's and from another command's at the same time. */
  private readonly unique = randomBytes(4).toString('hex');

  private constructor(
    private readonly qmp: QmpClient,
    /** Names this access's exports and bitmaps (`bitmirror-<tag>-…`). */
    private readonly tag: string,
    /** Where the daemon's NBD server listens. */
    private readonly server: NbdClientAddress,
    /** The private directory of the server this access started (undefined: the user's server, left running). */
    private readonly ownServerDir?: string,
  ) {}

  /**
   * Reach the daemon's NBD server: the one the user started, if it runs (the daemon says where it
   * listens: __org.bitmirror_query-nbd-server), or one started on a private unix socket otherwise.
   */
  static async start(qmp: QmpClient, tag: string): Promise<NbdAccess> {
    const running = await qmp.request('__org.bitmirror_query-nbd-server');
    if ('return' in running) {
      const addr = reachable((running.return as { addr: { type: string; path?: string; host?: string; port?: string } }).addr);
      if (!addr) throw new CliError(`cannot reach the daemon's NBD server at ${JSON.stringify((running.return as { addr: unknown }).addr)}`);
      return new NbdAccess(qmp, tag, addr);
    }
    // Not running (or a daemon without the query: starting a second server is refused with QEMU's message).
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), `bitmirror-${tag}-`));
    const socket = path.join(dir, 'nbd.sock');
    try {
      await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socket } } });
    } catch (err) {
      await fsp.rm(dir, { recursive: true, force: true });
      throw new CliError(`cannot start the daemon's NBD server to read the disk: ${errorMessage(err)}`);
    }
    return new NbdAccess(qmp, tag, { kind: 'unix', path: socket }, dir);
  }

  /**
   * Export `node` and connect to it. With `bitmap`, the connection's block status context is a frozen
   * copy of that bitmap (same granularity), taken now, on the bitmap's node (`bitmap.node`, default
   * `node`: a bitmap below a filter such as snapshot-access is named by its node); with `writable`, the
   * export takes writes.
   */
  async open(node: string, opts: { bitmap?: { name: string; granularity: number; node?: string }; writable?: boolean } = {}): Promise<NbdClientConnection> {
    const name = `bitmirror-${this.tag}-${this.unique}-${this.exports.length}`;
    let frozen: { node: string; name: string } | undefined;
    if (opts.bitmap) {
      const on = opts.bitmap.node ?? node;
      frozen = { node: on, name: `__bitmirror-${this.tag}-${this.unique}-frozen-${this.frozen.length}` };
      await this.qmp.execute('transaction', {
        actions: [
          { type: 'block-dirty-bitmap-add', data: { ...frozen, granularity: opts.bitmap.granularity, persistent: false, disabled: true } },
          { type: 'block-dirty-bitmap-merge', data: { node: on, target: frozen.name, bitmaps: [opts.bitmap.name] } },
        ],
      });
      this.frozen.push(frozen);
    }
    await this.qmp.execute('block-export-add', {
      type: 'nbd',
      id: name,
      'node-name': node,
      name,
      writable: opts.writable ?? false,
      ...(frozen !== undefined ? { bitmaps: [frozen] } : {}),
    });
    this.exports.push(name);
    const conn = await NbdClientConnection.open(this.server, name, frozen !== undefined ? `qemu:dirty-bitmap:${frozen.name}` : undefined);
    this.conns.push(conn);
    return conn;
  }

  /** Disconnect, delete the exports (waiting until they are gone), drop the frozen bitmaps, stop the server if this access started it. */
  async close(): Promise<void> {
    for (const c of this.conns.splice(0)) await c.close().catch(() => undefined);
    // An export goes once its connections have (BLOCK_EXPORT_DELETED); until then its bitmap is busy.
    const gone = new Set<string>();
    let wake: (() => void) | undefined;
    const off = this.qmp.onEvent((ev) => {
      if (ev.event === 'BLOCK_EXPORT_DELETED') {
        gone.add(String(ev.data?.id));
        wake?.();
      }
    });
    try {
      const deleting: string[] = [];
      for (const id of this.exports.splice(0)) {
        if (await this.qmp.execute('block-export-del', { id, mode: 'hard' }).then(() => true, () => false)) deleting.push(id);
      }
      while (!this.qmp.isClosed && deleting.some((id) => !gone.has(id))) await new Promise<void>((resolve) => (wake = resolve));
    } finally {
      off();
    }
    for (const f of this.frozen.splice(0)) await this.qmp.execute('block-dirty-bitmap-remove', f).catch(() => undefined);
    if (this.ownServerDir !== undefined) {
      await this.qmp.execute('nbd-server-stop').catch(() => undefined);
      await fsp.rm(this.ownServerDir, { recursive: true, force: true });
    }
  }
}
