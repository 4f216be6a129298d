/**
 * The QOM commands against qemu-storage-daemon 7.2: the same script replayed against both gives the
 * same replies — the tree (/, /chardevs, /objects appearing with the first object), paths absolute
 * and partial (unique, ambiguous, not found), every property of a throttle group and a secret with
 * its type, qom-get and qom-set of them with QEMU's messages (a group's `limits` merged and checked,
 * its x-… properties fixed after creation; a secret's properties changed, its value not), and the
 * types and their properties as qom-list-types/qom-list-properties show them (QEMU's list filtered to
 * the types bitmirror has, in QEMU's order). Where the two differ on purpose (children in QEMU's hash
 * order; a secret's `data` not readable in bitmirror), the test says so.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { haveQsd, type Env } from '../support/daemon.js';
import { replayOn, type Replay } from '../support/qmp-replay.js';

const skip = !haveQsd && 'qemu-storage-daemon not installed';
type Program = 'bitmirror' | 'qemu-storage-daemon';
type Prop = { name: string; type: string };

const replay = (program: Program, script: (r: Replay, env: Env) => Promise<void>) => replayOn(program, 'qom', script);

/** qom-list with the children sorted by name (QEMU lists them in its hash table's order). */
async function listSorted(r: Replay, path: string): Promise<void> {
  const rep = await r.request('qom-list', { path });
  const list = (rep ?? []) as Prop[];
  const props = list.filter((p) => !p.type.startsWith('child<'));
  const children = list.filter((p) => p.type.startsWith('child<')).sort((a, b) => a.name.localeCompare(b.name));
  if (rep !== undefined) r.replies[r.replies.length - 1] = ['qom-list', [...props, ...children]];
}

test('qom-list, qom-get, qom-set over /, /chardevs and /objects, as qemu-storage-daemon 7.2', { skip }, async () => {
  const script = async (r: Replay) => {
    await r.request('qom-list', { path: '/' });
    await r.request('qom-list', { path: '/objects' });
    await r.request('qom-get', { path: '/', property: 'type' });
    await r.request('qom-list', { path: '/chardevs' });
    await r.request('qom-list', { path: '/chardevs/mon0' });
    await r.request('qom-get', { path: '/chardevs/mon0', property: 'addr' });
    await r.request('qom-get', { path: '/chardevs/mon0', property: 'connected' });
    await r.request('qom-set', { path: '/chardevs/mon0', property: 'connected', value: false });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 'tg', limits: { 'iops-total': 100, 'bps-read': 1000 } });
    await r.request('object-add', { 'qom-type': 'secret', id: 'sec', data: 'aGVsbG8=', format: 'base64' });
    await r.request('object-add', { 'qom-type': 'secret', id: 'sec2', file: '/dev/null' });
    await r.request('qom-list', { path: '/' });
    await listSorted(r, '/objects');
    await r.request('qom-list', { path: '/objects/tg' });
    await r.request('qom-list', { path: '/objects/sec' });
    // Paths: partial ones anywhere in the tree, trailing and doubled slashes; no '..'.
    for (const path of ['tg', 'objects/sec', 'sec/', '//objects//tg', '/objects/../objects', '', '/objects/tg/type', 'nope']) await r.request('qom-get', { path, property: 'type' });
    await r.request('qom-get', { path: '/objects', property: 'tg' });
    await r.request('qom-get', { path: '/', property: 'objects' });
    // A secret and a chardev of the same id: a partial path is ambiguous.
    await r.request('object-add', { 'qom-type': 'secret', id: 'mon0', data: 'x' });
    await r.request('qom-list', { path: 'mon0' });
    await r.request('qom-get', { path: 'mon0', property: 'type' });
    await r.request('qom-set', { path: 'mon0', property: 'format', value: 'raw' });
    await r.request('qom-list', { path: 'nope' });
    await r.request('object-del', { id: 'mon0' });
    // Throttle group properties.
    await r.request('qom-get', { path: '/objects/tg', property: 'limits' });
    await r.request('qom-get', { path: '/objects/tg', property: 'x-iops-total' });
    await r.request('qom-get', { path: '/objects/tg', property: 'x-bps-read-max-length' });
    await r.request('qom-get', { path: '/objects/tg', property: 'nope' });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { 'iops-total': 200 } });
    await r.request('qom-get', { path: '/objects/tg', property: 'limits' });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { 'iops-total-max': 100 } });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { 'iops-read': 100 } });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { 'iops-total': -1 } });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { 'bps-total-max-length': 5 } });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { nope: 1 } });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { 'iops-total': 'x' } });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: 5 });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: { 'iops-total': 0, 'bps-write': 10, 'bps-write-max': 20, 'bps-write-max-length': 3 } });
    await r.request('qom-set', { path: '/objects/tg', property: 'limits', value: {} });
    await r.request('qom-get', { path: '/objects/tg', property: 'limits' });
    await r.request('qom-set', { path: '/objects/tg', property: 'x-iops-total', value: 5 });
    await r.request('qom-set', { path: '/objects/tg', property: 'x-iops-total', value: 'x' });
    await r.request('qom-set', { path: '/objects/tg', property: 'type', value: 'x' });
    await r.request('qom-set', { path: '/objects', property: 'tg', value: 'x' });
    await r.request('qom-set', { path: '/objects/nope', property: 'type', value: 'x' });
    // Secret properties: readable but `data`; writable but the value stays.
    for (const property of ['type', 'format', 'keyid', 'iv', 'file', 'loaded']) await r.request('qom-get', { path: '/objects/sec', property });
    await r.request('qom-get', { path: '/objects/sec2', property: 'file' });
    await r.request('qom-set', { path: '/objects/sec', property: 'format', value: 'raw' });
    await r.request('qom-get', { path: '/objects/sec', property: 'format' });
    await r.request('qom-set', { path: '/objects/sec', property: 'format', value: 'hex' });
    await r.request('qom-set', { path: '/objects/sec', property: 'keyid', value: 'k' });
    await r.request('qom-get', { path: '/objects/sec', property: 'keyid' });
    await r.request('qom-set', { path: '/objects/sec', property: 'data', value: 1 });
    await r.request('qom-set', { path: '/objects/sec', property: 'loaded', value: true });
    await r.request('qom-set', { path: '/objects/sec', property: 'nope', value: true });
    await r.request('object-del', { id: 'tg' });
    await r.request('object-del', { id: 'sec' });
    await r.request('object-del', { id: 'sec2' });
    await r.request('qom-list', { path: '/objects' });
    // Creating a group: `limits` and x-… properties are set in QEMU's QDict order, a later one wins.
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 't1', 'x-iops-total': -1 });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 't1', 'x-iops-total-max-length': 2 ** 32, 'x-iops-total-max': 10, 'x-iops-total': 5 });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 't1', 'x-iops-total-max-length': 0 });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 't1', 'x-iops-total': 10 ** 15 + 1 });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 't1', 'x-bps-read': 5, limits: { 'bps-read': 7 } });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 't2', limits: { 'iops-total': 7, 'bps-write': 3 }, 'x-iops-total': 5, 'x-bps-total': 9 });
    for (const id of ['t1', 't2']) await r.request('qom-get', { path: `/objects/${id}`, property: 'limits' });
    await r.request('object-add', { 'qom-type': 'throttle-group', id: 't2', 'x-iops-total': -1 });
  };
  const theirs = await replay('qemu-storage-daemon', script);
  const ours = await replay('bitmirror', script);
  for (let i = 0; i < Math.max(ours.length, theirs.length); i++) assert.deepEqual(ours[i], theirs[i], `step ${i}`);
});

