/**
 * The NBD server of a daemon (QEMU's nbd_server plus its block exports of type nbd): one listening
 * socket (nbd-server-start), the exports by id and by name (block-export-add, nbd-server-add), their
 * deletion (safe: refused while clients are connected; hard: clients are disconnected first), and the
 * connections. An export is deleted once its last client has gone; then it lets go of its node and
 * bitmaps and BLOCK_EXPORT_DELETED is emitted. Knows nothing of QMP: commands/nbd.ts calls it.
 */
import * as net from 'node:net';
import { promises as fsp } from 'node:fs';
import { genericError } from '../errors.js';
import type { EventBus } from '../base/events.js';
import type { BitmapManager } from '../bitmap/manager.js';
import type { BlockNode } from '../block/node.js';
import { NbdExport, type NbdExportOptions } from './export.js';
import { NbdConnection, type ConnectionHost } from './connection.js';
import { SocketReader, socketDescriptor } from './socket-reader.js';
import { nativeAddon } from '../block/native.js';

function ignore(): void {}

export type NbdAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/**
 * Default of max-connections. QEMU 7.2 had no limit (0); upstream made it 100 (QEMU 9.1, "nbd/server:
 * CVE-2024-7409: Cap default max-connections to 100"): we follow upstream.
 */
export const NBD_DEFAULT_MAX_CONNECTIONS = 100;

export type ExportDeleteMode = 'safe' | 'hard';

/** An entry of query-block-exports (BlockExportInfo), members in QEMU's order. */
export interface BlockExportInfo {
  'node-name': string;
  'shutting-down': boolean;
  type: 'nbd';
  id: string;
}

/**
 * How many clients may wait for a free connection slot at most (beyond the limit, a client is closed
 * at once). QEMU leaves them in its listen backlog; a bound keeps a flood of connects from holding
 * sockets without end.
 */
const MIN_WAITING = 16;

/**
 * The socket a connection is served on, with the reader of its bytes. net.Server cannot give the
 * sockets it accepts the `onread` option, which lets the reader choose the buffers the socket reads
 * into (see SocketReader), so the connection gets a new socket with it on a duplicate of the accepted
 * one's descriptor, and the accepted one, never read (pauseOnConnect), is closed: the connection stays
 * open on the duplicate. Without the native addon (no dup), the accepted socket is read through its
 * 'data' events.
 */
function adoptSocket(accepted: net.Socket): { socket: net.Socket; reader: SocketReader } {
  const reader = new SocketReader();
  const fd = socketDescriptor(accepted);
  const dup = fd !== undefined ? nativeAddon()?.dupFd?.(fd) : undefined;
  if (dup === undefined || dup < 0) {
    reader.attach(accepted, false);
    return { socket: accepted, reader };
  }
  // The constructor takes onread as net.connect does (@types/node lists it only for connect).
  const options: net.SocketConstructorOpts & net.ConnectOpts = { fd: dup, readable: true, writable: true, onread: reader.onread };
  const socket = new net.Socket(options);
  accepted.destroy();
  reader.attach(socket, true);
  return { socket, reader };
}

class Listener implements ConnectionHost {
  readonly connections = new Set<NbdConnection>();
  private readonly server: net.Server;
  /** Clients over max-connections, oldest first, not yet greeted. */
  private readonly waiting: net.Socket[] = [];

  constructor(
    readonly address: NbdAddress,
    private readonly maxConnections: number,
    private readonly owner: NbdServer,
  ) {
    // Paused: a client's bytes are read only by the socket serve() makes for it (adoptSocket).
    this.server = net.createServer({ pauseOnConnect: true }, (socket) => this.accepted(socket));
  }

  /**
   * QEMU stops accepting at max-connections and accepts again when a client leaves, so a client over
   * the limit waits for the greeting. Node cannot pause accept(): such a client is accepted and waits
   * here, ungreeted, until a slot frees; past MIN_WAITING (or the limit, if larger) waiting clients it is
   * closed at once.
   */
  private accepted(socket: net.Socket): void {
    if (this.maxConnections <= 0 || this.connections.size < this.maxConnections) return this.serve(socket);
    if (this.waiting.length >= Math.max(this.maxConnections, MIN_WAITING)) {
      socket.destroy();
      return;
    }
    socket.on('error', ignore);
    socket.once('close', () => {
      const i = this.waiting.indexOf(socket);
      if (i >= 0) this.waiting.splice(i, 1);
    });
    this.waiting.push(socket);
  }

  private serve(accepted: net.Socket): void {
    const { socket, reader } = adoptSocket(accepted);
    const conn = new NbdConnection(socket, reader, this);
    this.connections.add(conn);
    void conn.run();
  }

  /** A slot is free: greet the clients that waited longest. */
  private admitWaiting(): void {
    while (this.waiting.length > 0 && (this.maxConnections <= 0 || this.connections.size < this.maxConnections)) {
      const socket = this.waiting.shift()!;
      if (socket.destroyed) continue;
      socket.off('error', ignore);
      this.serve(socket);
    }
  }

