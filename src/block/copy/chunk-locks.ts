/**
 * In-flight chunk locks of a copy: the ranges being copied (or written through to the target) right
 * now. Whoever must not overlap one of them waits for it first: a new copy of the same chunks (which
 * could otherwise land later with older data), a guest write that the copy must see before or after
 * (write-blocking mirror, copy-before-write). Ranges are byte ranges; callers round them to chunks.
 */

export interface ChunkLock {
  readonly offset: number;
  readonly bytes: number;
  /** Resolves when the lock is released. */
  readonly done: Promise<void>;
  release(): void;
}

function overlaps(aOff: number, aLen: number, bOff: number, bLen: number): boolean {
  return aOff < bOff + bLen && bOff < aOff + aLen;
}

export class ChunkLocks {
  private readonly held = new Set<ChunkLock>();

  /** How many locks are held. */
  get size(): number {
    return this.held.size;
  }

  /** Whether a held lock overlaps [offset, offset+bytes). */
  overlaps(offset: number, bytes: number): boolean {
    for (const l of this.held) if (overlaps(offset, bytes, l.offset, l.bytes)) return true;
    return false;
  }

  /** Wait until no held lock overlaps [offset, offset+bytes). Returns at once when none does. */
  async wait(offset: number, bytes: number): Promise<void> {
    for (;;) {
      let blocker: ChunkLock | undefined;
      for (const l of this.held) {
        if (overlaps(offset, bytes, l.offset, l.bytes)) {
          blocker = l;
          break;
        }
      }
      if (!blocker) return;
      await blocker.done;
    }
  }

  /**
   * Hold [offset, offset+bytes) until release(), without waiting: the caller has made sure (by wait()
   * or overlaps(), with no await since) that nothing overlapping is held.
   */
  hold(offset: number, bytes: number): ChunkLock {
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    const lock: ChunkLock = {
      offset,
      bytes,
      done,
      release: () => {
        if (this.held.delete(lock)) resolve();
      },
    };
    this.held.add(lock);
    return lock;
  }

  /** wait() then hold(): the range is the caller's until it releases it. */
  async acquire(offset: number, bytes: number): Promise<ChunkLock> {
    await this.wait(offset, bytes);
    return this.hold(offset, bytes);
  }

  /** Resolves when any lock held now is released; undefined when none is held. */
  anyReleased(): Promise<void> | undefined {
    if (this.held.size === 0) return undefined;
    return Promise.race([...this.held].map((l) => l.done));
  }

  /** Resolves when every lock held now is released (locks taken meanwhile are not waited for). */
  async allReleased(): Promise<void> {
    await Promise.all([...this.held].map((l) => l.done));
  }
}
