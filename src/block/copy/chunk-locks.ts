/**
 * In-flight chunk locks of a copy: the ranges being copied (or written through to the target) right
 * now. Whoever must not overlap one of them waits for it first: a new copy of the same chunks (which
 * could otherwise land later with older data), a guest write that the copy must see before or after
 * (write-blocking mirror, copy-before-write). Ranges are byte ranges; callers round them to chunks.
 *
 * Every piece a copy moves takes and releases a lock, and its job's loop waits for "any copy ended"
 * between pieces: so nothing here makes a promise that nobody waits for, and the held locks are a
 * plain array (at most a job's copies in flight plus its writers) walked by index.
 */

import { EndSignal } from '../../base/end-signal.js';

export interface ChunkLock {
  readonly offset: number;
  readonly bytes: number;
  /** Resolves when the lock is released. */
  readonly done: Promise<void>;
  release(): void;
}

/** A held lock; its `done` promise is made only when someone waits. */
class Held extends EndSignal implements ChunkLock {
  constructor(
    private readonly locks: ChunkLocks,
    readonly offset: number,
    readonly bytes: number,
  ) {
    super();
  }

  release(): void {
    if (this.ended) return;
    this.locks.forget(this);
    this.end();
  }
}

export class ChunkLocks {
  private readonly held: Held[] = [];
  /** anyReleased's promise while someone waits on it: resolved by the next release. */
  private nextRelease?: { promise: Promise<void>; resolve: () => void };

  /** How many locks are held. */
  get size(): number {
    return this.held.length;
  }

  /** Whether a held lock overlaps [offset, offset+bytes). */
  overlaps(offset: number, bytes: number): boolean {
    return this.blocker(offset, bytes) !== undefined;
  }

  private blocker(offset: number, bytes: number): Held | undefined {
    const held = this.held;
    const end = offset + bytes;
    for (let i = 0; i < held.length; i++) {
      const h = held[i];
      if (offset < h.offset + h.bytes && h.offset < end) return h; // they overlap
    }
    return undefined;
  }

  /**
   * Wait until no held lock overlaps [offset, offset+bytes). Undefined (nothing to wait for, no
   * promise made) when none does now: callers `if (w) await w`, so that a free range costs no turn.
   */
  wait(offset: number, bytes: number): Promise<void> | undefined {
    const blocker = this.blocker(offset, bytes);
    return blocker ? this.waitFrom(blocker, offset, bytes) : undefined;
  }

  private async waitFrom(blocker: Held | undefined, offset: number, bytes: number): Promise<void> {
    for (; blocker; blocker = this.blocker(offset, bytes)) await blocker.done;
  }

  /**
   * Hold [offset, offset+bytes) until release(), without waiting: the caller has made sure (by wait()
   * or overlaps(), with no await since) that nothing overlapping is held.
   */
  hold(offset: number, bytes: number): ChunkLock {
    const lock = new Held(this, offset, bytes);
    this.held.push(lock);
    return lock;
  }

  /** A lock is released (Held.release): drop it and wake anyReleased's waiters. */
  forget(lock: Held): void {
    const i = this.held.indexOf(lock);
    if (i >= 0) this.held.splice(i, 1);
    const next = this.nextRelease;
    if (next) {
      this.nextRelease = undefined;
      next.resolve();
    }
  }

  /** wait() then hold(): the range is the caller's until it releases it. */
  async acquire(offset: number, bytes: number): Promise<ChunkLock> {
    const w = this.wait(offset, bytes);
    if (w) await w;
    return this.hold(offset, bytes);
  }

  /**
   * Resolves when a lock is released (any lock: one held now, or one taken and released before them);
   * undefined when none is held. Callers look again at what they wait for, so an early wake is harmless.
   */
  anyReleased(): Promise<void> | undefined {
    if (this.held.length === 0) return undefined;
    if (!this.nextRelease) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      this.nextRelease = { promise, resolve };
    }
    return this.nextRelease.promise;
  }

  /** Resolves when every lock held now is released (locks taken meanwhile are not waited for). */
  async allReleased(): Promise<void> {
    await Promise.all(this.held.map((l) => l.done));
  }
}
