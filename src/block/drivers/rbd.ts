/**
 * The `rbd` protocol driver: a Ceph RBD image as a block node, on librbd through the bitmirror_rbd
 * addon (src/block/native.ts). The data path uses librbd's asynchronous calls completed on the event
 * loop, so any number of requests are in flight at once and the loop never waits on the cluster;
 * opening, closing, resizing and block status run on libuv's thread pool.
 *
 * Options and messages are QEMU 7.2's (block/rbd.c, BlockdevOptionsRbd): pool, namespace, image,
 * conf, snapshot (read-only), user, and what QEMU passes to librados after the conf file, in its
 * order: `server` as mon_host, `key-secret` (a secret object, its value base64-encoded) as key, and
 * `auth-client-required` as auth_client_required. The addon has no librbd encryption: `encrypt`
 * fails, once its secret is found, with QEMU's message for a librbd without encryption.
 *
 * Block status follows QEMU: from the object map (rbd_diff_iterate2 over whole objects) when the
 * image has a valid fast-diff map; otherwise everything is data.
 */
import { BlockIOError, genericError, strerror } from '../../errors.js';
import { BlockNode, jsonFilename, type BlockStatus, type ImageInfo, type NodeCapabilities, type NodeInfo, type ReopenChange, type WriteFlags } from '../node.js';
import type { LoadedDirtyBitmap, PersistentBitmapStore } from '../bitmap-store.js';
import { RbdBitmapStore, type ImageMetadata } from './rbd-bitmaps.js';
import type { BlockDriver } from '../graph.js';
import { arrayOf, enumOf, object, size, str, type Members } from '../../qapi/schema.js';
import { errnoCode, rbdAddon, RBD_AIO, type RbdAddon, type RbdConnectResult, type RbdHandle, type RbdSettings } from '../native.js';
import { access } from 'node:fs/promises';

/** BlockdevOptionsRbd (QEMU 7.2). */
export const RBD_LOCATION: Members = {
  pool: str,
  '*namespace': str,
  image: str,
  '*conf': str,
  '*snapshot': str,
  '*encrypt': object('RbdEncryptionOptions', { format: enumOf('RbdImageEncryptionFormat', ['luks', 'luks2']), 'key-secret': str }),
  '*user': str,
  '*auth-client-required': arrayOf(enumOf('RbdAuthMode', ['cephx', 'none'])),
  '*key-secret': str,
  '*server': arrayOf(object('InetSocketAddressBase', { host: str, port: str })),
};

/** Where an image is: the location members the driver uses. */
export interface RbdLocation {
  pool: string;
  namespace?: string;
  image: string;
  conf?: string;
  snapshot?: string;
  user?: string;
  'key-secret'?: string;
  encrypt?: { format: string; 'key-secret': string };
  server?: Array<{ host: string; port: string }>;
  'auth-client-required'?: string[];
}

/** A secret's value by id (UserObjects.secretValue: QEMU's qcrypto_secret_lookup and its messages). */
export type SecretLookup = (id: string) => Buffer;

function addon(): RbdAddon {
  const { addon: a, error } = rbdAddon();
  if (!a) throw genericError(`The rbd driver needs librbd: ${error}`);
  return a;
}

function errnoText(ret: number): string {
  return strerror(errnoCode(-ret));
}

/** QEMU's message for a failed step of connecting, opening or creating (qemu_rbd_connect and friends). */
function stageError(r: RbdConnectResult, loc: RbdLocation, settings: RbdSettings): Error {
  const ret = r.ret;
  switch (r.stage) {
    case 'conf':
      return genericError(`error reading conf file ${loc.conf}: ${errnoText(ret)}`);
    case 'setting':
      return genericError(`Could not set '${settings?.[2 * (r.setting ?? 0)] ?? '?'}': ${errnoText(ret)}`);
    case 'pool':
      return genericError(`error opening pool ${loc.pool}: ${errnoText(ret)}`);
    case 'namespace':
      return genericError(`namespace '${loc.namespace}' does not exist`);
    case 'open':
      return genericError(`error reading header from ${loc.image}: ${errnoText(ret)}`);
    case 'create':
      return genericError(`error rbd create: ${errnoText(ret)}`);
    case 'remove':
      // QEMU never removes an image: worded like its create message.
      return genericError(`error rbd remove: ${errnoText(ret)}`);
    default:
      return genericError(`error connecting: ${errnoText(ret)}`);
  }
}

