/**
 * A small QAPI: typed schemas for command arguments and blockdev options, and an input visitor that
 * checks a JSON value against one and reports errors with QEMU's exact wording ("Parameter 'x' is
 * missing", "Invalid parameter type for 'x', expected: integer", …). Members are written QAPI-style:
 * a leading '*' makes a member optional. The same schemas feed query-qmp-schema.
 *
 * `keyval` mode takes the string values of QEMU's dotted command-line syntax (--blockdev
 * driver=file,filename=x) and converts them as QEMU's keyval visitor does.
 */
import { genericError, QmpError } from '../errors.js';

export type Schema =
  | { kind: 'str' }
  | { kind: 'int'; name: 'int' | 'uint32' | 'uint64' | 'size' | 'uint16' | 'uint8' | 'int64' }
  | { kind: 'number' }
  | { kind: 'bool' }
  | { kind: 'null' }
  | { kind: 'any' }
  | { kind: 'enum'; name: string; values: readonly string[] }
  | { kind: 'array'; of: Schema }
  | { kind: 'object'; name: string; members: Members }
  | { kind: 'union'; name: string; base: Members; discriminator: string; variants: Record<string, Members> }
  | { kind: 'alternate'; name: string; alternatives: Schema[] };

export type Members = Record<string, Schema>;

export const str: Schema = { kind: 'str' };
export const int: Schema = { kind: 'int', name: 'int' };
export const uint32: Schema = { kind: 'int', name: 'uint32' };
export const uint64: Schema = { kind: 'int', name: 'uint64' };
export const uint16: Schema = { kind: 'int', name: 'uint16' };
export const size: Schema = { kind: 'int', name: 'size' };
export const bool: Schema = { kind: 'bool' };
export const number: Schema = { kind: 'number' };
export const nul: Schema = { kind: 'null' };
export const any: Schema = { kind: 'any' };
export const arrayOf = (of: Schema): Schema => ({ kind: 'array', of });
export const enumOf = (name: string, values: readonly string[]): Schema => ({ kind: 'enum', name, values });
export const object = (name: string, members: Members): Schema => ({ kind: 'object', name, members });
export const alternate = (name: string, ...alternatives: Schema[]): Schema => ({ kind: 'alternate', name, alternatives });

const INT_RANGES: Record<string, [bigint, bigint]> = {
  int: [-(2n ** 63n), 2n ** 63n - 1n],
  int64: [-(2n ** 63n), 2n ** 63n - 1n],
  uint8: [0n, 255n],
  uint16: [0n, 65535n],
  uint32: [0n, 2n ** 32n - 1n],
  uint64: [0n, 2n ** 64n - 1n],
  size: [0n, 2n ** 64n - 1n],
};

const C_TYPE: Record<string, string> = { uint8: 'uint8_t', uint16: 'uint16_t', uint32: 'uint32_t' };

export interface VisitOptions {
  /** Values are strings from QEMU's key=value syntax and are converted to the schema's types. */
  keyval?: boolean;
}

function memberName(m: string): { name: string; optional: boolean } {
  return m.startsWith('*') ? { name: m.slice(1), optional: true } : { name: m, optional: false };
}

function join(path: string, name: string): string {
  return path ? `${path}.${name}` : name;
}

/**
 * The name QEMU 7.2's generic visitor code prints where it has only the member's own name, not its
 * path: a refused enum value, an alternate of no matching type, a uint8/16/32 out of range. List
 * elements have no name there, so QEMU prints 'null' ("Parameter 'null' does not accept value 'x'").
 */
function bareName(path: string): string {
  if (path === '' || path.endsWith(']')) return 'null';
  return path.slice(path.lastIndexOf('.') + 1);
}

/** The name QEMU's error messages use for a schema type ("integer", "object", …). */
function typeWord(s: Schema): string {
  switch (s.kind) {
    case 'str':
    case 'enum':
      return 'string';
    case 'int':
      return 'integer';
    case 'number':
      return 'number';
    case 'bool':
      return 'boolean';
    case 'null':
      return 'null';
    case 'array':
      return 'array';
    case 'object':
    case 'union':
      return 'object';
    case 'alternate':
      return s.name;
    case 'any':
      return 'any';
  }
}

