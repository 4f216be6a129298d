/**
 * The job state machine against QEMU 7.2. The expected event sequences and messages below were
 * recorded from qemu-storage-daemon 7.2 driven over QMP: blockdev-create jobs (file, qcow2) and
 * blockdev-mirror between null-co nodes (speed=1 to hold a job in 'running'). A test-only job type
 * plays the mirror's part: it becomes ready when its work is done, completes on job-complete, and
 * treats a cancel after READY as soft, as mirror does.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { EventBus } from '../../src/base/events.js';
import { JobRegistry } from '../../src/jobs/registry.js';
import { Job, JOB_VERBS, type JobStatus, type JobVerb, type JobOptions } from '../../src/jobs/job.js';
import { JobTxn } from '../../src/jobs/txn.js';
import { RateLimiter } from '../../src/jobs/rate-limit.js';
import { BlockIOError, QmpError } from '../../src/errors.js';
import { poll } from '../support/wait.js';

type Ev = { event: string; data?: Record<string, unknown> };

class TestJob extends Job {
  readonly type = 'mirror';
  len: number;
  /** Becomes ready when all work is done (mirror-like); otherwise finishes (backup/create-like). */
  readyWhenDone: boolean;
  /** Work is held back until released. */
  hold = false;
  failWith: Error | undefined;
  private shouldComplete = false;
  abortGate: Promise<void> | undefined;
  hooks: string[] = [];
  prepareError: Error | undefined;

  constructor(reg: JobRegistry, opts: JobOptions & { len?: number; ready?: boolean; hold?: boolean }) {
    super(reg, opts);
    this.len = opts.len ?? 4;
    this.readyWhenDone = opts.ready ?? true;
    this.hold = opts.hold ?? false;
  }

  protected async run(): Promise<void> {
    this.progressSetRemaining(this.len);
    for (;;) {
      await this.ratelimitSleep();
      if (this.isCancelled()) return;
      if (this.failWith) throw this.failWith;
      // A soft cancel after READY, or job-complete: finish (mirror without/with pivot).
      if (this.isReady() && (this.cancelRequested || this.shouldComplete)) return;
      if (!this.hold && this.progressCurrent < this.progressTotal) {
        this.progressUpdate(1);
        this.ratelimitProcessed(1);
      }
      if (this.progressCurrent === this.progressTotal && this.status === 'running') {
        if (!this.readyWhenDone) return;
        this.transitionToReady();
      }
      await this.sleep(1);
    }
  }
  protected override doComplete(): void {
    this.shouldComplete = true;
  }
  protected override onCancel(force: boolean): boolean {
    return force || !this.isReady();
  }
  protected override async prepare(): Promise<void> {
    this.hooks.push('prepare');
    if (this.prepareError) throw this.prepareError;
  }
  protected override async commit(): Promise<void> {
    this.hooks.push('commit');
  }
  protected override async abort(): Promise<void> {
    this.hooks.push('abort');
    if (this.abortGate) await this.abortGate;
  }
  protected override async clean(): Promise<void> {
    this.hooks.push('clean');
  }
}

/** A job without complete/change/cancel overrides (as backup or create). */
class PlainJob extends Job {
  readonly type = 'backup';
  gate: Promise<void> = new Promise(() => undefined);
  protected async run(): Promise<void> {
    await Promise.race([this.gate, this.cancelledPromise()]);
  }
  private async cancelledPromise(): Promise<void> {
    while (!this.isCancelled()) await this.sleep(2);
  }
}

function setup(): { reg: JobRegistry; events: Ev[]; take: () => Ev[] } {
  const bus = new EventBus();
  const events: Ev[] = [];
  bus.on((event, data) => events.push({ event, data }));
  const reg = new JobRegistry(bus);
  let seen = 0;
  return {
    reg,
    events,
    take: () => {
      const out = events.slice(seen);
      seen = events.length;
      return out;
    },
  };
}

const sc = (id: string, status: JobStatus): Ev => ({ event: 'JOB_STATUS_CHANGE', data: { id, status } });

function until(cond: () => boolean, what = 'condition'): Promise<void> {
  return poll(what, cond, undefined, 1);
}

