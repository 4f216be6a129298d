import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { BlockGraph } from '../../src/block/graph.js';
import { nullDriver } from '../../src/block/drivers/null.js';
import { rawDriver } from '../../src/block/drivers/raw.js';

test('the BlockdevOptions schema is built once and rebuilt when a driver registers', async () => {
  const g = new BlockGraph();
  g.registerDriver(nullDriver);
  const first = g.blockdevOptionsSchema();
  assert.equal(g.blockdevOptionsSchema(), first, 'cached between opens');
  await assert.rejects(g.open({ driver: 'raw', file: { driver: 'null-co' } }), { message: "Parameter 'driver' does not accept value 'raw'" });
  g.registerDriver(rawDriver);
  assert.notEqual(g.blockdevOptionsSchema(), first);
  const n = await g.open({ driver: 'raw', 'node-name': 'r', file: { driver: 'null-co', size: 4096 }, size: 512 });
  assert.equal(n.length(), 512);
  await assert.rejects(g.open({ driver: 'raw', file: 'r', size: -1 }), { message: "Parameter 'size' expects a non-negative number below 2^64" });
  await g.closeAll();
});
