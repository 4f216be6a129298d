/**
 * Job: the state machine every long-running operation (create, mirror, backup, …) shares, as QEMU's
 * job.c and blockjob.c define it (qapi/job.json): statuses, the transition table, the verb table and its
 * refusals, reference-counted pause with pause points, soft and force cancel, rate limiting, progress,
 * auto-finalize/auto-dismiss, transactions, and the events and query data QMP clients see.
 *
 * A job type subclasses Job and implements `run()`. Inside run:
 * - call `await this.pausePoint()` (or `await this.sleep(ms)`, or `await this.ratelimitSleep()`) often:
 *   that is where a pause takes effect ('paused', or 'standby' when ready);
 * - return as soon as `this.isCancelled()` (force cancel) is true;
 *   `this.cancelRequested` is also true after a soft cancel, which only jobs that override `onCancel` see;
 * - report progress with `progressSetRemaining`/`progressUpdate`, and bytes done with `ratelimitProcessed`;
 * - call `this.transitionToReady()` when the job is ready for job-complete (mirror);
 * - throw to fail: the message becomes the `error` of query-jobs and BLOCK_JOB_COMPLETED;
 *   `errorAction()` applies an on-source-error/on-target-error policy and emits BLOCK_JOB_ERROR.
 * After run, the group (JobTxn) decides: prepare() then commit() or abort(), then clean(), in
 * QEMU's order. Verbs a type supports beyond the common ones: doComplete (job-complete) and
 * doChange (block-job-change); onCancel decides whether a cancel is forced.
 */
import { genericError, errorCode, errorMessage, strerror } from '../errors.js';
import { tracer } from '../trace/trace.js';
import { errorActionFor, type ErrorAction, type OnError } from '../block/copy/error-action.js';
import { RateLimiter } from './rate-limit.js';
import type { EventBus } from '../base/events.js';
import { JobTxn, type JobTxnMember } from './txn.js';

export const JOB_STATUSES = [
  'undefined',
  'created',
  'running',
  'paused',
  'ready',
  'standby',
  'waiting',
  'pending',
  'aborting',
  'concluded',
  'null',
] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];

export const JOB_TYPES = ['commit', 'stream', 'mirror', 'backup', 'create', 'amend', 'snapshot-load', 'snapshot-save', 'snapshot-delete'] as const;
export type JobType = (typeof JOB_TYPES)[number];

export const JOB_VERBS = ['cancel', 'pause', 'resume', 'set-speed', 'complete', 'dismiss', 'finalize', 'change'] as const;
export type JobVerb = (typeof JOB_VERBS)[number];

/** Which status may follow which (QEMU's JobSTT). */
export const JOB_TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  undefined: ['created'],
  created: ['running', 'aborting', 'null'],
  running: ['paused', 'ready', 'waiting', 'aborting'],
  paused: ['running'],
  ready: ['standby', 'waiting', 'aborting'],
  standby: ['ready'],
  waiting: ['pending', 'aborting'],
  pending: ['aborting', 'concluded'],
  aborting: ['aborting', 'concluded'],
  concluded: ['null'],
  null: [],
};

/** In which statuses a job accepts each command verb (QEMU's JobVerbTable). */
export const JOB_VERB_TABLE: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  change: ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready', 'standby'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

export type IoStatus = 'ok' | 'failed' | 'nospace';
export type { ErrorAction, OnError };

/**
 * Where a job is registered (JobRegistry): the id checks, the list query-jobs shows and the events.
 * Declared here, not imported, so that job.ts does not depend on registry.ts (which lists Jobs).
 */
export interface JobHost {
  readonly events: EventBus;
  /** Refuse an id that is malformed or taken, with QEMU's message. */
  checkNewId(id: string): void;
  add(job: Job): void;
  /** The job was dismissed ('null'). */
  remove(job: Job): void;
}

