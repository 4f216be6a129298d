/**
 * Seeded, bounded fuzz of damaged qcow2 images through a real daemon (issue 18): a few hundred images,
 * each with one or two damaged metadata fields (header, L1/L2 entries, refcount table and blocks,
 * bitmaps extension, directory and tables; test/support/qcow2-damage.ts), opened by blockdev-add
 * read-write (one copy) and read-only (another). Every open is either refused with a clear error and
 * the file unchanged, or succeeds; each 64 KiB read of the read-only node gives what qemu-io reads
 * from the same image (the same bytes, or both fail). The daemon never crashes. The seed is printed; BITMIRROR_FUZZ_SEED replays it
 * and BITMIRROR_FUZZ_IMAGES sets the number of images.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { existsSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { errorOf, mustRun, run, tempDir } from '../support/tools.js';
import { rng } from '../support/random.js';
import { bitmapFields, damage, mappingFields, sha256, type Field } from '../support/qcow2-damage.js';

const haveQemu = ['/usr/bin/qemu-img', '/usr/bin/qemu-io'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'QEMU 7.2 tools not installed';

const KiB = 1024;
const SIZE = 1024 * KiB;
const CHUNK = 64 * KiB;
const CHUNKS = SIZE / CHUNK;

/** The pattern byte of chunk i in the fixtures (0 = never written or written as zeroes). */
const chunkPattern = (i: number): number => (i % 4 === 3 ? 0 : 0x11 + i);

/** 1 MiB images with cluster size cs: most chunks written with their pattern, one zeroed, bitmaps on some. */
async function makeFixture(img: string, cs: number, bitmaps: boolean): Promise<void> {
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(SIZE)]);
  if (bitmaps) await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
  const cmds: string[] = [];
  for (let i = 0; i < CHUNKS; i++) {
    if (chunkPattern(i)) cmds.push('-c', `write -P ${chunkPattern(i)} ${i * CHUNK} ${CHUNK}`);
    else if (i % 8 === 7) cmds.push('-c', `write -z ${i * CHUNK} ${CHUNK}`);
  }
  await mustRun('qemu-io', ['-f', 'qcow2', ...cmds, img]);
  if (bitmaps) await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', img, 'second']);
}

/** One read's outcome as qemu-io prints it: failed (errno text), or its output (hex dump, pattern failure; '' when the pattern matched). */
type ReadOutcome = { failed: string } | { dump: string };

/** Split qemu-io output of `read -v` commands into one outcome per command. */
function parseReads(out: string): ReadOutcome[] {
  const res: ReadOutcome[] = [];
  let dump: string[] = [];
  const lines = out.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i];
    if (l.startsWith('read failed: ')) {
      res.push({ failed: l.slice('read failed: '.length) });
      dump = [];
    } else if (l.startsWith('Pattern verification failed')) {
      dump.push(l);
    } else if (/^read \d+\/\d+ bytes at offset \d+$/.test(l)) {
      res.push({ dump: dump.join('\n') });
      dump = [];
      i++; // the timing line
    } else if (/^[0-9a-f]{8}:/.test(l)) {
      dump.push(l);
    }
  }
  return res;
}

/** The first line where two qemu-io outputs differ (for the failure message). */
function firstDifference(ours: string, theirs: string): string {
  const a = ours.split('\n');
  const b = theirs.split('\n');
  for (let i = 0; i < Math.max(a.length, b.length); i++) if (a[i] !== b[i]) return `bitmirror '${a[i] ?? ''}', qemu-io '${b[i] ?? ''}'`;
  return '';
}

/** An internal error leaking out instead of a clear message. */
const INTERNAL = /undefined|NaN|TypeError|RangeError|is not a function|Cannot read prop|ERR_[A-Z_]+|Maximum call stack/;

