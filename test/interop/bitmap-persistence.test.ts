/**
 * Persistent dirty bitmaps in qcow2 through the daemon, checked against QEMU 7.2's tools: bitmaps made
 * by qemu-img/qemu-io load with the bits qemu-storage-daemon sees (x-debug-block-dirty-bitmap-sha256
 * and query output), bitmaps bitmirror stores are listed by qemu-img info, pass qemu-img check and
 * export through qemu-nbd with the same ranges, add's persistence checks give QEMU's messages, and a
 * SIGKILL leaves loaded bitmaps in use (inconsistent on the next open, usable only by remove).
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import type { SpawnedDaemon } from '../../src/daemon/spawn.js';
import { startDaemon } from '../support/daemon.js';
import { mustRun, nbdDirtyRanges, run, tempDir } from '../support/tools.js';
import { KiB, MiB } from '../../src/base/sizes.js';

const haveQemu = ['/usr/bin/qemu-storage-daemon', '/usr/bin/qemu-img', '/usr/bin/qemu-io', '/usr/bin/qemu-nbd', '/usr/bin/nbdinfo'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'QEMU 7.2 tools (qemu-storage-daemon, qemu-img, qemu-io, qemu-nbd, nbdinfo) not installed';

interface InfoBitmap {
  name: string;
  flags: string[];
  granularity: number;
}

async function infoBitmaps(img: string): Promise<InfoBitmap[] | undefined> {
  const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', img])) as { 'format-specific': { data: { bitmaps?: InfoBitmap[] } } };
  return info['format-specific'].data.bitmaps;
}

function blockdevArgs(img: string, readOnly = false): string[] {
  const ro = readOnly ? ',read-only=on' : '';
  return ['--blockdev', `driver=file,filename=${img},node-name=f${ro}`, '--blockdev', `driver=qcow2,file=f,node-name=q${ro}`];
}

async function dirtyBitmaps(d: SpawnedDaemon, node = 'q'): Promise<Array<Record<string, unknown>>> {
  const nodes = (await d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
  return (nodes.find((n) => n['node-name'] === node)?.['dirty-bitmaps'] as Array<Record<string, unknown>> | undefined) ?? [];
}

async function sha(d: SpawnedDaemon, name: string, node = 'q'): Promise<string> {
  return ((await d.qmp.execute('x-debug-block-dirty-bitmap-sha256', { node, name })) as { sha256: string }).sha256;
}

/** Every bitmap's query entry and sha256 (the daemon's view). */
async function snapshot(d: SpawnedDaemon): Promise<{ list: Array<Record<string, unknown>>; sha: Record<string, string> }> {
  const list = await dirtyBitmaps(d);
  const out: Record<string, string> = {};
  for (const b of list) if (!b.inconsistent) out[b.name as string] = await sha(d, b.name as string);
  return { list, sha: out };
}

async function errorOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return (err as Error).message;
  }
  return '(no error)';
}

/** The ranges a bitmap of granularity g has after `writes` (offset, bytes), merged. */
function expectedRanges(writes: Array<[number, number]>, g: number, size: number): Array<[number, number]> {
  const chunks = new Set<number>();
  for (const [o, n] of writes) for (let c = Math.floor(o / g); c * g < o + n; c++) chunks.add(c);
  const ranges: Array<[number, number]> = [];
  for (const c of [...chunks].sort((a, b) => a - b)) {
    const start = c * g;
    const len = Math.min(g, size - start);
    const last = ranges[ranges.length - 1];
    if (last && last[0] + last[1] === start) last[1] += len;
    else ranges.push([start, len]);
  }
  return ranges;
}

