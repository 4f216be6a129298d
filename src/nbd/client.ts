/**
 * One client connection to an NBD server (proto.md, fixed newstyle): connect, negotiate (extended
 * headers or structured replies, a metadata context, GO with block sizes), then carry many requests
 * at once. Each request gets a fresh cookie; one reader loop takes replies in whatever order the
 * server sends them and hands each to the request its cookie names. Anything the server sends that
 * the protocol does not allow (a bad magic, an unknown cookie, a chunk bigger than its request, data
 * outside the request's range) is a protocol error: every request in flight fails with EIO and the
 * connection is closed, since the stream can no longer be trusted. The codecs are protocol.ts's.
 */
import * as net from 'node:net';
import { BlockIOError } from '../errors.js';
import { tracer } from '../trace/trace.js';
import { SocketClosedError, SocketReader } from './socket-reader.js';
import {
  CONTEXT_BASE_ALLOCATION,
  NBD_CMD,
  NBD_CMD_NAMES,
  NBD_FLAG,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NbdProtocolError,
  OPTION_REPLY_HEADER_SIZE,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  errnoName,
  isErrorChunk,
  isOptionError,
  parseBlockStatus,
  parseErrorPayload,
  parseGreeting,
  parseInfoReply,
  parseOffsetHole,
  parseOptionReplyHeader,
  parseRepMetaContext,
  parseReplyHeader,
  replyHeaderSize,
  type BlockSizes,
  type Extent,
} from './protocol.js';

/** A connection broke: why (a protocol fault the server made, or the server hung up). */
const traceConnectionLost = tracer.point('nbd_client_connection_lost');
/** A connection finished its handshake. */
const traceConnected = tracer.point('nbd_client_connected');

export type NbdClientAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/** What the handshake agreed on. */
export interface NbdSession {
  size: number;
  /** Transmission flags of the export (NBD_FLAG_*). */
  flags: number;
  /** The server's block size constraints, or the protocol's defaults when it sent none. */
  blockSizes: BlockSizes;
  structured: boolean;
  extended: boolean;
  /** The id of the metadata context block status is asked for, when the server agreed to one. */
  contextId?: number;
}

/** The protocol's default maximum payload when the server announces none (32 MiB). */
export const NBD_DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

/** A server error during the handshake (option refused, export missing): the open fails with its text. */
export class NbdHandshakeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdHandshakeError';
  }
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  /** READ: the buffer the data lands in (zero-filled, so holes need no copy). */
  buf?: Buffer;
  extents?: Extent[];
  error?: BlockIOError;
  resolve: () => void;
  reject: (e: Error) => void;
}

/** Connect a stream socket read by `reader` (through onread), failing with QEMU's "Failed to connect to '…'" text. */
function connectSocket(addr: NbdClientAddress, reader: SocketReader): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = addr.kind === 'unix' ? net.createConnection({ path: addr.path, onread: reader.onread }) : net.createConnection({ port: addr.port, host: addr.host, onread: reader.onread });
    const onError = (e: NodeJS.ErrnoException) => {
      sock.destroy();
      const where = addr.kind === 'unix' ? addr.path : `${addr.host}:${addr.port}`;
      const reason = e.code === 'ENOENT' ? 'No such file or directory' : e.code === 'ECONNREFUSED' ? 'Connection refused' : e.message;
      reject(new NbdHandshakeError(`Failed to connect to '${where}': ${reason}`));
    };
    sock.once('error', onError);
    sock.once('connect', () => {
      sock.off('error', onError);
      sock.setNoDelay(true);
      reader.attach(sock, true);
      resolve(sock);
    });
  });
}

export class NbdClientConnection {
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private dead: Error | undefined;
  /** Called once when the connection breaks (not on close()). */
  onLost: ((err: Error) => void) | undefined;

  private constructor(
    private readonly sock: net.Socket,
    private readonly reader: SocketReader,
    readonly session: NbdSession,
  ) {
    sock.on('error', () => {}); // reported through the reader
    void this.replyLoop();
  }

  /** Requests sent and not answered yet (to spread requests over connections). */
  get inFlight(): number {
    return this.pending.size;
  }
  get alive(): boolean {
    return this.dead === undefined;
  }