  async listen(): Promise<void> {
    const a = this.address;
    if (a.kind === 'unix') await fsp.unlink(a.path).catch(() => undefined);
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      const done = () => {
        this.server.off('error', reject);
        resolve();
      };
      if (a.kind === 'unix') this.server.listen(a.path, done);
      else this.server.listen(a.port, a.host, done);
    });
  }

  /** The TCP port actually bound (for port 0). */
  port(): number | undefined {
    const a = this.server.address();
    return a && typeof a === 'object' ? a.port : undefined;
  }

  findExport(name: string): NbdExport | undefined {
    return this.owner.findByName(name);
  }
  listExports(): NbdExport[] {
    return this.owner.visibleExports();
  }
  connectionClosed(conn: NbdConnection): void {
    this.connections.delete(conn);
    this.owner.clientGone();
    if (this.server.listening) this.admitWaiting();
  }

  async close(): Promise<void> {
    for (const socket of this.waiting.splice(0)) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    if (this.address.kind === 'unix') await fsp.unlink(this.address.path).catch(() => undefined);
  }
}

export class NbdServer {
  private listener: Listener | undefined;
  /** Every export, oldest first (NBD_OPT_LIST's order); query-block-exports lists newest first. */
  private readonly exports: NbdExport[] = [];

  constructor(
    private readonly bitmaps: BitmapManager,
    private readonly events: EventBus,
  ) {}

  get running(): boolean {
    return this.listener !== undefined;
  }

  /** Where the server listens (for TCP the port actually bound, as with port 0); undefined when it does not run. */
  address(): NbdAddress | undefined {
    const l = this.listener;
    if (!l) return undefined;
    return l.address.kind === 'tcp' ? { ...l.address, port: l.port() ?? l.address.port } : l.address;
  }

  /** The TCP port the server listens on, if it listens on TCP (useful with port 0). */
  port(): number | undefined {
    return this.listener?.port();
  }

  /** nbd-server-start. */
  async start(address: NbdAddress, maxConnections = NBD_DEFAULT_MAX_CONNECTIONS): Promise<void> {
    if (this.listener) throw genericError('NBD server already running');
    const l = new Listener(address, maxConnections, this);
    try {
      await l.listen();
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      const where = address.kind === 'unix' ? address.path : `${address.host}:${address.port}`;
      throw genericError(`Failed to bind socket to ${where}: ${e.message}`);
    }
    this.listener = l;
  }

  /** nbd-server-stop: every export goes (its clients are disconnected), then the socket closes. */
  async stop(): Promise<void> {
    const l = this.listener;
    if (!l) throw genericError('NBD server not running');
    for (const exp of [...this.exports]) this.requestDelete(exp, 'hard');
    this.listener = undefined;
    await l.close();
    for (const c of [...l.connections]) c.close();
    await this.idle();
  }

  /** block-export-add for type nbd (and nbd-server-add): check as QEMU, take the node, publish the export. */
  addExport(opts: NbdExportOptions, findNode: (name: string) => BlockNode): NbdExport {
    if (!this.listener) throw genericError('NBD server not running');
    if (this.exports.some((e) => e.id === opts.id)) throw genericError(`Block export id '${opts.id}' is already in use`);
    if (this.findByName(opts.name, true)) throw genericError(`NBD server already has export named '${opts.name}'`);
    const exp = NbdExport.create(opts, this.bitmaps, findNode);
    this.exports.push(exp);
    return exp;
  }

  findById(id: string): NbdExport | undefined {
    return this.exports.find((e) => e.id === id);
  }

  /** The export clients reach by this name (not one being deleted, unless asked). */
  findByName(name: string, includeShuttingDown = false): NbdExport | undefined {
    return this.exports.find((e) => e.name === name && (includeShuttingDown || !e.shuttingDown));
  }

  visibleExports(): NbdExport[] {
    return this.exports.filter((e) => !e.shuttingDown);
  }

  /** block-export-del: QEMU's checks and messages; the export goes once its clients have. */
  deleteExport(id: string, mode: ExportDeleteMode = 'safe'): void {
    const exp = this.findById(id);
    if (!exp) throw genericError(`Export '${id}' is not found`);
    if (exp.shuttingDown) throw genericError(`Export '${id}' is already shutting down`);
    if (mode === 'safe' && exp.clients.size > 0) throw genericError(`export '${id}' still in use`);
    this.requestDelete(exp, mode);
  }

  private requestDelete(exp: NbdExport, mode: ExportDeleteMode): void {
    exp.shuttingDown = true;
    if (mode === 'hard') for (const c of [...exp.clients]) c.close();
    this.reap();
  }

  /** A connection ended: exports waiting for their last client may go now. */
  clientGone(): void {
    this.reap();
  }

  private reap(): void {
    for (const exp of [...this.exports]) {
      if (!exp.shuttingDown || exp.clients.size > 0) continue;
      this.exports.splice(this.exports.indexOf(exp), 1);
      exp.release();
      this.events.emit('BLOCK_EXPORT_DELETED', { id: exp.id });
    }
    if (this.exports.length === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  private readonly idleWaiters: Array<() => void> = [];

  /** Resolves when no export is left (all deletions finished). */
  private idle(): Promise<void> {
    if (this.exports.length === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /** query-block-exports, newest first as QEMU. */
  query(): BlockExportInfo[] {
    return [...this.exports].reverse().map((e) => ({ 'node-name': e.current.nodeName, 'shutting-down': e.shuttingDown, type: 'nbd', id: e.id }));
  }

  /** At daemon shutdown, before nodes close: disconnect every client and release every export. */
  async shutdown(): Promise<void> {
    if (this.listener) await this.stop();
  }
}
