/**
 * Request serialisation (block/requests.ts) without a daemon: which in-flight request waits for which.
 * A wait is observed as a promise that has or has not settled once every pending callback has run
 * (`settled`, test/support/wait.ts), so nothing here depends on time.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { RequestTracker } from '../../src/block/requests.js';
import { settled } from '../support/wait.js';

test('requests: a serialising request waits for earlier overlapping requests only', async () => {
  const t = new RequestTracker();
  const before = t.begin('write', 0, 4096);
  const elsewhere = t.begin('write', 65536, 4096);
  const rmw = t.begin('write', 2048, 512);
  const later = t.begin('read', 0, 4096);
  // Widened to the 4 KiB block around it (read-modify-write): overlaps `before`, not `elsewhere`.
  const waiting = t.serialise(rmw, 0, 4096);
  assert.equal(await settled(waiting), false, 'waits for the earlier overlapping write');
  t.end(elsewhere);
  assert.equal(await settled(waiting), false, 'a request elsewhere does not hold it');
  t.end(before);
  assert.equal(await settled(waiting), true, 'the later overlapping read never held it');
  assert.equal(t.count, 2);
  t.end(rmw);
  t.end(later);
});

test('requests: later requests that overlap a serialising range wait until it ends; others do not', async () => {
  const t = new RequestTracker();
  const early = t.begin('read', 8192, 512);
  const ser = t.begin('write', 4096, 512);
  const serialised = t.serialise(ser, 4096, 8192);
  assert.equal(await settled((t.waitForSerialising(early) ?? Promise.resolve())), true, 'an earlier request never waits');
  assert.equal(await settled(serialised), false, 'the serialising request waits for it instead');
  t.end(early);
  assert.equal(await settled(serialised), true);
  // Overlaps the widened range [4096, 12288) but not the request's own [4096, 4608).
  const inside = t.begin('read', 10240, 512);
  const outside = t.begin('read', 12288, 512);
  assert.equal(await settled((t.waitForSerialising(outside) ?? Promise.resolve())), true, 'a request beside the range does not wait');
  const waiting = (t.waitForSerialising(inside) ?? Promise.resolve());
  assert.equal(await settled(waiting), false, 'a request inside the widened range waits');
  t.end(ser);
  assert.equal(await settled(waiting), true);
  for (const r of [inside, outside]) t.end(r);
});

test('requests: two overlapping serialising requests: the later waits for the earlier, not the reverse', async () => {
  const t = new RequestTracker();
  const a = t.begin('write', 0, 512);
  const b = t.begin('write', 256, 512);
  const aWait = t.serialise(a, 0, 1024);
  const bWait = t.serialise(b, 0, 1024);
  assert.equal(await settled(aWait), true);
  assert.equal(await settled(bWait), false);
  t.end(a);
  assert.equal(await settled(bWait), true);
  t.end(b);
});

test('requests: waitForOverlapping and drain wait for what is in flight; ending twice is harmless', async () => {
  const t = new RequestTracker();
  assert.equal(await settled(t.drain()), true, 'idle: drain resolves at once');
  const a = t.begin('write', 0, 512);
  const b = t.begin('discard', 1 << 20, 1 << 20);
  const overlapping = t.waitForOverlapping((1 << 20) + 4096, 512);
  const drained = t.drain();
  t.end(a);
  assert.equal(await settled(overlapping), false);
  assert.equal(await settled(drained), false);
  t.end(b);
  t.end(b);
  assert.equal(await settled(overlapping), true);
  assert.equal(await settled(drained), true);
  assert.equal(t.count, 0);
});
