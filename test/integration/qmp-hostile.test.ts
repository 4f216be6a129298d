/**
 * Hostile and clumsy QMP clients (issue 18): a client flooding errors must not starve another one, a
 * client that half-closes gets every reply, invalid UTF-8 and lone surrogates are refused with QEMU's
 * parse errors, a client that never reads its replies is throttled, not buffered without bound.
 */
import { test, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { RawQmpClient } from '../support/raw-qmp.js';

let dir: string;
let d: SpawnedDaemon;

before(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-hostile-'));
  d = await spawnDaemon(path.join(dir, 'qmp.sock'), ['--blockdev', 'driver=null-co,node-name=null0,size=1048576']);
});
after(async () => {
  const code = await d.stop();
  assert.equal(code, 0, d.stderr());
  assert.doesNotMatch(d.stderr(), /internal error/);
  await fsp.rm(dir, { recursive: true, force: true });
});

/** A raw client of the test's daemon. */
const RawClient = { connect: (negotiate = true) => RawQmpClient.connect(d.socket, negotiate) };

const notObject = { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } };
const expectingValue = { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } };

test('a client flooding errors gets every error reply and another client is answered meanwhile', async () => {
  const n = 20000;
  const flood = await RawClient.connect();
  const other = await RawClient.connect();
  // "1," 20000 times (40 KB): each "1" is a top-level non-object, each "," a parse error.
  flood.sock.write('1,'.repeat(n));
  await flood.waitFor(1);
  // The flood is being answered; another client's command must get its turn, not wait for the flood.
  other.sock.write('{"execute":"query-version","id":"other"}');
  await other.waitFor(1);
  const floodRepliesThen = flood.replies.length;
  assert.equal(other.replies[0].id, 'other');
  assert.ok(floodRepliesThen < 2 * n, `the other client was answered only after all ${2 * n} flood replies`);
  await flood.waitFor(2 * n);
  for (let i = 0; i < 2 * n; i++) assert.deepEqual(flood.replies[i], i % 2 === 0 ? notObject : expectingValue, `reply ${i}`);
  flood.sock.destroy();
  other.sock.destroy();
});

test('a message just past the token limit: QEMU\'s limit error, then every remaining token answered', async () => {
  const c = await RawClient.connect();
  // 2^21 tokens is QEMU's limit: the array's "1"s and ","s pass it at the 1048577th element.
  const elements = (1 << 20) + 1000;
  c.sock.write('[' + '1,'.repeat(elements) + '1]');
  const other = await RawClient.connect();
  other.sock.write('{"execute":"query-version","id":"other"}');
  await other.waitFor(1);
  assert.equal(other.replies[0].id, 'other');
  // As QEMU 7.2 (checked with qemu-storage-daemon on the same input): the limit error when the
  // 2^21+1st token (the "," after element 2^20) arrives, then every later "1" and "," or "]" is a
  // message of its own.
  const pairs = elements - (1 << 20) + 1;
  await c.waitFor(1 + 2 * pairs);
  assert.deepEqual(c.replies[0], { error: { class: 'GenericError', desc: 'JSON token count limit exceeded' } });
  for (let i = 1; i <= 2 * pairs; i++) assert.deepEqual(c.replies[i], i % 2 === 1 ? notObject : expectingValue, `reply ${i}`);
  c.sock.end();
  await c.closed;
  assert.equal(c.replies.length, 1 + 2 * pairs);
  other.sock.destroy();
});

test('a client that half-closes gets a reply to every command it sent, then the socket closes', async () => {
  const img = path.join(dir, 'half.raw');
  await fsp.writeFile(img, Buffer.alloc(1 << 20));
  await d.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'half0', file: { driver: 'file', filename: img } });
  const c = await RawClient.connect();
  c.sock.write('{"execute":"query-named-block-nodes","id":1}');
  c.sock.write('{"execute":"human-monitor-command","arguments":{"command-line":"qemu-io half0 \\"write -P 0x5a 0 64k\\"","__org.bitmirror_output":true},"id":2}');
  c.sock.write('{"execute":"query-version","id":3}');
  // What `echo … | socat - UNIX-CONNECT:…` and `nc -N` do: shut down the write side, keep reading.
  c.sock.end();
  await c.closed;
  assert.deepEqual(
    c.replies.map((r) => r.id),
    [1, 2, 3],
  );
  assert.ok(c.replies.every((r) => 'return' in r));
  assert.match(c.replies[1].return as string, /^wrote 65536\/65536 bytes at offset 0/);
  await d.qmp.execute('blockdev-del', { 'node-name': 'half0' });
  const data = await fsp.readFile(img);
  assert.ok(data.subarray(0, 65536).every((x) => x === 0x5a));
});

