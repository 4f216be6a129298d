/**
 * runJob: run one block job of a user-level command from its start to its end, as a management tool
 * would: start it (the caller's QMP command, with `auto-dismiss: false` so its result can be read),
 * follow its JOB_STATUS_CHANGE events, show its progress (query-jobs' current-progress/total-progress,
 * sampled a few times a second), decide at READY (a mirror: complete = switch over, or a soft cancel =
 * a consistent copy without switching), read its error once concluded, and dismiss it.
 *
 * If READY's decision is refused (job-complete fails: a bitmap that cannot be carried, …), the job is
 * cancelled and the outcome is `failed` with the refusal's message.
 *
 * A signal (Ctrl-C) while the job runs cancels it (job-cancel: a mirror stops without switching, its
 * source untouched) and the outcome says `interrupted`. Once the switch has begun (job-complete or the
 * soft cancel sent) a signal no longer stops it: the job finishes, and the outcome still says which
 * signal came, so the command can exit with 128+N after saying what it completed.
 */
import type { QmpClient, QmpEvent } from '../qmp/client.js';
import { errorMessage } from '../errors.js';
import { CliError } from './exit-codes.js';
import type { Progress } from './progress.js';
import type { SignalWatch } from './signals.js';

export interface RunJobOptions {
  /** The job's id (the `job-id` the start command gives it). */
  id: string;
  /** Sends the command that creates the job (with `auto-dismiss: false`). */
  start: () => Promise<unknown>;
  /** The phase name progress samples carry ("copy"); default: the job's id. */
  phase?: string;
  progress?: Progress;
  /** Signals that cancel the job while it runs. */
  signals?: SignalWatch;
  /**
   * For a job that becomes READY (mirror): switch over ('complete', the default) or end with a
   * consistent copy and no switch ('cancel', block-job-cancel without force).
   */
  whenReady?: () => 'complete' | 'cancel' | Promise<'complete' | 'cancel'>;
  /** How often progress is sampled, in ms (default 250). */
  sampleMs?: number;
}

export interface JobOutcome {
  /**
   * completed: the job ended without error (for a mirror: switched, or consistent copy after a soft
   * cancel); failed: it ended with an error; interrupted: a signal cancelled it before it finished.
   */
  status: 'completed' | 'failed' | 'interrupted';
  /** The job's error (query-jobs' `error`), when it has one. */
  error?: string;
  /** The signal that came while the job ran, if any (also when it came too late to stop the job). */
  signal?: NodeJS.Signals;
  /** Whether the job reached READY. */
  ready: boolean;
  /** What READY decided ('complete' or 'cancel'), if it was reached. */
  readyAction?: 'complete' | 'cancel';
  /** Bytes done and the total at the end (current-progress, total-progress). */
  done: number;
  total: number;
}

interface JobInfo {
  id: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

export async function runJob(qmp: QmpClient, opts: RunJobOptions): Promise<JobOutcome> {
  const { id } = opts;
  const phase = opts.phase ?? id;
  const statuses: string[] = [];
  let wake: (() => void) | undefined;
  const poke = (): void => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const offEvent = qmp.onEvent((ev: QmpEvent) => {
    if (ev.event === 'JOB_STATUS_CHANGE' && ev.data?.id === id) {
      statuses.push(String(ev.data.status));
      poke();
    }
  });
  let signal: NodeJS.Signals | undefined;
  const offSignal = opts.signals?.on((sig) => {
    signal ??= sig;
    poke();
  });
  const outcome: JobOutcome = { status: 'completed', ready: false, done: 0, total: 0 };
  let cancelSent = false;
  let finishing = false;
  /** Why job-complete (or the soft cancel) was refused, if it was. */
  let refusal: string | undefined;
  try {
    await opts.start();
    const sampleMs = opts.sampleMs ?? 250;
    let info: JobInfo | undefined;
    for (;;) {
      // Events first: they say what to do next; then a progress sample.
      while (statuses.length > 0) {
        const status = statuses.shift()!;
        if (status === 'ready' && !outcome.ready && !cancelSent) {
          outcome.ready = true;
          const action = (await opts.whenReady?.()) ?? 'complete';
          outcome.readyAction = action;
          // A signal that came before READY was seen already cancelled the job (below).
          if (!cancelSent) {
            finishing = true;
            try {
              if (action === 'complete') await qmp.execute('job-complete', { id });
              else await qmp.execute('block-job-cancel', { device: id });
            } catch (err) {
              // Refused (a bitmap that cannot be carried…): the job stays READY and nothing switched.
              // It is cancelled (the source untouched) and fails with the refusal's words.
              refusal = errorMessage(err);
              cancelSent = true;
              await qmp.execute('job-cancel', { id });
            }
          }
        }
        if (status === 'concluded') {
          info = await queryJob(qmp, id);
          if (info) {
            outcome.done = info['current-progress'];
            outcome.total = info['total-progress'];
            outcome.error = info.error;
            opts.progress?.update({ phase, done: outcome.done, total: outcome.total }, true);
          }
          await qmp.execute('job-dismiss', { id });
          outcome.signal = signal;
          if (refusal !== undefined) {
            outcome.status = 'failed';
            outcome.error = refusal;
          } else if (cancelSent) outcome.status = outcome.error === undefined ? 'completed' : 'interrupted';
          else outcome.status = outcome.error === undefined ? 'completed' : 'failed';
          return outcome;
        }
      }
      if (signal && !cancelSent && !finishing) {
        cancelSent = true;
        // job-cancel is a forced cancel: a mirror ends without switching, even when READY.
        await qmp.execute('job-cancel', { id }).catch(() => undefined);
      }
      info = await queryJob(qmp, id);
      if (!info) throw new CliError(`the job '${id}' disappeared`);
      opts.progress?.update({ phase, done: info['current-progress'], total: info['total-progress'] });
      if (statuses.length > 0 || (signal && !cancelSent && !finishing)) continue;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, sampleMs);
        wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  } catch (err) {
    if (err instanceof CliError) throw err;
    if (qmp.isClosed) throw new CliError(`lost the connection to the daemon while job '${id}' ran`);
    throw new CliError(errorMessage(err));
  } finally {
    offEvent();
    offSignal?.();
  }
}

async function queryJob(qmp: QmpClient, id: string): Promise<JobInfo | undefined> {
  const jobs = await qmp.execute<JobInfo[]>('query-jobs');
  return jobs.find((j) => j.id === id);
}
