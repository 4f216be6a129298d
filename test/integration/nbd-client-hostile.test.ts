/**
 * The nbd block driver against a misbehaving server: a server in this test completes a correct
 * handshake (built with protocol.ts's codecs), then answers a read with a bad magic, a reply for a
 * cookie never sent, a chunk larger than the request, data outside the request, or half a reply before
 * it hangs up. Each read fails with EIO and a message naming the fault; the daemon keeps serving QMP.
 * A server that closes the connection: requests fail at once with reconnect-delay 0, and with
 * reconnect-delay set a read after the loss succeeds over a new connection. A server that gets the
 * handshake wrong (two meta contexts or another one than asked, an unexpected reply to GO, a short
 * export info, bad block sizes, a size no multiple of the minimum) is refused with qemu-io 7.2's words,
 * and a maximum block size that is no multiple of the minimum still gives aligned requests.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as net from 'node:net';
import * as P from '../../src/nbd/protocol.js';
import { SocketReader } from '../../src/nbd/socket-reader.js';
import { setup } from '../support/daemon.js';
import { errorOf, run } from '../support/tools.js';

const SIZE = 1 << 20;
type Misbehaviour = 'bad-magic' | 'unknown-cookie' | 'oversize' | 'outside' | 'short' | 'hang-up' | 'good';

/** A server that shakes hands correctly and then answers every read as `mode` says. */
function hostileServer(path: string, mode: () => Misbehaviour): Promise<{ close: () => Promise<void>; connections: () => number }> {
  let connections = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    connections++;
    sockets.add(sock);
    sock.on('error', () => {});
    sock.on('close', () => sockets.delete(sock));
    void serve(sock).catch(() => sock.destroy());
  });
  async function serve(sock: net.Socket): Promise<void> {
    const r = SocketReader.of(sock);
    sock.write(P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES));
    await r.read(4);
    for (let go = false; !go; ) {
      const h = P.parseOptionHeader(await r.read(P.OPTION_HEADER_SIZE));
      await r.read(h.length);
      if (h.option === P.NBD_OPT.STRUCTURED_REPLY) sock.write(P.encodeOptionReply(h.option, P.NBD_REP.ACK));
      else if (h.option === P.NBD_OPT.SET_META_CONTEXT) {
        sock.write(P.encodeOptionReply(h.option, P.NBD_REP.META_CONTEXT, P.encodeRepMetaContext(1, P.CONTEXT_BASE_ALLOCATION)));
        sock.write(P.encodeOptionReply(h.option, P.NBD_REP.ACK));
      } else if (h.option === P.NBD_OPT.GO) {
        sock.write(P.encodeOptionReply(h.option, P.NBD_REP.INFO, P.encodeInfoExport(SIZE, P.NBD_FLAG.HAS_FLAGS | P.NBD_FLAG.SEND_FLUSH)));
        sock.write(P.encodeOptionReply(h.option, P.NBD_REP.ACK));
        go = true;
      } else sock.write(P.encodeOptionError(h.option, P.NBD_REP.ERR_UNSUP, 'unsupported'));
    }
    for (;;) {
      const req = P.parseRequest(await r.read(P.REQUEST_SIZE), false);
      if (req.type === P.NBD_CMD.DISC) return;
      const len = Number(req.length);
      const data = (payload: Buffer, cookie = req.cookie, offset = req.offset) =>
        Buffer.concat([P.encodeChunkHeader(false, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE.OFFSET_DATA, cookie, offset, payload.length + 8), P.encodeOffsetDataPrefix(offset), payload]);
      if (req.type !== P.NBD_CMD.READ) {
        sock.write(P.encodeChunkHeader(false, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE.NONE, req.cookie, req.offset, 0));
        continue;
      }
      switch (mode()) {
        case 'good':
          sock.write(data(Buffer.alloc(len, 0x5a)));
          break;
        case 'bad-magic':
          sock.write(Buffer.alloc(32, 0x41));
          break;
        case 'unknown-cookie':
          sock.write(data(Buffer.alloc(len), req.cookie + 1000n));
          break;
        case 'oversize':
          sock.write(data(Buffer.alloc(len * 4)));
          break;
        case 'outside':
          sock.write(data(Buffer.alloc(len), req.cookie, req.offset + BigInt(len)));
          break;
        case 'short':
          sock.end(data(Buffer.alloc(len)).subarray(0, 40));
          return;
        case 'hang-up':
          sock.destroy();
          return;
      }
    }
  }
  return new Promise((resolve) =>
    server.listen(path, () =>
      resolve({
        connections: () => connections,
        close: () =>
          new Promise<void>((done) => {
            for (const s of sockets) s.destroy();
            server.close(() => done());
          }),
      }),
    ),
  );
}

