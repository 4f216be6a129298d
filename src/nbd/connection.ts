/**
 * One NBD client connection on the server: the fixed newstyle handshake (option haggling) and then the
 * transmission phase. Requests are framed as their bytes arrive, on the socket's read callback (a
 * WRITE's payload is read straight into a pooled buffer), and served concurrently (up to
 * MAX_REQUESTS_IN_FLIGHT at a time); replies go out as each finishes, so a slow request does not hold
 * back the others. Reading stops while that many are in flight or while the client does not read its
 * replies (the socket's write buffer is full), so a client that stops reading holds only its own
 * requests. A protocol violation that leaves the stream unusable (bad magic, a WRITE too large to
 * take) closes the connection; everything else gets the protocol's error reply and the connection
 * goes on. Every I/O goes through the export's node (BlockNode methods), so bitmaps and jobs see it.
 */
import type { Socket } from 'node:net';
import type { BlockNode } from '../block/node.js';
import { BlockIOError, errorCode, errorMessage } from '../errors.js';
import { tracer } from '../trace/trace.js';
import * as P from './protocol.js';
import { NBD_MAX_BUFFER_SIZE, type MetaContext, type NbdExport } from './export.js';
import { SocketClosedError, socketDescriptor, type SocketReader } from './socket-reader.js';
import { chainStatus } from '../block/copy/chain-status.js';
import { SizedBufferPool } from '../block/copy/buffer-pool.js';
import { ReplyWriter } from './reply-writer.js';

/** What the connection needs from its server. */
export interface ConnectionHost {
  /** An export clients may open (not one being deleted). */
  findExport(name: string): NbdExport | undefined;
  /** Every export clients may see, in the order they were added. */
  listExports(): NbdExport[];
  /** The connection has ended. */
  connectionClosed(conn: NbdConnection): void;
}

/** Requests served at once per connection (QEMU serves 16; more keeps a deep client's pipe full). */
export const MAX_REQUESTS_IN_FLIGHT = 32;
/**
 * Reading requests stops while more reply bytes than this wait to be sent: a client that does not read
 * its replies holds at most this much (plus the replies of the requests in flight). Waiting for the
 * socket's own high-water mark (16 KiB) instead would serve one request at a time.
 */
const MAX_UNSENT_REPLY_BYTES = 8 << 20;
/**
 * Data buffers of READ replies and WRITE payloads of at least this size come from the server's pool
 * (smaller ones are cheap to allocate, and a WRITE within one socket chunk is taken without a copy).
 */
const POOLED_MIN_BYTES = 64 << 10;
/** Free buffers the pool keeps, for all connections together. */
const POOL_FREE_BYTES = 64 << 20;
/** The server's pool: connections come and go, their buffers stay for the next. */
const dataBuffers = new SizedBufferPool(POOL_FREE_BYTES);

/** Longest option data taken during the handshake; a longer option drops the connection. */
const MAX_OPTION_LENGTH = 1 << 20;

const traceOption = tracer.point('nbd_negotiate_option');
const traceRequestError = tracer.point('nbd_co_send_error');
const traceEnd = tracer.point('nbd_client_end');


/** A client's misbehaviour after which the stream cannot be trusted: the connection is dropped. */
class DropConnection extends Error {}

/** An error reply to a request: the NBD errno name and QEMU's message. */
class RequestError extends Error {
  constructor(
    readonly code: P.NbdErrnoName,
    message: string,
  ) {
    super(message);
  }
}

export class NbdConnection {
  private structured = false;
  private extended = false;
  private noZeroes = false;
  /** The contexts selected by the last SET_META_CONTEXT, and the export it named. */
  private selected: { exportName: string; contexts: MetaContext[] } | undefined;
  private exp: NbdExport | undefined;
  private readonly inFlight = new Set<Promise<void>>();
  private closed = false;
  /** Set while the transmission phase runs: ends it (with the reason, when it is an error). */
  private endTransmission: ((err?: unknown) => void) | undefined;
  /** Reading stopped for room: too many requests in flight, or too many reply bytes unsent. */
  private waitingForRoom = false;
  private takingRequests = false;
  /** The write side: replies in order, batched per turn of the event loop, file data by reference. */
  private readonly writer: ReplyWriter;

