/**
 * The same QMP script against qemu-storage-daemon 7.2 and bitmirror: the replies must be equal (the
 * version and auto-generated node names aside). HMP qemu-io, which qemu-storage-daemon lacks, writes
 * data through bitmirror that QEMU's own qemu-io then reads back.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { haveQsd } from '../support/tools.js';

/** Replace generated node names ('#block…') so the two daemons' replies compare. */
function mask(v: unknown): unknown {
  return JSON.parse(JSON.stringify(v).replace(/#block\d+/g, '#block'));
}

async function runScript(program: 'bitmirror' | 'qemu-storage-daemon', img: string, dir: string): Promise<unknown[]> {
  const d = await spawnDaemon(path.join(dir, `${program}.sock`), ['--blockdev', `driver=file,node-name=cli0,filename=${img}`], program);
  const replies: unknown[] = [];
  const r = async (cmd: string, args?: Record<string, unknown>) => replies.push(mask(await d.qmp.request(cmd, args)));
  try {
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk0', file: 'cli0' });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk0', file: 'cli0' });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk1', file: { driver: 'file' } });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk1', file: { driver: 'file', filename: 5 } });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk1', file: 7 });
    await r('blockdev-add', { driver: 'nope', 'node-name': 'disk1' });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk1', file: 'cli0', size: -1 });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk1', file: 'cli0', size: 1.5 });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk1', file: 'cli0', bogus: 1 });
    await r('blockdev-add', { driver: 'raw', 'node-name': '1bad', file: 'cli0' });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk1', file: 'nonode' });
    await r('blockdev-add', { driver: 'file', 'node-name': 'disk1', filename: '/nonexistent/x' });
    // The file driver takes regular files only; devices are host_device's (issue 18).
    await r('blockdev-add', { driver: 'file', 'node-name': 'disk1', filename: '/dev/zero' });
    await r('blockdev-add', { driver: 'file', 'node-name': 'disk1', filename: dir, 'read-only': true });
    await r('blockdev-add', { driver: 'file', 'node-name': 'disk1', filename: dir });
    await r('blockdev-add', { driver: 'host_device', 'node-name': 'disk1', filename: img });
    await r('blockdev-add', { driver: 'host_device', 'node-name': 'zero0', filename: '/dev/zero', 'read-only': true });
    await r('blockdev-del', { 'node-name': 'zero0' });
    await r('blockdev-add', { driver: 'null-co', 'node-name': 'null0', size: 1048576, 'read-zeroes': true });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'disk2', file: { driver: 'file', filename: img, 'read-only': true }, 'read-only': true });
    await r('query-named-block-nodes');
    await r('query-named-block-nodes', { flat: true });
    await r('blockdev-del', { 'node-name': 'cli0' });
    await r('blockdev-del', { 'node-name': 'nonode' });
    await r('blockdev-del', { 'node-name': 'disk0' });
    await r('blockdev-del', { 'node-name': 'disk2' });
    await r('blockdev-del', { 'node-name': 'null0' });
    await r('query-named-block-nodes', { flat: true });
  } finally {
    assert.equal(await d.stop(), 0);
  }
  return replies;
}

test('a qemu-storage-daemon QMP script gives the same replies from bitmirror', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-qsd-'));
  const img = path.join(dir, 'a.raw');
  await fsp.writeFile(img, Buffer.alloc(1 << 20));
  const theirs = await runScript('qemu-storage-daemon', img, dir);
  const ours = await runScript('bitmirror', img, dir);
  for (let i = 0; i < theirs.length; i++) assert.deepEqual(ours[i], theirs[i], `reply ${i}`);
  await fsp.rm(dir, { recursive: true, force: true });
});

test('HMP qemu-io writes through bitmirror are read back by QEMU qemu-io', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-qio-'));
  const img = path.join(dir, 'a.raw');
  await fsp.writeFile(img, Buffer.alloc(2 << 20));
  const d = await spawnDaemon(path.join(dir, 'q.sock'));
  try {
    await d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
    assert.equal((await d.qmp.hmpOutput('qemu-io disk0 "write -P 0xab 0 64k"')).split('\r\n')[0], 'wrote 65536/65536 bytes at offset 0');
    assert.equal((await d.qmp.hmpOutput('qemu-io disk0 "write -P 0xcd 1000 3000"')).split('\r\n')[0], 'wrote 3000/3000 bytes at offset 1000');
    assert.equal((await d.qmp.hmpOutput('qemu-io disk0 "write -z 1M 4k"')).split('\r\n')[0], 'wrote 4096/4096 bytes at offset 1048576');
    assert.match(await d.qmp.hmpOutput('qemu-io disk0 "read -P 0xab 0 1000"'), /^read 1000\/1000 bytes at offset 0\r\n/);
    assert.match(await d.qmp.hmpOutput('qemu-io disk0 "read -P 0xac 512 64k"'), /^Pattern verification failed at offset 512, 65536 bytes\r\n/);
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 "read -P 0xac 0 2G"'), 'length cannot exceed 2147483136, given 2G\r\n');
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 "write 0x200000 512"'), 'write failed: Input/output error\r\n');
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 "write -P 0x1ff 0 512"'), '0x1ff is not a valid pattern byte\r\n');
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 "read 0 abc"'), 'Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc\r\n');
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 "bogus"'), 'command "bogus" not found\r\n');
    assert.equal(await d.qmp.hmpOutput('qemu-io nonode "read 0 512"'), "Error: Cannot find device='' nor node-name='nonode'\r\n");
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 write 0 512'), 'qemu-io: extraneous characters at the end of line\r\nTry "help qemu-io" for more information\r\n');
    assert.equal(await d.qmp.hmpOutput('foo'), "unknown command: 'foo'\r\n");
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 "aio_write -P 0x11 1536k 4k"'), '');
    assert.match(await d.qmp.hmpOutput('qemu-io disk0 "aio_flush"'), /^wrote 4096\/4096 bytes at offset 1572864\r\n/);
    assert.equal(await d.qmp.hmpOutput('qemu-io disk0 "flush"'), '');
    await d.qmp.execute('blockdev-del', { 'node-name': 'disk0' });
  } finally {
    assert.equal(await d.stop(), 0);
  }
  const out = execFileSync('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 1000', '-c', 'read -P 0xcd 1000 3000', '-c', 'read -P 0xab 4000 61536', '-c', 'read -P 0 1M 4k', '-c', 'read -P 0x11 1536k 4k', img]).toString();
  assert.doesNotMatch(out, /Pattern verification failed/);
  assert.equal(out.match(/^read /gm)?.length, 5);
  await fsp.rm(dir, { recursive: true, force: true });
});

