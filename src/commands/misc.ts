/**
 * Monitor-level commands: query-version, query-commands, query-qmp-schema, quit, and the trace-event
 * state commands.
 */
import { genericError } from '../errors.js';
import { bool, str, type Members, type Schema } from '../qapi/schema.js';
import { command, QMP_CAPABILITIES, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';
import { QEMU_COMPAT_VERSION } from '../base/version.js';

/** Builds query-qmp-schema's SchemaInfo list from the command table (commands, their argument objects, enums, arrays). */
function schemaInfo(commands: CommandDef[], core: Core): unknown[] {
  const out: unknown[] = [];
  const seen = new Set<string>();
  const typeName = (s: Schema): string => {
    switch (s.kind) {
      case 'str':
        return 'str';
      case 'int':
        return s.name;
      case 'number':
        return 'number';
      case 'bool':
        return 'bool';
      case 'null':
        return 'null';
      case 'any':
        return 'any';
      case 'enum':
        if (!seen.has(s.name)) {
          seen.add(s.name);
          out.push({ name: s.name, 'meta-type': 'enum', values: [...s.values], members: s.values.map((v) => ({ name: v })) });
        }
        return s.name;
      case 'array': {
        const el = typeName(s.of);
        const name = `[${el}]`;
        if (!seen.has(name)) {
          seen.add(name);
          out.push({ name, 'meta-type': 'array', 'element-type': el });
        }
        return name;
      }
      case 'object':
        return objectType(s.name, s.members);
      case 'union': {
        if (!seen.has(s.name)) {
          seen.add(s.name);
          const entry: Record<string, unknown> = { name: s.name, 'meta-type': 'object', tag: s.discriminator };
          out.push(entry);
          entry.members = membersInfo(s.base);
          entry.variants = Object.entries(s.variants).map(([tag, m]) => ({ case: tag, type: objectType(`${s.name}-${tag}`, m) }));
        }
        return s.name;
      }
      case 'alternate':
        if (!seen.has(s.name)) {
          seen.add(s.name);
          const entry: Record<string, unknown> = { name: s.name, 'meta-type': 'alternate' };
          out.push(entry);
          entry.members = s.alternatives.map((a) => ({ type: typeName(a) }));
        }
        return s.name;
    }
  };
  const membersInfo = (members: Members) =>
    Object.entries(members).map(([m, s]) => {
      const optional = m.startsWith('*');
      const info: Record<string, unknown> = { name: optional ? m.slice(1) : m, type: typeName(s) };
      if (optional) info.default = null;
      return info;
    });
  const objectType = (name: string, members: Members): string => {
    if (!seen.has(name)) {
      seen.add(name);
      const entry: Record<string, unknown> = { name, 'meta-type': 'object' };
      out.push(entry);
      entry.members = membersInfo(members);
    }
    return name;
  };
  for (const c of commands) {
    const argType = c.boxed ? typeName(c.boxed(core)) : objectType(`${c.name}-arg`, c.args);
    const info: Record<string, unknown> = { name: c.name, 'meta-type': 'command', 'arg-type': argType, 'ret-type': 'any' };
    if (c.allowOob) info['allow-oob'] = true;
    out.push(info);
  }
  return out;
}

/** `all` is the whole command table, given after it is built (query-commands lists itself too). */
export function miscCommands(all: () => CommandDef[]): CommandDef[] {
  return [
    command('query-version', {}, () => QEMU_COMPAT_VERSION),
    command('query-commands', {}, () => [QMP_CAPABILITIES, ...all()].map((c) => ({ name: c.name }))),
    command('query-qmp-schema', {}, (_args, core) => schemaInfo([QMP_CAPABILITIES, ...all()], core)),
    command('quit', {}, (_args, core) => {
      // Reply first, then shut down: QEMU answers quit before it exits.
      setImmediate(() => core.requestShutdown());
      return {};
    }),
    command('trace-event-get-state', { name: str, '*vcpu': { kind: 'int', name: 'int' } }, (args, core) => {
      const name = args.name as string;
      const states = core.trace.getState(name);
      if (states.length === 0 && !/[*?]/.test(name)) throw genericError(`unknown event "${name}"`);
      return states.map((s) => ({ name: s.name, vcpu: false, state: s.state }));
    }),
    command('trace-event-set-state', { name: str, enable: bool, '*ignore-unavailable': bool, '*vcpu': { kind: 'int', name: 'int' } }, (args, core) => {
      const name = args.name as string;
      const matched = core.trace.setState(name, args.enable as boolean);
      if (matched.length === 0 && !/[*?]/.test(name)) throw genericError(`unknown event "${name}"`);
      return {};
    }),
  ];
}
