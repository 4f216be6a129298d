/**
 * A shell script written for qemu-storage-daemon runs unchanged against `bitmirror daemon` with the
 * same output: test/interop/scripts/throttled-mirror.sh starts the daemon with its monitor on standard
 * input/output (--chardev stdio, --monitor) and a throttle group (--object), and drives blockdev-add,
 * a mirror slowed down by a throttle filter, pause/resume, complete and quit over standard input. Its
 * output (every reply and event as text, timestamps and the greeting's version masked by the script,
 * then qemu-img compare and check of the copy) must be the same, byte for byte. The other scripts
 * there: objects.sh (throttle groups), blkdebug-legacy.sh (legacy blkdebug:CONFIG:IMAGE filenames).
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BITMIRROR_BIN } from '../../src/daemon/spawn.js';
import { haveQsd } from '../support/daemon.js';
import { run, tempDir } from '../support/tools.js';

const SCRIPTS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/interop/scripts');

async function runScript(script: string, daemon: string[]): Promise<string> {
  const { dir, cleanup } = await tempDir('bm-script-');
  try {
    const r = await run('bash', [path.join(SCRIPTS, script), dir, ...daemon]);
    assert.equal(r.code, 0, `${script} with ${daemon[0]}: ${r.stderr}\n${r.stdout}`);
    return r.stdout.split(dir).join('DIR');
  } finally {
    await cleanup();
  }
}

test('throttled-mirror.sh, written for qemu-storage-daemon, gives the same output with bitmirror daemon', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await runScript('throttled-mirror.sh', ['qemu-storage-daemon']);
  const ours = await runScript('throttled-mirror.sh', [process.execPath, BITMIRROR_BIN, 'daemon']);
  assert.equal(ours, theirs);
  assert.match(ours, /"status": "paused"/);
  assert.match(ours, /Images are identical\./);
});

test('objects.sh (throttle groups and throttle nodes, their refusals) gives the same output with bitmirror daemon', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await runScript('objects.sh', ['qemu-storage-daemon']);
  const ours = await runScript('objects.sh', [process.execPath, BITMIRROR_BIN, 'daemon']);
  assert.equal(ours, theirs);
  assert.match(ours, /object 'tg0' is in use, can not be deleted/);
});

test('blkdebug-legacy.sh (blkdebug:CONFIG:IMAGE as a backing file and as a drive-mirror target) gives the same output with bitmirror daemon', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const theirs = await runScript('blkdebug-legacy.sh', ['qemu-storage-daemon']);
  const ours = await runScript('blkdebug-legacy.sh', [process.execPath, BITMIRROR_BIN, 'daemon']);
  assert.equal(ours, theirs);
  assert.match(ours, /"operation": "read"/);
  assert.match(ours, /No space left on device/);
  assert.match(ours, /Images are identical\./);
});
