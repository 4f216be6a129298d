/**
 * The `nbd` block driver against real servers: qemu-nbd, qemu-storage-daemon's nbd export, nbdkit's
 * memory plugin and bitmirror's own export. qemu-io through HMP reads and writes over the wire; a full
 * mirror and a backup from a local qcow2 into the nbd node, and a mirror out of an nbd node, compare
 * identical (qemu-img compare); qemu-storage-daemon writes through a bitmirror export (its own backup
 * job into an nbd node) while bitmirror mirrors the exported node, and the copy compares identical.
 * Multi-conn is checked on the server side: nbdkit's log filter records every connection; so is the
 * FAST_ZERO flag of a write-zeroes asked not to fall back (qemu-io write -z -n), and the size and depth
 * of the writes of a copy into a node with connections (directly, through a qcow2 over one, a backup).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { assertIdentical, haveQsd, io, poll, qcow2, setup, startDaemon, type Env } from '../support/daemon.js';
import { mustRun, run } from '../support/tools.js';

const MiB = 1024 * 1024;
const haveNbdkit = await run('nbdkit', ['--version']).then((r) => r.code === 0);

/** A 16 MiB qcow2 with patterns at a few places, a zeroed range and unallocated space between. */
async function sourceImage(file: string): Promise<void> {
  await qcow2(file, 16 * MiB);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 64k', '-c', 'write -P 0xcd 3M 1M', '-c', 'write -z 6M 1M', '-c', 'write -P 0x11 15M 512', file]);
}

/** Start a server that forks once its socket is ready and writes its pid; returns a stop function. */
async function startForking(cmd: string, args: string[], pidFile: string): Promise<() => Promise<void>> {
  await mustRun(cmd, args);
  // nbdkit's parent may exit before its child has written the pid file (written once it listens).
  await poll(`${cmd}'s pid file`, async () => /^\d+\s*$/.test(await fsp.readFile(pidFile, 'utf8').catch(() => '')));
  const pid = Number((await fsp.readFile(pidFile, 'utf8')).trim());
  return async () => {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      return;
    }
    // Wait for it to be gone, so its files are closed before they are compared.
    for (;;) {
      try {
        process.kill(pid, 0);
      } catch {
        return;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  };
}

async function qemuNbd(dir: string, image: string, fmt: string, name = 'q'): Promise<{ sock: string; stop: () => Promise<void> }> {
  const sock = path.join(dir, `${name}.sock`);
  const pid = path.join(dir, `${name}.pid`);
  const stop = await startForking('qemu-nbd', ['--fork', '--pid-file', pid, '-k', sock, '-f', fmt, '-e', '8', '--cache=none', '--aio=threads', image], pid);
  return { sock, stop };
}

function nbdNode(node: string, sock: string, exportName = '', extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { driver: 'nbd', 'node-name': node, server: { type: 'unix', path: sock }, export: exportName, ...extra };
}

/**
 * From an nbdkit log filter's log (the filter outside any delay): the connections that did their
 * handshake, the most writes in flight at once, and every write's offset and size in bytes.
 */
async function writesSeen(log: string): Promise<{ conns: number; depth: number; writes: Array<[number, number]> }> {
  const text = await fsp.readFile(log, 'utf8');
  const conns = new Set([...text.matchAll(/connection=(\d+) Connect/g)].map((m) => m[1])).size;
  let now = 0;
  let depth = 0;
  const writes: Array<[number, number]> = [];
  for (const line of text.split('\n')) {
    const w = / Write id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/.exec(line);
    if (w) {
      depth = Math.max(depth, ++now);
      writes.push([Number(w[1]), Number(w[2])]);
    } else if (/ \.\.\.Write id=\d+ return/.test(line)) now--;
  }
  return { conns, depth, writes };
}

async function mirror(env: Env, device: string, target: string, sync = 'full'): Promise<void> {
  await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'm', device, target, sync });
  await env.d.qmp.waitEvent('BLOCK_JOB_READY', { device: 'm' });
  await env.d.qmp.execute('block-job-complete', { device: 'm' });
  const done = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'm' });
  assert.equal((done.data as Record<string, unknown>).error, undefined, JSON.stringify(done.data));
}

