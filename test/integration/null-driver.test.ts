/**
 * The null drivers (null-co, null-aio): each request waits latency-ns first, as QEMU's do (what tests
 * use to slow a job down); the data is zeroes. Only lower bounds on time are asserted: a wait is never
 * shorter than asked, however loaded the machine.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { io, setup } from '../support/daemon.js';

test('null-co and null-aio wait latency-ns in every read, write and flush', async () => {
  const env = await setup('null-latency');
  try {
    for (const driver of ['null-co', 'null-aio']) {
      const node = `n-${driver}`;
      await env.d.qmp.execute('blockdev-add', { driver, 'node-name': node, size: 1 << 20, 'read-zeroes': true, 'latency-ns': 300_000_000 });
      for (const cmd of ['read -P 0 0 64k', 'write -P 0x5a 0 64k', 'flush']) {
        const t0 = performance.now();
        const out = await io(env, node, cmd);
        const ms = performance.now() - t0;
        assert.doesNotMatch(out, /error|fail/i, `${driver} ${cmd}: ${out}`);
        assert.ok(ms >= 300, `${driver} ${cmd} took ${ms.toFixed(0)} ms, under its 300 ms latency`);
      }
      // Writes are dropped: reads still give zeroes.
      assert.doesNotMatch(await io(env, node, 'read -P 0 0 64k'), /error|fail|Pattern verification/i);
      await env.d.qmp.execute('blockdev-del', { 'node-name': node });
    }
  } finally {
    await env.done();
  }
});
