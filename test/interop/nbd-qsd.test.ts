/**
 * The NBD server against qemu-storage-daemon 7.2: the same QMP script (nbd-server-start/stop,
 * block-export-add/del, the legacy commands, query-block-exports, BLOCK_EXPORT_DELETED) gives the same
 * replies and events; the same image exported by each gives the same answers to nbdinfo (plain,
 * --json, --list, --map of every context), qemu-img info/map/compare, qemu-io and nbdcopy; writes
 * over NBD (nbdcopy, qemu-img convert, qemu-io) land in the image and mark its dirty bitmaps.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { haveQsd, startDaemon } from '../support/daemon.js';
import { mustRun, run, tempDir } from '../support/tools.js';
import type { SpawnedDaemon } from '../../src/daemon/spawn.js';

type Program = 'bitmirror' | 'qemu-storage-daemon';
const skip = !haveQsd && 'qemu-storage-daemon not installed';

/** A 16 MiB qcow2 with data at 1 MiB and 8 MiB, a zeroed range, an enabled bitmap b0 and a disabled b1. */
async function makeImage(file: string): Promise<void> {
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', file, '16M']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 1M 64k', '-c', 'write -z 4M 1M', file]);
  await mustRun('qemu-img', ['bitmap', '--add', file, 'b0']);
  await mustRun('qemu-img', ['bitmap', '--add', '--disable', file, 'b1']);
  await mustRun('qemu-img', ['bitmap', '--add', '-g', '128k', '--disable', file, 'b2']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xcd 8M 4k', '-c', 'write -P 0x11 12M 512', file]);
  await mustRun('qemu-img', ['bitmap', '--merge', 'b0', '--disable', file, 'b2']);
}

interface Served {
  d: SpawnedDaemon;
  sock: string;
  uri: (name: string) => string;
  image: string;
}

/** `program` serving a fresh copy of `base` with exports ro (b1, b2, allocation depth) and rw (writable, b0). */
async function serve(program: Program, dir: string, base: string): Promise<Served> {
  const image = path.join(dir, `${program}.qcow2`);
  await fsp.copyFile(base, image);
  const sock = path.join(dir, `${program}-nbd.sock`);
  const d = await startDaemon(path.join(dir, `${program}-qmp.sock`), [
    '--blockdev', `driver=file,node-name=f0,filename=${image}`,
    '--blockdev', 'driver=qcow2,node-name=d0,file=f0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=e0,node-name=d0,name=ro,bitmaps.0=b1,bitmaps.1=b2,allocation-depth=on,description=read only',
    '--export', 'type=nbd,id=e1,node-name=d0,name=rw,writable=on,bitmaps.0=b0',
  ], program);
  return { d, sock, image, uri: (name) => `nbd+unix:///${name}?socket=${sock}` };
}

/** Outputs of the read-only peers against one server, with its socket path replaced. */
async function readAnswers(s: Served, base: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const tool = async (key: string, cmd: string, args: string[]) => {
    const r = await run(cmd, args);
    // qemu-io's timing lines differ from run to run.
    const text = `exit ${r.code}\n${r.stdout}${r.stderr}`.split('\n').filter((l) => !/ops\/sec/.test(l)).join('\n');
    out[key] = text.split(s.sock).join('<sock>');
  };
  const ro = s.uri('ro');
  await tool('nbdinfo', 'nbdinfo', [ro]);
  await tool('nbdinfo --json', 'nbdinfo', ['--json', s.uri('rw')]);
  await tool('nbdinfo --list', 'nbdinfo', ['--list', s.uri('')]);
  await tool('nbdinfo --map', 'nbdinfo', ['--map', ro]);
  await tool('nbdinfo --map b1', 'nbdinfo', ['--map=qemu:dirty-bitmap:b1', ro]);
  await tool('nbdinfo --map b2', 'nbdinfo', ['--map=qemu:dirty-bitmap:b2', ro]);
  await tool('nbdinfo --map b0 (rw)', 'nbdinfo', ['--map=qemu:dirty-bitmap:b0', s.uri('rw')]);
  await tool('nbdinfo --map depth', 'nbdinfo', ['--map=qemu:allocation-depth', ro]);
  await tool('nbdinfo --map --totals', 'nbdinfo', ['--map', '--totals', ro]);
  await tool('nbdinfo missing export', 'nbdinfo', [s.uri('nope')]);
  await tool('qemu-img info', 'qemu-img', ['info', '--output=json', ro]);
  await tool('qemu-img map', 'qemu-img', ['map', '--output=json', '-f', 'raw', ro]);
  await tool('qemu-img map x-dirty-bitmap', 'qemu-img', [
    'map', '--output=json', '--image-opts',
    `driver=nbd,export=ro,server.type=unix,server.path=${s.sock},x-dirty-bitmap=qemu:dirty-bitmap:b1`,
  ]);
  await tool('qemu-io read', 'qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0xab 1M 64k', '-c', 'read -P 0 0 1M', '-c', 'read -P 0x11 12M 512', '-c', 'read -v 12M 16', ro]);
  await tool('qemu-io read past end', 'qemu-io', ['-r', '-f', 'raw', '-c', 'read 16M 512', ro]);
  await tool('qemu-img compare', 'qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', ro, base]);
  return out;
}

