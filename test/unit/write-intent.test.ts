/**
 * WriteIntentRecord (block/write-intent.ts): a write may go ahead only once every region it touches
 * is in a persisted copy of the record; sequential writers get regions marked ahead (fewer record
 * writes, fewer waits) and stay a bounded superset; random writers mark exactly their regions.
 * The record's `persist` here keeps what it would have written (the store's part is tested with
 * real images in test/interop/bitmap-*.test.ts).
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { MAX_REGIONS_AHEAD, WriteIntentRecord } from '../../src/block/write-intent.js';
import { rng } from '../support/random.js';

const MiB = 2 ** 20;
const REGION = 4 * MiB;
const NB_REGIONS = 64;

/** A record of 64 regions whose persists copy the bits, one event-loop turn later. */
function record(): { rec: WriteIntentRecord; persisted: () => Buffer; persists: () => number } {
  const bits = Buffer.alloc(NB_REGIONS / 8);
  let onDisk = Buffer.from(bits);
  let count = 0;
  const rec = new WriteIntentRecord({ regionBits: 22, nbRegions: NB_REGIONS }, bits, async () => {
    const snapshot = Buffer.from(bits);
    await new Promise((r) => setImmediate(r));
    onDisk = snapshot;
    count++;
  });
  return { rec, persisted: () => onDisk, persists: () => count };
}

const marked = (b: Buffer): number[] => Array.from({ length: NB_REGIONS }, (_, i) => i).filter((i) => b[i >> 3] & (1 << (i & 7)));

/** Mark [offset, +bytes) as a write does; once allowed to go ahead, its regions must be on disk. */
async function write(r: ReturnType<typeof record>, offset: number, bytes: number): Promise<boolean> {
  const wait = r.rec.mark(offset, bytes);
  if (wait) await wait;
  const onDisk = marked(r.persisted());
  for (let i = Math.floor(offset / REGION); i <= Math.floor((offset + bytes - 1) / REGION); i++) assert.ok(onDisk.includes(i), `region ${i} of [${offset}, +${bytes}) not durable before the write`);
  return wait !== undefined;
}

test('a sequential writer gets regions marked ahead: fewer record writes and waits, a bounded superset', async () => {
  const r = record();
  const end = 40 * MiB; // 10 regions
  let waits = 0;
  // 8 writes of 1 MiB in flight, issued in order (as a guest's sequential stream).
  let next = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < end) {
        const off = next;
        next += MiB;
        if (await write(r, off, MiB)) waits++;
      }
    }),
  );
  await new Promise((res) => setImmediate(res));
  const onDisk = marked(r.persisted());
  // Every written region, plus at most MAX_REGIONS_AHEAD beyond the end.
  for (let i = 0; i < 10; i++) assert.ok(onDisk.includes(i));
  assert.ok(Math.max(...onDisk) < 10 + MAX_REGIONS_AHEAD, `marked ${JSON.stringify(onDisk)}`);
  // Without look-ahead: a record write and a wait at each of the 10 regions.
  assert.ok(r.persists() < 10, `${r.persists()} record writes for 10 regions`);
  assert.ok(waits < 10 * 8, `${waits} waits`);
});

test('a short sequential stream (under one region) and random writes mark exactly their regions', async () => {
  const r = record();
  const rand = rng(14);
  const want = new Set<number>();
  for (let k = 0; k < 20; k++) {
    const off = Math.floor(rand() * (NB_REGIONS * REGION - 64 * 1024));
    await write(r, off, 4096);
    want.add(Math.floor(off / REGION));
  }
  // Three 1 MiB writes in a row inside region 40 (not a whole region yet: nothing ahead).
  for (let k = 0; k < 3; k++) await write(r, 40 * REGION + k * MiB, MiB);
  want.add(40);
  assert.deepEqual(marked(r.persisted()), [...want].sort((a, b) => a - b));
});

test('a stream stopping after two regions leaves at most two regions marked beyond its end', async () => {
  const r = record();
  for (let off = 0; off < 2 * REGION; off += MiB) await write(r, off, MiB);
  await new Promise((res) => setImmediate(res));
  await new Promise((res) => setImmediate(res));
  const onDisk = marked(r.persisted());
  assert.deepEqual(onDisk.slice(0, 2), [0, 1]);
  assert.ok(Math.max(...onDisk) <= 3, `marked ${JSON.stringify(onDisk)}`);
});