  /** Connect and negotiate; `context` is the metadata context block status uses (base:allocation by default). */
  static async open(addr: NbdClientAddress, exportName: string, context: string = CONTEXT_BASE_ALLOCATION): Promise<NbdClientConnection> {
    const reader = new SocketReader();
    const sock = await connectSocket(addr, reader);
    try {
      const session = await handshake(sock, reader, exportName, context);
      traceConnected({ size: session.size, flags: `0x${session.flags.toString(16)}`, extended: session.extended, context_id: session.contextId });
      return new NbdClientConnection(sock, reader, session);
    } catch (e) {
      sock.destroy();
      if (e instanceof SocketClosedError) throw new NbdHandshakeError('Server closed the connection during the handshake');
      if (e instanceof NbdProtocolError) throw new NbdHandshakeError(`NBD handshake failed: ${e.message}`);
      throw e;
    }
  }

  /** Send one command and wait for its whole reply. READ resolves with the data, BLOCK_STATUS with the extents. */
  async request(type: number, offset: number, length: number, flags = 0, payload?: Buffer): Promise<{ data?: Buffer; extents?: Extent[] }> {
    if (this.dead) throw new BlockIOError('EIO', `NBD connection lost: ${this.dead.message}`);
    const cookie = this.nextCookie++;
    const p: Pending = { type, offset, length, resolve: () => {}, reject: () => {} };
    if (type === NBD_CMD.READ) p.buf = Buffer.alloc(length);
    const done = new Promise<void>((resolve, reject) => {
      p.resolve = resolve;
      p.reject = reject;
    });
    this.pending.set(cookie, p);
    const header = encodeRequest({ flags, type, cookie, offset: BigInt(offset), length: BigInt(length) }, this.session.extended);
    if (!payload) {
      this.sock.write(header);
    } else {
      // Header and payload in one writev, without copying the payload (up to 32 MiB) into a new buffer.
      // The caller's buffer stays untouched until the reply, which the server sends once it has read it.
      this.sock.cork();
      this.sock.write(header);
      this.sock.write(payload);
      this.sock.uncork();
    }
    await done;
    if (p.error) throw p.error;
    return { data: p.buf, extents: p.extents };
  }

  /** NBD_CMD_DISC, then close; requests in flight fail. */
  async close(): Promise<void> {
    if (!this.dead) {
      this.dead = new Error('connection closed by the client');
      if (this.pending.size === 0) this.sock.write(encodeRequest({ flags: 0, type: NBD_CMD.DISC, cookie: 0n, offset: 0n, length: 0n }, this.session.extended));
      this.sock.end();
    }
    this.failAll(new BlockIOError('EIO', 'NBD connection closed'));
    this.sock.destroy();
  }