test('bitmaps made by qemu-img and qemu-io load with the bits QEMU sees', { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-persist-');
  try {
    const img = path.join(dir, 'a.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
    await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', '--disable', img, 'b1']);
    await mustRun('qemu-img', ['bitmap', '--add', '-g', '4k', img, 'b2']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write 1M 64k', '-c', 'write 3M 100k', '-c', 'write 5000 3', '-c', 'write 60M 4M', img]);
    await mustRun('qemu-img', ['bitmap', '--merge', 'b0', img, 'b1']);
    await mustRun('qemu-img', ['bitmap', '--disable', img, 'b2']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write 10M 8k', '-c', 'write 20M 1', img]);

    // QEMU's view, read-only and then read-write.
    const qro = await startDaemon(path.join(dir, 'qro.sock'), blockdevArgs(img, true), 'qemu-storage-daemon');
    const qemuRo = await snapshot(qro);
    await qro.stop();
    const bro = await startDaemon(path.join(dir, 'bro.sock'), blockdevArgs(img, true));
    const oursRo = await snapshot(bro);
    // Read-only bitmaps: no changes, and the image may not be written.
    assert.match(await errorOf(bro.qmp.execute('block-dirty-bitmap-clear', { node: 'q', name: 'b0' })), /Bitmap 'b0' is readonly and cannot be modified/);
    assert.equal(await bro.stop(), 0, bro.stderr());
    assert.deepEqual(oursRo, qemuRo);
    assert.equal(Object.keys(qemuRo.sha).length, 3);
    assert.deepEqual(await infoBitmaps(img), [
      { flags: ['auto'], name: 'b0', granularity: 65536 },
      { flags: [], name: 'b1', granularity: 131072 },
      { flags: [], name: 'b2', granularity: 4096 },
    ]);

    const brw = await startDaemon(path.join(dir, 'brw.sock'), blockdevArgs(img));
    assert.deepEqual(await snapshot(brw), qemuRo);
    // While open read-write, every loaded bitmap is in use on disk.
    assert.deepEqual(
      (await infoBitmaps(img))?.map((b) => b.flags),
      [['in-use', 'auto'], ['in-use'], ['in-use']],
    );
    assert.equal(await brw.stop(), 0, brw.stderr());
    assert.deepEqual((await infoBitmaps(img))?.map((b) => b.flags), [['auto'], [], []]);
    const check = await run('qemu-img', ['check', img]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
    // And QEMU still sees the same bits after our store.
    const q2 = await startDaemon(path.join(dir, 'q2.sock'), blockdevArgs(img, true), 'qemu-storage-daemon');
    assert.deepEqual(await snapshot(q2), qemuRo);
    await q2.stop();
  } finally {
    await cleanup();
  }
});

test('bitmaps bitmirror persists: qemu-img info, check, qemu-nbd ranges; remove frees clusters', { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-persist-');
  try {
    const img = path.join(dir, 'p.qcow2');
    const size = 64 * MiB;
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(size)]);
    const d = await startDaemon(path.join(dir, 'b.sock'), blockdevArgs(img));
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'p1', persistent: true });
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'p2', persistent: true, granularity: 4096 });
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'p3', persistent: true, granularity: 1 << 20, disabled: true });
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'tmp', persistent: false });
    const w1: Array<[number, number]> = [
      [0, 512],
      [1 * MiB + 100, 70 * KiB],
      [7 * MiB, 3 * MiB],
      [size - 4096, 4096],
    ];
    for (const [o, n] of w1) await d.qmp.hmp(`qemu-io q "write -P 0x33 ${o} ${n}"`);
    await d.qmp.execute('block-dirty-bitmap-disable', { node: 'q', name: 'p2' });
    const w2: Array<[number, number]> = [[33 * MiB + 5, 10]];
    for (const [o, n] of w2) await d.qmp.hmp(`qemu-io q "write -P 0x44 ${o} ${n}"`);
    await d.qmp.execute('block-dirty-bitmap-merge', { node: 'q', target: 'p3', bitmaps: ['p2'] });
    const ours = await snapshot(d);
    assert.equal(await d.stop(), 0, d.stderr());

    // Newest first, as QEMU 7.2 writes a new bitmap directory.
    assert.deepEqual(await infoBitmaps(img), [
      { flags: [], name: 'p3', granularity: 1048576 },
      { flags: [], name: 'p2', granularity: 4096 },
      { flags: ['auto'], name: 'p1', granularity: 65536 },
    ]);
    const check = await run('qemu-img', ['check', img]);
    assert.equal(check.code, 0, check.stdout + check.stderr);

    // The exported ranges are what the writes dirtied at each granularity.
    assert.deepEqual(await nbdDirtyRanges(img, 'p1'), expectedRanges([...w1, ...w2], 65536, size));
    assert.deepEqual(await nbdDirtyRanges(img, 'p2'), expectedRanges(w1, 4096, size));
    assert.deepEqual(await nbdDirtyRanges(img, 'p3'), expectedRanges(w1, 1 << 20, size));

    // QEMU loads the same bits (sha256) and the same query entries (minus the non-persistent one).
    const q = await startDaemon(path.join(dir, 'q.sock'), blockdevArgs(img, true), 'qemu-storage-daemon');
    const theirs = await snapshot(q);
    await q.stop();
    const persistentOnly = { list: ours.list.filter((b) => b.name !== 'tmp'), sha: { ...ours.sha } };
    delete persistentOnly.sha.tmp;
    assert.deepEqual(
      Object.fromEntries(Object.entries(theirs.sha)),
      persistentOnly.sha,
    );
    assert.deepEqual(
      theirs.list.map((b) => b.name).sort(),
      persistentOnly.list.map((b) => b.name).sort(),
    );

    // Remove one persistent bitmap: gone from the image at once, its clusters freed (no leaks).
    const d2 = await startDaemon(path.join(dir, 'b2.sock'), blockdevArgs(img));
    assert.deepEqual(await snapshot(d2).then((s) => s.sha), persistentOnly.sha);
    await d2.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'p2' });
    // The others keep their places in the directory.
    assert.deepEqual((await infoBitmaps(img))?.map((b) => [b.name, b.flags]), [['p3', ['in-use']], ['p1', ['in-use', 'auto']]]);
    await d2.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'p1' });
    await d2.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'p3' });
    assert.equal(await infoBitmaps(img), undefined);
    assert.equal(await d2.stop(), 0, d2.stderr());
    const check2 = await run('qemu-img', ['check', img]);
    assert.equal(check2.code, 0, check2.stdout + check2.stderr);
    assert.equal(await infoBitmaps(img), undefined);
  } finally {
    await cleanup();
  }
});

