/**
 * QEMU's `secret` object (crypto/secret.c in QEMU 7.2, behaviour only): a password or key given as
 * `data` or read from `file`, in `format` raw or base64, optionally encrypted with another secret
 * (`keyid`: a 32-byte key, AES-256-CBC with the base64 `iv`, PKCS#7 padding). Loading happens once,
 * when the object is created; later changes of its properties change nothing of the loaded value, as
 * in QEMU. Messages are QEMU 7.2's, in its order.
 *
 * The value never leaves this module except through `value` (for the driver that needs it): no
 * message, trace or reply contains it.
 */
import { createDecipheriv } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { genericError, strerror } from '../errors.js';
import { qemuStringBytes } from './qemu-string.js';

export type SecretFormat = 'raw' | 'base64';

/** The properties a secret is created with (SecretProperties). */
export interface SecretProperties {
  format?: SecretFormat;
  keyid?: string;
  iv?: string;
  data?: string;
  file?: string;
}

/** A loaded secret: its properties as given, and the value they gave. */
export class Secret {
  constructor(
    readonly id: string,
    /** The properties as given (qom-set may change them; the value stays). */
    readonly props: SecretProperties,
    /** The secret's bytes. */
    readonly value: Buffer,
  ) {}
}

const BASE64_RANK: Int8Array = (() => {
  const r = new Int8Array(256).fill(-1);
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  for (let i = 0; i < alphabet.length; i++) r[alphabet.charCodeAt(i)] = i;
  r['='.charCodeAt(0)] = 0; // glib counts '=' as a zero digit, then drops one output byte per trailing '='
  return r;
})();

/**
 * QEMU's qbase64_decode: no NUL, and only the base64 alphabet, '=' and newlines; the rest is glib's
 * g_base64_decode, which is lenient: digits are taken four at a time (an incomplete group at the end
 * gives nothing), and each '=' among the last two digits takes one byte off the output.
 */
export function qemuBase64Decode(text: Buffer): Buffer {
  if (text.includes(0)) throw genericError('Base64 data contains embedded NUL characters');
  for (const c of text) if (c !== 0x0a && BASE64_RANK[c] < 0) throw genericError('Base64 data contains invalid characters');
  const out: number[] = [];
  let v = 0;
  let n = 0;
  for (const c of text) {
    if (c === 0x0a) continue;
    v = (v << 6) | BASE64_RANK[c];
    if (++n === 4) {
      out.push((v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff);
      v = 0;
      n = 0;
    }
  }
  let len = out.length;
  let digits = 2;
  for (let i = text.length - 1; i >= 0 && digits > 0; i--) {
    if (text[i] === 0x0a) continue;
    if (text[i] === 0x3d && len > 0) len--;
    digits--;
  }
  return Buffer.from(out.slice(0, len));
}

/** AES-256-CBC with the key secret's value (qcrypto_secret_decrypt), padding checked as QEMU does. */
function decrypt(input: Buffer, props: SecretProperties, key: Buffer): Buffer {
  if (key.length !== 32) throw genericError('Key should be 32 bytes in length');
  if (props.iv === undefined) throw genericError('IV is required to decrypt secret');
  const iv = qemuBase64Decode(qemuStringBytes(props.iv));
  if (iv.length !== 16) throw genericError(`IV should be 16 bytes in length not ${iv.length}`);
  const cipher = props.format === 'base64' ? qemuBase64Decode(input) : input;
  if (cipher.length % 16 !== 0) throw genericError(`Length ${cipher.length} must be a multiple of block size 16`);
  const d = createDecipheriv('aes-256-cbc', key, iv);
  d.setAutoPadding(false);
  const plain = Buffer.concat([d.update(cipher), d.final()]);
  if (plain.length === 0) return plain;
  const pad = plain[plain.length - 1];
  if (pad > 16) throw genericError(`Incorrect number of padding bytes (${pad}) found on decrypted data`);
  return plain.subarray(0, plain.length - pad);
}

/** glib's g_file_get_contents messages, as QEMU prints them after "Unable to read FILE: ". */
async function readSecretFile(file: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'EIO';
    const how = code === 'EISDIR' ? 'Error reading file' : 'Failed to open file';
    throw genericError(`Unable to read ${file}: ${how} \u201c${file}\u201d: ${strerror(code)}`);
  }
}

/**
 * Load a secret (user_creatable_complete of a `secret`): the checks and the value. `key` looks up the
 * secret named by keyid (QEMU's qcrypto_secret_lookup, with its messages).
 */
export async function loadSecret(id: string, props: SecretProperties, key: (keyid: string) => Buffer): Promise<Secret> {
  if (props.data !== undefined && props.file !== undefined) throw genericError("'file' and 'data' are mutually exclusive");
  let input: Buffer;
  if (props.file !== undefined) input = await readSecretFile(props.file);
  else if (props.data !== undefined) input = qemuStringBytes(props.data);
  else throw genericError("Either 'file' or 'data' must be provided");
  let value: Buffer;
  if (props.keyid !== undefined) value = decrypt(input, props, key(props.keyid));
  else if (props.format === 'base64' && input.length > 0) value = qemuBase64Decode(input);
  else value = input;
  return new Secret(id, { ...props }, value);
}
