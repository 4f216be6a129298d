/**
 * The `nbd` block driver (QEMU's BlockdevOptionsNbd): a node whose bytes live in a remote NBD export.
 * Reads, writes (+FUA), write-zeroes (+NO_HOLE unless the range may be unmapped), trim, flush and
 * block status (base:allocation, or x-dirty-bitmap's context read as qemu-img map does) go over the
 * wire; the node's capabilities and request limits come from the export's transmission flags and
 * block sizes. Beyond QEMU's client: when the server offers multi-conn, the node opens several
 * connections and spreads requests over them (each carries many requests at once), so a copy over a
 * high-latency link is not bound by one round trip at a time. A flush goes to every connection.
 *
 * A lost connection: with reconnect-delay 0 (the default) its requests fail with EIO, and the node
 * reconnects for later requests only if reconnect-delay is set. With reconnect-delay N, requests
 * wait up to N seconds for a new connection and are sent again on it (QEMU's behaviour: requests in
 * flight when the connection broke are retried); after that they fail with EIO.
 */
import { BlockIOError, genericError } from '../errors.js';
import { BlockNode, type BlockStatus, type ImageInfo, type NodeCapabilities, type WriteFlags } from '../block/node.js';
import type { BlockDriver } from '../block/graph.js';
import { str, uint32, type Members } from '../qapi/schema.js';
import { SOCKET_ADDRESS } from '../qapi/socket-address.js';
import { NBD_DEFAULT_MAX_PAYLOAD, NbdClientConnection, NbdHandshakeError, type NbdClientAddress, type NbdSession } from './client.js';
import { CONTEXT_BASE_ALLOCATION, NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, NBD_STATE_HOLE, NBD_STATE_ZERO } from './protocol.js';

/**
 * Connections opened to a server that offers multi-conn, unless `__org.bitmirror_connections` says
 * otherwise. Over a long link one TCP connection moves at most its window per round trip (4 MiB here,
 * the kernel's tcp_wmem maximum: about 100 MiB/s at 40 ms), so QEMU's client, with one, cannot go
 * faster; a mirror into the node keeps QEMU's depth per connection (jobs/mirror.ts). `npm run bench
 * -- nbd`, BM_NBD_PARTS=mirror, BM_NBD_MIRROR_MIB=256, 5 rounds, 20 ms each way, load 2.6 on 2 cores:
 * bitmirror 239 MiB/s (206-249), with 1 connection 88 (80-89), qemu-storage-daemon 73 (71-91);
 * bitmirror's time ÷ qemu-storage-daemon's 0.34 (0.29-0.39), ÷ its own with 1 connection 0.37
 * (0.35-0.43). 8 connections were no faster than 4 (0.94-1.11 of their rate, 4 pairs): the machine's
 * CPU (relay, server and client share it) is the limit there, and each connection costs QEMU's buffer.
 */
export const NBD_DEFAULT_CONNECTIONS = 4;
/** Largest write-zeroes/trim/block-status length in one request (a 32-bit length, aligned down). */
const MAX_NO_PAYLOAD_REQUEST = 0x80000000;

export class NbdNode extends BlockNode {
  readonly driver = 'nbd';
  private readonly connections: Array<NbdClientConnection | undefined>;
  private reconnecting: Promise<void> | undefined;
  private closedByUs = false;
  private nextPick = 0;

  constructor(
    nodeName: string,
    readOnly: boolean,
    first: NbdClientConnection,
    readonly address: NbdClientAddress,
    readonly exportName: string,
    private readonly context: string,
    private readonly reconnectDelayMs: number,
  ) {
    super(nodeName, readOnly);
    this.connections = [first];
    this.session = first.session;
    this.requestAlignment = first.session.blockSizes.minimum;
    this.watch(first);
  }

  /** What the first handshake agreed on; later connections must agree with it. */
  readonly session: NbdSession;

  /** How many connections are open now (tests and query output). */
  get connectionCount(): number {
    return this.connections.filter((c) => c?.alive).length;
  }

