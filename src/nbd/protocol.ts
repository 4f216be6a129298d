/**
 * The NBD protocol (NetworkBlockDevice/nbd doc/proto.md, fixed newstyle): its constants and the codecs
 * of every message, for both ends. No sockets, no block nodes: the server (nbd/server.ts) and the client
 * driver build on this. Numbers on the wire are big-endian; 64-bit fields are bigint here, and callers
 * check that offsets and lengths fit before they use them as numbers.
 */

// ---- handshake ------------------------------------------------------------------------------------

/** 'NBDMAGIC', the first 8 bytes a server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': after NBD_MAGIC in newstyle, and the start of every option the client sends. */
export const NBD_OPTS_MAGIC = 0x49484156454f5054n;
/** Magic of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;

/** Handshake flags (server, u16). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flags (u32): the same two bits; any other bit makes the server drop the connection. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Option types. */
export const NBD_OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** Option reply types; errors have bit 31 set. */
export const NBD_REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
  ERR_EXT_HEADER_REQD: 0x8000000a,
} as const;

export function isOptionError(replyType: number): boolean {
  return (replyType & 0x80000000) !== 0;
}

/** NBD_INFO_* items of NBD_REP_INFO (requested by INFO/GO). */
export const NBD_INFO = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (u16) of an export. */
export const NBD_FLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STATUS_PAYLOAD: 1 << 12,
} as const;

/** Strings (names, queries, messages) may be at most this long (proto.md; QEMU's NBD_MAX_STRING_SIZE). */
export const NBD_MAX_STRING_SIZE = 4096;

/** The 124 zero bytes after EXPORT_NAME's reply unless NO_ZEROES was agreed. */
export const EXPORT_NAME_PADDING = 124;

// ---- transmission ---------------------------------------------------------------------------------

export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const NBD_EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** Header sizes in bytes. */
export const REQUEST_SIZE = 28;
export const EXTENDED_REQUEST_SIZE = 32;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;
export const EXTENDED_CHUNK_HEADER_SIZE = 32;

export const NBD_CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Names of the commands, for messages and traces. */
export const NBD_CMD_NAMES: Record<number, string> = Object.fromEntries(Object.entries(NBD_CMD).map(([k, v]) => [v, k]));

export const NBD_CMD_FLAG = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

/** Structured reply chunk flags. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;

/** Structured reply chunk types; error types have bit 15 set. */
export const NBD_REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

export function isErrorChunk(type: number): boolean {
  return (type & 0x8000) !== 0;
}

/** Error values on the wire (they are Linux errno numbers). */
export const NBD_ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export type NbdErrnoName = keyof typeof NBD_ERRNO;

/**
 * The NBD error for a local errno code: the protocol's own values pass through, QEMU's mappings for a
 * few others (EROFS → EPERM, EDQUOT/EFBIG → ENOSPC, EOPNOTSUPP → ENOTSUP), anything else is EINVAL as
 * the protocol asks (QEMU's system_errno_to_nbd_errno).
 */
export function nbdErrno(code: string): number {
  if (code in NBD_ERRNO) return NBD_ERRNO[code as NbdErrnoName];
  switch (code) {
    case 'EROFS':
      return NBD_ERRNO.EPERM;
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_ERRNO.ENOSPC;
    case 'EOPNOTSUPP':
      return NBD_ERRNO.ENOTSUP;
    default:
      return NBD_ERRNO.EINVAL;
  }
}

/** The errno name for an NBD error value (the reverse of nbdErrno, for clients); EIO for unknown values. */
export function errnoName(value: number): string {
  for (const [name, v] of Object.entries(NBD_ERRNO)) if (v === value) return name;
  return 'EIO';
}

// ---- metadata contexts ----------------------------------------------------------------------------

export const CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const CONTEXT_ALLOCATION_DEPTH = 'qemu:allocation-depth';
export const CONTEXT_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** base:allocation bits. */
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;
/** qemu:dirty-bitmap:NAME bit. */
export const NBD_STATE_DIRTY = 1 << 0;

/** At most this many extents in one block status chunk (proto.md's 2^20 is the hard limit; QEMU's 1 MiB / 8). */
export const MAX_BLOCK_STATUS_EXTENTS = (1 << 20) / 8;

