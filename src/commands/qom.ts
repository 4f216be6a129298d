/**
 * QEMU's object model commands (qom-list, qom-get, qom-set, qom-list-types, qom-list-properties) over
 * the objects a bitmirror daemon has, as qemu-storage-daemon 7.2 shows them: the root container with
 * /chardevs (the --chardev devices) and /objects (created with the first object-add, then kept), the
 * user-creatable objects in it (`throttle-group`, `secret`), and the QOM types behind them. Paths,
 * partial paths, property types and messages are QEMU 7.2's.
 *
 * Differences, said in commands/parity.ts: the types are those bitmirror implements (QEMU lists ~50);
 * children come in the order they were added (QEMU's come in its hash table's order); a secret's
 * `data` is not readable (QEMU returns it: bitmirror never puts a secret in a reply).
 */
import { genericError, QmpError } from '../errors.js';
import { any, bool, object, str, visit, type Schema } from '../qapi/schema.js';
import { ThrottleGroup, THROTTLE_LIMITS_MEMBERS, type ThrottleLimits } from '../block/throttle-group.js';
import { objectType, type UserObject } from '../block/objects.js';
import { Secret, type SecretProperties } from '../base/secret.js';
import { SECRET_FORMAT } from './objects.js';
import { command, type CommandDef } from './registry.js';
import type { ChardevInfo, Core } from '../core/core.js';

interface QomType {
  parent?: string;
  abstract?: boolean;
  /** Interfaces it implements (beyond its parent's). */
  interfaces?: string[];
  /** Its properties other than children, in the order QEMU lists them (the parent's included). */
  properties: Array<{ name: string; type: string }>;
}

const TYPE_PROP = { name: 'type', type: 'string' };
const SECRET_COMMON_PROPS = [TYPE_PROP, ...['iv', 'keyid'].map((name) => ({ name, type: 'string' })), { name: 'loaded', type: 'bool' }, { name: 'format', type: 'QCryptoSecretFormat' }];
/** throttle-group's properties in the order qemu-storage-daemon 7.2 lists them. */
const THROTTLE_GROUP_PROPS = [
  TYPE_PROP,
  ...[
    'x-bps-write-max-length', 'x-iops-total-max-length', 'x-iops-size', 'limits', 'x-bps-total', 'x-iops-read-max-length', 'x-bps-write',
    'x-iops-write-max-length', 'x-bps-read-max', 'x-iops-read-max', 'x-bps-total-max', 'x-bps-read-max-length', 'x-iops-read', 'x-bps-read',
    'x-bps-write-max', 'x-iops-total-max', 'x-iops-total', 'x-iops-write', 'x-bps-total-max-length', 'x-iops-write-max',
  ].map((name) => ({ name, type: name === 'limits' ? 'ThrottleLimits' : 'int' })),
];

/** The QOM types bitmirror has. */
const TYPES: Readonly<Record<string, QomType>> = {
  object: { abstract: true, properties: [TYPE_PROP] },
  interface: { abstract: true, properties: [] },
  'user-creatable': { parent: 'interface', abstract: true, properties: [] },
  container: { parent: 'object', properties: [TYPE_PROP] },
  secret_common: { parent: 'object', abstract: true, interfaces: ['user-creatable'], properties: SECRET_COMMON_PROPS },
  secret: { parent: 'secret_common', properties: [...SECRET_COMMON_PROPS, { name: 'file', type: 'string' }, { name: 'data', type: 'string' }] },
  'throttle-group': { parent: 'object', interfaces: ['user-creatable'], properties: THROTTLE_GROUP_PROPS },
  chardev: { parent: 'object', abstract: true, properties: [TYPE_PROP] },
  'chardev-fd': { parent: 'chardev', abstract: true, properties: [TYPE_PROP] },
  'chardev-socket': { parent: 'chardev', properties: [TYPE_PROP, { name: 'connected', type: 'bool' }, { name: 'addr', type: 'SocketAddress' }] },
  'chardev-stdio': { parent: 'chardev-fd', properties: [TYPE_PROP] },
};

/** The order qemu-storage-daemon 7.2's qom-list-types gives them in (its type table's), for the types bitmirror has. */
const TYPE_ORDER = ['secret_common', 'container', 'interface', 'secret', 'chardev-fd', 'chardev-stdio', 'chardev', 'user-creatable', 'chardev-socket', 'object', 'throttle-group'];

/** object_class_dynamic_cast: `type` is `target` or derives from it, or implements it. */
function implementsType(type: string, target: string): boolean {
  for (let t: string | undefined = type; t !== undefined; t = TYPES[t].parent) {
    if (t === target || TYPES[t].interfaces?.some((i) => implementsType(i, target))) return true;
  }
  return false;
}

/** A node of the QOM tree: an object, its children by name, its type. */
interface QomNode {
  type: string;
  path: string;
  children(): Array<[string, QomNode]>;
  /** The object behind it, for properties beyond `type`. */
  object?: UserObject | ChardevInfo;
}

function container(core: Core, path: string, children: () => Array<[string, QomNode]>): QomNode {
  void core;
  return { type: 'container', path, children };
}

function root(core: Core): QomNode {
  return container(core, '/', () => {
    const out: Array<[string, QomNode]> = [];
    if (core.graph.objects.containerCreated) {
      out.push([
        'objects',
        container(core, '/objects', () => core.graph.objects.all().map((o) => [o.id, { type: objectType(o), path: `/objects/${o.id}`, children: () => [], object: o }])),
      ]);
    }
    if (core.chardevs.length > 0) {
      out.push(['chardevs', container(core, '/chardevs', () => core.chardevs.map((c) => [c.id, { type: c.type, path: `/chardevs/${c.id}`, children: () => [], object: c }]))]);
    }
    return out;
  });
}