export interface JobOptions {
  /** The job id (already a string; checked here as QEMU does). */
  id: string;
  /** Default true. */
  autoFinalize?: boolean;
  /** Default true. */
  autoDismiss?: boolean;
  /** Bytes per second, 0 = unlimited. */
  speed?: number;
  /** The group to finalize/abort with; a group of its own when absent. */
  txn?: JobTxn;
}

const traceTransition = tracer.point('job_state_transition');
const traceVerb = tracer.point('job_apply_verb');
const traceCompleted = tracer.point('job_completed');
const tracePause = tracer.point('qmp_job_pause');
const traceResume = tracer.point('qmp_job_resume');
const traceCancel = tracer.point('qmp_job_cancel');
const traceComplete = tracer.point('qmp_job_complete');
const traceFinalize = tracer.point('qmp_job_finalize');
const traceDismiss = tracer.point('qmp_job_dismiss');

/** The error a force-cancelled job ends with. */
function cancelledError(): Error {
  const e = new Error(strerror('ECANCELED')) as Error & { code: string };
  e.code = 'ECANCELED';
  return e;
}

/** kick's call of one waiter (one function for every kick, not a closure each). */
const callWaiter = (w: () => void): void => w();

export abstract class Job {
  /** JobType: 'mirror', 'backup', 'create', … */
  abstract readonly type: JobType;
  /**
   * Block jobs (mirror, backup, commit, stream) show in query-block-jobs, answer block-job-* commands
   * and emit BLOCK_JOB_* events. QEMU's create job is not one: it emits only JOB_STATUS_CHANGE.
   */
  readonly isBlockJob: boolean = true;

  readonly id: string;
  readonly registry: JobHost;
  readonly txn: JobTxn;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  protected readonly limiter: RateLimiter;

  private _status: JobStatus = 'undefined';
  /** Progress in the job's own units (bytes for block jobs): current-progress / offset. */
  progressCurrent = 0;
  /** total-progress / len. May grow while the job runs. */
  progressTotal = 0;

  /** Pause requests outstanding (user pause counts once; internal pauses, e.g. drains, add to it). */
  private pauseCount = 0;
  /** Paused by job-pause/block-job-pause or by an error policy 'stop' (resumed by the user). */
  private _userPaused = false;
  /** Stopped at a pause point right now. */
  private _paused = false;
  /** Running code right now (not sleeping, yielded or paused). */
  private _busy = false;
  private sleeping = false;
  /** Resolvers of the job's current yields (normally one; more when a yield is raced and abandoned). */
  private readonly waiters = new Set<() => void>();
  private yields = 0;

  private started = false;
  /** A cancel was requested (soft or force). */
  private _cancelRequested = false;
  /** The cancel is a force cancel: the job stops as soon as it can, and reports BLOCK_JOB_CANCELLED. */
  private forceCancel = false;
  private _ioStatus: IoStatus = 'ok';
  /** Why the job failed (set when it fails or is cancelled); undefined while it has not. */
  private _error: string | undefined;
  private _errorCode: string | undefined;

  private runEndedResolve!: () => void;
  /** Resolves when run() has returned or thrown (or the job was cancelled before it started). */
  readonly runEnded: Promise<void> = new Promise((r) => (this.runEndedResolve = r));
  private hasRunEnded = false;
  private concludedResolve!: () => void;
  /** Resolves when the job reaches 'concluded' (also when it goes straight on to 'null'). */
  readonly concluded: Promise<void> = new Promise((r) => (this.concludedResolve = r));

  /** The part of this job its group (JobTxn) drives. */
  private readonly member: JobTxnMember;

