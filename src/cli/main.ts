/**
 * bitmirror's command line: `bitmirror daemon …` (qemu-storage-daemon-like) and `bitmirror demo`.
 */
import { Daemon } from '../daemon/daemon.js';
import { DAEMON_USAGE, parseDaemonArgs, UsageError } from './daemon-args.js';
import { errorMessage } from '../errors.js';
import { runDemo } from './demo.js';

const USAGE = `Usage: bitmirror <command> [options]
Commands:
  daemon   run the storage daemon (see 'bitmirror daemon --help')
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
  const daemon = new Daemon(parsed);
  // Bugs must not take the daemon down with other clients' work: report them and carry on.
  process.on('unhandledRejection', (reason) => process.stderr.write(`bitmirror: internal error: ${errorMessage(reason)}\n`));
  process.on('uncaughtException', (err) => process.stderr.write(`bitmirror: internal error: ${err.stack ?? err.message}\n`));
  try {
    await daemon.start();
  } catch (err) {
    process.stderr.write(`bitmirror daemon: ${errorMessage(err)}\n`);
    await daemon.stop();
    return 1;
  }
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(sig, () => void daemon.stop());
  await daemon.stopped;
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case 'daemon':
      return daemonMain(rest);
    case 'demo':
      return runDemo(rest);
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