async function backup(env: Env, device: string, target: string): Promise<void> {
  await env.d.qmp.execute('blockdev-backup', { 'job-id': 'b', device, target, sync: 'full' });
  const done = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'b' });
  assert.equal((done.data as Record<string, unknown>).error, undefined, JSON.stringify(done.data));
}

test('qemu-nbd: qemu-io over the wire, a full mirror and a backup into the nbd node, a mirror out of one', async () => {
  const env = await setup('nbdc-qnbd');
  const src = env.f('src.qcow2');
  await sourceImage(src);
  const target = env.f('target.raw');
  await mustRun('qemu-img', ['create', '-f', 'raw', target, '16M']);
  const server = await qemuNbd(env.dir, target, 'raw');
  try {
    await env.d.qmp.execute('blockdev-add', nbdNode('n0', server.sock));
    // Reads, writes, zeroes, trim and flush through HMP qemu-io.
    assert.match(await io(env, 'n0', 'write -P 0x5a 1M 64k'), /^wrote 65536\/65536 bytes at offset 1048576/);
    assert.match(await io(env, 'n0', 'read -P 0x5a 1M 64k'), /^read 65536\/65536/);
    await io(env, 'n0', 'write -z 1M 4k');
    await io(env, 'n0', 'read -P 0 1M 4k');
    await io(env, 'n0', 'discard 2M 64k');
    await io(env, 'n0', 'flush');
    const nodes = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
    const n0 = nodes.find((n) => n['node-name'] === 'n0')!;
    assert.equal(n0.drv, 'nbd');
    assert.equal((n0.image as Record<string, unknown>)['virtual-size'], 16 * MiB);

    // A mirror of a local qcow2 into it, then a backup: each compares identical with the source.
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 's0', file: { driver: 'file', filename: src } });
    await mirror(env, 's0', 'n0');
    await io(env, 'n0', 'flush');
    await assertIdentical(src, `nbd+unix:///?socket=${server.sock}`, ['-f', 'qcow2', '-F', 'raw']);
    await io(env, 'n0', 'write -P 0xee 0 8M');
    await backup(env, 's0', 'n0');
    await io(env, 'n0', 'flush');
    await assertIdentical(src, `nbd+unix:///?socket=${server.sock}`, ['-f', 'qcow2', '-F', 'raw']);

    // And the nbd node as a mirror's source.
    const copy = env.f('copy.qcow2');
    await qcow2(copy, 16 * MiB);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'c0', file: { driver: 'file', filename: copy } });
    await mirror(env, 'n0', 'c0');
    await io(env, 'c0', 'flush');
    await assertIdentical(copy, `nbd+unix:///?socket=${server.sock}`, ['-f', 'qcow2', '-F', 'raw']);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'n0' });
  } finally {
    await env.done();
    await server.stop();
  }
});

test('nbd node refusals: missing server, missing export, tls-creds, read-only export', async () => {
  const env = await setup('nbdc-refuse');
  const img = env.f('ro.raw');
  await mustRun('qemu-img', ['create', '-f', 'raw', img, '1M']);
  const sock = path.join(env.dir, 'ro.sock');
  const pid = path.join(env.dir, 'ro.pid');
  const stop = await startForking('qemu-nbd', ['--fork', '--pid-file', pid, '-k', sock, '-f', 'raw', '-r', '-x', 'exp', '-t', img], pid);
  try {
    const err = async (opts: Record<string, unknown>) => {
      try {
        await env.d.qmp.execute('blockdev-add', opts);
      } catch (e) {
        return (e as Error).message;
      }
      assert.fail('blockdev-add succeeded');
    };
    assert.match(await err(nbdNode('x', env.f('nope.sock'))), /Failed to connect to '.*nope\.sock': No such file or directory/);
    assert.match(await err(nbdNode('x', sock, 'other')), /Requested export not available/);
    assert.match(await err(nbdNode('x', sock, 'exp', { 'tls-creds': 't0' })), /No TLS credentials with id 't0'/);
    assert.match(await err(nbdNode('x', sock, 'exp')), /NBD export is read-only/);
    await env.d.qmp.execute('blockdev-add', nbdNode('r', sock, 'exp', { 'read-only': true }));
    await io(env, 'r', 'read -P 0 0 64k');
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'r' });
  } finally {
    await env.done();
    await stop();
  }
});

