/**
 * Running bitmirror's user-level commands (copy, backup, …) as a user does: the real bin/bitmirror
 * in a child process, its output collected, JSON progress lines parsed. For the terminal, tmux.ts.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { BITMIRROR_BIN } from '../../src/daemon/spawn.js';

export interface CliRun {
  proc: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  /** Resolves once stdout matches `pattern` (rejects if the process exits first). */
  waitStdout(pattern: RegExp): Promise<void>;
  /** Resolves with the exit code (or 128+N for a signal) once the process has exited. */
  exited: Promise<number>;
}

/** Start `bitmirror ARGS…` with pipes for its output. */
export function startCli(args: string[]): CliRun {
  const proc = spawn(process.execPath, [BITMIRROR_BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stdout!.setEncoding('utf8');
  proc.stderr!.setEncoding('utf8');
  proc.stdout!.on('data', (d: string) => (out += d));
  proc.stderr!.on('data', (d: string) => (err += d));
  const exited = new Promise<number>((resolve) =>
    proc.once('close', (code, signal) => resolve(code ?? 128 + (signal === 'SIGINT' ? 2 : signal === 'SIGTERM' ? 15 : 9))),
  );
  const waitStdout = (pattern: RegExp): Promise<void> =>
    new Promise((resolve, reject) => {
      const check = (): void => {
        if (pattern.test(out)) {
          proc.stdout!.off('data', check);
          resolve();
        }
      };
      proc.stdout!.on('data', check);
      check();
      void exited.then(() => (pattern.test(out) ? resolve() : reject(new Error(`bitmirror exited without printing ${String(pattern)}; stdout ${out}; stderr ${err}`))));
    });
  return { proc, stdout: () => out, stderr: () => err, waitStdout, exited };
}

/** Run `bitmirror ARGS…` to its end. */
export async function runCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const r = startCli(args);
  const code = await r.exited;
  return { code, stdout: r.stdout(), stderr: r.stderr() };
}

/** The JSON lines of a command's standard output (progress, message, result), each parsed. */
export function jsonLines(stdout: string): Array<Record<string, unknown>> {
  return stdout
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}
