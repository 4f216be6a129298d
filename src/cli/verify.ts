/**
 * verifyCopy: compare a source node and its copy, byte for byte, through the daemon — what
 * `bitmirror copy --verify` does once the copy has ended.
 *
 * What "the copy is right" means for a live source: at the instant the mirror ended (the switch, or
 * the soft cancel of --no-pivot) the copy equals the source. After that instant the source (no pivot)
 * or the copy (pivot: the users write to it now) may change: those regions cannot be compared. So the
 * copy command adds a bitmap (VERIFY_BITMAP) on the source at READY, before it ends the job; it
 * records every write from then on, and the carry extension takes it onto the copy at the switch,
 * where it goes on recording. Every byte outside those bitmaps was written by nobody since before
 * the instant and must be equal on both sides; a difference inside them (read after the comparison,
 * so they include writes made during it) is skipped and counted. On image files (an embedded daemon)
 * nobody else writes: the bitmaps stay empty and every byte must be equal.
 *
 * The bytes are read over NBD (nbd-access.ts): the daemon exports both nodes read-only (on the NBD
 * server the user started, or on one of its own on a private unix socket), and this process
 * reads them with bitmirror's NBD client (several chunks at once; what both sides' block status
 * reports as reading zeroes is not read), the bitmaps' dirty extents through the
 * `qemu:dirty-bitmap:` context of frozen copies.
 */
import { NBD_CMD } from '../nbd/protocol.js';
import { errorMessage } from '../errors.js';
import { CliError } from './exit-codes.js';
import type { Progress } from './progress.js';
import type { Session } from './session.js';
import type { SignalWatch } from './signals.js';
import type { NbdClientConnection } from '../nbd/client.js';
import { dirtyRanges, NbdAccess, zeroRanges, type Range } from './nbd-access.js';

/** The temporary bitmap that records writes while and after a copy ends (never reported as carried). */
export const VERIFY_BITMAP = '__bitmirror-verify';

export interface VerifyResult {
  identical: boolean;
  /** Bytes compared. */
  compared: number;
  /** Bytes skipped: written while or after the copy ended. */
  skipped: number;
  /** The first offset where the two differ. */
  firstDifference?: number;
}

const CHUNK = 4 * 1024 * 1024;
/** How many chunks are read at once (on each side). */
const IN_FLIGHT = 4;
/** The unit differences are located in (the smallest bitmap granularity). */
const BLOCK = 512;

/** The parts of [start, end) outside the sorted, disjoint `skip` ranges. */
function outside(start: number, end: number, skip: Range[]): Range[] {
  const out: Range[] = [];
  let at = start;
  for (const [s, e] of skip) {
    if (e <= at) continue;
    if (s >= end) break;
    if (s > at) out.push([at, s]);
    at = Math.max(at, e);
  }
  if (at < end) out.push([at, end]);
  return out;
}

/**
 * Where two buffers read at `base` differ, by 512-byte block (a bitmap's granularity is a multiple of
 * it, so a block is wholly inside or outside what a bitmap marks): [first differing byte, block end).
 */
function differingBlocks(a: Buffer, b: Buffer, base: number): Range[] {
  const out: Range[] = [];
  for (let at = 0; at < a.length; at += BLOCK) {
    const end = Math.min(a.length, at + BLOCK);
    if (a.subarray(at, end).equals(b.subarray(at, end))) continue;
    let i = at;
    while (a[i] === b[i]) i++;
    const last = out[out.length - 1];
    if (last && last[1] === base + at) last[1] = base + end;
    else out.push([base + i, base + end]);
  }
  return out;
}

/** Union of sorted range lists. */
function union(a: Range[], b: Range[]): Range[] {
  const all = [...a, ...b].sort((x, y) => x[0] - y[0]);
  const out: Range[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push([r[0], r[1]]);
  }
  return out;
}

/** What an export reads as zeroes by its block status (base:allocation); none when the server gave no context. */
function zeroesOf(conn: NbdClientConnection, size: number): Promise<Range[]> {
  return conn.session.contextId === undefined ? Promise.resolve([]) : zeroRanges(conn, size);
}

export async function verifyCopy(
  session: Session,
  opts: { source: string; target: string; skipBitmap?: string; progress?: Progress; signals?: SignalWatch },
): Promise<VerifyResult> {
  const qmp = session.qmp;
  let access: NbdAccess;
  try {
    access = await NbdAccess.start(qmp, 'verify');
  } catch (err) {
    throw new CliError(`verify: ${errorMessage(err)}`);
  }
  try {
    const src = await access.open(opts.source);
    const dst = await access.open(opts.target);
    const size = src.session.size;
    if (dst.session.size !== size) return { identical: false, compared: 0, skipped: 0, firstDifference: Math.min(size, dst.session.size) };
    // Only where either side may hold data: a range both report as reading zeroes is equal unread.
    const toCompare = union(outside(0, size, await zeroesOf(src, size)), outside(0, size, await zeroesOf(dst, size)));
    const chunks = toCompare.flatMap(([s, e]) => {
      const out: Range[] = [];
      for (let at = s; at < e; at += CHUNK) out.push([at, Math.min(e, at + CHUNK)]);
      return out;
    });
    const differing: Range[] = [];
    let done = size - toCompare.reduce((n, [s, e]) => n + (e - s), 0);
    let next = 0;
    let failure: unknown;
    // IN_FLIGHT chunks at once, each read from both sides together: the daemon reads the next ones
    // while this process compares. A failure stops the others after their current chunk, and every
    // read has ended before the exports go (close, below).
    const compareChunks = async () => {
      try {
        while (failure === undefined && next < chunks.length) {
          opts.signals?.throwIfSignalled();
          const [s, e] = chunks[next++];
          const [a, b] = await Promise.all([src.request(NBD_CMD.READ, s, e - s), dst.request(NBD_CMD.READ, s, e - s)]);
          if (!a.data!.equals(b.data!)) differing.push(...differingBlocks(a.data!, b.data!, s));
          done += e - s;
          opts.progress?.update({ phase: 'verify', done, total: size });
        }
      } catch (err) {
        failure ??= err;
      }
    };
    await Promise.all(Array.from({ length: IN_FLIGHT }, compareChunks));
    if (failure !== undefined) throw failure;
    opts.progress?.update({ phase: 'verify', done: size, total: size }, true);
    differing.sort((x, y) => x[0] - y[0]);
    if (differing.length === 0) return { identical: true, compared: size, skipped: 0 };
    // Differences: those inside what was written since the copy ended (the bitmaps, read now, after
    // the comparison) are no differences (NbdAccess reads a frozen copy of each).
    let skip: Range[] = [];
    if (opts.skipBitmap !== undefined) {
      for (const node of [opts.source, opts.target]) {
        const bitmap = (await session.nodeSummary(node)).bitmaps.find((b) => b.name === opts.skipBitmap);
        if (!bitmap) continue;
        skip = union(skip, await dirtyRanges(await access.open(node, { bitmap }), size));
      }
    }
    const skipped = skip.reduce((n, [s, e]) => n + (e - s), 0);
    const real = differing.map(([s, e]) => outside(s, e, skip)).flat();
    return real.length === 0 ? { identical: true, compared: size - skipped, skipped } : { identical: false, compared: size - skipped, skipped, firstDifference: real[0][0] };
  } finally {
    await access.close();
    if (opts.skipBitmap !== undefined) {
      for (const node of new Set([opts.source, opts.target])) {
        await qmp.execute('block-dirty-bitmap-remove', { node, name: opts.skipBitmap }).catch(() => undefined);
      }
    }
  }
}