// ---- a reader over a message's bytes --------------------------------------------------------------

/** Thrown by the decoders when a message is shorter or longer than its fields say. */
export class NbdProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}

/** Sequential big-endian reads over a buffer, failing with NbdProtocolError past its end. */
export class WireReader {
  private pos = 0;
  constructor(private readonly buf: Buffer) {}

  get remaining(): number {
    return this.buf.length - this.pos;
  }

  private need(n: number): void {
    if (this.remaining < n) throw new NbdProtocolError(`message too short: needs ${n} more bytes, has ${this.remaining}`);
  }
  u16(): number {
    this.need(2);
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  u64(): bigint {
    this.need(8);
    const v = this.buf.readBigUInt64BE(this.pos);
    this.pos += 8;
    return v;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const v = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
  /** A string of `n` UTF-8 bytes, at most NBD_MAX_STRING_SIZE. */
  string(n: number): string {
    if (n > NBD_MAX_STRING_SIZE) throw new NbdProtocolError(`string of ${n} bytes is longer than ${NBD_MAX_STRING_SIZE}`);
    return this.bytes(n).toString('utf8');
  }
  /** A u32 length, then that many bytes of string. */
  lengthPrefixedString(): string {
    return this.string(this.u32());
  }
  end(): void {
    if (this.remaining !== 0) throw new NbdProtocolError(`${this.remaining} unexpected bytes at the end of the message`);
  }
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}
function lengthPrefixed(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  return Buffer.concat([u32(b.length), b]);
}

// ---- handshake messages ---------------------------------------------------------------------------

/** The server's greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
export function encodeGreeting(handshakeFlags: number): Buffer {
  return Buffer.concat([u64(NBD_MAGIC), u64(NBD_OPTS_MAGIC), u16(handshakeFlags)]);
}

/** Parse the 18-byte greeting (client side). */
export function parseGreeting(buf: Buffer): { handshakeFlags: number } {
  const r = new WireReader(buf);
  if (r.u64() !== NBD_MAGIC) throw new NbdProtocolError('bad NBD magic in the greeting');
  if (r.u64() !== NBD_OPTS_MAGIC) throw new NbdProtocolError('not a newstyle server (no IHAVEOPT)');
  return { handshakeFlags: r.u16() };
}

/** Size of an option's header (IHAVEOPT, option, length). */
export const OPTION_HEADER_SIZE = 16;

export interface OptionHeader {
  option: number;
  length: number;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u64(NBD_OPTS_MAGIC), u32(option), u32(data.length), data]);
}

/** Parse an option header; a bad magic is a protocol error (the server drops the connection). */
export function parseOptionHeader(buf: Buffer): OptionHeader {
  const r = new WireReader(buf);
  if (r.u64() !== NBD_OPTS_MAGIC) throw new NbdProtocolError('bad option magic');
  return { option: r.u32(), length: r.u32() };
}

/** Size of an option reply's header. */
export const OPTION_REPLY_HEADER_SIZE = 20;

export function encodeOptionReply(option: number, replyType: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([u64(NBD_REP_MAGIC), u32(option), u32(replyType), u32(data.length), data]);
}

/** An error reply with a human-readable message (QEMU sends one with every error). */
export function encodeOptionError(option: number, replyType: number, message: string): Buffer {
  return encodeOptionReply(option, replyType, Buffer.from(message, 'utf8'));
}

export interface OptionReplyHeader {
  option: number;
  replyType: number;
  length: number;
}

export function parseOptionReplyHeader(buf: Buffer): OptionReplyHeader {
  const r = new WireReader(buf);
  if (r.u64() !== NBD_REP_MAGIC) throw new NbdProtocolError('bad option reply magic');
  return { option: r.u32(), replyType: r.u32(), length: r.u32() };
}

/** NBD_REP_SERVER payload (LIST): name, then an optional description. */
export function encodeRepServer(name: string, description?: string): Buffer {
  const parts = [lengthPrefixed(name)];
  if (description) parts.push(Buffer.from(description, 'utf8'));
  return Buffer.concat(parts);
}

