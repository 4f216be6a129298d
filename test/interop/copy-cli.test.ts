/**
 * `bitmirror copy` as a user runs it: on image files (an embedded daemon) and against a running daemon
 * (--qmp), checked by qemu-img (compare, check, info: the bitmaps on the copy, the source unchanged).
 * JSON progress lines are parsed and must be monotone; Ctrl-C (SIGINT) cancels cleanly. The terminal
 * (progress bar, Ctrl-C from a keyboard) is copy-cli-terminal.test.ts.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp, existsSync } from 'node:fs';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { MiB, startDaemon } from '../support/daemon.js';
import { jsonLines, runCli, startCli } from '../support/cli.js';
import { poll } from '../support/wait.js';
import { Writable } from 'node:stream';
import { runCopy, type CopyResult } from '../../src/cli/copy.js';
import { Progress } from '../../src/cli/progress.js';

interface InfoBitmap {
  name: string;
  flags: string[];
  granularity: number;
}

async function infoBitmaps(img: string): Promise<InfoBitmap[]> {
  const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', img])) as { 'format-specific'?: { data?: { bitmaps?: InfoBitmap[] } } };
  // By name: the order of a qcow2 bitmap directory is no property of the bitmaps.
  return (info['format-specific']?.data?.bitmaps ?? []).sort((a, b) => a.name.localeCompare(b.name));
}

async function assertIdentical(a: string, b: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-U', a, b]);
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

async function assertCheckClean(img: string): Promise<void> {
  const r = await run('qemu-img', ['check', img]);
  assert.equal(r.code, 0, `qemu-img check ${img}: ${r.stdout}${r.stderr}`);
}

/**
 * A qcow2 source of `size` with data and two persistent bitmaps carrying dirty bits (bm0 at 64 KiB,
 * bm1 at 128 KiB, disabled), and a pristine copy of it (`.orig`) to show later that it is unchanged.
 */
async function makeSource(dir: string, size = 16 * MiB): Promise<{ src: string; orig: string }> {
  const src = path.join(dir, 'src.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(size)]);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${size / 2}`, src]);
  await mustRun('qemu-img', ['bitmap', '--add', src, 'bm0']);
  await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', src, 'bm1']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 1M 64k', '-c', `write -P 0x22 ${size - MiB} 192k`, src]);
  await mustRun('qemu-img', ['bitmap', '--disable', src, 'bm1']);
  const orig = path.join(dir, 'src.orig.qcow2');
  await fsp.copyFile(src, orig);
  return { src, orig };
}

/** The source is as it was: same data, same bitmaps (names, flags, granularity), no damage. */
async function assertSourceUnchanged(src: string, orig: string): Promise<void> {
  await assertIdentical(src, orig);
  assert.deepEqual(await infoBitmaps(src), await infoBitmaps(orig));
  await assertCheckClean(src);
}

/** The JSON progress lines of a phase: `done` never goes back, never exceeds `total`. */
function assertMonotone(lines: Array<Record<string, unknown>>, phase: string): Array<Record<string, unknown>> {
  const progress = lines.filter((l) => l.type === 'progress' && l.phase === phase);
  assert.ok(progress.length >= 1, `progress lines of ${phase}: ${JSON.stringify(lines)}`);
  for (let i = 0; i < progress.length; i++) {
    const p = progress[i];
    assert.ok(Number.isSafeInteger(p.done) && Number.isSafeInteger(p.total), JSON.stringify(p));
    assert.ok((p.done as number) <= (p.total as number), JSON.stringify(p));
    if (i > 0) assert.ok((p.done as number) >= (progress[i - 1].done as number), `done went back: ${JSON.stringify(progress)}`);
  }
  return progress;
}

