/**
 * `bitmirror daemon`'s command line: qemu-storage-daemon's options in both forms, clean exits on
 * SIGTERM and quit (with data flushed), and clear messages (no stack traces) for bad options.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as net from 'node:net';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BITMIRROR_BIN, spawnDaemon } from '../../src/daemon/spawn.js';
import { QmpClient } from '../../src/qmp/client.js';
import { RawQmpClient } from '../support/raw-qmp.js';
import { poll } from '../support/wait.js';

function runCli(args: string[]): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [BITMIRROR_BIN, 'daemon', ...args], { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, stderr: r.stderr };
}

test('bad options get a one-line message and a non-zero exit', () => {
  const cases: Array<[string[], RegExp]> = [
    [['--bogus'], /unrecognized option '--bogus'/],
    [['--chardev'], /requires an argument/],
    [['--monitor', 'chardev=nope'], /chardev "nope" not found/],
    [['--chardev', 'socket,id=m'], /path=… or host=…,port=…/],
    // No network listener without an explicit host (qemu-storage-daemon 7.2 opens none for this option).
    [['--chardev', 'socket,id=m,port=4444,server=on,wait=off', '--monitor', 'chardev=m'], /chardev 'm': port= needs host= \(host=127\.0\.0\.1/],
    [['--blockdev', 'driver=file'], /Parameter 'filename' is missing/],
    [['--blockdev', 'driver=nope,node-name=x'], /Parameter 'driver' does not accept value 'nope'/],
    [['--blockdev', 'driver=file,filename=/nonexistent/x,node-name=f'], /Could not open '\/nonexistent\/x': No such file or directory/],
    [['--blockdev', '{"driver": '], /invalid JSON/],
    // qemu-storage-daemon 7.2 prints exactly this (null-co's size is an 'int' in QAPI).
    [['--blockdev', 'driver=null-co,node-name=n,size=abc'], /Parameter 'size' expects integer$/m],
  ];
  for (const [args, re] of cases) {
    const r = runCli(args);
    assert.notEqual(r.status, 0, args.join(' '));
    assert.match(r.stderr, re, args.join(' '));
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  }
});

test('--blockdev in dotted and JSON form, --pidfile, TCP monitor, SIGTERM flushes and exits 0', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-cli-'));
  const img = path.join(dir, 'a.raw');
  await fsp.writeFile(img, Buffer.alloc(1 << 20));
  const pidfile = path.join(dir, 'pid');
  const port = 20000 + Math.floor(Math.random() * 20000);
  const proc = spawn(
    process.execPath,
    [
      BITMIRROR_BIN, 'daemon',
      '--chardev', `socket,id=t0,host=127.0.0.1,port=${port},server=on,wait=off`,
      '--monitor', 'chardev=t0',
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'd0', file: 'f0' }),
      '--pidfile', pidfile,
    ],
    { stdio: 'ignore' },
  );
  const exited = new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
  let qmp: QmpClient | undefined;
  for (let i = 0; i < 200 && !qmp; i++) {
    try {
      qmp = await QmpClient.connect({ host: '127.0.0.1', port });
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  assert.ok(qmp);
  assert.equal((await fsp.readFile(pidfile, 'utf8')).trim(), String(proc.pid));
  const nodes = await qmp.execute<Array<{ 'node-name': string; drv: string }>>('query-named-block-nodes');
  assert.deepEqual(nodes.map((n) => [n['node-name'], n.drv]), [['d0', 'raw'], ['f0', 'file']]);
  await qmp.hmp('qemu-io d0 "write -P 0x77 4k 4k"');
  proc.kill('SIGTERM');
  assert.equal(await exited, 0);
  qmp.close();
  const data = await fsp.readFile(img);
  assert.ok(data.subarray(4096, 8192).every((b) => b === 0x77));
  await assert.rejects(fsp.access(pidfile), 'pidfile removed on exit');
  await fsp.rm(dir, { recursive: true, force: true });
});

test('a client that connects while the pidfile is being written is greeted after it, and answered: what it sent meanwhile and later', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-held-'));
  const sock = path.join(dir, 'm.sock');
  // The daemon's write of a FIFO waits for a reader: its start-up stops there, with the socket
  // listening and connections held (not greeted, not read) until this test reads the pid.
  const pidfile = path.join(dir, 'pid');
  execFileSync('mkfifo', [pidfile]);
  const proc = spawn(process.execPath, [BITMIRROR_BIN, 'daemon', '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm', '--pidfile', pidfile], { stdio: 'ignore' });
  const exited = new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
  try {
    let conn: net.Socket | undefined;
    await poll('the monitor socket to accept', async () => {
      conn = await new Promise<net.Socket | undefined>((resolve) => {
        const s = net.createConnection(sock);
        s.once('connect', () => resolve(s));
        s.once('error', () => resolve(undefined));
      });
      return conn !== undefined;
    });
    const c = new RawQmpClient(conn!);
    c.sock.write('{"execute":"qmp_capabilities"}{"execute":"query-version","id":1}');
    assert.equal(c.replies.length, 0, 'no greeting before the pidfile exists');
    assert.equal((await fsp.readFile(pidfile, 'utf8')).trim(), String(proc.pid));
    // Polled, not waitFor: a daemon that never answers fails the test (and is killed below).
    await poll('the greeting and both replies', () => c.replies.length >= 3);
    assert.ok('QMP' in c.replies[0], 'the greeting comes first');
    assert.deepEqual(c.replies[1], { return: {} });
    assert.equal(c.replies[2].id, 1);
    assert.ok('return' in c.replies[2]);
    c.sock.write('{"execute":"quit","id":2}');
    await poll('the reply to quit', () => c.replies.length >= 4);
    assert.deepEqual(c.replies[3], { return: {}, id: 2 });
    assert.equal(await exited, 0);
    c.sock.destroy();
  } finally {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test('quit replies, then the daemon exits 0', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-quit-'));
  const d = await spawnDaemon(path.join(dir, 'q.sock'));
  assert.deepEqual(await d.qmp.execute('quit'), {});
  assert.equal(await d.stop(), 0);
  await fsp.rm(dir, { recursive: true, force: true });
});

/** Wait until `cond()` holds (a file appears or goes away, a line is written). */
async function until(what: string, cond: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail(`timed out waiting for ${what}`);
}