test('HMP qemu-io answers "" as QEMU does and prints its text on the daemon\'s stdout (stderr for errors)', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-qio-'));
  const img = path.join(dir, 'a.raw');
  await fsp.writeFile(img, Buffer.alloc(1 << 20));
  const d = await spawnDaemon(path.join(dir, 'q.sock'));
  try {
    await d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'disk0', file: { driver: 'file', filename: img } });
    // The reply is QEMU's: "" for every qemu-io command, the text going to the daemon's stdout.
    assert.equal((await d.qmp.request('human-monitor-command', { 'command-line': 'qemu-io disk0 "write -P 0x5c 64k 4k"' })).return, '');
    await d.waitOutput('stdout', 'wrote 4096/4096 bytes at offset 65536\n');
    assert.equal(await d.qmp.hmp('qemu-io disk0 "read -P 0x5d 64k 4k"'), '');
    await d.waitOutput('stdout', 'Pattern verification failed at offset 65536, 4096 bytes\n');
    // qemu-io prints an unknown command on stderr.
    assert.equal(await d.qmp.hmp('qemu-io disk0 "bogus"'), '');
    await d.waitOutput('stderr', 'command "bogus" not found\n');
    assert.doesNotMatch(d.stdout(), /bogus/);
    // What the monitor says itself stays the reply.
    assert.equal(await d.qmp.hmp('qemu-io nonode "read 0 512"'), "Error: Cannot find device='' nor node-name='nonode'\r\n");
    // HMP block_resize finds devices only, as QEMU 7.2's: a node is resized with QMP block_resize node-name=….
    assert.equal(await d.qmp.hmp('block_resize disk0 2M'), "Error: Cannot find device='disk0' nor node-name=''\r\n");
    assert.equal(await d.qmp.hmp('block_resize disk0 2x'), 'invalid size\r\nTry "help block_resize" for more information\r\n');
    assert.equal(await d.qmp.hmp('block_resize'), 'block_resize: block device name expected\r\nTry "help block_resize" for more information\r\n');
    // The data was written: QEMU's qemu-io reads it back.
    await d.qmp.execute('blockdev-del', { 'node-name': 'disk0' });
    const out = execFileSync('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5c 64k 4k', img]).toString();
    assert.doesNotMatch(out, /Pattern verification failed/);
  } finally {
    await d.stop();
  }
  await fsp.rm(dir, { recursive: true, force: true });
});

test('trace-event via HMP and QMP, with globs', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-trace-'));
  const d = await spawnDaemon(path.join(dir, 'q.sock'), ['--trace', 'monitor_qmp_cmd_*']);
  try {
    const st = await d.qmp.execute<Array<{ name: string; state: string }>>('trace-event-get-state', { name: 'monitor_qmp_*' });
    assert.deepEqual(st.find((s) => s.name === 'monitor_qmp_cmd_in_band')?.state, 'enabled');
    assert.equal(await d.qmp.hmp('trace-event monitor_qmp_respond on'), '');
    assert.equal(await d.qmp.hmp('trace-event zzz on'), 'unknown event "zzz"\r\n');
    const r = await d.qmp.request('trace-event-set-state', { name: 'nomatchzz', enable: true });
    assert.deepEqual(r.error, { class: 'GenericError', desc: 'unknown event "nomatchzz"' });
    await d.qmp.execute('query-version');
    // stderr is a pipe of its own: the trace lines may arrive after the QMP reply. Wait for the
    // command's line and a reply traced after it (earlier replies were traced too).
    await d.waitOutput('stderr', /monitor_qmp_cmd_in_band .*cmd=query-version.*\n(.*\n)*.*monitor_qmp_respond /);
  } finally {
    await d.stop();
  }
  await fsp.rm(dir, { recursive: true, force: true });
});

test('query-named-block-nodes of a qcow2 backing chain with unaligned file sizes: same order, depth and sizes as qemu-storage-daemon', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-chain-'));
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  // A fresh qcow2 is 196616 bytes: not a multiple of 512, so its file node rounds up as QEMU's does.
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  const replies = async (program: 'bitmirror' | 'qemu-storage-daemon') => {
    const d = await spawnDaemon(path.join(dir, `${program}.sock`), [], program);
    const out: unknown[] = [];
    try {
      await d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
      for (const flat of [true, false]) {
        const nodes = await d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat });
        // actual-size is the host's allocation, which the two daemons' writes may leave different.
        out.push(mask(JSON.parse(JSON.stringify(nodes, (k, v: unknown) => (k === 'actual-size' ? undefined : v)))));
      }
    } finally {
      assert.equal(await d.stop(), 0);
    }
    return out;
  };
  const theirs = await replies('qemu-storage-daemon');
  const ours = await replies('bitmirror');
  assert.deepEqual(ours, theirs);
  await fsp.rm(dir, { recursive: true, force: true });
});