test('copy on image files: identical copy, bitmaps carried, JSON progress monotone, --verify, source unchanged', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-');
  try {
    const { src, orig } = await makeSource(dir);
    const dst = path.join(dir, 'dst.qcow2');
    const r = await runCli(['copy', '--verify', src, dst]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.stderr, '');
    const lines = jsonLines(r.stdout);
    const progress = assertMonotone(lines, 'copy');
    const last = progress[progress.length - 1];
    assert.equal(last.done, last.total);
    assertMonotone(lines, 'verify');
    const result = lines[lines.length - 1];
    assert.equal(result.type, 'result');
    assert.equal(result.status, 'completed');
    assert.equal(result.pivot, true);
    assert.deepEqual(result.verify, { identical: true, compared: 16 * MiB, skipped: 0 });
    await assertIdentical(src, dst);
    await assertCheckClean(dst);
    await assertSourceUnchanged(src, orig);
    // Same format, size and cluster size as the source.
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', dst])) as Record<string, unknown>;
    assert.equal(info.format, 'qcow2');
    assert.equal(info['virtual-size'], 16 * MiB);
    assert.equal(info['cluster-size'], 65536);
    // The bitmaps went with the copy: qemu-img lists them with their flags and granularity, and the
    // report gives their dirty bytes (bm0: 4 clusters of 64 KiB; bm1, disabled: 3 chunks of 128 KiB).
    assert.deepEqual(await infoBitmaps(dst), await infoBitmaps(orig));
    assert.deepEqual((await infoBitmaps(dst)).map((b) => [b.name, b.flags, b.granularity]), [
      ['bm0', ['auto'], 65536],
      ['bm1', [], 131072],
    ]);
    assert.deepEqual(
      (result.bitmaps as Array<Record<string, unknown>>).map((b) => [b.name, b.count, b.granularity, b.persistent, b.recording]),
      [
        ['bm0', 4 * 65536, 65536, true, true],
        ['bm1', 3 * 131072, 131072, true, false],
      ],
    );
    // A second copy onto the same file is refused without --reuse: nothing changes.
    const again = await runCli(['copy', src, dst]);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /^bitmirror copy: '.*dst\.qcow2' exists: use --reuse to copy into it\n$/);
    await assertIdentical(src, dst);
  } finally {
    await cleanup();
  }
});