  /**
   * `reader` takes the socket's bytes (attached to it by the caller, through onread where it can):
   * see NbdServer, which creates both.
   */
  constructor(
    private readonly socket: Socket,
    private readonly reader: SocketReader,
    private readonly host: ConnectionHost,
  ) {
    socket.setNoDelay?.(true);
    this.writer = new ReplyWriter(
      socket,
      socketDescriptor(socket),
      () => this.roomFreed(),
      (err) => {
        traceEnd({ reason: errorMessage(err) });
        this.close();
      },
    );
    // Errors surface through the reader (reads fail) and writes (ignored once closed).
    socket.on('error', () => undefined);
    socket.on('close', () => this.close());
    socket.on('drain', () => this.roomFreed());
  }

  /** Serve the connection until it ends. Never rejects. */
  async run(): Promise<void> {
    try {
      if (await this.handshake()) await this.transmission();
    } catch (err) {
      traceEnd({ reason: errorMessage(err) });
    } finally {
      // Replies of requests already being served still go out (DISC finishes them too).
      await Promise.allSettled([...this.inFlight]);
      await this.writer.idle();
      this.close();
      // Only now, with no request of this client left on the node, may its export go.
      this.exp?.clients.delete(this);
      this.host.connectionClosed(this);
    }
  }

  /**
   * Close the socket now (block-export-del mode=hard, nbd-server-stop, a protocol violation). The
   * connection has ended once the requests it was serving have.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.writer.close();
    this.socket.destroy();
  }

  private send(...parts: Buffer[]): void {
    this.sendThen(undefined, ...parts);
  }

  /**
   * send(), then `sent` once the socket no longer needs the parts (written to the kernel, or the
   * socket gone): when a pooled buffer may be reused.
   */
  private sendThen(sent: (() => void) | undefined, ...parts: Buffer[]): void {
    if (this.closed) {
      sent?.();
      return;
    }
    this.writer.send(parts, sent);
  }

  // ---- handshake ----------------------------------------------------------------------------------

  /** Option haggling; true when the client entered transmission with an export. */
  private async handshake(): Promise<boolean> {
    this.send(P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES));
    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    // The server must drop a client that sends flags it does not know.
    if (clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) throw new DropConnection(`unknown client flags 0x${clientFlags.toString(16)}`);
    this.noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
    const fixed = (clientFlags & P.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    for (;;) {
      const { option, length } = P.parseOptionHeader(await this.reader.read(P.OPTION_HEADER_SIZE));
      if (length > MAX_OPTION_LENGTH) throw new DropConnection(`option ${option}: length ${length} is too large`);
      const data = await this.reader.read(length);
      traceOption({ option, length });
      // A client without fixed newstyle may only send EXPORT_NAME.
      if (!fixed && option !== P.NBD_OPT.EXPORT_NAME) throw new DropConnection('unsupported option without fixed newstyle');
      const done = await this.handleOption(option, data);
      if (done === 'abort') return false;
      if (done === 'go') return true;
    }
  }

  private reply(option: number, type: number, data?: Buffer): void {
    this.send(P.encodeOptionReply(option, type, data));
  }

  private replyError(option: number, type: number, message: string): void {
    this.send(P.encodeOptionError(option, type, message));
  }

