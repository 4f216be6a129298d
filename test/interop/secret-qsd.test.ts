/**
 * The `secret` object against qemu-storage-daemon 7.2: the same object-add/object-del script replayed
 * against both gives the same replies — every way of giving a secret (data, file, raw, base64, encrypted
 * with another secret) and QEMU's message for every way of getting it wrong — and `--object secret`
 * on the command line creates one as object-add does. The values loaded are checked in
 * test/unit/secret.test.ts.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { createCipheriv } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { haveQsd, startDaemon, type Env } from '../support/daemon.js';
import { replayOn, type Replay } from '../support/qmp-replay.js';
import { run, tempDir } from '../support/tools.js';
import { BITMIRROR_BIN } from '../../src/daemon/spawn.js';

const skip = !haveQsd && 'qemu-storage-daemon not installed';
type Program = 'bitmirror' | 'qemu-storage-daemon';

const KEY = Buffer.alloc(32, 7);
const IV = Buffer.alloc(16, 9);
/** AES-256-CBC of `plain` (its padding as given: nothing is added). */
function encrypt(plain: Buffer): Buffer {
  const c = createCipheriv('aes-256-cbc', KEY, IV);
  c.setAutoPadding(false);
  return Buffer.concat([c.update(plain), c.final()]);
}
const padded = (text: string, pad: number, n = pad) => Buffer.concat([Buffer.from(text), Buffer.alloc(n, pad)]);

const replay = (program: Program, script: (r: Replay, env: Env) => Promise<void>) => replayOn(program, 'secret', script);

async function sameReplies(script: (r: Replay, env: Env) => Promise<void>): Promise<unknown[]> {
  const theirs = await replay('qemu-storage-daemon', script);
  const ours = await replay('bitmirror', script);
  for (let i = 0; i < Math.max(ours.length, theirs.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
  return ours;
}

const add = (r: Replay, id: string, props: Record<string, unknown>) => r.request('object-add', { 'qom-type': 'secret', id, ...props });

test('object-add secret: data, file, formats, encrypted secrets and their errors, as qemu-storage-daemon 7.2', { skip }, async () => {
  const iv = IV.toString('base64');
  const replies = await sameReplies(async (r, env) => {
    await writeFile(env.f('pw'), 'letmein\n');
    await writeFile(env.f('empty'), '');
    await writeFile(env.f('nul'), 'aGVs\0bG8=');
    await writeFile(env.f('key'), KEY);
    await add(r, 'plain', { data: 'letmein' });
    await add(r, 'none', {});
    await add(r, 'both', { data: 'x', file: env.f('pw') });
    await add(r, 'fromfile', { file: env.f('pw') });
    await add(r, 'emptyfile', { file: env.f('empty') });
    await add(r, 'nofile', { file: env.f('missing') });
    await add(r, 'dirfile', { file: env.dir });
    await add(r, 'b64', { data: 'aGVsbG8=', format: 'base64' });
    await add(r, 'b64short', { data: 'aGVsbG8', format: 'base64' });
    await add(r, 'b64nl', { data: 'aGVs\nbG8=\n', format: 'base64' });
    await add(r, 'b64bad', { data: 'aGVs bG8=', format: 'base64' });
    await add(r, 'b64nulfile', { file: env.f('nul'), format: 'base64' });
    await add(r, 'b64nul', { data: 'a\u0000b', format: 'base64' });
    await add(r, 'hex', { data: 'x', format: 'hex' });
    await add(r, 'loaded', { data: 'x', loaded: true });
    await add(r, 'loaded2', { data: 'x', loaded: false });
    await add(r, '9bad', { data: 'x' });
    await add(r, 'plain', { data: 'again' });
    // Encrypted with another secret.
    await add(r, 'k', { data: KEY.toString('base64'), format: 'base64' });
    await add(r, 'kfile', { file: env.f('key') });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 'tg' });
    const ct = (p: Buffer) => encrypt(p).toString('base64');
    await add(r, 'enc', { data: ct(padded('letmein', 9)), keyid: 'k', iv, format: 'base64' });
    await add(r, 'enc2', { data: ct(padded('letmein', 9)), keyid: 'kfile', iv, format: 'base64' });
    await add(r, 'enc-pad0', { data: ct(padded('abcdefghijklmno', 0, 1)), keyid: 'k', iv, format: 'base64' });
    await add(r, 'enc-pad16', { data: ct(padded('abcdefghijklmnop', 16)), keyid: 'k', iv, format: 'base64' });
    await add(r, 'enc-pad17', { data: ct(padded('abcdefghijklmnopqrstuvwxyzABCDE', 17, 1)), keyid: 'k', iv, format: 'base64' });
    await add(r, 'enc-empty', { data: '', keyid: 'k', iv, format: 'base64' });
    await add(r, 'enc-raw24', { data: ct(padded('letmein', 9)), keyid: 'k', iv });
    await add(r, 'enc-raw15', { data: 'abcdefghijklmno', keyid: 'k', iv });
    await add(r, 'enc-noiv', { data: ct(padded('letmein', 9)), keyid: 'k', format: 'base64' });
    await add(r, 'enc-iv3', { data: 'x', keyid: 'k', iv: 'AAAA' });
    await add(r, 'enc-ivbad', { data: 'x', keyid: 'k', iv: '!!' });
    await add(r, 'enc-nokey', { data: 'x', keyid: 'nope', iv });
    await add(r, 'enc-emptykey', { data: 'x', keyid: '', iv });
    await add(r, 'enc-notsecret', { data: 'x', keyid: 'tg', iv });
    await add(r, 'enc-shortkey', { data: 'x', keyid: 'plain', iv });
    await add(r, 'ivonly', { data: 'x', iv });
    // object-del: a key may go while secrets made with it stay; a deleted id is free again.
    await r.request('object-del', { id: 'k' });
    await r.request('object-del', { id: 'k' });
    await add(r, 'k', { data: 'x' });
    await r.request('object-del', { id: 'tg' });
  });
  // The script did run: some steps passed, some failed with QEMU's messages.
  assert.deepEqual(replies[0], ['object-add', {}]);
  assert.deepEqual(replies[1], ['object-add', { class: 'GenericError', desc: "Either 'file' or 'data' must be provided" }]);
});

