/** NBD protocol codecs: byte layouts from proto.md, round trips, and refusal of malformed messages. */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import * as p from '../../src/nbd/protocol.js';

test('greeting is NBDMAGIC, IHAVEOPT and the handshake flags', () => {
  const g = p.encodeGreeting(p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES);
  assert.equal(g.length, 18);
  assert.equal(g.subarray(0, 16).toString('latin1'), 'NBDMAGICIHAVEOPT');
  assert.equal(g.readUInt16BE(16), 3);
  assert.deepEqual(p.parseGreeting(g), { handshakeFlags: 3 });
  const bad = Buffer.from(g);
  bad[0] = 0;
  assert.throws(() => p.parseGreeting(bad), p.NbdProtocolError);
});

test('option header and option reply layouts', () => {
  const o = p.encodeOption(p.NBD_OPT.GO, Buffer.from('abc'));
  assert.equal(o.length, 19);
  assert.deepEqual(p.parseOptionHeader(o), { option: 7, length: 3 });
  const badMagic = Buffer.from(o);
  badMagic[3] ^= 1;
  assert.throws(() => p.parseOptionHeader(badMagic), /bad option magic/);
  const r = p.encodeOptionError(p.NBD_OPT.STRUCTURED_REPLY, p.NBD_REP.ERR_INVALID, 'oops');
  assert.equal(r.readBigUInt64BE(0), 0x0003e889045565a9n);
  assert.deepEqual(p.parseOptionReplyHeader(r), { option: 8, replyType: 0x80000003, length: 4 });
  assert.equal(r.subarray(20).toString(), 'oops');
  assert.ok(p.isOptionError(p.NBD_REP.ERR_UNSUP));
  assert.ok(!p.isOptionError(p.NBD_REP.ACK));
});

test('INFO/GO request round trip; truncated or trailing data is refused', () => {
  const data = p.encodeInfoRequest({ name: 'disk', requests: [p.NBD_INFO.BLOCK_SIZE, p.NBD_INFO.NAME] });
  assert.equal(data.length, 4 + 4 + 2 + 4);
  assert.deepEqual(p.parseInfoRequest(data), { name: 'disk', requests: [3, 1] });
  assert.throws(() => p.parseInfoRequest(data.subarray(0, data.length - 1)), p.NbdProtocolError);
  assert.throws(() => p.parseInfoRequest(Buffer.concat([data, Buffer.alloc(1)])), /unexpected bytes/);
  // A name longer than the protocol allows.
  const long = Buffer.alloc(4 + 5000 + 2);
  long.writeUInt32BE(5000, 0);
  assert.throws(() => p.parseInfoRequest(long), /longer than 4096/);
});

test('NBD_INFO replies: export (12 bytes), block size (14 bytes), name, description', () => {
  const e = p.encodeInfoExport(1n << 30n, 0x0ced);
  assert.equal(e.length, 12);
  assert.deepEqual(p.parseInfoReply(e), { type: 'export', size: 1n << 30n, flags: 0x0ced });
  const bs = p.encodeInfoBlockSize({ minimum: 1, preferred: 4096, maximum: 32 << 20 });
  assert.equal(bs.length, 14);
  assert.deepEqual(p.parseInfoReply(bs), { type: 'block-size', sizes: { minimum: 1, preferred: 4096, maximum: 32 << 20 } });
  assert.deepEqual(p.parseInfoReply(p.encodeInfoName('n')), { type: 'name', name: 'n' });
  assert.deepEqual(p.parseInfoReply(p.encodeInfoDescription('d')), { type: 'description', description: 'd' });
});

test('EXPORT_NAME reply: 124 zero bytes unless NO_ZEROES', () => {
  assert.equal(p.encodeExportNameReply(512, 1, false).length, 8 + 2 + 124);
  assert.equal(p.encodeExportNameReply(512, 1, true).length, 10);
});

test('meta context requests and replies', () => {
  const req = { name: '', queries: ['base:allocation', 'qemu:dirty-bitmap:b0'] };
  assert.deepEqual(p.parseMetaContextRequest(p.encodeMetaContextRequest(req)), req);
  // A query count the data cannot hold.
  const lying = p.encodeMetaContextRequest({ name: 'x', queries: [] });
  lying.writeUInt32BE(0x7fffffff, 5);
  assert.throws(() => p.parseMetaContextRequest(lying), /do not fit/);
  assert.deepEqual(p.parseRepMetaContext(p.encodeRepMetaContext(2, 'qemu:allocation-depth')), { id: 2, name: 'qemu:allocation-depth' });
  assert.deepEqual(p.parseRepServer(p.encodeRepServer('e', 'about e')), { name: 'e', description: 'about e' });
  assert.deepEqual(p.parseRepServer(p.encodeRepServer('e')), { name: 'e', description: '' });
});

