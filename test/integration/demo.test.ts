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
  // The live copy is bitmirror copy's: it switched over, verified, and says which bitmaps the copy
  // carries and how many bytes each marks dirty (bm0: the 8 clusters of step 2, the 4 writes of 128 KiB
  // made while the copy ended).
  assert.match(r.stdout, /ok {3}bitmirror copy switched over to the copy/);
  assert.match(r.stdout, /verify: identical \(256\.0 MiB compared\)/);
  assert.match(r.stdout, /the copy carries bitmap bm0: 1048576 bytes dirty \(granularity 65536, not persistent, recording\)/);
  assert.match(r.stdout, /ok {3}the copy carries bm0 with the same bits as the disk/);
  assert.doesNotMatch(r.stdout, /FAIL/);
});
