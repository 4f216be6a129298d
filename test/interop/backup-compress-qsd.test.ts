/**
 * blockdev-backup/drive-backup with `compress: true`, against qemu-storage-daemon 7.2: the same backup
 * leaves a target qemu-img finds identical to the source, clean, and compressed the way QEMU's is (the
 * same clusters compressed, the incompressible ones stored plain, a file of about the same size); the
 * replies for targets that cannot take compressed writes, and the failure of a compressed write into
 * an allocated cluster, are QEMU's. On bitmirror alone (qemu-storage-daemon has no HMP qemu-io): guest
 * writes during a compressed backup (copy-before-write copies compressed) leave the point-in-time
 * image, and normal writes over the compressed target afterwards keep it clean.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { copyFile, stat, writeFile } from 'node:fs/promises';
import { haveQsd, setup, eventsUntil, io, type Env } from '../support/daemon.js';
import { mustRun, run } from '../support/tools.js';
import { rng } from '../support/random.js';

const CS = 65536;
const SIZE = 8 << 20;

/**
 * The source's bytes, cluster by cluster: text deflate shrinks, random bytes it cannot shrink (stored
 * plain by a compressed write), one byte repeated, and zeroes (left out of the qcow2 by convert).
 */
function sourceBytes(): Buffer {
  const rand = rng(2026);
  const words = ['point', 'in', 'time', 'backup', 'of', 'a', 'qcow2', 'image', 'compressed', 'cluster'];
  const b = Buffer.alloc(SIZE);
  for (let c = 0; c < SIZE / CS; c++) {
    const o = c * CS;
    switch (c % 5) {
      case 0:
      case 1:
        for (let p = o; p < o + CS; ) p += b.write(`${words[Math.floor(rand() * words.length)]} `, p, o + CS - p);
        break;
      case 2:
        for (let p = o; p < o + CS; p++) b[p] = Math.floor(rand() * 256);
        break;
      case 3:
        b.fill(c & 0xff || 1, o, o + CS);
        break;
      default:
        break; // zeroes
    }
  }
  return b;
}

async function makeSource(dir: string): Promise<{ raw: string; qcow2: string }> {
  const raw = `${dir}/src.raw`;
  await writeFile(raw, sourceBytes());
  const qcow2 = `${dir}/src.qcow2`;
  await mustRun('qemu-img', ['convert', '-O', 'qcow2', raw, qcow2]);
  return { raw, qcow2 };
}

interface CheckResult {
  leaks?: number;
  corruptions?: number;
  'check-errors': number;
  'compressed-clusters'?: number;
  'image-end-offset': number;
}

async function checkClean(img: string): Promise<CheckResult> {
  const r = await run('qemu-img', ['check', '-U', '--output=json', img]);
  assert.equal(r.code, 0, `qemu-img check ${img}: ${r.stdout}${r.stderr}`);
  const c = JSON.parse(r.stdout) as CheckResult;
  assert.equal((c.leaks ?? 0) + (c.corruptions ?? 0) + c['check-errors'], 0, `${img}: ${r.stdout}`);
  return c;
}

/**
 * qemu-img map, per cluster: C compressed (data without a host offset: qemu-img 7.2 shows no offset for
 * compressed clusters), D plain data, Z a zero cluster, 0 unallocated.
 */
async function clusterKinds(img: string): Promise<string> {
  const map = JSON.parse(await mustRun('qemu-img', ['map', '-U', '--output=json', img])) as Array<{ start: number; length: number; data: boolean; present: boolean; offset?: number }>;
  let out = '';
  for (const m of map) out += (m.data ? (m.offset === undefined ? 'C' : 'D') : m.present ? 'Z' : '0').repeat(Math.ceil(m.length / CS));
  return out;
}

async function assertSame(a: string, b: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-U', a, b]);
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

/** A full compressed backup of the source into a new qcow2 target, and what qemu-img finds in it. */
async function backupAndInspect(program: 'bitmirror' | 'qemu-storage-daemon'): Promise<{ check: CheckResult; kinds: string; fileSize: number; error: unknown }> {
  const env = await setup(`backup-compress-${program}`, program);
  try {
    const src = await makeSource(env.dir);
    const tgt = env.f('tgt.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', tgt, String(SIZE)]);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src.qcow2 } });
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', file: { driver: 'file', filename: tgt } });
    await env.d.qmp.execute('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', compress: true });
    const events = await eventsUntil(env, 'BLOCK_JOB_COMPLETED', { device: 'j' });
    const error = events[events.length - 1].data?.error;
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'tgt' });
    await assertSame(src.raw, tgt);
    return { check: await checkClean(tgt), kinds: await clusterKinds(tgt), fileSize: (await stat(tgt)).size, error };
  } finally {
    await env.done();
  }
}

