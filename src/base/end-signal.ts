/**
 * The end of something many of which start and end without anyone waiting (a tracked request, a
 * chunk lock: several per piece of a copy): its `done` promise is made only when someone asks for it,
 * so that an eager promise and resolver are not garbage on every one.
 */
export class EndSignal {
  private promise?: Promise<void>;
  private resolver?: () => void;
  private _ended = false;

  get ended(): boolean {
    return this._ended;
  }

  /** Resolves when end() has been called (at once if it has). */
  get done(): Promise<void> {
    if (!this.promise) this.promise = this._ended ? Promise.resolve() : new Promise<void>((r) => (this.resolver = r));
    return this.promise;
  }

  end(): void {
    this._ended = true;
    this.resolver?.();
  }
}
