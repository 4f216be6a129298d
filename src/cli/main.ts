/**
 * bitmirror's command line: `bitmirror daemon …` (qemu-storage-daemon-like), `bitmirror copy` and
 * `bitmirror demo`.
 */
import { spawn } from 'node:child_process';
import { closeSync, writeSync } from 'node:fs';
import { DAEMON_USAGE, parseDaemonArgs, UsageError } from './daemon-args.js';
import { errorMessage } from '../errors.js';
import { EMBEDDED_DAEMON_ENV } from '../daemon/spawn.js';

const USAGE = `Usage: bitmirror <command> [options]
Commands:
  daemon   run the storage daemon (see 'bitmirror daemon --help')
  copy     copy a disk live, with its dirty bitmaps (see 'bitmirror copy --help')
  backup   full and incremental backups of a disk into a qcow2 chain (see 'bitmirror backup --help')
  bitmap   list, change and show a disk's dirty bitmaps (see 'bitmirror bitmap --help')
  demo     show what bitmirror does, in a temporary folder, on built-in defaults
`;

async function daemonMain(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseDaemonArgs(argv);
  } catch (err) {
    process.stderr.write(`bitmirror daemon: ${errorMessage(err)}\n`);
    return 1;
  }
  if (parsed === 'help') {
    process.stdout.write(DAEMON_USAGE);
    return 0;
  }
  // --daemonize: the parent starts the daemon in a new session and exits once its startup is complete.
  if (parsed.daemonize && process.env[DAEMONIZED_CHILD] === undefined) return daemonizeParent(argv);
  const report = parsed.daemonize ? daemonizedChildReport() : undefined;
  const { Daemon } = await import('../daemon/daemon.js');
  const daemon = new Daemon(parsed);
  // Bugs must not take the daemon down with other clients' work: report them and carry on.
  process.on('unhandledRejection', (reason) => process.stderr.write(`bitmirror: internal error: ${errorMessage(reason)}\n`));
  process.on('uncaughtException', (err) => process.stderr.write(`bitmirror: internal error: ${err.stack ?? err.message}\n`));
  try {
    await daemon.start();
  } catch (err) {
    process.stderr.write(`bitmirror daemon: ${errorMessage(err)}\n`);
    report?.(`bitmirror daemon: ${errorMessage(err)}`);
    await daemon.stop();
    return 1;
  }
  if (report) {
    // As QEMU's os_setup_post: the working directory is '/' once started.
    process.chdir('/');
    report();
  }
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(sig, () => void daemon.stop());
  if (process.env[EMBEDDED_DAEMON_ENV] !== undefined) {
    // An embedded daemon (bitmirror copy on image files…) ends with the command that started it.
    process.stdin.on('end', () => void daemon.stop());
    process.stdin.on('error', () => void daemon.stop());
    process.stdin.resume();
  }
  await daemon.stopped;
  return 0;
}

/** Set in the environment of the process --daemonize starts (the daemon itself). */
const DAEMONIZED_CHILD = 'BITMIRROR_DAEMONIZED_CHILD';

/**
 * QEMU's os_daemonize, without fork: run this command again as a detached process (a new session,
 * standard input/output/error on /dev/null) and wait on a pipe (its fd 3) until it says its startup is
 * complete ("" ) or failed (the message, printed here); exit 0 or 1 accordingly.
 */
async function daemonizeParent(argv: string[]): Promise<number> {
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1], 'daemon', ...argv], {
    detached: true,
    stdio: ['ignore', 'ignore', 'ignore', 'pipe'],
    env: { ...process.env, [DAEMONIZED_CHILD]: '1' },
  });
  let said = '';
  const pipe = child.stdio[3] as NodeJS.ReadableStream;
  pipe.setEncoding('utf8');
  pipe.on('data', (d: string) => (said += d));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await Promise.race([new Promise<void>((resolve) => pipe.once('end', () => resolve())), exited]);
  if (said.startsWith('ok')) {
    child.unref();
    return 0;
  }
  process.stderr.write(said ? `${said.trimEnd()}\n` : 'bitmirror daemon: the daemon exited during startup\n');
  return 1;
}

/** In the daemonized process: tell the parent (fd 3) that startup is complete, or why it failed. */
function daemonizedChildReport(): (error?: string) => void {
  return (error) => {
    try {
      writeSync(3, error === undefined ? 'ok\n' : `${error}\n`);
      closeSync(3);
    } catch {
      // The parent is gone: nobody to tell.
    }
  };
}

/**
 * Each command loads only its own modules: the daemon's resident memory holds none of the workflows'
 * code (about 1 MiB of V8 heap and code), and a workflow, which talks to a daemon, none of the daemon's.
 */
export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case 'daemon':
      return daemonMain(rest);
    case 'copy':
      return (await import('./copy.js')).copyMain(rest);
    case 'bitmap':
      return (await import('./bitmap.js')).bitmapMain(rest);
    case 'backup':
      return (await import('./backup.js')).backupMain(rest);
    case 'demo':
      return (await import('./demo.js')).runDemo(rest);
    case '-h':
    case '--help':
    case undefined:
      process.stdout.write(USAGE);
      return cmd === undefined ? 1 : 0;
    default:
      process.stderr.write(`bitmirror: unknown command '${cmd}'\n${USAGE}`);
      return 1;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`bitmirror: ${err instanceof UsageError ? err.message : errorMessage(err)}\n`);
    process.exit(1);
  },
);
