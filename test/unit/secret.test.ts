/**
 * The values secrets load (base/secret.ts), for the cases test/interop/secret-qsd.test.ts replays
 * against qemu-storage-daemon 7.2 (which shows a secret's value only by using it: these cases were
 * checked there by unlocking a LUKS image with each): ciphertexts made by the openssl tool.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { loadSecret, qemuBase64Decode } from '../../src/base/secret.js';

const KEY = Buffer.alloc(32, 0x5a);
const IV = Buffer.alloc(16, 0x21);

/** openssl enc -aes-256-cbc of `plain`, base64 (openssl pads with PKCS#7 unless `nopad`). */
function opensslEncrypt(plain: Buffer, nopad = false): string {
  const args = ['enc', '-aes-256-cbc', '-a', '-A', '-K', KEY.toString('hex'), '-iv', IV.toString('hex'), ...(nopad ? ['-nopad'] : [])];
  const r = spawnSync('openssl', args, { input: plain });
  assert.equal(r.status, 0, String(r.stderr));
  return String(r.stdout).trim();
}

const noKey = (id: string): Buffer => {
  throw new Error(`no key ${id}`);
};
const key = (id: string): Buffer => (id === 'k' ? KEY : noKey(id));

test('raw and base64 secrets, glib-lenient base64', async () => {
  assert.equal(String((await loadSecret('s', { data: 'letmein' }, noKey)).value), 'letmein');
  assert.equal(String((await loadSecret('s', { data: 'aGVsbG8=', format: 'base64' }, noKey)).value), 'hello');
  // glib: an incomplete last group gives nothing; newlines are skipped; '=' drops a byte each.
  assert.equal(String(qemuBase64Decode(Buffer.from('aGVsbG8'))), 'hel');
  assert.equal(String(qemuBase64Decode(Buffer.from('aGVs\nbG8=\n'))), 'hello');
  assert.equal(String(qemuBase64Decode(Buffer.from('aGVsbA=='))), 'hell');
  assert.equal(qemuBase64Decode(Buffer.from('abc')).length, 0);
  assert.throws(() => qemuBase64Decode(Buffer.from('aGVs bG8=')), /Base64 data contains invalid characters/);
  assert.throws(() => qemuBase64Decode(Buffer.from('aGVs\0bG8=')), /embedded NUL characters/);
});

test('encrypted secrets: openssl ciphertexts decrypt to the plaintext; the plaintext is not base64-decoded again', async () => {
  const iv = IV.toString('base64');
  const load = (data: string, format?: 'raw' | 'base64') => loadSecret('s', { data, keyid: 'k', iv, format }, key);
  assert.equal(String((await load(opensslEncrypt(Buffer.from('letmein')), 'base64')).value), 'letmein');
  const b64 = Buffer.from('letmein').toString('base64');
  assert.equal(String((await load(opensslEncrypt(Buffer.from(b64)), 'base64')).value), b64);
  // Padding 0 strips nothing, 16 a whole block, 17 is refused.
  const nopad = (s: string) => load(opensslEncrypt(Buffer.from(s, 'binary'), true), 'base64');
  assert.equal(String((await nopad('abcdefghijklmno\x00')).value), 'abcdefghijklmno\x00');
  assert.equal(String((await nopad('abcdefghijklmnop' + '\x10'.repeat(16))).value), 'abcdefghijklmnop');
  await assert.rejects(nopad('abcdefghijklmnopqrstuvwxyzABCDE\x11'), /Incorrect number of padding bytes \(17\) found on decrypted data/);
  assert.equal((await load('', 'base64')).value.length, 0);
});