test('copy --qmp: a node of a running daemon to a new file, switched over; then --no-pivot into --reuse', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-qmp-');
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(sock);
  try {
    const { src, orig } = await makeSource(dir);
    await d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: src } });
    const dst = path.join(dir, 'dst.qcow2');
    const r = await runCli(['copy', '--qmp', sock, 'disk0', dst, '--progress', 'none']);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /switched over to the copy/);
    assert.match(r.stdout, /the source's users now use node 'disk0-copy'/);
    // The copy's nodes stay in the daemon; no job is left.
    const nodes = (await d.qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true })).map((n) => n['node-name']);
    assert.ok(nodes.includes('disk0-copy') && nodes.includes('disk0-copy-file'), nodes.join());
    assert.deepEqual(await d.qmp.execute('query-jobs'), []);
    assert.match(r.stdout, /\n {2}bm0: 256\.0 KiB dirty \(262144 bytes\), granularity 64\.0 KiB, persistent, recording\n {2}bm1: 384\.0 KiB dirty \(393216 bytes\), granularity 128\.0 KiB, persistent, disabled\n/);

    // A consistent copy without a switch, into the existing file, after a write to the source.
    for (const n of ['disk0-copy', 'disk0-copy-file']) await d.qmp.execute('blockdev-del', { 'node-name': n });
    assert.match(await d.qmp.hmpOutput('qemu-io disk0 "write -P 0x33 5M 64k"'), /^wrote 65536\/65536 bytes at offset 5242880/);
    const np = await runCli(['copy', '--qmp', sock, '--reuse', '--no-pivot', '--node-name', 'again', 'disk0', dst, '--progress', 'json']);
    assert.equal(np.code, 0, np.stdout + np.stderr);
    assert.ok(jsonLines(np.stdout).some((l) => l.type === 'message' && /^replacing the bitmaps bm0, bm1 of '.*dst\.qcow2' with the source's$/.test(String(l.text))), np.stdout);
    const result = jsonLines(np.stdout).pop()!;
    assert.equal(result.pivot, false);
    // The copy's nodes are closed again (the file is consistent on its own); the source still open.
    const after = (await d.qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true })).map((n) => n['node-name']);
    assert.ok(!after.includes('again') && after.includes('disk0'), after.join());
    assert.deepEqual(await d.qmp.execute('query-jobs'), []);
    // Opened again, the copy's bitmaps hold exactly the source's bits: bm0 with the write at 5M that
    // the source recorded after the first copy, bm1 (disabled) without it; the mirror's own writes
    // into the reused copy are in neither (its old bm0 and bm1 were replaced).
    await d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'check', 'read-only': true, file: { driver: 'file', filename: dst, 'read-only': true } });
    const sha = async (node: string, name: string): Promise<string> => (await d.qmp.execute<{ sha256: string }>('x-debug-block-dirty-bitmap-sha256', { node, name })).sha256;
    for (const name of ['bm0', 'bm1']) assert.equal(await sha('check', name), await sha('disk0', name), name);
    const counts = (await d.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; count: number }> }>>('query-named-block-nodes', { flat: true }))
      .find((n) => n['node-name'] === 'check')!['dirty-bitmaps']!.map((b) => [b.name, b.count]).sort();
    assert.deepEqual(counts, [
      ['bm0', 5 * 65536],
      ['bm1', 3 * 131072],
    ]);
    await d.qmp.execute('blockdev-del', { 'node-name': 'check' });
    assert.equal(await d.stop(), 0, d.stderr());
    await assertIdentical(src, dst);
    await assertCheckClean(dst);
    await assertCheckClean(src);
    // The source's own bitmaps are still there (bm0 recorded the write at 5M).
    assert.deepEqual((await infoBitmaps(src)).map((b) => b.name), (await infoBitmaps(orig)).map((b) => b.name));
    assert.deepEqual((await infoBitmaps(dst)).map((b) => [b.name, b.flags]), [
      ['bm0', ['auto']],
      ['bm1', []],
    ]);
  } finally {
    await d.stop();
    await cleanup();
  }
});

test('copy: a raw target cannot take the bitmaps: refused with the message, the source unchanged', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-raw-');
  try {
    const { src, orig } = await makeSource(dir);
    const dst = path.join(dir, 'dst.raw');
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', dst, String(16 * MiB)]);
    const r = await runCli(['copy', '--reuse', src, dst]);
    assert.equal(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stderr, /cannot carry the persistent bitmaps bm0, bm1 onto '.*dst\.raw': a raw image cannot store bitmaps \(use a qcow2 target, or --no-bitmaps\)/);
    await assertSourceUnchanged(src, orig);
    // A qcow2 v2 target passes that first look, and the daemon refuses the switch with its reason:
    // the job is cancelled, the source keeps everything.
    const v2 = path.join(dir, 'dst-v2.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, String(16 * MiB)]);
    const refused = await runCli(['copy', '--reuse', src, v2]);
    assert.equal(refused.code, 1, refused.stdout + refused.stderr);
    assert.match(
      refused.stderr,
      /^bitmirror copy: the copy failed: Cannot carry dirty bitmap 'bm0' of node 'src' to node 'dst': Can't make bitmap 'bm0' persistent in 'dst': Cannot store dirty bitmaps in qcow2 v2 files; '.*src\.qcow2' is untouched; '.*dst-v2\.qcow2' holds what was copied but is no consistent copy \(the job ended without its switch\)\n$/,
    );
    assert.deepEqual(await infoBitmaps(v2), []);
    await assertSourceUnchanged(src, orig);
    // Without the bitmaps the copy goes through.
    const nb = await runCli(['copy', '--reuse', '--no-bitmaps', src, dst]);
    assert.equal(nb.code, 0, nb.stdout + nb.stderr);
    await assertIdentical(src, dst);
    await assertSourceUnchanged(src, orig);
  } finally {
    await cleanup();
  }
});

