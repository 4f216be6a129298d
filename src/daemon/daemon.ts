/**
 * Daemon: wires one Core (graph, events, jobs, bitmaps) to its QMP monitors, opens the nodes given on
 * the command line, and shuts everything down cleanly (jobs cancelled, nodes flushed and closed).
 */
import { isIP } from 'node:net';
import { openSync, promises as fsp, writeSync } from 'node:fs';
import * as path from 'node:path';
import { errorMessage } from '../errors.js';
import { Core } from '../core/core.js';
import { QmpServer, type ListenAddress } from '../qmp/server.js';
import { allCommands } from '../commands/index.js';
import { addObject } from '../commands/objects.js';
import { BLOCK_DRIVERS } from './drivers.js';
import { visit } from '../qapi/schema.js';
import { addBlockExport, BLOCK_EXPORT_OPTIONS, NBD_SERVER_OPTIONS, startNbdServer } from '../commands/nbd.js';

export interface DaemonOptions {
  monitors: ListenAddress[];
  /** Every --chardev by id (also those no monitor uses), in order: the QOM tree's /chardevs. */
  chardevs?: Array<{ id: string; addr: ListenAddress }>;
  /** --blockdev values, already parsed (JSON form or key=value form). */
  blockdevs: Array<{ options: Record<string, unknown>; keyval: boolean }>;
  /** --object values (throttle groups, secrets), created before the nodes. */
  objects: Array<{ options: Record<string, unknown>; keyval: boolean }>;
  tracePatterns: string[];
  /** --nbd-server (key=value, checked when the daemon starts). */
  nbdServer?: Record<string, unknown>;
  /** --export values (key=value), in order. */
  exports: Array<Record<string, unknown>>;
  /** --trace events=FILE: files of patterns, one a line ('-PATTERN' disables). */
  traceEventsFiles: string[];
  /** --trace file=FILE: trace output goes there instead of stderr. */
  traceFile?: string;
  pidfile?: string;
  /** --daemonize (the CLI runs the daemon detached; the daemon itself changes nothing). */
  daemonize?: boolean;
}

export class Daemon {
  readonly core = new Core();
  readonly qmp: QmpServer;
  private stopping: Promise<void> | undefined;
  /**
   * Keeps the process running until stop(), as qemu-storage-daemon runs until quit or a signal: with
   * only a stdio monitor whose input has ended (or no monitor at all) nothing else would.
   */
  private keepAlive: NodeJS.Timeout | undefined;
  private stoppedResolve!: () => void;
  /** Resolves when the daemon has shut down. */
  readonly stopped = new Promise<void>((r) => (this.stoppedResolve = r));

  constructor(private readonly opts: DaemonOptions) {
    for (const d of BLOCK_DRIVERS) this.core.graph.registerDriver(d);
    this.qmp = new QmpServer(this.core, allCommands());
    this.core.requestShutdown = () => void this.stop();
  }

  async start(): Promise<void> {
    this.keepAlive ??= setInterval(() => undefined, 2 ** 30);
    if (this.opts.traceFile !== undefined) {
      let fd: number;
      try {
        fd = openSync(this.opts.traceFile, 'w');
      } catch (err) {
        throw new Error(`could not open trace file '${this.opts.traceFile}': ${errorMessage(err)}`);
      }
      // Synchronous, as QEMU's log file: every line is written when the trace point fires.
      this.core.trace.sink = (line) => writeSync(fd, line + '\n');
    }
    for (const file of this.opts.traceEventsFiles) {
      let text: string;
      try {
        text = await fsp.readFile(file, 'utf8');
      } catch (err) {
        throw new Error(`could not open trace events file '${file}': ${errorMessage(err)}`);
      }
      // trace_init_events: a pattern a line, '-' disables, blank lines and '#' comments skipped.
      for (const raw of text.split('\n')) {
        const line = raw.trim();
        if (line === '' || line.startsWith('#')) continue;
        if (line.startsWith('-')) this.core.trace.setState(line.slice(1), false);
        else this.core.trace.setState(line, true);
      }
    }
    for (const p of this.opts.tracePatterns) this.core.trace.setState(p, true);
    for (const c of this.opts.chardevs ?? []) {
      const addr = c.addr;
      this.core.chardevs.push({
        id: c.id,
        type: addr.kind === 'stdio' ? 'chardev-stdio' : 'chardev-socket',
        addr: addr.kind === 'unix' ? { path: addr.path, type: 'unix' } : addr.kind === 'tcp' ? inetAddress(addr.host, addr.port) : undefined,
        connected: () => this.qmp.connected(addr),
      });
    }
    for (const o of this.opts.objects) await addObject(this.core, o.options, { keyval: o.keyval });
    for (const b of this.opts.blockdevs) {
      await this.core.openForMonitor(b.options, { keyval: b.keyval });
    }
    // As qemu-storage-daemon: the NBD server, then the exports, after the nodes they need.
    if (this.opts.nbdServer) await startNbdServer(this.core, visit(NBD_SERVER_OPTIONS, this.opts.nbdServer, '', { keyval: true }) as Record<string, unknown>);
    for (const e of this.opts.exports) addBlockExport(this.core, visit(BLOCK_EXPORT_OPTIONS, e, '', { keyval: true }) as Record<string, unknown>);
    // As qemu-storage-daemon: the pidfile is written once every socket exists and before any client is
    // served, so a client that got the greeting finds it.
    this.qmp.holdConnections();
    for (const m of this.opts.monitors) await this.qmp.listen(m);
    if (this.opts.pidfile) {
      // Absolute: a daemonized process changes its working directory once started, and removes it at exit.
      this.opts.pidfile = path.resolve(this.opts.pidfile);
      await fsp.writeFile(this.opts.pidfile, `${process.pid}\n`);
    }
    this.qmp.releaseConnections();
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      await this.qmp.close().catch(() => undefined);
      await this.core.shutdown();
      if (this.opts.pidfile) await fsp.unlink(this.opts.pidfile).catch(() => undefined);
      clearInterval(this.keepAlive);
      this.stoppedResolve();
    })();
    return this.stopping;
  }
}

/** A listening TCP chardev's address as QEMU shows it (qom-get addr): numeric, with its family flag. */
function inetAddress(host: string, port: number): Record<string, unknown> {
  const family = isIP(host);
  return { host, port: String(port), ...(family === 4 ? { ipv4: true } : family === 6 ? { ipv6: true } : {}), type: 'inet' };
}
