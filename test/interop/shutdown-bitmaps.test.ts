/**
 * A write in flight when a node closes must be in its stored persistent bitmap (issue 18, defect 0).
 * Several QMP clients write (a few commands queued each) through HMP qemu-io at seeded random places
 * across a qcow2 with a persistent bitmap while the node is closed under them: QMP `quit`, SIGTERM,
 * SIGINT, `blockdev-del`, or `quit` while a mirror job copies the node (one writer goes through its filter).
 * Afterwards, read by QEMU's tools: every cluster that holds data (qemu-img map) is dirty in the
 * stored bitmap (qemu-nbd -B, nbdinfo --map), every acknowledged write reads back (qemu-io read -P),
 * the bitmap is stored consistent (not in use) and qemu-img check is clean.
 *
 * Rounds are seeded: BM_SHUTDOWN_SEED=<n> replays a run, BM_SHUTDOWN_ROUNDS=<n> sets how many.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { QmpClient } from '../../src/qmp/client.js';
import { mustRun, run, tempDir } from '../support/tools.js';
import { rng } from '../support/random.js';
import { KiB, MiB } from '../../src/base/sizes.js';

const SIZE = 64 * MiB;
const CLUSTER = 64 * KiB;
/** Writes go into distinct slots, so that every acknowledged write can be read back by its pattern. */
const SLOT = 4 * CLUSTER;
const WRITERS = 3;
/** Commands each writer keeps queued: the daemon may still hold some of them when it starts closing. */
const PIPELINE = 4;
const haveQemu = ['/usr/bin/qemu-img', '/usr/bin/qemu-io', '/usr/bin/qemu-nbd', '/usr/bin/nbdinfo'].every((p) => existsSync(p));
const skip = haveQemu ? false : 'QEMU tools (qemu-img, qemu-io, qemu-nbd) or nbdinfo not installed';

/** How the node is closed under the writes; 'quit-mirroring': quit while a mirror job copies the node. */
type Closer = 'quit' | 'SIGTERM' | 'SIGINT' | 'blockdev-del' | 'quit-mirroring';

interface Write {
  offset: number;
  bytes: number;
  pattern: number;
  /** 'acked' when qemu-io said "wrote", 'failed' for an error text, undefined if no reply came. */
  outcome?: 'acked' | 'failed';
}

/** Dirty clusters of the stored bitmap `name`, as qemu-nbd exports it. */
async function storedDirtyClusters(img: string, name: string): Promise<Set<number>> {
  const out = await mustRun('nbdinfo', [`--map=qemu:dirty-bitmap:${name}`, '--json', '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', name, img, ']']);
  const dirty = new Set<number>();
  for (const e of JSON.parse(out) as Array<{ offset: number; length: number; type: number }>) {
    if (e.type & 1) for (let c = e.offset / CLUSTER; c * CLUSTER < e.offset + e.length; c++) dirty.add(c);
  }
  return dirty;
}

/** Clusters that hold data in the image, by qemu-img map. */
async function dataClusters(img: string): Promise<Set<number>> {
  const out = await mustRun('qemu-img', ['map', '--output=json', '-f', 'qcow2', img]);
  const data = new Set<number>();
  for (const e of JSON.parse(out) as Array<{ start: number; length: number; data: boolean }>) {
    if (e.data) for (let c = Math.floor(e.start / CLUSTER); c * CLUSTER < e.start + e.length; c++) data.add(c);
  }
  return data;
}