export function parseRepServer(data: Buffer): { name: string; description: string } {
  const r = new WireReader(data);
  const name = r.lengthPrefixedString();
  return { name, description: r.string(r.remaining) };
}

/** The data of INFO and GO: an export name and the NBD_INFO_* items asked for. */
export interface InfoRequest {
  name: string;
  requests: number[];
}

export function encodeInfoRequest(req: InfoRequest): Buffer {
  return Buffer.concat([lengthPrefixed(req.name), u16(req.requests.length), ...req.requests.map(u16)]);
}

export function parseInfoRequest(data: Buffer): InfoRequest {
  const r = new WireReader(data);
  const name = r.lengthPrefixedString();
  const n = r.u16();
  const requests: number[] = [];
  for (let i = 0; i < n; i++) requests.push(r.u16());
  r.end();
  return { name, requests };
}

/** NBD_REP_INFO payloads. */
export function encodeInfoExport(size: bigint | number, transmissionFlags: number): Buffer {
  return Buffer.concat([u16(NBD_INFO.EXPORT), u64(size), u16(transmissionFlags)]);
}
export function encodeInfoName(name: string): Buffer {
  return Buffer.concat([u16(NBD_INFO.NAME), Buffer.from(name, 'utf8')]);
}
export function encodeInfoDescription(description: string): Buffer {
  return Buffer.concat([u16(NBD_INFO.DESCRIPTION), Buffer.from(description, 'utf8')]);
}

/** Block size constraints (NBD_INFO_BLOCK_SIZE). */
export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export function encodeInfoBlockSize(s: BlockSizes): Buffer {
  return Buffer.concat([u16(NBD_INFO.BLOCK_SIZE), u32(s.minimum), u32(s.preferred), u32(s.maximum)]);
}

export type InfoItem =
  | { type: 'export'; size: bigint; flags: number }
  | { type: 'name'; name: string }
  | { type: 'description'; description: string }
  | { type: 'block-size'; sizes: BlockSizes }
  | { type: 'unknown'; info: number };

export function parseInfoReply(data: Buffer): InfoItem {
  const r = new WireReader(data);
  const info = r.u16();
  switch (info) {
    case NBD_INFO.EXPORT: {
      const size = r.u64();
      const flags = r.u16();
      r.end();
      return { type: 'export', size, flags };
    }
    case NBD_INFO.NAME:
      return { type: 'name', name: r.string(r.remaining) };
    case NBD_INFO.DESCRIPTION:
      return { type: 'description', description: r.string(r.remaining) };
    case NBD_INFO.BLOCK_SIZE: {
      const sizes = { minimum: r.u32(), preferred: r.u32(), maximum: r.u32() };
      r.end();
      return { type: 'block-size', sizes };
    }
    default:
      return { type: 'unknown', info };
  }
}

/** The reply to EXPORT_NAME: size, transmission flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: bigint | number, transmissionFlags: number, noZeroes: boolean): Buffer {
  return Buffer.concat([u64(size), u16(transmissionFlags), Buffer.alloc(noZeroes ? 0 : EXPORT_NAME_PADDING)]);
}

/** The data of LIST_META_CONTEXT and SET_META_CONTEXT: an export name and the queries. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  return Buffer.concat([lengthPrefixed(req.name), u32(req.queries.length), ...req.queries.map(lengthPrefixed)]);
}

export function parseMetaContextRequest(data: Buffer): MetaContextRequest {
  const r = new WireReader(data);
  const name = r.lengthPrefixedString();
  const n = r.u32();
  // Each query takes at least its 4-byte length: a count the data cannot hold is a bad message.
  if (n > r.remaining / 4) throw new NbdProtocolError(`${n} queries do not fit in the option's data`);
  const queries: string[] = [];
  for (let i = 0; i < n; i++) queries.push(r.lengthPrefixedString());
  r.end();
  return { name, queries };
}

/** NBD_REP_META_CONTEXT payload: the context id and its name. */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  return Buffer.concat([u32(id), Buffer.from(name, 'utf8')]);
}

