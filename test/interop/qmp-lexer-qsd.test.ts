/**
 * Hostile QMP input against qemu-storage-daemon 7.2 and bitmirror (issue 18): the same bytes, each on
 * a connection of its own that half-closes, must get the same replies from both, in the same number:
 * invalid UTF-8, lone surrogates, stray bytes, QEMU's lexer recovery, numbers and keywords, a flood of
 * errors, integers past 64 bits. Both end the connection after the last reply. And a bitmap name of NUL characters is stored
 * in a qcow2 image as QEMU stores it.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { RawQmpClient } from '../support/raw-qmp.js';
import { haveQsd } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

const latin1 = (s: string) => Buffer.from(s, 'latin1');
const add = (name: string) => latin1(`{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"${name}"}}`);

/** Inputs as bytes (latin1 strings: one character per byte). */
const CASES: Buffer[] = [
  // The bitmap names, and neighbours.
  add('b\xe2\x822'),
  add('c\xff'),
  add('d\\ud800'),
  add('e\\udc00x'),
  add('f\\ud800\\udc00'),
  add('g\xc0\x80'),
  add('h\xed\xa0\x80'),
  add('i\xf4\x90\x80\x80'),
  add('j\xe2\x82'),
  add('k\xc3\xa9\\u00e9\xf0\x9f\x98\x80'),
  add('\\u0000\\u0000\\u0000'),
  // Lexer errors and recovery.
  latin1('{"a": @ }'),
  latin1('{"a": @ "x" ] 1'),
  latin1('"abc\x01" 1]'),
  latin1('"a\tb"'),
  latin1('"\xfe" ,'),
  latin1('"a\xf5b"'),
  latin1('\xe2\x82'),
  latin1('\xc3\xa9 1,'),
  latin1('{"a": \xc3\xa9}'),
  latin1('1\xc3\xa9'),
  latin1('tru\xc3\xa9'),
  latin1('@ "x\n 1,'),
  latin1('[\x01]'),
  latin1('\xfe\xff 1,'),
  latin1('{"execute":"query-version"}\x00{"execute":"query-version","id":2}'),
  // Escapes.
  latin1('"\\x41"'),
  latin1('"\\u00"'),
  latin1('"\\uzzzz"]'),
  latin1('"\\uD83D\\uDE00"'),
  latin1('"\\uD83Dx"'),
  latin1('"\\uD83D\\u0041"'),
  latin1('"\\uDE00\\uD83D"'),
  latin1('{"execute":"query-version","id":"\\uD83D\\uDE00\\u007f\xc3\xa9"}'),
  // Numbers, keywords, scalars at top level, cut off at the end of input.
  latin1('1'),
  latin1('1 '),
  latin1('tru'),
  latin1('x:'),
  latin1('Abc,'),
  latin1('01,'),
  latin1('-,'),
  latin1('1.,'),
  latin1('1e,'),
  latin1('%d,'),
  latin1('-0.5e+3,1E5,'),
  latin1('[1,2,]'),
  latin1('{"a":1,}'),
  latin1('{"a":1 2}'),
  latin1('}{"execute":"query-version","id":3}'),
  latin1('{"execute":"query-version","id":1.5e3}'),
  latin1('{"execute":"query-version","id":12345678901234567890}'),
  // Integers as QEMU's parser types them: past int64/uint64 a double, which no integer argument takes
  // (a value that rounds to -2^63 or 2^64 as a double must not pass as one of them); an exact int64 max.
  ...[
    '9223372036854775807',
    '9223372036854775808',
    '-9223372036854775808',
    '-9223372036854775809',
    '18446744073709551615',
    '18446744073709551616',
    '1e308',
    '-1.5',
  ].flatMap((n) => [
    latin1(`{"execute":"block-job-set-speed","arguments":{"device":"none","speed":${n}}}`),
    latin1(`{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"g${n}","granularity":${n}}}`),
    // (A negative uint64 QEMU takes as 2^64 + value, which bitmirror refuses: not compared here.)
    ...(n.startsWith('-') ? [] : [latin1(`{"execute":"block-set-write-threshold","arguments":{"node-name":"n0","write-threshold":${n}}}`)]),
  ]),
  latin1('{"execute":"block-dirty-bitmap-add","arguments":{"node":"n0","name":"g","granularity":4294967296}}'),
  // The node is looked up before the size is checked; a list element of the wrong type is named by its index.
  latin1('{"execute":"block_resize","arguments":{"size":-1}}'),
  latin1('{"execute":"block_resize","arguments":{"node-name":"n0","size":-1}}'),
  latin1('{"execute":"qmp_capabilities","arguments":{"enable":[[1]]}}'),
  // The flood of issue 18 defect 1.
  latin1('1,'.repeat(20000)),
];

