/**
 * Text as QEMU stores it: QEMU's strings are C strings, so a U+0000 that came in over QMP (\u0000) is
 * held as "modified UTF-8", the two bytes C0 80, and is written so into images (a qcow2 bitmap name)
 * and counted so against length limits. Reading C0 80 back gives U+0000 again.
 */

/** The bytes QEMU holds for `s`: UTF-8, with each U+0000 as C0 80. */
export function qemuStringBytes(s: string): Buffer {
  const parts = s.split('\0').map((part) => Buffer.from(part, 'utf8'));
  return parts.length === 1 ? parts[0] : Buffer.concat(parts.flatMap((part, i) => (i === 0 ? [part] : [MODIFIED_NUL, part])));
}

const MODIFIED_NUL = Buffer.from([0xc0, 0x80]);

/** The text of bytes QEMU stored (up to a real NUL, which ends a C string): C0 80 is U+0000. */
export function qemuStringFromBytes(b: Buffer): string {
  const nul = b.indexOf(0);
  const bytes = nul < 0 ? b : b.subarray(0, nul);
  const parts: string[] = [];
  let start = 0;
  for (let i = bytes.indexOf(0xc0); i >= 0 && i + 1 < bytes.length; i = bytes.indexOf(0xc0, i + 1)) {
    if (bytes[i + 1] !== 0x80) continue;
    parts.push(bytes.toString('utf8', start, i), '\0');
    start = i + 2;
    i++;
  }
  parts.push(bytes.toString('utf8', start));
  return parts.join('');
}
