/**
 * The QMP protocol as QEMU speaks it: greeting, negotiation and its refusals, id echo, dispatch
 * errors, JSON stream framing (split, joined, newline inside), JSON parse errors, several clients,
 * a client vanishing mid-command, and garbage for every registered command.
 */
import { test, before, after } from 'node:test';
import * as assert from 'node:assert/strict';
import * as net from 'node:net';
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnDaemon, type SpawnedDaemon } from '../../src/daemon/spawn.js';
import { JsonStreamParser } from '../../src/qmp/json.js';
import { poll } from '../support/wait.js';

let dir: string;
let d: SpawnedDaemon;

before(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bm-qmp-'));
  d = await spawnDaemon(path.join(dir, 'qmp.sock'));
});
after(async () => {
  const code = await d.stop();
  assert.equal(code, 0, d.stderr());
  assert.doesNotMatch(d.stderr(), /internal error/);
  await fsp.rm(dir, { recursive: true, force: true });
});

/** A raw connection: send text, collect every JSON message the server sends back. */
async function rawSession(): Promise<{ send: (s: string) => void; next: (n?: number) => Promise<Array<Record<string, unknown>>>; close: () => void; end: () => void }> {
  const sock = net.createConnection(d.socket);
  const msgs: Array<Record<string, unknown>> = [];
  let wake: (() => void) | undefined;
  const parser = new JsonStreamParser((m) => {
    if (m.ok) msgs.push(m.value as Record<string, unknown>);
    wake?.();
  });
  sock.setEncoding('utf8');
  sock.on('data', (s: string) => parser.feed(s));
  await new Promise((r) => sock.once('connect', r));
  let consumed = 0;
  return {
    send: (s) => sock.write(s),
    async next(n = 1) {
      const deadline = Date.now() + 10_000;
      while (msgs.length - consumed < n) {
        if (Date.now() > deadline) throw new Error(`timeout; got ${JSON.stringify(msgs.slice(consumed))}`);
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, 100);
        });
      }
      const out = msgs.slice(consumed, consumed + n);
      consumed += n;
      return out;
    },
    close: () => sock.destroy(),
    end: () => sock.end(),
  };
}

