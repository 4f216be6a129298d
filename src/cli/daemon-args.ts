/**
 * `bitmirror daemon` command line, a drop-in for qemu-storage-daemon's: --chardev, --monitor,
 * --blockdev (key=value or JSON), --nbd-server, --export, --trace, --pidfile. Errors are UsageErrors with a one-line message.
 */
import { parseKeyval } from '../qapi/schema.js';
import { parseJsonText } from '../qmp/json.js';
import { errorMessage } from '../errors.js';
import type { DaemonOptions } from '../daemon/daemon.js';
import type { ListenAddress } from '../qmp/server.js';

export class UsageError extends Error {}

export const DAEMON_USAGE = `Usage: bitmirror daemon [options]
A storage daemon with QEMU's block layer behaviour, driven over QMP (qemu-storage-daemon compatible).

  --chardev socket,id=ID,path=PATH[,server=on,wait=off]   a unix socket for a monitor
  --chardev socket,id=ID,host=HOST,port=PORT[,server=on,wait=off]   a TCP socket for a monitor
  --chardev stdio,id=ID   standard input and output, for a monitor
  --monitor [chardev=]ID[,mode=control][,pretty=off]   run a QMP monitor on a chardev
  --object throttle-group,id=ID[,limits.bps-total=N…]   create an object (also JSON: '{"qom-type": …}')
  --object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64][,keyid=ID,iv=IV]   a password or key (rbd key-secret)
  --blockdev [driver=]DRIVER[,node-name=N][,prop=value…]   open a block node (also JSON: '{"driver": …}')
  --nbd-server addr.type=unix,addr.path=PATH|addr.type=inet,addr.host=H,addr.port=P[,max-connections=N]
                             start the NBD server
  --export [type=]nbd,id=ID,node-name=NODE[,name=N][,writable=on][,bitmaps.0=B][,allocation-depth=on]
                             export a node over NBD
  --trace [[enable=]PATTERN][,events=FILE][,file=FILE]   enable trace points matching PATTERN (glob),
        or those a FILE lists (a pattern a line, '-PATTERN' disables, '#' comments); trace output
        goes to file=FILE instead of standard error
  --pidfile PATH   write the process id to PATH
  --daemonize   run in the background; the command exits once the daemon has started
  -h, --help   this help
`;

function parseJsonOption(opt: string, text: string): Record<string, unknown> {
  try {
    return parseJsonText(text) as Record<string, unknown>;
  } catch (err) {
    throw new UsageError(`${opt}: invalid JSON: ${errorMessage(err)}`);
  }
}

function value(argv: string[], i: number, opt: string): string {
  const v = argv[i + 1];
  if (v === undefined) throw new UsageError(`option '${opt}' requires an argument`);
  return v;
}

