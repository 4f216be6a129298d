/**
 * qcow2 compressed cluster writes (QEMU's BDRV_REQ_WRITE_COMPRESSED): HMP `qemu-io write -c` answers as
 * qemu-io 7.2 does for the same commands and leaves an image qemu-img compares identical to the one
 * qemu-io wrote; compressed clusters written side by side are packed into shared host clusters, whose
 * refcounts `qemu-img check` finds right, also after the clusters are overwritten, zeroed and discarded.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph, openQcow2File } from '../support/graph.js';
import { randomBytes, rng } from '../support/random.js';
import { setup } from '../support/daemon.js';

interface Check {
  'check-errors': number;
  leaks?: number;
  corruptions?: number;
  'compressed-clusters'?: number;
  'allocated-clusters'?: number;
  'image-end-offset': number;
}

async function check(img: string): Promise<Check> {
  const r = await run('qemu-img', ['check', '--output=json', img]);
  assert.equal(r.code, 0, `qemu-img check ${img}: ${r.stdout}${r.stderr}`);
  const c = JSON.parse(r.stdout) as Check;
  assert.equal(c.leaks ?? 0, 0, `leaks in ${img}`);
  assert.equal(c.corruptions ?? 0, 0, `corruptions in ${img}`);
  return c;
}

/** What qemu-io printed, without its timing line. */
function untimed(out: string): string {
  return out
    .split(/\r?\n/)
    .filter((l) => l && !l.includes('ops/sec'))
    .join('\n');
}

/** Text-like bytes deflate shrinks several times; the same seed gives the same bytes. */
function compressible(rand: () => number, n: number): Buffer {
  const words = ['qcow2', 'cluster', 'refcount', 'backup', 'deflate', 'sector', 'host', 'guest', 'table'];
  const b = Buffer.alloc(n);
  for (let p = 0; p < n; ) {
    const w = `${words[Math.floor(rand() * words.length)]} `;
    p += b.write(w, p);
  }
  return b;
}

/** Random bytes: deflate cannot shrink them, so a compressed write stores them as a normal cluster. */
function incompressible(rand: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256);
  return b;
}

for (const [label, opts, clusterSize] of [
  ['64k', 'cluster_size=65536', 65536],
  ['4k', 'cluster_size=4096', 4096],
  ['512', 'cluster_size=512', 512],
  ['v2', 'compat=0.10', 65536],
  ['refcount_bits=1', 'refcount_bits=1', 65536],
] as const) {
  test(`qemu-io write -c through HMP answers as qemu-io 7.2, images identical (${label})`, async () => {
    const C = clusterSize;
    // Not a multiple of the cluster size (except for 512-byte clusters): the last cluster is short.
    const size = 16 * C + (C > 512 ? C / 2 : 0);
    const cmds = [
      `write -c -P 1 0 ${C}`,
      `write -c -P 2 0 ${C}`, // allocated: EIO
      `write -c -P 3 ${2 * C} ${4 * C}`, // several clusters, packed
      `write -c -z ${6 * C} ${C}`, // -z wins
      `write -c -f 0 ${C}`,
      `write -c -u 0 ${C}`,
      `write -P 9 ${3 * C} 512`, // a normal write into a compressed cluster
      `write -z ${4 * C} ${C}`, // zeroes over a compressed cluster
      `discard ${5 * C} ${C}`,
      `write -c -P 5 ${4 * C} ${C}`, // into the zero cluster write -z left (v2: the cluster it discarded)
      `write -c -P 6 ${8 * C} ${C}`,
      ...(C > 512 ? [`write -c ${C + 512} ${C}`, `write -c ${9 * C} ${C / 2}`, `write -c -P 7 ${16 * C} ${C / 2}`] : []),
    ];
    const env = await setup(`compress-${label}`);
    try {
      const ours = env.f('ours.qcow2');
      const theirs = env.f('theirs.qcow2');
      for (const f of [ours, theirs]) await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, f, String(size)]);
      await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'n', discard: 'unmap', file: { driver: 'file', filename: ours } });
      for (const c of cmds) {
        const mine = untimed(await env.d.qmp.hmpOutput(`qemu-io n "${c}"`));
        const r = await run('qemu-io', ['-f', 'qcow2', '-d', 'unmap', '-c', c, theirs]);
        assert.equal(mine, untimed(r.stdout), c);
      }
      await env.d.qmp.execute('blockdev-del', { 'node-name': 'n' });
      const a = await check(ours);
      const b = await check(theirs);
      assert.equal(a['compressed-clusters'], b['compressed-clusters']);
      assert.ok((a['compressed-clusters'] ?? 0) >= 4, `compressed clusters: ${a['compressed-clusters']}`);
      const cmp = await run('qemu-img', ['compare', ours, theirs]);
      assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    } finally {
      await env.done();
    }
  });
}

