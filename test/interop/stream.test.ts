/**
 * block-stream, iotests 030 style: the same QMP scripts against qemu-storage-daemon 7.2 and bitmirror
 * give the same replies (every refusal), the same events (JOB_STATUS_CHANGE, BLOCK_JOB_ERROR with the
 * on-error action, BLOCK_JOB_COMPLETED with len/offset/error) and the same images: the streamed node
 * equals a reference image built by qemu-img from the same chain (qemu-img compare), names the same
 * backing file (qemu-img info), and qemu-img check finds it clean. Errors are injected with blkdebug
 * under the base. Writes made while the job runs, through the filter and directly to the node, are
 * all in the result.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { haveQsd, mustRun, run, tempDir } from '../support/tools.js';
import { addQcow2, assertIdentical, io, poll, setup } from '../support/daemon.js';

const KiB = 1024;

type Step = [string, Record<string, unknown>?] | ['await', string, Record<string, unknown>] | ['image', string];

/** base.raw (data at 0 and 1 MiB) ← mid.qcow2 ← top.qcow2, each layer with data of its own; ref.raw is what top shows. */
async function makeChain(dir: string): Promise<void> {
  const f = (n: string) => path.join(dir, n);
  await mustRun('qemu-img', ['create', '-f', 'raw', f('base.raw'), '2M']);
  await mustRun('qemu-io', ['-f', 'raw', f('base.raw'), '-c', 'write -P 1 0 192k', '-c', 'write -P 1 1M 128k']);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', f('mid.qcow2')]);
  await mustRun('qemu-io', ['-f', 'qcow2', f('mid.qcow2'), '-c', 'write -P 2 64k 64k', '-c', 'write -P 2 1M 4k', '-c', 'write -z 1536k 64k']);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f('top.qcow2')]);
  await mustRun('qemu-io', ['-f', 'qcow2', f('top.qcow2'), '-c', 'write -P 3 128k 64k']);
  await mustRun('qemu-img', ['convert', '-O', 'raw', f('top.qcow2'), f('ref.raw')]);
}

/** The chain opened as QEMU's tests do, with blkdebug under the middle layer's image when `rules` are given. */
function openChain(dir: string, rules?: unknown[]): Step[] {
  const f = (n: string) => path.join(dir, n);
  const midFile = rules ? { driver: 'blkdebug', image: { driver: 'file', filename: f('mid.qcow2') }, 'inject-error': rules } : { driver: 'file', filename: f('mid.qcow2') };
  return [
    ['blockdev-add', { driver: 'raw', 'node-name': 'base', file: { driver: 'file', filename: f('base.raw') }, 'read-only': true }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'mid', file: midFile, backing: 'base', 'read-only': true }],
    ['blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: f('top.qcow2') }, backing: 'mid' }],
  ];
}

/** Replies, events (without timestamps) and the state of top.qcow2 after each ['image'] step. */
async function runScript(program: 'bitmirror' | 'qemu-storage-daemon', script: (dir: string) => Step[] | Promise<Step[]>): Promise<unknown[]> {
  const t = await tempDir(`bm-stream-${program === 'bitmirror' ? 'b' : 'q'}-`);
  const out: unknown[] = [];
  try {
    await makeChain(t.dir);
    const d = await spawnDaemon(path.join(t.dir, 'qmp.sock'), [], program);
    try {
      for (const step of await script(t.dir)) {
        if (step[0] === 'await') {
          // Seen, not consumed: every event is compared at the end.
          const [, name, match] = step as [string, string, Record<string, unknown>];
          await poll(name, () => d.qmp.events.some((e) => e.event === name && Object.entries(match).every(([k, v]) => e.data?.[k] === v)));
        } else if (step[0] === 'image') {
          const img = path.join(t.dir, step[1] as string);
          const info = JSON.parse(await mustRun('qemu-img', ['info', '-U', '--output=json', img])) as Record<string, unknown>;
          const cmp = await run('qemu-img', ['compare', '-U', img, path.join(t.dir, 'ref.raw')]);
          out.push({ backing: info['backing-filename'], format: info['backing-filename-format'], identical: cmp.code === 0 });
        } else {
          out.push(await d.qmp.request(step[0], step[1] as Record<string, unknown> | undefined));
        }
      }
    } finally {
      assert.equal(await d.stop(), 0);
    }
    for (const img of ['top.qcow2', 'mid.qcow2']) assert.match(await mustRun('qemu-img', ['check', path.join(t.dir, img)]), /No errors were found/);
    for (const e of d.qmp.events) out.push({ event: e.event, data: e.data });
    return JSON.parse(JSON.stringify(out).replaceAll(t.dir, 'DIR')) as unknown[];
  } finally {
    await t.cleanup();
  }
}