function invalidType(path: string, s: Schema): QmpError {
  return genericError(`Invalid parameter type for '${path}', expected: ${typeWord(s)}`);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Check `value` against `schema` and return it with keyval strings converted; throws a QmpError with
 * QEMU's message on the first problem. `path` is the member name as QEMU prints it ("file.filename").
 */
export function visit(schema: Schema, value: unknown, path: string, opts: VisitOptions = {}): unknown {
  switch (schema.kind) {
    case 'any':
      return value;
    case 'null':
      if (value !== null) throw invalidType(path, schema);
      return null;
    case 'str':
      if (typeof value !== 'string') throw invalidType(path, schema);
      return value;
    case 'enum': {
      if (typeof value !== 'string') throw invalidType(path, schema);
      if (!schema.values.includes(value)) throw genericError(`Parameter '${bareName(path)}' does not accept value '${value}'`);
      return value;
    }
    case 'bool':
      if (opts.keyval && typeof value === 'string') {
        if (value === 'on' || value === 'yes' || value === 'true') return true;
        if (value === 'off' || value === 'no' || value === 'false') return false;
        throw genericError(`Parameter '${path}' expects 'on' or 'off'`);
      }
      if (typeof value !== 'boolean') throw invalidType(path, schema);
      return value;
    case 'number':
      if (opts.keyval && typeof value === 'string') {
        const n = Number(value);
        if (value.trim() === '' || Number.isNaN(n)) throw genericError(`Parameter '${path}' expects a number`);
        return n;
      }
      if (typeof value === 'bigint') return Number(value);
      if (typeof value !== 'number') throw invalidType(path, schema);
      return value;
    case 'int':
      return visitInt(schema.name, value, path, opts);
    case 'array': {
      if (!Array.isArray(value)) throw invalidType(path, schema);
      return value.map((v, i) => visit(schema.of, v, `${path}[${i}]`, opts));
    }
    case 'object':
      if (!isObject(value)) throw invalidType(path, schema);
      return visitMembers(schema.members, value, path, opts, new Set());
    case 'union': {
      if (!isObject(value)) throw invalidType(path, schema);
      const out = visitMembers(schema.base, value, path, opts, new Set(), true);
      const tag = out[schema.discriminator] as string;
      const variant = schema.variants[tag];
      const used = new Set(Object.keys(schema.base).map((m) => memberName(m).name));
      const rest = visitMembers(variant ?? {}, value, path, opts, used);
      return { ...out, ...rest };
    }
    case 'alternate':
      return visitAlternate(schema, value, path, opts);
  }
}

function visitInt(name: string, value: unknown, path: string, opts: VisitOptions): number {
  if (opts.keyval && typeof value === 'string') {
    const m = name === 'size' ? /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)[bB]?\s*$/.exec(value) : /^\s*(-?)(0x[0-9a-fA-F]+|\d+)\s*$/.exec(value);
    if (!m) throw genericError(`Parameter '${path}' expects ${name === 'size' ? 'a size value' : 'integer'}`);
    if (name === 'size') {
      const mult: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };
      const n = Math.round(Number(m[1]) * mult[m[2].toLowerCase()]);
      value = Number.isSafeInteger(n) ? n : BigInt(n);
    } else {
      value = (m[1] ? -1n : 1n) * BigInt(m[2]);
    }
  }
  // QEMU 7.2 reads every unsigned type as a uint64 first (full path, "expects uint64" when the value is
  // no integer), then checks the narrower range (member name only, "expects uint32_t").
  const unsigned = name !== 'int' && name !== 'int64';
  const notInteger = () =>
    unsigned && !opts.keyval ? genericError(`Parameter '${path}' expects uint64`) : genericError(`Invalid parameter type for '${path}', expected: integer`);
  // An integer the JSON parser could not hold as a safe double arrives as a bigint (qmp/json.ts
  // jsonNumber); a number that is no safe integer was a double there (a fraction, or past 64 bits).
  let big: bigint;
  if (typeof value === 'bigint') big = value;
  else if (typeof value === 'number' && Number.isSafeInteger(value)) big = BigInt(value);
  else throw notInteger();
  const [lo, hi] = INT_RANGES[name];
  if (big < lo || big > hi) {
    if (C_TYPE[name]) throw genericError(`Parameter '${bareName(path)}' expects ${C_TYPE[name]}`);
    // QEMU takes a negative uint64/size as its two's complement (2^64 + value) for backward
    // compatibility; a JS number cannot hold that exactly, so we refuse it with QEMU's uint64 message.
    if (unsigned && !opts.keyval) throw genericError(`Parameter '${path}' expects uint64`);
    if (unsigned) throw genericError(`Parameter '${path}' expects a non-negative number below 2^64`);
    throw notInteger();
  }
  // Past 2^53 the value is rounded: an offset or size that large is refused later as out of range,
  // and a limit (a speed) that large means no limit either way.
  return Number(big);
}

/**
 * A driver option that QAPI declares 'int' but the driver reads through QemuOpts as a size (raw's
 * offset/size, null's size): QEMU refuses a negative one there, with QemuOpts' message.
 */