  constructor(registry: JobHost, opts: JobOptions) {
    registry.checkNewId(opts.id);
    this.id = opts.id;
    this.registry = registry;
    this.autoFinalize = opts.autoFinalize ?? true;
    this.autoDismiss = opts.autoDismiss ?? true;
    this.limiter = new RateLimiter(opts.speed ?? 0);
    this.member = {
      autoFinalize: this.autoFinalize,
      runEnded: this.runEnded,
      isCompleted: () => this.isCompleted(),
      isConcludedOrNull: () => this.isConcludedOrNull(),
      toWaiting: () => this.transition('waiting'),
      toPending: () => this.transitionToPending(),
      prepare: () => this.runPrepare(),
      cancelForAbort: () => this.cancelForTxnAbort(),
      finalizeCommitted: () => this.finalizeSingle(),
      finalizeAborted: async () => {
        this.markAborted();
        await this.finalizeSingle();
      },
    };
    this.txn = opts.txn ?? new JobTxn();
    this.txn.add(this.member);
    registry.add(this);
    this.transition('created');
  }

  // ---- what subclasses implement ------------------------------------------------------------------

  /** The job's work. Return on success (or when force-cancelled); throw to fail. */
  protected abstract run(): Promise<void>;

  /** job-complete (mirror: pivot when done). Undefined: "The active block job 'x' cannot be completed". */
  protected doComplete?(): void | Promise<void>;

  /** block-job-change. Undefined: "Job type does not support change". */
  protected doChange?(opts: Record<string, unknown>): void | Promise<void>;

  /**
   * Decide whether a cancel request is forced. The default forces every cancel, as QEMU does for jobs
   * without a cancel callback; mirror returns `force || !ready` so that a soft cancel after READY lets
   * it finish without pivot.
   */
  protected onCancel(force: boolean): boolean {
    void force;
    return true;
  }

  /**
   * A soft cancel (one onCancel did not force) is about to be accepted: throw to refuse it with
   * nothing changed (mirror: bitmaps that could not be carried onto the target).
   */
  protected checkSoftCancel?(): void | Promise<void>;

  /** Finalization hooks (QEMU's .prepare, .commit, .abort, .clean). prepare may fail, aborting the group. */
  protected async prepare(): Promise<void> {}
  protected async commit(): Promise<void> {}
  protected async abort(): Promise<void> {}
  protected async clean(): Promise<void> {}
  /**
   * The job is gone (dismissed, or failed before it started): QEMU's .free. What the job held until
   * then is let go here (commit keeps its claims on the nodes it worked on until it is dismissed).
   */
  protected free(): void {}

  /**
   * Called when a pause takes effect, and when the job resumes from it (QEMU's .pause/.resume). The job
   * becomes 'paused' only once onPause has returned: a job waits here for the I/O it has started, so
   * that a paused job changes nothing (mirror's copies).
   */
  protected onPause(): void | Promise<void> {}
  protected onResume(): void {}

  /** Extra members of this job's query-block-jobs entry (mirror: actively-synced). */
  protected extraBlockJobInfo(): Record<string, unknown> {
    return {};
  }

  // ---- state --------------------------------------------------------------------------------------

  get status(): JobStatus {
    return this._status;
  }
  get userPaused(): boolean {
    return this._userPaused;
  }
  /** pause_count > 0: query-block-jobs' `paused`. */
  get pausedRequested(): boolean {
    return this.pauseCount > 0;
  }
  /** Whether the job is stopped at a pause point. */
  get paused(): boolean {
    return this._paused;
  }
  get busy(): boolean {
    return this._busy;
  }
  get speed(): number {
    return this.limiter.getSpeed();
  }
  get ioStatus(): IoStatus {
    return this._ioStatus;
  }
  /** Failure message (also "Operation canceled" after a force cancel); undefined on success. */
  get error(): string | undefined {
    return this._error;
  }
  get cancelRequested(): boolean {
    return this._cancelRequested;
  }
  /** A force cancel: run() should return as soon as possible. */
  isCancelled(): boolean {
    return this._cancelRequested && this.forceCancel;
  }
  /** READY or STANDBY (job_is_ready). */
  isReady(): boolean {
    return this._status === 'ready' || this._status === 'standby';
  }
  /** The run has ended and the job is being or has been finalized (job_is_completed). */
  isCompleted(): boolean {
    return ['waiting', 'pending', 'aborting', 'concluded', 'null'].includes(this._status);
  }
  isConcludedOrNull(): boolean {
    return this._status === 'concluded' || this._status === 'null';
  }

