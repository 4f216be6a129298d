/**
 * Image locking against real QEMU: bitmirror's file driver takes QEMU's OFD lock bytes, so qemu-io and
 * qemu-img refuse images bitmirror holds, and bitmirror refuses images QEMU holds, with QEMU's words.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { fileDriver, FileNode, type HintedError } from '../../src/block/drivers/file.js';
import { BlockNode, type BdrvChild } from '../../src/block/node.js';
import { BLK_PERM_ALL, BLK_PERM_CONSISTENT_READ, BLK_PERM_RESIZE, BLK_PERM_WRITE, BLK_PERM_WRITE_UNCHANGED, unnamedBackend } from '../../src/block/permissions.js';
import { rawDriver } from '../../src/block/drivers/raw.js';
import { poll } from '../support/wait.js';

const HAVE_QEMU = existsSync('/usr/bin/qemu-io') && existsSync('/usr/bin/qemu-img') && existsSync('/usr/bin/qemu-storage-daemon');
const skip = HAVE_QEMU ? false : 'QEMU tools not installed';

function setup(): { dir: string; img: string; graph: BlockGraph; done: () => Promise<void> } {
  const dir = mkdtempSync(join(tmpdir(), 'bm-lock-'));
  const img = join(dir, 'disk.img');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const graph = new BlockGraph();
  graph.registerDriver(fileDriver);
  graph.registerDriver(rawDriver);
  return {
    dir,
    img,
    graph,
    done: async () => {
      await graph.closeAll();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const guests = new Map<BlockNode, BdrvChild>();

/**
 * Attach a guest device to a node, as a QEMU BlockBackend of a running VM: it reads consistently, writes
 * and resizes a writable node, and shares only reads (everything with force-share). Its permissions
 * reach the file node and become lock bytes.
 */
function attachGuest(node: BlockNode): void {
  const perm = node.readOnly ? BLK_PERM_CONSISTENT_READ : BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE;
  const shared = node.forceShare ? BLK_PERM_ALL : BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED;
  guests.set(node, node.attachParent(unnamedBackend(), 'root', perm, shared));
}

function detachGuest(node: BlockNode): void {
  BlockNode.detachParent(guests.get(node)!);
  guests.delete(node);
}

/** Open a node and attach a guest to it: 'holding' the image. */
async function hold(graph: BlockGraph, opts: Record<string, unknown>): Promise<BlockNode> {
  const node = await graph.open(opts);
  try {
    attachGuest(node);
  } catch (err) {
    await graph.remove(node);
    throw err;
  }
  return node;
}

function run(cmd: string, args: string[]): { status: number | null; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

/** Start a QEMU process and wait until it holds a lock byte on `img` (visible in /proc/locks). */
async function holdWithQemu(cmd: string, args: string[], img: string, input = false): Promise<ChildProcess> {
  const child = spawn(cmd, args, { stdio: [input ? 'pipe' : 'ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const ino = spawnSync('stat', ['-c', '%i', img], { encoding: 'utf8' }).stdout.trim();
  try {
    await poll(`${cmd} to lock ${img}`, () => {
      if (child.exitCode !== null) throw new Error(`${cmd} exited: ${err}`);
      return readFileSync('/proc/locks', 'utf8').includes(`:${ino} `);
    }, undefined, 50);
  } catch (e) {
    child.kill();
    throw new Error(`${(e as Error).message}: ${err}`);
  }
  return child;
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await exited;
}

test('qemu-io and qemu-img refuse to write an image bitmirror holds read-write', { skip }, async () => {
  const t = setup();
  try {
    await hold(t.graph, { driver: 'file', 'node-name': 'f', filename: t.img });
    const w = run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', t.img]);
    assert.notEqual(w.status, 0);
    assert.match(w.out, /Failed to get "write" lock/);
    assert.ok(w.out.includes(`Is another process using the image [${t.img}]?`), w.out);
    const rs = run('qemu-img', ['resize', '-f', 'raw', t.img, '2M']);
    assert.notEqual(rs.status, 0);
    assert.match(rs.out, /Failed to get "write" lock/); // resize also takes write, checked first
    // qemu-img info of a raw image takes no permissions in QEMU either, so it works.
    assert.equal(run('qemu-img', ['info', t.img]).status, 0);
    // After close, the locks are gone.
    await t.graph.remove(t.graph.lookup('f'));
    assert.equal(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', t.img]).status, 0);
  } finally {
    await t.done();
  }
});

test('qemu-img info of a qcow2 image bitmirror holds needs -U, as for a running guest', { skip }, async () => {
  const t = setup();
  const q = join(t.dir, 'disk.qcow2');
  try {
    assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '1M']).status, 0);
    await hold(t.graph, { driver: 'file', 'node-name': 'f', filename: q });
    const info = run('qemu-img', ['info', q]);
    assert.notEqual(info.status, 0);
    assert.match(info.out, /Failed to get shared "write" lock/);
    assert.ok(info.out.includes(`Is another process using the image [${q}]?`), info.out);
    assert.equal(run('qemu-img', ['info', '-U', q]).status, 0);
  } finally {
    await t.done();
  }
});

test('read-only: QEMU may read (qemu-img info -U / read-only share) but not write', { skip }, async () => {
  const t = setup();
  try {
    await hold(t.graph, { driver: 'file', 'node-name': 'f', filename: t.img, 'read-only': true });
    const w = run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', t.img]);
    assert.notEqual(w.status, 0);
    assert.match(w.out, /Failed to get "write" lock/);
    assert.equal(run('qemu-io', ['-r', '-U', '-f', 'raw', '-c', 'read 0 512', t.img]).status, 0);
    assert.equal(run('qemu-img', ['info', t.img]).status, 0, 'qemu-img info shares reads with a reader');
  } finally {
    await t.done();
  }
});

test('force-share and locking=off take no conflicting locks', { skip }, async () => {
  const t = setup();
  try {
    await hold(t.graph, { driver: 'file', 'node-name': 'a', filename: t.img, 'read-only': true, 'force-share': true });
    await hold(t.graph, { driver: 'file', 'node-name': 'b', filename: t.img, locking: 'off' });
    assert.equal(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', t.img]).status, 0);
    await assert.rejects(t.graph.open({ driver: 'file', 'node-name': 'c', filename: t.img, 'force-share': true }), {
      message: 'force-share=on can only be used with read-only images',
    });
  } finally {
    await t.done();
  }
});

test('bitmirror refuses an image qemu-storage-daemon holds (qcow2 over file)', { skip }, async () => {
  const t = setup();
  const q = join(t.dir, 'disk.qcow2');
  assert.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '1M']).status, 0);
  const qsd = await holdWithQemu('qemu-storage-daemon', ['--blockdev', `driver=qcow2,node-name=q,file.driver=file,file.filename=${q}`], q);
  try {
    const err = (await hold(t.graph, { driver: 'file', 'node-name': 'f', filename: q }).then(
      () => assert.fail('opened an image QEMU holds'),
      (e: unknown) => e,
    )) as HintedError;
    assert.equal(err.message, 'Failed to get "write" lock');
    assert.equal(err.hint, `Is another process using the image [${q}]?`);
    // Read-only without force-share: QEMU does not share write, we do not share it either: refused.
    await assert.rejects(hold(t.graph, { driver: 'file', 'node-name': 'r', filename: q, 'read-only': true }), {
      message: 'Failed to get shared "write" lock',
    });
    // qemu-img info -U equivalent works.
    await hold(t.graph, { driver: 'file', 'node-name': 'u', filename: q, 'read-only': true, 'force-share': true });
    // Nothing was left locked by the failed opens: only 'u' is open.
    assert.deepEqual(t.graph.allNodes().map((n) => n.nodeName), ['u']);
  } finally {
    await stop(qsd);
    await t.done();
  }
});