  private async handleOption(option: number, data: Buffer): Promise<'abort' | 'go' | undefined> {
    const invalid = (msg: string) => this.replyError(option, P.NBD_REP.ERR_INVALID, msg);
    switch (option) {
      case P.NBD_OPT.EXPORT_NAME: {
        // No error reply is possible here: an unknown export ends the session.
        if (this.extended) throw new DropConnection('EXPORT_NAME with extended headers');
        const exp = this.host.findExport(data.toString('utf8'));
        if (!exp) throw new DropConnection(`export '${data.toString('utf8')}' not present`);
        this.enter(exp);
        this.send(P.encodeExportNameReply(exp.size(), exp.transmissionFlags(this.structured), this.noZeroes));
        return 'go';
      }
      case P.NBD_OPT.ABORT:
        this.reply(option, P.NBD_REP.ACK);
        return 'abort';
      case P.NBD_OPT.LIST:
        if (data.length) return void invalid('no argument expected');
        for (const exp of this.host.listExports()) this.reply(option, P.NBD_REP.SERVER, P.encodeRepServer(exp.name, exp.description));
        this.reply(option, P.NBD_REP.ACK);
        return;
      case P.NBD_OPT.INFO:
      case P.NBD_OPT.GO:
        return this.handleInfo(option, data);
      case P.NBD_OPT.STRUCTURED_REPLY:
        if (data.length) return void invalid('no argument expected');
        if (this.structured) return void invalid(this.extended ? 'extended headers already negotiated' : 'structured reply already negotiated');
        this.structured = true;
        this.reply(option, P.NBD_REP.ACK);
        return;
      case P.NBD_OPT.EXTENDED_HEADERS:
        if (data.length) return void invalid('no argument expected');
        if (this.extended) return void invalid('extended headers already negotiated');
        // Extended headers imply structured replies.
        this.extended = true;
        this.structured = true;
        this.reply(option, P.NBD_REP.ACK);
        return;
      case P.NBD_OPT.LIST_META_CONTEXT:
      case P.NBD_OPT.SET_META_CONTEXT:
        this.handleMetaContext(option, data);
        return;
      case P.NBD_OPT.STARTTLS:
        this.replyError(option, P.NBD_REP.ERR_POLICY, 'TLS not configured');
        return;
      default:
        this.replyError(option, P.NBD_REP.ERR_UNSUP, `Unsupported option ${option}`);
        return;
    }
  }

  private enter(exp: NbdExport): void {
    this.exp = exp;
    exp.clients.add(this);
    // Contexts selected for another export do not carry over (QEMU clears them too).
    if (this.selected && this.selected.exportName !== exp.name) this.selected = undefined;
  }

  /** INFO and GO: the export's information items, then ACK (and, for GO, transmission). */
  private handleInfo(option: number, data: Buffer): 'go' | undefined {
    let req: P.InfoRequest;
    try {
      req = P.parseInfoRequest(data);
    } catch (err) {
      this.replyError(option, P.NBD_REP.ERR_INVALID, errorMessage(err));
      return;
    }
    const exp = this.host.findExport(req.name);
    if (!exp) {
      this.replyError(option, P.NBD_REP.ERR_UNKNOWN, `export '${req.name}' not present`);
      return;
    }
    const wantsBlockSize = req.requests.includes(P.NBD_INFO.BLOCK_SIZE);
    if (req.requests.includes(P.NBD_INFO.NAME)) this.reply(option, P.NBD_REP.INFO, P.encodeInfoName(exp.name));
    if (exp.description) this.reply(option, P.NBD_REP.INFO, P.encodeInfoDescription(exp.description));
    const sizes = exp.blockSizes(wantsBlockSize || option === P.NBD_OPT.INFO);
    this.reply(option, P.NBD_REP.INFO, P.encodeInfoBlockSize(sizes));
    this.reply(option, P.NBD_REP.INFO, P.encodeInfoExport(exp.size(), exp.transmissionFlags(this.structured)));
    // A client that does not honour block sizes may not use an export that needs them.
    if (option === P.NBD_OPT.GO && sizes.minimum > 1 && !wantsBlockSize) {
      this.replyError(option, P.NBD_REP.ERR_BLOCK_SIZE_REQD, 'request NBD_INFO_BLOCK_SIZE to use this export');
      return;
    }
    this.reply(option, P.NBD_REP.ACK);
    if (option !== P.NBD_OPT.GO) return;
    this.enter(exp);
    return 'go';
  }

