/**
 * Rate limiting for block jobs (the `speed` argument of blockdev-mirror/backup and block-job-set-speed),
 * in bytes per second, measured over slices of 100 ms as QEMU's block jobs do (BLOCK_JOB_SLICE_TIME).
 *
 * A job reports what it has done with `account(bytes)`; `delayMs()` says how long it must wait before the
 * next piece of work so that the average over the current slice stays within the speed. Work done beyond
 * one slice's budget stretches the slice: 1.5 slices' worth of bytes means waiting until 1.5 slice
 * lengths after the slice began. Speed 0 means no limit.
 */
export const JOB_SLICE_MS = 100;

export class RateLimiter {
  private speed = 0;
  /** Bytes allowed per slice (at least 1 when limited). */
  private quota = 0;
  private sliceStart = 0;
  private sliceEnd = 0;
  private dispatched = 0;

  constructor(
    speed = 0,
    private readonly sliceMs = JOB_SLICE_MS,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.setSpeed(speed);
  }

  /** Bytes per second; 0 removes the limit. */
  setSpeed(bytesPerSecond: number): void {
    this.speed = bytesPerSecond;
    this.quota = bytesPerSecond > 0 ? Math.max((bytesPerSecond * this.sliceMs) / 1000, 1) : 0;
  }

  getSpeed(): number {
    return this.speed;
  }

  /** Record `bytes` of work done. */
  account(bytes: number): void {
    if (this.quota === 0) return;
    this.rollSlice();
    this.dispatched += bytes;
    // The slice lasts until the work done in it is paid for. QEMU asks for the delay right after
    // it dispatches; a caller that asks later (its next loop turn, on a loaded machine more than a
    // slice later) must not find the debt forgiven by a new slice.
    if (this.dispatched >= this.quota) this.sliceEnd = Math.max(this.sliceEnd, this.sliceStart + (this.dispatched / this.quota) * this.sliceMs);
  }

  /** Milliseconds to wait before doing more work (0 = go ahead). */
  delayMs(): number {
    if (this.quota === 0) return 0;
    const now = this.rollSlice();
    if (this.dispatched < this.quota) return 0;
    const slices = this.dispatched / this.quota;
    this.sliceEnd = this.sliceStart + slices * this.sliceMs;
    return Math.max(0, this.sliceEnd - now);
  }

  /** Start a new slice when the current one is over; returns the current time. */
  private rollSlice(): number {
    const now = this.now();
    if (now > this.sliceEnd) {
      this.sliceStart = now;
      this.sliceEnd = now + this.sliceMs;
      this.dispatched = 0;
    }
    return now;
  }
}
