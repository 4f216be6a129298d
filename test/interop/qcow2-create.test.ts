/** createQcow2: images pass qemu-img check, qemu-img info shows the right fields, layout matches QEMU's. */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { readFile, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { createQcow2, type Qcow2CreateOptions } from '../../src/block/drivers/qcow2/index.js';
import { mustRun, run, tempDir } from '../support/tools.js';
import { newGraph, openQcow2File } from '../support/graph.js';

async function create(filename: string, opts: Omit<Qcow2CreateOptions, 'file'>): Promise<void> {
  await writeFile(filename, '');
  const g = newGraph();
  try {
    const f = await g.open({ driver: 'file', 'node-name': 'f', filename });
    await createQcow2(f, opts as Qcow2CreateOptions);
  } finally {
    await g.closeAll();
  }
}

interface QemuInfo {
  'virtual-size': number;
  'cluster-size': number;
  'dirty-flag': boolean;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific': { type: string; data: Record<string, unknown> };
}

async function info(img: string): Promise<QemuInfo> {
  return JSON.parse(await mustRun('qemu-img', ['info', '--output=json', img])) as QemuInfo;
}

test('default image is byte-identical to qemu-img create', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    for (const [ours, args] of [
      [{ size: 1 << 30 }, []],
      [{ size: 1 << 30, version: 'v2' }, ['-o', 'compat=0.10']],
      [{ size: 1 << 30, 'cluster-size': 4096 }, ['-o', 'cluster_size=4096']],
      [{ size: 1 << 30, 'lazy-refcounts': true }, ['-o', 'lazy_refcounts=on']],
    ] as Array<[Omit<Qcow2CreateOptions, 'file'>, string[]]>) {
      const a = path.join(dir, 'ours.qcow2');
      const b = path.join(dir, 'qemu.qcow2');
      await create(a, ours);
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', ...args, b, String(ours.size)]);
      const [x, y] = [await readFile(a), await readFile(b)];
      assert.equal(x.length, y.length, `file size for ${JSON.stringify(ours)}`);
      assert.ok(x.equals(y), `bytes for ${JSON.stringify(ours)}`);
    }
  } finally {
    await cleanup();
  }
});

const variants: Array<[string, Omit<Qcow2CreateOptions, "file"> & { size: number }, Record<string, unknown>]> = [
  ['defaults', { size: 64 << 20 }, { compat: '1.1', 'refcount-bits': 16, 'lazy-refcounts': false, corrupt: false, 'extended-l2': false, 'compression-type': 'zlib' }],
  ['v2', { size: 64 << 20, version: 'v2' }, { compat: '0.10', 'refcount-bits': 16, 'compression-type': 'zlib' }],
  ['512-byte clusters, 1-bit refcounts, 4 GiB', { size: 4 * 2 ** 30, 'cluster-size': 512, 'refcount-bits': 1 }, { 'refcount-bits': 1 }],
  ['2M clusters, 64-bit refcounts', { size: 1 << 30, 'cluster-size': 2 << 20, 'refcount-bits': 64 }, { 'refcount-bits': 64 }],
  ['lazy refcounts', { size: 64 << 20, 'lazy-refcounts': true }, { 'lazy-refcounts': true }],
  ['preallocation=metadata', { size: 32 << 20, preallocation: 'metadata' }, {}],
  ['preallocation=metadata, 4k clusters', { size: 16 << 20, preallocation: 'metadata', 'cluster-size': 4096 }, {}],
];

for (const [name, opts, expected] of variants) {
  test(`createQcow2 ${name}: check clean, info right, writable`, async () => {
    const { dir, cleanup } = await tempDir();
    try {
      const img = path.join(dir, 'c.qcow2');
      await create(img, opts);
      const check = await run('qemu-img', ['check', img]);
      assert.equal(check.code, 0, check.stdout + check.stderr);
      const i = await info(img);
      assert.equal(i['virtual-size'], opts.size);
      assert.equal(i['cluster-size'], opts['cluster-size'] ?? 65536);
      assert.equal(i['dirty-flag'], false);
      assert.equal(i['format-specific'].type, 'qcow2');
      for (const [k, v] of Object.entries(expected)) assert.deepEqual(i['format-specific'].data[k], v, k);
      // Our node reports the same fields.
      const g = newGraph();
      const n = await openQcow2File(g, img);
      const ours = n.imageInfo();
      assert.equal(ours['virtual-size'], i['virtual-size']);
      assert.equal(ours['cluster-size'], i['cluster-size']);
      assert.deepEqual(ours['format-specific'], i['format-specific']);
      await n.write(opts.size - 70000, Buffer.alloc(70000, 0x3c));
      await n.write(0, Buffer.alloc(5000, 0x3d));
      await g.closeAll();
      const check2 = await run('qemu-img', ['check', img]);
      assert.equal(check2.code, 0, check2.stdout + check2.stderr);
      const r = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x3d 0 5000', '-c', `read -P 0 5000 ${70000}`, '-c', `read -P 0x3c ${opts.size - 70000} 70000`, img]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
    } finally {
      await cleanup();
    }
  });
}

test('createQcow2 with a backing file: header names it, reads fall through', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const base = path.join(dir, 'base.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', base, '8M']);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 0 8M', base]);
    const img = path.join(dir, 'top.qcow2');
    await create(img, { size: 8 << 20, 'backing-file': 'base.qcow2', 'backing-fmt': 'qcow2' });
    const i = await info(img);
    assert.equal(i['backing-filename'], 'base.qcow2');
    assert.equal(i['backing-filename-format'], 'qcow2');
    assert.equal((await run('qemu-img', ['check', img])).code, 0);
    const r = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x61 0 8M', img]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
  } finally {
    await cleanup();
  }
});

test('createQcow2 refuses bad option combinations with QEMU wording', async () => {
  const { dir, cleanup } = await tempDir();
  try {
    const img = path.join(dir, 'x.qcow2');
    const bad: Array<[Omit<Qcow2CreateOptions, 'file'>, RegExp]> = [
      [{ size: 1 << 20, version: 'v2', 'lazy-refcounts': true }, /Lazy refcounts only supported with compatibility level 1.1/],
      [{ size: 1 << 20, 'cluster-size': 1000 }, /Cluster size must be a power of two between 512 and 2048k/],
      [{ size: 1 << 20, 'refcount-bits': 128 }, /Refcount width must be a power of two and may not exceed 64 bits/],
      [{ size: 1000 }, /Image size must be a multiple of 512 bytes/],
      [{ size: 1 << 20, 'extended-l2': true }, /extended L2/],
      [{ size: 1 << 20, 'compression-type': 'zstd' }, /zstd/],
    ];
    for (const [opts, re] of bad) await assert.rejects(create(img, opts), re);
  } finally {
    await cleanup();
  }
});