test('greeting and capability negotiation behave as QEMU', async () => {
  const s = await rawSession();
  const [greeting] = await s.next();
  assert.deepEqual(Object.keys(greeting), ['QMP']);
  const qmp = greeting.QMP as { version: { qemu: Record<string, number> }; capabilities: string[] };
  assert.deepEqual(qmp.capabilities, ['oob']);
  assert.equal(typeof qmp.version.qemu.major, 'number');
  s.send('{"execute":"query-version"}');
  assert.deepEqual(await s.next(), [{ error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" } }]);
  s.send('{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}');
  assert.deepEqual(await s.next(), [{ error: { class: 'GenericError', desc: "Parameter 'null' does not accept value 'foo'" } }]);
  s.send('{"execute":"qmp_capabilities","id":"neg"}');
  assert.deepEqual(await s.next(), [{ return: {}, id: 'neg' }]);
  s.send('{"execute":"qmp_capabilities"}');
  assert.deepEqual(await s.next(), [{ error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' } }]);
  // Arguments are checked first (qemu-storage-daemon 7.2 replies so).
  s.send('{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}');
  assert.deepEqual(await s.next(), [{ error: { class: 'GenericError', desc: "Parameter 'null' does not accept value 'x'" } }]);
  s.close();
});

test('dispatch errors, id echo and JSON framing match QEMU 7.2', async () => {
  const s = await rawSession();
  await s.next();
  s.send('{"execute":"qmp_capabilities"}');
  await s.next();
  const cases: Array<[string, Record<string, unknown>]> = [
    ['{"execute":"query-version","id":{"a":[1,2]}}', { id: { a: [1, 2] } }],
    ['[1,2]', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
    ['"abc"', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
    ['{"execute":1}', { error: { class: 'GenericError', desc: "QMP input member 'execute' must be a string" } }],
    ['{"foo":1}', { error: { class: 'GenericError', desc: "QMP input member 'foo' is unexpected" } }],
    ['{"id":7}', { error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" }, id: 7 }],
    ['{"execute":"query-version","arguments":[]}', { error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } }],
    ['{"execute":"nope","id":5}', { error: { class: 'CommandNotFound', desc: 'The command nope has not been found' }, id: 5 }],
    ['{"execute":"query-version","arguments":{"x":1}}', { error: { class: 'GenericError', desc: "Parameter 'x' is unexpected" } }],
    ['{"exec-oob":"query-version"}', { error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" } }],
    ['{"execute":"query-version",}', { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } }],
    ['{"execute" "query-version"}', { error: { class: 'GenericError', desc: 'JSON parse error, missing : in object pair' } }],
    ['{"execute":"query-version","id":tru}', { error: { class: 'GenericError', desc: "JSON parse error, invalid keyword 'tru'" } }],
    ['{"execute":"query-version","execute":"quit"}', { error: { class: 'GenericError', desc: 'JSON parse error, duplicate key' } }],
    ['[}', { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } }],
    ["{'execute': 'query-version', 'id': 'sq'}", { id: 'sq' }],
  ];
  for (const [input, expected] of cases) {
    s.send(input);
    const [reply] = await s.next();
    if ('error' in expected) assert.deepEqual(reply, expected, input);
    else {
      assert.ok('return' in reply, input);
      assert.deepEqual(reply.id, expected.id, input);
    }
  }
  // A message split across writes, two in one write, a newline inside one.
  s.send('{"execute":');
  await new Promise((r) => setTimeout(r, 50));
  s.send(' "query-version", "id": 1}{"execute":"query-version","id":2}');
  const two = await s.next(2);
  assert.deepEqual(two.map((m) => m.id), [1, 2]);
  s.send('{"execute":\n"query-version",\n"id": 3}\n');
  assert.equal((await s.next())[0].id, 3);
  // A stray closer after a good message: the good one is answered, then a parse error.
  s.send('{"execute":"query-version","id":4}}');
  const [good, bad] = await s.next(2);
  assert.equal(good.id, 4);
  assert.deepEqual(bad, { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } });
  s.close();
});

test('several clients at once; a client that vanishes mid-command harms nothing', async () => {
  const img = path.join(dir, 'v.raw');
  await fsp.writeFile(img, Buffer.alloc(4 << 20));
  const a = await rawSession();
  await a.next();
  a.send('{"execute":"qmp_capabilities"}');
  await a.next();
  a.send(JSON.stringify({ execute: 'blockdev-add', arguments: { driver: 'raw', 'node-name': 'vanish', file: { driver: 'file', filename: img } } }));
  await a.next();
  // Send the write and hang up at once (end() flushes what was written; destroy() could drop it).
  a.send('{"execute":"human-monitor-command","arguments":{"command-line":"qemu-io vanish \\"write -P 0x5a 0 4M\\""}}');
  a.end();
  const b = d.qmp;
  // The write is finished by the daemon even though its client is gone; poll until it is visible.
  await poll("the vanished client's write", async () => {
    const nodes = await b.execute<Array<{ 'node-name': string }>>('query-named-block-nodes');
    if (!nodes.some((n) => n['node-name'] === 'vanish')) return false;
    return !(await b.hmpOutput('qemu-io vanish "read -P 0x5a 0 4M"')).includes('Pattern verification failed');
  }, undefined, 50);
  await b.execute('blockdev-del', { 'node-name': 'vanish' });
  const data = await fsp.readFile(img);
  assert.ok(data.every((x) => x === 0x5a));
});

test('garbage for every registered command: an error reply, nothing changed, daemon still answers', async () => {
  const names = (await d.qmp.execute<Array<{ name: string }>>('query-commands')).map((c) => c.name);
  const before = JSON.stringify(await d.qmp.execute('query-named-block-nodes'));
  const skip = new Set(['quit', 'qmp_capabilities']);
  const garbage: unknown[] = [
    { __bogus: 1 },
    { 'node-name': 42, name: [], device: {}, id: true, bitmaps: 'x', 'job-id': 1.5, target: null, 'command-line': 7, enable: 'yes', options: 'x', actions: {} },
  ];
  for (const name of names) {
    if (skip.has(name)) continue;
    for (const args of garbage) {
      const reply = await d.qmp.request(name, args as Record<string, unknown>);
      assert.ok('error' in reply, `${name} accepted ${JSON.stringify(args)}: ${JSON.stringify(reply)}`);
      const err = reply.error as { class: string; desc: string };
      assert.equal(typeof err.desc, 'string');
      assert.ok(err.desc.length > 0);
    }
    // Truncated JSON for this command from a client that then goes away.
    const t = await rawSession();
    await t.next();
    t.send('{"execute":"qmp_capabilities"}');
    await t.next();
    t.send(`{"execute":"${name}","arguments":{"node-name":"x`);
    t.close();
    assert.ok('return' in (await d.qmp.request('query-version')));
  }
  assert.equal(JSON.stringify(await d.qmp.execute('query-named-block-nodes')), before);
  assert.ok('return' in (await d.qmp.request('query-version')));
});

test('query-qmp-schema lists every command with its argument names', async () => {
  const schema = await d.qmp.execute<Array<Record<string, unknown>>>('query-qmp-schema');
  const byName = new Map(schema.map((e) => [e.name as string, e]));
  const cmd = byName.get('blockdev-del')!;
  assert.equal(cmd['meta-type'], 'command');
  const argType = byName.get(cmd['arg-type'] as string)!;
  assert.deepEqual((argType.members as Array<{ name: string }>).map((m) => m.name), ['node-name']);
  // Every command, qmp_capabilities too (QEMU lists it, with its 'enable' argument).
  const names = (await d.qmp.execute<Array<{ name: string }>>('query-commands')).map((c) => c.name);
  for (const n of names) assert.ok(byName.get(n)?.['meta-type'] === 'command', n);
  const caps = byName.get(byName.get('qmp_capabilities')!['arg-type'] as string)!;
  assert.deepEqual(caps.members, [{ name: 'enable', default: null, type: '[QMPCapability]' }]);
  // blockdev-add's argument type is the BlockdevOptions union, so tools can probe driver options.
  const add = byName.get('blockdev-add')!;
  const union = byName.get(add['arg-type'] as string)!;
  assert.equal(union.tag, 'driver');
  const variants = union.variants as Array<{ case: string; type: string }>;
  assert.ok(variants.some((v) => v.case === 'qcow2'));
  const qcow2 = byName.get(variants.find((v) => v.case === 'qcow2')!.type)!;
  assert.ok((qcow2.members as Array<{ name: string }>).some((m) => m.name === 'backing'));
  const driverEnum = byName.get((union.members as Array<{ name: string; type: string }>).find((m) => m.name === 'driver')!.type)!;
  assert.ok((driverEnum.values as string[]).includes('blkdebug'));
});

test('a client pipelining hundreds of commands gets every reply, in order', async () => {
  const s = await rawSession();
  await s.next();
  s.send('{"execute":"qmp_capabilities"}');
  await s.next();
  const n = 500;
  let batch = '';
  for (let i = 0; i < n; i++) batch += `{"execute":"query-version","id":${i}}`;
  s.send(batch);
  const replies = await s.next(n);
  assert.deepEqual(
    replies.map((r) => r.id),
    Array.from({ length: n }, (_, i) => i),
  );
  assert.ok(replies.every((r) => 'return' in r));
  s.close();
});
