import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import * as path from 'node:path';
import { qmpReference } from '../../src/daemon/qmp-reference.js';
import { Core } from '../../src/core/core.js';
import { allCommands } from '../../src/commands/index.js';
import { commandRows, EXTENSION_PREFIX } from '../../src/commands/reference.js';
import { QSD_7_2_COMMANDS } from '../../src/commands/parity.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

test('docs/qmp-reference.md is what the command schemas generate (run `npm run docs:qmp` after changing a command)', async () => {
  const committed = await readFile(path.join(ROOT, 'docs/qmp-reference.md'), 'utf8');
  assert.equal(committed, qmpReference(), 'docs/qmp-reference.md is stale: run `npm run docs:qmp` and commit it');
});

test('QMP reference: every command of the table and of QEMU 7.2 is listed once, with the parity its name and data give', () => {
  const commands = allCommands();
  const rows = commandRows(commands, new Core());
  const names = rows.map((r) => r.name);
  assert.equal(new Set(names).size, names.length);
  for (const c of commands) assert.ok(names.includes(c.name), c.name);
  for (const c of Object.keys(QSD_7_2_COMMANDS)) assert.ok(names.includes(c), c);
  for (const r of rows) {
    const inTable = r.name === 'qmp_capabilities' || commands.some((c) => c.name === r.name);
    assert.equal(r.parity === 'not yet', !inTable, r.name);
    if (r.name in QSD_7_2_COMMANDS && inTable) assert.equal(r.parity, 'same', r.name);
    for (const a of r.arguments) {
      if (a.name.startsWith(EXTENSION_PREFIX)) assert.equal(a.parity, 'extension', `${r.name} ${a.name}`);
      if (r.name in QSD_7_2_COMMANDS && inTable && QSD_7_2_COMMANDS[r.name].includes(a.name)) assert.equal(a.parity, 'same', `${r.name} ${a.name}`);
    }
  }
  // The mirror's downstream members are found from their names, without a note.
  const mirror = rows.find((r) => r.name === 'blockdev-mirror')!;
  assert.equal(mirror.arguments.find((a) => a.name === '__org.bitmirror_copy-offload')?.parity, 'extension');
  // One mirror job behind two commands: an argument both take reads the same in both.
  const driveMirror = rows.find((r) => r.name === 'drive-mirror')!;
  for (const a of driveMirror.arguments) {
    const same = mirror.arguments.find((b) => b.name === a.name);
    if (same && a.note) assert.deepEqual([a.parity, a.note], [same.parity, same.note], `drive-mirror ${a.name}`);
  }
  assert.ok(driveMirror.arguments.some((a) => a.name === 'bitmap-mode' && a.note));
});

test('QMP reference: a command or argument beyond QEMU 7.2 without a downstream name or a note is refused', () => {
  const commands = allCommands();
  const core = new Core();
  const unknownCommand = { name: 'x-made-up', args: {}, handler: () => ({}) };
  assert.throws(() => commandRows([...commands, unknownCommand], core), /'x-made-up' is not in QEMU 7.2 and not named __org\.bitmirror_…/);
  const ours = { name: '__org.bitmirror_thing', args: { '*flag': { kind: 'bool' as const } }, handler: () => ({}) };
  assert.equal(commandRows([...commands, ours], core).find((r) => r.name === ours.name)?.parity, 'extension');
  const quit = commands.find((c) => c.name === 'quit')!;
  const extraArg = { ...quit, args: { '*when': { kind: 'str' as const } } };
  assert.throws(() => commandRows([...commands.filter((c) => c !== quit), extraArg], core), /quit argument 'when' is not in QEMU 7\.2/);
});