test('copy on image files: SIGINT cancels, the copy is removed, the embedded daemon is gone, the source unchanged', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-int-');
  try {
    const { src, orig } = await makeSource(dir, 32 * MiB);
    const dst = path.join(dir, 'dst.qcow2');
    // Throttled, so that the copy is still running when the signal comes.
    const c = startCli(['copy', '--speed', '1M', src, dst]);
    await c.waitStdout(/"phase":"copy","done":[1-9]/);
    // The embedded daemon: the command's child.
    const children = (await fsp.readFile(`/proc/${c.proc.pid}/task/${c.proc.pid}/children`, 'utf8')).trim().split(/\s+/).filter(Boolean);
    assert.equal(children.length, 1, `children of the command: ${children.join()}`);
    c.proc.kill('SIGINT');
    const code = await c.exited;
    assert.equal(code, 130, c.stdout() + c.stderr());
    assert.match(c.stderr(), /^bitmirror copy: cancelled: '.*src\.qcow2' is untouched; the incomplete copy '.*dst\.qcow2' was removed\n$/);
    assert.ok(!existsSync(dst));
    await poll('the embedded daemon to exit', () => !existsSync(`/proc/${children[0]}`));
    await assertSourceUnchanged(src, orig);
  } finally {
    await cleanup();
  }
});

test('copy: bad arguments exit 2 and change nothing', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-args-');
  try {
    const missing = await runCli(['copy', path.join(dir, 'nope.qcow2'), path.join(dir, 'x.qcow2')]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /^bitmirror copy: cannot open '.*nope\.qcow2': No such file or directory\n$/);
    assert.ok(!existsSync(path.join(dir, 'x.qcow2')));
    const one = await runCli(['copy', 'a']);
    assert.equal(one.code, 2);
    assert.match(one.stderr, /expected SRC and DST, got 1 argument/);
    const speed = await runCli(['copy', '--speed', 'fast', 'a', 'b']);
    assert.equal(speed.code, 2);
    assert.match(speed.stderr, /--speed: 'fast' is not a rate/);
  } finally {
    await cleanup();
  }
});