test('a misbehaving server: each fault fails the read with EIO and a clear message, the daemon carries on', async () => {
  const env = await setup('nbdc-hostile');
  let mode: Misbehaviour = 'good';
  const srv = await hostileServer(env.f('hostile.sock'), () => mode);
  try {
    const faults: Array<[Misbehaviour, RegExp]> = [
      ['bad-magic', /bad reply magic 0x41414141/],
      ['unknown-cookie', /reply for unknown cookie/],
      ['oversize', /oversize reply chunk/],
      ['outside', /outside the request/],
      ['short', /server closed the connection/],
    ];
    await env.d.qmp.hmpOutput('trace-event nbd_client_connection_lost on');
    for (const [fault, why] of faults) {
      mode = 'good';
      await env.d.qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'h', server: { type: 'unix', path: env.f('hostile.sock') } });
      assert.match(await env.d.qmp.hmpOutput('qemu-io h "read -P 0x5a 0 4k"'), /^read 4096\/4096/);
      mode = fault;
      const out = await env.d.qmp.hmpOutput('qemu-io h "read 0 4k"');
      assert.match(out, /read failed: Input\/output error/, `${fault}: ${out}`);
      // The connection is gone: later requests fail too (reconnect-delay is 0).
      mode = 'good';
      assert.match(await env.d.qmp.hmpOutput('qemu-io h "read 0 4k"'), /read failed: Input\/output error/);
      await env.d.qmp.execute('blockdev-del', { 'node-name': 'h' });
      assert.match(env.d.stderr(), why, fault);
    }
    await env.d.qmp.execute('query-version');
  } finally {
    await srv.close();
    await env.done();
  }
});

test('reconnect-delay: after the server hangs up, a read is sent again on a new connection', async () => {
  const env = await setup('nbdc-reconnect');
  const srv = await hostileServer(env.f('r.sock'), () => 'good');
  try {
    await env.d.qmp.execute('blockdev-add', {
      driver: 'nbd', 'node-name': 'r', server: { type: 'unix', path: env.f('r.sock') }, 'reconnect-delay': 30, '__org.bitmirror_connections': 1,
    });
    const before = srv.connections();
    assert.ok(before >= 1);
    // The server restarts, and the new one hangs up on the first read only: the read is sent again.
    let hungUp = false;
    const modeOnce = (): Misbehaviour => {
      if (hungUp) return 'good';
      hungUp = true;
      return 'hang-up';
    };
    await srv.close();
    const srv2 = await hostileServer(env.f('r.sock'), modeOnce);
    try {
      // The old server is gone (its connection closed); the node reconnects to the new one.
      assert.match(await env.d.qmp.hmpOutput('qemu-io r "read -P 0x5a 0 64k"'), /^read 65536\/65536/);
      assert.ok(srv2.connections() >= 2, `connections to the new server: ${srv2.connections()}`);
    } finally {
      await env.d.qmp.execute('blockdev-del', { 'node-name': 'r' });
      await srv2.close();
    }
  } finally {
    await env.done();
  }
});

type HandshakeFault = 'two-contexts' | 'other-context' | 'unknown-reply' | 'short-export-info' | 'min-3' | 'preferred-below-min' | 'max-below-min' | 'size-not-multiple' | 'max-5000';

/**
 * A server that gets the handshake wrong as `fault` says (else answers as the server above), serves
 * reads with 0x5a, and records every request's [offset, length].
 */
