/**
 * Waiting for a condition, for tests. A test waits for what it needs (an event, a reply, a line, a
 * file, a state), never for a fixed time; where no event announces the condition, it polls it here.
 * The time limit is only a safety net that names what never came: generous, because two loaded cores
 * can make a step take seconds.
 */

/** Check `cond` every `intervalMs` until it holds; fail after `timeoutMs`, naming `what`. */
export async function poll(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = 60_000, intervalMs = 20): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/**
 * Whether `p` has settled once every callback already queued has run (a turn of the event loop): how
 * unit tests see that something waits, or has stopped waiting, without a timer.
 */
export async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((r) => setImmediate(r));
  return done;
}
