/**
 * object-add and object-del (and --object on the command line) for the user-creatable objects the
 * block layer uses: `throttle-group`, the I/O limits `throttle` nodes share, and `secret`, the
 * passwords and keys drivers look up by id (rbd's key-secret). Checks and messages are QEMU 7.2's.
 */
import { genericError } from '../errors.js';
import { bool, enumOf, object, str, visit, type Members, type Schema, type VisitOptions } from '../qapi/schema.js';
import { idWellFormed } from '../block/graph.js';
import { ThrottleGroup, THROTTLE_LIMITS_MEMBERS, type ThrottleLimits } from '../block/throttle-group.js';
import { loadSecret, type SecretProperties } from '../base/secret.js';
import { qdictOrder } from '../base/qdict.js';
import { command, type CommandDef } from './registry.js';
import type { Core } from '../core/core.js';

/** ThrottleGroupProperties: `limits`, and the legacy x-… properties (one per limit). */
const THROTTLE_GROUP_MEMBERS: Members = {
  '*limits': object('ThrottleLimits', THROTTLE_LIMITS_MEMBERS),
  ...Object.fromEntries(Object.entries(THROTTLE_LIMITS_MEMBERS).map(([m, s]) => [`*x-${m.slice(1)}`, s])),
};

export const SECRET_FORMAT = enumOf('QCryptoSecretFormat', ['raw', 'base64']);

/** SecretProperties (with SecretCommonProperties' members first, as QEMU 7.2's schema lists them). */
const SECRET_MEMBERS: Members = {
  '*loaded': bool,
  '*format': SECRET_FORMAT,
  '*keyid': str,
  '*iv': str,
  '*data': str,
  '*file': str,
};

/** ObjectOptions, for the object types bitmirror has. */
export const OBJECT_OPTIONS: Schema = {
  kind: 'union',
  name: 'ObjectOptions',
  base: { 'qom-type': enumOf('ObjectType', ['secret', 'throttle-group']), id: str },
  discriminator: 'qom-type',
  variants: { secret: SECRET_MEMBERS, 'throttle-group': THROTTLE_GROUP_MEMBERS },
};

const duplicate = (id: string) => genericError(`attempt to add duplicate property '${id}' to object (type 'container')`);

/** user_creatable_add_qapi: check the options, set the properties, enter the object, complete it. */
export async function addObject(core: Core, options: unknown, visitOpts: VisitOptions = {}): Promise<void> {
  const o = visit(OBJECT_OPTIONS, options, '', visitOpts) as Record<string, unknown>;
  const id = o.id as string;
  if (!idWellFormed(id)) throw genericError("Parameter 'id' expects an identifier");
  // `loaded` is still in 7.2's schema (deprecated) but has no setter any more.
  if (o['qom-type'] === 'secret' && o.loaded !== undefined) throw genericError("Property 'secret.loaded' is not writable");
  // The properties are set before the object enters /objects: their errors come first.
  const keys = typeof options === 'object' && options !== null ? Object.keys(options) : [];
  const limits = o['qom-type'] === 'throttle-group' ? throttleGroupLimits(o, keys) : undefined;
  const objects = core.graph.objects;
  objects.containerCreated = true;
  if (objects.has(id)) throw duplicate(id);
  if (o['qom-type'] === 'secret') {
    const props: SecretProperties = {};
    for (const k of ['format', 'keyid', 'iv', 'data', 'file'] as const) if (o[k] !== undefined) (props as Record<string, unknown>)[k] = o[k];
    const secret = await loadSecret(id, props, (keyid) => objects.secretValue(keyid));
    if (objects.has(id)) throw duplicate(id); // another object-add took the id while the file was read
    objects.add(secret);
    return;
  }
  objects.add(new ThrottleGroup(id, limits!));
}

/**
 * A new group's limits from `limits` and the x-… properties, set in the order QEMU's QDict of the
 * options holds them (a later one overrides: `limits` merges into what is set, an x-… property sets
 * one value, checked as QEMU 7.2's throttle_group_set does); the whole is checked when the group is made.
 */
function throttleGroupLimits(o: Record<string, unknown>, keys: string[]): ThrottleLimits {
  let limits: ThrottleLimits = {};
  for (const k of qdictOrder(keys.filter((key) => key === 'limits' || key.startsWith('x-')))) {
    if (k === 'limits') {
      limits = { ...limits, ...(o.limits as ThrottleLimits) };
      continue;
    }
    const v = o[k] as number;
    if (v < 0) throw genericError('Property values cannot be negative');
    if (k.endsWith('-max-length') && v > 0xffffffff) throw genericError(`${k} value must be in therange [0, 4294967295]`);
    limits[k.slice(2)] = v;
  }
  return limits;
}

export const objectCommands: CommandDef[] = [
  command('object-add', {}, async (args, core) => addObject(core, args), { boxed: () => OBJECT_OPTIONS }),
  command('object-del', { id: str }, (args, core) => {
    const id = args.id as string;
    const objects = core.graph.objects;
    const obj = objects.get(id);
    if (!obj) throw genericError(`object '${id}' not found`);
    // A secret is read when a driver opens a node, never held: QEMU deletes it at any time.
    if (obj instanceof ThrottleGroup && obj.users > 0) throw genericError(`object '${id}' is in use, can not be deleted`);
    objects.delete(id);
    return {};
  }),
];
