/** README's first command must stay true: `bitmirror demo` passes on a fresh machine. */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { BITMIRROR_BIN } from '../../src/daemon/spawn.js';

test('bitmirror demo passes, verified by qemu-img', () => {
  const r = spawnSync(process.execPath, [BITMIRROR_BIN, 'demo'], { encoding: 'utf8', timeout: 120_000 });
  assert.equal(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /qemu-img compare disk copy: Images are identical\./);
  assert.match(r.stdout, /==> demo passed/);
  assert.doesNotMatch(r.stdout, /FAIL/);
});
