/** The progress display of the user-level commands (src/cli/progress.ts): modes, JSON lines, the bar. */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { chooseProgressMode, formatBytes, formatDuration, Progress } from '../../src/cli/progress.js';

/** A stream that keeps what is written, and a clock the test moves. */
function sink(columns = 100): { out: Writable & { columns: number }; text: () => string; clock: { now: number } } {
  let text = '';
  const out = Object.assign(
    new Writable({
      write(chunk: Buffer | string, _enc, cb) {
        text += String(chunk);
        cb();
      },
    }),
    { columns },
  );
  return { out, text: () => text, clock: { now: 0 } };
}

test('progress mode: auto is a bar on a terminal and JSON lines otherwise', () => {
  assert.equal(chooseProgressMode(undefined, { isTTY: true }), 'bar');
  assert.equal(chooseProgressMode('auto', { isTTY: false }), 'json');
  assert.equal(chooseProgressMode('none', { isTTY: true }), 'none');
  assert.throws(() => chooseProgressMode('fancy'), /--progress must be auto, bar, json or none \(not 'fancy'\)/);
});

test('sizes and durations as people read them', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1023), '1023 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(64 * 1024 * 1024), '64.0 MiB');
  assert.equal(formatDuration(7), '0:07');
  assert.equal(formatDuration(754), '12:34');
  assert.equal(formatDuration(3723), '1:02:03');
});

test('JSON lines: at most two a second, a phase\'s first and forced last sample always; done never goes back', () => {
  const s = sink();
  const p = new Progress('json', s.out, () => s.clock.now);
  p.update({ phase: 'copy', done: 0, total: 100 });
  s.clock.now = 100;
  p.update({ phase: 'copy', done: 10, total: 100 }); // too soon: not shown
  s.clock.now = 1000;
  p.update({ phase: 'copy', done: 50, total: 100 });
  s.clock.now = 1200;
  p.update({ phase: 'copy', done: 40, total: 120 }, true); // a smaller done is shown as the largest seen
  p.message('hello');
  p.update({ phase: 'verify', done: 5, total: 10 });
  p.result({ status: 'completed' }, 'not shown in json mode');
  const lines = s.text().trimEnd().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.deepEqual(lines, [
    { type: 'progress', phase: 'copy', done: 0, total: 100, percent: 0, rate: 0, eta: null },
    { type: 'progress', phase: 'copy', done: 50, total: 100, percent: 50, rate: 50, eta: 1 },
    { type: 'progress', phase: 'copy', done: 50, total: 120, percent: 41.6, rate: 42, eta: 2 },
    { type: 'message', text: 'hello' },
    { type: 'progress', phase: 'verify', done: 5, total: 10, percent: 50, rate: 0, eta: null },
    { type: 'result', status: 'completed' },
  ]);
});

test('the bar: redrawn in place with bytes, rate and ETA; text goes on its own line', () => {
  const s = sink(100);
  const p = new Progress('bar', s.out, () => s.clock.now);
  p.update({ phase: 'copy', done: 0, total: 64 * 1024 * 1024 });
  s.clock.now = 2000;
  p.update({ phase: 'copy', done: 16 * 1024 * 1024, total: 64 * 1024 * 1024 });
  p.message('a message');
  p.result({}, 'done');
  const text = s.text();
  assert.ok(text.startsWith('\rcopy ['), JSON.stringify(text));
  const ESC = String.fromCharCode(0x1b);
  assert.ok(text.endsWith(`\rcopy [${'#'.repeat(10)}${'.'.repeat(30)}]  25%  16.0 MiB / 64.0 MiB  8.0 MiB/s  ETA 0:06${ESC}[K\na message\ndone\n`), JSON.stringify(text));
});
