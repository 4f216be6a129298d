/**
 * object-add and object-del (and --object on the command line) for the user-creatable objects the
 * block layer uses: `throttle-group`, the I/O limits `throttle` nodes share. Checks and messages are
 * QEMU 7.2's.
 */
import { genericError } from '../errors.js';
import { enumOf, object, str, visit, type Members, type Schema, type VisitOptions } from '../qapi/schema.js';
import { idWellFormed } from '../block/graph.js';
import { ThrottleGroup, THROTTLE_LIMITS_MEMBERS, type ThrottleLimits } from '../block/throttle-group.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';

/** ThrottleGroupProperties: `limits`, and the legacy x-… properties (one per limit). */
const THROTTLE_GROUP_MEMBERS: Members = {
  '*limits': object('ThrottleLimits', THROTTLE_LIMITS_MEMBERS),
  ...Object.fromEntries(Object.entries(THROTTLE_LIMITS_MEMBERS).map(([m, s]) => [`*x-${m.slice(1)}`, s])),
};

/** ObjectOptions, for the object types bitmirror has. */
export const OBJECT_OPTIONS: Schema = {
  kind: 'union',
  name: 'ObjectOptions',
  base: { 'qom-type': enumOf('ObjectType', ['throttle-group']), id: str },
  discriminator: 'qom-type',
  variants: { 'throttle-group': THROTTLE_GROUP_MEMBERS },
};

/** user_creatable_add_qapi: check the options, create the object. */
export function addObject(core: Core, options: unknown, visitOpts: VisitOptions = {}): void {
  const o = visit(OBJECT_OPTIONS, options, '', visitOpts) as Record<string, unknown>;
  const id = o.id as string;
  if (!idWellFormed(id)) throw genericError("Parameter 'id' expects an identifier");
  const groups = core.graph.throttleGroups;
  if (groups.has(id)) throw genericError(`attempt to add duplicate property '${id}' to object (type 'container')`);
  const limits: ThrottleLimits = { ...((o.limits as ThrottleLimits | undefined) ?? {}) };
  for (const [k, v] of Object.entries(o)) if (k.startsWith('x-')) limits[k.slice(2)] = v as number;
  groups.add(new ThrottleGroup(id, limits));
}

export const objectCommands: CommandDef[] = [
  command('object-add', {}, (args, core) => addObject(core, args), { boxed: () => OBJECT_OPTIONS }),
  command('object-del', { id: str }, (args, core) => {
    const id = args.id as string;
    const group = core.graph.throttleGroups.get(id);
    if (!group) throw genericError(`object '${id}' not found`);
    if (group.users > 0) throw genericError(`object '${id}' is in use, can not be deleted`);
    core.graph.throttleGroups.delete(id);
    return {};
  }),
];
