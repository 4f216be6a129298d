/**
 * A refused open writes nothing (issue 18, defect 3): qcow2 images with a damaged bitmaps extension,
 * bitmap directory or bitmap table are opened read-write by blockdev-add in bitmirror and in
 * qemu-storage-daemon 7.2. Where bitmirror refuses, the image's sha256 is unchanged, and where QEMU
 * refuses too the message is QEMU's; bitmirror never accepts what QEMU refuses. A set of named damages
 * (the ones QEMU gives each message for) and a seeded random set (BITMIRROR_DAMAGE_SEED replays one).
 * A damaged snapshot table and data-file-raw without a data file are refused as QEMU refuses them.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { existsSync } from 'node:fs';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { errorOf, mustRun, tempDir } from '../support/tools.js';
import { rng } from '../support/random.js';
import { bitmapFields, damage, sha256, type Field } from '../support/qcow2-damage.js';

const haveQemu = ['/usr/bin/qemu-storage-daemon', '/usr/bin/qemu-img', '/usr/bin/qemu-io'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'QEMU 7.2 tools not installed';

/** 16 MiB, two bitmaps with data (the first has set bits in its table), 64 KiB clusters. */
async function makeFixture(img: string): Promise<void> {
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 1M', img]);
  await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
  await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', img, 'bitmap-1']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x17 64k 64k', '-c', 'write -P 0x18 8M 4k', img]);
}

function addArgs(node: string, filename: string): Record<string, unknown> {
  return { driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename } };
}

interface Variant {
  what: string;
  apply: (b: Buffer) => void;
}

function named(f: Field[], what: string, v: bigint): Variant {
  const field = f.find((x) => x.what === what);
  assert.ok(field, `fixture has ${what}`);
  return {
    what: `${what} = 0x${v.toString(16)}`,
    apply: (b) => (field.bytes === 8 ? b.writeBigUInt64BE(v, field.offset) : b.writeUIntBE(Number(v), field.offset, field.bytes)),
  };
}

test('a refused read-write open of a qcow2 with damaged bitmaps changes no byte; messages as QEMU 7.2', { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-refused-');
  let bm: SpawnedDaemon | undefined;
  let qsd: SpawnedDaemon | undefined;
  try {
    const fixture = path.join(dir, 'fixture.qcow2');
    await makeFixture(fixture);
    const clean = await readFile(fixture);
    const f = bitmapFields(clean);
    const fileLength = BigInt(clean.length);
    const variants: Variant[] = [
      named(f, 'bitmap 0 table entry 0', fileLength + 0x100000n),
      named(f, 'bitmap 0 table entry 0', 0x150200n),
      named(f, 'bitmap 0 table entry 0', 0x150100n),
      named(f, 'bitmap 0 table entry 0', 0x150001n),
      named(f, 'bitmap 0 table offset', fileLength + 0x100000n),
      named(f, 'bitmap 0 table offset', 0x10200n),
      named(f, 'bitmap 0 table offset', 0n),
      named(f, 'bitmap 0 table size', 0n),
      named(f, 'bitmap 0 table size', 2n),
      named(f, 'bitmap 0 table size', 0x10000n),
      named(f, 'bitmap 1 flags', 6n),
      named(f, 'bitmap 1 flags', 3n),
      named(f, 'bitmap 0 type', 2n),
      named(f, 'bitmap 0 granularity bits', 8n),
      named(f, 'bitmap 0 granularity bits', 40n),
      named(f, 'bitmap 0 name size', 0n),
      named(f, 'bitmap 0 name size', 9n),
      named(f, 'bitmap 0 name size', 2000n),
      named(f, 'bitmap 0 extra data size', 8n),
      named(f, 'bitmaps extension nb_bitmaps', 0n),
      named(f, 'bitmaps extension nb_bitmaps', 1n),
      named(f, 'bitmaps extension nb_bitmaps', 3n),
      named(f, 'bitmaps extension nb_bitmaps', 70000n),
      named(f, 'bitmaps extension reserved', 1n),
      named(f, 'bitmaps extension length', 16n),
      named(f, 'bitmap directory size', 0n),
      named(f, 'bitmap directory size', 1n << 40n),
      named(f, 'bitmap directory size', 72n),
      named(f, 'bitmap directory offset', 0n),
      named(f, 'bitmap directory offset', fileLength + 0x100000n),
      named(f, 'bitmap directory offset', BigInt(clean.readBigUInt64BE(f.find((x) => x.what === 'bitmap directory offset')!.offset)) + 8n),
    ];
    const seed = Number(process.env.BITMIRROR_DAMAGE_SEED ?? Math.floor(Math.random() * 2 ** 31));
    console.log(`# damaged bitmaps seed ${seed} (BITMIRROR_DAMAGE_SEED=${seed} replays it)`);
    const rand = rng(seed);
    for (let i = 0; i < 40; i++) {
      const field = f[Math.floor(rand() * f.length)];
      let what = '';
      const r = rng(Math.floor(rand() * 2 ** 31));
      variants.push({ what: `random ${i}`, apply: (b) => void (what = damage(b, field, r)) });
      Object.defineProperty(variants[variants.length - 1], 'what', { get: () => `random ${i}: ${what}` });
    }

    bm = await spawnDaemon(path.join(dir, 'bm.sock'));
    qsd = await spawnDaemon(path.join(dir, 'qsd.sock'), [], 'qemu-storage-daemon');
    let refused = 0;
    for (const [i, v] of variants.entries()) {
      const b = Buffer.from(clean);
      v.apply(b);
      const mine = path.join(dir, `bm-${i}.qcow2`);
      const theirs = path.join(dir, `qsd-${i}.qcow2`);
      await writeFile(mine, b);
      await copyFile(mine, theirs);
      const before = sha256(b);
      const qemuError = await errorOf(qsd.qmp.execute('blockdev-add', addArgs(`q${i}`, theirs)));
      const ourError = await errorOf(bm.qmp.execute('blockdev-add', addArgs(`q${i}`, mine)));
      const ctx = `${v.what} (QEMU: ${qemuError ?? 'opened'}; bitmirror: ${ourError ?? 'opened'})`;
      if (qemuError !== undefined) assert.equal(ourError, qemuError, ctx);
      if (ourError !== undefined) {
        refused++;
        assert.equal(sha256(await readFile(mine)), before, `image unchanged after the refused open: ${ctx}`);
      } else {
        await bm.qmp.execute('blockdev-del', { 'node-name': `q${i}` });
      }
      if (qemuError === undefined) await qsd.qmp.execute('blockdev-del', { 'node-name': `q${i}` }).catch(() => undefined);
    }
    assert.ok(refused >= 25, `most damages are refused (${refused} of ${variants.length})`);
    assert.equal(bm.proc.exitCode, null, 'the daemon is still running');
  } finally {
    await bm?.stop();
    await qsd?.stop();
    await cleanup();
  }
});