  /** Change status, checked against the transition table; emits JOB_STATUS_CHANGE when it changes. */
  private transition(to: JobStatus): void {
    const from = this._status;
    const allowed = JOB_TRANSITIONS[from].includes(to);
    traceTransition({ job: this.id, from, to, allowed: allowed ? 'allowed' : 'disallowed' });
    if (!allowed) throw new Error(`job '${this.id}': invalid status transition ${from} -> ${to}`);
    this._status = to;
    if (from !== to) this.registry.events.emit('JOB_STATUS_CHANGE', { id: this.id, status: to });
  }

  /** Refuse a verb the current status does not accept, in QEMU's words. */
  applyVerb(verb: JobVerb): void {
    const ok = JOB_VERB_TABLE[verb].includes(this._status);
    traceVerb({ job: this.id, status: this._status, verb, result: ok ? 'allowed' : 'prohibited' });
    if (!ok) throw genericError(`Job '${this.id}' in state '${this._status}' cannot accept command verb '${verb}'`);
  }

  // ---- start and run ------------------------------------------------------------------------------

  /** created → running, and run the job in the background. */
  start(): void {
    if (this.started || this._status !== 'created') throw new Error(`job '${this.id}' cannot start in status ${this._status}`);
    this.started = true;
    this.transition('running');
    this._busy = true;
    void this.runToCompletion().catch((err) => {
      // A bug in a finalization hook; keep the daemon alive and make it visible.
      process.stderr.write(`bitmirror: internal error in job '${this.id}': ${errorMessage(err)}\n`);
    });
  }

  /**
   * Set up a job its command has just created, as QEMU's job commands do: the speed first (checked once
   * the job exists, so a refused speed still shows created → null), then `install` (the job's graph
   * changes and claims). On failure the job's setup is undone (abandon), it goes created → null and the
   * error is rethrown; on success the command starts it.
   */
  async setUp(speed: number, install: () => void | Promise<void>): Promise<void> {
    try {
      if (speed < 0) throw genericError("Parameter 'speed' expects a non-negative value");
      if (speed > 0) this.setSpeed(speed);
      await install();
    } catch (err) {
      await this.abandon();
      this.earlyFail();
      throw err;
    }
  }

  /** Undo a setup that failed before the job started (jobs whose setup changes anything override it). */
  async abandon(): Promise<void> {}

  /** A job that failed before it started (setup after construction failed): created → null. */
  earlyFail(): void {
    if (this._status !== 'created') throw new Error(`job '${this.id}': earlyFail in status ${this._status}`);
    this.started = true;
    this.hasRunEnded = true;
    this.runEndedResolve();
    this.txn.remove(this.member);
    this.transition('null');
    this.registry.remove(this);
    this.free();
    this.concludedResolve();
  }

  private async runToCompletion(): Promise<void> {
    let failure: unknown;
    let failed = false;
    try {
      await this.run();
    } catch (err) {
      failure = err;
      failed = true;
    }
    this._busy = false;
    if (failed) this.fail(failure);
    else if (this.isCancelled()) this.fail(cancelledError());
    this.endRun();
    traceCompleted({ job: this.id, ret: this._errorCode ?? 0 });
    if (this._error !== undefined) {
      this.transition('aborting');
      await this.txn.abort(this.member);
    } else {
      await this.txn.jobSucceeded(this.member);
    }
  }

  private endRun(): void {
    if (this.hasRunEnded) return;
    this.hasRunEnded = true;
    this.runEndedResolve();
  }

  /** Record a failure (the first one wins). */
  private fail(err: unknown): void {
    if (this._error !== undefined) return;
    this._error = errorMessage(err);
    this._errorCode = errorCode(err);
  }