test('qom-get of a secret\'s data: QEMU returns it, bitmirror never puts a secret in a reply', { skip }, async () => {
  const replies = await replay('bitmirror', async (r) => {
    await r.request('object-add', { 'qom-type': 'secret', id: 'sec', data: 'letmein' });
    await r.request('qom-get', { path: '/objects/sec', property: 'data' });
  });
  assert.deepEqual(replies[1], ['qom-get', { class: 'GenericError', desc: "Property 'secret.data' is not readable" }]);
  assert.doesNotMatch(JSON.stringify(replies), /letmein/);
});

test('qom-list-types and qom-list-properties: the types bitmirror has, as qemu-storage-daemon 7.2 shows them', { skip }, async () => {
  const queries: Array<Record<string, unknown> | undefined> = [undefined, { abstract: true }, { implements: 'user-creatable' }, { implements: 'user-creatable', abstract: true }, { implements: 'secret_common' }, { implements: 'secret_common', abstract: true }, { implements: 'chardev', abstract: true }, { implements: 'object', abstract: false }, { implements: 'interface', abstract: true }, { implements: 'nope' }];
  const typenames = ['object', 'container', 'secret', 'secret_common', 'throttle-group', 'chardev', 'chardev-fd', 'chardev-socket', 'chardev-stdio', 'user-creatable', 'interface', 'nope'];
  const script = async (r: Replay) => {
    for (const q of queries) await r.request('qom-list-types', q);
    for (const typename of typenames) await r.request('qom-list-properties', { typename });
  };
  const theirs = await replay('qemu-storage-daemon', script);
  const ours = await replay('bitmirror', script);
  // bitmirror lists the types it has: QEMU's lists, less the types bitmirror does not have, in QEMU's order.
  const have = new Set(((ours[1] as [string, Array<{ name: string }>])[1]).map((t) => t.name));
  assert.ok(have.has('secret') && have.has('throttle-group') && have.has('object'));
  for (let i = 0; i < queries.length; i++) {
    const [cmd, list] = theirs[i] as [string, Array<{ name: string }>];
    assert.deepEqual(ours[i], [cmd, list.filter((t) => have.has(t.name))], `qom-list-types ${JSON.stringify(queries[i])}`);
  }
  for (let i = queries.length; i < theirs.length; i++) assert.deepEqual(ours[i], theirs[i], `qom-list-properties ${typenames[i - queries.length]}`);
});