  /** Open the extra connections multi-conn allows; their handshakes must agree with the first's. */
  async addConnections(count: number): Promise<void> {
    if (!(this.session.flags & NBD_FLAG.CAN_MULTI_CONN)) return;
    const more = await Promise.allSettled(Array.from({ length: count - 1 }, () => NbdClientConnection.open(this.address, this.exportName, this.context)));
    for (const r of more) {
      if (r.status !== 'fulfilled') continue;
      if (r.value.session.size !== this.session.size || r.value.session.flags !== this.session.flags) {
        await r.value.close();
        continue;
      }
      this.connections.push(r.value);
      this.watch(r.value);
    }
  }

  private watch(c: NbdClientConnection): void {
    c.onLost = () => {
      const i = this.connections.indexOf(c);
      if (i >= 0) this.connections[i] = undefined;
      if (this.reconnectDelayMs > 0 && !this.closedByUs) void this.reconnect();
    };
  }

  /** Reconnect until reconnect-delay has passed since the loss; requests waiting on it are then sent again. */
  private reconnect(): Promise<void> {
    this.reconnecting ??= (async () => {
      const deadline = Date.now() + this.reconnectDelayMs;
      while (!this.closedByUs && Date.now() < deadline) {
        try {
          const c = await NbdClientConnection.open(this.address, this.exportName, this.context);
          if (c.session.size !== this.length()) {
            await c.close();
            break;
          }
          const i = this.connections.indexOf(undefined);
          this.connections[i >= 0 ? i : this.connections.length] = c;
          this.watch(c);
          return;
        } catch {
          await new Promise((r) => setTimeout(r, Math.min(1000, Math.max(10, deadline - Date.now()))));
        }
      }
    })().finally(() => (this.reconnecting = undefined));
    return this.reconnecting;
  }

  /** The live connection with the fewest requests in flight; ties go round, so serial requests spread too. */
  private pick(): NbdClientConnection | undefined {
    let best: NbdClientConnection | undefined;
    const n = this.connections.length;
    this.nextPick = (this.nextPick + 1) % n;
    for (let k = 0; k < n; k++) {
      const c = this.connections[(this.nextPick + k) % n];
      if (c?.alive && (!best || c.inFlight < best.inFlight)) best = c;
    }
    return best;
  }

  /** Send a request, retrying on a new connection while reconnect-delay allows (requests are idempotent). */
  private async send(type: number, offset: number, length: number, flags = 0, payload?: Buffer) {
    const deadline = Date.now() + this.reconnectDelayMs;
    for (;;) {
      const c = this.pick();
      if (c) {
        try {
          return await c.request(type, offset, length, flags, payload);
        } catch (e) {
          // A server's error reply is final; only a lost connection is retried.
          if (c.alive || this.reconnectDelayMs === 0 || Date.now() >= deadline) throw e;
        }
      }
      if (this.reconnectDelayMs === 0 || this.closedByUs || Date.now() >= deadline) throw new BlockIOError('EIO', 'NBD connection lost');
      await this.reconnect();
    }
  }

  private get flags(): number {
    return this.session.flags;
  }
  /**
   * The largest READ/WRITE sent: the server's maximum, at most 32 MiB (QEMU's NBD_MAX_BUFFER_SIZE), a
   * multiple of its minimum (QEMU's max_transfer, aligned down to the request alignment): a maximum of
   * 5000 with a minimum of 512 split requests at unaligned offsets, and one of 4 GiB sent 4 GiB reads.
   */
  private get maxPayload(): number {
    const { minimum, maximum } = this.session.blockSizes;
    return Math.floor(Math.min(maximum, NBD_DEFAULT_MAX_PAYLOAD) / minimum) * minimum;
  }

  length(): number {
    return this.session.size;
  }

  protected async doRead(offset: number, bytes: number): Promise<Buffer> {
    if (bytes <= this.maxPayload) return (await this.send(NBD_CMD.READ, offset, bytes)).data!;
    const out = Buffer.allocUnsafe(bytes);
    await this.doReadInto(offset, out);
    return out;
  }

  protected override async doReadInto(offset: number, buf: Buffer): Promise<void> {
    const parts: Promise<void>[] = [];
    for (let pos = 0; pos < buf.length; pos += this.maxPayload) {
      const n = Math.min(this.maxPayload, buf.length - pos);
      parts.push(this.send(NBD_CMD.READ, offset + pos, n).then((r) => void r.data!.copy(buf, pos)));
    }
    await Promise.all(parts);
  }

