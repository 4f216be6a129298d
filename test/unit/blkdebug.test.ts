/**
 * blkdebug: error injection by event, state machine, sector and iotype filters, once. Each scenario is
 * also run through QEMU's qemu-io with the same json: options when it is installed, and the outcomes
 * (success or strerror text) must agree.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { fileDriver } from '../../src/block/drivers/file.js';
import { rawDriver } from '../../src/block/drivers/raw.js';
import { blkdebugDriver, blkdebugEvent, BlkdebugNode } from '../../src/block/drivers/blkdebug.js';
import { BlockIOError, strerror } from '../../src/errors.js';
import type { BlockNode } from '../../src/block/node.js';

const HAVE_QEMU_IO = existsSync('/usr/bin/qemu-io');

type Op = ['read' | 'write' | 'zero' | 'flush', number, number];
interface Scenario {
  name: string;
  raw: boolean; // raw format node on top of blkdebug (raw raises read_aio/write_aio)
  blkdebug: Record<string, unknown>;
  ops: Op[];
  /** 'ok' or the errno code name per op. */
  expect: string[];
}

const scenarios: Scenario[] = [
  { name: 'read_aio from a raw parent', raw: true, blkdebug: { 'inject-error': [{ event: 'read_aio' }] }, ops: [['read', 0, 512]], expect: ['EIO'] },
  { name: 'no read_aio without a parent', raw: false, blkdebug: { 'inject-error': [{ event: 'read_aio' }] }, ops: [['read', 0, 512]], expect: ['ok'] },
  { name: 'event none fires at open', raw: false, blkdebug: { 'inject-error': [{ event: 'none' }] }, ops: [['read', 0, 512], ['read', 512, 512]], expect: ['EIO', 'EIO'] },
  { name: 'once', raw: true, blkdebug: { 'inject-error': [{ event: 'read_aio', once: true }] }, ops: [['read', 0, 512], ['read', 0, 512]], expect: ['EIO', 'ok'] },
  {
    name: 'sector and errno',
    raw: true,
    blkdebug: { 'inject-error': [{ event: 'read_aio', sector: 1, errno: 28 }] },
    ops: [['read', 0, 512], ['read', 512, 512], ['read', 0, 4096]],
    expect: ['ok', 'ENOSPC', 'ENOSPC'],
  },
  {
    name: 'set-state then inject in state 2',
    raw: true,
    blkdebug: { 'inject-error': [{ event: 'read_aio', state: 2 }], 'set-state': [{ event: 'write_aio', new_state: 2 }] },
    ops: [['read', 0, 512], ['write', 0, 512], ['read', 0, 512]],
    expect: ['ok', 'ok', 'EIO'],
  },
  { name: 'pwritev on the node itself', raw: false, blkdebug: { 'inject-error': [{ event: 'pwritev' }] }, ops: [['write', 0, 512], ['read', 0, 512]], expect: ['EIO', 'EIO'] },
  { name: 'pwritev_zero', raw: false, blkdebug: { 'inject-error': [{ event: 'pwritev_zero', once: true }] }, ops: [['write', 0, 512], ['zero', 0, 512], ['zero', 0, 512]], expect: ['ok', 'EIO', 'ok'] },
  { name: 'iotype filter', raw: false, blkdebug: { 'inject-error': [{ event: 'none', iotype: 'read' }] }, ops: [['write', 0, 512], ['read', 0, 512]], expect: ['ok', 'EIO'] },
  {
    name: 'write_aio, errno 122',
    raw: true,
    blkdebug: { 'inject-error': [{ event: 'write_aio', errno: 122 }] },
    ops: [['read', 0, 512], ['write', 0, 512]],
    expect: ['ok', 'EDQUOT'],
  },
  {
    name: 'a later event replaces the active rules',
    raw: true,
    blkdebug: { 'inject-error': [{ event: 'none', iotype: 'write', errno: 28 }, { event: 'read_aio', sector: 100 }] },
    ops: [['write', 0, 512], ['read', 0, 512], ['write', 0, 512]],
    expect: ['ENOSPC', 'ok', 'ok'],
  },
];

function blkdebugOptions(img: string, s: Scenario): Record<string, unknown> {
  const bd = { driver: 'blkdebug', image: { driver: 'file', filename: img, locking: 'off' }, ...s.blkdebug };
  return s.raw ? { driver: 'raw', file: bd } : bd;
}

function graph(): BlockGraph {
  const g = new BlockGraph();
  g.registerDriver(fileDriver);
  g.registerDriver(rawDriver);
  g.registerDriver(blkdebugDriver);
  return g;
}

async function runOurs(node: BlockNode, ops: Op[]): Promise<string[]> {
  const out: string[] = [];
  for (const [op, off, len] of ops) {
    try {
      if (op === 'read') await node.read(off, len);
      else if (op === 'write') await node.write(off, Buffer.alloc(len, 0xcd));
      else if (op === 'zero') await node.writeZeroes(off, len);
      else await node.flush();
      out.push('ok');
    } catch (err) {
      assert.ok(err instanceof BlockIOError, String(err));
      out.push(err.code);
    }
  }
  return out;
}