export function qemuOptSize(opts: Record<string, unknown>, key: string): number | undefined {
  const v = opts[key] as number | undefined;
  if (v !== undefined && v < 0) throw genericError(`Parameter '${key}' expects a non-negative number below 2^64`);
  return v;
}

function visitMembers(
  members: Members,
  value: Record<string, unknown>,
  path: string,
  opts: VisitOptions,
  alreadyUsed: Set<string>,
  partial = false,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const known = new Set(alreadyUsed);
  for (const [m, s] of Object.entries(members)) {
    const { name, optional } = memberName(m);
    known.add(name);
    const v = value[name];
    if (v === undefined) {
      if (!optional) throw genericError(`Parameter '${join(path, name)}' is missing`);
      continue;
    }
    out[name] = visit(s, v, join(path, name), opts);
  }
  if (!partial) {
    for (const k of Object.keys(value)) {
      if (!known.has(k)) throw genericError(`Parameter '${join(path, k)}' is unexpected`);
    }
  }
  return out;
}

function visitAlternate(schema: Extract<Schema, { kind: 'alternate' }>, value: unknown, path: string, opts: VisitOptions): unknown {
  // QEMU picks the branch by the JSON type of the value; in keyval mode a string may be any scalar.
  const byKind = (k: string) => schema.alternatives.find((a) => a.kind === k);
  let branch: Schema | undefined;
  if (value === null) branch = byKind('null');
  else if (typeof value === 'string') branch = byKind('str') ?? byKind('enum') ?? (opts.keyval ? (byKind('int') ?? byKind('bool') ?? byKind('number')) : undefined);
  else if (typeof value === 'number' || typeof value === 'bigint') branch = byKind('int') ?? byKind('number');
  else if (typeof value === 'boolean') branch = byKind('bool');
  else if (Array.isArray(value)) branch = byKind('array');
  else if (isObject(value)) branch = byKind('object') ?? byKind('union') ?? byKind('any');
  if (!branch) throw genericError(`Invalid parameter type for '${bareName(path)}', expected: ${schema.name}`);
  return visit(branch, value, path, opts);
}

/**
 * Turn QEMU's dotted key=value syntax ("driver=qcow2,file.driver=file,file.filename=a.img") into a nested
 * object of strings, as QEMU's keyval_parse does: ',,' escapes a comma, 'a.0=x,a.1=y' makes a list.
 */
export function parseKeyval(text: string, implied?: string): Record<string, unknown> {
  const root: Record<string, unknown> = {};
  let i = 0;
  let first = true;
  while (i < text.length) {
    let key = '';
    let val = '';
    // key up to '=' or ','
    let j = i;
    while (j < text.length && text[j] !== '=' && text[j] !== ',') j++;
    key = text.slice(i, j);
    if (j >= text.length || text[j] === ',') {
      if (first && implied) {
        val = key;
        key = implied;
        i = j + 1;
        setPath(root, key, val, text);
        first = false;
        continue;
      }
      throw genericError(`Expected '=' after parameter '${key}'`);
    }
    j++; // skip '='
    while (j < text.length) {
      if (text[j] === ',') {
        if (text[j + 1] === ',') {
          val += ',';
          j += 2;
          continue;
        }
        break;
      }
      val += text[j++];
    }
    i = j + 1;
    if (key === '') throw genericError('Invalid parameter \'\'');
    setPath(root, key, val, text);
    first = false;
  }
  return listify(root) as Record<string, unknown>;
}

function setPath(root: Record<string, unknown>, key: string, val: string, _text: string): void {
  const parts = key.split('.');
  let cur = root;
  for (let k = 0; k < parts.length - 1; k++) {
    const p = parts[k];
    if (p === '') throw genericError(`Invalid parameter '${key}'`);
    const next = cur[p];
    if (next === undefined) cur[p] = {};
    else if (typeof next !== 'object') throw genericError(`Parameters '${parts.slice(0, k + 1).join('.')}.*' used inconsistently`);
    cur = cur[p] as Record<string, unknown>;
  }
  const last = parts[parts.length - 1];
  if (typeof cur[last] === 'object') throw genericError(`Parameters '${key}.*' used inconsistently`);
  cur[last] = val;
}

/** Objects whose keys are all 0..n-1 become arrays, as in keyval. */
function listify(v: unknown): unknown {
  if (!isObject(v)) return v;
  const keys = Object.keys(v);
  for (const k of keys) v[k] = listify(v[k]);
  if (keys.length > 0 && keys.every((k) => /^\d+$/.test(k))) {
    const arr: unknown[] = [];
    for (let n = 0; n < keys.length; n++) {
      if (!(String(n) in v)) throw genericError(`Parameter '${n}' missing`);
      arr.push(v[String(n)]);
    }
    return arr;
  }
  return v;
}