function handshakeServer(path: string, fault: HandshakeFault): Promise<{ requests: Array<[number, number]>; close: () => Promise<void> }> {
  const requests: Array<[number, number]> = [];
  const sockets = new Set<net.Socket>();
  const sizes = (minimum: number, preferred: number, maximum: number): Buffer => P.encodeInfoBlockSize({ minimum, preferred, maximum });
  const blockSizes: Partial<Record<HandshakeFault, Buffer>> = {
    'min-3': sizes(3, 4096, 1 << 20),
    'preferred-below-min': sizes(4096, 512, 1 << 20),
    'max-below-min': sizes(4096, 4096, 512),
    'size-not-multiple': sizes(4096, 4096, 1 << 20),
    'max-5000': sizes(512, 4096, 5000),
  };
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('error', () => {});
    sock.on('close', () => sockets.delete(sock));
    void serve(sock).catch(() => sock.destroy());
  });
  async function serve(sock: net.Socket): Promise<void> {
    const r = SocketReader.of(sock);
    sock.write(P.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES));
    await r.read(4);
    for (let go = false; !go; ) {
      const h = P.parseOptionHeader(await r.read(P.OPTION_HEADER_SIZE));
      const data = await r.read(h.length);
      const reply = (type: number, payload?: Buffer) => sock.write(P.encodeOptionReply(h.option, type, payload));
      if (h.option === P.NBD_OPT.STRUCTURED_REPLY) reply(P.NBD_REP.ACK);
      else if (h.option === P.NBD_OPT.SET_META_CONTEXT) {
        const asked = P.parseMetaContextRequest(data).queries[0];
        reply(P.NBD_REP.META_CONTEXT, P.encodeRepMetaContext(1, fault === 'other-context' ? P.CONTEXT_ALLOCATION_DEPTH : asked));
        if (fault === 'two-contexts') reply(P.NBD_REP.META_CONTEXT, P.encodeRepMetaContext(2, asked));
        reply(P.NBD_REP.ACK);
      } else if (h.option === P.NBD_OPT.GO) {
        if (fault === 'unknown-reply') reply(0x7ff0, Buffer.alloc(3));
        // The block sizes first: QEMU checks the size against a minimum it has already received.
        const bs = blockSizes[fault];
        if (bs) reply(P.NBD_REP.INFO, bs);
        const size = fault === 'size-not-multiple' ? SIZE + 512 : SIZE;
        reply(P.NBD_REP.INFO, fault === 'short-export-info' ? Buffer.from([0, P.NBD_INFO.EXPORT, 1]) : P.encodeInfoExport(size, P.NBD_FLAG.HAS_FLAGS | P.NBD_FLAG.SEND_FLUSH));
        reply(P.NBD_REP.ACK);
        go = true;
      } else sock.write(P.encodeOptionError(h.option, P.NBD_REP.ERR_UNSUP, 'unsupported'));
    }
    for (;;) {
      const req = P.parseRequest(await r.read(P.REQUEST_SIZE), false);
      if (req.type === P.NBD_CMD.DISC) return;
      const len = Number(req.length);
      requests.push([Number(req.offset), len]);
      if (req.type === P.NBD_CMD.READ) {
        const payload = Buffer.alloc(len, 0x5a);
        sock.write(Buffer.concat([P.encodeChunkHeader(false, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE.OFFSET_DATA, req.cookie, req.offset, len + 8), P.encodeOffsetDataPrefix(req.offset), payload]));
      } else if (req.type === P.NBD_CMD.BLOCK_STATUS) {
        const bs = P.encodeBlockStatus(1, [{ length: len, flags: 0 }], false);
        sock.write(Buffer.concat([P.encodeChunkHeader(false, P.NBD_REPLY_FLAG_DONE, bs.type, req.cookie, req.offset, bs.payload.length), bs.payload]));
      } else sock.write(P.encodeChunkHeader(false, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE.NONE, req.cookie, req.offset, 0));
    }
  }
  return new Promise((resolve) =>
    server.listen(path, () =>
      resolve({
        requests,
        close: () =>
          new Promise<void>((done) => {
            for (const s of sockets) s.destroy();
            server.close(() => done());
          }),
      }),
    ),
  );
}

test('a server that gets the handshake wrong is refused with the message qemu-io 7.2 gives for the same server', async () => {
  const env = await setup('nbdc-handshake');
  try {
    const faults: HandshakeFault[] = ['two-contexts', 'other-context', 'unknown-reply', 'short-export-info', 'min-3', 'preferred-below-min', 'max-below-min', 'size-not-multiple'];
    for (const fault of faults) {
      const sock = env.f(`${fault}.sock`);
      const srv = await handshakeServer(sock, fault);
      try {
        const ours = await errorOf(env.d.qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'h', server: { type: 'unix', path: sock } }));
        const q = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 4k', `nbd+unix:///?socket=${sock}`]);
        const theirs = /can't open device .*?\.sock: (.*)/.exec(q.stderr)?.[1];
        assert.ok(theirs, `${fault}: qemu-io refuses the server: ${q.stderr}${q.stdout}`);
        assert.equal(ours, theirs, fault);
        assert.equal(srv.requests.length, 0, `${fault}: no request reached the server`);
      } finally {
        await srv.close();
      }
    }
    // A maximum that is no multiple of the minimum: requests are cut at multiples of the minimum (4608).
    const sock = env.f('max.sock');
    const srv = await handshakeServer(sock, 'max-5000');
    try {
      await env.d.qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'm', server: { type: 'unix', path: sock } });
      assert.match(await env.d.qmp.hmpOutput('qemu-io m "read -P 0x5a 0 64k"'), /^read 65536\/65536/);
      const reads = srv.requests.filter(([, len]) => len > 0);
      assert.ok(reads.length >= 65536 / 4608, `the read was split: ${JSON.stringify(reads)}`);
      for (const [off, len] of reads) assert.ok(off % 512 === 0 && len % 512 === 0 && len <= 4608, `aligned request [${off}, +${len})`);
      await env.d.qmp.execute('blockdev-del', { 'node-name': 'm' });
    } finally {
      await srv.close();
    }
  } finally {
    await env.done();
  }
});