  private handleMetaContext(option: number, data: Buffer): void {
    const list = option === P.NBD_OPT.LIST_META_CONTEXT;
    if (!this.structured) return this.replyError(option, P.NBD_REP.ERR_INVALID, 'request structured replies first');
    let req: P.MetaContextRequest;
    try {
      req = P.parseMetaContextRequest(data);
    } catch (err) {
      return this.replyError(option, P.NBD_REP.ERR_INVALID, errorMessage(err));
    }
    const exp = this.host.findExport(req.name);
    if (!exp) return this.replyError(option, P.NBD_REP.ERR_UNKNOWN, `export '${req.name}' not present`);
    const chosen = new Map<number, MetaContext>();
    const queries = list && req.queries.length === 0 ? ['base:', 'qemu:'] : req.queries;
    for (const q of queries) for (const c of exp.matchContexts(q, list)) chosen.set(c.id, c);
    const contexts = [...chosen.values()].sort((a, b) => a.id - b.id);
    // LIST replies carry id 0: ids are only meaningful for a selection.
    for (const c of contexts) this.reply(option, P.NBD_REP.META_CONTEXT, P.encodeRepMetaContext(list ? 0 : c.id, c.name));
    if (!list) this.selected = { exportName: exp.name, contexts };
    this.reply(option, P.NBD_REP.ACK);
  }

  // ---- transmission -------------------------------------------------------------------------------