/** qemu_rbd_mon_host: the servers as librados's mon_host, `host:port;…` (an IPv6 address in brackets). */
function monHost(servers: Array<{ host: string; port: string }>): string {
  return servers.map((s) => `${s.host.includes(':') ? `[${s.host}]` : s.host}:${s.port}`).join(';');
}

/**
 * What QEMU sets on the cluster handle after reading the conf file (qemu_rbd_connect, qemu_rbd_set_auth),
 * in its order. The secret is looked up here, before connecting; as QEMU reads the conf file first, a
 * conf file that cannot be read is reported before a secret that does not exist.
 */
async function connectSettings(loc: RbdLocation, secret: SecretLookup | undefined): Promise<RbdSettings> {
  const settings: string[] = [];
  if (loc.server !== undefined) settings.push('mon_host', monHost(loc.server));
  const keyId = loc['key-secret'];
  if (keyId !== undefined) {
    let key: Buffer;
    try {
      if (!secret) throw genericError(`No secret with id '${keyId}'`);
      key = secret(keyId);
    } catch (err) {
      if (loc.conf !== undefined) {
        await access(loc.conf).catch((e: NodeJS.ErrnoException) => {
          throw genericError(`error reading conf file ${loc.conf}: ${strerror(e.code ?? 'EIO')}`);
        });
      }
      throw err;
    }
    // qcrypto_secret_lookup_as_base64: librados takes the key base64-encoded.
    settings.push('key', key.toString('base64'));
  }
  if (loc['auth-client-required'] !== undefined) settings.push('auth_client_required', loc['auth-client-required'].join(';'));
  return settings.length > 0 ? settings : null;
}

/** The argument order of the addon's open and create. */
function locationArgs(loc: RbdLocation): [string | null, string | null, string, string | null, string] {
  return [loc.conf ?? null, loc.user ?? null, loc.pool, loc.namespace ?? null, loc.image];
}

const ENOENT = 2;

/**
 * QEMU's legacy rbd filename, as qemu-img takes it (qemu_rbd_parse_filename, QEMU 7.2):
 * `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE…]`. A backslash escapes the next character
 * (`\:`, `\@`, `\/`, `\=`); the keys `conf` (a ceph.conf to read) and `id` (the user) become the
 * options of the same names. QEMU passes any other key to rados_conf_set; the addon has no way to
 * pass them, so they are refused (set them in a conf file). The messages are QEMU's.
 */
export function parseRbdFilename(filename: string): RbdLocation {
  if (!filename.startsWith('rbd:')) throw genericError("File name must start with 'rbd:'");
  const [pool, afterPool] = nextToken(filename.slice(4), '/');
  if (afterPool === undefined) throw genericError('Pool name is required');
  let rest: string | undefined = afterPool;
  const loc: RbdLocation = { pool: unescape(pool), image: '' };
  let imageName: string;
  if (findUnescaped(rest, '@') >= 0) {
    [imageName, rest] = nextToken(rest, '@'); // found: rest is what follows the @
    let snapshot: string;
    [snapshot, rest] = nextToken(rest!, ':');
    loc.snapshot = unescape(snapshot);
  } else {
    [imageName, rest] = nextToken(rest, ':');
  }
  if (findUnescaped(imageName, '/') >= 0) {
    const [namespace, image] = nextToken(imageName, '/');
    loc.namespace = unescape(namespace);
    imageName = image!;
  }
  loc.image = unescape(imageName);
  while (rest !== undefined) {
    let name: string;
    [name, rest] = nextToken(rest, '=');
    if (rest === undefined) throw genericError(`conf option ${name} has no value`);
    name = unescape(name);
    let value: string;
    [value, rest] = nextToken(rest, ':');
    value = unescape(value);
    if (name === 'conf') loc.conf = value;
    else if (name === 'id') loc.user = value;
    else throw genericError(`__org.bitmirror: the rbd option '${name}' is not supported; set it in a conf file (conf=PATH)`);
  }
  return loc;
}

/** Where the first `delim` not escaped by a backslash is, or -1. */
function findUnescaped(s: string, delim: string): number {
  for (let i = 0; i < s.length; i++) {
    if (s[i] === delim) return i;
    if (s[i] === '\\') i++;
  }
  return -1;
}

/** The text before the first unescaped `delim` (still escaped) and the rest after it (undefined: no delim). */
function nextToken(s: string, delim: string): [string, string | undefined] {
  const i = findUnescaped(s, delim);
  return i < 0 ? [s, undefined] : [s.slice(0, i), s.slice(i + 1)];
}