  // ---- waiting: pause points, sleeps, kicks -------------------------------------------------------

  /** Wake the job if it is sleeping or yielded (QEMU's job_enter). */
  kick(): void {
    // Each waiter removes itself, and resolving runs nothing at once: the set can be walked as it is
    // (forEach: no iterator objects, on a path that kicks once per piece a mirror copies).
    this.waiters.forEach(callWaiter);
  }

  /**
   * Yield until kicked (or until `timeoutMs` has passed). The job is not busy meanwhile. It may return
   * early for any kick (pause, cancel, complete, set-speed, an I/O completion the job kicks for), so
   * callers re-check their condition. Safe to race against other promises: an abandoned wait ends at
   * the next kick or its timeout and never disturbs later ones.
   */
  protected async yieldUntilKicked(timeoutMs?: number): Promise<void> {
    this.yields++;
    this._busy = false;
    try {
      await new Promise<void>((resolve) => {
        let timer: NodeJS.Timeout | undefined;
        const waiter = (): void => {
          if (timer) clearTimeout(timer);
          this.waiters.delete(waiter);
          resolve();
        };
        this.waiters.add(waiter);
        if (timeoutMs !== undefined) timer = setTimeout(waiter, timeoutMs);
      });
    } finally {
      this.yields--;
      this._busy = this.yields === 0 && !this.hasRunEnded;
    }
  }

  /**
   * Where a pause takes effect: while pause requests are outstanding (and the job is not force-cancelled)
   * the job stops here in 'paused' ('standby' if it was 'ready'), and returns to its status on resume.
   */
  async pausePoint(): Promise<void> {
    if (this.pauseCount === 0 || this.isCancelled()) return;
    await this.onPause();
    if (this.pauseCount > 0 && !this.isCancelled()) {
      const prev = this._status;
      this.transition(prev === 'ready' ? 'standby' : 'paused');
      this._paused = true;
      while (this.pauseCount > 0 && !this.isCancelled()) await this.yieldUntilKicked();
      this._paused = false;
      this.transition(prev);
    }
    this.onResume();
  }

  /** Sleep `ms` (unless a pause is requested or the job is cancelled; a kick ends it early), then a pause point. */
  async sleep(ms: number): Promise<void> {
    if (this.pauseCount === 0 && !this.isCancelled()) {
      this.sleeping = true;
      try {
        await this.yieldUntilKicked(ms);
      } finally {
        this.sleeping = false;
      }
    }
    await this.pausePoint();
  }

  /** Internal pause (drain and the like): reference counted, no user-visible flag. */
  pause(): void {
    this.pauseCount++;
    if (!this._paused) this.kick();
  }

  /** Undo one pause(); the job continues when none is left. */
  resume(): void {
    if (this.pauseCount <= 0) throw new Error(`job '${this.id}': resume without pause`);
    this.pauseCount--;
    if (this.pauseCount === 0) this.kick();
  }

  // ---- progress and rate limiting -----------------------------------------------------------------

  /** `done` more units finished. */
  progressUpdate(done: number): void {
    this.progressCurrent += done;
  }
  /** Total becomes current + remaining. */
  progressSetRemaining(remaining: number): void {
    this.progressTotal = this.progressCurrent + remaining;
  }
  progressIncreaseRemaining(delta: number): void {
    this.progressTotal += delta;
  }

  /** Account bytes done against the speed limit. */
  ratelimitProcessed(bytes: number): void {
    this.limiter.account(bytes);
  }

  /** Sleep as long as the speed limit requires (at least a pause point); returns early when cancelled. */
  async ratelimitSleep(): Promise<void> {
    let delay: number;
    do {
      delay = this.limiter.delayMs();
      await this.sleep(delay);
    } while (delay > 0 && !this.isCancelled());
  }

  // ---- readiness and errors -----------------------------------------------------------------------