test('a bitmap name of NUL bytes: listed as \'\' read-only and refused read-write, as QEMU 7.2; the refused image unchanged', { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-nulname-');
  const daemons: SpawnedDaemon[] = [];
  try {
    const fixture = path.join(dir, 'fixture.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', fixture, '16M']);
    await mustRun('qemu-img', ['bitmap', '--add', fixture, 'abc']);
    const b = await readFile(fixture);
    const at = b.indexOf('abc', 65536);
    assert.ok(at > 0, 'the name in the directory');
    b.fill(0, at, at + 3);
    const seen: Record<string, unknown[]> = {};
    for (const program of ['qemu-storage-daemon', 'bitmirror'] as const) {
      const d = await spawnDaemon(path.join(dir, `${program}.sock`), [], program);
      daemons.push(d);
      seen[program] = [];
      for (const readOnly of [true, false]) {
        // A fresh copy for each open (QEMU's refused read-write open clears the autoclear bit).
        const img = path.join(dir, `${program}-${readOnly}.qcow2`);
        await writeFile(img, b);
        const node = readOnly ? 'ro' : 'rw';
        const err = await errorOf(d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': node, 'read-only': readOnly, file: { driver: 'file', filename: img, 'read-only': readOnly } }));
        const nodes = (await d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
        seen[program].push(err ?? nodes.find((n) => n['node-name'] === node)?.['dirty-bitmaps']);
        if (err === undefined) await d.qmp.execute('blockdev-del', { 'node-name': node });
        else if (program === 'bitmirror') assert.equal(sha256(await readFile(img)), sha256(b), 'image unchanged after the refused open');
      }
    }
    assert.deepEqual(seen.bitmirror, seen['qemu-storage-daemon']);
    assert.equal((seen.bitmirror[0] as Array<{ name: string }>)[0].name, '');
  } finally {
    for (const d of daemons) await d.stop();
    await cleanup();
  }
});

test('a damaged snapshot table or data-file-raw without a data file: refused as qemu-storage-daemon 7.2 refuses, the image unchanged', { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-refused-snap-');
  let bm: SpawnedDaemon | undefined;
  let qsd: SpawnedDaemon | undefined;
  try {
    const fixture = path.join(dir, 'fixture.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', fixture, '4M']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 1M', fixture]);
    await mustRun('qemu-img', ['snapshot', '-c', 'snap1', fixture]);
    const clean = await readFile(fixture);
    const table = Number(clean.readBigUInt64BE(64));
    const variants: Variant[] = [
      { what: 'snapshot 0 extra data 2000', apply: (b) => b.writeUInt32BE(2000, table + 36) },
      { what: 'nb_snapshots 0x8500', apply: (b) => b.writeUInt32BE(0x8500, 60) },
      { what: 'nb_snapshots 2 (the second entry zeroes: opened)', apply: (b) => b.writeUInt32BE(2, 60) },
      { what: 'autoclear data-file-raw', apply: (b) => b.writeBigUInt64BE(3n, 88) },
    ];
    bm = await spawnDaemon(path.join(dir, 'bm.sock'));
    qsd = await spawnDaemon(path.join(dir, 'qsd.sock'), [], 'qemu-storage-daemon');
    let n = 0;
    for (const v of variants) {
      for (const readOnly of [false, true]) {
        const b = Buffer.from(clean);
        v.apply(b);
        const ours = path.join(dir, `bm-${n}.qcow2`);
        const theirs = path.join(dir, `qsd-${n}.qcow2`);
        await writeFile(ours, b);
        await copyFile(ours, theirs);
        const args = (node: string, filename: string) => ({ ...addArgs(node, filename), 'read-only': readOnly });
        const e1 = await errorOf(bm.qmp.execute('blockdev-add', args(`n${n}`, ours)));
        const e2 = await errorOf(qsd.qmp.execute('blockdev-add', args(`n${n}`, theirs)));
        const ctx = `${v.what}${readOnly ? ' (read-only)' : ''}`;
        assert.equal(e1, e2, ctx);
        if (e1 === undefined) {
          await bm.qmp.execute('blockdev-del', { 'node-name': `n${n}` });
          await qsd.qmp.execute('blockdev-del', { 'node-name': `n${n}` });
        } else assert.equal(sha256(await readFile(ours)), sha256(b), `${ctx}: unchanged`);
        n++;
      }
    }
  } finally {
    await bm?.stop();
    await qsd?.stop();
    await cleanup();
  }
});
