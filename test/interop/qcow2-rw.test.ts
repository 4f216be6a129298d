/**
 * Random overlapping writes, zero-writes and discards on a qcow2 node, mirrored onto a reference
 * buffer; then qemu-img check (no errors, no leaks) and qemu-img compare against the reference.
 * Each batch runs concurrently with byte-disjoint ranges that may share clusters.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph, openQcow2File } from '../support/graph.js';
import { randomBytes, rng } from '../support/random.js';

const SIZE = 16 << 20;

interface Op {
  kind: 'write' | 'zero' | 'zero-unmap' | 'discard';
  offset: number;
  bytes: number;
  data?: Buffer;
}

function pickOp(rand: () => number, cs: number): Op {
  const r = rand();
  const kind: Op['kind'] = r < 0.6 ? 'write' : r < 0.75 ? 'zero' : r < 0.85 ? 'zero-unmap' : 'discard';
  const maxLen = rand() < 0.5 ? 8192 : Math.max(4 * cs, 256 << 10);
  let bytes = 1 + Math.floor(rand() * maxLen);
  let offset = Math.floor(rand() * SIZE);
  if (rand() < 0.4) {
    // Cluster- or sector-aligned variants.
    const a = rand() < 0.5 ? cs : 512;
    offset -= offset % a;
    bytes = Math.max(a, bytes - (bytes % a));
  }
  bytes = Math.min(bytes, SIZE - offset);
  if (bytes <= 0) {
    offset = 0;
    bytes = 512;
  }
  const op: Op = { kind, offset, bytes };
  if (kind === 'write') op.data = randomBytes(rand, bytes);
  return op;
}

/** `showThrough`: a discarded cluster reads from the backing file (v2 has no zero clusters). */
function applyRef(ref: Buffer, op: Op, cs: number, showThrough?: Buffer): void {
  if (op.kind === 'write') op.data!.copy(ref, op.offset);
  else if (op.kind === 'discard') {
    const s = Math.ceil(op.offset / cs) * cs;
    const end = op.offset + op.bytes;
    const e = end === SIZE ? end : Math.floor(end / cs) * cs;
    if (e > s && showThrough) showThrough.copy(ref, s, s, e);
    else if (e > s) ref.fill(0, s, e);
  } else ref.fill(0, op.offset, op.offset + op.bytes);
}

function disjoint(a: Op, b: Op, cs: number): boolean {
  // Discards act on whole clusters only, so their reach is the aligned-in range; keep a cluster of slack.
  const ext = (o: Op) => (o.kind === 'discard' ? [o.offset - cs, o.offset + o.bytes + cs] : [o.offset, o.offset + o.bytes]);
  const [as, ae] = ext(a);
  const [bs, be] = ext(b);
  return ae <= bs || be <= as;
}

async function scenario(cs: number, withBacking: boolean, seed: number, createOpts = ''): Promise<void> {
  const { dir, cleanup } = await tempDir();
  try {
    const rand = rng(seed);
    const img = path.join(dir, 'img.qcow2');
    const ref = Buffer.alloc(SIZE);
    let showThrough: Buffer | undefined;
    if (withBacking) {
      const base = path.join(dir, 'base.raw');
      const content = randomBytes(rand, SIZE);
      await writeFile(base, content);
      content.copy(ref);
      if (createOpts.includes('compat=0.10')) showThrough = content;
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}${createOpts ? ',' + createOpts : ''}`, '-b', 'base.raw', '-F', 'raw', img]);
    } else {
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}${createOpts ? ',' + createOpts : ''}`, img, String(SIZE)]);
    }
    const g = newGraph();
    const n = await openQcow2File(g, img, { discard: 'unmap' });
    const batches = cs >= 2 << 20 ? 25 : 40;
    for (let b = 0; b < batches; b++) {
      const ops: Op[] = [];
      for (let tries = 0; ops.length < 8 && tries < 40; tries++) {
        const op = pickOp(rand, cs);
        if (ops.every((o) => disjoint(o, op, cs))) ops.push(op);
      }
      await Promise.all(
        ops.map((op) => {
          switch (op.kind) {
            case 'write':
              return n.write(op.offset, op.data!);
            case 'zero':
              return n.writeZeroes(op.offset, op.bytes, {});
            case 'zero-unmap':
              return n.writeZeroes(op.offset, op.bytes, { mayUnmap: true });
            case 'discard':
              return n.discard(op.offset, op.bytes);
          }
        }),
      );
      for (const op of ops) applyRef(ref, op, cs, showThrough);
      if (b % 10 === 9) {
        await n.flush();
        const off = Math.floor(rand() * (SIZE - 65536));
        assert.deepEqual(await n.read(off, 65536), ref.subarray(off, off + 65536), `mid-run read at ${off}`);
      }
    }
    const all = await n.read(0, SIZE);
    assert.ok(all.equals(ref), 'our read-back matches the reference');
    await g.closeAll();

    const check = await run('qemu-img', ['check', img]);
    assert.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
    const refFile = path.join(dir, 'ref.raw');
    await writeFile(refFile, ref);
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, refFile]);
    assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', img])) as { 'dirty-flag': boolean };
    assert.equal(info['dirty-flag'], false);
  } finally {
    await cleanup();
  }
}

async function scenarioWith(cs: number, createOpts: string, seed: number): Promise<void> {
  await scenario(cs, false, seed, createOpts);
  await scenario(cs, true, seed + 1, createOpts);
}

for (const cs of [512, 4096, 65536, 2 << 20]) {
  for (const withBacking of [false, true]) {
    test(`random I/O, cluster ${cs}, ${withBacking ? 'with' : 'no'} backing: check clean, compare identical`, { timeout: 300_000 }, async () => {
      await scenario(cs, withBacking, cs * 7 + (withBacking ? 1 : 0));
    });
  }
}

for (const [cs, bits, compat] of [
  [512, 1, '1.1'],
  [4096, 2, '1.1'],
  [512, 64, '1.1'],
  [4096, 8, '1.1'],
  [65536, 16, '0.10'],
] as const) {
  test(`random I/O, cluster ${cs}, refcount_bits ${bits}, compat ${compat}`, { timeout: 300_000 }, async () => {
    await scenarioWith(cs, `refcount_bits=${bits},compat=${compat}`, bits * 13 + cs);
  });
}

test('random I/O with lazy refcounts: clean close leaves no dirty bit', { timeout: 300_000 }, async () => {
  await scenarioWith(65536, 'lazy_refcounts=on', 99);
});