test('nbdkit memory: a full mirror into it over several connections (multi-conn seen by its log filter)', { skip: !haveNbdkit && 'nbdkit not installed' }, async () => {
  const env = await setup('nbdc-kit');
  const src = env.f('src.qcow2');
  await sourceImage(src);
  const sock = env.f('kit.sock');
  const log = env.f('kit.log');
  const stop = await startForking('nbdkit', ['-P', env.f('kit.pid'), '-U', sock, '--filter=log', 'memory', '16M', `logfile=${log}`], env.f('kit.pid'));
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 's0', file: { driver: 'file', filename: src } });
    await env.d.qmp.execute('blockdev-add', nbdNode('n0', sock));
    await mirror(env, 's0', 'n0');
    await io(env, 'n0', 'flush');
    await assertIdentical(src, `nbd+unix:///?socket=${sock}`, ['-f', 'qcow2', '-F', 'raw']);
    const text = await fsp.readFile(log, 'utf8');
    // Every connection the node opened did its own handshake; writes went out on more than one.
    const conns = new Set([...text.matchAll(/connection=(\d+) Connect/g)].map((m) => m[1]));
    const writers = new Set([...text.matchAll(/connection=(\d+) Write /g)].map((m) => m[1]));
    assert.ok(conns.size >= 4, `connections: ${conns.size}\n${text.slice(0, 2000)}`);
    assert.ok(writers.size >= 2, `connections that wrote: ${writers.size}`);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'n0' });
  } finally {
    await env.done();
    await stop();
  }
});

test("mirror depth: one connection (__org.bitmirror_connections 1) keeps QEMU's 16 writes in flight; multi-conn's connections keep more (nbdkit delaying every write)", { skip: !haveNbdkit && 'nbdkit not installed' }, async () => {
  const env = await setup('nbdc-depth');
  const src = env.f('src.qcow2');
  // 48 extents of 1 MiB with a hole after each: one copy each, so depth is counted in requests.
  await qcow2(src, 96 * MiB);
  const writes: string[] = [];
  for (let i = 0; i < 48; i++) writes.push('-c', `write -P ${i + 1} ${2 * i}M 1M`);
  await mustRun('qemu-io', ['-f', 'qcow2', ...writes, src]);
  const stops: Array<() => Promise<void>> = [];
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 's0', file: { driver: 'file', filename: src } });
    for (const [name, extra] of [['one', { '__org.bitmirror_connections': 1 }], ['multi', {}]] as const) {
      const sock = env.f(`${name}.sock`);
      const log = env.f(`${name}.log`);
      // Every write takes half a second: whatever the mirror can have in flight, it has.
      const args = ['-P', env.f(`${name}.pid`), '-U', sock, '--filter=log', '--filter=delay', 'memory', '96M', `logfile=${log}`, 'delay-write=500ms'];
      stops.push(await startForking('nbdkit', args, env.f(`${name}.pid`)));
      await env.d.qmp.execute('blockdev-add', nbdNode(name, sock, '', extra));
      await mirror(env, 's0', name);
      await env.d.qmp.execute('blockdev-del', { 'node-name': name });
      // Read before qemu-img compare connects too.
      const got = await writesSeen(log);
      await assertIdentical(src, `nbd+unix:///?socket=${sock}`, ['-f', 'qcow2', '-F', 'raw']);
      if (name === 'one') assert.deepEqual({ conns: got.conns, depth: got.depth }, { conns: 1, depth: 16 });
      else {
        assert.equal(got.conns, 4);
        assert.ok(got.depth > 16, `writes in flight: ${got.depth}`);
      }
    }
  } finally {
    await env.done();
    for (const stop of stops) await stop();
  }
});

