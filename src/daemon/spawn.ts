/**
 * Start a bitmirror daemon (or qemu-storage-daemon, for comparisons) as a child process on a unix
 * socket and connect a QMP client to it. Used by the CLI workflows and the tests.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import * as path from 'node:path';
import { QmpClient } from '../qmp/client.js';

/** bin/bitmirror, found from this module's place in dist/src/daemon/. */
export const BITMIRROR_BIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../bin/bitmirror');

export interface SpawnedDaemon {
  proc: ChildProcess;
  qmp: QmpClient;
  socket: string;
  /** stderr collected so far (trace output, internal errors). */
  stderr: () => string;
  /** stdout collected so far (HMP qemu-io's text). */
  stdout: () => string;
  /**
   * Resolves once the text collected from stdout or stderr matches `pattern`. Those pipes are not
   * ordered with the QMP socket: a line written before a reply may arrive after it, so whoever expects
   * output waits for it here. Rejects when the pipe closes without it (or after `timeoutMs`, a safety
   * net that only names what is missing).
   */
  waitOutput(stream: 'stdout' | 'stderr', pattern: RegExp | string, timeoutMs?: number): Promise<void>;
  /** quit over QMP (or SIGTERM if that fails) and wait for the process to exit; resolves with its exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL, for crash tests. */
  kill(): Promise<void>;
}

export interface SpawnOptions {
  /**
   * The largest file the daemon may write, in bytes (RLIMIT_FSIZE, with SIGXFSZ ignored): a write
   * past it fails with EFBIG, "File too large". For tests of write failures.
   */
  maxFileSize?: number;
  /**
   * An embedded daemon, private to one CLI command: its own process group (a Ctrl-C on the terminal
   * reaches only the command, which cancels its work and then stops the daemon) and tied to the
   * command by a pipe on its standard input, so that it stops when the command dies, however it dies.
   */
  embedded?: boolean;
  /** Run the daemon in this network namespace (`ip netns exec`; needs root), for tests across hosts. */
  netns?: string;
  /** Options for node itself, before bin/bitmirror (e.g. `--cpu-prof` for a benchmark's profile). */
  nodeArgs?: string[];
}

/** Set in an embedded daemon's environment: it stops when its standard input ends (see SpawnOptions.embedded). */
export const EMBEDDED_DAEMON_ENV = 'BITMIRROR_EMBEDDED_DAEMON';

export async function spawnDaemon(
  socket: string,
  extraArgs: string[] = [],
  program: 'bitmirror' | 'qemu-storage-daemon' = 'bitmirror',
  opts: SpawnOptions = {},
): Promise<SpawnedDaemon> {
  const args = ['--chardev', `socket,path=${socket},server=on,wait=off,id=mon0`, '--monitor', 'chardev=mon0', ...extraArgs];
  let command = program === 'bitmirror' ? [process.execPath, ...(opts.nodeArgs ?? []), BITMIRROR_BIN, 'daemon', ...args] : ['qemu-storage-daemon', ...args];
  if (opts.maxFileSize !== undefined) {
    // An ignored signal stays ignored across exec, so the limit makes writes fail instead of killing.
    command = ['bash', '-c', 'trap "" XFSZ; exec prlimit --fsize="$0" -- "$@"', String(opts.maxFileSize), ...command];
  }
  // ip netns exec execs the daemon itself: the child's pid stays the daemon's.
  if (opts.netns !== undefined) command = ['ip', 'netns', 'exec', opts.netns, ...command];
  const proc = opts.embedded
    ? spawn(command[0], command.slice(1), { stdio: ['pipe', 'pipe', 'pipe'], detached: true, env: { ...process.env, [EMBEDDED_DAEMON_ENV]: '1' } })
    : spawn(command[0], command.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (d: string) => (err += d));
  let out = '';
  proc.stdout!.setEncoding('utf8');
  proc.stdout!.on('data', (d: string) => (out += d));
  const collected = { stdout: () => out, stderr: () => err };
  const waitOutput = (stream: 'stdout' | 'stderr', pattern: RegExp | string, timeoutMs = 60_000): Promise<void> => {
    const pipe = stream === 'stdout' ? proc.stdout! : proc.stderr!;
    const found = (): boolean => (typeof pattern === 'string' ? collected[stream]().includes(pattern) : pattern.test(collected[stream]()));
    return new Promise<void>((resolve, reject) => {
      const finish = (error?: string): void => {
        pipe.off('data', onData);
        pipe.off('close', onClose);
        clearTimeout(timer);
        if (error) reject(new Error(`${program} ${stream}: ${error} ${String(pattern)}; got ${JSON.stringify(collected[stream]())}`));
        else resolve();
      };
      // Listeners run in registration order: the collector above has already appended the chunk.
      const onData = (): void => void (found() && finish());
      const onClose = (): void => finish(found() ? undefined : 'closed without');
      const timer = setTimeout(() => finish('timed out waiting for'), timeoutMs);
      pipe.on('data', onData);
      pipe.on('close', onClose);
      if (found()) finish();
      else if (pipe.destroyed) onClose();
    });
  };
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  let qmp: QmpClient | undefined;
  for (let i = 0; i < 200 && !qmp; i++) {
    if (proc.exitCode !== null) throw new Error(`${program} exited with ${proc.exitCode}: ${err}`);
    try {
      qmp = await QmpClient.connect(socket);
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  if (!qmp) {
    proc.kill('SIGKILL');
    throw new Error(`${program} did not open its monitor socket: ${err}`);
  }
  const client = qmp;
  return {
    proc,
    qmp: client,
    socket,
    stderr: () => err,
    stdout: () => out,
    waitOutput,
    async stop() {
      if (proc.exitCode !== null) return proc.exitCode;
      try {
        await client.execute('quit');
      } catch {
        proc.kill('SIGTERM');
      }
      const t = setTimeout(() => proc.kill('SIGKILL'), 30_000);
      const code = await exited;
      clearTimeout(t);
      client.close();
      return code;
    },
    async kill() {
      proc.kill('SIGKILL');
      await exited;
      client.close();
    },
  };
}