function refusal(id: string, status: string, verb: string): RegExp {
  return new RegExp(`Job '${id}' in state '${status}' cannot accept command verb '${verb}'$`);
}

// ---- event sequences recorded from QEMU 7.2 -----------------------------------------------------

test('create-like job (no block job): created, running, waiting, pending, concluded; dismiss → null; no BLOCK_JOB_* events', async () => {
  const { reg, take } = setup();
  class Create extends Job {
    readonly type = 'create';
    override readonly isBlockJob = false;
    protected async run(): Promise<void> {
      this.progressSetRemaining(1);
      this.progressUpdate(1);
    }
  }
  const j = new Create(reg, { id: 'j1', autoDismiss: false });
  j.start();
  await j.concluded;
  assert.deepEqual(take(), [sc('j1', 'created'), sc('j1', 'running'), sc('j1', 'waiting'), sc('j1', 'pending'), sc('j1', 'concluded')]);
  assert.deepEqual(
    reg.all().map((x) => x.jobInfo()),
    [{ id: 'j1', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 }],
  );
  assert.deepEqual(reg.blockJobs(), []);
  assert.throws(() => reg.findBlockJob('j1'), (e: unknown) => e instanceof QmpError && e.errorClass === 'DeviceNotActive' && e.message === "Block job 'j1' not found");
  j.dismiss();
  assert.deepEqual(take(), [sc('j1', 'null')]);
  assert.throws(() => reg.find('j1'), /^Error: Job not found$|Job not found/);
});

test('failing create-like job: created, running, aborting, concluded, error in query-jobs', async () => {
  const { reg, take } = setup();
  class Create extends Job {
    readonly type = 'create';
    override readonly isBlockJob = false;
    protected async run(): Promise<void> {
      this.progressSetRemaining(1);
      this.progressUpdate(1);
      throw new Error("Could not create '/nonexistent/x.img': No such file or directory");
    }
  }
  const j = new Create(reg, { id: 'e1', autoDismiss: false });
  j.start();
  await j.concluded;
  assert.deepEqual(take(), [sc('e1', 'created'), sc('e1', 'running'), sc('e1', 'aborting'), sc('e1', 'concluded')]);
  assert.equal(j.jobInfo().error, "Could not create '/nonexistent/x.img': No such file or directory");
});

test('ready, then job-complete (QEMU: mirror with defaults)', async () => {
  const { reg, take } = setup();
  const j = new TestJob(reg, { id: 'A', len: 3 });
  j.start();
  await until(() => j.status === 'ready');
  assert.deepEqual(take(), [
    sc('A', 'created'),
    sc('A', 'running'),
    sc('A', 'ready'),
    { event: 'BLOCK_JOB_READY', data: { type: 'mirror', device: 'A', len: 3, offset: 3, speed: 0 } },
  ]);
  const info = j.blockJobInfo();
  assert.deepEqual(
    { ...info, busy: undefined },
    {
      type: 'mirror', device: 'A', len: 3, offset: 3, busy: undefined, paused: false, speed: 0, 'io-status': 'ok',
      ready: true, status: 'ready', 'auto-finalize': true, 'auto-dismiss': true,
    },
  );
  await j.complete();
  await until(() => j.status === 'null');
  assert.deepEqual(take(), [
    sc('A', 'waiting'),
    sc('A', 'pending'),
    { event: 'BLOCK_JOB_COMPLETED', data: { type: 'mirror', device: 'A', len: 3, offset: 3, speed: 0 } },
    sc('A', 'concluded'),
    sc('A', 'null'),
  ]);
  assert.deepEqual(j.hooks, ['prepare', 'commit', 'clean']);
  assert.equal(reg.get('A'), undefined);
});

