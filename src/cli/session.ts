/**
 * Session: how a user-level command (bitmirror copy, backup, bitmap) reaches a daemon, and the image
 * nodes it opens there.
 *
 * - `--qmp SOCKET` (a unix socket path, or HOST:PORT): a running daemon (bitmirror or
 *   qemu-storage-daemon); its nodes are the user's, named on the command line.
 * - otherwise an embedded daemon: a child `bitmirror daemon` on a unix socket in a private temporary
 *   directory, for commands on image files. It runs in its own process group (Ctrl-C reaches only the
 *   command, which cancels its job first) and stops when the command ends, on every path: close()
 *   quits it; if the command dies without close(), the pipe on the daemon's standard input ends and the
 *   daemon stops by itself (storing bitmaps, closing images) — see SpawnOptions.embedded.
 *
 * Nodes a session opens (openImage, createImage, openRbd, createRbd) are deleted again by close(),
 * parents before children, unless the command hands them over to the user with keep().
 *
 * An image is a file, or an RBD image named as qemu-img names one (`rbd:POOL/IMAGE…`, see
 * parseImageLocation); an RBD image is opened as one rbd node, whose data is the disk (as QEMU's
 * users of RBD keep raw disks there; no format is probed inside it).
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { QmpClient } from '../qmp/client.js';
import { spawnDaemon, type SpawnedDaemon } from '../daemon/spawn.js';
import { errorMessage } from '../errors.js';
import { CliError, usageError } from './exit-codes.js';
import { SignalWatch } from './signals.js';
import { parseRbdFilename, removeRbdImage, type RbdLocation } from '../block/drivers/rbd.js';

export interface SessionOptions {
  /** --qmp: a running daemon's monitor socket (a unix path, or HOST:PORT). Undefined: an embedded daemon. */
  qmp?: string;
  /** The signal watch of the command (a new one when not given; closed with the session then). */
  signals?: SignalWatch;
}

/**
 * An image opened as nodes: a file as the protocol node (file) and the format node (qcow2 or raw) on
 * it; an RBD image as one rbd node.
 */
export interface ImageNodes {
  /** The node jobs and bitmaps use: the format node of a file, the rbd node of an RBD image. */
  node: string;
  /** The protocol (file) node below a file's format node; none for an RBD image. */
  fileNode?: string;
  format: 'qcow2' | 'raw' | 'rbd';
  /** The file's path, or the RBD image's name as given. */
  filename: string;
}

/** Where a command's image is: a file, or an RBD image (its `rbd:` name and the rbd driver's options). */
export type ImageLocation = { kind: 'file'; filename: string } | { kind: 'rbd'; name: string; rbd: RbdLocation };

/**
 * A command line's image name: `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:conf=PATH][:id=USER]` is an RBD
 * image (QEMU's legacy rbd filename, as qemu-img takes it: rbd.ts), anything else a file path.
 */
export function parseImageLocation(name: string): ImageLocation {
  if (!name.startsWith('rbd:')) return { kind: 'file', filename: path.resolve(name) };
  try {
    return { kind: 'rbd', name, rbd: parseRbdFilename(name) };
  } catch (err) {
    throw usageError(`'${name}': ${errorMessage(err)}`);
  }
}

/**
 * Delete an image this command created and could not finish: unlink a file; remove an RBD image
 * (librbd in this process, on its thread pool: no QMP command removes one). Its nodes must be
 * closed first. Only ever for an image the command itself created.
 */
export async function removeCreatedImage(loc: ImageLocation): Promise<void> {
  if (loc.kind === 'file') await fsp.rm(loc.filename, { force: true });
  else await removeRbdImage(loc.rbd);
}

/** What a command needs to know about a node, from query-named-block-nodes. */
export interface NodeSummary {
  nodeName: string;
  /** The format driver (qcow2, raw, …). */
  driver: string;
  filename: string;
  virtualSize: number;
  clusterSize?: number;
  readOnly: boolean;
  /** The backing file's name as the image records it, if it has one. */
  backingFilename?: string;
  /** The backing file's name resolved against the image's directory (usable from anywhere). */
  fullBackingFilename?: string;
  backingFormat?: string;
  /** The node's named dirty bitmaps. */
  bitmaps: BitmapSummary[];
}

