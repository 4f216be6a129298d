/**
 * `bitmirror bitmap`: on image files the same steps as `qemu-img bitmap` on a twin image give the same
 * bitmaps (qemu-img info) with the same dirty extents (qemu-nbd + nbdinfo); on a running daemon's node
 * (--qmp) the same; `show` draws and lists the extents a known pattern of writes left.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { copyFile, readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { runCli } from '../support/cli.js';
import { mustRun, nbdDirtyRanges, tempDir } from '../support/tools.js';
import { io, KiB, MiB, setup } from '../support/daemon.js';
import { decodePng } from '../support/png.js';

interface ImgBitmap {
  name: string;
  granularity: number;
  flags: string[];
}

async function imgBitmaps(img: string): Promise<ImgBitmap[]> {
  const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', img])) as { 'format-specific': { data: { bitmaps?: ImgBitmap[] } } };
  return (info['format-specific'].data.bitmaps ?? []).sort((a, b) => (a.name < b.name ? -1 : 1));
}

async function cli(...args: string[]): Promise<string> {
  const r = await runCli(['bitmap', ...args]);
  assert.equal(r.code, 0, `bitmirror bitmap ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** The extents `bitmap show --json` prints, as [offset, length] pairs. */
async function shownExtents(...args: string[]): Promise<Array<[number, number]>> {
  const out = JSON.parse(await cli('show', ...args, '--json')) as { extents: Array<{ offset: number; length: number }> };
  return out.extents.map((e) => [e.offset, e.length]);
}

test('bitmap on image files: the same steps as qemu-img bitmap give the same bitmaps and extents', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const q = path.join(dir, 'qemu.qcow2');
    const b = path.join(dir, 'bm.qcow2');
    const other = path.join(dir, 'other.qcow2');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', q, '32M']);
    await mustRun('qemu-img', ['create', '-f', 'qcow2', other, '32M']);
    await copyFile(q, b);
    /** Both images have the same bitmaps with the same extents; with `show`, bitmirror's view of them agrees. */
    const same = async (what: string, show = false) => {
      assert.deepEqual(await imgBitmaps(b), await imgBitmaps(q), `qemu-img info after ${what}`);
      for (const bm of await imgBitmaps(q)) {
        const expected = await nbdDirtyRanges(q, bm.name);
        assert.deepEqual(await nbdDirtyRanges(b, bm.name), expected, `extents of ${bm.name} after ${what}`);
        if (show) assert.deepEqual(await shownExtents(b, bm.name), expected, `show --json of ${bm.name} after ${what}`);
      }
    };
    const write = async (cmds: string[]) => {
      for (const img of [q, b]) await mustRun('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), img]);
    };

    await mustRun('qemu-img', ['bitmap', '--add', '-g', '128K', q, 'b0']);
    await cli('add', b, 'b0', '-g', '128K');
    await mustRun('qemu-img', ['bitmap', '--add', '--disable', q, 'b1']);
    await cli('add', b, 'b1', '--disabled');
    await same('add');
    await write(['write 1M 64k', 'write 10M 3M', 'write 31M 512']);
    await same('writes', true);
    await mustRun('qemu-img', ['bitmap', '--merge', 'b0', q, 'b1']);
    await cli('merge', b, 'b1', 'b0');
    await same('merge');
    await mustRun('qemu-img', ['bitmap', '--clear', q, 'b0']);
    await cli('clear', b, 'b0');
    await mustRun('qemu-img', ['bitmap', '--disable', q, 'b0']);
    await cli('disable', b, 'b0');
    await mustRun('qemu-img', ['bitmap', '--enable', q, 'b1']);
    await cli('enable', b, 'b1');
    await same('clear, disable, enable');
    await write(['write 5M 64k']);
    await same('more writes');
    // Sources on another image (-b), as qemu-img bitmap --merge SOURCE -b FILE.
    await mustRun('qemu-img', ['bitmap', '--add', other, 'o']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write 20M 1M', other]);
    await mustRun('qemu-img', ['bitmap', '--merge', 'o', '-b', other, '-F', 'qcow2', q, 'b0']);
    await cli('merge', b, 'b0', 'o', '-b', other);
    await same('merge from another image', true);
    await mustRun('qemu-img', ['bitmap', '--remove', q, 'b1']);
    await cli('remove', b, 'b1');
    await same('remove');

    // list reads what qemu-img made.
    const listed = JSON.parse(await cli('list', q, '--json')) as Array<{ name: string; granularity: number; recording: boolean; persistent: boolean; count: number }>;
    assert.deepEqual(
      listed.map((x) => [x.name, x.granularity, x.recording, x.persistent, x.count]),
      // b0: cleared and disabled, then other.qcow2's 1 MiB at 20 MiB merged in.
      [['b0', 131072, false, true, 1 * MiB]],
    );
    // Refusals change nothing and say QEMU's message.
    // (Opening the image read-write stores its bitmaps again at close, as qemu-img does: the bytes may
    // move, what they say must not.)
    const before = { bitmaps: await imgBitmaps(b), b0: await nbdDirtyRanges(b, 'b0') };
    const dup = await runCli(['bitmap', 'add', b, 'b0']);
    assert.equal(dup.code, 2);
    assert.match(dup.stderr, /Bitmap already exists: b0/);
    const missing = await runCli(['bitmap', 'show', b, 'nope']);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /Dirty bitmap 'nope' not found/);
    const usage = await runCli(['bitmap', 'add', b]);
    assert.equal(usage.code, 2);
    assert.deepEqual({ bitmaps: await imgBitmaps(b), b0: await nbdDirtyRanges(b, 'b0') }, before, 'refused commands leave the bitmaps as they were');
    await mustRun('qemu-img', ['check', b]);
  } finally {
    await cleanup();
  }
});

