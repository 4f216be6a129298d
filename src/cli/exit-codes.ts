/**
 * The exit codes and error type of bitmirror's user-level commands (copy, backup, bitmap). Scripts
 * rely on these numbers: README's table documents them, and they never change meaning.
 *
 *   0    done
 *   1    failed: the work did not complete (the message on stderr says why and what is left)
 *   2    usage: bad arguments or a refused precondition; nothing was changed
 *   3    verification found a difference (the work itself completed)
 *   128+N  stopped by signal N (130 for Ctrl-C, 143 for SIGTERM) after a clean cancel
 */
import { constants } from 'node:os';

export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_VERIFY = 3;

/** 128 + the signal's number, as a shell reports a process a signal stopped. */
export function exitCodeForSignal(signal: NodeJS.Signals): number {
  return 128 + (constants.signals[signal] ?? 0);
}

/**
 * A failure to report to the user: one message (printed as `bitmirror COMMAND: message`) and the
 * exit code it ends the command with.
 */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = EXIT_FAILED,
  ) {
    super(message);
    this.name = 'CliError';
  }
}

/** A usage error: bad arguments; nothing was done (exit code 2). */
export function usageError(message: string): CliError {
  return new CliError(message, EXIT_USAGE);
}
