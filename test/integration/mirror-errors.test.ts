/**
 * Error policies of the mirror job with blkdebug failure injection, in the style of iotests 041
 * (TestReadErrors/TestWriteErrors), 229 and 248: report, ignore, stop + resume, enospc, and force cancel
 * of a job stopped on an error. Raw images over blkdebug so that the injected sector is the guest offset.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { SIZE, setup, io, flush, assertIdentical, query, eventsUntil, summarise, drain, type Env } from '../support/daemon.js';

type Rule = { event: string; errno?: number; sector?: number; once?: boolean; state?: number };

/** Raw source and target of SIZE bytes, each optionally over blkdebug with `rules`. */
async function rawPair(env: Env, srcRules?: Rule[], tgtRules?: Rule[], tgtStates?: unknown[]): Promise<{ src: string; tgt: string }> {
  const src = env.f('src.raw');
  const tgt = env.f('tgt.raw');
  for (const f of [src, tgt]) {
    await fsp.writeFile(f, '');
    await fsp.truncate(f, SIZE);
  }
  const child = (filename: string, rules?: Rule[], states?: unknown[]) =>
    rules ? { driver: 'blkdebug', image: { driver: 'file', filename }, 'inject-error': rules, ...(states ? { 'set-state': states } : {}) } : { driver: 'file', filename };
  await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'src', file: child(src, srcRules) });
  await env.d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'tgt', file: child(tgt, tgtRules, tgtStates) });
  // Data around the injected sector (1 MiB) and elsewhere.
  await io(env, 'src', 'write -P 0x5a 0 4M');
  await io(env, 'src', 'write -P 0xa5 60M 1M');
  return { src, tgt };
}

const at1M = (event: string, errno = 5, once = true): Rule[] => [{ event, errno, sector: 2048, once }];

async function withEnv(prefix: string, fn: (env: Env) => Promise<void>): Promise<void> {
  const env = await setup(prefix);
  try {
    await fn(env);
  } finally {
    await env.done();
  }
}

for (const [side, event, operation] of [
  ['source', 'read_aio', 'read'],
  ['target', 'write_aio', 'write'],
] as const) {
  const policyArg = side === 'source' ? 'on-source-error' : 'on-target-error';
  const rules = (r: Rule[]) => (side === 'source' ? [r, undefined] : [undefined, r]) as [Rule[] | undefined, Rule[] | undefined];

  test(`${side} error, report: BLOCK_JOB_ERROR then COMPLETED with the error, no READY`, async () => {
    await withEnv('me-report', async (env) => {
      await rawPair(env, ...rules(at1M(event, 5, false)));
      drain(env);
      await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', [policyArg]: 'report' });
      const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
      const names = summarise(evs, ['operation', 'action', 'error']);
      assert.ok(!names.includes('BLOCK_JOB_READY'), names.join(' '));
      assert.equal(names.filter((n) => n.startsWith('BLOCK_JOB_ERROR')).length >= 1, true);
      assert.equal(names.find((n) => n.startsWith('BLOCK_JOB_ERROR')), `BLOCK_JOB_ERROR{operation="${operation}",action="report"}`);
      const done = evs.find((e) => e.event === 'BLOCK_JOB_COMPLETED')!;
      assert.equal(done.data!.error, 'Input/output error');
      assert.ok((done.data!.offset as number) < (done.data!.len as number));
      assert.deepEqual(names.filter((n) => !n.startsWith('BLOCK_JOB_ERROR')).slice(-4), ['aborting', 'BLOCK_JOB_COMPLETED{error="Input/output error"}', 'concluded', 'null']);
    });
  });

  test(`${side} error, ignore: BLOCK_JOB_ERROR(ignore), the chunk is retried, complete gives an equal copy`, async () => {
    await withEnv('me-ignore', async (env) => {
      const { src, tgt } = await rawPair(env, ...rules(at1M(event)));
      drain(env);
      await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', [policyArg]: 'ignore' });
      const evs = await eventsUntil(env, 'BLOCK_JOB_READY', { device: 'j' });
      assert.ok(summarise(evs, ['operation', 'action']).includes(`BLOCK_JOB_ERROR{operation="${operation}",action="ignore"}`));
      await env.d.qmp.execute('job-complete', { id: 'j' });
      const done = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
      assert.equal(done.data!.error, undefined);
      await flush(env, 'src', 'tgt');
      await assertIdentical(src, tgt, ['-f', 'raw', '-F', 'raw']);
    });
  });

  test(`${side} error, stop: paused with io-status failed; resume clears it, READY, equal copy`, async () => {
    await withEnv('me-stop', async (env) => {
      const { src, tgt } = await rawPair(env, ...rules(at1M(event)));
      drain(env);
      await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', [policyArg]: 'stop' });
      const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'paused' });
      assert.ok(summarise(evs, ['operation', 'action']).includes(`BLOCK_JOB_ERROR{operation="${operation}",action="stop"}`));
      const q = (await query(env, 'j'))!;
      assert.equal(q.status, 'paused');
      assert.equal(q.paused, true);
      assert.equal(q['io-status'], 'failed');
      assert.equal(q.ready, false);
      await env.d.qmp.execute('block-job-resume', { device: 'j' });
      await env.d.qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
      assert.equal((await query(env, 'j'))!['io-status'], 'ok');
      await env.d.qmp.execute('block-job-complete', { device: 'j' });
      const done = await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
      assert.equal(done.data!.error, undefined);
      await flush(env, 'src', 'tgt');
      await assertIdentical(src, tgt, ['-f', 'raw', '-F', 'raw']);
    });
  });

  test(`${side} error, enospc: ENOSPC stops (io-status nospace), EIO reports`, async () => {
    await withEnv('me-enospc', async (env) => {
      const { src, tgt } = await rawPair(env, ...rules(at1M(event, 28)));
      drain(env);
      await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', [policyArg]: 'enospc' });
      const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'paused' });
      assert.ok(summarise(evs, ['operation', 'action']).includes(`BLOCK_JOB_ERROR{operation="${operation}",action="stop"}`));
      assert.equal((await query(env, 'j'))!['io-status'], 'nospace');
      await env.d.qmp.execute('job-resume', { id: 'j' });
      await env.d.qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
      await env.d.qmp.execute('job-complete', { id: 'j' });
      await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
      await flush(env, 'src', 'tgt');
      await assertIdentical(src, tgt, ['-f', 'raw', '-F', 'raw']);
    });
    await withEnv('me-enospc-eio', async (env) => {
      await rawPair(env, ...rules(at1M(event, 5)));
      drain(env);
      await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', [policyArg]: 'enospc' });
      const evs = await eventsUntil(env, 'BLOCK_JOB_COMPLETED', { device: 'j' });
      assert.ok(summarise(evs, ['operation', 'action']).includes(`BLOCK_JOB_ERROR{operation="${operation}",action="report"}`));
      assert.equal(evs.at(-1)!.data!.error, 'Input/output error');
    });
  });
}