  private failAll(err: BlockIOError): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  private lose(err: Error): void {
    if (this.dead) return;
    this.dead = err;
    traceConnectionLost({ reason: JSON.stringify(err.message), in_flight: this.pending.size });
    this.sock.destroy();
    this.failAll(new BlockIOError('EIO', `NBD connection lost: ${err.message}`));
    this.onLost?.(err);
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magicBuf = await this.reader.read(4);
        const size = replyHeaderSize(magicBuf.readUInt32BE(0));
        if (size === undefined) throw new NbdProtocolError(`bad reply magic 0x${magicBuf.readUInt32BE(0).toString(16)}`);
        const header = parseReplyHeader(Buffer.concat([magicBuf, await this.reader.read(size - 4)]));
        const p = this.pending.get(header.cookie);
        if (!p) throw new NbdProtocolError(`reply for unknown cookie ${header.cookie}`);
        if (header.kind === 'simple') {
          if (this.session.structured && p.type === NBD_CMD.READ && header.error === 0)
            throw new NbdProtocolError('simple reply to a structured read');
          if (header.error !== 0) p.error = serverError(p.type, header.error);
          else if (p.type === NBD_CMD.READ) await this.reader.readInto(p.buf!);
          this.finish(header.cookie, p);
          continue;
        }
        if (header.extended !== this.session.extended) throw new NbdProtocolError('reply header of the wrong kind');
        // No chunk may be larger than its request's data plus a small header (an error message is at most 4 KiB + 6).
        const limit = (p.type === NBD_CMD.READ ? p.length : 0) + 8 + 4096 + 6 + (p.type === NBD_CMD.BLOCK_STATUS ? 16 * 1024 * 1024 : 0);
        if (header.length > BigInt(limit)) throw new NbdProtocolError(`oversize reply chunk of ${header.length} bytes for ${NBD_CMD_NAMES[p.type]} of ${p.length}`);
        if (header.type === NBD_REPLY_TYPE.OFFSET_DATA && p.type === NBD_CMD.READ && header.length >= 9n) {
          // The data lands in the request's buffer straight from the socket (no copy of the chunk first).
          const offset = (await this.reader.read(8)).readBigUInt64BE(0);
          const len = Number(header.length) - 8;
          const rel = this.inRange(p, offset, len);
          await this.reader.readInto(p.buf!.subarray(rel, rel + len));
        } else this.chunk(p, header.type, await this.reader.read(Number(header.length)));
        if (header.flags & NBD_REPLY_FLAG_DONE) this.finish(header.cookie, p);
      }
    } catch (e) {
      const err = e instanceof SocketClosedError ? new Error('server closed the connection') : (e as Error);
      this.lose(err);
    }
  }

  private finish(cookie: bigint, p: Pending): void {
    this.pending.delete(cookie);
    p.resolve();
  }

  /** Where a reply chunk's [off, +len) starts in the request's buffer; a chunk outside the request is a protocol error. */
  private inRange(p: Pending, off: bigint, len: number): number {
    const rel = Number(off) - p.offset;
    if (off < BigInt(p.offset) || rel + len > p.length) throw new NbdProtocolError(`chunk [${off}, +${len}) outside the request [${p.offset}, +${p.length})`);
    return rel;
  }

  private chunk(p: Pending, type: number, payload: Buffer): void {
    if (isErrorChunk(type)) {
      const { error, message } = parseErrorPayload(type, payload);
      p.error ??= serverError(p.type, error, message);
      return;
    }
    const inRange = (off: bigint, len: number): number => this.inRange(p, off, len);
    switch (type) {
      case NBD_REPLY_TYPE.NONE:
        if (payload.length !== 0) throw new NbdProtocolError('NONE chunk with a payload');
        return;
      case NBD_REPLY_TYPE.OFFSET_DATA: {
        if (p.type !== NBD_CMD.READ || payload.length < 9) throw new NbdProtocolError('unexpected OFFSET_DATA chunk');
        const data = payload.subarray(8);
        data.copy(p.buf!, inRange(payload.readBigUInt64BE(0), data.length));
        return;
      }
      case NBD_REPLY_TYPE.OFFSET_HOLE: {
        if (p.type !== NBD_CMD.READ) throw new NbdProtocolError('unexpected OFFSET_HOLE chunk');
        const h = parseOffsetHole(payload);
        const rel = inRange(h.offset, h.size);
        p.buf!.fill(0, rel, rel + h.size);
        return;
      }
      case NBD_REPLY_TYPE.BLOCK_STATUS:
      case NBD_REPLY_TYPE.BLOCK_STATUS_EXT: {
        if (p.type !== NBD_CMD.BLOCK_STATUS) throw new NbdProtocolError('unexpected BLOCK_STATUS chunk');
        const bs = parseBlockStatus(type, payload);
        if (bs.contextId !== this.session.contextId) throw new NbdProtocolError(`block status for context ${bs.contextId}, not asked for`);
        p.extents = bs.extents;
        return;
      }
      default:
        throw new NbdProtocolError(`unknown reply chunk type ${type}`);
    }
  }
}

function serverError(cmd: number, value: number, message?: string): BlockIOError {
  const code = errnoName(value);
  return new BlockIOError(code, `NBD server failed ${NBD_CMD_NAMES[cmd] ?? cmd}: ${code}${message ? `: ${message}` : ''}`);
}

// ---- handshake ------------------------------------------------------------------------------------

/** Names of option reply types in QEMU's messages (nbd_rep_lookup). */
const REP_NAMES: Record<number, string> = { [NBD_REP.ACK]: 'ack', [NBD_REP.SERVER]: 'server', [NBD_REP.INFO]: 'info', [NBD_REP.META_CONTEXT]: 'meta context' };