test("block-dirty-bitmap-add persistent=true: QEMU's checks and messages", { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-persist-');
  try {
    const v2 = path.join(dir, 'v2.qcow2');
    const v3 = path.join(dir, 'v3.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '64M']);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', v3, '64M']);
    await mustRun('qemu-img', ['bitmap', '--add', v3, 'ondisk']);
    const args = [
      '--blockdev',
      `driver=file,filename=${v2},node-name=f2`,
      '--blockdev',
      'driver=qcow2,file=f2,node-name=v2',
      '--blockdev',
      `driver=file,filename=${v3},node-name=f3`,
      '--blockdev',
      'driver=qcow2,file=f3,node-name=v3',
    ];
    const steps: Array<Record<string, unknown>> = [
      { node: 'v2', name: 'a', persistent: true },
      { node: 'v2', name: 'a', persistent: false },
      { node: 'v3', name: 'x'.repeat(1024), persistent: true },
      { node: 'v3', name: 'y'.repeat(1023), persistent: true },
      { node: 'f3', name: 'a', persistent: true },
      { node: 'v3', name: 'ondisk', persistent: true },
      { node: 'v3', name: 'big', persistent: true, granularity: 2 ** 31 },
      { node: 'v3', name: 'big', persistent: true },
      { node: 'v3', name: 'small', persistent: true, granularity: 512 },
    ];
    const results: Record<string, string[]> = {};
    for (const prog of ['qemu-storage-daemon', 'bitmirror'] as const) {
      const d = await startDaemon(path.join(dir, `${prog}.sock`), args, prog);
      const out: string[] = [];
      for (const s of steps) out.push(await errorOf(d.qmp.execute('block-dirty-bitmap-add', s)));
      out.push(JSON.stringify(await dirtyBitmaps(d, 'v3')));
      // Remove what was added so that both runs leave the image alike.
      for (const name of ['y'.repeat(1023), 'big', 'small']) await d.qmp.execute('block-dirty-bitmap-remove', { node: 'v3', name });
      assert.equal(await d.stop(), 0, d.stderr());
      results[prog] = out;
    }
    assert.deepEqual(results.bitmirror, results['qemu-storage-daemon']);
    assert.match(results.bitmirror[0], /^Can't make bitmap 'a' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files$/);
    assert.equal(results.bitmirror[1], '(no error)');
    assert.match(results.bitmirror[2], /Name length exceeds maximum \(1023 characters\)$/);
    assert.equal(results.bitmirror[4], "Can't store persistent bitmaps to f3: Operation not supported");
    assert.equal(results.bitmirror[5], 'Bitmap already exists: ondisk');
    const check = await run('qemu-img', ['check', v3]);
    assert.equal(check.code, 0, check.stdout + check.stderr);
  } finally {
    await cleanup();
  }
});