test('force cancel of a job stopped on a target error (229): running, aborting, CANCELLED', async () => {
  await withEnv('me-229', async (env) => {
    await rawPair(env, undefined, at1M('write_aio', 5, false));
    drain(env);
    await env.d.qmp.execute('blockdev-mirror', { 'job-id': 'j', device: 'src', target: 'tgt', sync: 'full', 'on-target-error': 'stop' });
    await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'paused' });
    drain(env);
    await env.d.qmp.execute('block-job-cancel', { device: 'j', force: true });
    const evs = await eventsUntil(env, 'JOB_STATUS_CHANGE', { id: 'j', status: 'null' });
    assert.deepEqual(summarise(evs), ['running', 'aborting', 'BLOCK_JOB_CANCELLED', 'concluded', 'null']);
  });
});

test('write-blocking mode: a failed synchronous target write applies on-target-error and is copied later', async () => {
  await withEnv('me-active', async (env) => {
    // The rule is armed by the target flush that precedes READY (state 1 -> 2), so the error hits the
    // active write issued after READY, not the background copy of the (raw, all-allocated) source.
    const { src, tgt } = await rawPair(env, undefined, [{ event: 'write_aio', errno: 5, sector: 65536, once: true, state: 2 }], [{ event: 'flush_to_disk', state: 1, new_state: 2 }]);
    drain(env);
    await env.d.qmp.execute('blockdev-mirror', {
      'job-id': 'j',
      device: 'src',
      target: 'tgt',
      sync: 'full',
      'copy-mode': 'write-blocking',
      'on-target-error': 'ignore',
      'filter-node-name': 'top',
    });
    await env.d.qmp.waitEvent('BLOCK_JOB_READY', { device: 'j' });
    assert.equal((await query(env, 'j'))!['actively-synced'], true);
    await io(env, 'top', 'write -P 0x77 32M 64k');
    const evs = await eventsUntil(env, 'BLOCK_JOB_ERROR', { device: 'j' });
    assert.equal(summarise(evs, ['operation', 'action']).at(-1), 'BLOCK_JOB_ERROR{operation="write",action="ignore"}');
    await env.d.qmp.execute('job-complete', { id: 'j' });
    await env.d.qmp.waitEvent('BLOCK_JOB_COMPLETED', { device: 'j' });
    await flush(env, 'src', 'tgt');
    await assertIdentical(src, tgt, ['-f', 'raw', '-F', 'raw']);
  });
});