test('compressed writes side by side pack host clusters; overwrites, zeroes and discards keep refcounts right', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    for (const opts of ['cluster_size=65536', 'cluster_size=4096,refcount_bits=1']) {
      const img = path.join(dir, 'p.qcow2');
      const cs = opts.startsWith('cluster_size=4096') ? 4096 : 65536;
      const n = 64;
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, img, String(n * cs)]);
      const rand = rng(12);
      const content = Buffer.alloc(n * cs);
      let plain = 0;
      for (let k = 0; k < n; k++) {
        // Every fifth cluster random: stored as a normal cluster, between compressed ones.
        const data = k % 5 === 4 ? incompressible(rand, cs) : compressible(rand, cs);
        if (k % 5 === 4) plain++;
        data.copy(content, k * cs);
      }
      let g = newGraph();
      let node = await openQcow2File(g, img, { discard: 'unmap' });
      await Promise.all(Array.from({ length: n }, (_, k) => node.write(k * cs, content.subarray(k * cs, (k + 1) * cs), { compressed: true })));
      await g.closeAll();
      let c = await check(img);
      assert.equal(c['compressed-clusters'], n - plain, opts);
      // Packed: with 16-bit refcounts many compressed clusters share a host cluster; with 1-bit
      // refcounts (a host cluster counts one reference at most) each has its own.
      const hostClusters = c['image-end-offset'] / cs;
      if (opts.includes('refcount_bits=1')) assert.ok(hostClusters >= n, `${hostClusters} host clusters for ${n}`);
      else assert.ok(hostClusters < (n * 3) / 4, `${hostClusters} host clusters for ${n}`);
      const raw = path.join(dir, 'p.raw');
      await mustRun('qemu-img', ['convert', '-O', 'raw', img, raw]);
      assert.ok((await readFile(raw)).equals(content), `read back by qemu-img (${opts})`);

      // Each compressed cluster shares its host cluster with others: drop references one by one.
      g = newGraph();
      node = await openQcow2File(g, img, { discard: 'unmap' });
      const edits: Array<Promise<void>> = [];
      for (let k = 0; k < n; k += 3) {
        edits.push(node.write(k * cs + 100, Buffer.alloc(300, 0xee)));
        content.fill(0xee, k * cs + 100, k * cs + 400);
      }
      for (let k = 1; k < n; k += 6) {
        edits.push(node.writeZeroes(k * cs, cs, { mayUnmap: true }));
        content.fill(0, k * cs, (k + 1) * cs);
      }
      for (let k = 2; k < n; k += 6) {
        edits.push(node.discard(k * cs, cs));
        content.fill(0, k * cs, (k + 1) * cs);
      }
      await Promise.all(edits);
      // A compressed write into a cluster that is allocated now fails as QEMU's does.
      await assert.rejects(node.write(0, content.subarray(0, cs), { compressed: true }), { code: 'EIO' });
      // ... and into a discarded one goes on packing.
      const again = compressible(rand, cs);
      await node.write(2 * cs, again, { compressed: true });
      again.copy(content, 2 * cs);
      await g.closeAll();
      c = await check(img);
      await mustRun('qemu-img', ['convert', '-O', 'raw', img, raw]);
      assert.ok((await readFile(raw)).equals(content), `after the edits (${opts})`);

      // Overwrite everything: every compressed cluster freed, nothing leaks.
      g = newGraph();
      node = await openQcow2File(g, img);
      const fresh = randomBytes(rand, n * cs);
      await node.write(0, fresh);
      await g.closeAll();
      c = await check(img);
      assert.equal(c['compressed-clusters'] ?? 0, 0);
      await mustRun('qemu-img', ['convert', '-O', 'raw', img, raw]);
      assert.ok((await readFile(raw)).equals(fresh), `after overwriting all (${opts})`);
      await run('rm', ['-f', img, raw]);
    }
  } finally {
    await cleanup();
  }
});