test('mirror into an nbd node: contiguous data goes in 4 MiB writes (MAX_STREAM_IO_BYTES), 1 MiB extents in 1 MiB writes (nbdkit log)', { skip: !haveNbdkit && 'nbdkit not installed' }, async () => {
  const env = await setup('nbdc-pieces');
  const src = env.f('src.qcow2');
  // 16 MiB of contiguous data, then 1 MiB extents with a hole after each.
  await qcow2(src, 32 * MiB);
  const writes = ['-c', 'write -P 7 0 16M'];
  for (let i = 0; i < 4; i++) writes.push('-c', `write -P ${i + 1} ${16 + 2 * i}M 1M`);
  await mustRun('qemu-io', ['-f', 'qcow2', ...writes, src]);
  const sock = env.f('kit.sock');
  const log = env.f('kit.log');
  const stop = await startForking('nbdkit', ['-P', env.f('kit.pid'), '-U', sock, '--filter=log', 'memory', '32M', `logfile=${log}`], env.f('kit.pid'));
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 's0', file: { driver: 'file', filename: src } });
    await env.d.qmp.execute('blockdev-add', nbdNode('t0', sock, '', { '__org.bitmirror_connections': 1 }));
    await mirror(env, 's0', 't0');
    await env.d.qmp.execute('blockdev-del', { 'node-name': 't0' });
    const text = await fsp.readFile(log, 'utf8');
    const sizes = [...text.matchAll(/ Write id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/g)].map((m) => [Number(m[1]) / MiB, Number(m[2]) / MiB]);
    sizes.sort((a, b) => a[0] - b[0]);
    assert.deepEqual(sizes, [[0, 4], [4, 4], [8, 4], [12, 4], [16, 1], [18, 1], [20, 1], [22, 1]]);
    await assertIdentical(src, `nbd+unix:///?socket=${sock}`, ['-f', 'qcow2', '-F', 'raw']);
  } finally {
    await env.done();
    await stop();
  }
});

test('mirror into a qcow2 whose file is an nbd node: the connections pass up through the format node, contiguous data goes in 4 MiB writes (nbdkit log)', { skip: !haveNbdkit && 'nbdkit not installed' }, async () => {
  const env = await setup('nbdc-qcow2');
  const src = env.f('src.qcow2');
  // 16 MiB of contiguous data, then 1 MiB extents with a hole after each.
  await qcow2(src, 32 * MiB);
  const writes = ['-c', 'write -P 7 0 16M'];
  for (let i = 0; i < 4; i++) writes.push('-c', `write -P ${i + 1} ${16 + 2 * i}M 1M`);
  await mustRun('qemu-io', ['-f', 'qcow2', ...writes, src]);
  // The target's qcow2 image is a file nbdkit serves; bitmirror opens qcow2 over an nbd node on it.
  // An export does not grow: the file has room for every cluster beforehand.
  const image = await qcow2(env.f('target.qcow2'), 32 * MiB);
  await fsp.truncate(image, 40 * MiB);
  const sock = env.f('kit.sock');
  const log = env.f('kit.log');
  const stop = await startForking('nbdkit', ['-P', env.f('kit.pid'), '-U', sock, '--filter=log', 'file', image, `logfile=${log}`], env.f('kit.pid'));
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 's0', file: { driver: 'file', filename: src } });
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 't0', file: nbdNode('n0', sock) });
    await mirror(env, 's0', 't0');
    await env.d.qmp.execute('blockdev-del', { 'node-name': 't0' });
    const got = await writesSeen(log);
    await stop();
    await assertIdentical(src, image, ['-f', 'qcow2', '-F', 'qcow2']);
    assert.equal(got.conns, 4);
    // The contiguous 16 MiB went in pieces of MAX_STREAM_IO_BYTES (the mirror's 1 MiB if the format
    // node hid its file's connections); the extents in writes of their own size.
    const sizes = got.writes.map(([, n]) => n);
    assert.equal(sizes.filter((n) => n === 4 * MiB).length, 4, `sizes: ${sizes.join(' ')}`);
    assert.equal(sizes.filter((n) => n === MiB).length, 4, `sizes: ${sizes.join(' ')}`);
  } finally {
    await env.done();
    await stop();
  }
});