test('damaged qcow2 images: refused cleanly with the file unchanged, or read as qemu-io reads them; the daemon survives', { skip, timeout: 600_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-fuzz-');
  let d: SpawnedDaemon | undefined;
  try {
    const fixtures: Array<{ clean: Buffer; fields: Field[]; cs: number }> = [];
    for (const [cs, bitmaps] of [[512, false], [4096, true], [65536, true]] as const) {
      const img = path.join(dir, `fixture-${cs}.qcow2`);
      await makeFixture(img, cs, bitmaps);
      const clean = await readFile(img);
      fixtures.push({ clean, fields: [...mappingFields(clean), ...bitmapFields(clean)], cs });
    }
    const seed = Number(process.env.BITMIRROR_FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
    const images = Number(process.env.BITMIRROR_FUZZ_IMAGES ?? 240);
    console.log(`# damaged-image fuzz seed ${seed}, ${images} images (BITMIRROR_FUZZ_SEED=${seed} replays it)`);
    const rand = rng(seed);

    d = await spawnDaemon(path.join(dir, 'bm.sock'));
    const stats = { refusedRw: 0, openedRw: 0, openedRo: 0, refused: 0, readsCompared: 0, readsFailedBoth: 0 };
    const daemon = d;
    // Each image has a seed of its own drawn in order, so a run replays whatever order the workers
    // take the images in; a few images are in flight at once (qemu-io runs while the daemon works).
    const imageSeeds = Array.from({ length: images }, () => Math.floor(rand() * 2 ** 31));
    let next = 0;
    let failure: unknown;
    const refusedWhereQemuOpens = new Map<string, number>();
    const worker = async (): Promise<void> => {
      // The first failure stops every worker (the others finish their image) and is reported.
      while (next < images && failure === undefined) {
        const n = next++;
        try {
          await fuzzOne(n, rng(imageSeeds[n]));
        } catch (err) {
          failure ??= err;
        }
        await rm(path.join(dir, `img-${n}.qcow2`), { force: true });
        await rm(path.join(dir, `img-${n}-rw.qcow2`), { force: true });
      }
    };
    const fuzzOne = async (n: number, rand: () => number): Promise<void> => {
      const d = daemon;
      const fx = fixtures[Math.floor(rand() * fixtures.length)];
      const b = Buffer.from(fx.clean);
      const what: string[] = [];
      const count = rand() < 0.2 ? 2 : 1;
      for (let k = 0; k < count; k++) what.push(damage(b, fx.fields[Math.floor(rand() * fx.fields.length)], rand));
      const ctx = `seed ${seed} image ${n} (cluster size ${fx.cs}): ${what.join('; ')}`;
      // A read-write open of one copy (refused: unchanged; opened: closed again, storing what it
      // loaded), then a read-only open of a second copy, whose reads are compared with qemu-io's.
      const before = sha256(b);
      const rwImg = path.join(dir, `img-${n}-rw.qcow2`);
      await writeFile(rwImg, b);
      const rwNode = `w${n}`;
      let err = await errorOf(d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': rwNode, file: { driver: 'file', filename: rwImg } }));
      if (err === undefined) {
        stats.openedRw++;
        await errorOf(d.qmp.execute('blockdev-del', { 'node-name': rwNode })); // a damaged image may fail to store its bitmaps
      } else {
        stats.refusedRw++;
        assert.ok(err.length > 0 && !INTERNAL.test(err), `a clear error: ${err} — ${ctx}`);
        assert.equal(sha256(await readFile(rwImg)), before, `file unchanged after the refused read-write open (${err}) — ${ctx}`);
      }
      const img = path.join(dir, `img-${n}.qcow2`);
      await writeFile(img, b);
      const node = `q${n}`;
      let opened = false;
      err = await errorOf(d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': node, 'read-only': true, file: { driver: 'file', filename: img, 'read-only': true } }));
      if (err === undefined) {
        stats.openedRo++;
        opened = true;
      } else {
        stats.refused++;
        assert.ok(err.length > 0 && !INTERNAL.test(err), `a clear error: ${err} — ${ctx}`);
        const q = await run('qemu-io', ['-r', '-f', 'qcow2', '-c', 'read 0 512', img]);
        if (q.code === 0 && !/could not open|Could not open/.test(q.stderr + q.stdout)) {
          const key = err.replace(/\d+|0x[0-9a-f]+|'[^']*'/g, 'N');
          refusedWhereQemuOpens.set(key, (refusedWhereQemuOpens.get(key) ?? 0) + 1);
        }
      }
      assert.equal(sha256(await readFile(img)), before, `file unchanged by the read-only open — ${ctx}`);
      if (!opened) return;
      // Each chunk is read with a check of its fixture pattern (cheap); the bytes of a chunk that
      // differs from it are compared as hex dumps. Ours first (the node is open), then qemu-io's reads
      // of the image as it was damaged.
      const readCmd = (i: number, dump: boolean): string => (dump ? `read -v ${i * CHUNK} ${CHUNK}` : `read -P ${chunkPattern(i)} ${i * CHUNK} ${CHUNK}`);
      const ours: ReadOutcome[] = [];
      for (let i = 0; i < CHUNKS; i++) {
        let out = await d.qmp.hmpOutput(`qemu-io ${node} "${readCmd(i, false)}"`);
        if (out.includes('Pattern verification failed')) out = await d.qmp.hmpOutput(`qemu-io ${node} "${readCmd(i, true)}"`);
        const r = parseReads(out);
        assert.equal(r.length, 1, `one read outcome: ${out.slice(0, 200)} — ${ctx}`);
        ours.push(r[0]);
      }
      await d.qmp.execute('blockdev-del', { 'node-name': node });
      const qemuReads = async (dump: (i: number) => boolean): Promise<ReadOutcome[] | undefined> => {
        const cmds: string[] = [];
        for (let i = 0; i < CHUNKS; i++) cmds.push('-c', readCmd(i, dump(i)));
        const q = await run('qemu-io', ['-r', '-f', 'qcow2', ...cmds, img]);
        const r = parseReads(q.stdout);
        if (r.length === 0) return undefined; // QEMU refuses to open it: nothing to compare with
        assert.equal(r.length, CHUNKS, `qemu-io gave every outcome: ${q.stdout.slice(0, 300)}${q.stderr} — ${ctx}`);
        return r;
      };
      // Ours dumped a chunk where its pattern failed: QEMU dumps the same chunks.
      const theirs = await qemuReads((i) => 'dump' in ours[i] && ours[i].dump !== '');
      if (!theirs) return;
      for (let i = 0; i < CHUNKS; i++) {
        const o = ours[i];
        const t = theirs[i];
        if ('failed' in t) {
          assert.ok('failed' in o, `chunk ${i}: qemu-io fails (${t.failed}), bitmirror reads — ${ctx}`);
          stats.readsFailedBoth++;
        } else {
          assert.ok('dump' in o, `chunk ${i}: bitmirror fails (${'failed' in o ? o.failed : ''}) where qemu-io reads — ${ctx}`);
          assert.ok(o.dump === t.dump, `chunk ${i}: bitmirror reads other bytes than qemu-io (or its pattern check differs): ${firstDifference(o.dump, t.dump)} — ${ctx}`);
          stats.readsCompared++;
        }
      }
    };
    await Promise.all([worker(), worker(), worker()]);
    if (failure !== undefined) throw failure;
    console.log(`# ${JSON.stringify(stats)}`);
    // Images QEMU opens read-only and bitmirror refuses (stricter checks; allowed, but worth seeing).
    for (const [msg, count] of refusedWhereQemuOpens) console.log(`# refused where qemu-io opens (${count}): ${msg}`);
    assert.deepEqual(await d.qmp.execute('query-version').then(() => true), true);
    assert.equal(d.proc.exitCode, null, 'the daemon is still running');
  } finally {
    await d?.stop();
    await cleanup();
  }
});