export function parseDaemonArgs(argv: string[]): DaemonOptions | 'help' {
  const chardevs = new Map<string, ListenAddress>();
  const monitorIds: string[] = [];
  const opts: DaemonOptions = { monitors: [], blockdevs: [], objects: [], tracePatterns: [], traceEventsFiles: [], exports: [] };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let inline: string | undefined;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      inline = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const take = () => inline ?? value(argv, i++, arg);
    try {
      switch (arg) {
        case '-h':
        case '--help':
          return 'help';
        case '--chardev': {
          const kv = parseKeyval(take(), 'backend');
          if (kv.backend !== 'socket' && kv.backend !== 'stdio') throw new UsageError(`chardev backend '${String(kv.backend)}' is not supported (only 'socket' and 'stdio')`);
          const id = kv.id as string | undefined;
          if (!id) throw new UsageError('chardev: "id" is required');
          if (chardevs.has(id)) throw new UsageError(`attempt to add duplicate property '${id}' to object (type 'container')`);
          if (kv.backend === 'stdio') {
            // signal= (whether ^C on a terminal is a signal) changes nothing for a pipe; it is accepted.
            for (const k of Object.keys(kv)) if (!['backend', 'id', 'signal', 'logfile', 'logappend', 'mux'].includes(k)) throw new UsageError(`Invalid parameter '${k}'`);
            if ([...chardevs.values()].some((c) => c.kind === 'stdio')) throw new UsageError("cannot use stdio by multiple character devices");
            chardevs.set(id, { kind: 'stdio' });
            break;
          }
          if (kv.server !== undefined && kv.server !== 'on' && kv.server !== 'yes') throw new UsageError(`chardev '${id}': only server=on sockets are supported`);
          let addr: ListenAddress;
          if (kv.path !== undefined) addr = { kind: 'unix', path: kv.path as string };
          else if (kv.port !== undefined) {
            const port = Number(kv.port);
            if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`chardev '${id}': invalid port '${String(kv.port)}'`);
            // qemu-storage-daemon 7.2 opens no listener for port= without host=; listening on every
            // interface instead would expose an unauthenticated monitor, so the address must be explicit.
            // (host= with an empty value listens on every interface, as in QEMU.)
            if (kv.host === undefined) throw new UsageError(`chardev '${id}': port= needs host= (host=127.0.0.1 for this machine only, host=0.0.0.0 for every interface)`);
            addr = { kind: 'tcp', host: kv.host as string, port };
          } else throw new UsageError(`chardev '${id}': socket needs path=… or host=…,port=…`);
          chardevs.set(id, addr);
          break;
        }
        case '--monitor': {
          const kv = parseKeyval(take(), 'chardev');
          if (kv.mode !== undefined && kv.mode !== 'control') throw new UsageError("Only QMP monitors are supported (mode=control)");
          monitorIds.push(kv.chardev as string);
          break;
        }
        case '--object': {
          const text = take();
          if (text.trimStart().startsWith('{')) opts.objects.push({ options: parseJsonOption('--object', text), keyval: false });
          else opts.objects.push({ options: parseKeyval(text, 'qom-type'), keyval: true });
          break;
        }
        case '--blockdev': {
          const text = take();
          if (text.trimStart().startsWith('{')) opts.blockdevs.push({ options: parseJsonOption('--blockdev', text), keyval: false });
          else opts.blockdevs.push({ options: parseKeyval(text, 'driver'), keyval: true });
          break;
        }
        case '--nbd-server':
          if (opts.nbdServer) throw new UsageError('--nbd-server: only one NBD server can be started');
          opts.nbdServer = parseKeyval(take());
          break;
        case '--export':
          opts.exports.push(parseKeyval(take(), 'type'));
          break;
        case '--trace': {
          const kv = parseKeyval(take(), 'enable');
          for (const k of Object.keys(kv)) if (k !== 'enable' && k !== 'events' && k !== 'file') throw new UsageError(`Invalid parameter '${k}'`);
          if (kv.enable !== undefined) opts.tracePatterns.push(kv.enable as string);
          if (kv.events !== undefined) opts.traceEventsFiles.push(kv.events as string);
          if (kv.file !== undefined) opts.traceFile = kv.file as string;
          break;
        }
        case '--pidfile':
          opts.pidfile = take();
          break;
        case '--daemonize':
          opts.daemonize = true;
          break;
        default:
          throw new UsageError(`unrecognized option '${argv[i]}'`);
      }
    } catch (err) {
      if (err instanceof UsageError) throw err;
      throw new UsageError(`${arg}: ${errorMessage(err)}`);
    }
  }
  if (opts.daemonize && [...chardevs.values()].some((c) => c.kind === 'stdio')) throw new UsageError('cannot use stdio with -daemonize');
  opts.chardevs = [...chardevs].map(([id, addr]) => ({ id, addr }));
  for (const id of monitorIds) {
    const addr = chardevs.get(id);
    if (!addr) throw new UsageError(`chardev "${id}" not found`);
    opts.monitors.push(addr);
  }
  return opts;
}
