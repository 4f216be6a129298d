/**
 * Write-zeroes without fallback (BDRV_REQ_NO_FALLBACK: qemu-io write -z -n, NBD's FAST_ZERO) on a
 * qcow2 node, against qemu-io 7.2 on a copy of the same image: each command gives the same answer (a
 * whole cluster becomes a zero cluster; a part of a cluster only when the rest of it reads as zeroes
 * already, else "Operation not supported" and nothing written), and the images end up identical with
 * data and zeroes in the same places.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { setup } from '../support/daemon.js';
import { mustRun, run } from '../support/tools.js';

/** qemu-io's answer without its timing line. */
const answer = (out: string): string =>
  out
    .split(/\r?\n/)
    .filter((l) => l && !/ ops; /.test(l))
    .join('\n');

test('qemu-io write -z -n on qcow2: the same answers and the same image as qemu-io 7.2', async () => {
  const env = await setup('zero-nofallback');
  try {
    const mine = env.f('mine.qcow2');
    const theirs = env.f('theirs.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', mine, '1M']);
    await fsp.copyFile(mine, theirs);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: { driver: 'file', filename: mine } });
    const commands = [
      'write -z -n 512 512', // part of an empty cluster: the rest reads as zeroes
      'write -P 0x22 128k 4k',
      'write -z -n 129k 512', // part of a cluster holding data elsewhere: no fast way
      'write -z -n 128k 64k', // the whole cluster
      'write -P 0x33 256k 64k',
      'write -z -n 256k 32k',
      'write -z -n 1020k 4k', // the image's last cluster, the rest of it zeroes
      'write -n 0 512',
    ];
    for (const c of commands) {
      const got = answer(await env.d.qmp.hmpOutput(`qemu-io q "${c}"`));
      const r = await run('qemu-io', ['-f', 'qcow2', '-c', c, theirs]);
      const want = answer(r.stdout + r.stderr);
      assert.equal(got, want, c);
    }
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'q' });
    await mustRun('qemu-img', ['compare', '-q', mine, theirs]);
    // Where data and zeroes lie (whether a zero cluster is flagged or left unallocated may differ).
    const extents = async (f: string) => {
      const runs: Array<[number, number, boolean, boolean]> = [];
      for (const e of JSON.parse(await mustRun('qemu-img', ['map', '--output=json', f])) as Array<{ start: number; length: number; data: boolean; zero: boolean }>) {
        const last = runs[runs.length - 1];
        if (last && last[2] === e.data && last[3] === e.zero) last[1] += e.length;
        else runs.push([e.start, e.length, e.data, e.zero]);
      }
      return runs;
    };
    assert.deepEqual(await extents(mine), await extents(theirs));
  } finally {
    await env.done();
  }
});
