/**
 * Throttle groups: named I/O limits (QEMU's `throttle-group` objects, object-add/--object) shared by
 * every `throttle` filter node that names the group. The limits are QEMU's ThrottleLimits and the
 * algorithm is QEMU's leaky buckets (util/throttle.c): each limit is a bucket that leaks at its average
 * rate; a request may start while the bucket is not fuller than its size (a tenth of a second of the
 * average rate, or max × max-length when a burst is allowed), then adds its bytes (or one operation,
 * in iops-size units) to it. Requests of a group start in arrival order.
 */
import { genericError } from '../errors.js';
import { int, type Members } from '../qapi/schema.js';

/** QEMU's THROTTLE_VALUE_MAX. */
const VALUE_MAX = 1e15;

const BUCKETS = ['bps-total', 'bps-read', 'bps-write', 'iops-total', 'iops-read', 'iops-write'] as const;
type BucketName = (typeof BUCKETS)[number];

/** ThrottleLimits (qapi/block-core.json): every bucket's avg, -max and -max-length, and iops-size. */
export const THROTTLE_LIMITS_MEMBERS: Members = Object.fromEntries([
  ...BUCKETS.flatMap((b) => [`*${b}`, `*${b}-max`, `*${b}-max-length`]).map((m) => [m, int]),
  ['*iops-size', int],
]);

interface Bucket {
  avg: number;
  max: number;
  burstLength: number;
  /** Fill level: bytes (or operations) not yet leaked. */
  level: number;
  /** The burst bucket (when max is set): leaks at max per second, at most max/10 may be in it. */
  burstLevel: number;
}

export type ThrottleLimits = Record<string, number>;

/** throttle_is_valid and the conversions before it, with QEMU's messages, in QEMU's order. */
function checkLimits(l: ThrottleLimits): void {
  const v = (k: string): number => l[k] ?? 0;
  const totalAndRw = (kind: 'bps' | 'iops', suffix: string) => v(`${kind}-total${suffix}`) !== 0 && (v(`${kind}-read${suffix}`) !== 0 || v(`${kind}-write${suffix}`) !== 0);
  if (totalAndRw('bps', '') || totalAndRw('iops', '') || totalAndRw('bps', '-max') || totalAndRw('iops', '-max')) {
    throw genericError('bps/iops/max total values and read/write values cannot be used at the same time');
  }
  if (v('iops-size') < 0) throw genericError('bps/iops/max values must be within [0, 1000000000000000]');
  for (const b of BUCKETS) {
    // QEMU reads the values as unsigned: a negative one is out of range.
    const avg = v(b);
    const max = v(`${b}-max`);
    const burst = l[`${b}-max-length`] ?? 1;
    if (avg < 0 || max < 0 || avg > VALUE_MAX || max > VALUE_MAX) throw genericError('bps/iops/max values must be within [0, 1000000000000000]');
    if (burst <= 0) throw genericError('the burst length cannot be 0');
    if (burst > 1 && !max) throw genericError('burst length set without burst rate');
    if (max && burst > VALUE_MAX / max) throw genericError('burst length too high for this burst rate');
    if (max && !avg) throw genericError('bps_max/iops_max require corresponding bps/iops values');
    if (max && max < avg) throw genericError('bps_max/iops_max cannot be lower than bps/iops');
  }
}

export class ThrottleGroup {
  private buckets = new Map<BucketName, Bucket>();
  private iopsSize: number;
  /** The limits as given (object-add, qom-set): what qom-get shows. */
  private current: ThrottleLimits;
  private lastLeak = process.hrtime.bigint();
  private readonly queue: Array<{ isWrite: boolean; bytes: number; start: () => void }> = [];
  private timer: NodeJS.Timeout | undefined;
  /** Throttle nodes using the group: while any does, object-del refuses it. */
  users = 0;

  constructor(
    readonly id: string,
    limits: ThrottleLimits,
  ) {
    checkLimits(limits);
    this.current = { ...limits };
    this.iopsSize = limits['iops-size'] ?? 0;
    this.configure(limits);
  }