test('--object secret on the command line: created as object-add creates it, errors stop the daemon', { skip }, async () => {
  const t = await tempDir('bm-secret-cli-');
  try {
    const sock = (p: Program) => `${t.dir}/${p === 'bitmirror' ? 'bm' : 'qsd'}.sock`;
    for (const program of ['bitmirror', 'qemu-storage-daemon'] as const) {
      const d = await startDaemon(sock(program), ['--object', 'secret,id=sec0,data=letmein', '--object', 'secret,id=sec1,format=base64,data=aGVsbG8='], program);
      const rep = await d.qmp.request('object-add', { 'qom-type': 'secret', id: 'sec0', data: 'x' });
      assert.deepEqual(rep.error, { class: 'GenericError', desc: "attempt to add duplicate property 'sec0' to object (type 'container')" }, program);
      assert.deepEqual((await d.qmp.request('object-del', { id: 'sec1' })).return, {}, program);
      assert.equal(await d.stop(), 0);
    }
    // A secret that cannot be loaded stops both daemons before they serve anything, with QEMU's message.
    for (const [bad, msg] of [
      ['secret,id=s', "Either 'file' or 'data' must be provided"],
      ['secret,id=s,data=x,loaded=on', "Property 'secret.loaded' is not writable"],
      ['secret,id=s,data=!,format=base64', 'Base64 data contains invalid characters'],
    ]) {
      const theirs = await run('qemu-storage-daemon', ['--object', bad]);
      const ours = await run(process.execPath, [BITMIRROR_BIN, 'daemon', '--object', bad]);
      for (const r of [theirs, ours]) {
        assert.equal(r.code, 1, bad);
        assert.match(r.stderr, new RegExp(`: ${msg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\n`), bad);
      }
    }
  } finally {
    await t.cleanup();
  }
});
