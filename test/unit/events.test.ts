import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { EventBus } from '../../src/base/events.js';

test('event timestamps are wall-clock microseconds and never go backwards', () => {
  const bus = new EventBus();
  const times: number[] = [];
  bus.on((_n, _d, t) => {
    assert.ok(Number.isInteger(t.microseconds) && t.microseconds >= 0 && t.microseconds < 1e6);
    times.push(t.seconds * 1e6 + t.microseconds);
  });
  for (let i = 0; i < 50000; i++) bus.emit('X');
  for (let i = 1; i < times.length; i++) assert.ok(times[i] >= times[i - 1], `event ${i} went back in time`);
  assert.ok(Math.abs(times[times.length - 1] / 1000 - Date.now()) < 1000, 'close to Date.now()');
});