test('backup into an nbd node with connections: 4 MiB writes of contiguous data; x-perf max-chunk and max-workers still bound both (nbdkit log)', { skip: !haveNbdkit && 'nbdkit not installed' }, async () => {
  const env = await setup('nbdc-backup');
  const src = env.f('src.qcow2');
  // 16 MiB of contiguous data, then 24 extents of 64 KiB with a hole after each.
  await qcow2(src, 32 * MiB);
  const writes = ['-c', 'write -P 7 0 16M'];
  for (let i = 0; i < 24; i++) writes.push('-c', `write -P ${i + 1} ${16 * 1024 + 128 * i}k 64k`);
  await mustRun('qemu-io', ['-f', 'qcow2', ...writes, src]);
  const stops: Array<() => Promise<void>> = [];
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 's0', file: { driver: 'file', filename: src } });
    for (const [name, perf] of [['plain', undefined], ['perf', { 'max-chunk': MiB, 'max-workers': 2 }]] as const) {
      const sock = env.f(`${name}.sock`);
      const log = env.f(`${name}.log`);
      const args = ['-P', env.f(`${name}.pid`), '-U', sock, '--filter=log', '--filter=delay', 'memory', '32M', `logfile=${log}`, 'delay-write=100ms'];
      stops.push(await startForking('nbdkit', args, env.f(`${name}.pid`)));
      await env.d.qmp.execute('blockdev-add', nbdNode(name, sock));
      await env.d.qmp.execute('blockdev-backup', { 'job-id': 'b', device: 's0', target: name, sync: 'full', ...(perf ? { 'x-perf': perf } : {}) });
      const done = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'b' });
      assert.equal((done.data as Record<string, unknown>).error, undefined, JSON.stringify(done.data));
      await env.d.qmp.execute('blockdev-del', { 'node-name': name });
      const got = await writesSeen(log);
      await assertIdentical(src, `nbd+unix:///?socket=${sock}`, ['-f', 'qcow2', '-F', 'raw']);
      assert.equal(got.conns, 4);
      const sizes = got.writes.map(([, n]) => n);
      if (name === 'plain') {
        // The contiguous data in MAX_STREAM_IO_BYTES pieces (1 MiB, BLOCK_COPY_MAX_BUFFER, without streams).
        assert.equal(sizes.filter((n) => n === 4 * MiB).length, 4, `sizes: ${sizes.join(' ')}`);
      } else {
        assert.ok(Math.max(...sizes) <= MiB, `sizes: ${sizes.join(' ')}`);
        assert.ok(got.depth <= 2, `writes in flight: ${got.depth}`);
      }
    }
  } finally {
    await env.done();
    for (const stop of stops) await stop();
  }
});