  /** running → ready, with BLOCK_JOB_READY for block jobs. */
  transitionToReady(): void {
    this.transition('ready');
    if (this.isBlockJob) this.registry.events.emit('BLOCK_JOB_READY', this.blockJobEventData());
  }

  /**
   * Apply an error policy to an I/O error (block_job_error_action): returns what to do. 'stop' pauses
   * the job as a user pause (resumed by job-resume, which clears io-status) and sets io-status.
   * Emits BLOCK_JOB_ERROR {device, operation, action}.
   */
  errorAction(policy: OnError, operation: 'read' | 'write', err: unknown): ErrorAction {
    const code = errorCode(err);
    const action = errorActionFor(policy, err);
    if (action === 'stop') {
      if (!this._userPaused) {
        this.pause();
        this._userPaused = true;
      }
      if (this._ioStatus === 'ok') this._ioStatus = code === 'ENOSPC' ? 'nospace' : 'failed';
    }
    this.registry.events.emit('BLOCK_JOB_ERROR', { device: this.id, operation, action });
    return action;
  }

  // ---- verbs (the QMP commands call these) --------------------------------------------------------

  /** job-pause / block-job-pause. */
  userPause(): void {
    tracePause({ job: this.id });
    this.applyVerb('pause');
    if (this._userPaused) throw genericError('Job is already paused');
    this._userPaused = true;
    this.pause();
  }

  /** job-resume / block-job-resume. */
  userResume(): void {
    traceResume({ job: this.id });
    if (!this._userPaused || this.pauseCount <= 0) throw genericError("Can't resume a job that was not paused");
    this.applyVerb('resume');
    this._ioStatus = 'ok';
    this._userPaused = false;
    this.resume();
  }

  /** job-cancel (force) / block-job-cancel. */
  async cancel(force: boolean): Promise<void> {
    traceCancel({ job: this.id, force });
    this.applyVerb('cancel');
    force = this.onCancel(force);
    if (!force && !this.hasRunEnded && !this._cancelRequested) await this.checkSoftCancel?.();
    if (this._userPaused) {
      this._ioStatus = 'ok';
      this._userPaused = false;
      this.pauseCount--;
    }
    // A soft cancel of a job whose run has ended is no cancel at all.
    if (force || !this.hasRunEnded) {
      this._cancelRequested = true;
      this.forceCancel ||= force;
    }
    if (!this.started) {
      // Never started: it ends here (and is dismissed whatever auto-dismiss says, as in QEMU).
      this.fail(cancelledError());
      this.endRun();
      this.transition('aborting');
      await this.txn.abort(this.member);
    } else if (this.hasRunEnded) {
      if (this.isCancelled()) await this.txn.abort(this.member);
    } else {
      this.kick();
    }
  }

  /** Another job of the group failed: a force cancel without verb checks. */
  private cancelForTxnAbort(): void {
    if (this.hasRunEnded) return;
    if (this._userPaused) {
      this._userPaused = false;
      this.pauseCount--;
    }
    this._cancelRequested = true;
    this.forceCancel = true;
    if (!this.started) {
      this.fail(cancelledError());
      this.endRun();
    } else {
      this.kick();
    }
  }

  /** job-complete / block-job-complete. */
  async complete(): Promise<void> {
    traceComplete({ job: this.id });
    this.applyVerb('complete');
    if (this._cancelRequested || !this.doComplete) throw genericError(`The active block job '${this.id}' cannot be completed`);
    await this.doComplete();
    this.kick();
  }

  /** job-finalize / block-job-finalize: finalizes the job's whole group. */
  async finalize(): Promise<void> {
    traceFinalize({ job: this.id });
    this.applyVerb('finalize');
    await this.txn.finalize();
  }

  /** job-dismiss / block-job-dismiss. */
  dismiss(): void {
    traceDismiss({ job: this.id });
    this.applyVerb('dismiss');
    this.doDismiss();
  }