test('pause and resume: running ↔ paused, ready ↔ standby, QEMU messages', async () => {
  const { reg, take } = setup();
  const j = new TestJob(reg, { id: 'B', len: 2, hold: true, autoFinalize: false, autoDismiss: false });
  j.start();
  await until(() => j.status === 'running' && j.busy === false);
  take();
  assert.throws(() => j.userResume(), /^Error: Can't resume a job that was not paused$|Can't resume a job that was not paused/);
  j.userPause();
  await until(() => j.status === 'paused');
  assert.deepEqual(take(), [sc('B', 'paused')]);
  assert.equal(j.blockJobInfo().paused, true);
  assert.throws(() => j.userPause(), /Job is already paused/);
  await assert.rejects(j.complete(), refusal('B', 'paused', 'complete'));
  j.setSpeed(0); // allowed while paused
  j.userResume();
  await until(() => j.status === 'running');
  assert.deepEqual(take(), [sc('B', 'running')]);
  // Internal pauses are counted with the user's.
  j.pause();
  j.userPause();
  j.userResume();
  await until(() => j.status === 'paused');
  j.resume();
  await until(() => j.status === 'running');
  assert.deepEqual(take(), [sc('B', 'paused'), sc('B', 'running')]);
  j.hold = false;
  await until(() => j.status === 'ready');
  take();
  j.userPause();
  await until(() => j.status === 'standby');
  assert.deepEqual(take(), [sc('B', 'standby')]);
  assert.equal(j.blockJobInfo().ready, true);
  j.userResume();
  await until(() => j.status === 'ready');
  assert.deepEqual(take(), [sc('B', 'ready')]);
  await j.cancel(true);
  await j.concluded;
});

