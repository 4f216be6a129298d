/**
 * drive-mirror against qemu-storage-daemon 7.2 and bitmirror, the same QMP script: the replies, the
 * job's events and the graph (query-named-block-nodes) at READY and after completion must be equal,
 * and the new image must hold the source's data, checked by qemu-img compare.
 * - without `node-name` (the target gets a generated name);
 * - mode=absolute-paths with sync=none and sync=top: the new image names the source (its backing file)
 *   in its header, runs without a backing file and gets it at completion.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { setup, haveQsd, summarise, eventsUntil, assertIdentical, type Env } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

type Sync = 'full' | 'none' | 'top';

/**
 * query-named-block-nodes, reduced to what names the graph, with generated names and the directory
 * masked, sorted: with a backing chain bitmirror lists the nodes in another order than QEMU (QEMU
 * enters a format node in its list after its file and before its backing; bitmirror after both).
 */
async function graph(env: Env): Promise<unknown> {
  const nodes = await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true });
  const text = JSON.stringify(
    nodes.map((n) => {
      const image = n.image as Record<string, unknown>;
      // (backing_file_depth and the filter's backing-filename differ, a matter of query-named-block-nodes.)
      return [n['node-name'], n.drv, n.file, n.ro, image.format];
    }),
  );
  const masked = JSON.parse(text.replace(/#block\d+/g, '#block').split(env.dir).join('DIR')) as unknown[];
  return masked.map((n) => JSON.stringify(n)).sort();
}

async function script(program: 'bitmirror' | 'qemu-storage-daemon', sync: Sync, withNodeName: boolean): Promise<{ out: unknown[]; env: Env }> {
  const env = await setup(`dm-${sync}-${program}`, program);
  const out: unknown[] = [];
  const { qmp } = env.d;
  const base = env.f('base.qcow2');
  const src = env.f('src.qcow2');
  await mustRun('qemu-img', ['create', '-f', 'qcow2', base, '4M']);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 2M', base]);
  await mustRun('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', src]);
  await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 1M 64k', '-c', 'write -P 0x33 3M 4k', src]);
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
  const r = async (cmd: string, args: Record<string, unknown>) => {
    const rep = await qmp.request(cmd, args);
    out.push([cmd, 'error' in rep ? rep.error : rep.return]);
  };
  await r('drive-mirror', { 'job-id': 'j', device: 'src', sync, target: env.f('new.qcow2'), format: 'qcow2', ...(withNodeName ? { 'node-name': 'tgt' } : {}) });
  out.push(summarise(await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'j' }), ['type', 'len']));
  out.push(await graph(env));
  await r('job-complete', { id: 'j' });
  out.push(summarise(await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' }), ['type']));
  out.push(await graph(env));
  return { out, env };
}

for (const [sync, withNodeName] of [
  ['full', false],
  ['full', true],
  ['none', false],
  ['top', true],
] as const) {
  test(`drive-mirror sync=${sync}${withNodeName ? ' with node-name' : ' without node-name'}: as qemu-storage-daemon 7.2, and the new image equals the source`, { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
    const theirs = await script('qemu-storage-daemon', sync, withNodeName);
    await theirs.env.done();
    const ours = await script('bitmirror', sync, withNodeName);
    try {
      for (let i = 0; i < Math.max(theirs.out.length, ours.out.length); i++) assert.deepEqual(ours.out[i], theirs.out[i], `step ${i}`);
      await ours.env.d.stop();
      // The new image reads as the source: a full copy alone, sync=none through its backing file (the
      // source), sync=top through the source's backing file.
      await assertIdentical(ours.env.f('src.qcow2'), ours.env.f('new.qcow2'));
      const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', ours.env.f('new.qcow2')])) as Record<string, unknown>;
      const expected = { full: undefined, none: ours.env.f('src.qcow2'), top: ours.env.f('base.qcow2') }[sync];
      assert.equal(info['backing-filename'], expected);
      await mustRun('qemu-img', ['check', ours.env.f('new.qcow2')]);
    } finally {
      await ours.env.done();
    }
  });
}