/** A named dirty bitmap, as query-named-block-nodes shows it. */
export interface BitmapSummary {
  name: string;
  /** Dirty bytes. */
  count: number;
  granularity: number;
  recording: boolean;
  persistent: boolean;
  busy: boolean;
  inconsistent: boolean;
}

interface RawBlockDeviceInfo {
  'node-name': string;
  drv: string;
  ro: boolean;
  file: string;
  image: { 'virtual-size': number; 'cluster-size'?: number; 'backing-filename'?: string; 'full-backing-filename'?: string; 'backing-filename-format'?: string; filename: string };
  'dirty-bitmaps'?: Array<{ name?: string; count: number; granularity: number; recording: boolean; persistent: boolean; busy: boolean; inconsistent?: boolean }>;
}

/** The first bytes of a qcow2 image ("QFI\xfb"). */
const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

/** qcow2 if the file starts with qcow2's magic, raw otherwise (what qemu-img's probing decides for these two). */
export async function probeFormat(filename: string): Promise<'qcow2' | 'raw'> {
  const fh = await fsp.open(filename, 'r');
  try {
    const head = Buffer.alloc(4);
    const { bytesRead } = await fh.read(head, 0, 4, 0);
    return bytesRead === 4 && head.equals(QCOW2_MAGIC) ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}

export class Session {
  private readonly opened: ImageNodes[] = [];
  private closed = false;

  private constructor(
    readonly qmp: QmpClient,
    /** Whether the daemon is this command's own (an embedded daemon) rather than the user's. */
    readonly embedded: boolean,
    readonly signals: SignalWatch,
    private readonly ownsSignals: boolean,
    private readonly daemon?: SpawnedDaemon,
    private readonly tempDir?: string,
  ) {}

  /** Connect to the daemon at `opts.qmp`, or start an embedded one. */
  static async open(opts: SessionOptions = {}): Promise<Session> {
    const signals = opts.signals ?? new SignalWatch();
    const ownsSignals = opts.signals === undefined;
    try {
      if (opts.qmp !== undefined) return new Session(await connectTo(opts.qmp), false, signals, ownsSignals);
      const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'bitmirror-'));
      try {
        const daemon = await spawnDaemon(path.join(dir, 'qmp.sock'), [], 'bitmirror', { embedded: true });
        return new Session(daemon.qmp, true, signals, ownsSignals, daemon, dir);
      } catch (err) {
        await fsp.rm(dir, { recursive: true, force: true });
        throw new CliError(`cannot start the embedded daemon: ${errorMessage(err)}`);
      }
    } catch (err) {
      if (ownsSignals) signals.dispose();
      throw err;
    }
  }

  /** A node's summary; throws a CliError naming the node when there is none. */
  async nodeSummary(nodeName: string): Promise<NodeSummary> {
    const nodes = await this.qmp.execute<RawBlockDeviceInfo[]>('query-named-block-nodes', { flat: true });
    const n = nodes.find((x) => x['node-name'] === nodeName);
    if (!n) throw usageError(`no node named '${nodeName}' in the daemon`);
    return {
      nodeName,
      driver: n.drv,
      filename: n.image.filename,
      virtualSize: n.image['virtual-size'],
      clusterSize: n.image['cluster-size'],
      readOnly: n.ro,
      backingFilename: n.image['backing-filename'],
      fullBackingFilename: n.image['full-backing-filename'],
      backingFormat: n.image['backing-filename-format'],
      bitmaps: (n['dirty-bitmaps'] ?? [])
        .filter((b) => b.name !== undefined)
        .map((b) => ({ name: b.name!, count: b.count, granularity: b.granularity, recording: b.recording, persistent: b.persistent, busy: b.busy, inconsistent: b.inconsistent ?? false })),
    };
  }

  /** Whether the daemon has a node of that name. */
  async hasNode(nodeName: string): Promise<boolean> {
    const nodes = await this.qmp.execute<RawBlockDeviceInfo[]>('query-named-block-nodes', { flat: true });
    return nodes.some((x) => x['node-name'] === nodeName);
  }

  /**
   * Open an image file (format probed: qcow2 or raw) as `nodeName` over `nodeName`-file. Closed by
   * close() unless kept.
   */
  async openImage(filename: string, nodeName: string, opts: { readOnly?: boolean } = {}): Promise<ImageNodes> {
    const format = await probeFormat(filename).catch((err: unknown) => {
      throw usageError(`cannot open '${filename}': ${errorMessage(err)}`);
    });
    const img: ImageNodes = { node: nodeName, fileNode: `${nodeName}-file`, format, filename };
    const readOnly = opts.readOnly ?? false;
    await this.qmp.execute('blockdev-add', { driver: 'file', 'node-name': img.fileNode, filename, 'read-only': readOnly });
    try {
      await this.qmp.execute('blockdev-add', { driver: format, 'node-name': img.node, file: img.fileNode, 'read-only': readOnly });
    } catch (err) {
      await this.qmp.execute('blockdev-del', { 'node-name': img.fileNode }).catch(() => undefined);
      throw err;
    }
    this.opened.push(img);
    return img;
  }

  /**
   * Create an image file (blockdev-create in the daemon: a file, then qcow2 on it, or a raw file of
   * `size` bytes) and open it as `nodeName`. The file must not exist (the caller checks, to say so in
   * its own words). On a failure the file is removed again.
   */
  async createImage(
    filename: string,
    nodeName: string,
    opts: { format: 'qcow2' | 'raw'; size: number; clusterSize?: number; backingFile?: string; backingFormat?: string },
  ): Promise<ImageNodes> {
    const img: ImageNodes = { node: nodeName, fileNode: `${nodeName}-file`, format: opts.format, filename };
    try {
      await this.runCreateJob(`${nodeName}-create-file`, { driver: 'file', filename, size: opts.format === 'raw' ? opts.size : 0 });
      await this.qmp.execute('blockdev-add', { driver: 'file', 'node-name': img.fileNode, filename });
      try {
        if (opts.format === 'qcow2') {
          const create: Record<string, unknown> = { driver: 'qcow2', file: img.fileNode, size: opts.size };
          if (opts.clusterSize !== undefined) create['cluster-size'] = opts.clusterSize;
          if (opts.backingFile !== undefined) {
            create['backing-file'] = opts.backingFile;
            if (opts.backingFormat !== undefined) create['backing-fmt'] = opts.backingFormat;
          }
          await this.runCreateJob(`${nodeName}-create`, create);
        }
        const add: Record<string, unknown> = { driver: opts.format, 'node-name': img.node, file: img.fileNode };
        await this.qmp.execute('blockdev-add', add);
      } catch (err) {
        await this.qmp.execute('blockdev-del', { 'node-name': img.fileNode }).catch(() => undefined);
        throw err;
      }
    } catch (err) {
      await fsp.rm(filename, { force: true });
      throw err;
    }
    this.opened.push(img);
    return img;
  }

  /**
   * Open an RBD image as one rbd node `nodeName` (a snapshot read-only). A missing image fails with
   * the driver's message ("error reading header from IMAGE: No such file or directory").
   */
  async openRbd(loc: Extract<ImageLocation, { kind: 'rbd' }>, nodeName: string, opts: { readOnly?: boolean } = {}): Promise<ImageNodes> {
    const readOnly = (opts.readOnly ?? false) || loc.rbd.snapshot !== undefined;
    await this.qmp.execute('blockdev-add', { driver: 'rbd', 'node-name': nodeName, ...loc.rbd, 'read-only': readOnly });
    const img: ImageNodes = { node: nodeName, format: 'rbd', filename: loc.name };
    this.opened.push(img);
    return img;
  }

  /**
   * Create an RBD image (blockdev-create driver rbd; `clusterSize` its object size, librbd's default
   * when not given) and open it as `nodeName`. An image of that name that exists already fails the
   * create ("error rbd create: File exists") and is left alone; once created, a failure to open it
   * removes it again.
   */
  async createRbd(loc: Extract<ImageLocation, { kind: 'rbd' }>, nodeName: string, opts: { size: number; clusterSize?: number }): Promise<ImageNodes> {
    const create: Record<string, unknown> = { driver: 'rbd', location: loc.rbd, size: opts.size };
    if (opts.clusterSize !== undefined) create['cluster-size'] = opts.clusterSize;
    await this.runCreateJob(`${nodeName}-create`, create, loc.name);
    try {
      return await this.openRbd(loc, nodeName);
    } catch (err) {
      await removeRbdImage(loc.rbd).catch(() => undefined);
      throw err;
    }
  }

  /** blockdev-create as a job: run it to its end, dismiss it; throws its error. */
  private async runCreateJob(jobId: string, options: Record<string, unknown>, what = String(options.filename ?? options.file)): Promise<void> {
    const concluded = this.qmp.waitEvent('JOB_STATUS_CHANGE', { id: jobId, status: 'concluded' }, 24 * 3600_000);
    await this.qmp.execute('blockdev-create', { 'job-id': jobId, options });
    await concluded;
    const jobs = await this.qmp.execute<Array<{ id: string; error?: string }>>('query-jobs');
    const error = jobs.find((j) => j.id === jobId)?.error;
    await this.qmp.execute('job-dismiss', { id: jobId });
    if (error !== undefined) throw new CliError(`cannot create '${what}': ${error}`);
  }

  /** Delete an image's nodes (format, then file) now; the session forgets them. */
  async closeImage(img: ImageNodes): Promise<void> {
    const i = this.opened.indexOf(img);
    if (i >= 0) this.opened.splice(i, 1);
    await this.qmp.execute('blockdev-del', { 'node-name': img.node });
    if (img.fileNode !== undefined) await this.qmp.execute('blockdev-del', { 'node-name': img.fileNode });
  }

  /** Leave an image's nodes open in the daemon after the command (they are the user's now). */
  keep(img: ImageNodes): void {
    const i = this.opened.indexOf(img);
    if (i >= 0) this.opened.splice(i, 1);
  }

  /**
   * End the session: delete the nodes it opened and did not keep (newest first), disconnect, and stop
   * an embedded daemon (which stores bitmaps and closes its images) and remove its directory. Safe to
   * call more than once. Returns the problems met (empty when all went well).
   */
  async close(): Promise<string[]> {
    if (this.closed) return [];
    this.closed = true;
    const problems: string[] = [];
    for (const img of this.opened.splice(0).reverse()) {
      for (const n of img.fileNode === undefined ? [img.node] : [img.node, img.fileNode]) {
        await this.qmp.execute('blockdev-del', { 'node-name': n }).catch((err: unknown) => problems.push(`cannot close node ${n}: ${errorMessage(err)}`));
      }
    }
    if (this.daemon) {
      const code = await this.daemon.stop();
      if (code !== 0) problems.push(`the embedded daemon exited with ${String(code)}: ${this.daemon.stderr().trim()}`);
      await fsp.rm(this.tempDir!, { recursive: true, force: true });
    } else {
      this.qmp.close();
    }
    if (this.ownsSignals) this.signals.dispose();
    return problems;
  }
}

/** Connect to `--qmp`'s socket: HOST:PORT for TCP, anything else a unix socket path. */
async function connectTo(address: string): Promise<QmpClient> {
  const tcp = /^(.*):(\d+)$/.exec(address);
  const target = tcp && !address.includes('/') ? { host: tcp[1] || '127.0.0.1', port: Number(tcp[2]) } : address;
  try {
    return await QmpClient.connect(target);
  } catch (err) {
    throw new CliError(`cannot connect to the daemon at '${address}': ${errorMessage(err)}`);
  }
}
