/**
 * A backup folder: a chain of qcow2 images (0.qcow2 the full backup, then each incremental backed by
 * the one before) and its manifest, chain.json, which is the one thing that says what the chain is.
 *
 * The manifest is replaced atomically (written to a temporary file, flushed, renamed over the old one,
 * the folder flushed), and only after the new point's image is complete and flushed: so a point exists
 * exactly when the manifest lists it. Anything else in the folder (an image a killed run left half
 * written) is not trusted and is overwritten by the next run. The manifest also names the dirty bitmap
 * on the disk that records every change since the newest point: the next incremental copies what it
 * marks. Each point carries the sha256 of its image file, so `verify` can tell a damaged chain.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CliError, usageError } from './exit-codes.js';

export const MANIFEST = 'chain.json';
const FORMAT = 'bitmirror-backup-chain';

export interface BackupPoint {
  /** The image file, in the folder. */
  file: string;
  /** When the point was taken (ISO 8601, UTC). */
  time: string;
  /** 'full' or 'incremental' (backed by the point before). */
  kind: 'full' | 'incremental';
  /** The image file's size in bytes. */
  fileSize: number;
  /** Bytes the backup job copied from the disk. */
  copied: number;
  /** sha256 of the image file. */
  sha256: string;
}

export interface BackupChain {
  format: typeof FORMAT;
  version: 1;
  /** Random; names the chain's bitmaps on the disk, so two chains of one disk never mix. */
  id: string;
  /** What was backed up (the image file or node name given). */
  disk: string;
  /** The disk's size in bytes. */
  size: number;
  /** The bitmap on the disk recording changes since the newest point. */
  bitmap?: string;
  points: BackupPoint[];
}

export function newChain(disk: string, size: number): BackupChain {
  return { format: FORMAT, version: 1, id: randomBytes(6).toString('hex'), disk, size, points: [] };
}

/** The prefix of every bitmap (and node, job) a chain uses on the disk's daemon. */
export function chainPrefix(chain: BackupChain): string {
  return `bitmirror-backup-${chain.id}`;
}

/** The manifest of the folder, or undefined when it has none yet. */
export async function loadChain(dir: string): Promise<BackupChain | undefined> {
  let text: string;
  try {
    text = await fsp.readFile(path.join(dir, MANIFEST), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new CliError(`cannot read ${path.join(dir, MANIFEST)}: ${(err as Error).message}`);
  }
  let chain: BackupChain;
  try {
    chain = JSON.parse(text) as BackupChain;
  } catch {
    throw new CliError(`${path.join(dir, MANIFEST)} is not a backup chain manifest (not JSON)`);
  }
  if (chain.format !== FORMAT || chain.version !== 1 || !Array.isArray(chain.points)) throw new CliError(`${path.join(dir, MANIFEST)} is not a backup chain manifest`);
  return chain;
}

/** Replace the folder's manifest atomically (and durably). */
export async function saveChain(dir: string, chain: BackupChain): Promise<void> {
  const tmp = path.join(dir, `${MANIFEST}.tmp`);
  const fh = await fsp.open(tmp, 'w');
  try {
    await fh.writeFile(`${JSON.stringify(chain, null, 2)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, path.join(dir, MANIFEST));
  await syncPath(dir);
}

/** fsync a file or folder (a folder: so that a rename or a new file in it is durable). */
export async function syncPath(p: string): Promise<void> {
  const fh = await fsp.open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** The point `at` (default: the newest), checked against the chain. */
export function pointAt(chain: BackupChain, at: number | undefined): number {
  if (chain.points.length === 0) throw usageError('the chain has no backup point yet');
  const n = at ?? chain.points.length - 1;
  if (!Number.isInteger(n) || n < 0 || n >= chain.points.length) throw usageError(`no point ${String(at)}: the chain has points 0 to ${chain.points.length - 1}`);
  return n;
}

/** What is wrong with the chain's files (missing, another size or checksum), point by point; empty when nothing. */
export async function verifyChain(dir: string, chain: BackupChain, onPoint?: (n: number) => void): Promise<string[]> {
  const problems: string[] = [];
  for (const [n, p] of chain.points.entries()) {
    onPoint?.(n);
    const file = path.join(dir, p.file);
    const st = await fsp.stat(file).catch(() => undefined);
    if (!st) {
      problems.push(`point ${n}: ${p.file} is missing`);
      continue;
    }
    if (st.size !== p.fileSize) problems.push(`point ${n}: ${p.file} is ${st.size} bytes, the chain says ${p.fileSize}`);
    else if ((await sha256File(file)) !== p.sha256) problems.push(`point ${n}: ${p.file} does not match its checksum`);
  }
  return problems;
}
