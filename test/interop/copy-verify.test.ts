/**
 * verifyCopy (what `bitmirror copy --verify` runs once the copy has ended) against a running daemon,
 * on sparse raw images: the READs it sends (counted as they leave bitmirror's NBD client) cover only
 * what either side holds data in (block status: the rest reads as zeroes on both), several at once;
 * differences in a later chunk and where only one side is a hole are found, the first one reported,
 * whatever order the reads in flight end in.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as path from 'node:path';
import { mustRun, tempDir } from '../support/tools.js';
import { MiB, startDaemon } from '../support/daemon.js';
import { Session } from '../../src/cli/session.js';
import { verifyCopy } from '../../src/cli/verify.js';
import { NbdClientConnection } from '../../src/nbd/client.js';
import { NBD_CMD } from '../../src/nbd/protocol.js';

const SIZE = 24 * MiB;

/** The READs (offset, length) every NBD client connection of this process sends while `fn` runs, and the most in flight at once. */
async function countingReads<T>(fn: () => Promise<T>): Promise<{ result: T; reads: Array<[number, number]>; maxInFlight: number }> {
  const original = NbdClientConnection.prototype.request;
  const reads: Array<[number, number]> = [];
  let inFlight = 0;
  let maxInFlight = 0;
  NbdClientConnection.prototype.request = async function (this: NbdClientConnection, type, offset, length, ...rest) {
    if (type !== NBD_CMD.READ) return original.call(this, type, offset, length, ...rest);
    reads.push([offset, length]);
    maxInFlight = Math.max(maxInFlight, ++inFlight);
    try {
      return await original.call(this, type, offset, length, ...rest);
    } finally {
      inFlight--;
    }
  };
  try {
    return { result: await fn(), reads: reads.sort((x, y) => x[0] - y[0] || x[1] - y[1]), maxInFlight };
  } finally {
    NbdClientConnection.prototype.request = original;
  }
}

/** A sparse raw image with data at 0..1M and 20M..21M (a hole elsewhere), plus `extra` qemu-io writes. */
async function image(file: string, extra: string[] = []): Promise<string> {
  await mustRun('qemu-img', ['create', '-q', '-f', 'raw', file, String(SIZE)]);
  await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 20M 1M', ...extra.flatMap((c) => ['-c', c]), file]);
  return file;
}

test('verify: reads several chunks at once, skips what both sides report as zeroes, finds the first difference wherever it is', async () => {
  const { dir, cleanup } = await tempDir('bm-verify-');
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(sock);
  let session: Session | undefined;
  try {
    const add = (node: string, file: string) => d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': node, 'read-only': true, file: { driver: 'file', filename: file } });
    await add('a', await image(path.join(dir, 'a.raw')));
    await add('same', await image(path.join(dir, 'same.raw')));
    // Differences: data where `a` has a hole (12M), other data (20M + 512, in a later chunk).
    await add('other', await image(path.join(dir, 'other.raw'), ['write -P 0x33 12M 4k', 'write -P 0x44 20M 512']));
    session = await Session.open({ qmp: sock });
    const s = session;

    const same = await countingReads(() => verifyCopy(s, { source: 'a', target: 'same' }));
    assert.deepEqual(same.result, { identical: true, compared: SIZE, skipped: 0 });
    // Each data range read once on each side (the 1 MiB ranges are one chunk each); both sides at once.
    const data: Array<[number, number]> = [[0, MiB], [20 * MiB, MiB]];
    assert.deepEqual(same.reads, [data[0], data[0], data[1], data[1]]);
    assert.ok(same.maxInFlight >= 4, `reads in flight: ${same.maxInFlight}`);

    const other = await countingReads(() => verifyCopy(s, { source: 'a', target: 'other' }));
    assert.deepEqual(other.result, { identical: false, compared: SIZE, skipped: 0, firstDifference: 12 * MiB });
    const withHole: Array<[number, number]> = [data[0], [12 * MiB, 4096], data[1]];
    assert.deepEqual(other.reads, withHole.flatMap((r) => [r, r]));
    // Nothing left behind.
    assert.deepEqual(await d.qmp.execute('query-block-exports'), []);
  } finally {
    await session?.close();
    await d.stop();
    await cleanup();
  }
});