/** Replies to each case, with the version (which differs by design) masked. */
async function replies(program: 'bitmirror' | 'qemu-storage-daemon', dir: string): Promise<unknown[][]> {
  const d = await spawnDaemon(path.join(dir, `${program}.sock`), ['--blockdev', 'driver=null-co,node-name=n0,size=1048576'], program);
  const out: unknown[][] = [];
  try {
    await d.qmp.execute('query-version');
    // qemu-storage-daemon's monitor serves one client at a time: leave the socket to the cases.
    d.qmp.close();
    for (const input of CASES) {
      const c = await RawQmpClient.connect(d.socket);
      c.sock.end(input);
      await c.closed;
      assert.ok(c.endedByServer, `${program} did not end the connection: ${input.toString('latin1').slice(0, 80)}`);
      out.push(c.replies.map((r) => ('return' in r && typeof r.return === 'object' && r.return !== null && 'qemu' in r.return ? { ...r, return: 'version' } : r)));
    }
  } finally {
    d.proc.kill('SIGTERM');
    await new Promise((r) => d.proc.once('exit', r));
  }
  return out;
}

test('the same hostile bytes get the same replies from qemu-storage-daemon 7.2 and bitmirror', { skip: !haveQsd && 'qemu-storage-daemon not installed' }, async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-lexer-'));
  try {
    const theirs = await replies('qemu-storage-daemon', dir);
    const ours = await replies('bitmirror', dir);
    const flood = CASES.length - 1;
    for (let i = 0; i < flood; i++) assert.deepEqual(ours[i], theirs[i], `case ${i}: ${JSON.stringify(CASES[i].toString('latin1').slice(0, 80))}`);
    // The flood: 20000 "not an object" and 20000 "expecting value". bitmirror answers every one before it
    // closes; qemu-storage-daemon, on a loaded machine, may close the half-closed connection before it has
    // answered the last of them (seen: 36998 of 40000), so its replies are compared as a prefix of ours.
    assert.equal(ours[flood].length, 40000);
    assert.ok(theirs[flood].length > 0, 'qemu-storage-daemon answered none of the flood');
    assert.deepEqual(ours[flood].slice(0, theirs[flood].length), theirs[flood]);
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
});

test('a bitmap name of NUL characters is stored as QEMU stores it (C0 80 each) and read back whole', async () => {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-nulname-'));
  const img = path.join(dir, 'a.qcow2');
  try {
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
    const node = ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--blockdev', 'driver=qcow2,node-name=q0,file=f0'];
    const d = await spawnDaemon(path.join(dir, 'a.sock'), node);
    await d.qmp.execute('block-dirty-bitmap-add', { node: 'q0', name: '\0\0\0', persistent: true });
    assert.equal(await d.stop(), 0);
    // qemu-img (QEMU's own reader) sees the name as qemu-storage-daemon 7.2 would have stored it.
    const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', img])) as { 'format-specific': { data: { bitmaps: Array<{ name: string }> } } };
    assert.deepEqual(info['format-specific'].data.bitmaps.map((b) => b.name), ['\0\0\0']);
    const raw = await fsp.readFile(img);
    assert.ok(raw.includes(Buffer.from([0xc0, 0x80, 0xc0, 0x80, 0xc0, 0x80])));
    const again = await spawnDaemon(path.join(dir, 'b.sock'), node);
    const nodes = await again.qmp.execute<Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string }> }>>('query-named-block-nodes');
    assert.deepEqual(nodes.find((n) => n['node-name'] === 'q0')!['dirty-bitmaps']!.map((b) => b.name), ['\0\0\0']);
    assert.equal(await again.stop(), 0);
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
});