test('compressed backup: identical to the source, clean, compressed as qemu-storage-daemon 7.2 compresses', { skip: !haveQsd }, async (t) => {
  const ours = await backupAndInspect('bitmirror');
  const theirs = await backupAndInspect('qemu-storage-daemon');
  assert.equal(ours.error, undefined);
  assert.equal(theirs.error, undefined);
  // Every text and repeated-byte cluster compressed, every random one plain, zeroes as zero clusters.
  assert.equal(ours.kinds, 'CCDCZ'.repeat(SIZE / CS / 5) + 'CCDCZ'.slice(0, (SIZE / CS) % 5));
  assert.equal(ours.kinds, theirs.kinds);
  assert.equal(ours.check['compressed-clusters'], theirs.check['compressed-clusters']);
  t.diagnostic(`target image end: bitmirror ${ours.check['image-end-offset']}, qemu-storage-daemon ${theirs.check['image-end-offset']}; file size ${ours.fileSize} vs ${theirs.fileSize} (source data ${SIZE})`);
  // The same packing rule: the same host clusters used, give or take the deflate implementation's bytes.
  const ratio = ours.check['image-end-offset'] / theirs.check['image-end-offset'];
  assert.ok(ratio > 0.9 && ratio < 1.1, `image end ${ours.check['image-end-offset']} vs ${theirs.check['image-end-offset']}`);
});

function mask(v: unknown, dir: string): unknown {
  return JSON.parse(JSON.stringify(v).split(dir).join('DIR'));
}

/**
 * Targets that cannot take compressed writes (raw, a file node, null-co, blkdebug: QEMU's message ends
 * with the empty name of the target's BlockBackend), targets behind filters that forward them
 * (throttle, copy-on-read), drive-backup's raw and qcow2 formats, and a target with a cluster
 * allocated already (the compressed write of that cluster fails with EIO: the job fails).
 */
async function refusalScript(program: 'bitmirror' | 'qemu-storage-daemon'): Promise<unknown[]> {
  const env: Env = await setup(`backup-compress-refusals-${program}`, program);
  const out: unknown[] = [];
  const r = async (cmd: string, args?: Record<string, unknown>) => out.push(mask(await env.d.qmp.request(cmd, args), env.dir));
  /** The job's end: its error (if any) and its status, then dismissed. */
  const concluded = async (id: string) => {
    const events = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id, status: 'concluded' });
    const done = events.find((e) => e.event === 'BLOCK_JOB_COMPLETED');
    out.push({ id, error: done?.data?.error ?? null });
    await r('job-dismiss', { id });
  };
  try {
    const src = await makeSource(env.dir);
    for (const n of ['tgt', 't-thr', 't-cor', 't-bd', 't-busy']) await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', env.f(`${n}.qcow2`), String(SIZE)]);
    await mustRun('qemu-img', ['create', '-q', '-f', 'raw', env.f('t.raw'), String(SIZE)]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 9 1M 64k', env.f('t-busy.qcow2')]);
    const q = (node: string, file: string) => ({ driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename: env.f(file) } });
    await r('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src.qcow2 } });
    await r('blockdev-add', { driver: 'raw', 'node-name': 'raw', file: { driver: 'file', 'node-name': 'rawfile', filename: env.f('t.raw') } });
    await r('blockdev-add', { driver: 'null-co', 'node-name': 'null', size: SIZE });
    await r('blockdev-add', { driver: 'qcow2', 'node-name': 'bdq', file: { driver: 'blkdebug', 'node-name': 'bd', image: { driver: 'file', filename: env.f('t-bd.qcow2') } } });
    await r('blockdev-add', { driver: 'blkdebug', 'node-name': 'bd-top', image: 'bdq' });
    await r('object-add', { 'qom-type': 'throttle-group', id: 'tg', limits: {} });
    await r('blockdev-add', { driver: 'throttle', 'node-name': 'thr', 'throttle-group': 'tg', file: q('thr-q', 't-thr.qcow2') });
    await r('blockdev-add', { driver: 'copy-on-read', 'node-name': 'cor', file: q('cor-q', 't-cor.qcow2') });
    await r('blockdev-add', q('busy', 't-busy.qcow2'));
    const B = (target: string) => r('blockdev-backup', { 'job-id': 'j', device: 'src', target, sync: 'full', compress: true, 'auto-dismiss': false });
    for (const t of ['raw', 'rawfile', 'null', 'bd', 'bd-top']) await B(t);
    await r('drive-backup', { 'job-id': 'j', device: 'src', target: env.f('d.raw'), format: 'raw', sync: 'full', compress: true });
    for (const t of ['thr', 'cor', 'busy']) {
      await B(t);
      await concluded('j');
    }
    await r('drive-backup', { 'job-id': 'd', device: 'src', target: env.f('d.qcow2'), format: 'qcow2', sync: 'full', compress: true, 'auto-dismiss': false });
    await concluded('d');
    for (const n of ['thr', 'cor', 'busy']) await r('blockdev-del', { 'node-name': n });
    // What the jobs that ran left: the filtered targets and drive-backup's equal the source, all clean.
    for (const f of ['t-thr.qcow2', 't-cor.qcow2', 'd.qcow2']) {
      await assertSame(src.raw, env.f(f));
      out.push({ file: f, compressed: ((await checkClean(env.f(f)))['compressed-clusters'] ?? 0) > 0 });
    }
    await checkClean(env.f('t-busy.qcow2'));
  } finally {
    await env.done();
  }
  return out;
}