  /** The buckets of `limits`; a bucket that stays keeps what it holds (QEMU's throttle_config). */
  private configure(limits: ThrottleLimits): void {
    const old = this.buckets;
    this.buckets = new Map();
    for (const b of BUCKETS) {
      const avg = limits[b] ?? 0;
      if (!avg) continue;
      const prev = old.get(b);
      this.buckets.set(b, { avg, max: limits[`${b}-max`] ?? 0, burstLength: limits[`${b}-max-length`] ?? 1, level: prev?.level ?? 0, burstLevel: prev?.burstLevel ?? 0 });
    }
    this.iopsSize = limits['iops-size'] ?? 0;
  }

  /** Every limit, unset ones as QEMU reports them (0; a burst length 1): qom-get `limits`. */
  limits(): ThrottleLimits {
    return Object.fromEntries(Object.keys(THROTTLE_LIMITS_MEMBERS).map((m) => {
      const k = m.slice(1);
      return [k, this.current[k] ?? (k.endsWith('-max-length') ? 1 : 0)];
    }));
  }

  /**
   * qom-set `limits`: the members given replace those limits, the others stay; checked as a whole
   * (QEMU's messages), then in force at once: the requests waiting in the group are started again
   * under the new limits (throttle_group_config).
   */
  setLimits(change: ThrottleLimits): void {
    const next = { ...this.current, ...change };
    checkLimits(next);
    this.leak();
    this.current = next;
    this.configure(next);
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.queue.length > 0) this.dispatch();
  }

  /** Requests waiting for the group's limits. */
  get queued(): number {
    return this.queue.length;
  }

  /** Wait until a request of `bytes` may start under the group's limits; it is accounted when it does. */
  admit(isWrite: boolean, bytes: number): Promise<void> {
    if (this.buckets.size === 0 && this.queue.length === 0) return Promise.resolve();
    return new Promise<void>((start) => {
      this.queue.push({ isWrite, bytes, start });
      if (this.queue.length === 1) this.dispatch();
    });
  }

  private relevant(isWrite: boolean): Bucket[] {
    const names: BucketName[] = isWrite ? ['bps-total', 'bps-write', 'iops-total', 'iops-write'] : ['bps-total', 'bps-read', 'iops-total', 'iops-read'];
    return names.flatMap((n) => this.buckets.get(n) ?? []);
  }

  /** throttle_leak_bucket for every bucket, for the time since the last leak. */
  private leak(): void {
    const now = process.hrtime.bigint();
    const seconds = Number(now - this.lastLeak) / 1e9;
    this.lastLeak = now;
    for (const b of this.buckets.values()) {
      b.level = Math.max(b.level - b.avg * seconds, 0);
      if (b.max) b.burstLevel = Math.max(b.burstLevel - b.max * seconds, 0);
    }
  }

  /** throttle_compute_wait: seconds until the bucket lets a request start (0: now). */
  private static wait(b: Bucket): number {
    const bucketSize = b.max ? b.max * b.burstLength : b.avg / 10;
    const extra = b.level - bucketSize;
    if (extra > 0) return extra / b.avg;
    if (b.max && b.burstLength > 1) {
      const burstExtra = b.burstLevel - b.max / 10;
      if (burstExtra > 0) return burstExtra / b.max;
    }
    return 0;
  }

  /** Start queued requests in order while the buckets allow; otherwise wake up when they will. */
  private dispatch(): void {
    this.timer = undefined;
    this.leak();
    while (this.queue.length > 0) {
      const head = this.queue[0];
      const buckets = this.relevant(head.isWrite);
      const wait = Math.max(0, ...buckets.map((b) => ThrottleGroup.wait(b)));
      if (wait > 0) {
        this.timer = setTimeout(() => this.dispatch(), Math.max(1, Math.ceil(wait * 1000)));
        return;
      }
      // throttle_account: bytes into the bps buckets, operations (in iops-size units) into the iops ones.
      const ops = this.iopsSize && head.bytes > this.iopsSize ? head.bytes / this.iopsSize : 1;
      for (const [name, b] of this.buckets) {
        if (!buckets.includes(b)) continue;
        const units = name.startsWith('bps') ? head.bytes : ops;
        b.level += units;
        if (b.max) b.burstLevel += units;
      }
      this.queue.shift();
      head.start();
    }
  }
}