/** Drop each escaping backslash (a trailing one stays, as in QEMU). */
function unescape(s: string): string {
  return s.replace(/\\([\s\S])/g, '$1');
}

/**
 * Delete an image with all its data (rbd_remove, on the thread pool). No QMP command removes an
 * image (QEMU has none): `bitmirror copy` calls this for a target it created itself and could not
 * finish. It fails while any client still has the image open.
 */
export async function removeRbdImage(loc: RbdLocation, secret?: SecretLookup): Promise<void> {
  const settings = await connectSettings(loc, secret);
  const r = await addon().remove(...locationArgs(loc), settings);
  if (r.ret < 0) throw stageError(r, loc, settings);
}

export class RbdNode extends BlockNode implements PersistentBitmapStore {
  readonly driver = 'rbd';
  /** Persistent dirty bitmaps in the image's metadata (rbd-bitmaps.ts). */
  private readonly bitmaps: RbdBitmapStore;
  constructor(
    nodeName: string,
    readOnly: boolean,
    private readonly rbd: RbdAddon,
    private readonly handle: RbdHandle,
    private readonly location: RbdLocation,
    private size: number,
    private readonly objectSize: number,
    /** The image has a valid fast-diff object map: block status can tell holes from data. */
    private readonly fastDiff: boolean,
    private readonly discardUnmap: boolean,
  ) {
    super(nodeName, readOnly);
    this.bitmaps = new RbdBitmapStore(this.metadata(), nodeName, () => this.size);
  }

  /** The image's metadata through the addon (librbd's calls on the thread pool). */
  private metadata(): ImageMetadata {
    const fail = (ret: number): never => {
      throw new BlockIOError(errnoCode(-ret));
    };
    return {
      get: async (key) => {
        const v = await this.rbd.metadataGet(this.handle, key);
        if (typeof v === 'string') return v;
        return v === -ENOENT ? undefined : fail(v);
      },
      set: async (key, value) => void this.check(await this.rbd.metadataSet(this.handle, key, value)),
      remove: async (key) => {
        const r = await this.rbd.metadataRemove(this.handle, key);
        if (r !== -ENOENT) this.check(r);
      },
      list: async () => {
        const v = await this.rbd.metadataList(this.handle);
        return typeof v === 'number' ? fail(v) : v;
      },
    };
  }

  // ---- PersistentBitmapStore (block/bitmap-store.ts): bitmaps beside the image, see rbd-bitmaps.ts ----

  canStoreNewDirtyBitmap(name: string, granularity: number, persistentNames?: string[]): void {
    // As qcow2 in QEMU 7.2: a read-only node takes the bitmap, and its store fails at close ("No write access").
    this.bitmaps.canStoreNewDirtyBitmap(name, granularity, persistentNames);
  }
  loadPersistentDirtyBitmaps(): Promise<LoadedDirtyBitmap[]> {
    return this.bitmaps.load();
  }
  markWriteIntent(offset: number, bytes: number): Promise<void> | undefined {
    return this.bitmaps.markWriteIntent(offset, bytes);
  }
  storePersistentDirtyBitmaps(list: Array<{ name: string; granularity: number; auto: boolean; data: Buffer }>): Promise<void> {
    return this.bitmaps.store(list);
  }
  removePersistentDirtyBitmap(name: string): Promise<void> {
    return this.bitmaps.remove(name);
  }

  /** The write phase of a read-write open: the loaded bitmaps covered by a write-intent record, marked in use. */
  protected override async doActivate(): Promise<void> {
    if (!this.readOnly) await this.bitmaps.activate();
  }

  /** An rbd node has no children: its `image` is the image's name. */
  override childOptionNames(): readonly string[] {
    return [];
  }

  /** qemu_rbd_reopen_prepare: a snapshot stays read-only. */
  override async reopenPrepare(change: ReopenChange): Promise<void> {
    if (this.location.snapshot !== undefined && !change.readOnly) throw genericError(`Cannot change node '${this.nodeName}' to r/w when using RBD snapshot`);
  }

  override async reopenFinish(_change: ReopenChange, wasReadOnly: boolean): Promise<void> {
    if (wasReadOnly && !this.readOnly && this.activated) await this.bitmaps.rearm();
  }

  private check(ret: number): number {
    if (ret < 0) throw new BlockIOError(errnoCode(-ret));
    return ret;
  }

