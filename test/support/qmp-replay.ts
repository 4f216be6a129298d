/**
 * One QMP script (libvirt's recipes, as it issues them) replayed against qemu-storage-daemon 7.2 and
 * bitmirror, each step's reply recorded so that the two runs can be compared step by step: the
 * recording request, the job events without what only QEMU's drains add, and the comparison.
 */
import * as assert from 'node:assert/strict';
import type { QmpEvent } from '../../src/qmp/client.js';
import { setup, type Env } from './daemon.js';
import { qemuIoNbd } from './tools.js';

/** What one daemon answered to the script: [command, reply or error] a step, with the test's dir masked. */
export interface Replay {
  replies: unknown[];
  /** `request`: sends the command, records [cmd, its return or its error], and gives the return. */
  request(cmd: string, args?: Record<string, unknown>): Promise<unknown>;
  /** `v` with the test directory written as DIR (the two daemons run in different ones). */
  mask(v: unknown): unknown;
}

export function recorder(env: Env): Replay {
  const replies: unknown[] = [];
  const mask = (v: unknown) => JSON.parse(JSON.stringify(v ?? null).split(env.dir).join('DIR')) as unknown;
  return {
    replies,
    mask,
    async request(cmd, args) {
      const rep = await env.d.qmp.request(cmd, args);
      replies.push([cmd, mask('error' in rep ? rep.error : rep.return)]);
      return rep.return;
    },
  };
}

/**
 * Run `script` against a fresh daemon of `program` (its directory named after `prefix`) and give the
 * replies it recorded; the daemon is stopped after it, passed or failed.
 */
export async function replayOn(program: 'bitmirror' | 'qemu-storage-daemon', prefix: string, script: (r: Replay, env: Env) => Promise<void>): Promise<unknown[]> {
  const env = await setup(`${prefix}-${program === 'bitmirror' ? 'bm' : 'qsd'}`, program);
  try {
    const r = recorder(env);
    await script(r, env);
    return r.replies;
  } finally {
    await env.done();
  }
}

/**
 * The job events as `id:status` and `EVENT{data}` (without len, offset and speed, which depend on
 * timing), less QEMU 7.2's paused/running pairs around its drains (bitmirror drains nothing).
 */
export function jobEvents(events: QmpEvent[]): string[] {
  const out: string[] = [];
  for (const e of events) {
    if (!e.event.startsWith('JOB') && !e.event.startsWith('BLOCK_JOB')) continue;
    if (e.event === 'JOB_STATUS_CHANGE' && e.data?.status === 'running' && out[out.length - 1] === `${String(e.data?.id)}:paused`) {
      out.pop();
      continue;
    }
    out.push(e.event === 'JOB_STATUS_CHANGE' ? `${String(e.data?.id)}:${String(e.data?.status)}` : `${e.event}${JSON.stringify({ ...e.data, len: undefined, offset: undefined, speed: undefined })}`);
  }
  return out;
}

/** The recorded steps that failed (an error reply has a class). */
export function failedSteps(replies: unknown[]): unknown[] {
  return replies.filter((x) => Array.isArray(x) && typeof x[1] === 'object' && x[1] !== null && 'class' in x[1]);
}

/** bitmirror's run equals qemu-storage-daemon's, step by step and event by event, and no step failed (equal errors would compare equal too). */
export function assertSameReplay(ours: { replies: unknown[]; events: string[] }, theirs: { replies: unknown[]; events: string[] }): void {
  for (let i = 0; i < Math.max(theirs.replies.length, ours.replies.length); i++) assert.deepEqual(ours.replies[i], theirs.replies[i], `step ${i}`);
  assert.deepEqual(ours.events, theirs.events);
  assert.deepEqual(failedSteps(ours.replies), []);
}

/**
 * The running domain's disk as libvirt opens it: the chain `layers` (top first) as libvirt-N-storage
 * and libvirt-N-format nodes (N = 1 at the top; only the top writable; added from the base up), and
 * the guest: an NBD export `vda` of the top on `sock`, written by qemu-io (qemu-storage-daemon has no HMP).
 * Returns the guest: runs one qemu-io command on the export.
 */
export async function openLibvirtDisk(rec: Replay, layers: string[], sock: string): Promise<(cmd: string) => Promise<string>> {
  for (let n = layers.length; n >= 1; n--) {
    await rec.request('blockdev-add', { driver: 'file', filename: layers[n - 1], 'node-name': `libvirt-${n}-storage`, 'auto-read-only': true, discard: 'unmap' });
    await rec.request('blockdev-add', { 'node-name': `libvirt-${n}-format`, 'read-only': n > 1, driver: 'qcow2', file: `libvirt-${n}-storage`, backing: n < layers.length ? `libvirt-${n + 1}-format` : null });
  }
  await rec.request('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  await rec.request('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'libvirt-1-format', name: 'vda', writable: true });
  return (cmd) => qemuIoNbd(`nbd+unix:///vda?socket=${sock}`, [cmd]);
}