test('fast zero (qemu-io write -z -n, BDRV_REQ_NO_FALLBACK) goes out as NBD_CMD_FLAG_FAST_ZERO; a server refusing it fails the write with ENOTSUP, nothing written', { skip: !haveNbdkit && 'nbdkit not installed' }, async () => {
  const env = await setup('nbdc-fastzero');
  // Three nbdkit memory servers, each behind a log filter that records every request's flags and
  // result: 'fast' zeroes fast; 'slow' (nozero fastzeromode=slow) announces fast zero and refuses every
  // such request with ENOTSUP; 'none' (fastzeromode=none) zeroes but does not announce fast zero.
  const kit = (name: string, params: string[]) =>
    startForking(
      'nbdkit',
      ['-P', env.f(`${name}.pid`), '-U', env.f(`${name}.sock`), '--filter=log', ...(params.length ? ['--filter=nozero'] : []), 'memory', '4M', `logfile=${env.f(`${name}.log`)}`, ...params],
      env.f(`${name}.pid`),
    );
  const stops = [await kit('fast', []), await kit('slow', ['zeromode=plugin', 'fastzeromode=slow']), await kit('none', ['zeromode=plugin', 'fastzeromode=none'])];
  const log = (name: string) => fsp.readFile(env.f(`${name}.log`), 'utf8');
  /** The Zero requests the server saw: offset, count, fast flag. */
  const zeroes = async (name: string) => [...(await log(name)).matchAll(/Zero id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) .*?fast=(\d)/g)].map((m) => [Number(m[1]), Number(m[2]), m[3]]);
  await mustRun('qemu-img', ['create', '-f', 'raw', env.f('q.raw'), '4M']);
  const server = await qemuNbd(env.dir, env.f('q.raw'), 'raw');
  try {
    for (const name of ['fast', 'slow', 'none']) await env.d.qmp.execute('blockdev-add', nbdNode(name, env.f(`${name}.sock`)));
    await io(env, 'fast', 'write -P 0x5a 0 2M');
    await io(env, 'fast', 'write -z -n 0 1M');
    await io(env, 'fast', 'write -z 1M 64k');
    assert.deepEqual(await zeroes('fast'), [
      [0, MiB, '1'],
      [MiB, 65536, '0'],
    ]);
    await io(env, 'fast', 'read -P 0 0 1088k');
    await io(env, 'fast', 'read -P 0x5a 1088k 960k');

    // The server's ENOTSUP comes back as the request's error; no fallback writes the zeroes instead.
    await io(env, 'slow', 'write -P 0x5a 0 1M');
    assert.match(await env.d.qmp.hmpOutput('qemu-io slow "write -z -n 0 64k"'), /^write failed: Operation not supported/);
    assert.deepEqual(await zeroes('slow'), [[0, 65536, '1']]);
    assert.match(await log('slow'), /\.\.\.Zero id=\d+ return=-1 error=ENOTSUP/);
    await io(env, 'slow', 'read -P 0x5a 0 1M');
    // Without -n the same server zeroes (its slow way).
    await io(env, 'slow', 'write -z 0 64k');
    await io(env, 'slow', 'read -P 0 0 64k');
    await io(env, 'slow', 'read -P 0x5a 64k 960k');

    // A server without fast zero: refused by the node itself, nothing sent.
    await io(env, 'none', 'write -P 0x5a 0 1M');
    assert.match(await env.d.qmp.hmpOutput('qemu-io none "write -z -n 0 64k"'), /^write failed: Operation not supported/);
    assert.deepEqual(await zeroes('none'), []);
    await io(env, 'none', 'read -P 0x5a 0 1M');

    // qemu-nbd on a raw file zeroes fast (fallocate ZERO_RANGE): the range reads as zeroes.
    await env.d.qmp.execute('blockdev-add', nbdNode('q', server.sock));
    await io(env, 'q', 'write -P 0x77 0 1M');
    await io(env, 'q', 'write -z -n 64k 512k');
    await io(env, 'q', 'read -P 0x77 0 64k');
    await io(env, 'q', 'read -P 0 64k 512k');
    await io(env, 'q', 'read -P 0x77 576k 448k');
    for (const n of ['fast', 'slow', 'none', 'q']) await env.d.qmp.execute('blockdev-del', { 'node-name': n });
  } finally {
    await env.done();
    for (const stop of [...stops, server.stop]) await stop();
  }
});