  length(): number {
    return this.size;
  }

  protected async doRead(offset: number, bytes: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(bytes);
    await this.doReadInto(offset, buf);
    return buf;
  }

  protected override async doReadInto(offset: number, buf: Buffer): Promise<void> {
    const n = this.check(await this.rbd.aio(this.handle, RBD_AIO.read, offset, buf, 0));
    if (n < buf.length) buf.fill(0, n);
  }

  protected async doWrite(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    this.check(await this.rbd.aio(this.handle, RBD_AIO.write, offset, data, 0));
    // librbd has no FUA: a flush makes the write durable (QEMU's generic fallback does the same).
    if (flags.fua) await this.doFlush();
  }

  protected override async doWriteZeroes(offset: number, bytes: number, flags: WriteFlags): Promise<void> {
    // As QEMU: without may-unmap the zeroes must stay allocated (thick provision).
    const zeroFlags = flags.mayUnmap ? 0 : this.rbd.WRITE_ZEROES_FLAG_THICK_PROVISION;
    this.check(await this.rbd.aio(this.handle, RBD_AIO.writeZeroes, offset, bytes, zeroFlags));
    if (flags.fua) await this.doFlush();
  }

  protected override async doDiscard(offset: number, bytes: number): Promise<void> {
    // discard=ignore (the default) frees nothing, as for every QEMU driver.
    if (!this.discardUnmap) return;
    this.check(await this.rbd.aio(this.handle, RBD_AIO.discard, offset, bytes, 0));
  }

  protected async doFlush(): Promise<void> {
    this.check(await this.rbd.aio(this.handle, RBD_AIO.flush, 0, 0, 0));
  }

  /**
   * QEMU 7.2's qemu_rbd_co_block_status: the object map says which objects exist; a run of existing
   * objects is data, a run of missing ones reads as zeroes. Whole objects, so the query is widened to
   * object boundaries and the answer cut back to the range asked.
   */
  protected override async doBlockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    const end = Math.min(this.size, offset + bytes);
    const data: BlockStatus = { bytes: end - offset, zero: false, data: true, allocated: true };
    if (!this.fastDiff) return data;
    const start = offset - (offset % this.objectSize);
    const ext = await this.rbd.diff(this.handle, start, end - start);
    if (typeof ext === 'number') return data; // as QEMU: an iterate error reports data
    // Find the run that contains `offset`: existing extents are data, the gaps between them holes.
    for (let i = 0; i < ext.length; i += 3) {
      const [eOff, eLen, exists] = [ext[i], ext[i + 1], ext[i + 2]];
      if (!exists) continue;
      const eEnd = eOff + eLen;
      if (eEnd <= offset) continue;
      if (eOff > offset) return { bytes: Math.min(eOff, end) - offset, zero: true, data: false, allocated: true };
      // offset lies in this extent: extend over the ones that follow without a gap
      let runEnd = eEnd;
      for (let j = i + 3; j < ext.length && ext[j] === runEnd && ext[j + 2]; j += 3) runEnd += ext[j + 1];
      return { bytes: Math.min(runEnd, end) - offset, zero: false, data: true, allocated: true };
    }
    // No existing object from offset on (or the addon's extent list ended before it): a hole up to
    // the end only when the list was complete, otherwise say data for the rest (never a false hole).
    if (ext.length >= 64 * 3) return data;
    return { bytes: end - offset, zero: true, data: false, allocated: true };
  }

  protected override async doTruncate(size: number): Promise<void> {
    // Like qcow2: every stored bitmap must be in memory to follow the new size.
    this.checkStoredBitmapsResizable(await this.bitmaps.storedNames());
    const ret = await this.rbd.resize(this.handle, size);
    if (ret < 0) throw genericError(`failed to resize rbd image: ${errnoText(ret)}`);
    this.size = size;
  }

  protected override async doClose(): Promise<void> {
    await this.rbd.close(this.handle);
  }

  override hasZeroInit(): boolean {
    return true;
  }

  override nodeInfo(): NodeInfo {
    return { clusterSize: this.objectSize };
  }

  override capabilities(): NodeCapabilities {
    return {
      requestAlignment: 1,
      writeZeroes: true,
      fastZero: false,
      discard: this.discardUnmap,
      fua: false,
      blockStatus: this.fastDiff,
      resize: true,
    };
  }

  /** QEMU 7.2's rbd driver reports no allocated size. */
  override async actualSize(): Promise<number | undefined> {
    return undefined;
  }

  imageInfo(): ImageInfo {
    return {
      'virtual-size': this.size,
      filename: this.filename(),
      'cluster-size': this.objectSize,
      format: 'rbd',
      'format-specific': { type: 'rbd', data: {} },
      'dirty-flag': false,
    };
  }

  /** QEMU's json: filename of the options that say where the image is (qemu_rbd_strong_runtime_opts). */
  filename(): string {
    const o: Record<string, unknown> = { driver: 'rbd' };
    for (const k of ['pool', 'namespace', 'image', 'conf', 'snapshot', 'user'] as const) {
      if (this.location[k] !== undefined) o[k] = this.location[k];
    }
    // QEMU's options are flat here: the server list as server.N.host/port, entered last entry first
    // (which decides their order where they share a QDict bucket).
    const servers = this.location.server ?? [];
    for (let i = servers.length - 1; i >= 0; i--) {
      o[`server.${i}.host`] = servers[i].host;
      o[`server.${i}.port`] = servers[i].port;
    }
    return jsonFilename(o);
  }
}