test('nbd exports answer nbdinfo, qemu-img and qemu-io as qemu-storage-daemon does', { skip, timeout: 240_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-nbd-qsd-');
  try {
    const base = path.join(dir, 'base.qcow2');
    await makeImage(base);
    const answers: Record<Program, Record<string, string>> = { bitmirror: {}, 'qemu-storage-daemon': {} };
    const copies: Record<Program, Buffer> = { bitmirror: Buffer.alloc(0), 'qemu-storage-daemon': Buffer.alloc(0) };
    for (const program of ['qemu-storage-daemon', 'bitmirror'] as const) {
      const s = await serve(program, dir, base);
      try {
        answers[program] = await readAnswers(s, base);
        const out = path.join(dir, `${program}-out.raw`);
        await mustRun('nbdcopy', [s.uri('ro'), out]);
        copies[program] = await fsp.readFile(out);
      } finally {
        assert.equal(await s.d.stop(), 0, s.d.stderr());
      }
    }
    for (const key of Object.keys(answers['qemu-storage-daemon'])) {
      assert.equal(answers.bitmirror[key], answers['qemu-storage-daemon'][key], key);
    }
    assert.ok(copies.bitmirror.equals(copies['qemu-storage-daemon']), 'nbdcopy out of each export gives the same bytes');
    assert.equal(copies.bitmirror.readUInt8(1 << 20), 0xab);
  } finally {
    await cleanup();
  }
});

test('writes over NBD (nbdcopy, qemu-img convert, qemu-io) reach the image and mark its bitmap, as with qemu-storage-daemon', { skip, timeout: 240_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-nbd-qsd-w-');
  try {
    const base = path.join(dir, 'base.qcow2');
    await makeImage(base);
    const src = path.join(dir, 'src.raw');
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', src, '16M']);
    await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 2M 3M', '-c', 'write -P 0x77 15M 4k', src]);
    const results: Record<Program, Record<string, unknown>> = { bitmirror: {}, 'qemu-storage-daemon': {} };
    for (const program of ['qemu-storage-daemon', 'bitmirror'] as const) {
      const s = await serve(program, dir, base);
      try {
        await mustRun('nbdcopy', [src, s.uri('rw')]);
        const afterCopy = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri('rw')]);
        await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 10M 64k', '-c', 'write -z 11M 128k', '-c', 'discard 2M 1M', s.uri('rw')]);
        await mustRun('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, s.uri('rw')]);
        const map = await run('nbdinfo', ['--map=qemu:dirty-bitmap:b0', s.uri('rw')]);
        const nodes = (await s.d.qmp.execute('query-named-block-nodes', { flat: true })) as Array<Record<string, unknown>>;
        const d0 = nodes.find((n) => n['node-name'] === 'd0')!;
        const bitmaps = (d0['dirty-bitmaps'] as Array<Record<string, unknown>>).map((b) => [b.name, b.count, b.busy]);
        results[program] = { afterCopy: afterCopy.code, map: map.stdout, bitmaps, exports: await s.d.qmp.execute('query-block-exports') };
      } finally {
        assert.equal(await s.d.stop(), 0, s.d.stderr());
      }
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', src, s.image]);
      results[program].final = cmp.code;
      results[program].check = (await run('qemu-img', ['check', s.image])).code;
    }
    assert.deepEqual(results.bitmirror, results['qemu-storage-daemon']);
    assert.equal(results.bitmirror.final, 0, 'the image equals the source after the last copy');
    assert.equal(results.bitmirror.afterCopy, 0);
  } finally {
    await cleanup();
  }
});