test('qemu-storage-daemon export: mirror and backup into the nbd node', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const env = await setup('nbdc-qsd');
  const src = env.f('src.qcow2');
  await sourceImage(src);
  const target = env.f('target.qcow2');
  await qcow2(target, 16 * MiB);
  const sock = env.f('qsd-nbd.sock');
  const qsd = await startDaemon(env.f('qsd-qmp.sock'), [
    '--blockdev', `driver=file,node-name=f0,filename=${target}`,
    '--blockdev', 'driver=qcow2,node-name=t0,file=f0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=e0,node-name=t0,name=t,writable=on',
  ], 'qemu-storage-daemon');
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 's0', file: { driver: 'file', filename: src } });
    await env.d.qmp.execute('blockdev-add', nbdNode('n0', sock, 't'));
    await mirror(env, 's0', 'n0');
    await io(env, 'n0', 'flush');
    await assertIdentical(src, `nbd+unix:///t?socket=${sock}`, ['-f', 'qcow2', '-F', 'raw']);
    await io(env, 'n0', 'write -P 0x77 2M 6M');
    await backup(env, 's0', 'n0');
    await io(env, 'n0', 'flush');
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'n0' });
    await qsd.stop();
    await assertIdentical(src, target);
  } finally {
    await env.done();
    await qsd.kill();
  }
});

test("bitmirror's own export: qemu-io through a second daemon's nbd node; qemu-storage-daemon writes through it while bitmirror mirrors the node", { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const env = await setup('nbdc-self');
  const img = env.f('d0.qcow2');
  await qcow2(img, 16 * MiB);
  const copy = env.f('d1.qcow2');
  await qcow2(copy, 16 * MiB);
  const src = env.f('qsd-src.qcow2');
  await sourceImage(src);
  const sock = env.f('bm-nbd.sock');
  const client = await setup('nbdc-self-client');
  const qsd = await startDaemon(env.f('qsd-qmp.sock'), ['--blockdev', `driver=file,node-name=qf,filename=${src}`, '--blockdev', 'driver=qcow2,node-name=qs,file=qf'], 'qemu-storage-daemon');
  try {
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'd0', file: { driver: 'file', filename: img } });
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'd1', file: { driver: 'file', filename: copy } });
    await env.d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await env.d.qmp.execute('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', name: 'd0', writable: true });

    // Another bitmirror reads and writes the export through its nbd node.
    await client.d.qmp.execute('blockdev-add', nbdNode('n0', sock, 'd0'));
    await io(client, 'n0', 'write -P 0x42 10M 256k');
    await io(client, 'n0', 'read -P 0x42 10M 256k');
    await io(client, 'n0', 'flush');
    await io(env, 'd0', 'read -P 0x42 10M 256k');
    await client.d.qmp.execute('blockdev-del', { 'node-name': 'n0' });

    // bitmirror mirrors d0 while qemu-storage-daemon backs its own image up into d0 over NBD.
    await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'd0', target: 'd1', sync: 'full' });
    await env.d.qmp.waitEvent('BLOCK_JOB_READY', { device: 'm' });
    await qsd.qmp.execute('blockdev-add', nbdNode('n0', sock, 'd0'));
    await qsd.qmp.execute('blockdev-backup', { 'job-id': 'b', device: 'qs', target: 'n0', sync: 'full' });
    const b = await qsd.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'b' });
    assert.equal((b.data as Record<string, unknown>).error, undefined, JSON.stringify(b.data));
    await qsd.qmp.execute('blockdev-del', { 'node-name': 'n0' });
    await env.d.qmp.execute('block-job-complete', { device: 'm' });
    const m = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'm' });
    assert.equal((m.data as Record<string, unknown>).error, undefined, JSON.stringify(m.data));
    await io(env, 'd1', 'flush');
    await io(env, 'd0', 'flush');
    await assertIdentical(src, copy);
    await assertIdentical(img, copy);
  } finally {
    await qsd.stop();
    await client.done();
    await env.done();
  }
});