export function parseRepMetaContext(data: Buffer): { id: number; name: string } {
  const r = new WireReader(data);
  const id = r.u32();
  return { id, name: r.string(r.remaining) };
}

// ---- requests -------------------------------------------------------------------------------------

export interface NbdRequest {
  flags: number;
  type: number;
  /** Opaque, echoed in every reply ("handle" in older texts). */
  cookie: bigint;
  offset: bigint;
  /** The request's length (and, for WRITE, its payload's). 32 bits unless extended headers. */
  length: bigint;
}

/** The header size of a request in the mode in use. */
export function requestSize(extended: boolean): number {
  return extended ? EXTENDED_REQUEST_SIZE : REQUEST_SIZE;
}

export function encodeRequest(req: NbdRequest, extended: boolean): Buffer {
  const b = Buffer.alloc(requestSize(extended));
  b.writeUInt32BE(extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(req.flags, 4);
  b.writeUInt16BE(req.type, 6);
  b.writeBigUInt64BE(req.cookie, 8);
  b.writeBigUInt64BE(req.offset, 16);
  if (extended) b.writeBigUInt64BE(req.length, 24);
  else b.writeUInt32BE(Number(req.length), 24);
  return b;
}

/**
 * Parse a request header. The magic must be the one of the mode agreed (a compact request after
 * extended headers were negotiated is as bad as a wrong magic): a protocol error, after which the
 * stream cannot be trusted.
 */
export function parseRequest(buf: Buffer, extended: boolean): NbdRequest {
  const magic = buf.readUInt32BE(0);
  const want = extended ? NBD_EXTENDED_REQUEST_MAGIC : NBD_REQUEST_MAGIC;
  if (magic !== want) throw new NbdProtocolError(`bad request magic 0x${magic.toString(16)}`);
  return {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    cookie: buf.readBigUInt64BE(8),
    offset: buf.readBigUInt64BE(16),
    length: extended ? buf.readBigUInt64BE(24) : BigInt(buf.readUInt32BE(24)),
  };
}

// ---- replies --------------------------------------------------------------------------------------

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

/**
 * A structured reply chunk's header. In extended mode it is the 32-byte extended header, which echoes
 * the request's offset and has a 64-bit payload length.
 */
export function encodeChunkHeader(extended: boolean, flags: number, type: number, cookie: bigint, requestOffset: bigint, payloadLength: number): Buffer {
  if (extended) {
    const b = Buffer.alloc(EXTENDED_CHUNK_HEADER_SIZE);
    b.writeUInt32BE(NBD_EXTENDED_REPLY_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeBigUInt64BE(cookie, 8);
    b.writeBigUInt64BE(requestOffset, 16);
    b.writeBigUInt64BE(BigInt(payloadLength), 24);
    return b;
  }
  const b = Buffer.alloc(CHUNK_HEADER_SIZE);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(payloadLength, 16);
  return b;
}

/** Any reply's header as a client reads it: simple, structured or extended, told apart by the magic. */
export type ReplyHeader =
  | { kind: 'simple'; error: number; cookie: bigint }
  | { kind: 'chunk'; extended: boolean; flags: number; type: number; cookie: bigint; offset?: bigint; length: bigint };

/** How many bytes a reply header starting with `magic` has; undefined for an unknown magic. */
export function replyHeaderSize(magic: number): number | undefined {
  switch (magic) {
    case NBD_SIMPLE_REPLY_MAGIC:
      return SIMPLE_REPLY_SIZE;
    case NBD_STRUCTURED_REPLY_MAGIC:
      return CHUNK_HEADER_SIZE;
    case NBD_EXTENDED_REPLY_MAGIC:
      return EXTENDED_CHUNK_HEADER_SIZE;
    default:
      return undefined;
  }
}

export function parseReplyHeader(buf: Buffer): ReplyHeader {
  const magic = buf.readUInt32BE(0);
  switch (magic) {
    case NBD_SIMPLE_REPLY_MAGIC:
      return { kind: 'simple', error: buf.readUInt32BE(4), cookie: buf.readBigUInt64BE(8) };
    case NBD_STRUCTURED_REPLY_MAGIC:
      return { kind: 'chunk', extended: false, flags: buf.readUInt16BE(4), type: buf.readUInt16BE(6), cookie: buf.readBigUInt64BE(8), length: BigInt(buf.readUInt32BE(16)) };
    case NBD_EXTENDED_REPLY_MAGIC:
      return {
        kind: 'chunk',
        extended: true,
        flags: buf.readUInt16BE(4),
        type: buf.readUInt16BE(6),
        cookie: buf.readBigUInt64BE(8),
        offset: buf.readBigUInt64BE(16),
        length: buf.readBigUInt64BE(24),
      };
    default:
      throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
  }
}

/** OFFSET_DATA payload prefix: the offset of the data that follows. */
export function encodeOffsetDataPrefix(offset: bigint | number): Buffer {
  return u64(offset);
}

/** OFFSET_HOLE payload: offset and (non-zero, 32-bit in both header modes) size. */
export function encodeOffsetHole(offset: bigint | number, size: number): Buffer {
  return Buffer.concat([u64(offset), u32(size)]);
}

export function parseOffsetHole(data: Buffer): { offset: bigint; size: number } {
  const r = new WireReader(data);
  const v = { offset: r.u64(), size: r.u32() };
  r.end();
  return v;
}

/** One block status descriptor: a run of `length` bytes with status `flags`. */
export interface Extent {
  length: number;
  flags: number;
}

/**
 * A BLOCK_STATUS payload for one context: 32-bit descriptors, or (extended headers) the
 * BLOCK_STATUS_EXT form with a count and 64-bit descriptors. Returns the payload and its chunk type.
 */
export function encodeBlockStatus(contextId: number, extents: Extent[], extended: boolean): { type: number; payload: Buffer } {
  if (extended) {
    const b = Buffer.alloc(8 + 16 * extents.length);
    b.writeUInt32BE(contextId, 0);
    b.writeUInt32BE(extents.length, 4);
    extents.forEach((e, i) => {
      b.writeBigUInt64BE(BigInt(e.length), 8 + 16 * i);
      b.writeBigUInt64BE(BigInt(e.flags >>> 0), 16 + 16 * i);
    });
    return { type: NBD_REPLY_TYPE.BLOCK_STATUS_EXT, payload: b };
  }
  const b = Buffer.alloc(4 + 8 * extents.length);
  b.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, 4 + 8 * i);
    b.writeUInt32BE(e.flags >>> 0, 8 + 8 * i);
  });
  return { type: NBD_REPLY_TYPE.BLOCK_STATUS, payload: b };
}