async function same(script: (dir: string) => Step[] | Promise<Step[]>): Promise<void> {
  const theirs = await runScript('qemu-storage-daemon', script);
  const ours = await runScript('bitmirror', script);
  for (let i = 0; i < Math.max(theirs.length, ours.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
}

const skip = !haveQsd && 'qemu-storage-daemon not installed';
const ended = (id: string): Step => ['await', 'JOB_STATUS_CHANGE', { id, status: 'null' }];

test('block-stream refusals, then the whole chain streamed: same replies, events and image as qemu-storage-daemon 7.2', { skip }, async () => {
  await same((dir) => [
    ...openChain(dir),
    ['block-stream', { device: 'top', base: 'x', 'base-node': 'base' }],
    ['block-stream', { device: 'top', base: 'x', bottom: 'base' }],
    ['block-stream', { device: 'top', 'base-node': 'x', bottom: 'base' }],
    ['block-stream', { device: 'nope' }],
    ['block-stream', { device: 'top', base: 'nope.qcow2' }],
    ['block-stream', { device: 'top', 'base-node': 'nope' }],
    ['block-stream', { device: 'top', 'base-node': 'top' }],
    ['block-stream', { device: 'mid', 'base-node': 'top' }],
    ['block-stream', { device: 'top', bottom: 'nope' }],
    ['block-stream', { device: 'mid', bottom: 'top' }],
    ['block-stream', { device: 'top', 'backing-file': 'x' }],
    ['block-stream', { device: 'top', bottom: 'mid', 'backing-file': 'x' }],
    ['block-stream', { device: 'top' }],
    ['block-stream', { device: 'top', 'job-id': 'j', speed: -1 }],
    ['block-stream', { device: 'top', 'job-id': 'j', 'filter-node-name': '#f' }],
    ['block-stream', { device: 'top', 'job-id': 'j', 'filter-node-name': 'mid' }],
    ['block-stream', { device: 'top', 'job-id': 'j', 'auto-finalize': false }],
    ['block-stream', { device: 'top', 'job-id': 'j2' }],
    ['await', 'JOB_STATUS_CHANGE', { id: 'j', status: 'pending' }],
    ['query-block-jobs'],
    ['job-finalize', { id: 'j' }],
    ended('j'),
    ['blockdev-del', { 'node-name': 'top' }],
    ['image', 'top.qcow2'],
  ]);
});

test('block-stream with base-node and with bottom: the layers above streamed, the backing file rewritten, as qemu-storage-daemon 7.2', { skip }, async () => {
  await same((dir) => [
    ...openChain(dir),
    ['block-stream', { device: 'top', 'job-id': 'j', 'base-node': 'base', 'filter-node-name': 'cor' }],
    ended('j'),
    ['blockdev-del', { 'node-name': 'top' }],
    ['image', 'top.qcow2'],
  ]);
  await same((dir) => [
    ...openChain(dir),
    // (backing-file with bottom is refused by QEMU 7.2: "streaming the entire chain")
    ['block-stream', { device: 'top', 'job-id': 'j', bottom: 'mid' }],
    ended('j'),
    ['blockdev-del', { 'node-name': 'top' }],
    ['image', 'top.qcow2'],
  ]);
});

/**
 * blkdebug under the middle layer: the reads of its data cluster at guest offset 64 KiB fail (the
 * first one only, or every one). The rule names that cluster's sector in the image file, so that only
 * the data read fails, whichever metadata reads come first.
 */
async function midDataFails(dir: string, once: boolean): Promise<unknown[]> {
  const map = JSON.parse(await mustRun('qemu-img', ['map', '--output=json', path.join(dir, 'mid.qcow2')])) as Array<{ start: number; depth: number; offset?: number }>;
  const at = map.find((e) => e.start === 64 * KiB && e.depth === 0)!.offset!;
  return [{ event: 'read_aio', errno: 5, sector: at / 512, once }];
}

test('block-stream on-error=report: the error ends the job, the chain stays, as qemu-storage-daemon 7.2', { skip }, async () => {
  await same(async (dir) => [...openChain(dir, await midDataFails(dir, false)), ['block-stream', { device: 'top', 'job-id': 'j' }], ended('j'), ['blockdev-del', { 'node-name': 'top' }], ['image', 'top.qcow2']]);
});

test('block-stream on-error=stop: paused at the error, resumed it completes, as qemu-storage-daemon 7.2', { skip }, async () => {
  await same(async (dir) => [
    ...openChain(dir, await midDataFails(dir, true)),
    ['block-stream', { device: 'top', 'job-id': 'j', 'on-error': 'stop' }],
    ['await', 'JOB_STATUS_CHANGE', { id: 'j', status: 'paused' }],
    ['query-block-jobs'],
    ['block-job-resume', { device: 'j' }],
    ended('j'),
    ['blockdev-del', { 'node-name': 'top' }],
    ['image', 'top.qcow2'],
  ]);
});

test('block-stream on-error=ignore: the job goes on but fails at the end, the chain stays, as qemu-storage-daemon 7.2', { skip }, async () => {
  await same(async (dir) => [...openChain(dir, await midDataFails(dir, true)), ['block-stream', { device: 'top', 'job-id': 'j', 'on-error': 'ignore' }], ended('j'), ['blockdev-del', { 'node-name': 'top' }], ['image', 'top.qcow2']]);
});

test('writes while the stream runs, through the filter and directly to the node, are all in the streamed image', async () => {
  const env = await setup('stream-writes');
  try {
    await makeChain(env.dir);
    // The reference gets the same writes.
    const ref = env.f('ref.raw');
    await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'base', file: { driver: 'file', filename: env.f('base.raw') }, 'read-only': true });
    await addQcow2(env, 'mid', env.f('mid.qcow2'), { backing: 'base', 'read-only': true });
    await addQcow2(env, 'top', env.f('top.qcow2'), { backing: 'mid' });
    // Slow enough (about half a minute) that the writes land while chunks are still being copied; the
    // speed limit is lifted once they are made.
    await env.d.qmp.execute('block-stream', { device: 'top', 'job-id': 'j', 'filter-node-name': 'cor', speed: 16 * KiB });
    const writes: Array<[string, string]> = [
      ['cor', 'write -P 0x41 1M 4k'],
      ['top', 'write -P 0x42 1028k 8k'],
      ['cor', 'write -P 0x43 60k 8k'],
      ['top', 'write -z 100k 4k'],
      ['top', 'write -P 0x44 1600k 64k'],
      ['cor', 'write -P 0x45 1990k 10k'],
    ];
    for (const [node, cmd] of writes) await io(env, node, cmd);
    const jobs = (await env.d.qmp.execute('query-block-jobs')) as Array<{ offset: number; len: number }>;
    assert.equal(jobs.length, 1, 'the writes were made while the job ran');
    assert.ok(jobs[0].offset < jobs[0].len);
    await mustRun('qemu-io', ['-f', 'raw', ref, ...writes.flatMap(([, cmd]) => ['-c', cmd])]);
    await env.d.qmp.execute('block-job-set-speed', { device: 'j', speed: 0 });
    await env.d.qmp.waitEvent('JOB_STATUS_CHANGE', { id: 'j', status: 'null' }, 60_000);
    await env.d.qmp.execute('blockdev-del', { 'node-name': 'top' });
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', env.f('top.qcow2')])) as Record<string, unknown>;
    assert.equal(info['backing-filename'], undefined);
    await assertIdentical(env.f('top.qcow2'), ref);
    assert.match(await mustRun('qemu-img', ['check', env.f('top.qcow2')]), /No errors were found/);
  } finally {
    await env.done();
  }
});

