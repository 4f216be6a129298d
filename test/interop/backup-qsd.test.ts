/**
 * The same blockdev-backup QMP script against qemu-storage-daemon 7.2 and bitmirror: every argument
 * check (in QEMU's order and words), the graph and the bitmaps while a backup runs (the implicit
 * copy-before-write filter, the copy bitmap on the source, the done and access bitmaps on the filter,
 * the frozen user bitmap and its successor), and the job's events and replies.
 *
 * Deliberate differences, left out of the script: `compress` (compared on its own in
 * backup-compress-qsd.test.ts), the members upstream added since 7.2 (on-cbw-error, discard-source,
 * x-perf.min-cluster-size, which 7.2 refuses as unexpected), and the paused/running pairs QEMU 7.2
 * emits while it drains the graph around a job's creation and its filter's removal (bitmirror drains
 * nothing, so it emits none): they are dropped from both event lists before comparing.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { haveQsd, qcow2, setup, eventsUntil, type Env } from '../support/daemon.js';
import type { QmpEvent } from '../../src/qmp/client.js';

function mask(v: unknown): unknown {
  return JSON.parse(JSON.stringify(v).replace(/#block\d+/g, '#block'));
}

/** Keep what a comparison needs of an event, without QEMU's drain-induced paused/running pairs. */
function eventList(events: QmpEvent[]): unknown[] {
  const out: Array<{ event: string; data: unknown }> = [];
  for (const e of events) {
    const status = e.event === 'JOB_STATUS_CHANGE' ? (e.data?.status as string) : undefined;
    const last = out[out.length - 1];
    if (status === 'running' && last && (last.data as { status?: string }).status === 'paused') {
      out.pop();
      continue;
    }
    out.push({ event: e.event, data: e.data });
  }
  return mask(out) as unknown[];
}