test('requests: 28-byte compact and 32-byte extended forms; the magic must match the mode', () => {
  const req = { flags: p.NBD_CMD_FLAG.FUA, type: p.NBD_CMD.WRITE, cookie: 0xdeadbeefcafef00dn, offset: 1n << 40n, length: 4096n };
  const compact = p.encodeRequest(req, false);
  assert.equal(compact.length, 28);
  assert.equal(compact.readUInt32BE(0), 0x25609513);
  assert.deepEqual(p.parseRequest(compact, false), req);
  const ext = p.encodeRequest({ ...req, length: 1n << 33n }, true);
  assert.equal(ext.length, 32);
  assert.equal(ext.readUInt32BE(0), 0x21e41c71);
  assert.deepEqual(p.parseRequest(ext, true), { ...req, length: 1n << 33n });
  assert.throws(() => p.parseRequest(compact, true), /bad request magic 0x25609513/);
  assert.throws(() => p.parseRequest(Buffer.alloc(28), false), /bad request magic/);
});

test('replies: simple, structured and extended headers are told apart by their magic', () => {
  const s = p.encodeSimpleReply(22, 7n);
  assert.equal(s.length, 16);
  assert.deepEqual(p.parseReplyHeader(s), { kind: 'simple', error: 22, cookie: 7n });
  const c = p.encodeChunkHeader(false, p.NBD_REPLY_FLAG_DONE, p.NBD_REPLY_TYPE.OFFSET_DATA, 9n, 100n, 12);
  assert.equal(c.length, 20);
  assert.equal(p.replyHeaderSize(c.readUInt32BE(0)), 20);
  assert.deepEqual(p.parseReplyHeader(c), { kind: 'chunk', extended: false, flags: 1, type: 1, cookie: 9n, length: 12n });
  const x = p.encodeChunkHeader(true, 0, p.NBD_REPLY_TYPE.BLOCK_STATUS_EXT, 9n, 100n, 24);
  assert.equal(x.length, 32);
  assert.deepEqual(p.parseReplyHeader(x), { kind: 'chunk', extended: true, flags: 0, type: 6, cookie: 9n, offset: 100n, length: 24n });
  assert.throws(() => p.parseReplyHeader(Buffer.alloc(32)), /bad reply magic/);
  assert.equal(p.replyHeaderSize(0), undefined);
});

test('structured payloads: hole, block status (32- and 64-bit), error', () => {
  assert.deepEqual(p.parseOffsetHole(p.encodeOffsetHole(0xff000, 0x1000)), { offset: 0xff000n, size: 0x1000 });
  assert.equal(p.encodeOffsetHole(0, 1).length, 12);
  const extents = [
    { length: 65536, flags: p.NBD_STATE_HOLE | p.NBD_STATE_ZERO },
    { length: 4096, flags: 0 },
  ];
  const narrow = p.encodeBlockStatus(2, extents, false);
  assert.equal(narrow.type, 5);
  assert.equal(narrow.payload.length, 4 + 16);
  assert.deepEqual(p.parseBlockStatus(narrow.type, narrow.payload), { contextId: 2, extents });
  const wide = p.encodeBlockStatus(2, extents, true);
  assert.equal(wide.type, 6);
  assert.equal(wide.payload.length, 8 + 32);
  assert.deepEqual(p.parseBlockStatus(wide.type, wide.payload), { contextId: 2, extents });
  assert.throws(() => p.parseBlockStatus(5, Buffer.alloc(4)), /without a descriptor/);
  const err = p.encodeErrorPayload(p.NBD_ERRNO.EINVAL, 'bad');
  assert.deepEqual(p.parseErrorPayload(p.NBD_REPLY_TYPE.ERROR, err), { error: 22, message: 'bad', offset: undefined });
  assert.ok(p.isErrorChunk(p.NBD_REPLY_TYPE.ERROR_OFFSET));
  assert.ok(!p.isErrorChunk(p.NBD_REPLY_TYPE.OFFSET_HOLE));
});

test('errno mapping follows QEMU: EROFS→EPERM, EFBIG→ENOSPC, unknown→EINVAL', () => {
  assert.equal(p.nbdErrno('EIO'), 5);
  assert.equal(p.nbdErrno('EROFS'), 1);
  assert.equal(p.nbdErrno('EFBIG'), 28);
  assert.equal(p.nbdErrno('EDQUOT'), 28);
  assert.equal(p.nbdErrno('ENOMEDIUM'), 22);
  assert.equal(p.errnoName(28), 'ENOSPC');
  assert.equal(p.NBD_CMD_NAMES[p.NBD_CMD.BLOCK_STATUS], 'BLOCK_STATUS');
});