async function handshake(sock: net.Socket, reader: SocketReader, exportName: string, context: string): Promise<NbdSession> {
  const { handshakeFlags } = parseGreeting(await reader.read(18));
  if (!(handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new NbdHandshakeError('Server does not support fixed newstyle negotiation');
  const clientFlags = NBD_FLAG_C_FIXED_NEWSTYLE | (handshakeFlags & NBD_FLAG_NO_ZEROES ? NBD_FLAG_C_NO_ZEROES : 0);
  const cf = Buffer.alloc(4);
  cf.writeUInt32BE(clientFlags);
  sock.write(cf);

  /** Send an option and collect its replies up to the final ACK or error. */
  const option = async (opt: number, data?: Buffer): Promise<{ replies: Array<{ type: number; data: Buffer }>; error?: { type: number; message: string } }> => {
    sock.write(encodeOption(opt, data));
    const replies: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const h = parseOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_SIZE));
      if (h.option !== opt) throw new NbdProtocolError(`reply to option ${h.option} while waiting for ${opt}`);
      if (h.length > 1 << 20) throw new NbdProtocolError(`option reply of ${h.length} bytes`);
      const body = await reader.read(h.length);
      if (isOptionError(h.replyType)) return { replies, error: { type: h.replyType, message: body.toString('utf8') } };
      if (h.replyType === NBD_REP.ACK) return { replies };
      replies.push({ type: h.replyType, data: body });
    }
  };

  let extended = false;
  let structured = false;
  const ext = await option(NBD_OPT.EXTENDED_HEADERS);
  if (!ext.error) extended = structured = true;
  else {
    const sr = await option(NBD_OPT.STRUCTURED_REPLY);
    structured = !sr.error;
  }

  let contextId: number | undefined;
  if (structured) {
    const mc = await option(NBD_OPT.SET_META_CONTEXT, encodeMetaContextRequest({ name: exportName, queries: [context] }));
    // One query, so at most one context, and the one asked for (QEMU 7.2's nbd_negotiate_simple_meta_context):
    // another context's extents read as base:allocation's would mean other things.
    for (const r of mc.replies) {
      if (r.type !== NBD_REP.META_CONTEXT) continue;
      if (contextId !== undefined) throw new NbdHandshakeError('Server answered with more than one context');
      const c = parseRepMetaContext(r.data);
      if (c.name !== context) throw new NbdHandshakeError(`Failed to negotiate meta context '${context}', server answered with different context '${c.name}'`);
      contextId = c.id;
    }
  }
  if (contextId === undefined && context !== CONTEXT_BASE_ALLOCATION)
    throw new NbdHandshakeError(`requested x-dirty-bitmap ${context} not found`);

  const go = await option(NBD_OPT.GO, encodeInfoRequest({ name: exportName, requests: [NBD_INFO.BLOCK_SIZE] }));
  if (go.error) {
    const why = go.error.type === NBD_REP.ERR_UNKNOWN ? 'Requested export not available' : 'Server refused the export';
    throw new NbdHandshakeError(`${why}${go.error.message ? `\nserver reported: ${go.error.message}` : ''}`);
  }
  let size: bigint | undefined;
  let flags = 0;
  let blockSizes: BlockSizes = { minimum: 1, preferred: 4096, maximum: NBD_DEFAULT_MAX_PAYLOAD };
  for (const r of go.replies) {
    if (r.type !== NBD_REP.INFO) throw new NbdHandshakeError(`unexpected reply type ${r.type} (${REP_NAMES[r.type] ?? '<unknown>'}), expected ${NBD_REP.INFO} (info)`);
    // An item of a known type must have its exact size (QEMU's nbd_opt_info_or_go).
    const infoType = r.data.length >= 2 ? r.data.readUInt16BE(0) : -1;
    const expected = infoType === NBD_INFO.EXPORT ? 10 : infoType === NBD_INFO.BLOCK_SIZE ? 12 : undefined;
    if (expected !== undefined && r.data.length - 2 !== expected) throw new NbdHandshakeError(`remaining export info len ${r.data.length - 2} is unexpected size`);
    const item = parseInfoReply(r.data);
    if (item.type === 'export') {
      size = item.size;
      flags = item.flags;
    } else if (item.type === 'block-size') blockSizes = item.sizes;
  }
  if (size === undefined) throw new NbdProtocolError('server sent no export size');
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdProtocolError(`export size ${size} is too large`);
  // The block sizes and the size checked as QEMU 7.2's client checks them, in its order and words.
  const m = blockSizes;
  const powerOfTwo = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
  if (!powerOfTwo(m.minimum)) throw new NbdHandshakeError(`server minimum block size ${m.minimum} is not a power of two`);
  if (!powerOfTwo(m.preferred) || m.preferred < m.minimum) throw new NbdHandshakeError(`server preferred block size ${m.preferred} is not valid`);
  if (m.maximum < m.minimum) throw new NbdHandshakeError(`server maximum block size ${m.maximum} is not valid`);
  // (QEMU checks the size only against a minimum received before it; bitmirror whatever the order.)
  if (size % BigInt(m.minimum) !== 0n) throw new NbdHandshakeError(`export size ${size} is not multiple of minimum block size ${m.minimum}`);
  // Beyond QEMU: a request alignment larger than a cluster is refused.
  if (m.minimum > 65536) throw new NbdHandshakeError(`server minimum block size ${m.minimum} is too large`);
  if (!(flags & NBD_FLAG.HAS_FLAGS)) flags = NBD_FLAG.HAS_FLAGS;
  return { size: Number(size), flags, blockSizes, structured, extended, contextId };
}
