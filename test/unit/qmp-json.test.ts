import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { JsonStreamParser, Utf8StreamDecoder, encodeQmp, type JsonMessage } from '../../src/qmp/json.js';
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
  // A control character is a lexer error (QEMU: the message ends there, input is skipped to '}').
  assert.deepEqual(parseAll(['{"a": "x\ty"}']), [
    { ok: false, error: 'stray \'"x\t\'' },
    { ok: false, error: 'expecting value' },
  ]);
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
  assert.equal(encodeQmp({ a: [1, 'é\n'], b: { c: true } }), '{"a": [1, "\\u00E9\\n"], "b": {"c": true}}');
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

test('invalid UTF-8, lone surrogates and stray bytes are refused with QEMU 7.2\'s errors', () => {
  const parse = (bytes: Buffer) => {
    const out: JsonMessage[] = [];
    const p = new JsonStreamParser((m) => out.push(m));
    const decoder = new Utf8StreamDecoder();
    // Byte at a time: sequences split across chunks must decode the same.
    for (const b of bytes) p.feed(decoder.decode(Buffer.from([b])));
    p.feed(decoder.end());
    return out.map((m) => (m.ok ? m.value : m.error));
  };
  const latin1 = (s: string) => Buffer.from(s, 'latin1');
  assert.deepEqual(parse(latin1('"b\xe2\x822"')), ['invalid UTF-8 sequence in string']);
  assert.deepEqual(parse(latin1('"c\xff"}')), ["stray '\"c\ufffd'", 'expecting value']);
  assert.deepEqual(parse(latin1('"h\xed\xa0\x80"')), ['invalid UTF-8 sequence in string']);
  assert.deepEqual(parse(Buffer.from('"d\\ud800"')), ['\\ud800 is not a valid Unicode character']);
  assert.deepEqual(parse(Buffer.from('"\\uD83D\\u0041"')), ['\\uD83D is not a valid Unicode character']);
  assert.deepEqual(parse(Buffer.from('"\\u00"')), ['\\u00" is not a valid Unicode character']);
  // Valid: a surrogate pair, raw UTF-8, "modified UTF-8" C0 80 for U+0000, \u0000.
  assert.deepEqual(parse(Buffer.from('"\\uD83D\\uDE00 \u00e9 \u{1F600}"')), ['\u{1F600} \u00e9 \u{1F600}']);
  assert.deepEqual(parse(latin1('"g\xc0\x80\\u0000"')), ['g\0\0']);
  // Outside strings: a stray byte, then input is skipped to a structural character.
  assert.deepEqual(parse(latin1('\xc3\xa9 1,')), ["stray '\ufffd'", 'expecting value']);
  // A sequence cut off by the end of input.
  assert.deepEqual(parse(latin1('\xe2\x82')), ["stray '\ufffd'"]);
  // Numbers and keywords as QEMU's lexer reads them.
  // (after "-," the error ate the comma, so " 1e" is skipped up to the next one).
  assert.deepEqual(parse(Buffer.from('01, -, 1e, Abc, %d, [1.5e3, -0, true]')), ["stray '01'", 'expecting value', "stray '-,'", 'expecting value', "stray 'A'", 'expecting value', "stray '%'", 'expecting value', [1500, -0, true]]);
  assert.deepEqual(parse(Buffer.from('1e,')), ["stray '1e,'"]);
});