export function parseBlockStatus(type: number, data: Buffer): { contextId: number; extents: Extent[] } {
  const r = new WireReader(data);
  const contextId = r.u32();
  const extents: Extent[] = [];
  if (type === NBD_REPLY_TYPE.BLOCK_STATUS_EXT) {
    const count = r.u32();
    if (count * 16 !== r.remaining) throw new NbdProtocolError(`block status: ${count} extents in ${r.remaining} bytes`);
    for (let i = 0; i < count; i++) extents.push({ length: Number(r.u64()), flags: Number(r.u64() & 0xffffffffn) });
  } else {
    if (r.remaining % 8 !== 0) throw new NbdProtocolError('block status: partial descriptor');
    while (r.remaining > 0) extents.push({ length: r.u32(), flags: r.u32() });
  }
  if (extents.length === 0) throw new NbdProtocolError('block status without a descriptor');
  return { contextId, extents };
}

/** ERROR chunk payload: the error value and a message (QEMU sends one). */
export function encodeErrorPayload(error: number, message: string): Buffer {
  let msg = Buffer.from(message, 'utf8');
  if (msg.length > NBD_MAX_STRING_SIZE) msg = msg.subarray(0, NBD_MAX_STRING_SIZE);
  return Buffer.concat([u32(error), u16(msg.length), msg]);
}

export function parseErrorPayload(type: number, data: Buffer): { error: number; message: string; offset?: bigint } {
  const r = new WireReader(data);
  const error = r.u32();
  const message = r.string(r.u16());
  const offset = type === NBD_REPLY_TYPE.ERROR_OFFSET ? r.u64() : undefined;
  return { error, message, offset };
}