async function oneRound(dir: string, round: number, seed: number, closer: Closer): Promise<{ acked: number; failed: number; noReply: number; data: number }> {
  const rand = rng(seed);
  const img = path.join(dir, `r${round}.qcow2`);
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, img, String(SIZE)]);
  await mustRun('qemu-img', ['bitmap', '--add', '-g', String(CLUSTER), img, 'b']);

  const sock = path.join(dir, `r${round}.sock`);
  const fileOpts = { driver: 'file', filename: img };
  // blockdev-del can only remove what blockdev-add added; the other rounds open the nodes on the command line.
  const cliArgs = closer === 'blockdev-del' ? [] : ['--blockdev', `driver=file,filename=${img},node-name=f`, '--blockdev', 'driver=qcow2,file=f,node-name=q'];
  const d: SpawnedDaemon = await spawnDaemon(sock, cliArgs);
  const writers: QmpClient[] = [];
  try {
    if (closer === 'blockdev-del') await d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: fileOpts });
    for (let i = 0; i < WRITERS; i++) writers.push(await QmpClient.connect(sock));
    // Through the mirror's filter node too: the job must be cancelled (its filter gone) before q closes.
    const writeNodes = ['q'];
    const target = path.join(dir, `r${round}-target.qcow2`);
    if (closer === 'quit-mirroring') {
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(SIZE)]);
      await d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 't', file: { driver: 'file', filename: target } });
      await d.qmp.execute('blockdev-mirror', { 'job-id': 'm', device: 'q', target: 't', sync: 'full', 'filter-node-name': 'mf' });
      writeNodes.push('mf');
    }

    // Distinct slots across the whole disk, in seeded random order; each write lies inside its slot.
    const slots = Array.from({ length: SIZE / SLOT }, (_, i) => i);
    for (let i = slots.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [slots[i], slots[j]] = [slots[j], slots[i]];
    }
    const writes: Write[] = slots.map((s, i) => {
      const within = Math.floor(rand() * SLOT);
      const bytes = 1 + Math.floor(rand() * (SLOT - within));
      return { offset: s * SLOT + within, bytes, pattern: 1 + (i % 255) };
    });

    let next = 0;
    let acked = 0;
    const triggerAt = 2 + Math.floor(rand() * 30);
    let triggered!: () => void;
    const trigger = new Promise<void>((r) => (triggered = r));
    const writer = async (c: QmpClient, node: string): Promise<void> => {
      while (next < writes.length) {
        const w = writes[next++];
        let out: string;
        try {
          out = await c.hmpOutput(`qemu-io ${node} "write -P ${w.pattern} ${w.offset} ${w.bytes}"`);
        } catch {
          return; // the daemon closed the connection: no reply
        }
        w.outcome = /^wrote /.test(out) ? 'acked' : 'failed';
        if (w.outcome === 'failed') return;
        if (++acked === triggerAt) triggered();
      }
    };
    const writing = Promise.all(writers.flatMap((c, i) => Array.from({ length: PIPELINE }, () => writer(c, writeNodes[i % writeNodes.length]))));
    await Promise.race([trigger, writing]);
    if (closer === 'quit' || closer === 'quit-mirroring') await d.qmp.execute('quit').catch(() => undefined);
    else if (closer === 'SIGTERM' || closer === 'SIGINT') d.proc.kill(closer);
    else {
      await d.qmp.execute('blockdev-del', { 'node-name': 'q' });
      await writing;
      await d.qmp.execute('quit').catch(() => undefined);
    }
    await writing;
    const code = await d.stop();
    assert.equal(code, 0, `seed ${seed} (${closer}): daemon exited ${code}: ${d.stderr()}`);

    // Every property is checked, so that a failing round says all that went wrong.
    const what = `seed ${seed} (${closer})`;
    const problems: string[] = [];
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', img])) as { 'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[] }> } } };
    const stored = JSON.stringify(info['format-specific'].data.bitmaps?.map((b) => [b.name, b.flags]));
    if (stored !== '[["b",["auto"]]]') problems.push(`stored bitmaps ${stored}, expected b (auto, not in use)`);
    const check = await run('qemu-img', ['check', img]);
    if (check.code !== 0) problems.push(`qemu-img check exited ${check.code}: ${check.stdout.trim().split('\n').pop()}`);
    if (closer === 'quit-mirroring') {
      const targetCheck = await run('qemu-img', ['check', target]);
      if (targetCheck.code !== 0) problems.push(`qemu-img check of the mirror target exited ${targetCheck.code}`);
    }

    const data = await dataClusters(img);
    const dirty = await storedDirtyClusters(img, 'b');
    const missing = [...data].filter((c) => !dirty.has(c));
    if (missing.length) {
      problems.push(`${missing.length} of ${data.size} clusters with data are clean in the stored bitmap (first at ${missing[0] * CLUSTER})`);
    }

    const ackedWrites = writes.filter((w) => w.outcome === 'acked');
    if (ackedWrites.length) {
      const r = await run('qemu-io', ['-r', '-f', 'qcow2', ...ackedWrites.flatMap((w) => ['-c', `read -P ${w.pattern} ${w.offset} ${w.bytes}`]), img]);
      if (r.code !== 0 || /Pattern verification failed/.test(r.stdout + r.stderr)) problems.push(`acknowledged writes do not read back: ${r.stdout}${r.stderr}`);
    }
    if (problems.length) throw new Error(`${what}, ${ackedWrites.length} writes acknowledged: ${problems.join('; ')}`);
    return {
      acked: ackedWrites.length,
      failed: writes.filter((w) => w.outcome === 'failed').length,
      noReply: writes.slice(0, next).filter((w) => w.outcome === undefined).length,
      data: data.size,
    };
  } finally {
    for (const c of writers) c.close();
    if (d.proc.exitCode === null) await d.kill();
  }
}

test('a write in flight at quit (also during a mirror), SIGTERM, SIGINT or blockdev-del is in the stored persistent bitmap', { skip, timeout: 120_000 }, async (t) => {
  const { dir, cleanup } = await tempDir('bm-shutdown-');
  try {
    const seed0 = Number(process.env.BM_SHUTDOWN_SEED ?? Date.now() % 1_000_000);
    const rounds = Number(process.env.BM_SHUTDOWN_ROUNDS ?? 20);
    const closers: Closer[] = ['quit', 'SIGTERM', 'blockdev-del', 'quit-mirroring', 'SIGINT'];
    t.diagnostic(`seed ${seed0} (BM_SHUTDOWN_SEED=${seed0} replays), ${rounds} rounds`);
    const totals = { acked: 0, failed: 0, noReply: 0 };
    // Every round runs, so that a failure says how often it happens.
    const failures: string[] = [];
    for (let round = 0; round < rounds; round++) {
      try {
        const r = await oneRound(dir, round, seed0 + round, closers[round % closers.length]);
        totals.acked += r.acked;
        totals.failed += r.failed;
        totals.noReply += r.noReply;
      } catch (err) {
        failures.push((err as Error).message.split('\n')[0]);
      }
      for (const f of [`r${round}.qcow2`, `r${round}-target.qcow2`]) await fsp.rm(path.join(dir, f), { force: true });
    }
    t.diagnostic(`${totals.acked} writes acknowledged, ${totals.failed} refused, ${totals.noReply} without a reply`);
    assert.deepEqual(failures, [], `${failures.length} of ${rounds} rounds failed`);
  } finally {
    await cleanup();
  }
});
