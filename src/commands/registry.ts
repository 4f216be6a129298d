/**
 * The QMP command table. A command is a schema of its arguments plus a handler that calls the core
 * and shapes the reply: nothing else. Each commands/<domain>.ts module exports its commands as an
 * array of CommandDef; commands/index.ts collects them.
 */
import type { Members, Schema } from '../qapi/schema.js';
import type { Core } from '../core/core.js';

export interface CommandDef {
  readonly name: string;
  /** Argument members, QAPI style ('*' = optional). */
  readonly args: Members;
  /**
   * A boxed command's argument type (a union such as BlockdevOptions): the handler checks its arguments
   * itself against it, and query-qmp-schema shows it. A function, because the type can depend on the
   * daemon (the registered block drivers).
   */
  readonly boxed?: (core: Core) => Schema;
  readonly allowOob?: boolean;
  /** Runs the command; its return value is the `return` member ({} when undefined). */
  handler(args: Record<string, unknown>, core: Core): unknown | Promise<unknown>;
}

export function command(name: string, args: Members, handler: CommandDef['handler'], extra: Partial<CommandDef> = {}): CommandDef {
  return { name, args, handler, ...extra };
}

/**
 * qmp_capabilities as a table entry, for the lists that name every command (query-commands,
 * query-qmp-schema, the QMP reference). The protocol layer answers it (qmp/server.ts), before and
 * outside the command table.
 */
export const QMP_CAPABILITIES: CommandDef = {
  name: 'qmp_capabilities',
  args: { '*enable': { kind: 'array', of: { kind: 'enum', name: 'QMPCapability', values: ['oob'] } } },
  handler: () => ({}),
};
