/**
 * Filenames as QEMU's bdrv_open reads them, where QEMU takes a filename rather than options (a backing
 * file named in an image header, drive-mirror's target): the protocol layer is chosen from the name.
 * A legacy `blkdebug:CONFIG:IMAGE` is a blkdebug node (with that config file) over the image; any
 * other name is a file.
 */
import * as path from 'node:path';
import { genericError } from '../errors.js';

/**
 * A legacy `blkdebug:CONFIG:IMAGE` filename, split as QEMU's blkdebug_parse_filename does: the config
 * file up to the next ':' (may be empty: no config), the image filename after it. Undefined for other names.
 */
export function parseBlkdebugFilename(filename: string): { config?: string; image: string } | undefined {
  if (!filename.startsWith('blkdebug:')) return undefined;
  const rest = filename.slice('blkdebug:'.length);
  const colon = rest.indexOf(':');
  if (colon < 0) throw genericError('Could not parse blkdebug filename');
  const config = rest.slice(0, colon);
  return { ...(config ? { config } : {}), image: rest.slice(colon + 1) };
}

/** The options of the protocol node(s) `filename` opens. */
export function protocolOptions(filename: string): Record<string, unknown> {
  const debug = parseBlkdebugFilename(filename);
  if (debug) return { driver: 'blkdebug', ...(debug.config !== undefined ? { config: debug.config } : {}), image: protocolOptions(debug.image) };
  return { driver: 'file', filename };
}

/** QEMU's path_has_protocol: a ':' before any '/' (a protocol prefix, never combined with a directory). */
export function hasProtocol(filename: string): boolean {
  const m = /[:/]/.exec(filename);
  return m !== null && m[0] === ':';
}

/** The file a filename finally reads: the image inside legacy blkdebug names. */
export function imageFileOf(filename: string): string {
  const debug = parseBlkdebugFilename(filename);
  return debug ? imageFileOf(debug.image) : filename;
}

/**
 * A backing file name as an image records it, resolved as QEMU's bdrv_get_full_backing_filename
 * does: relative names against the directory of the image that names them; absolute names and
 * names with a protocol as they are.
 */
export function resolveBackingFilename(imageFilename: string, backing: string): string {
  if (path.isAbsolute(backing) || hasProtocol(backing)) return backing;
  return path.join(path.dirname(imageFilename), backing);
}
