/**
 * Compressed cluster writes after a power cut, in simulation: a qcow2 node over the test-only
 * `recording` filter (test/support/recording.ts) gets rounds of concurrent compressed writes into free
 * clusters (packed into shared host clusters; random data among them, stored plain), normal writes
 * into compressed clusters, write-zeroes and discards of compressed clusters (each dropping one
 * reference to a shared host cluster), with flushes between most rounds. The image a cut at sampled
 * points of the log leaves (what flushes made durable, plus a random subset of the rest) must pass
 * `qemu-img check` without corruption (leaks allowed), every cluster last changed before the last
 * completed flush reads as it was then, and every cluster changed since reads as one of the states it
 * had (a cluster with a partial write since: not checked). BM_POWER_CUT_SEED replays a seed;
 * BM_SOAK=1 checks every cut point.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { readFile, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph } from '../support/graph.js';
import { rng } from '../support/random.js';
import { recordingDriver, recordingLog, rebuildAfterCut } from '../support/recording.js';

const soak = !!process.env.BM_SOAK;
const seed0 = Number(process.env.BM_POWER_CUT_SEED ?? Date.now() % 1_000_000);
const CUTS = soak ? Infinity : 30;

/** Text-like bytes deflate shrinks. */
function compressible(rand: () => number, n: number): Buffer {
  const words = ['power', 'cut', 'compressed', 'cluster', 'host', 'refcount', 'l2', 'entry'];
  const b = Buffer.alloc(n);
  for (let p = 0; p < n; ) p += b.write(`${words[Math.floor(rand() * words.length)]} `, p);
  return b;
}

interface Op {
  cluster: number;
  /** The cluster's whole content after the op, or undefined for a partial write. */
  after?: Buffer;
}

for (const cs of [65536, 4096]) {
  test(`compressed writes survive a power cut at any point (${cs}-byte clusters)`, async (t) => {
    const seed = seed0 + cs;
    t.diagnostic(`seed ${seed} (BM_POWER_CUT_SEED=${seed0} replays)`);
    const rand = rng(seed);
    const { dir, cleanup } = await tempDir();
    try {
      const n = 64;
      const size = n * cs;
      const img = path.join(dir, 'c.qcow2');
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size)]);
      const initial = await readFile(img);
      recordingLog.length = 0;
      const g = newGraph();
      g.registerDriver(recordingDriver);
      const node = await g.open({ driver: 'qcow2', 'node-name': 'q', discard: 'unmap', file: { driver: 'recording', discard: 'unmap', file: { driver: 'file', filename: img, discard: 'unmap' } } });

      // The model: each cluster's content, whether it is compressed (a target for the edits) or free.
      const model = Array.from({ length: n }, () => Buffer.alloc(cs));
      const state: Array<'free' | 'compressed' | 'other'> = Array(n).fill('free');
      /** At each completed flush: where the log was, a copy of the model, and the ops since the previous one. */
      const flushes: Array<{ at: number; model: Buffer[] }> = [{ at: 0, model: model.map((b) => Buffer.from(b)) }];
      const opsAfter: Op[][] = [[]];
      const pick = (want: 'free' | 'compressed', taken: Set<number>): number | undefined => {
        const c = [...Array(n).keys()].filter((k) => state[k] === want && !taken.has(k));
        return c.length ? c[Math.floor(rand() * c.length)] : undefined;
      };
      for (let round = 0; round < 8; round++) {
        const taken = new Set<number>();
        const io: Array<Promise<void>> = [];
        const ops = opsAfter[opsAfter.length - 1];
        for (let k = 0; k < 8; k++) {
          const c = pick('free', taken);
          if (c === undefined) break;
          taken.add(c);
          const data = k % 4 === 3 ? Buffer.from(Array.from({ length: cs }, () => Math.floor(rand() * 256))) : compressible(rand, cs);
          io.push(node.write(c * cs, data, { compressed: true }));
          data.copy(model[c]);
          state[c] = k % 4 === 3 ? 'other' : 'compressed';
          ops.push({ cluster: c, after: Buffer.from(data) });
        }
        for (const edit of ['write', 'write', 'zero', 'discard'] as const) {
          const c = pick('compressed', taken);
          if (c === undefined) break;
          taken.add(c);
          if (edit === 'write') {
            const at = Math.floor(rand() * (cs / 512 - 1)) * 512;
            io.push(node.write(c * cs + at, Buffer.alloc(512, 0x40 + round)));
            model[c].fill(0x40 + round, at, at + 512);
            state[c] = 'other';
            ops.push({ cluster: c });
          } else {
            io.push(edit === 'zero' ? node.writeZeroes(c * cs, cs, { mayUnmap: true }) : node.discard(c * cs, cs));
            model[c].fill(0);
            state[c] = 'free';
            ops.push({ cluster: c, after: Buffer.alloc(cs) });
          }
        }
        await Promise.all(io);
        if (round % 3 === 2) continue; // no flush: the next round's ops are pending with these
        await node.flush();
        flushes.push({ at: recordingLog.length, model: model.map((b) => Buffer.from(b)) });
        opsAfter.push([]);
      }
      await g.closeAll();
      flushes.push({ at: recordingLog.length, model: model.map((b) => Buffer.from(b)) });
      opsAfter.push([]);

      const log = recordingLog.slice();
      const cuts = [...Array(log.length + 1).keys()].filter((_, i, all) => CUTS >= all.length || i % Math.ceil(all.length / CUTS) === 0 || i === log.length);
      const cut = path.join(dir, 'cut.qcow2');
      const raw = path.join(dir, 'cut.raw');
      for (const at of cuts) {
        const what = `seed ${seed}, cut ${at}/${log.length}`;
        await writeFile(cut, rebuildAfterCut(initial, log, at, () => rand() < 0.5));
        const chk = await run('qemu-img', ['check', '--output=json', cut]);
        // 0: clean, 3: leaks only (allowed after a cut).
        assert.ok(chk.code === 0 || chk.code === 3, `${what}: qemu-img check ${chk.code}: ${chk.stdout}${chk.stderr}`);
        const result = JSON.parse(chk.stdout) as { corruptions?: number; 'check-errors': number };
        assert.equal((result.corruptions ?? 0) + result['check-errors'], 0, `${what}: ${chk.stdout}`);
        await mustRun('qemu-img', ['convert', '-O', 'raw', cut, raw]);
        const data = await readFile(raw);
        // The last flush completed before the cut, and every op issued after it.
        let f = 0;
        while (f + 1 < flushes.length && flushes[f + 1].at <= at) f++;
        const later = opsAfter.slice(f).flat();
        for (let c = 0; c < n; c++) {
          const got = data.subarray(c * cs, (c + 1) * cs);
          const since = later.filter((o) => o.cluster === c);
          if (since.some((o) => !o.after)) continue;
          const allowed = [flushes[f].model[c], ...since.map((o) => o.after!)];
          assert.ok(
            allowed.some((b) => b.equals(got)),
            `${what}: cluster ${c} reads none of its ${allowed.length} possible states`,
          );
        }
      }
      t.diagnostic(`${cuts.length} cuts of ${log.length} log events checked`);
    } finally {
      await cleanup();
    }
  });
}
