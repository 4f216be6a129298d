/**
 * The locks of the data path without a daemon: qcow2's reader/writer lock (block/drivers/qcow2/tables.ts)
 * and a copy's chunk locks (block/copy/chunk-locks.ts). Both take a fast path when nothing contends (the
 * section runs at once, no promise of the lock's own); these tests check that the fast path and the
 * contended path keep the same order and exclusion. A wait is observed as a promise that has or has not
 * settled once every pending callback has run (`settled`, test/support/wait.ts), so nothing here depends on time.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { RWLock } from '../../src/block/drivers/qcow2/tables.js';
import { ChunkLocks } from '../../src/block/copy/chunk-locks.js';
import { settled } from '../support/wait.js';

/** A promise and its resolver, for a section that ends when the test says so. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

test('RWLock: uncontended sections run at once; readers share, a writer waits for them and readers behind it wait for the writer', async () => {
  const lock = new RWLock();
  const order: string[] = [];
  // Fast path: the section has run by the time withShared returns.
  const g1 = gate();
  const r1 = lock.withShared(async () => {
    order.push('r1');
    await g1.promise;
  });
  assert.deepEqual(order, ['r1']);
  const g2 = gate();
  const r2 = lock.withShared(async () => {
    order.push('r2');
    await g2.promise;
  });
  assert.deepEqual(order, ['r1', 'r2'], 'a second reader shares the lock');
  // Contended: a writer queues behind the readers, and a reader arriving after it queues behind it.
  const w = lock.withExclusive(() => {
    order.push('w');
    return 'written';
  });
  const r3 = lock.withShared(() => {
    order.push('r3');
    return 3;
  });
  assert.equal(await settled(w), false);
  assert.equal(await settled(r3), false, 'a reader does not overtake a waiting writer');
  g1.open();
  await r1;
  assert.equal(await settled(w), false, 'the writer waits for every reader');
  g2.open();
  await r2;
  assert.equal(await w, 'written');
  assert.equal(await r3, 3);
  assert.deepEqual(order, ['r1', 'r2', 'w', 'r3']);
  // Free again: the fast path runs the next section at once.
  let ran = false;
  const r4 = lock.withExclusive(() => {
    ran = true;
  });
  assert.equal(ran, true);
  await r4;
});

test('RWLock: a section that throws (at once or later) releases the lock and rejects', async () => {
  const lock = new RWLock();
  await assert.rejects(
    lock.withExclusive(() => {
      throw new Error('sync');
    }),
    /sync/,
  );
  await assert.rejects(
    lock.withShared(async () => {
      await Promise.resolve();
      throw new Error('async');
    }),
    /async/,
  );
  let ran = false;
  await lock.withExclusive(() => {
    ran = true;
  });
  assert.equal(ran, true, 'nothing still holds the lock');
});

test('ChunkLocks: a free range needs no wait; a held one is waited for until its release; anyReleased wakes at the next release', async () => {
  const locks = new ChunkLocks();
  assert.equal(locks.wait(0, 65536), undefined, 'nothing held: no promise');
  assert.equal(locks.anyReleased(), undefined);
  const a = locks.hold(0, 65536);
  const b = locks.hold(131072, 65536);
  assert.equal(locks.wait(65536, 65536), undefined, 'the range between the locks is free');
  const waiting = locks.wait(32768, 65536)!;
  assert.ok(waiting, 'overlapping range: a promise');
  const acquired = locks.acquire(0, 4096);
  const any = locks.anyReleased()!;
  assert.equal(await settled(waiting), false);
  assert.equal(await settled(any), false);
  b.release();
  assert.equal(await settled(any), true, 'any release wakes anyReleased');
  assert.equal(await settled(waiting), false, 'still overlaps the first lock');
  a.release();
  await waiting;
  const c = await acquired;
  assert.equal(locks.size, 1);
  assert.equal(locks.overlaps(0, 1), true);
  // A lock's done, asked for after its release, is already resolved.
  c.release();
  c.release();
  assert.equal(await settled(c.done), true);
  assert.equal(locks.size, 0);
  await locks.allReleased();
});