test('SIGKILL leaves loaded bitmaps in use: inconsistent on the next open, usable only by remove', { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-persist-');
  try {
    const img = path.join(dir, 'k.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    await mustRun('qemu-img', ['bitmap', '--add', img, 'b0']);
    await mustRun('qemu-img', ['bitmap', '--add', '--disable', img, 'b1']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write 0 64k', img]);

    const d = await startDaemon(path.join(dir, 'b.sock'), blockdevArgs(img));
    const writes: Array<Promise<unknown>> = [];
    for (let i = 0; i < 20; i++) writes.push(d.qmp.hmp(`qemu-io q "write -P 0x5a ${i * 1536 * KiB} 512k"`).catch(() => undefined));
    await writes[5];
    await d.kill();
    await Promise.all(writes);
    assert.deepEqual(await infoBitmaps(img), [
      { flags: ['in-use', 'auto'], name: 'b0', granularity: 65536 },
      { flags: ['in-use'], name: 'b1', granularity: 65536 },
    ]);
    // bitmirror would recover them from its write-intent record (bitmap-write-intent.test.ts); once
    // QEMU has written the image the record is void and both see them inconsistent.
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', `write ${60 * MiB} 4k`, img]);

    // QEMU and bitmirror agree on the inconsistent bitmaps and the messages.
    const results: Record<string, unknown[]> = {};
    for (const prog of ['qemu-storage-daemon', 'bitmirror'] as const) {
      const s = await startDaemon(path.join(dir, `${prog}.sock`), blockdevArgs(img, true), prog);
      results[prog] = [
        await dirtyBitmaps(s),
        await errorOf(s.qmp.execute('block-dirty-bitmap-enable', { node: 'q', name: 'b0' })),
        await errorOf(s.qmp.execute('x-debug-block-dirty-bitmap-sha256', { node: 'q', name: 'b0' })),
        await errorOf(s.qmp.execute('block-dirty-bitmap-merge', { node: 'q', target: 'b1', bitmaps: ['b0'] })),
      ];
      assert.equal(await s.stop(), 0, s.stderr());
    }
    assert.deepEqual(results.bitmirror, results['qemu-storage-daemon']);
    const list = results.bitmirror[0] as Array<Record<string, unknown>>;
    assert.deepEqual(
      list.map((b) => [b.name, b.inconsistent, b.recording, b.persistent]),
      [
        ['b1', true, false, true],
        ['b0', true, false, true],
      ],
    );
    assert.match(results.bitmirror[1] as string, /Bitmap 'b0' is inconsistent and cannot be used/);

    // qemu-nbd refuses to export it too.
    const nbd = await run('qemu-nbd', ['-r', '-f', 'qcow2', '-B', 'b0', '--socket', path.join(dir, 'x.sock'), img]);
    assert.notEqual(nbd.code, 0);
    assert.match(nbd.stderr, /Bitmap 'b0' is inconsistent and cannot be used/);

    // Read-write: still inconsistent, kept as in use on close; removing deletes it from the image.
    const d2 = await startDaemon(path.join(dir, 'b2.sock'), blockdevArgs(img));
    assert.match(await errorOf(d2.qmp.execute('block-dirty-bitmap-clear', { node: 'q', name: 'b1' })), /is inconsistent/);
    await d2.qmp.execute('block-dirty-bitmap-remove', { node: 'q', name: 'b0' });
    await d2.qmp.execute('block-dirty-bitmap-add', { node: 'q', name: 'b0', persistent: true });
    await d2.qmp.hmp('qemu-io q "write 5M 4k"');
    assert.equal(await d2.stop(), 0, d2.stderr());
    assert.deepEqual(await infoBitmaps(img), [
      { flags: ['in-use'], name: 'b1', granularity: 65536 },
      { flags: ['auto'], name: 'b0', granularity: 65536 },
    ]);
    // The killed session may have leaked clusters; nothing else may be wrong.
    const check = await run('qemu-img', ['check', img]);
    assert.ok(check.code === 0 || check.code === 3, check.stdout + check.stderr);
    assert.deepEqual(await nbdDirtyRanges(img, 'b0'), [[5 * MiB, 64 * KiB]]);
  } finally {
    await cleanup();
  }
});

/** The "Lost persistent bitmaps …" lines a daemon printed on stderr (without bitmirror's program-name prefix). */
async function lostBitmapLines(d: SpawnedDaemon, count: number): Promise<string[]> {
  const lines = () => d.stderr().split('\n').filter((l) => /Lost persistent bitmaps/.test(l)).map((l) => l.replace(/^bitmirror: /, ''));
  // stderr is a pipe of its own: it may arrive after the QMP reply.
  await d.waitOutput('stderr', new RegExp(Array<string>(count).fill('Lost persistent bitmaps.*\n').join('[^]*')));
  return lines();
}

test('blockdev-del removes a node whose persistent bitmaps cannot be stored and reports them lost, as QEMU', { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-persist-');
  try {
    // Two ways storing fails: a read-only node, and an image file that may not grow (EFBIG, the
    // "File too large" a full or limited file system gives) when the bitmaps need new clusters.
    const results: Record<string, unknown[]> = {};
    for (const prog of ['qemu-storage-daemon', 'bitmirror'] as const) {
      const ro = path.join(dir, `${prog}-ro.qcow2`);
      const full = path.join(dir, `${prog}-full.qcow2`);
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', ro, '64M']);
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', full, '64M']);
      await mustRun('qemu-img', ['bitmap', '--add', full, 'b']);
      const { size } = await fsp.stat(full);
      const d = await startDaemon(path.join(dir, `${prog}.sock`), [], prog, { maxFileSize: size });
      const out: unknown[] = [];
      try {
        const step = async (cmd: string, args: Record<string, unknown>) => out.push(await d.qmp.request(cmd, args).then((r) => r.error ?? r.return));
        const add = (node: string, img: string, readOnly: boolean) => step('blockdev-add', { driver: 'qcow2', 'node-name': node, 'read-only': readOnly, file: { driver: 'file', filename: img } });
        await add('q', ro, true);
        await step('block-dirty-bitmap-add', { node: 'q', name: 'p', persistent: true });
        await step('blockdev-del', { 'node-name': 'q' });
        await add('w', full, false);
        await step('block-dirty-bitmap-add', { node: 'w', name: 'p', persistent: true });
        await step('blockdev-del', { 'node-name': 'w' });
        out.push((await d.qmp.execute<unknown[]>('query-named-block-nodes')).length);
        // The names are free again; the bitmap that was in the image is left in use (inconsistent).
        await add('q', ro, true);
        await add('w', full, true);
        const w = (await d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true })).find((n) => n['node-name'] === 'w');
        out.push(w?.['dirty-bitmaps']);
        out.push(await lostBitmapLines(d, 2));
        assert.equal(await d.stop(), 0, d.stderr());
      } finally {
        if (d.proc.exitCode === null) await d.kill();
      }
      out.push(await infoBitmaps(ro), await infoBitmaps(full), (await run('qemu-img', ['check', full])).code);
      results[prog] = out;
    }
    // Where bitmirror goes beyond QEMU: the bitmap the failed store left in use comes back from the
    // write-intent record (nothing was written, so nothing is dirty) instead of inconsistent.
    assert.deepEqual(results.bitmirror[9], [{ name: 'b', recording: true, persistent: true, busy: false, granularity: 65536, count: 0, '__org.bitmirror_recovered': true }]);
    results.bitmirror[9] = results['qemu-storage-daemon'][9];
    assert.deepEqual(results.bitmirror, results['qemu-storage-daemon']);
    assert.deepEqual(results.bitmirror.slice(0, 7), [{}, {}, {}, {}, {}, {}, 0]);
    assert.deepEqual(results.bitmirror[10], [
      "Lost persistent bitmaps during inactivation of node 'q': No write access",
      "Lost persistent bitmaps during inactivation of node 'w': Failed to write bitmap 'b' to file: File too large",
    ]);
  } finally {
    await cleanup();
  }
});