test('copy --shallow --sync-writes: only the top image, the copy gets the backing file; --verify through the chain', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-shallow-');
  try {
    const base = path.join(dir, 'base.qcow2');
    const top = path.join(dir, 'top.qcow2');
    const dst = path.join(dir, 'dst.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(16 * MiB)]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x01 0 ${8 * MiB}`, base]);
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    await mustRun('qemu-img', ['bitmap', '--add', top, 'tb']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x02 4M 1M', top]);
    const r = await runCli(['copy', '--shallow', '--sync-writes', '--verify', top, dst]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    const result = jsonLines(r.stdout).pop()!;
    // Only the top image's megabyte was copied; the rest is the backing file's.
    assert.equal(result.bytes, MiB);
    assert.deepEqual(result.verify, { identical: true, compared: 16 * MiB, skipped: 0 });
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', dst])) as Record<string, unknown>;
    assert.equal(info['full-backing-filename'], base);
    assert.equal(info['backing-filename-format'], 'qcow2');
    await assertIdentical(top, dst);
    await assertCheckClean(dst);
    assert.deepEqual((await infoBitmaps(dst)).map((b) => b.name), ['tb']);
  } finally {
    await cleanup();
  }
});

test('copy --bitmap: an incremental re-sync copies only the dirty clusters; interrupted, the bitmap keeps what is left', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-resync-');
  try {
    const { src } = await makeSource(dir);
    const dst = path.join(dir, 'dst.qcow2');
    // A copy without a switch, then a bitmap that records what changes after it.
    const first = await runCli(['copy', '--no-pivot', src, dst]);
    assert.equal(first.code, 0, first.stdout + first.stderr);
    await mustRun('qemu-img', ['bitmap', '--add', src, 'resync']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 2M 64k', '-c', 'write -P 0x45 9M 128k', src]);
    const small = await runCli(['copy', '--reuse', '--bitmap', 'resync', src, dst]);
    assert.equal(small.code, 0, small.stdout + small.stderr);
    assert.equal(jsonLines(small.stdout).pop()!.bytes, 3 * 65536);
    await assertIdentical(src, dst);

    // 8 MiB changed; a throttled re-sync is interrupted after its first bytes.
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x46 0 ${8 * MiB}`, src]);
    const c = startCli(['copy', '--reuse', '--bitmap', 'resync', '--speed', '1M', src, dst]);
    await c.waitStdout(/"phase":"copy","done":[1-9]/);
    c.proc.kill('SIGINT');
    assert.equal(await c.exited, 130, c.stdout() + c.stderr());
    assert.match(
      c.stderr(),
      /^bitmirror copy: cancelled: '.*src\.qcow2' is untouched; '.*dst\.qcow2' is an incomplete copy \([\d.]+ \S+ of 8\.0 MiB copied\), not usable as it is; bitmap 'resync' still marks what is left to copy: run the same command again to finish\n$/,
    );
    assert.ok(existsSync(dst), 'a reused copy stays');
    // The same command finishes: less than the 8 MiB is left.
    const rest = await runCli(['copy', '--reuse', '--bitmap', 'resync', src, dst]);
    assert.equal(rest.code, 0, rest.stdout + rest.stderr);
    const bytes = jsonLines(rest.stdout).pop()!.bytes as number;
    assert.ok(bytes > 0 && bytes < 8 * MiB, `re-run copied ${bytes}`);
    await assertIdentical(src, dst);
    await assertCheckClean(src);
    await assertCheckClean(dst);
  } finally {
    await cleanup();
  }
});

test('copy --verify on a live disk: writes after the switch are skipped, a change no bitmap saw is a difference (exit 3)', async () => {
  const { dir, cleanup } = await tempDir('bm-copy-verify-');
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(sock);
  try {
    const src = path.join(dir, 'src.raw');
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', src, String(8 * MiB)]);
    await mustRun('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${4 * MiB}`, src]);
    await d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'disk0', file: { driver: 'file', 'node-name': 'disk0-file', filename: src } });
    const hmp = async (line: string): Promise<void> => assert.match(await d.qmp.hmpOutput(line), /^wrote /);
    const out = new Writable({ write: (_c, _e, cb) => cb() });
    const options = { src: 'disk0', qmp: sock, reuse: false, shallow: false, syncWrites: false, pivot: true, carryBitmaps: true, verify: true };

    // After the switch the guest writes to the copy: recorded by the verify bitmap the copy carried.
    let result: CopyResult | undefined;
    const code = await runCopy({ ...options, dst: path.join(dir, 'a.raw') }, new Progress('none', out), {
      afterSwitch: () => hmp('qemu-io disk0-copy "write -P 0x77 1M 64k"'),
      onResult: (r) => (result = r),
    });
    assert.equal(code, 0);
    assert.deepEqual(result?.verify, { identical: true, compared: 8 * MiB - 65536, skipped: 65536 });

    // A change below the source's format node (its file node) is seen by no bitmap: a real difference.
    const code2 = await runCopy({ ...options, dst: path.join(dir, 'b.raw'), nodeName: 'copy2' }, new Progress('none', out), {
      afterSwitch: () => hmp('qemu-io disk0-file "write -P 0x66 2M 4k"'),
      onResult: (r) => (result = r),
    });
    assert.equal(code2, 3);
    assert.deepEqual(result?.verify, { identical: false, compared: 8 * MiB, skipped: 0, firstDifference: 2 * MiB });
    // Verification leaves nothing behind: no export, no NBD server, no verify bitmap.
    assert.deepEqual(await d.qmp.execute('query-block-exports'), []);
    const names = (await d.qmp.execute<Array<{ 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes', { flat: true })).flatMap((n) => (n['dirty-bitmaps'] ?? []).map((b) => b.name));
    assert.deepEqual(names, []);
    await d.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: path.join(dir, 'nbd.sock') } } });
  } finally {
    await d.stop();
    await cleanup();
  }
});