async function runScript(program: 'bitmirror' | 'qemu-storage-daemon'): Promise<{ replies: unknown[]; events: unknown[] }> {
  const env: Env = await setup(`backup-${program}`, program);
  const replies: unknown[] = [];
  const r = async (cmd: string, args?: Record<string, unknown>) => replies.push(mask(await env.d.qmp.request(cmd, args)));
  try {
    await qcow2(env.f('src.qcow2'), 64 << 20);
    await qcow2(env.f('tgt.qcow2'), 64 << 20);
    await qcow2(env.f('small.qcow2'), 32 << 20);
    for (const n of ['src', 'tgt', 'small']) await r('blockdev-add', { driver: 'qcow2', 'node-name': n, file: { driver: 'file', filename: env.f(`${n}.qcow2`) } });
    await r('block-dirty-bitmap-add', { node: 'src', name: 'b0' });
    const B = (a: Record<string, unknown>) => r('blockdev-backup', { device: 'src', target: 'tgt', 'job-id': 'j', ...a });
    await B({ sync: 'bitmap' });
    await B({ sync: 'incremental' });
    await B({ sync: 'incremental', bitmap: 'nope', 'bitmap-mode': 'always' });
    await B({ sync: 'incremental', bitmap: 'nope' });
    await B({ sync: 'bitmap', bitmap: 'nope' });
    await B({ sync: 'bitmap', bitmap: 'b0' });
    await B({ sync: 'none', bitmap: 'b0', 'bitmap-mode': 'always' });
    await B({ sync: 'full', bitmap: 'b0', 'bitmap-mode': 'never' });
    await B({ sync: 'top', bitmap: 'b0', 'bitmap-mode': 'never' });
    await B({ sync: 'full', 'bitmap-mode': 'never' });
    await B({ sync: 'full', 'x-perf': { 'max-workers': 0 } });
    await B({ sync: 'full', 'x-perf': { 'max-chunk': -1 } });
    await B({ sync: 'full', 'x-perf': { 'max-chunk': 4096 } });
    await B({ sync: 'full', speed: -1 });
    await B({ sync: 'full', 'filter-node-name': 'src' });
    await B({ sync: 'full', 'filter-node-name': '1bad' });
    await B({ sync: 'fast' });
    await r('blockdev-backup', { device: 'src', target: 'src', 'job-id': 'j', sync: 'full' });
    await r('blockdev-backup', { device: 'src', target: 'small', 'job-id': 'j', sync: 'full' });
    await r('blockdev-backup', { device: 'src', target: 'tgt', 'job-id': '1j', sync: 'full' });
    await r('blockdev-backup', { device: 'nope', target: 'tgt', 'job-id': 'j', sync: 'full' });
    await r('blockdev-backup', { device: 'src', target: 'nope', 'job-id': 'j', sync: 'full' });
    await r('blockdev-backup', { device: 'src', target: 'tgt', sync: 'full' });
    // A bitmap backup that stays running: the graph and the bitmaps while it does.
    await r('blockdev-backup', { device: 'src', target: 'tgt', 'job-id': 'j', sync: 'bitmap', bitmap: 'b0', 'bitmap-mode': 'on-success', speed: 1, 'auto-dismiss': false, 'filter-node-name': 'cbw' });
    await r('query-block-jobs');
    const nodes = (await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true })).map((n) => ({ name: n['node-name'], drv: n.drv, bitmaps: n['dirty-bitmaps'] }));
    replies.push(mask(nodes.sort((a, b) => String(a.name).localeCompare(String(b.name)))));
    await r('block-dirty-bitmap-add', { node: 'src', name: 'b1' });
    await r('blockdev-backup', { device: 'cbw', target: 'small', 'job-id': 'j2', sync: 'full' });
    await r('blockdev-backup', { device: 'src', target: 'tgt', 'job-id': 'j3', sync: 'bitmap', bitmap: 'b1', 'bitmap-mode': 'always' });
    await r('blockdev-backup', { device: 'src', target: 'small', 'job-id': 'j3', sync: 'bitmap', bitmap: 'b0', 'bitmap-mode': 'always' });
    await r('block-dirty-bitmap-remove', { node: 'src', name: 'b0' });
    await r('block-dirty-bitmap-clear', { node: 'src', name: 'b0' });
    await r('block-job-cancel', { device: 'j' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' });
    await r('query-jobs');
    await r('job-dismiss', { id: 'j' });
    const after = (await env.d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes', { flat: true })).find((n) => n['node-name'] === 'src');
    replies.push(mask(after?.['dirty-bitmaps']));
    // A full backup of an empty disk to the end.
    await r('blockdev-backup', { device: 'src', target: 'tgt', 'job-id': 'k', sync: 'full' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'k', status: 'null' });
    // Transactions: a later action's failure takes back the backup; completion-mode grouped.
    await r('transaction', { actions: [{ type: 'blockdev-backup', data: { device: 'src', target: 'tgt', 'job-id': 't', sync: 'full' } }, { type: 'abort', data: {} }] });
    await r('transaction', { actions: [{ type: 'block-dirty-bitmap-clear', data: { node: 'src', name: 'b1' } }], properties: { 'completion-mode': 'grouped' } });
    await r('query-jobs');
  } finally {
    await env.done();
  }
  const events = eventList(env.d.qmp.events.splice(0).filter((e) => e.event.startsWith('JOB') || e.event.startsWith('BLOCK_JOB')));
  return { replies, events };
}

test('blockdev-backup: replies and events equal qemu-storage-daemon 7.2 for the same script', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await runScript('qemu-storage-daemon');
  const ours = await runScript('bitmirror');
  assert.equal(ours.replies.length, theirs.replies.length);
  for (let i = 0; i < theirs.replies.length; i++) assert.deepEqual(ours.replies[i], theirs.replies[i], `reply ${i}`);
  assert.deepEqual(ours.events, theirs.events);
  void fsp;
});
