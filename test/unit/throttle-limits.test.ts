/**
 * A throttle group's limits changed while requests wait in it (qom-set `limits`): the change is in
 * force at once for the group's nodes — a request queued behind a limit that would hold it for hours
 * starts as soon as the limit is raised or lifted — and the members not given keep their values, as
 * QEMU's throttle_group_set_limits merges them. No clock is read: the group's queue and the requests'
 * promises say what happened.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { BlockGraph } from '../../src/block/graph.js';
import { nullDriver } from '../../src/block/drivers/null.js';
import { throttleDriver } from '../../src/block/filters/throttle.js';
import { ThrottleGroup } from '../../src/block/throttle-group.js';
import { poll, settled } from '../support/wait.js';

const KiB = 1024;

async function throttled(limits: Record<string, number>) {
  const g = new BlockGraph();
  g.registerDriver(nullDriver);
  g.registerDriver(throttleDriver);
  const group = new ThrottleGroup('tg', limits);
  g.objects.add(group);
  const node = await g.open({ driver: 'throttle', 'node-name': 't', 'throttle-group': 'tg', file: { driver: 'null-co', size: 1024 * KiB } });
  return { g, group, node };
}

test('raising a bps limit starts the request waiting in the group at once; other members stay', async () => {
  const { g, group, node } = await throttled({ 'bps-total': 1, 'iops-read': 5 });
  // 64 KiB at 1 byte/s: the first write starts (the bucket was empty), the second would wait ~18 hours.
  await node.write(0, Buffer.alloc(64 * KiB));
  const second = node.write(0, Buffer.alloc(64 * KiB));
  await poll('the second write to queue in the group', () => group.queued === 1);
  assert.equal(await settled(second), false);
  group.setLimits({ 'bps-total': 1024 * 1024 * 1024 });
  await second;
  assert.equal(group.queued, 0);
  const l = group.limits();
  assert.equal(l['bps-total'], 1024 * 1024 * 1024);
  assert.equal(l['iops-read'], 5);
  assert.equal(l['bps-total-max-length'], 1);
  await g.closeAll();
});

test('lifting every limit starts all waiting requests in order; an invalid change leaves the limits as they were', async () => {
  const { g, group, node } = await throttled({ 'iops-write': 1 });
  await node.write(0, Buffer.alloc(512));
  const order: number[] = [];
  const waiting = [1, 2, 3].map((i) => node.write(i * 512, Buffer.alloc(512)).then(() => order.push(i)));
  await poll('three writes to queue', () => group.queued === 3);
  assert.throws(() => group.setLimits({ 'iops-total': 10 }), /bps\/iops\/max total values and read\/write values cannot be used at the same time/);
  assert.throws(() => group.setLimits({ 'iops-write': 10, 'iops-write-max': 5 }), /bps_max\/iops_max cannot be lower than bps\/iops/);
  assert.equal(group.queued, 3);
  assert.equal(group.limits()['iops-write'], 1);
  group.setLimits({ 'iops-write': 0 });
  await Promise.all(waiting);
  assert.deepEqual(order, [1, 2, 3]);
  // Unlimited now: a new request starts without queueing.
  await node.write(0, Buffer.alloc(512));
  await g.closeAll();
});