test('auto-finalize=false: pending + BLOCK_JOB_PENDING, job-finalize completes; auto-dismiss=false waits for dismiss', async () => {
  const { reg, take } = setup();
  const j = new TestJob(reg, { id: 'B', len: 2, autoFinalize: false, autoDismiss: false });
  j.start();
  await until(() => j.status === 'ready');
  take();
  await j.complete();
  await until(() => j.status === 'pending');
  assert.deepEqual(take(), [sc('B', 'waiting'), sc('B', 'pending'), { event: 'BLOCK_JOB_PENDING', data: { type: 'mirror', id: 'B' } }]);
  assert.deepEqual(j.hooks, []);
  assert.equal(j.blockJobInfo().ready, false);
  assert.throws(() => j.userPause(), refusal('B', 'pending', 'pause'));
  assert.throws(() => j.userResume(), /Can't resume a job that was not paused/);
  await assert.rejects(j.complete(), refusal('B', 'pending', 'complete'));
  assert.throws(() => j.dismiss(), refusal('B', 'pending', 'dismiss'));
  assert.throws(() => j.setSpeed(0), refusal('B', 'pending', 'set-speed'));
  await j.finalize();
  assert.deepEqual(take(), [{ event: 'BLOCK_JOB_COMPLETED', data: { type: 'mirror', device: 'B', len: 2, offset: 2, speed: 0 } }, sc('B', 'concluded')]);
  assert.deepEqual(j.hooks, ['prepare', 'commit', 'clean']);
  assert.equal(j.blockJobInfo().status, 'concluded');
  j.dismiss();
  assert.deepEqual(take(), [sc('B', 'null')]);
});

test('force cancel while running: aborting, BLOCK_JOB_CANCELLED, concluded, null', async () => {
  const { reg, take } = setup();
  const j = new TestJob(reg, { id: 'C', len: 8, hold: true });
  j.start();
  await until(() => j.status === 'running');
  take();
  // A soft cancel before READY is a force cancel (mirror: force || !ready).
  await j.cancel(false);
  await until(() => j.status === 'null');
  assert.deepEqual(take(), [
    sc('C', 'aborting'),
    { event: 'BLOCK_JOB_CANCELLED', data: { type: 'mirror', device: 'C', len: 8, offset: 0, speed: 0 } },
    sc('C', 'concluded'),
    sc('C', 'null'),
  ]);
  assert.deepEqual(j.hooks, ['abort', 'clean']);
});

test('cancel while pending (auto-finalize=false) aborts', async () => {
  const { reg, take } = setup();
  const j = new TestJob(reg, { id: 'D', len: 1, autoFinalize: false });
  j.start();
  await until(() => j.status === 'ready');
  await j.complete();
  await until(() => j.status === 'pending');
  take();
  await j.cancel(true);
  assert.deepEqual(take(), [
    sc('D', 'aborting'),
    { event: 'BLOCK_JOB_CANCELLED', data: { type: 'mirror', device: 'D', len: 1, offset: 1, speed: 0 } },
    sc('D', 'concluded'),
    sc('D', 'null'),
  ]);
  assert.deepEqual(j.hooks, ['abort', 'clean']);
});

test('soft cancel after READY completes (no error); force cancel after READY is cancelled', async () => {
  const { reg, take } = setup();
  const e = new TestJob(reg, { id: 'E', len: 1, autoDismiss: false });
  e.start();
  await until(() => e.status === 'ready');
  take();
  await e.cancel(false);
  await e.concluded;
  assert.deepEqual(take(), [
    sc('E', 'waiting'),
    sc('E', 'pending'),
    { event: 'BLOCK_JOB_COMPLETED', data: { type: 'mirror', device: 'E', len: 1, offset: 1, speed: 0 } },
    sc('E', 'concluded'),
  ]);
  assert.equal(e.jobInfo().error, undefined);
  e.dismiss();
  take();

  const f = new TestJob(reg, { id: 'F', len: 1 });
  f.start();
  await until(() => f.status === 'ready');
  take();
  await f.cancel(true);
  await until(() => f.status === 'null');
  assert.deepEqual(take(), [
    sc('F', 'aborting'),
    { event: 'BLOCK_JOB_CANCELLED', data: { type: 'mirror', device: 'F', len: 1, offset: 1, speed: 0 } },
    sc('F', 'concluded'),
    sc('F', 'null'),
  ]);
});

test('cancel of a user-paused job resumes it first; error "Operation canceled"', async () => {
  const { reg, take } = setup();
  const g = new TestJob(reg, { id: 'G', len: 4, hold: true, autoDismiss: false });
  g.start();
  g.userPause();
  await until(() => g.status === 'paused');
  take();
  await g.cancel(true);
  await g.concluded;
  assert.deepEqual(take(), [
    sc('G', 'running'),
    sc('G', 'aborting'),
    { event: 'BLOCK_JOB_CANCELLED', data: { type: 'mirror', device: 'G', len: 4, offset: 0, speed: 0 } },
    sc('G', 'concluded'),
  ]);
  assert.equal(g.jobInfo().error, 'Operation canceled');
});

test('failure: BLOCK_JOB_COMPLETED with error; error policy stop pauses with io-status and BLOCK_JOB_ERROR', async () => {
  const { reg, take } = setup();
  const j = new TestJob(reg, { id: 'X', len: 4, hold: true, autoDismiss: false });
  j.start();
  await until(() => j.status === 'running');
  take();
  assert.equal(j.errorAction('stop', 'write', new BlockIOError('ENOSPC')), 'stop');
  await until(() => j.status === 'paused');
  assert.deepEqual(take(), [{ event: 'BLOCK_JOB_ERROR', data: { device: 'X', operation: 'write', action: 'stop' } }, sc('X', 'paused')]);
  assert.equal(j.blockJobInfo()['io-status'], 'nospace');
  assert.equal(j.userPaused, true);
  j.userResume();
  await until(() => j.status === 'running');
  assert.equal(j.blockJobInfo()['io-status'], 'ok');
  assert.equal(j.errorAction('enospc', 'read', new BlockIOError('EIO')), 'report');
  take();
  j.failWith = new BlockIOError('EIO');
  await j.concluded;
  assert.deepEqual(take(), [
    sc('X', 'aborting'),
    { event: 'BLOCK_JOB_COMPLETED', data: { type: 'mirror', device: 'X', len: 4, offset: 0, speed: 0, error: 'Input/output error' } },
    sc('X', 'concluded'),
  ]);
  assert.equal(j.jobInfo().error, 'Input/output error');
  assert.equal(j.blockJobInfo().error, 'Input/output error');
});

test('job ids: QEMU messages; registry lists newest first', () => {
  const { reg } = setup();
  for (const bad of ['1x', '', 'a b', '#x', '-a']) assert.throws(() => new TestJob(reg, { id: bad }), new RegExp(`^Error: Invalid job ID '${bad}'$|Invalid job ID '${bad.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}'`));
  const a = new TestJob(reg, { id: 'a' });
  const b = new TestJob(reg, { id: 'b.c_d-1' });
  assert.throws(() => new TestJob(reg, { id: 'a' }), /Job ID 'a' already in use/);
  assert.deepEqual(reg.all().map((j) => j.id), ['b.c_d-1', 'a']);
  assert.throws(() => reg.find('zz'), /Job not found/);
  assert.throws(() => reg.findBlockJob('zz'), (e: unknown) => e instanceof QmpError && e.errorClass === 'DeviceNotActive' && e.message === "Block job 'zz' not found");
  a.earlyFail();
  b.earlyFail();
  assert.deepEqual(reg.all(), []);
});

test('set-speed: negative refused after the verb check; jobs without complete/change refuse them', async () => {
  const { reg } = setup();
  const p = new PlainJob(reg, { id: 'p' });
  p.start();
  assert.throws(() => p.setSpeed(-1), /Parameter 'speed' expects a non-negative value/);
  p.setSpeed(1024);
  assert.equal(p.blockJobInfo().speed, 1024);
  await assert.rejects(p.complete(), refusal('p', 'running', 'complete'));
  await assert.rejects(p.change({}), /Job type does not support change/);
  await p.cancel(false); // no onCancel: every cancel is forced
  await p.concluded;
  assert.equal(p.status, 'null');
});

// ---- the verb table, state by state ---------------------------------------------------------------

/** QEMU's verb table (job.c JobVerbTable), written out independently of the implementation. */
const ALLOWED: Record<JobVerb, JobStatus[]> = {
  cancel: ['created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending'],
  pause: ['created', 'running', 'paused', 'ready', 'standby'],
  resume: ['created', 'running', 'paused', 'ready', 'standby'],
  'set-speed': ['created', 'running', 'paused', 'ready', 'standby'],
  change: ['created', 'running', 'paused', 'ready', 'standby'],
  complete: ['ready', 'standby'],
  finalize: ['pending'],
  dismiss: ['concluded'],
};

async function refusedByVerbMethod(j: Job, verb: JobVerb): Promise<unknown> {
  try {
    switch (verb) {
      case 'cancel':
        await j.cancel(true);
        break;
      case 'pause':
        j.userPause();
        break;
      case 'resume':
        j.userResume();
        break;
      case 'set-speed':
        j.setSpeed(0);
        break;
      case 'change':
        await j.change({});
        break;
      case 'complete':
        await j.complete();
        break;
      case 'finalize':
        await j.finalize();
        break;
      case 'dismiss':
        j.dismiss();
        break;
    }
  } catch (e) {
    return e;
  }
  return undefined;
}

test('every verb in every state: allowed ones pass the table, refused ones fail in QEMU words', async () => {
  const { reg } = setup();
  const jobsByState = new Map<JobStatus, Job>();

  jobsByState.set('created', new TestJob(reg, { id: 'created' }));
  const running = new TestJob(reg, { id: 'running', hold: true });
  running.start();
  jobsByState.set('running', running);
  const paused = new TestJob(reg, { id: 'paused', hold: true });
  paused.start();
  paused.userPause();
  await until(() => paused.status === 'paused');
  jobsByState.set('paused', paused);
  const ready = new TestJob(reg, { id: 'ready', len: 1 });
  ready.start();
  await until(() => ready.status === 'ready');
  jobsByState.set('ready', ready);
  const standby = new TestJob(reg, { id: 'standby', len: 1 });
  standby.start();
  await until(() => standby.status === 'ready');
  standby.userPause();
  await until(() => standby.status === 'standby');
  jobsByState.set('standby', standby);
  // waiting: done, but another job of its group is still running.
  const txn = new JobTxn();
  const waiting = new TestJob(reg, { id: 'waiting', len: 1, ready: false, txn });
  const other = new TestJob(reg, { id: 'other', hold: true, txn });
  waiting.start();
  other.start();
  await until(() => waiting.status === 'waiting');
  jobsByState.set('waiting', waiting);
  const pending = new TestJob(reg, { id: 'pending', len: 1, ready: false, autoFinalize: false });
  pending.start();
  await until(() => pending.status === 'pending');
  jobsByState.set('pending', pending);
  // aborting: held in its abort hook.
  let openGate!: () => void;
  const aborting = new TestJob(reg, { id: 'aborting', hold: true });
  aborting.abortGate = new Promise<void>((r) => (openGate = r));
  aborting.start();
  const abortDone = aborting.cancel(true);
  await until(() => aborting.status === 'aborting');
  jobsByState.set('aborting', aborting);
  const concluded = new TestJob(reg, { id: 'concluded', len: 1, ready: false, autoDismiss: false });
  concluded.start();
  await until(() => concluded.status === 'concluded');
  jobsByState.set('concluded', concluded);

  for (const [state, job] of jobsByState) {
    assert.equal(job.status, state);
    for (const verb of JOB_VERBS) {
      if (ALLOWED[verb].includes(state)) {
        assert.doesNotThrow(() => job.applyVerb(verb), `${verb} in ${state}`);
        continue;
      }
      assert.throws(() => job.applyVerb(verb), refusal(state, state, verb), `${verb} in ${state}`);
      const err = await refusedByVerbMethod(job, verb);
      // job-resume first checks that the job is user-paused, as QEMU does.
      const expected = verb === 'resume' && !job.userPaused ? /^Can't resume a job that was not paused$/ : refusal(state, state, verb);
      assert.ok(err instanceof QmpError, `${verb} in ${state} must be refused`);
      assert.match(err.message, expected, `${verb} in ${state}`);
      assert.equal(job.status, state, `${verb} in ${state} changed nothing`);
    }
  }

  // Tidy up: everything concludes.
  openGate();
  await abortDone;
  for (const j of [jobsByState.get('created')!, running, paused, ready, standby, other, pending]) await j.cancel(true);
  await Promise.all([...jobsByState.values(), other].map((j) => j.concluded));
  assert.equal(waiting.status, 'null');
  assert.deepEqual(reg.all().filter((j) => j.status !== 'concluded').map((j) => [j.id, j.status]), []);
});

test('transactions: one job failing cancels and aborts the others; all finalize together', async () => {
  const { reg, take } = setup();
  const txn = new JobTxn();
  const a = new TestJob(reg, { id: 'ta', len: 1, ready: false, txn, autoDismiss: false });
  const b = new TestJob(reg, { id: 'tb', hold: true, txn, autoDismiss: false });
  a.start();
  b.start();
  await until(() => a.status === 'waiting');
  b.failWith = new BlockIOError('EIO');
  await Promise.all([a.concluded, b.concluded]);
  const evs = take().filter((e) => e.event !== 'JOB_STATUS_CHANGE' || ['aborting', 'concluded'].includes(e.data?.status as string));
  // Newest job first, as QEMU 7.2 aborts a group (checked with two grouped backups).
  assert.deepEqual(
    evs.filter((e) => e.event.startsWith('BLOCK_JOB')).map((e) => [e.event, e.data?.device, e.data?.error]),
    [
      ['BLOCK_JOB_COMPLETED', 'tb', 'Input/output error'],
      ['BLOCK_JOB_CANCELLED', 'ta', undefined],
    ],
  );
  assert.deepEqual(a.hooks, ['abort', 'clean']);
  assert.equal(a.error, 'Operation canceled');

  // Success: both wait for each other, prepare all, then commit all. As in QEMU 7.2 (two grouped
  // backups on qemu-storage-daemon): the group goes pending and completes newest job first.
  const t2 = new JobTxn();
  const c = new TestJob(reg, { id: 'tc', len: 1, ready: false, txn: t2 });
  const d = new TestJob(reg, { id: 'td', len: 3, ready: false, txn: t2 });
  take();
  c.start();
  d.start();
  await Promise.all([c.concluded, d.concluded]);
  assert.deepEqual(c.hooks, ['prepare', 'commit', 'clean']);
  assert.deepEqual(d.hooks, ['prepare', 'commit', 'clean']);
  const finish = take()
    .filter((e) => e.event === 'BLOCK_JOB_COMPLETED' || ['pending', 'concluded'].includes(e.data?.status as string))
    .map((e) => `${e.event === 'BLOCK_JOB_COMPLETED' ? 'COMPLETED' : String(e.data?.status)} ${String(e.data?.id ?? e.data?.device)}`);
  assert.deepEqual(finish, ['pending td', 'pending tc', 'COMPLETED td', 'concluded td', 'COMPLETED tc', 'concluded tc']);

  // A failing prepare aborts the group.
  const t3 = new JobTxn();
  const e = new TestJob(reg, { id: 'te', len: 1, ready: false, txn: t3 });
  const f = new TestJob(reg, { id: 'tf', len: 1, ready: false, txn: t3 });
  f.prepareError = new Error('prepare failed');
  e.start();
  f.start();
  await Promise.all([e.concluded, f.concluded]);
  assert.deepEqual(e.hooks, ['prepare', 'abort', 'clean']);
  assert.deepEqual(f.hooks, ['prepare', 'abort', 'clean']);
});

test('shutdown: cancelAll concludes every job', async () => {
  const { reg } = setup();
  const a = new TestJob(reg, { id: 'a', hold: true });
  const b = new TestJob(reg, { id: 'b', len: 1, autoFinalize: false });
  const c = new TestJob(reg, { id: 'c' });
  a.start();
  b.start();
  await until(() => b.status === 'ready');
  await b.complete();
  await until(() => b.status === 'pending');
  await reg.cancelAll(5000);
  for (const j of [a, b, c]) assert.equal(j.status, 'null');
});

test('rate limiter: slices of 100 ms, speed 0 unlimited', () => {
  let now = 0;
  const rl = new RateLimiter(1000, 100, () => now);
  assert.equal(rl.delayMs(), 0);
  rl.account(100); // one slice's quota
  assert.equal(rl.delayMs(), 100);
  rl.account(50);
  assert.equal(rl.delayMs(), 150);
  now = 151;
  assert.equal(rl.delayMs(), 0);
  // Work accounted, the delay asked only after a slice has passed: the debt is still there.
  rl.account(300);
  now = 400;
  assert.equal(rl.delayMs(), 51);
  now = 452;
  assert.equal(rl.delayMs(), 0);
  rl.setSpeed(0);
  rl.account(1e9);
  assert.equal(rl.delayMs(), 0);
});

test('rate-limited job makes progress at about its speed and speeds up on set-speed', async () => {
  const { reg } = setup();
  const j = new TestJob(reg, { id: 'r', len: 1000, speed: 100, ready: false });
  const t0 = performance.now();
  j.start();
  await new Promise((r) => setTimeout(r, 250));
  // Bounded by the time that really passed (a loaded machine stretches the 250 ms): at most the speed
  // times the elapsed seconds, plus two 100 ms slices' quota of 10 bytes each.
  const progress = j.progressCurrent;
  const elapsedS = (performance.now() - t0) / 1000;
  assert.ok(progress <= 100 * elapsedS + 20, `progress ${progress} at 100 B/s after ${elapsedS} s`);
  j.setSpeed(0);
  await j.concluded;
  assert.equal(j.progressCurrent, 1000);
});

test('an abandoned yield (raced against other work) does not disturb the next one', async () => {
  const { reg } = setup();
  const log: string[] = [];
  class Racer extends Job {
    readonly type = 'backup';
    protected async run(): Promise<void> {
      // Abandon a 20 ms yield: the other promise wins.
      await Promise.race([this.yieldUntilKicked(20), Promise.resolve()]);
      const t0 = Date.now();
      // This one must last until the kick at ~60 ms, not end at the first one's 20 ms timeout.
      await this.yieldUntilKicked();
      log.push(`woken after ${Date.now() - t0 >= 40 ? 'kick' : 'stale timer'}`);
    }
  }
  const j = new Racer(reg, { id: 'y' });
  j.start();
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(j.busy, false);
  j.kick();
  await j.concluded;
  assert.deepEqual(log, ['woken after kick']);
});
