/**
 * libnbd's Python bindings (python3-libnbd) drive bitmirror's NBD server through the handshake (LIST,
 * INFO, LIST_META_CONTEXT, ABORT, GO) and every command and flag, with structured replies on and off,
 * on a writable and a read-only export: the data, chunks, extents and errors are what the protocol
 * requires (nbd-libnbd.py prints them). Afterwards the image is checked and the writes are in its bitmap.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startDaemon } from '../support/daemon.js';
import { mustRun, run, tempDir } from '../support/tools.js';

const MiB = 1 << 20;
const KiB = 1 << 10;
// The bindings live in Debian's python3; another python3 earlier in PATH may not have them.
const PYTHON = '/usr/bin/python3';
const haveLibnbd = (await run(PYTHON, ['-c', 'import nbd'])).code === 0;
const SCRIPT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/interop/nbd-libnbd.py');

test('libnbd drives the handshake and every command and flag', { skip: !haveLibnbd && 'python3-libnbd not installed', timeout: 120_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-nbd-libnbd-');
  try {
    const image = path.join(dir, 'disk.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']);
    await mustRun('qemu-img', ['bitmap', '--add', image, 'b0']);
    const sock = path.join(dir, 'nbd.sock');
    const d = await startDaemon(path.join(dir, 'qmp.sock'), [
      '--blockdev', `driver=file,node-name=f0,filename=${image}`,
      '--blockdev', 'driver=qcow2,node-name=d0,file=f0',
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e1,node-name=d0,name=rw,writable=on,bitmaps.0=b0',
      '--export', 'type=nbd,id=e0,node-name=d0,name=ro',
    ]);
    let r: Record<string, unknown>;
    try {
      r = JSON.parse(await mustRun(PYTHON, [SCRIPT, sock])) as Record<string, unknown>;
      const nodes = (await d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
      const b0 = (nodes.find((n) => n['node-name'] === 'd0')!['dirty-bitmaps'] as Array<Record<string, unknown>>)[0];
      // Writes at 0 (unaligned), 1 MiB, 2 MiB, 3 MiB, 4 MiB (written, then trimmed) and 5 MiB (fast
      // zero), each within one 64 KiB granule.
      assert.equal(b0.count, 6 * 64 * KiB);
      assert.equal(b0.busy, true, 'an exported bitmap is busy');
    } finally {
      assert.equal(await d.stop(), 0, d.stderr());
    }
    assert.deepEqual(r.list, [['ro', ''], ['rw', '']]);
    assert.equal(r.info_size, 64 * MiB);
    assert.deepEqual(r.list_meta, ['base:allocation', 'qemu:dirty-bitmap:b0']);
    assert.deepEqual(r.flags, { flush: true, fua: true, trim: true, zero: true, fast_zero: true, df: true, multi_conn: true, cache: true });
    assert.equal(r.read_only, false);
    assert.equal(r.structured, true);
    assert.deepEqual(r.contexts, [true, true]);
    assert.deepEqual(r.block_size, [1, 4096, 32 * MiB]);
    assert.deepEqual(r.read_back, [true, true]);
    // A sparse read: data where written, holes elsewhere, covering the request exactly, in order.
    assert.deepEqual(r.structured_read, [
      [0, 64 * KiB, 'data'],
      [64 * KiB, MiB - 64 * KiB, 'hole'],
      [MiB, 64 * KiB, 'data'],
      [MiB + 64 * KiB, 64 * KiB, 'hole'],
    ]);
    assert.equal(r.structured_read_ok, true);
    assert.deepEqual(r.read_df, [[0, 2 * MiB, 'data']], 'DF: one data chunk');
    assert.equal(r.fast_zero, 'ok', 'qcow2 v3 zeroes fast (zero clusters)');
    const bs = r.block_status as Record<string, number[][]>;
    assert.deepEqual(bs['base:allocation'], [[64 * KiB, 0, MiB - 64 * KiB, 3, 64 * KiB, 0, 3 * MiB - 64 * KiB, 3]]);
    assert.deepEqual(bs['qemu:dirty-bitmap:b0'], [[64 * KiB, 1, MiB - 64 * KiB, 0, 64 * KiB, 1, MiB - 64 * KiB, 0, 64 * KiB, 1, MiB - 64 * KiB, 0, 64 * KiB, 1, MiB - 64 * KiB, 0]]);
    assert.deepEqual(r.block_status_req_one, { 'base:allocation': [[64 * KiB, 0]], 'qemu:dirty-bitmap:b0': [[64 * KiB, 1]] });
    for (const [k, v] of Object.entries({
      read_past_end: 'EINVAL',
      write_past_end: 'ENOSPC',
      zero_past_end: 'ENOSPC',
      trim_past_end: 'EINVAL',
      bad_flag: 'EINVAL',
      req_one_on_read: 'EINVAL',
      too_big_read: 'EINVAL',
      status_zero_length: 'EINVAL',
      simple_read_past_end: 'EINVAL',
      simple_write_past_end: 'ENOSPC',
      ro_write: 'EPERM',
      ro_trim: 'EPERM',
      ro_no_context: 'EINVAL',
      missing: 'ENOENT',
    })) {
      assert.equal(r[k], v, k);
    }
    assert.equal(r.alive_after_errors, true);
    assert.deepEqual([r.simple_structured, r.simple_df, r.simple_read], [false, false, true]);
    assert.deepEqual(r.ro, [true, false, false, true]);
    await mustRun('qemu-img', ['check', image]);
    await mustRun('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read -P 0xab 1M 64k', '-c', 'read -P 0 2M 128k', '-c', 'read -P 1 5 3', image]);
  } finally {
    await cleanup();
  }
});