test('a half-closing client before negotiation is answered too', async () => {
  const c = await RawClient.connect(false);
  c.sock.write('{"execute":"qmp_capabilities","id":"a"}{"execute":"query-version","id":"b"}');
  c.sock.end();
  await c.closed;
  assert.deepEqual(
    c.replies.slice(1).map((r) => r.id),
    ['a', 'b'],
  );
});

/** The daemon's resident memory now and its peak so far (bytes), from /proc. */
async function daemonMemory(): Promise<{ rss: number; peak: number }> {
  const status = await fsp.readFile(`/proc/${d.proc.pid}/status`, 'utf8');
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)![1]) * 1024;
  return { rss: kb('VmRSS'), peak: kb('VmHWM') };
}

test('a client that does not read its replies is throttled, not buffered: bounded memory, every reply arrives later', async () => {
  const before = await daemonMemory();
  const c = await RawClient.connect();
  // Stop reading our replies; each request's reply echoes its 64 KiB id.
  c.sock.pause();
  const request = `{"execute":"query-version","id":"${'x'.repeat(65536)}"}`;
  const other = await RawClient.connect();
  let probes = 0;
  let sent = 0;
  let accepted = 0;
  // Send requests one by one; after each, give the daemon 20 turns (another client's round trips). A
  // daemon that runs the requests and buffers the replies keeps reading, so every write is accepted;
  // one that applies back-pressure stops reading this client once the unsent replies pile up.
  while (sent < 200) {
    c.sock.write(request, () => accepted++);
    sent++;
    for (let i = 0; i < 20; i++) {
      other.sock.write(`{"execute":"query-version","id":${probes++}}`);
      await other.waitFor(probes);
    }
    if (accepted < sent) break;
  }
  assert.ok(sent < 200, 'the daemon kept reading a client that does not read its replies');
  const during = await daemonMemory();
  c.sock.resume();
  await c.waitFor(sent);
  assert.ok(c.replies.every((r) => r.id === 'x'.repeat(65536) && 'return' in r));
  const growth = during.peak - Math.max(before.peak, before.rss);
  assert.ok(growth < 64 << 20, `daemon peak memory grew by ${(growth / 2 ** 20).toFixed(0)} MiB while the client did not read`);
  c.sock.destroy();
  other.sock.destroy();
});

test('invalid UTF-8 and lone surrogates in a bitmap name are refused with QEMU 7.2\'s parse errors; nothing is created', async () => {
  const bitmaps = async () => JSON.stringify((await d.qmp.execute<Array<Record<string, unknown>>>('query-named-block-nodes')).map((n) => n['dirty-bitmaps']));
  const before = await bitmaps();
  const add = (name: Buffer) => Buffer.concat([Buffer.from('{"execute":"block-dirty-bitmap-add","arguments":{"node":"null0","name":"'), name, Buffer.from('"}}')]);
  const parseError = (desc: string) => ({ error: { class: 'GenericError', desc: `JSON parse error, ${desc}` } });
  // Replies as qemu-storage-daemon 7.2 gives them for the same bytes.
  const cases: Array<[Buffer, Array<Record<string, unknown>>]> = [
    [add(Buffer.from('b\xe2\x822', 'latin1')), [parseError('invalid UTF-8 sequence in string')]],
    // 0xFF can never be UTF-8: QEMU's lexer stops at it; the rest ("}}) is skipped up to each '}'.
    [add(Buffer.from('c\xff', 'latin1')), [parseError('stray \'"c\uFFFD\''), parseError('expecting value'), parseError('expecting value')]],
    [add(Buffer.from('d\\ud800')), [parseError('\\ud800 is not a valid Unicode character')]],
    [add(Buffer.from('e\\udc00x')), [parseError('\\udc00 is not a valid Unicode character')]],
  ];
  for (const [input, expected] of cases) {
    const c = await RawClient.connect();
    c.sock.end(input);
    await c.closed;
    assert.deepEqual(c.replies, expected, input.toString('latin1'));
  }
  assert.equal(await bitmaps(), before);
  // NUL characters are valid JSON (\u0000): QEMU creates the bitmap and lists its name as written.
  await d.qmp.execute('block-dirty-bitmap-add', { node: 'null0', name: '\0\0\0' });
  const c = await RawClient.connect();
  c.sock.end('{"execute":"query-named-block-nodes"}');
  await c.closed;
  const line = JSON.stringify(c.replies[0]);
  assert.ok(line.includes('"name":"\\u0000\\u0000\\u0000"'), line);
  await d.qmp.execute('block-dirty-bitmap-remove', { node: 'null0', name: '\0\0\0' });
});