export const rbdDriver: BlockDriver = {
  name: 'rbd',
  options: RBD_LOCATION,
  async open(nodeName, opts, ctx) {
    const loc = opts as unknown as RbdLocation;
    const rbd = addon();
    const settings = await connectSettings(loc, (id) => ctx.graph.objects.secretValue(id));
    let readOnly = opts['read-only'] as boolean;
    // QEMU: an rbd snapshot is read-only (bdrv_apply_auto_read_only after rbd_open).
    if (loc.snapshot !== undefined && !readOnly && opts['auto-read-only'] === true) readOnly = true;
    // As QEMU, the image is opened for writing even for a read-only node (librbd takes its exclusive
    // lock only at the first write), so blockdev-reopen can make the node writable; a snapshot is
    // opened read-only.
    const r = await rbd.open(...locationArgs(loc), loc.snapshot ?? null, loc.snapshot !== undefined, settings);
    if (r.ret < 0 || !r.handle) throw stageError(r, loc, settings);
    const handle = r.handle;
    try {
      if (loc.snapshot !== undefined && !readOnly) throw genericError('rbd snapshots are read-only');
      // QEMU looks up the encryption secret once the image is open; the addon has no librbd encryption.
      if (loc.encrypt !== undefined) {
        ctx.graph.objects.secretValue(loc.encrypt['key-secret']);
        throw genericError('RBD library does not support image encryption');
      }
      const st = await rbd.stat(handle);
      if (typeof st === 'number') throw genericError(`error getting image info from ${loc.image}: ${errnoText(st)}`);
      const fastDiff = (st.features & rbd.FEATURE_FAST_DIFF) !== 0 && (st.flags & rbd.FLAG_FAST_DIFF_INVALID) === 0;
      return new RbdNode(nodeName, readOnly, rbd, handle, loc, st.size, st.objectSize, fastDiff, opts.discard === 'unmap');
    } catch (err) {
      await rbd.close(handle);
      throw err;
    }
  },
  create: {
    options: {
      location: object('BlockdevOptionsRbd', RBD_LOCATION),
      size,
      '*cluster-size': size,
      '*encrypt': object('RbdEncryptionCreateOptions', {
        format: enumOf('RbdImageEncryptionFormat', ['luks', 'luks2']),
        'key-secret': str,
        '*cipher-alg': str,
      }),
    },
    async run(opts, ctx) {
      const loc = opts.location as RbdLocation;
      const size = opts.size as number;
      const clusterSize = opts['cluster-size'] as number | undefined;
      // qemu_rbd_do_create's checks, in its order.
      if (loc.snapshot !== undefined) throw genericError("Can't use snapshot name for image creation");
      if (opts.encrypt !== undefined) {
        ctx.graph.objects.secretValue((opts.encrypt as { 'key-secret': string })['key-secret']);
        throw genericError('RBD library does not support image encryption');
      }
      let order = 0;
      if (clusterSize !== undefined) {
        if (!Number.isInteger(Math.log2(clusterSize))) throw genericError('obj size needs to be power of 2');
        if (clusterSize < 4096) throw genericError('obj size too small');
        order = Math.log2(clusterSize);
      }
      const settings = await connectSettings(loc, (id) => ctx.graph.objects.secretValue(id));
      const r = await addon().create(...locationArgs(loc), size, order, settings);
      if (r.ret < 0) throw stageError(r, loc, settings);
    },
  },
};