  /** block-job-set-speed. */
  setSpeed(speed: number): void {
    this.applyVerb('set-speed');
    if (speed < 0) throw genericError("Parameter 'speed' expects a non-negative value");
    if (speed === this.limiter.getSpeed()) return;
    this.limiter.setSpeed(speed);
    // Wake a job sleeping for the old limit, not one waiting for anything else.
    if (this.sleeping) this.kick();
  }

  /** block-job-change. */
  async change(opts: Record<string, unknown>): Promise<void> {
    this.applyVerb('change');
    if (!this.doChange) throw genericError('Job type does not support change');
    await this.doChange(opts);
  }

  // ---- finalization (driven by JobTxn) ------------------------------------------------------------

  /** pending, with BLOCK_JOB_PENDING when the user finalizes (auto-finalize=false). */
  private transitionToPending(): void {
    this.transition('pending');
    if (!this.autoFinalize && this.isBlockJob) this.registry.events.emit('BLOCK_JOB_PENDING', { type: this.type, id: this.id });
  }

  /** Run the prepare hook; a failure fails the job, which then aborts with its group. */
  private async runPrepare(): Promise<void> {
    try {
      await this.prepare();
    } catch (err) {
      this.fail(err);
      this.transition('aborting');
      throw err;
    }
  }

  /** The group aborts: a job without an error of its own ends as cancelled. */
  private markAborted(): void {
    if (this._error === undefined) {
      this._cancelRequested = true;
      this.forceCancel = true;
      this.fail(cancelledError());
    }
    this.transition('aborting');
  }

  /** commit or abort, clean, the completion event, concluded (and null with auto-dismiss). */
  private async finalizeSingle(): Promise<void> {
    try {
      if (this._error === undefined) await this.commit();
      else await this.abort();
    } finally {
      await this.clean();
    }
    // job_finalize_single: events only for a job that started (a transaction's abort cancels backups
    // it made but never started, silently).
    if (this.isBlockJob && this.started) {
      if (this.isCancelled()) this.registry.events.emit('BLOCK_JOB_CANCELLED', this.blockJobEventData());
      else {
        const data = this.blockJobEventData();
        if (this._error !== undefined) data.error = this._error;
        this.registry.events.emit('BLOCK_JOB_COMPLETED', data);
      }
    }
    this.txn.remove(this.member);
    this.transition('concluded');
    this.concludedResolve();
    if (this.autoDismiss || !this.started) this.doDismiss();
  }

  private doDismiss(): void {
    this.transition('null');
    this.registry.remove(this);
    this.free();
  }

  // ---- query data and event payloads --------------------------------------------------------------

  /** {type, device, len, offset, speed}: the body of BLOCK_JOB_READY/COMPLETED/CANCELLED. */
  blockJobEventData(): Record<string, unknown> {
    return { type: this.type, device: this.id, len: this.progressTotal, offset: this.progressCurrent, speed: this.speed };
  }

  /** JobInfo for query-jobs. */
  jobInfo(): Record<string, unknown> {
    const info: Record<string, unknown> = {
      id: this.id,
      type: this.type,
      status: this._status,
      'current-progress': this.progressCurrent,
      'total-progress': this.progressTotal,
    };
    if (this._error !== undefined) info.error = this._error;
    return info;
  }

  /** BlockJobInfo for query-block-jobs. */
  blockJobInfo(): Record<string, unknown> {
    const info: Record<string, unknown> = {
      type: this.type,
      device: this.id,
      len: this.progressTotal,
      offset: this.progressCurrent,
      busy: this._busy,
      paused: this.pauseCount > 0,
      speed: this.speed,
      'io-status': this._ioStatus,
      ready: this.isReady(),
      status: this._status,
      'auto-finalize': this.autoFinalize,
      'auto-dismiss': this.autoDismiss,
      ...this.extraBlockJobInfo(),
    };
    if (this._error !== undefined) info.error = this._error;
    return info;
  }
}