  /** The transmission phase: resolves after DISC, rejects when the stream ends or breaks the protocol. */
  private transmission(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.endTransmission = (err) => {
        this.endTransmission = undefined;
        this.reader.pause();
        if (err === undefined) resolve();
        else reject(err);
      };
      this.reader.setConsumer({
        bytes: () => this.takeRequests(),
        ended: (err) => this.endTransmission?.(err ?? new SocketClosedError()),
      });
      this.takeRequests();
    });
  }

  /**
   * Frame and start every request whose bytes have arrived, until a payload is still on its way or
   * there is no room for more: called on the socket's read callback and when room frees. A payload is
   * read into its buffer by the reader (straight from the socket when it is large), and its request
   * starts when the buffer is full.
   */
  private takeRequests(): void {
    if (this.takingRequests) return;
    this.takingRequests = true;
    try {
      const headerSize = P.requestSize(this.extended);
      while (this.endTransmission && !this.reader.filling) {
        // Back-pressure: a free slot, and the client taking the replies already sent.
        if (this.inFlight.size >= MAX_REQUESTS_IN_FLIGHT || this.writer.unsentBytes > MAX_UNSENT_REPLY_BYTES) {
          this.waitingForRoom = true;
          this.reader.pause();
          return;
        }
        if (this.reader.available < headerSize) return;
        const req = P.parseRequest(this.reader.peek(headerSize), this.extended);
        this.reader.skip(headerSize);
        const hasPayload = req.type === P.NBD_CMD.WRITE || (this.extended && req.flags & P.NBD_CMD_FLAG.PAYLOAD_LEN);
        if (!hasPayload) {
          this.begin(req, undefined, undefined);
          continue;
        }
        if (req.length > BigInt(NBD_MAX_BUFFER_SIZE)) {
          // The payload cannot be skipped safely: refuse the request and end the session.
          this.replyRequestError(req, new RequestError('EINVAL', `len (${req.length}) is larger than max len (${NBD_MAX_BUFFER_SIZE})`));
          throw new DropConnection('payload too large');
        }
        const len = Number(req.length);
        // A large payload goes into a pooled buffer, given back when the request has been served: the
        // node's write has ended by then (no layer keeps a write's buffer past its completion).
        const pooled = len >= POOLED_MIN_BYTES ? dataBuffers.take(len) : undefined;
        this.reader.fillFrom(
          pooled ? pooled.subarray(0, len) : Buffer.allocUnsafe(len),
          (payload) => this.begin(req, payload, pooled),
          () => {
            if (pooled) dataBuffers.give(pooled);
          },
        );
      }
    } catch (err) {
      this.endTransmission?.(err);
    } finally {
      this.takingRequests = false;
    }
  }

  /** A request has arrived whole: DISC ends the session, anything else is served. */
  private begin(req: P.NbdRequest, payload: Buffer | undefined, pooled: Buffer | undefined): void {
    if (req.type === P.NBD_CMD.DISC) {
      if (pooled) dataBuffers.give(pooled);
      this.endTransmission?.();
      return;
    }
    const p = this.serve(req, payload).finally(() => {
      this.inFlight.delete(p);
      if (pooled) dataBuffers.give(pooled);
      this.roomFreed();
    });
    this.inFlight.add(p);
  }

  /** A request ended or the socket drained: go on taking requests if reading stopped for room. */
  private roomFreed(): void {
    if (!this.waitingForRoom || this.inFlight.size >= MAX_REQUESTS_IN_FLIGHT || this.writer.unsentBytes > MAX_UNSENT_REPLY_BYTES) return;
    this.waitingForRoom = false;
    this.reader.resume();
    this.takeRequests();
  }

  private async serve(req: P.NbdRequest, payload: Buffer | undefined): Promise<void> {
    try {
      await this.dispatch(req, payload);
    } catch (err) {
      this.replyRequestError(req, err);
    }
  }

  /** Success without data: a simple reply, or with extended headers a NONE chunk. */
  private replyDone(req: P.NbdRequest): void {
    if (this.extended) this.send(P.encodeChunkHeader(true, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE.NONE, req.cookie, req.offset, 0));
    else this.send(P.encodeSimpleReply(0, req.cookie));
  }

  private chunk(req: P.NbdRequest, type: number, done: boolean, ...payload: Buffer[]): void {
    const len = payload.reduce((n, b) => n + b.length, 0);
    this.send(P.encodeChunkHeader(this.extended, done ? P.NBD_REPLY_FLAG_DONE : 0, type, req.cookie, req.offset, len), ...payload);
  }

  private replyRequestError(req: P.NbdRequest, err: unknown): void {
    const code = err instanceof RequestError ? P.NBD_ERRNO[err.code] : P.nbdErrno(errorCode(err));
    traceRequestError({ type: P.NBD_CMD_NAMES[req.type] ?? req.type, cookie: String(req.cookie), error: code, message: errorMessage(err) });
    if (this.structured) this.chunk(req, P.NBD_REPLY_TYPE.ERROR, true, P.encodeErrorPayload(code, errorMessage(err)));
    else this.send(P.encodeSimpleReply(code, req.cookie));
  }

  /** The checks QEMU's nbd_co_receive_request makes, with its messages. */
  private check(req: P.NbdRequest, exp: NbdExport): { offset: number; length: number } {
    const name = P.NBD_CMD_NAMES[req.type];
    if (name === undefined || req.type === P.NBD_CMD.RESIZE) throw new RequestError('EINVAL', `invalid request type (${req.type}) received`);
    let allowed = P.NBD_CMD_FLAG.FUA;
    if (req.type === P.NBD_CMD.READ && this.structured) allowed |= P.NBD_CMD_FLAG.DF;
    if (req.type === P.NBD_CMD.WRITE && this.extended) allowed |= P.NBD_CMD_FLAG.PAYLOAD_LEN;
    if (req.type === P.NBD_CMD.WRITE_ZEROES) allowed |= P.NBD_CMD_FLAG.NO_HOLE | P.NBD_CMD_FLAG.FAST_ZERO;
    if (req.type === P.NBD_CMD.BLOCK_STATUS) allowed |= P.NBD_CMD_FLAG.REQ_ONE;
    if (req.flags & ~allowed) throw new RequestError('EINVAL', `unsupported flags 0x${req.flags.toString(16)} (got 0x${(req.flags & ~allowed).toString(16)})`);
    if ((req.type === P.NBD_CMD.READ || req.type === P.NBD_CMD.WRITE || req.type === P.NBD_CMD.CACHE) && req.length > BigInt(NBD_MAX_BUFFER_SIZE)) {
      throw new RequestError('EINVAL', `len (${req.length}) is larger than max len (${NBD_MAX_BUFFER_SIZE})`);
    }
    const writes = req.type === P.NBD_CMD.WRITE || req.type === P.NBD_CMD.WRITE_ZEROES || req.type === P.NBD_CMD.TRIM;
    if (writes && !exp.writable) throw new RequestError('EPERM', 'Export is read only');
    const size = BigInt(exp.size());
    if (req.type !== P.NBD_CMD.FLUSH && (req.offset > size || req.length > size - req.offset)) {
      const past = req.type === P.NBD_CMD.WRITE || req.type === P.NBD_CMD.WRITE_ZEROES;
      throw new RequestError(past ? 'ENOSPC' : 'EINVAL', `operation past EOF; From: ${req.offset}, Len: ${req.length}, Size: ${size}`);
    }
    return { offset: Number(req.offset), length: Number(req.length) };
  }

  private async dispatch(req: P.NbdRequest, payload: Buffer | undefined): Promise<void> {
    const exp = this.exp!;
    const { offset, length } = this.check(req, exp);
    const node = exp.current;
    const fuaFlag = (req.flags & P.NBD_CMD_FLAG.FUA) !== 0;
    // A writethrough export acknowledges no write (or write-zeroes) before it is stable, FUA or not.
    const fua = fuaFlag || exp.writethrough;
    switch (req.type) {
      case P.NBD_CMD.READ:
        return this.read(req, exp, offset, length);
      case P.NBD_CMD.WRITE:
        await node.write(offset, payload!, { fua });
        return this.replyDone(req);
      case P.NBD_CMD.FLUSH:
        await node.flush();
        return this.replyDone(req);
      case P.NBD_CMD.TRIM:
        await node.discard(offset, length);
        if (fuaFlag) await node.flush();
        return this.replyDone(req);
      case P.NBD_CMD.WRITE_ZEROES:
        // FAST_ZERO asks for a failure (ENOTSUP) unless zeroing is faster than writing: QEMU's
        // BDRV_REQ_NO_FALLBACK, which the node's writeZeroes honours all the way down.
        await node.writeZeroes(offset, length, { fua, mayUnmap: (req.flags & P.NBD_CMD_FLAG.NO_HOLE) === 0, noFallback: (req.flags & P.NBD_CMD_FLAG.FAST_ZERO) !== 0 });
        return this.replyDone(req);
      case P.NBD_CMD.CACHE:
        // A prefetch hint: read the range through the node (its caches warm) and drop the data.
        if (length) await node.read(offset, length);
        return this.replyDone(req);
      case P.NBD_CMD.BLOCK_STATUS:
        return this.blockStatus(req, exp, offset, length);
      default:
        throw new RequestError('EINVAL', `invalid request type (${req.type}) received`);
    }
  }

  /**
   * READ. Without structured replies: a simple reply and the data. With them: holes (ranges that read
   * as zeroes) as OFFSET_HOLE chunks and the rest as OFFSET_DATA, in order, the last with DONE; with DF
   * one OFFSET_DATA chunk for the whole range.
   */
  private async read(req: P.NbdRequest, exp: NbdExport, offset: number, length: number): Promise<void> {
    const node = exp.current;
    if (!this.structured) {
      const data = length ? await node.read(offset, length) : Buffer.alloc(0);
      return this.send(P.encodeSimpleReply(0, req.cookie), data);
    }
    if (length === 0) return this.chunk(req, P.NBD_REPLY_TYPE.NONE, true);
    if (req.flags & P.NBD_CMD_FLAG.DF) {
      return this.readChunk(req, node, offset, length, true);
    }
    const pieces: Array<{ offset: number; bytes: number; zero: boolean }> = [];
    for (let pos = offset; pos < offset + length; ) {
      const st = await chainStatus(node, pos, offset + length - pos);
      const last = pieces[pieces.length - 1];
      if (last && last.zero === st.zero) last.bytes += st.bytes;
      else pieces.push({ offset: pos, bytes: st.bytes, zero: st.zero });
      pos += st.bytes;
    }
    for (let i = 0; i < pieces.length; i++) {
      const p = pieces[i];
      const done = i === pieces.length - 1;
      if (p.zero) this.chunk(req, P.NBD_REPLY_TYPE.OFFSET_HOLE, done, P.encodeOffsetHole(p.offset, p.bytes));
      else await this.readChunk(req, node, p.offset, p.bytes, done);
    }
  }

  /**
   * One OFFSET_DATA chunk: the data by reference where its bytes are stable host file pages
   * (BlockNode.sendStable, ReplyWriter.sendFile), else read into a pooled buffer, given back once the
   * socket has sent it.
   */
  private async readChunk(req: P.NbdRequest, node: BlockNode, offset: number, bytes: number, done: boolean): Promise<void> {
    if (bytes >= POOLED_MIN_BYTES && this.writer.sendsFiles) {
      if (await node.sendStable(offset, bytes, (ranges) => this.writer.sendFile(this.dataChunkHeader(req, offset, bytes, done), ranges))) return;
    }
    if (bytes < POOLED_MIN_BYTES) return this.chunk(req, P.NBD_REPLY_TYPE.OFFSET_DATA, done, P.encodeOffsetDataPrefix(offset), await node.read(offset, bytes));
    const buf = dataBuffers.take(bytes);
    const data = buf.subarray(0, bytes);
    try {
      await node.readInto(offset, data);
    } catch (err) {
      dataBuffers.give(buf);
      throw err;
    }
    this.sendThen(() => dataBuffers.give(buf), this.dataChunkHeader(req, offset, bytes, done), data);
  }

  /** The chunk header and offset of an OFFSET_DATA chunk of `bytes` at `offset`, in one buffer. */
  private dataChunkHeader(req: P.NbdRequest, offset: number, bytes: number, done: boolean): Buffer {
    return Buffer.concat([P.encodeChunkHeader(this.extended, done ? P.NBD_REPLY_FLAG_DONE : 0, P.NBD_REPLY_TYPE.OFFSET_DATA, req.cookie, req.offset, 8 + bytes), P.encodeOffsetDataPrefix(offset)]);
  }

  /** BLOCK_STATUS: one chunk per selected context, in id order, the last with DONE. */
  private async blockStatus(req: P.NbdRequest, exp: NbdExport, offset: number, length: number): Promise<void> {
    const contexts = this.selected?.contexts ?? [];
    if (contexts.length === 0) throw new RequestError('EINVAL', 'CMD_BLOCK_STATUS not negotiated');
    if (length === 0) throw new RequestError('EINVAL', 'need non-zero length');
    const reqOne = (req.flags & P.NBD_CMD_FLAG.REQ_ONE) !== 0;
    const maxExtentLength = this.extended ? Number.MAX_SAFE_INTEGER : 0xffffffff;
    const replies: Array<{ type: number; payload: Buffer }> = [];
    for (const ctx of contexts) {
      const extents = await exp.extents(ctx, offset, length, reqOne ? 1 : P.MAX_BLOCK_STATUS_EXTENTS, maxExtentLength);
      if (extents.length === 0) throw new BlockIOError('EIO', 'no block status');
      replies.push(P.encodeBlockStatus(ctx.id, extents, this.extended));
    }
    replies.forEach((r, i) => this.chunk(req, r.type, i === replies.length - 1, r.payload));
  }
}