function runQemuIo(img: string, s: Scenario): string[] {
  const json = blkdebugOptions(img, s);
  delete ((s.raw ? (json.file as Record<string, unknown>) : json).image as Record<string, unknown>).locking;
  const args: string[] = [];
  for (const [op, off, len] of s.ops) {
    args.push('-c', op === 'read' ? `read ${off} ${len}` : op === 'write' ? `write ${off} ${len}` : op === 'zero' ? `write -z ${off} ${len}` : 'flush');
  }
  const r = spawnSync('qemu-io', [...args, `json:${JSON.stringify(json)}`], { encoding: 'utf8' });
  const lines = (r.stdout + r.stderr).split('\n').filter((l) => /^(read|wrote|write failed|read failed)/.test(l));
  return lines.map((l) => (l.includes('failed: ') ? l.slice(l.indexOf('failed: ') + 8) : 'ok'));
}

for (const s of scenarios) {
  test(`blkdebug: ${s.name}`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bm-blkdebug-'));
    const img = join(dir, 'disk.img');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const g = graph();
    try {
      const node = await g.open(blkdebugOptions(img, s));
      assert.deepEqual(await runOurs(node, s.ops), s.expect);
      if (HAVE_QEMU_IO) {
        const words = s.expect.map((e) => (e === 'ok' ? 'ok' : e === 'EDQUOT' ? 'Disk quota exceeded' : strerror(e)));
        assert.deepEqual(runQemuIo(img, s), words, 'qemu-io agrees');
      }
    } finally {
      await g.closeAll();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('blkdebug: flush_to_disk raised when a parent flushes', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'bm-blkdebug-'));
  const img = join(dir, 'disk.img');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const g = graph();
  try {
    const top = await g.open({
      driver: 'raw',
      file: { driver: 'blkdebug', image: { driver: 'file', filename: img, locking: 'off' }, 'inject-error': [{ event: 'flush_to_disk', once: true }] },
    });
    await assert.rejects(top.flush(), { code: 'EIO' });
    await top.flush();
  } finally {
    await g.closeAll();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('blkdebug: events raised by a format driver through blkdebugEvent', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'bm-blkdebug-'));
  const img = join(dir, 'disk.img');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const g = graph();
  try {
    const top = await g.open({
      driver: 'raw',
      file: {
        driver: 'blkdebug',
        image: { driver: 'file', filename: img, locking: 'off' },
        'inject-error': [{ event: 'l2_load', sector: 8, immediately: true }],
      },
    });
    const bd = top.primaryChild() as BlkdebugNode;
    assert.ok(bd instanceof BlkdebugNode);
    await top.read(4096, 512);
    blkdebugEvent(top, 'l2_load');
    await assert.rejects(top.read(4096, 512), { code: 'EIO', message: 'Input/output error' });
    await top.read(0, 512);
    assert.equal(bd.state, 1);
  } finally {
    await g.closeAll();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('blkdebug: option errors', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'bm-blkdebug-'));
  const img = join(dir, 'disk.img');
  writeFileSync(img, Buffer.alloc(1 << 20));
  const g = graph();
  const image = { driver: 'file', filename: img, locking: 'off' };
  try {
    await assert.rejects(g.open({ driver: 'blkdebug', image, config: '/nonexistent/blkdebug.conf' }), { message: 'Could not read blkdebug config file: No such file or directory' });
    const conf = join(dirname(img), 'rules.conf');
    writeFileSync(conf, '[inject-error]\nevent = "bogus"\n');
    await assert.rejects(g.open({ driver: 'blkdebug', image, config: conf }), { message: 'Invalid event name "bogus"' });
    writeFileSync(conf, '[inject-error]\nevent = "read_aio"\nerrno = "28"\nonce = "on"\n');
    // The config's rule: the first read fails with errno 28 (read_aio comes from a raw parent).
    const withConfig = await g.open({ driver: 'raw', file: { driver: 'blkdebug', image, config: conf } });
    await assert.rejects(withConfig.read(0, 512), (e: unknown) => e instanceof BlockIOError && e.code === 'ENOSPC');
    await withConfig.read(0, 512);
    await g.remove(withConfig);
    await assert.rejects(g.open({ driver: 'blkdebug', image, align: 3 }), { message: 'Cannot meet constraints with align 3' });
    await assert.rejects(g.open({ driver: 'blkdebug', image, 'inject-error': [{ event: 'bogus' }] }), {
      message: "Parameter 'event' does not accept value 'bogus'", // QEMU 7.2 names only the member
    });
    assert.equal(g.allNodes().length, 0, 'failed opens leave nothing behind');
    const n = await g.open({ driver: 'blkdebug', image, align: 4096 });
    assert.equal(n.requestAlignment, 4096);
    await n.write(100, Buffer.alloc(10, 7));
    assert.deepEqual([...(await n.read(98, 14))], [0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0, 0]);
  } finally {
    await g.closeAll();
    rmSync(dir, { recursive: true, force: true });
  }
});
