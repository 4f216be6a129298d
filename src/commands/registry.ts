/**
 * The QMP command table. A command is a schema of its arguments plus a handler that calls the core
 * and shapes the reply: nothing else. Each commands/<domain>.ts module exports its commands as an
 * array of CommandDef; commands/index.ts collects them.
 */
import type { Members } from '../qapi/schema.js';
import type { Core } from '../core/core.js';

export interface CommandDef {
  readonly name: string;
  /** Argument members, QAPI style ('*' = optional). */
  readonly args: Members;
  /** Accept any argument object unchecked (boxed commands that check their own, e.g. blockdev-add). */
  readonly boxed?: boolean;
  readonly allowOob?: boolean;
  /** Runs the command; its return value is the `return` member ({} when undefined). */
  handler(args: Record<string, unknown>, core: Core): unknown | Promise<unknown>;
}

export function command(name: string, args: Members, handler: CommandDef['handler'], extra: Partial<CommandDef> = {}): CommandDef {
  return { name, args, handler, ...extra };
}
