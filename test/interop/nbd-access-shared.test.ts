/**
 * The user-level commands that read a daemon's nodes over NBD (`bitmap show`, `copy --verify`; backup
 * --pull uses the same access) on a daemon whose NBD server the user has started: they add exports of
 * their own to it (found with __org.bitmirror_query-nbd-server) instead of failing, and leave the
 * server, the user's export and the user's client connected to it as they were. A unix socket and a
 * TCP server on port 0 (the port the daemon reports).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { runCli } from '../support/cli.js';
import { mustRun } from '../support/tools.js';
import { flush, io, MiB, setup } from '../support/daemon.js';
import { NbdClientConnection, type NbdClientAddress } from '../../src/nbd/client.js';
import { NBD_CMD } from '../../src/nbd/protocol.js';

for (const kind of ['unix', 'inet'] as const) {
  test(`bitmap show and copy --verify on a daemon whose NBD server (${kind}) the user started: it is used, and stays as the user left it`, async () => {
    const env = await setup(`nbd-shared-${kind}`);
    let user: NbdClientConnection | undefined;
    try {
      const { qmp } = env.d;
      const img = env.f('d.qcow2');
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
      await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
      await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'b0' });
      await io(env, 'disk0', 'write -P 0x5a 1M 64k');
      await io(env, 'disk0', 'write -P 0x6b 9M 4k');

      // The user's server, export and a client of it, connected throughout.
      const addr = kind === 'unix' ? { type: 'unix', path: env.f('user-nbd.sock') } : { type: 'inet', host: '127.0.0.1', port: '0' };
      await qmp.execute('nbd-server-start', { addr: { type: kind, data: { ...addr, type: undefined } } });
      const where = await qmp.execute<{ addr: { type: string; path?: string; host?: string; port?: string } }>('__org.bitmirror_query-nbd-server');
      if (kind === 'unix') assert.deepEqual(where, { addr });
      else assert.ok(Number(where.addr.port) > 0 && where.addr.host === '127.0.0.1', JSON.stringify(where));
      await qmp.execute('block-export-add', { type: 'nbd', id: 'user', 'node-name': 'disk0', name: 'vda', writable: true });
      const exportsBefore = await qmp.execute('query-block-exports');
      const clientAddr: NbdClientAddress = where.addr.type === 'unix' ? { kind: 'unix', path: where.addr.path! } : { kind: 'tcp', host: where.addr.host!, port: Number(where.addr.port) };
      user = await NbdClientConnection.open(clientAddr, 'vda');
      const userRead = async () => (await user!.request(NBD_CMD.READ, 1 * MiB, 64 * 1024)).data!;
      assert.ok((await userRead()).equals(Buffer.alloc(64 * 1024, 0x5a)));

      const show = await runCli(['bitmap', 'show', '--qmp', env.d.socket, 'disk0', 'b0', '--json']);
      assert.equal(show.code, 0, show.stderr);
      const extents = (JSON.parse(show.stdout) as { extents: Array<{ offset: number; length: number }> }).extents.map((e) => [e.offset, e.length]);
      assert.deepEqual(extents, [
        [1 * MiB, 64 * 1024],
        [9 * MiB, 64 * 1024],
      ]);

      // A copy that leaves the user's disk in place (--no-pivot), verified.
      const copy = await runCli(['copy', '--qmp', env.d.socket, '--no-pivot', '--verify', '--progress', 'json', 'disk0', env.f('copy.qcow2')]);
      assert.equal(copy.code, 0, copy.stderr);
      const result = JSON.parse(copy.stdout.trim().split('\n').pop()!) as { verify?: { identical: boolean } };
      assert.equal(result.verify?.identical, true, copy.stdout);
      await flush(env, 'disk0');
      await mustRun('qemu-img', ['compare', '-U', img, env.f('copy.qcow2')]);

      // The user's server, export and connection are as they were; no export or bitmap of the commands is left.
      assert.deepEqual(await qmp.execute('__org.bitmirror_query-nbd-server'), where);
      assert.deepEqual(await qmp.execute('query-block-exports'), exportsBefore);
      assert.ok((await userRead()).equals(Buffer.alloc(64 * 1024, 0x5a)));
      const nodes = await qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes', { flat: true });
      assert.deepEqual(nodes.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps']?.map((b) => b.name), ['b0']);
    } finally {
      await user?.close();
      await env.done();
    }
  });
}

test('__org.bitmirror_query-nbd-server without a server: QEMU\'s message for a server that is not running', async () => {
  const env = await setup('nbd-query');
  try {
    const r = await env.d.qmp.request('__org.bitmirror_query-nbd-server');
    assert.deepEqual('error' in r && r.error, { class: 'GenericError', desc: 'NBD server not running' });
  } finally {
    await env.done();
  }
});