/** object_resolve_abs_path: follow each part as a child. */
function resolveAbs(node: QomNode, parts: string[]): QomNode | undefined {
  let n: QomNode | undefined = node;
  for (const p of parts) {
    n = n.children().find(([name]) => name === p)?.[1];
    if (!n) return undefined;
  }
  return n;
}

/** object_resolve_partial_path: the one node anywhere in the tree from which the parts lead somewhere. */
function resolvePartial(node: QomNode, parts: string[]): { found?: QomNode; ambiguous: boolean } {
  let found = resolveAbs(node, parts);
  for (const [, child] of node.children()) {
    const r = resolvePartial(child, parts);
    if (r.ambiguous) return r;
    if (r.found) {
      if (found) return { ambiguous: true };
      found = r.found;
    }
  }
  return { found, ambiguous: false };
}

/** object_resolve_path: an absolute path from the root, or a partial one anywhere that is unique. */
function resolvePath(core: Core, path: string): { found?: QomNode; ambiguous: boolean } {
  const parts = path.split('/').filter((p) => p !== '');
  if (path.startsWith('/')) return { found: resolveAbs(root(core), parts), ambiguous: false };
  return resolvePartial(root(core), parts);
}

const notFound = (path: string) => new QmpError('DeviceNotFound', `Device '${path}' not found`);

function findProperty(node: QomNode, name: string): { type: string } {
  const prop = TYPES[node.type].properties.find((p) => p.name === name);
  if (prop) return prop;
  const child = node.children().find(([n]) => n === name);
  if (child) return { type: `child<${child[1].type}>` };
  throw genericError(`Property '${node.type}.${name}' not found`);
}

/** The properties qom-list shows: the type's (QEMU lists class properties first), then the children. */
function listProperties(node: QomNode): Array<{ name: string; type: string }> {
  return [...TYPES[node.type].properties, ...node.children().map(([name, c]) => ({ name, type: `child<${c.type}>` }))];
}

function getProperty(node: QomNode, name: string): unknown {
  findProperty(node, name);
  if (name === 'type') return node.type;
  const child = node.children().find(([n]) => n === name);
  if (child) return child[1].path;
  const o = node.object;
  if (o instanceof ThrottleGroup) {
    const limits = o.limits();
    return name === 'limits' ? limits : limits[name.slice(2)];
  }
  if (o instanceof Secret) {
    // QEMU returns `data` as given; bitmirror never puts a secret into a reply (parity.ts).
    if (name === 'data') throw genericError("Property 'secret.data' is not readable");
    if (name === 'loaded') return true;
    if (name === 'format') return o.props.format ?? 'raw';
    return o.props[name as keyof SecretProperties] ?? '';
  }
  const c = o as ChardevInfo;
  return name === 'connected' ? c.connected() : c.addr;
}

const LIMITS_SCHEMA: Schema = object('ThrottleLimits', THROTTLE_LIMITS_MEMBERS);

function setProperty(node: QomNode, name: string, value: unknown): void {
  findProperty(node, name);
  const notWritable = () => genericError(`Property '${node.type}.${name}' is not writable`);
  const o = node.object;
  if (o instanceof ThrottleGroup && name !== 'type') {
    // The x-… properties are only for creating a group (QEMU 7.2's throttle_group_set).
    if (name !== 'limits') throw genericError('Property cannot be set after initialization');
    o.setLimits(visit(LIMITS_SCHEMA, value, 'limits') as ThrottleLimits);
    return;
  }
  if (o instanceof Secret && ['format', 'keyid', 'iv', 'data', 'file'].includes(name)) {
    // As QEMU 7.2: the property changes, the loaded value does not.
    const v = visit(name === 'format' ? SECRET_FORMAT : str, value, name) as string;
    (o.props as Record<string, unknown>)[name] = v;
    return;
  }
  throw notWritable();
}

export const qomCommands: CommandDef[] = [
  command('qom-list', { path: str }, (args, core) => {
    const path = args.path as string;
    const r = resolvePath(core, path);
    if (!r.found) throw r.ambiguous ? genericError(`Path '${path}' is ambiguous`) : notFound(path);
    return listProperties(r.found);
  }),
  command('qom-get', { path: str, property: str }, (args, core) => {
    const path = args.path as string;
    const node = resolvePath(core, path).found;
    if (!node) throw notFound(path);
    return getProperty(node, args.property as string);
  }),
  command('qom-set', { path: str, property: str, value: any }, (args, core) => {
    const path = args.path as string;
    const node = resolvePath(core, path).found;
    if (!node) throw notFound(path);
    setProperty(node, args.property as string, args.value);
    return {};
  }),
  command('qom-list-types', { '*implements': str, '*abstract': bool }, (args) => {
    const target = args.implements as string | undefined;
    return TYPE_ORDER.filter((t) => (args.abstract === true || !TYPES[t].abstract) && (target === undefined || implementsType(t, target))).map((t) => ({
      ...(TYPES[t].abstract ? { abstract: true } : {}),
      name: t,
      ...(TYPES[t].parent !== undefined ? { parent: TYPES[t].parent } : {}),
    }));
  }),
  command('qom-list-properties', { typename: str }, (args) => {
    const name = args.typename as string;
    const t = TYPES[name];
    if (!t) throw new QmpError('DeviceNotFound', `Class '${name}' not found`);
    if (!implementsType(name, 'object')) throw genericError("Parameter 'typename' expects a QOM type");
    return t.properties;
  }),
];
