/**
 * A raw NBD client for tests that need to send what no real client sends (bad magic, unknown options,
 * oversized requests, extended headers, half a message): every byte is the test's choice, built with
 * the codecs of src/nbd/protocol.ts.
 */
import * as net from 'node:net';
import * as P from '../../src/nbd/protocol.js';
import { SocketReader } from '../../src/nbd/socket-reader.js';

export interface OptionReply {
  type: number;
  data: Buffer;
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  /** The request offset an extended header echoes. */
  offset?: bigint;
  payload: Buffer;
}

export class WireClient {
  readonly reader: SocketReader;
  /** Resolves when the server has closed the connection (or it failed). */
  readonly closed: Promise<void>;
  extended = false;

  private constructor(readonly socket: net.Socket) {
    this.reader = SocketReader.of(socket);
    socket.on('error', () => undefined);
    this.closed = new Promise((r) => socket.once('close', () => r()));
  }

  static connect(path: string): Promise<WireClient> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(path, () => resolve(new WireClient(s)));
      s.once('error', reject);
    });
  }

  send(buf: Buffer): void {
    this.socket.write(buf);
  }

  /** Read the greeting and answer with `clientFlags`. */
  async start(clientFlags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const { handshakeFlags } = P.parseGreeting(await this.reader.read(18));
    const b = Buffer.alloc(4);
    b.writeUInt32BE(clientFlags);
    this.send(b);
    return handshakeFlags;
  }

  /** Send an option and collect its replies up to the final one (ACK or an error). */
  async option(option: number, data: Buffer = Buffer.alloc(0)): Promise<OptionReply[]> {
    this.send(P.encodeOption(option, data));
    const replies: OptionReply[] = [];
    for (;;) {
      const h = P.parseOptionReplyHeader(await this.reader.read(P.OPTION_REPLY_HEADER_SIZE));
      if (h.option !== option) throw new Error(`reply to option ${h.option}, expected ${option}`);
      replies.push({ type: h.replyType, data: await this.reader.read(h.length) });
      if (h.replyType === P.NBD_REP.ACK || P.isOptionError(h.replyType)) return replies;
    }
  }

  /** Structured replies (or extended headers), SET_META_CONTEXT on `contexts`, GO to `name`. */
  async open(name: string, opts: { extended?: boolean; contexts?: string[] } = {}): Promise<void> {
    await this.start();
    const neg = await this.option(opts.extended ? P.NBD_OPT.EXTENDED_HEADERS : P.NBD_OPT.STRUCTURED_REPLY);
    if (neg[0].type !== P.NBD_REP.ACK) throw new Error('negotiation refused');
    this.extended = !!opts.extended;
    if (opts.contexts) await this.option(P.NBD_OPT.SET_META_CONTEXT, P.encodeMetaContextRequest({ name, queries: opts.contexts }));
    const go = await this.option(P.NBD_OPT.GO, P.encodeInfoRequest({ name, requests: [] }));
    if (go[go.length - 1].type !== P.NBD_REP.ACK) throw new Error(`GO refused: ${go[go.length - 1].data.toString()}`);
  }

  request(type: number, offset: bigint | number, length: bigint | number, cookie: bigint, flags = 0, payload?: Buffer): void {
    const hdr = P.encodeRequest({ flags, type, cookie, offset: BigInt(offset), length: BigInt(length) }, this.extended);
    this.send(payload ? Buffer.concat([hdr, payload]) : hdr);
  }

  /** The next reply message: a simple reply (its data is not read: the caller knows whether one follows) or a chunk. */
  async reply(): Promise<{ kind: 'simple'; error: number; cookie: bigint } | ({ kind: 'chunk' } & Chunk)> {
    const magic = await this.reader.read(4);
    const size = P.replyHeaderSize(magic.readUInt32BE(0));
    if (size === undefined) throw new Error(`bad reply magic ${magic.toString('hex')}`);
    const h = P.parseReplyHeader(Buffer.concat([magic, await this.reader.read(size - 4)]));
    if (h.kind === 'simple') return h;
    return { kind: 'chunk', flags: h.flags, type: h.type, cookie: h.cookie, offset: h.offset, payload: await this.reader.read(Number(h.length)) };
  }

  /** Every chunk of one structured reply, up to the one with DONE (the replies of one request only). */
  async chunks(): Promise<Chunk[]> {
    const out: Chunk[] = [];
    for (;;) {
      const r = await this.reply();
      if (r.kind !== 'chunk') throw new Error('simple reply where chunks were expected');
      out.push(r);
      if (r.flags & P.NBD_REPLY_FLAG_DONE) return out;
    }
  }

  destroy(): void {
    this.socket.destroy();
  }
}
