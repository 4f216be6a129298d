/**
 * max-connections as QEMU: a client over the limit is not refused but waits, ungreeted, until a
 * connected client leaves (QEMU stops accepting at the limit and accepts again); then it is greeted
 * and served. Past the bound on waiting clients (16, or the limit if larger), a client is closed at
 * once, so a flood of connects holds nothing.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import * as P from '../../src/nbd/protocol.js';
import { mustRun, tempDir } from '../support/tools.js';
import { WireClient } from '../support/nbd-wire.js';
import { spawnDaemon } from '../../src/daemon/spawn.js';

const MiB = 1 << 20;

test('max-connections: clients over the limit wait for a free slot, past the waiting bound they are closed', async () => {
  const t = await tempDir('bm-nbd-max-');
  const image = path.join(t.dir, 'disk.raw');
  await mustRun('qemu-img', ['create', '-q', '-f', 'raw', image, '1M']);
  await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 1M', image]);
  const sock = path.join(t.dir, 'nbd.sock');
  const d = await spawnDaemon(path.join(t.dir, 'qmp.sock'), [
    '--blockdev', `driver=file,node-name=f0,filename=${image}`,
    '--nbd-server', `addr.type=unix,addr.path=${sock},max-connections=2`,
    '--export', 'type=nbd,id=e0,node-name=f0,name=ro',
  ]);
  const all: WireClient[] = [];
  const connect = async () => {
    const c = await WireClient.connect(sock);
    all.push(c);
    return c;
  };
  /** After the greeting: structured replies, GO to ro, and a read that finds the image's data. */
  const served = async (c: WireClient) => {
    assert.equal((await c.option(P.NBD_OPT.STRUCTURED_REPLY))[0].type, P.NBD_REP.ACK);
    const go = await c.option(P.NBD_OPT.GO, P.encodeInfoRequest({ name: 'ro', requests: [] }));
    assert.equal(go[go.length - 1].type, P.NBD_REP.ACK);
    c.request(P.NBD_CMD.READ, 0, 4096, 1n);
    const data = Buffer.concat((await c.chunks()).map((ch) => ch.payload.subarray(8)));
    assert.ok(data.equals(Buffer.alloc(4096, 0x11)));
  };
  try {
    const a = await connect();
    const b = await connect();
    for (const x of [a, b]) {
      await x.start();
      await served(x);
    }
    // The third waits: no greeting while a and b are served (a round trip on each after it connected).
    const c = await connect();
    let greeted = false;
    const greeting = c.start().then(() => (greeted = true));
    for (const x of [a, b]) {
      x.request(P.NBD_CMD.READ, MiB - 4096, 4096, 2n);
      await x.chunks();
    }
    await d.qmp.execute('query-version');
    assert.equal(greeted, false, 'a client over the limit is not greeted while the limit is reached');
    // a leaves: c is greeted and served.
    a.destroy();
    await greeting;
    await served(c);
    // 20 more (one after the other, so the server meets them in this order): 16 wait, 4 are closed.
    const flood: WireClient[] = [];
    for (let i = 0; i < 20; i++) flood.push(await connect());
    await Promise.all(flood.slice(16).map((f) => f.closed));
    // b and c leave: the two oldest waiting clients are greeted and served.
    b.destroy();
    c.destroy();
    for (const f of flood.slice(0, 2)) {
      await f.start();
      await served(f);
    }
  } finally {
    for (const c of all) c.destroy();
    assert.equal(await d.stop(), 0, d.stderr());
    await t.cleanup();
  }
});