test('compress: refusals, filtered targets and the allocated-cluster failure as qemu-storage-daemon 7.2', { skip: !haveQsd }, async () => {
  const ours = await refusalScript('bitmirror');
  const theirs = await refusalScript('qemu-storage-daemon');
  assert.deepEqual(ours, theirs);
  assert.ok(ours.some((x) => JSON.stringify(x).includes('Compression is not supported for this drive ')));
  assert.ok(ours.some((x) => JSON.stringify(x) === JSON.stringify({ id: 'j', error: 'Input/output error' })));
});

test('compressed backup while the source is written: the point-in-time image; later writes over it keep it clean', async () => {
  const env = await setup('backup-compress-writes');
  try {
    const src = await makeSource(env.dir);
    const frozen = env.f('frozen.qcow2');
    await copyFile(src.qcow2, frozen);
    const tgt = env.f('tgt.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', tgt, String(SIZE)]);
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src.qcow2 } });
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'tgt', discard: 'unmap', file: { driver: 'file', filename: tgt } });
    // Slowed to a crawl: the guest writes below reach clusters the walk has not copied yet.
    await env.d.qmp.execute('blockdev-backup', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', compress: true, speed: 1 });
    for (const [off, len] of [[0, 4096], [3 << 16, 65536], [(7 << 16) + 512, 1000], [2 << 20, 300 << 10], [SIZE - 4096, 4096]]) {
      await io(env, 'src', `write -P 0x5a ${off} ${len}`);
    }
    await env.d.qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    const events = await eventsUntil(env, 'BLOCK_JOB_COMPLETED', { device: 'j' });
    assert.equal(events[events.length - 1].data?.error, undefined);
    await io(env, 'tgt', 'flush');
    await assertSame(frozen, tgt);
    const before = await checkClean(tgt);
    assert.ok((before['compressed-clusters'] ?? 0) > 0);
    // Normal writes into compressed clusters that share host clusters: partial (copy-on-write out of
    // the compressed data), whole, zeroes, discard; the dropped references leave nothing leaked.
    await env.d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'ref', file: { driver: 'file', filename: frozen } });
    for (const n of ['tgt', 'ref']) {
      await io(env, n, 'write -P 0x61 4096 512');
      await io(env, n, `write -P 0x62 ${1 << 16} 65536`);
      await io(env, n, `write -z ${5 << 16} 131072`);
      await io(env, n, `write -P 0x63 ${(8 << 16) + 100} 70000`);
      await io(env, n, 'flush');
    }
    await io(env, 'tgt', `discard ${10 << 16} 65536`);
    await io(env, 'ref', `write -z ${10 << 16} 65536`);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'tgt' });
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'ref' });
    await assertSame(frozen, tgt);
    const after = await checkClean(tgt);
    assert.ok((after['compressed-clusters'] ?? 0) < (before['compressed-clusters'] ?? 0));
  } finally {
    await env.done();
  }
});
