/**
 * docs/qmp-reference.md, generated from the command table (the argument schemas the daemon checks
 * requests against) and the parity data of commands/parity.ts: every command, its arguments and how
 * each stands against QEMU 7.2 — same, extension, or not yet. scripts/gen-qmp-reference.mjs writes
 * it; test/unit/qmp-reference.test.ts regenerates it and fails when the committed file differs.
 */
import type { Schema } from '../qapi/schema.js';
import type { Core } from '../core/core.js';
import { QMP_CAPABILITIES, type CommandDef } from './registry.js';
import { ARGUMENT_NOTES, COMMAND_NOTES, QSD_7_2_COMMANDS, type Origin, type ParityNote } from './parity.js';

/** QAPI's rule for downstream extensions: `__` + reversed domain + `_` + name. */
export const EXTENSION_PREFIX = '__org.bitmirror_';

export type Parity = 'same' | 'extension' | 'upstream' | 'qemu-system' | 'not yet';

export interface ArgumentRow {
  name: string;
  type: string;
  optional: boolean;
  parity: Parity;
  note?: string;
}

export interface CommandRow {
  name: string;
  parity: Parity;
  /** The command is QEMU 7.2's but some of its arguments are not (extensions, later upstream). */
  extended: boolean;
  note?: string;
  arguments: ArgumentRow[];
  /** A boxed union's variants (blockdev-add's drivers …): listed, not expanded. */
  variants?: { discriminator: string; cases: string[] };
}

/** A schema's type as the reference prints it. */
function typeText(s: Schema): string {
  switch (s.kind) {
    case 'int':
      return s.name;
    case 'enum':
      return `${s.name} (${s.values.join(', ')})`;
    case 'array':
      return `array of ${typeText(s.of)}`;
    case 'object':
    case 'union':
    case 'alternate':
      return s.name;
    default:
      return s.kind;
  }
}

/** The parity of something bitmirror has: QEMU 7.2's, or where it comes from. */
function parityOf(inQemu: boolean, name: string, note: ParityNote | undefined, what: string): Parity {
  if (inQemu) return 'same';
  if (name.startsWith(EXTENSION_PREFIX)) return 'extension';
  const origin: Origin | undefined = note?.origin;
  if (!origin) throw new Error(`${what} '${name}' is not in QEMU 7.2 and not named ${EXTENSION_PREFIX}…: say where it comes from in commands/parity.ts`);
  return origin;
}

/**
 * Every command: bitmirror's (the table, and qmp_capabilities, which the protocol layer answers)
 * and QEMU 7.2's storage daemon's that bitmirror lacks, sorted by name.
 */