  protected async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    const fua = flags.fua && this.flags & NBD_FLAG.SEND_FUA ? NBD_CMD_FLAG.FUA : 0;
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < data.length; pos += this.maxPayload) {
      const chunk = data.subarray(pos, Math.min(data.length, pos + this.maxPayload));
      parts.push(this.send(NBD_CMD.WRITE, offset + pos, chunk.length, fua, chunk));
    }
    await Promise.all(parts);
    if (flags.fua && !fua) await this.doFlush();
  }

  protected override async doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    if (!(this.flags & NBD_FLAG.SEND_WRITE_ZEROES)) return super.doWriteZeroes(offset, bytes, flags);
    let f = flags.mayUnmap ? 0 : NBD_CMD_FLAG.NO_HOLE;
    if (flags.fua && this.flags & NBD_FLAG.SEND_FUA) f |= NBD_CMD_FLAG.FUA;
    // No fallback: the server zeroes fast or answers ENOTSUP, which fails the request as it is
    // (writeZeroes checked that the server announced SEND_FAST_ZERO: capabilities().fastZero).
    if (flags.noFallback) f |= NBD_CMD_FLAG.FAST_ZERO;
    await this.inPieces(offset, bytes, (o, n) => this.send(NBD_CMD.WRITE_ZEROES, o, n, f));
    if (flags.fua && !(this.flags & NBD_FLAG.SEND_FUA)) await this.doFlush();
  }

  protected override async doDiscard(offset: number, bytes: number): Promise<void> {
    if (!(this.flags & NBD_FLAG.SEND_TRIM)) return;
    await this.inPieces(offset, bytes, (o, n) => this.send(NBD_CMD.TRIM, o, n));
  }

  private async inPieces(offset: number, bytes: number, fn: (o: number, n: number) => Promise<unknown>): Promise<void> {
    const step = MAX_NO_PAYLOAD_REQUEST - this.requestAlignment;
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < bytes; pos += step) parts.push(fn(offset + pos, Math.min(step, bytes - pos)));
    await Promise.all(parts);
  }

  /** A flush on every connection: each makes the writes it completed durable, whatever multi-conn promises. */
  protected async doFlush(): Promise<void> {
    if (!(this.flags & NBD_FLAG.SEND_FLUSH)) return;
    const live = this.connections.filter((c): c is NbdClientConnection => !!c?.alive);
    if (live.length === 0) {
      await this.send(NBD_CMD.FLUSH, 0, 0);
      return;
    }
    await Promise.all(live.map((c) => c.request(NBD_CMD.FLUSH, 0, 0)));
  }

  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    const n = Math.min(bytes, this.length() - offset, MAX_NO_PAYLOAD_REQUEST - this.requestAlignment);
    if (this.session.contextId === undefined) return { bytes: n, zero: false, data: true, allocated: true };
    const { extents } = await this.send(NBD_CMD.BLOCK_STATUS, offset, n, NBD_CMD_FLAG.REQ_ONE);
    const e = extents?.[0];
    if (!e || e.length === 0) throw new BlockIOError('EIO', 'NBD server sent an empty block status');
    // A server may describe more than was asked for: only the asked range counts.
    const len = Math.min(e.length, n);
    const zero = (e.flags & NBD_STATE_ZERO) !== 0;
    const data = (e.flags & NBD_STATE_HOLE) === 0;
    return { bytes: len, zero, data, allocated: data || zero };
  }

  /**
   * Closing flushes first; with every connection lost that flush cannot be sent, and the close still
   * succeeds (QEMU's bdrv_close ignores the flush's result too): the failed requests already said EIO.
   */
  override async close(): Promise<void> {
    try {
      await super.close();
    } catch (e) {
      if (this.connectionCount > 0) throw e;
    }
  }

  protected override async doClose(): Promise<void> {
    this.closedByUs = true;
    await Promise.all(this.connections.map((c) => c?.close()));
  }

  override capabilities(): NodeCapabilities {
    const f = this.flags;
    return {
      requestAlignment: this.requestAlignment,
      maxTransfer: this.maxPayload,
      writeZeroes: (f & NBD_FLAG.SEND_WRITE_ZEROES) !== 0,
      fastZero: (f & NBD_FLAG.SEND_FAST_ZERO) !== 0,
      discard: (f & NBD_FLAG.SEND_TRIM) !== 0,
      fua: (f & NBD_FLAG.SEND_FUA) !== 0,
      blockStatus: this.session.contextId !== undefined,
      resize: false,
      streams: Math.max(1, this.connectionCount),
    };
  }

  /** QEMU's filename for an nbd node: an nbd URI. */
  filename(): string {
    const a = this.address;
    const exp = this.exportName ? `/${this.exportName}` : '';
    return a.kind === 'unix' ? `nbd+unix://${exp}?socket=${a.path}` : `nbd://${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}${exp}`;
  }

  imageInfo(): ImageInfo {
    return { filename: this.filename(), format: 'nbd', 'virtual-size': this.length() };
  }
}