test('--daemonize: the command exits 0 once the daemon has started; the daemon serves, quits and removes its pidfile', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-daemonize-'));
  const sock = path.join(dir, 'q.sock');
  const r = spawnSync(process.execPath, [BITMIRROR_BIN, 'daemon', '--daemonize', '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm', '--pidfile', 'pid'], { cwd: dir, encoding: 'utf8', timeout: 20_000 });
  assert.equal(r.status, 0, r.stderr);
  // Started means listening: no retries needed.
  const qmp = await QmpClient.connect(sock);
  const pid = Number((await fsp.readFile(path.join(dir, 'pid'), 'utf8')).trim());
  assert.ok(pid > 0);
  assert.doesNotThrow(() => process.kill(pid, 0), 'the daemon runs on after the command exited');
  assert.deepEqual(await qmp.execute('query-block'), []);
  await qmp.execute('quit');
  // The pidfile was given relative to the old working directory; the daemon still removes it.
  await until('the pidfile to go', async () => fsp.access(path.join(dir, 'pid')).then(() => false, () => true));
  qmp.close();
  for (const [args, msg] of [
    [['--blockdev', 'driver=file,node-name=f,filename=/nonexistent/x'], /Could not open '\/nonexistent\/x': No such file or directory/],
    [['--chardev', 'stdio,id=m', '--monitor', 'm'], /cannot use stdio with -daemonize/],
  ] as const) {
    const bad = spawnSync(process.execPath, [BITMIRROR_BIN, 'daemon', '--daemonize', ...args], { encoding: 'utf8', timeout: 20_000 });
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, msg);
  }
  await fsp.rm(dir, { recursive: true, force: true });
});

test('--trace events=FILE (a pattern a line, -PATTERN disables) and file=FILE (trace output there)', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-tracefile-'));
  const events = path.join(dir, 'events');
  const out = path.join(dir, 'trace.log');
  await fsp.writeFile(events, '# the monitor\nmonitor_qmp_*\n\n-monitor_qmp_respond\n');
  const d = await spawnDaemon(path.join(dir, 'q.sock'), ['--trace', `events=${events},file=${out}`]);
  try {
    const st = await d.qmp.execute<Array<{ name: string; state: string }>>('trace-event-get-state', { name: 'monitor_qmp_*' });
    assert.deepEqual(st.map((s) => [s.name, s.state]), [['monitor_qmp_cmd_in_band', 'enabled'], ['monitor_qmp_respond', 'disabled']]);
    await d.qmp.execute('query-version');
    // Written synchronously when the command is dispatched: there before the reply.
    const log = await fsp.readFile(out, 'utf8');
    assert.match(log, /monitor_qmp_cmd_in_band .*cmd=query-version/);
    assert.doesNotMatch(log, /monitor_qmp_respond/);
    assert.doesNotMatch(d.stderr(), /monitor_qmp/);
  } finally {
    await d.stop();
  }
  await fsp.rm(dir, { recursive: true, force: true });
});