test("persistent bitmaps keep QEMU's order: in the bitmap directory (qemu-img info) and after reopening", { skip }, async () => {
  const { dir, cleanup } = await tempDir('bm-persist-');
  try {
    /** The same sequence against either daemon; every order it sees, in the order it sees them. */
    const orders = async (program: 'bitmirror' | 'qemu-storage-daemon'): Promise<Record<string, string[]>> => {
      const img = path.join(dir, `${program}.qcow2`);
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
      const seen: Record<string, string[]> = {};
      const session = async (step: string, add: string[]): Promise<void> => {
        const d = await startDaemon(path.join(dir, `${program}.sock`), blockdevArgs(img), program);
        try {
          seen[`${step}: opened`] = (await dirtyBitmaps(d)).map((b) => b.name as string);
          for (const name of add) await d.qmp.execute('block-dirty-bitmap-add', { node: 'q', name, persistent: true });
          seen[`${step}: after adding ${add.join(', ')}`] = (await dirtyBitmaps(d)).map((b) => b.name as string);
          assert.equal(await d.stop(), 0, d.stderr());
        } finally {
          if (d.proc.exitCode === null) await d.kill();
        }
        seen[`${step}: qemu-img info`] = ((await infoBitmaps(img)) ?? []).map((b) => b.name);
      };
      await session('first', ['a', 'b', 'c']);
      await session('second', ['d']);
      await session('third', []);
      return seen;
    };
    const ours = await orders('bitmirror');
    assert.deepEqual(ours, await orders('qemu-storage-daemon'));
    // What QEMU 7.2 does, spelled out: newest first in memory and in a new directory; reloaded, each
    // entry goes to the head of the list; a bitmap added later is appended to the directory.
    assert.deepEqual(ours, {
      'first: opened': [],
      'first: after adding a, b, c': ['c', 'b', 'a'],
      'first: qemu-img info': ['c', 'b', 'a'],
      'second: opened': ['a', 'b', 'c'],
      'second: after adding d': ['d', 'a', 'b', 'c'],
      'second: qemu-img info': ['c', 'b', 'a', 'd'],
      'third: opened': ['d', 'a', 'b', 'c'],
      'third: after adding ': ['d', 'a', 'b', 'c'],
      'third: qemu-img info': ['c', 'b', 'a', 'd'],
    });
  } finally {
    await cleanup();
  }
});
