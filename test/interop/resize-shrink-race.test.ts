/**
 * block_resize that shrinks a node while writes past the new end are in flight: QEMU drains the node
 * first, so each write either lands before the shrink (and is cut with the rest) or is refused after
 * it. None may land past the new end afterwards — grown again, the image reads zeroes there — and
 * qemu-img check stays clean.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import * as path from 'node:path';
import { mustRun, tempDir } from '../support/tools.js';
import { spawnDaemon } from '../../src/daemon/spawn.js';

const MiB = 1 << 20;

for (const format of ['qcow2', 'raw'] as const) {
  test(`${format}: a shrink with writes past the new end in flight leaves nothing there`, { timeout: 120_000 }, async (t) => {
    const { dir, cleanup } = await tempDir();
    t.after(cleanup);
    const image = path.join(dir, `disk.${format}`);
    await mustRun('qemu-img', ['create', '-q', '-f', format, image, String(64 * MiB)]);
    const d = await spawnDaemon(path.join(dir, 'qmp.sock'), ['--blockdev', `driver=file,node-name=f0,filename=${image}`, '--blockdev', `driver=${format},node-name=d0,file=f0`]);
    try {
      for (let round = 0; round < 4; round++) {
        // Writes into every 1 MiB of the upper half (new clusters, new L2 tables for qcow2), started
        // and left in flight; the shrink is sent right behind them.
        const writes: Array<Promise<unknown>> = [];
        for (let i = 0; i < 32; i++) writes.push(d.qmp.hmp(`qemu-io d0 "aio_write -P 0x77 ${32 * MiB + i * MiB + 4096 * round} 64k"`));
        const shrink = d.qmp.execute('block_resize', { 'node-name': 'd0', size: 32 * MiB });
        await Promise.all(writes);
        await shrink;
        // Every write has ended (refused or not) once aio_flush returns.
        await d.qmp.hmp('qemu-io d0 "aio_flush"');
        await d.qmp.execute('block_resize', { 'node-name': 'd0', size: 64 * MiB });
        const out = await d.qmp.hmpOutput('qemu-io d0 "read -P 0 32M 32M"');
        assert.doesNotMatch(out, /Pattern verification failed/, `round ${round}: a write landed past the new end`);
        assert.match(out, /read 33554432\/33554432 bytes/);
      }
    } finally {
      assert.equal(await d.stop(), 0, `exit code; stderr: ${d.stderr()}`);
    }
    if (format === 'qcow2') assert.match(await mustRun('qemu-img', ['check', image]), /No errors were found/);
  });
}
