/**
 * SignalWatch: what a user-level command does with SIGINT (Ctrl-C), SIGTERM and SIGHUP while it
 * works. Instead of dying on the spot (node's default), the command notes the signal and tells whoever
 * listens (the job runner cancels its job); the command then cleans up and exits with 128+N
 * (exit-codes.ts). Create one per command, dispose() it at the end.
 */
import { CliError, exitCodeForSignal } from './exit-codes.js';

/** Thrown between steps once a signal came: the command stops there and cleans up. */
export class InterruptedError extends CliError {
  constructor(readonly signal: NodeJS.Signals) {
    super(`interrupted by ${signal}`, exitCodeForSignal(signal));
    this.name = 'InterruptedError';
  }
}

export class SignalWatch {
  /** The first signal received, if any. */
  signal: NodeJS.Signals | undefined;
  private readonly listeners = new Set<(signal: NodeJS.Signals) => void>();
  private readonly handlers = new Map<NodeJS.Signals, () => void>();

  constructor(signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    for (const sig of signals) {
      const handler = (): void => {
        this.signal ??= sig;
        for (const l of [...this.listeners]) l(sig);
      };
      this.handlers.set(sig, handler);
      process.on(sig, handler);
    }
  }

  /** Call `listener` on every signal from now on; returns the function that removes it. */
  on(listener: (signal: NodeJS.Signals) => void): () => void {
    this.listeners.add(listener);
    return () => void this.listeners.delete(listener);
  }

  /** Throw InterruptedError if a signal came (call between steps). */
  throwIfSignalled(): void {
    if (this.signal) throw new InterruptedError(this.signal);
  }

  /** Give the signals back to node's defaults. */
  dispose(): void {
    for (const [sig, handler] of this.handlers) process.off(sig, handler);
    this.handlers.clear();
    this.listeners.clear();
  }
}
