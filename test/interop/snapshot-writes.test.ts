/**
 * An external snapshot taken while an NBD client keeps writing (one write after another, each to a
 * cluster of its own): every write the client made before the snapshot is in the base image and
 * only there, every later one in the overlay and only there (the writes split at one point), the
 * chain reads as a reference image built by qemu-io from the same writes, and the bitmaps follow:
 * the base's recording bitmap holds exactly the writes before, the overlay's bitmaps (libvirt's
 * block-dirty-bitmap-add in the same transaction, or bitmirror's carry-bitmaps extension) exactly
 * the writes after. Checked with qemu-img map/compare/check, qemu-io reads and qemu-nbd's bitmap
 * extents on the image files.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mustRun, nbdDirtyRanges } from '../support/tools.js';
import { addQcow2, assertIdentical, bitmapCount, qcow2, setup } from '../support/daemon.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;
const WRITES = 48;
const SIZE = 4 * 1024 * KiB;

/** The clusters qemu-img map shows with data in the image itself (depth 0). */
async function ownClusters(img: string): Promise<number[]> {
  const map = JSON.parse(await mustRun('qemu-img', ['map', '-U', '--output=json', img])) as Array<{ start: number; length: number; depth: number; data: boolean }>;
  const out: number[] = [];
  for (const e of map) if (e.depth === 0 && e.data) for (let o = e.start; o < e.start + e.length; o += CLUSTER) out.push(o / CLUSTER);
  return out;
}

function range(from: number, to: number): number[] {
  return Array.from({ length: Math.max(0, to - from) }, (_, i) => from + i);
}

/** Dirty extents of clusters [from, to) as qemu-nbd merges them. */
function extents(clusters: number[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const c of clusters) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === c * CLUSTER) last[1] += CLUSTER;
    else out.push([c * CLUSTER, CLUSTER]);
  }
  return out;
}

for (const variant of ['libvirt', 'carry-bitmaps'] as const) {
  test(`a snapshot in a transaction splits an NBD client's writes exactly between base and overlay (${variant})`, async () => {
    const env = await setup(`snap-${variant}`);
    try {
      const base = await qcow2(env.f('base.qcow2'), SIZE);
      // As libvirt creates overlays: the header names the base; added without it, then attached.
      const ov = await qcow2(env.f('ov.qcow2'), SIZE, ['-b', base, '-F', 'qcow2']);
      await addQcow2(env, 'base', base);
      await addQcow2(env, 'ov', ov, { backing: null });
      await env.d.qmp.execute('block-dirty-bitmap-add', { node: 'base', name: 'a', persistent: true });
      const sock = env.f('nbd.sock');
      await env.d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
      await env.d.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'base', writable: true });

      const cmds = range(0, WRITES).flatMap((i) => ['-c', `write -P ${i + 1} ${i * CLUSTER} 4k`, '-c', 'sleep 3']);
      const client = spawn('qemu-io', ['-f', 'raw', `nbd+unix:///base?socket=${sock}`, ...cmds], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      client.stdout.on('data', (d: Buffer) => (out += d.toString()));
      client.stderr.on('data', (d: Buffer) => (out += d.toString()));
      const exited = new Promise<number>((r) => client.on('exit', (code) => r(code ?? -1)));
      // Once the client has begun writing (the base's bitmap shows it), take the snapshot; where
      // it lands in the stream does not matter.
      while ((await bitmapCount(env, 'base', 'a')) === 0) await new Promise((r) => setTimeout(r, 5));
      const actions =
        variant === 'libvirt'
          ? [
              { type: 'blockdev-snapshot', data: { node: 'base', overlay: 'ov' } },
              { type: 'block-dirty-bitmap-add', data: { node: 'ov', name: 'a', persistent: true, granularity: CLUSTER } },
            ]
          : [{ type: 'blockdev-snapshot', data: { node: 'base', overlay: 'ov', '__org.bitmirror_carry-bitmaps': true } }];
      await env.d.qmp.execute('transaction', {
        actions: [...actions, { type: 'block-dirty-bitmap-add', data: { node: 'ov', name: 'b1', persistent: true, granularity: CLUSTER } }],
      });
      assert.equal(await exited, 0, out);
      assert.equal(out.match(/wrote 4096\/4096/g)?.length, WRITES);
      await env.d.qmp.execute('block-export-del', { id: 'e' });
      const nodes = (await env.d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
      assert.equal(nodes.find((n) => n['node-name'] === 'base')?.ro, true, 'the base is read-only after the snapshot');
      await env.d.stop();

      // The writes split at one point k: [0, k) in the base only, [k, WRITES) in the overlay only.
      const inBase = await ownClusters(base);
      const k = inBase.length;
      assert.deepEqual(inBase, range(0, k));
      assert.deepEqual(await ownClusters(ov), range(k, WRITES));
      // The data: each layer's clusters hold their writes; the chain reads as the reference.
      const readBase = range(0, k).flatMap((i) => ['-c', `read -P ${i + 1} ${i * CLUSTER} 4k`]);
      if (k) assert.doesNotMatch(await mustRun('qemu-io', ['-r', '-f', 'qcow2', base, ...readBase]), /fail/i);
      const ref = env.f('ref.raw');
      await mustRun('qemu-img', ['create', '-f', 'raw', ref, String(SIZE)]);
      await mustRun('qemu-io', ['-f', 'raw', ref, ...range(0, WRITES).flatMap((i) => ['-c', `write -P ${i + 1} ${i * CLUSTER} 4k`])]);
      await assertIdentical(ov, ref);
      for (const img of [base, ov]) assert.match(await mustRun('qemu-img', ['check', img]), /No errors were found/);
      // The bitmaps: the base's holds the writes before, the overlay's the writes after.
      assert.deepEqual(await nbdDirtyRanges(base, 'a'), extents(range(0, k)));
      assert.deepEqual(await nbdDirtyRanges(ov, 'a'), extents(range(k, WRITES)));
      assert.deepEqual(await nbdDirtyRanges(ov, 'b1'), extents(range(k, WRITES)));
      const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', ov])) as { 'format-specific': { data: { bitmaps: Array<{ name: string; granularity: number }> } } };
      assert.deepEqual(info['format-specific'].data.bitmaps.map((b) => [b.name, b.granularity]).sort(), [
        ['a', CLUSTER],
        ['b1', CLUSTER],
      ]);
    } finally {
      await env.done().catch(() => undefined);
    }
  });
}