test('bitmirror refuses an image a background qemu-io holds, with QEMU message', { skip }, async () => {
  const t = setup();
  // Interactive qemu-io keeps the image open (read-write, sharing everything) while stdin is open.
  const qio = await holdWithQemu('qemu-io', ['-f', 'raw', t.img], t.img, true);
  try {
    await assert.rejects(hold(t.graph, { driver: 'file', 'node-name': 'f', filename: t.img }), (e: HintedError) => {
      assert.equal(e.message, 'Failed to get shared "write" lock');
      assert.equal(e.hint, `Is another process using the image [${t.img}]?`);
      return true;
    });
    // locking=off opens anyway.
    await hold(t.graph, { driver: 'file', 'node-name': 'g', filename: t.img, locking: 'off' });
  } finally {
    qio.stdin?.end();
    await stop(qio);
    await t.done();
  }
});

test('bitmirror refuses an image qemu-storage-daemon exports read-write over NBD', { skip }, async () => {
  const t = setup();
  const sock = join(t.dir, 'nbd.sock');
  const qsd = await holdWithQemu(
    'qemu-storage-daemon',
    [
      '--blockdev', `driver=file,node-name=f,filename=${t.img}`,
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e,node-name=f,writable=on',
    ],
    t.img,
  );
  try {
    // The export takes write and refuses to share resize: QEMU's qcow2 layer would report the same.
    await assert.rejects(hold(t.graph, { driver: 'file', 'node-name': 'f', filename: t.img }), { message: 'Failed to get "resize" lock' });
  } finally {
    await stop(qsd);
    await t.done();
  }
});

test('two bitmirror nodes on one file conflict, as two QEMU users do', { skip }, async () => {
  const t = setup();
  try {
    await hold(t.graph, { driver: 'file', 'node-name': 'a', filename: t.img });
    await assert.rejects(hold(t.graph, { driver: 'file', 'node-name': 'b', filename: t.img }), { message: 'Failed to get "write" lock' });
    // Claims can be dropped and taken again (a user detaching, another attaching).
    detachGuest(t.graph.lookup('a'));
    await hold(t.graph, { driver: 'file', 'node-name': 'c', filename: t.img });
    assert.throws(() => attachGuest(t.graph.lookup('a')), { message: 'Failed to get "write" lock' });
    assert.equal((t.graph.lookup('a') as FileNode).perm, 0, 'a failed claim leaves the old permissions');
  } finally {
    await t.done();
  }
});

test('unclaimed nodes take no locks, as QEMU nodes without users', { skip }, async () => {
  const t = setup();
  try {
    // Same as qemu-storage-daemon --blockdev driver=file plus a raw node and a read-only second node.
    await t.graph.open({ driver: 'file', 'node-name': 'f', filename: t.img });
    await t.graph.open({ driver: 'raw', 'node-name': 'r', file: 'f' });
    await t.graph.open({ driver: 'raw', 'node-name': 'ro', 'read-only': true, file: { driver: 'file', filename: t.img, 'read-only': true } });
    assert.equal(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', t.img]).status, 0);
    // Claiming through raw reaches the file node.
    attachGuest(t.graph.lookup('r'));
    assert.match(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', t.img]).out, /Failed to get "write" lock/);
  } finally {
    await t.done();
  }
});