export function commandRows(commands: readonly CommandDef[], core: Core): CommandRow[] {
  const rows: CommandRow[] = [];
  const tableNames = new Set(commands.map((c) => c.name));
  for (const name of Object.keys(COMMAND_NOTES)) {
    if (!tableNames.has(name) && !(name in QSD_7_2_COMMANDS)) throw new Error(`commands/parity.ts has a note on '${name}', which is no command`);
  }
  for (const [cmd, notes] of Object.entries(ARGUMENT_NOTES)) {
    const def = commands.find((c) => c.name === cmd);
    if (!def) throw new Error(`commands/parity.ts has argument notes on '${cmd}', which bitmirror does not have`);
    for (const arg of Object.keys(notes)) {
      if (!(arg in def.args) && !(`*${arg}` in def.args)) throw new Error(`commands/parity.ts has a note on '${cmd}' argument '${arg}', which it does not take`);
    }
  }
  for (const c of [QMP_CAPABILITIES, ...commands]) {
    const qemuArgs = QSD_7_2_COMMANDS[c.name];
    const inQemu = qemuArgs !== undefined;
    const note = COMMAND_NOTES[c.name];
    const parity = parityOf(inQemu, c.name, note, 'command');
    let members = c.args;
    let variants: CommandRow['variants'];
    if (c.boxed) {
      const boxed = c.boxed(core);
      if (boxed.kind === 'union') {
        members = boxed.base;
        variants = { discriminator: boxed.discriminator, cases: Object.keys(boxed.variants).sort() };
      } else if (boxed.kind === 'object') {
        members = boxed.members;
      }
    }
    const args: ArgumentRow[] = Object.entries(members).map(([m, s]) => {
      const optional = m.startsWith('*');
      const name = optional ? m.slice(1) : m;
      const argNote = ARGUMENT_NOTES[c.name]?.[name];
      // An argument of a command QEMU 7.2 lacks altogether shares the command's parity.
      const argParity = inQemu ? parityOf(qemuArgs.includes(name), name, argNote, `${c.name} argument`) : name.startsWith(EXTENSION_PREFIX) ? 'extension' : parity;
      return { name, type: typeText(s), optional, parity: argParity, note: argNote?.note };
    });
    for (const name of qemuArgs ?? []) {
      if (!args.some((a) => a.name === name)) args.push({ name, type: '', optional: true, parity: 'not yet' });
    }
    const extended = inQemu && args.some((a) => a.parity !== 'same');
    rows.push({ name: c.name, parity, extended, note: note?.note, arguments: args, variants });
  }
  for (const [name, qemuArgs] of Object.entries(QSD_7_2_COMMANDS)) {
    if (rows.some((r) => r.name === name)) continue;
    rows.push({
      name,
      parity: 'not yet',
      extended: false,
      note: COMMAND_NOTES[name]?.note,
      arguments: qemuArgs.map((a) => ({ name: a, type: '', optional: false, parity: 'not yet' })),
    });
  }
  return rows.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

const PARITY_TEXT: Record<Parity, string> = {
  same: 'Same as QEMU 7.2',
  extension: 'A bitmirror extension',
  upstream: 'Added by upstream QEMU after 7.2',
  'qemu-system': "As QEMU 7.2's system emulator has it (its storage daemon has not)",
  'not yet': 'Not yet in bitmirror (QEMU 7.2 has it)',
};

function cell(text: string): string {
  return text.replace(/\|/g, '\\|');
}

/** The markdown of docs/qmp-reference.md. */
export function qmpReferenceMarkdown(commands: readonly CommandDef[], core: Core): string {
  const rows = commandRows(commands, core);
  const out: string[] = [];
  out.push('# QMP reference');
  out.push('');
  out.push('<!-- Generated by scripts/gen-qmp-reference.mjs from the command schemas (src/commands/) and');
  out.push('     src/commands/parity.ts. Do not edit: run `npm run docs:qmp`. A test fails when this file is stale. -->');
  out.push('');
  out.push("Every QMP command bitmirror answers, and every command of QEMU 7.2's `qemu-storage-daemon` it does not");
  out.push('answer yet, with their arguments. Parity is against QEMU 7.2 (what `qemu-storage-daemon` 7.2 reports');
  out.push('in `query-qmp-schema`):');
  out.push('');
  out.push('- **same**: QEMU 7.2 has the command (or argument) under this name;');
  out.push(`- **extension**: bitmirror's own — named \`${EXTENSION_PREFIX}…\` (QAPI's rule for downstream extensions) — or`);
  out.push('  from a series upstream never merged (the note says which);');
  out.push('- **upstream**: upstream QEMU added it after 7.2 (the note says when);');
  out.push("- **qemu-system**: QEMU 7.2 has it in the system emulator's monitor, not in `qemu-storage-daemon`;");
  out.push('- **not yet**: QEMU 7.2 has it, bitmirror does not.');
  out.push('');
  out.push('Behaviour (defaults, errors and their messages, events) follows QEMU 7.2 where the command is the same;');
  out.push('the notes say where it differs on purpose (see also README.md).');
  out.push('');
  const count = (p: Parity) => rows.filter((r) => r.parity === p).length;
  out.push(
    `${rows.length} commands: ${count('same')} same (${rows.filter((r) => r.extended).length} of them with extra arguments), ` +
      `${count('extension')} extension, ${count('upstream')} upstream, ${count('qemu-system')} qemu-system, ${count('not yet')} not yet.`,
  );
  out.push('');
  out.push('| command | parity | note |');
  out.push('|---|---|---|');
  for (const r of rows) {
    const parity = r.parity === 'same' && r.extended ? 'same, with extra arguments' : r.parity;
    out.push(`| [\`${r.name}\`](#${r.name.replace(/[^a-z0-9_-]/gi, '').toLowerCase()}) | ${parity} | ${cell(r.note ?? '')} |`);
  }
  out.push('');
  out.push('## Commands');
  for (const r of rows) {
    out.push('');
    out.push(`### ${r.name}`);
    out.push('');
    out.push(`${PARITY_TEXT[r.parity]}${r.extended ? ', with extra arguments' : ''}.${r.note ? ` ${r.note}` : ''}`);
    out.push('');
    if (r.arguments.length === 0) {
      out.push('No arguments.');
    } else {
      out.push('| argument | type | parity | note |');
      out.push('|---|---|---|---|');
      for (const a of r.arguments) {
        const type = r.parity === 'not yet' || a.parity === 'not yet' ? '' : `${a.type}${a.optional ? ', optional' : ''}`;
        out.push(`| \`${a.name}\` | ${cell(type)} | ${a.parity} | ${cell(a.note ?? '')} |`);
      }
    }
    if (r.variants) {
      out.push('');
      out.push(`More members by \`${r.variants.discriminator}\`: ${r.variants.cases.map((c) => `\`${c}\``).join(', ')}.`);
    }
  }
  return out.join('\n') + '\n';
}
