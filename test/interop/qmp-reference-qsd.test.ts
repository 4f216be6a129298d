/**
 * The QEMU 7.2 side of docs/qmp-reference.md (commands/parity.ts's QSD_7_2_COMMANDS) is what the
 * installed qemu-storage-daemon 7.2 reports in query-qmp-schema.
 */
import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import * as path from 'node:path';
import { spawnDaemon } from '../../src/daemon/spawn.js';
import { QSD_7_2_COMMANDS } from '../../src/commands/parity.js';
import { haveQsd, mustRun, tempDir } from '../support/tools.js';

interface SchemaEntry {
  name: string;
  'meta-type': string;
  'arg-type'?: string;
  members?: Array<{ name: string }>;
}

test('QSD_7_2_COMMANDS equals qemu-storage-daemon 7.2\'s commands and their argument names', { skip: !haveQsd && 'no qemu-storage-daemon' }, async () => {
  const version = await mustRun('qemu-storage-daemon', ['--version']);
  if (!/version 7\.2\./.test(version)) return; // the snapshot is of 7.2; another release differs by design
  const { dir, cleanup } = await tempDir();
  const qsd = await spawnDaemon(path.join(dir, 'qsd.sock'), [], 'qemu-storage-daemon');
  try {
    const schema = await qsd.qmp.execute<SchemaEntry[]>('query-qmp-schema');
    const types = new Map(schema.map((e) => [e.name, e]));
    const live: Record<string, string[]> = {};
    for (const e of schema.filter((x) => x['meta-type'] === 'command')) live[e.name] = (types.get(e['arg-type']!)?.members ?? []).map((m) => m.name);
    assert.deepEqual(
      Object.fromEntries(Object.entries(QSD_7_2_COMMANDS).map(([k, v]) => [k, [...v]])),
      Object.fromEntries(Object.keys(live).sort().map((k) => [k, live[k]])),
    );
  } finally {
    await qsd.stop();
    await cleanup();
  }
});