test('bitmap on a running daemon (--qmp): add, show (map, SVG, JSON), list, remove', async () => {
  const env = await setup('bitmap-cli');
  try {
    const img = env.f('d.qcow2');
    await mustRun('qemu-img', ['create', '-f', 'qcow2', img, '16M']);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
    const sock = env.d.socket;
    await cli('add', '--qmp', sock, 'disk0', 'b0');
    // A known pattern: 16 MiB in 16 cells of 1 MiB a row (64 KiB granules): cell 0 all dirty, cell 3
    // half, cell 9 one granule, cell 15 all.
    await io(env, 'disk0', 'write 0 1M');
    await io(env, 'disk0', 'write 3M 512k');
    await io(env, 'disk0', 'write 9M 4k');
    await io(env, 'disk0', 'write 15M 1M');
    const map = await cli('show', '--qmp', sock, 'disk0', 'b0', '--columns', '16', '--svg', env.f('map.svg'));
    const rows = map.split('\n').filter((l) => l.includes('│')).map((l) => l.slice(l.indexOf('│') + 1));
    // 16 MiB fits in 16 rows of 16 cells of 64 KiB; read it back per MiB: row r is MiB r.
    assert.equal(rows.length, 16);
    const perMiB = rows.map((r) => (r === '████████████████' ? 'all' : r.includes('█') ? 'some' : 'clean'));
    assert.deepEqual(perMiB, ['all', 'clean', 'clean', 'some', 'clean', 'clean', 'clean', 'clean', 'clean', 'some', 'clean', 'clean', 'clean', 'clean', 'clean', 'all']);
    assert.equal(rows[3], '████████········');
    assert.equal(rows[9], '█···············');
    assert.match(map, /dirty 2\.6 MiB of 16\.0 MiB/);
    await mustRun('rsvg-convert', ['-o', env.f('map.png'), env.f('map.svg')]);
    assert.ok(decodePng(await readFile(env.f('map.png'))).width > 0);
    assert.deepEqual(await shownExtents('--qmp', sock, 'disk0', 'b0'), [
      [0, 1 * MiB],
      [3 * MiB, 512 * KiB],
      [9 * MiB, 64 * KiB],
      [15 * MiB, 1 * MiB],
    ]);
    const listed = JSON.parse(await cli('list', '--qmp', sock, 'disk0', '--json')) as Array<{ name: string; count: number; persistent: boolean; busy: boolean }>;
    assert.deepEqual(listed, [{ name: 'b0', count: 2 * MiB + 576 * KiB, granularity: 65536, recording: true, persistent: true, busy: false, inconsistent: false }]);
    // show left nothing behind: no frozen copy, no export, no NBD server.
    const nodes = await env.d.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes', { flat: true });
    assert.deepEqual(nodes.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps']?.map((x) => x.name), ['b0']);
    assert.deepEqual(await env.d.qmp.execute('query-block-exports'), []);
    await cli('remove', '--qmp', sock, 'disk0', 'b0');
    assert.deepEqual(JSON.parse(await cli('list', '--qmp', sock, 'disk0', '--json')), []);
    const noNode = await runCli(['bitmap', 'list', '--qmp', sock, 'nonode']);
    assert.equal(noNode.code, 2);
    assert.match(noNode.stderr, /no node named 'nonode'/);
  } finally {
    await env.done();
  }
});