/** The QMP script run against both daemons. */
async function qmpScript(program: Program, dir: string, base: string): Promise<unknown[]> {
  const image = path.join(dir, `${program}-qmp.qcow2`);
  await fsp.copyFile(base, image);
  const sock = path.join(dir, 'n.sock');
  const d = await startDaemon(path.join(dir, `${program}-q.sock`), [
    '--blockdev', `driver=file,node-name=f0,filename=${image}`,
    '--blockdev', 'driver=qcow2,node-name=d0,file=f0',
    '--blockdev', `driver=file,node-name=ro0,read-only=on,filename=${base}`,
  ], program);
  const replies: unknown[] = [];
  const q = async (cmd: string, args?: Record<string, unknown>) => {
    const r = await d.qmp.request(cmd, args);
    replies.push([cmd, 'error' in r ? { error: r.error } : { return: r.return }]);
  };
  try {
    await q('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0' });
    await q('nbd-server-stop');
    await q('nbd-server-add', { device: 'd0' });
    await q('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await q('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
    await q('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'nope' });
    await q('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', bitmaps: ['b0'] });
    await q('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', bitmaps: ['zz'] });
    await q('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', bitmaps: [{ node: 'd0', name: 'zz' }] });
    await q('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', bitmaps: ['b1'], 'allocation-depth': true, description: 'hello' });
    await q('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0' });
    await q('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'd0' });
    await q('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'd0', name: 'other', writable: true, bitmaps: [{ node: 'd0', name: 'b0' }] });
    await q('block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'd0', name: 'other3', bitmaps: ['b1'] });
    await q('block-export-add', { type: 'nbd', id: 'e4', 'node-name': 'd0', name: 'x', bogus: 1 });
    await q('block-export-add', { type: 'nbd', id: 'e5', 'node-name': 'ro0', name: 'rofile' });
    await q('block-dirty-bitmap-remove', { node: 'd0', name: 'b1' });
    await q('block-dirty-bitmap-disable', { node: 'd0', name: 'b0' });
    await q('query-block-exports');
    await q('block-export-del', { id: 'zz' });
    await q('block-export-del', { id: 'e2' });
    await q('block-export-del', { id: 'e5', mode: 'hard' });
    await q('blockdev-del', { 'node-name': 'd0' });
    await q('query-block-exports');
    await q('nbd-server-add', { device: 'd0', name: 'leg' });
    await q('nbd-server-add', { device: 'd0' });
    await q('nbd-server-remove', { name: 'nope' });
    await q('nbd-server-remove', { name: 'leg' });
    await q('nbd-server-stop');
    await q('query-block-exports');
    await q('nbd-server-stop');
    await q('nbd-server-remove', { name: 'e0' });
    await q('block-dirty-bitmap-remove', { node: 'd0', name: 'b1' });
    replies.push(['events', d.qmp.events.map((e) => [e.event, e.data])]);
  } finally {
    assert.equal(await d.stop(), 0, d.stderr());
  }
  return replies;
}

test('NBD QMP commands reply and emit events as qemu-storage-daemon 7.2', { skip, timeout: 120_000 }, async () => {
  const { dir, cleanup } = await tempDir('bm-nbd-qmp-');
  try {
    const base = path.join(dir, 'base.qcow2');
    await makeImage(base);
    const qsd = await qmpScript('qemu-storage-daemon', dir, base);
    const bm = await qmpScript('bitmirror', dir, base);
    for (let i = 0; i < qsd.length; i++) assert.deepEqual(bm[i], qsd[i], `reply ${i}`);
    assert.equal(bm.length, qsd.length);
  } finally {
    await cleanup();
  }
});
