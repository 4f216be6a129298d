import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { JsonStreamParser, encodeQmp, type JsonMessage } from '../../src/qmp/json.js';
import { parseKeyval, visit, object, str, size, bool, uint32, arrayOf, enumOf, alternate } from '../../src/qapi/schema.js';

function parseAll(chunks: string[]): JsonMessage[] {
  const out: JsonMessage[] = [];
  const p = new JsonStreamParser((m) => out.push(m));
  for (const c of chunks) p.feed(c);
  p.end();
  return out;
}

test('stream framing: split, joined, byte-at-a-time', () => {
  const text = '{"execute": "a", "arguments": {"s": "x}{\\"y", "n": [1, -2.5e3, true, null]}}{"execute":"b"}\n';
  const whole = parseAll([text]);
  assert.equal(whole.length, 2);
  assert.deepEqual(whole[0], { ok: true, value: { execute: 'a', arguments: { s: 'x}{"y', n: [1, -2500, true, null] } } });
  const bytewise = parseAll([...text]);
  assert.deepEqual(bytewise, whole);
});

test('parse errors use QEMU wording and the stream recovers', () => {
  const msgs = parseAll(['{"a":}', '{"a" 1}', '{"a":1,"a":2}', '{"a":nul}', '{1:2}', '{"b":1}']);
  assert.deepEqual(
    msgs.map((m) => (m.ok ? 'ok' : m.error)),
    ['expecting value', 'missing : in object pair', 'duplicate key', "invalid keyword 'nul'", 'key is not a string in object', 'ok'],
  );
});

test('single quotes, escapes and unicode', () => {
  const [m] = parseAll(["{'a': 'it''s'}"]);
  assert.equal(m.ok, false);
  const [n] = parseAll(["{'a': 'q\\'s \\u00e9'}"]);
  assert.deepEqual(parseAll(["{'a': 'say \"hi\"', \"b\": \"it's\"}"]), [{ ok: true, value: { a: 'say "hi"', b: "it's" } }]);
  assert.deepEqual(parseAll(['{"a": "x\ty"}']), [{ ok: false, error: 'control character in string' }]);
  // Long strings split anywhere across chunks, escapes included.
  const long = 'ab\\"c'.repeat(3000);
  const text = `{"s": "${long}"}`;
  const chunks: string[] = [];
  for (let i = 0; i < text.length; i += 97) chunks.push(text.slice(i, i + 97));
  assert.deepEqual(parseAll(chunks), [{ ok: true, value: { s: 'ab"c'.repeat(3000) } }]);
  assert.deepEqual(n, { ok: true, value: { a: "q's é" } });
});

test('deep nesting is refused, not a stack overflow', () => {
  const msgs = parseAll(['['.repeat(5000)]);
  assert.deepEqual(msgs[0], { ok: false, error: 'JSON nesting depth limit exceeded', limit: true });
});

test('an endless message is dropped at the size limit (QEMU json-streamer), and the stream recovers', () => {
  const msgs: JsonMessage[] = [];
  const p = new JsonStreamParser((m) => msgs.push(m), 1000);
  p.feed('[' + '1, '.repeat(1000));
  assert.deepEqual(msgs[0], { ok: false, error: 'JSON token size limit exceeded', limit: true });
  // As in QEMU, the rest of the dropped message is read as whatever it looks like; then a new one parses.
  p.feed('1] {"execute": "x"}');
  assert.deepEqual(msgs.at(-1), { ok: true, value: { execute: 'x' } });
  const big = new JsonStreamParser((m) => msgs.push(m), 1000);
  msgs.length = 0;
  big.feed(`"${'a'.repeat(5000)}`);
  // One unterminated token: dropped each time it reaches the limit, never held whole.
  assert.equal(msgs.length, 4);
  for (const m of msgs) assert.deepEqual(m, { ok: false, error: 'JSON token size limit exceeded', limit: true });
});

test('encoder writes ASCII with QEMU separators', () => {
  assert.equal(encodeQmp({ a: [1, 'é\n'], b: { c: true } }), '{"a": [1, "\\u00e9\\n"], "b": {"c": true}}');
});

test('keyval parsing as QEMU: dots nest, ",," escapes, implied key, lists', () => {
  assert.deepEqual(parseKeyval('qcow2,node-name=a,file.driver=file,file.filename=x,,y.img', 'driver'), {
    driver: 'qcow2',
    'node-name': 'a',
    file: { driver: 'file', filename: 'x,y.img' },
  });
  assert.deepEqual(parseKeyval('l.0=a,l.1=b'), { l: ['a', 'b'] });
  assert.throws(() => parseKeyval('a.b=1,a=2'), /used inconsistently/);
});

test('schema visitor messages', () => {
  const s = object('T', { name: str, '*size': size, '*flag': bool, '*g': uint32, '*list': arrayOf(str) });
  assert.throws(() => visit(s, {}, ''), { message: "Parameter 'name' is missing" });
  assert.throws(() => visit(s, { name: 1 }, ''), { message: "Invalid parameter type for 'name', expected: string" });
  assert.throws(() => visit(s, { name: 'a', x: 1 }, ''), { message: "Parameter 'x' is unexpected" });
  assert.throws(() => visit(s, { name: 'a', size: -1 }, ''), { message: "Parameter 'size' expects uint64" });
  assert.throws(() => visit(s, { name: 'a', size: '10' }, 'options'), { message: "Parameter 'options.size' expects uint64" });
  assert.throws(() => visit(s, { name: 'a', size: 1.5 }, ''), { message: "Parameter 'size' expects uint64" });
  assert.throws(() => visit(s, { name: 'a', g: 'x' }, ''), { message: "Parameter 'g' expects uint64" });
  assert.throws(() => visit(s, { name: 'a', g: 2 ** 32 }, ''), { message: "Parameter 'g' expects uint32_t" });
  assert.throws(() => visit(s, { name: 'a', flag: 'on' }, ''), { message: "Invalid parameter type for 'flag', expected: boolean" });
  // QEMU 7.2 names only the member (list elements: 'null') for enums, alternates and uintN ranges,
  // and the full path for everything else (checked against qemu-storage-daemon 7.2).
  const outer = object('O', { list: arrayOf(object('E', { kind: enumOf('K', ['a']), '*g': uint32 })), '*alt': arrayOf(alternate('Alt', str, object('B', {}))) });
  assert.throws(() => visit(outer, { list: [{ kind: 'b' }] }, ''), { message: "Parameter 'kind' does not accept value 'b'" });
  assert.throws(() => visit(outer, { list: [{ kind: 'a', g: 2 ** 32 }] }, ''), { message: "Parameter 'g' expects uint32_t" });
  assert.throws(() => visit(outer, { list: [{ kind: 'a', g: 'x' }] }, ''), { message: "Parameter 'list[0].g' expects uint64" });
  assert.throws(() => visit(outer, { list: [{ kind: 'a', z: 1 }] }, ''), { message: "Parameter 'list[0].z' is unexpected" });
  assert.throws(() => visit(outer, { list: [], alt: [3] }, ''), { message: "Invalid parameter type for 'null', expected: Alt" });
  assert.throws(() => visit(arrayOf(enumOf('K', ['a'])), ['b'], 'enable'), { message: "Parameter 'null' does not accept value 'b'" });
  assert.deepEqual(visit(s, { name: 'a', size: '1M', flag: 'on' }, '', { keyval: true }), { name: 'a', size: 1048576, flag: true });
  assert.throws(() => visit(s, { name: 'a', flag: 'maybe' }, '', { keyval: true }), { message: "Parameter 'flag' expects 'on' or 'off'" });
});
