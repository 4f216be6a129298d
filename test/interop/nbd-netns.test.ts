/**
 * A mirror from one bitmirror daemon to another across two network namespaces (a veth pair between
 * them), through a relay that delays every chunk 20 ms each way (the kernel here has no netem): the
 * target daemon exports its image over NBD on its veth address; the source daemon's `nbd` node reaches
 * it through the relay. Guest writes continue before and after READY; the job pivots and the copy
 * compares identical. Needs root (ip netns); skipped without it.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { assertIdentical, MiB, qcow2 } from '../support/daemon.js';
import { mustRun, run } from '../support/tools.js';

const RELAY = path.join(path.dirname(fileURLToPath(import.meta.url)), '../support/delay-relay.js');
const tag = `bm${process.pid % 100000}`;
const nsA = `${tag}a`;
const nsB = `${tag}b`;
const subnet = `10.${200 + (process.pid % 50)}.${process.pid % 250}`;

/** Two namespaces joined by a veth pair: A at .1, B at .2. Returns false when this machine can't. */
async function makeNamespaces(): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return 'needs root for ip netns';
  const steps = [
    ['netns', 'add', nsA],
    ['netns', 'add', nsB],
    ['link', 'add', `${tag}va`, 'type', 'veth', 'peer', 'name', `${tag}vb`],
    ['link', 'set', `${tag}va`, 'netns', nsA],
    ['link', 'set', `${tag}vb`, 'netns', nsB],
    ['-n', nsA, 'addr', 'add', `${subnet}.1/24`, 'dev', `${tag}va`],
    ['-n', nsB, 'addr', 'add', `${subnet}.2/24`, 'dev', `${tag}vb`],
    ['-n', nsA, 'link', 'set', `${tag}va`, 'up'],
    ['-n', nsB, 'link', 'set', `${tag}vb`, 'up'],
    ['-n', nsA, 'link', 'set', 'lo', 'up'],
    ['-n', nsB, 'link', 'set', 'lo', 'up'],
  ];
  for (const args of steps) {
    const r = await run('ip', args);
    if (r.code !== 0) return `ip ${args.join(' ')}: ${r.stderr.trim()}`;
  }
  return undefined;
}

async function dropNamespaces(): Promise<void> {
  // Deleting a namespace removes its end of the veth pair, and with it the pair.
  await run('ip', ['netns', 'del', nsA]);
  await run('ip', ['netns', 'del', nsB]);
}

test('a mirror between daemons in two network namespaces over a 20 ms link: writes continue, pivot, identical', async (t) => {
  const why = await makeNamespaces();
  if (why) {
    await dropNamespaces();
    t.skip(why);
    return;
  }
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-netns-'));
  const src = path.join(dir, 'src.qcow2');
  const tgt = path.join(dir, 'tgt.qcow2');
  await qcow2(src, 32 * MiB);
  await qcow2(tgt, 32 * MiB);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 8M', '-c', 'write -P 0xa5 12M 4M', '-c', 'write -z 20M 2M', '-c', 'write -P 0x33 31M 64k', src]);
  const daemons: SpawnedDaemon[] = [];
  const relay = spawn('ip', ['netns', 'exec', nsA, process.execPath, RELAY, '127.0.0.1', '0', `${subnet}.2`, '10809', '20'], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const b = await spawnDaemon(path.join(dir, 'b.sock'), [], 'bitmirror', { netns: nsB });
    daemons.push(b);
    await b.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: tgt } });
    await b.qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: `${subnet}.2`, port: '10809' } } });
    await b.qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'tgt', writable: true });

    let relayOut = '';
    relay.stdout!.setEncoding('utf8');
    const port = await new Promise<number>((resolve, reject) => {
      relay.stdout!.on('data', (d: string) => {
        relayOut += d;
        const m = /listening (\d+)/.exec(relayOut);
        if (m) resolve(Number(m[1]));
      });
      relay.on('exit', (code) => reject(new Error(`relay exited with ${code}`)));
    });

    const a = await spawnDaemon(path.join(dir, 'a.sock'), [], 'bitmirror', { netns: nsA });
    daemons.push(a);
    const io = (cmd: string) => a.qmp.hmpOutput(`qemu-io src "${cmd}"`);
    await a.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
    await a.qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'remote', server: { type: 'inet', host: '127.0.0.1', port: String(port) }, export: 'tgt' });
    await a.qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'src', target: 'remote', sync: 'full' });
    assert.match(await io('write -P 0x77 4M 1M'), /^wrote 1048576\/1048576/);
    assert.match(await io('write -P 0x78 30M 4k'), /^wrote 4096\/4096/);
    await a.qmp.waitEvent('BLOCK_JOB_READY', { device: 'm' }, 300_000);
    // Writes after READY go to both sides before the guest sees them complete.
    assert.match(await io('write -P 0x79 12M 64k'), /^wrote 65536\/65536/);
    assert.match(await io('write -z 0 64k'), /^wrote 65536\/65536/);
    await a.qmp.execute('block-job-complete', { device: 'm' });
    const done = await a.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'm' }, 300_000);
    assert.equal((done.data as Record<string, unknown>).error, undefined, JSON.stringify(done.data));
    const { len, offset } = done.data as { len: number; offset: number };
    assert.equal(offset, len, JSON.stringify(done.data));

    assert.equal(await a.stop(), 0, a.stderr());
    assert.equal(await b.stop(), 0, b.stderr());
    await assertIdentical(src, tgt);
  } finally {
    for (const d of daemons) await d.kill().catch(() => undefined);
    relay.kill('SIGKILL');
    await dropNamespaces();
    await fsp.rm(dir, { recursive: true, force: true });
  }
});