/** The address to connect to, from a checked SocketAddress. */
function clientAddress(server: Record<string, unknown>): NbdClientAddress {
  switch (server.type) {
    case 'unix':
      if (server.abstract) throw genericError('Abstract unix sockets are not supported');
      return { kind: 'unix', path: server.path as string };
    case 'inet': {
      const port = Number(server.port);
      if (!/^\d+$/.test(String(server.port)) || port > 65535) throw genericError(`Failed to parse port '${String(server.port)}'`);
      return { kind: 'tcp', host: server.host as string, port };
    }
    default:
      throw genericError(`Socket address type '${String(server.type)}' is not supported`);
  }
}

const NBD_OPTIONS: Members = {
  server: SOCKET_ADDRESS,
  '*export': str,
  '*tls-creds': str,
  '*tls-hostname': str,
  '*x-dirty-bitmap': str,
  '*reconnect-delay': uint32,
  '*open-timeout': uint32,
  /** Beyond QEMU: how many connections to open when the server offers multi-conn (1 = QEMU's behaviour). */
  '*__org.bitmirror_connections': { kind: 'int', name: 'uint8' },
};

export const nbdDriver: BlockDriver = {
  name: 'nbd',
  options: NBD_OPTIONS,
  async open(nodeName, opts) {
    // No TLS objects exist in bitmirror: QEMU's refusal for a name that is not a tls-creds object.
    if (opts['tls-creds'] !== undefined) throw genericError(`No TLS credentials with id '${String(opts['tls-creds'])}'`);
    const address = clientAddress(opts.server as Record<string, unknown>);
    const exportName = (opts.export as string | undefined) ?? '';
    const context = (opts['x-dirty-bitmap'] as string | undefined) ?? CONTEXT_BASE_ALLOCATION;
    const reconnectDelayMs = ((opts['reconnect-delay'] as number | undefined) ?? 0) * 1000;
    const openDeadline = Date.now() + ((opts['open-timeout'] as number | undefined) ?? 0) * 1000;
    const wanted = Math.max(1, (opts['__org.bitmirror_connections'] as number | undefined) ?? NBD_DEFAULT_CONNECTIONS);

    // open-timeout: keep trying to connect until it passes (QEMU 7.0+); 0 tries once.
    let first: NbdClientConnection;
    for (;;) {
      try {
        first = await NbdClientConnection.open(address, exportName, context);
        break;
      } catch (e) {
        if (Date.now() >= openDeadline) throw genericError(e instanceof NbdHandshakeError ? e.message : String((e as Error).message));
        await new Promise((r) => setTimeout(r, Math.min(100, openDeadline - Date.now())));
      }
    }
    let readOnly = opts['read-only'] === true;
    if (!readOnly && first.session.flags & NBD_FLAG.READ_ONLY) {
      if (opts['auto-read-only'] !== true) {
        await first.close();
        throw genericError('NBD export is read-only');
      }
      readOnly = true;
    }
    const node = new NbdNode(nodeName, readOnly, first, address, exportName, context, reconnectDelayMs);
    if (wanted > 1) await node.addConnections(wanted);
    return node;
  },
};

