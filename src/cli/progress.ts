/**
 * Progress: how a user-level command (copy, backup, …) shows the progress of its work and its result.
 *
 * - `bar` (a terminal): one line redrawn in place on standard output —
 *   `copy [########......]  42%  27.0 MiB / 64.0 MiB  5.1 MiB/s  ETA 0:07` — and text lines above it.
 * - `json` (standard output is not a terminal): one JSON object a line, for scripts:
 *     {"type":"progress","phase":"copy","done":N,"total":N,"percent":P,"rate":BYTES_PER_S,"eta":S|null}
 *     {"type":"message","text":"…"}
 *     {"type":"result", …the command's result}
 *   `done` never decreases within a phase; `total` may grow (a live source's new writes add to it).
 *   Lines come at most twice a second, and always at a phase's first and last sample.
 * - `none`: no progress, text messages and the result as text.
 * Errors are not shown here: commands print them on standard error.
 */
import type { Writable } from 'node:stream';

export type ProgressMode = 'bar' | 'json' | 'none';

/** `auto` (or undefined): a bar when `out` is a terminal, JSON lines when not. */
export function chooseProgressMode(requested: string | undefined, out: { isTTY?: boolean } = process.stdout): ProgressMode {
  if (requested === undefined || requested === 'auto') return out.isTTY ? 'bar' : 'json';
  if (requested === 'bar' || requested === 'json' || requested === 'none') return requested;
  throw new Error(`--progress must be auto, bar, json or none (not '${requested}')`);
}

/** One sample of a phase's progress, in bytes. */
export interface ProgressSample {
  phase: string;
  done: number;
  total: number;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** 1536 → "1.5 KiB", as people read sizes (powers of 1024). */
export function formatBytes(n: number): string {
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${UNITS[u]}`;
}

/** Seconds → "0:07", "12:34", "1:02:03". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/** The window the rate is measured over: recent enough to follow a change of speed, long enough to be steady. */
const RATE_WINDOW_MS = 5000;
const BAR_INTERVAL_MS = 100;
const JSON_INTERVAL_MS = 500;

interface Timed {
  at: number;
  done: number;
}

export class Progress {
  private phase: string | undefined;
  private history: Timed[] = [];
  private lastDone = 0;
  private lastTotal = 0;
  private lastEmit = 0;
  /** Whether a bar is drawn on the current line (to be cleared before text). */
  private barShown = false;

  constructor(
    readonly mode: ProgressMode,
    private readonly out: Writable & { columns?: number } = process.stdout,
    private readonly clock: () => number = () => Date.now(),
  ) {}

  /**
   * A new sample. Shown when enough time passed since the last one, or when it starts a phase, or
   * with `force` (a phase's last sample). `done` is kept monotone within a phase.
   */
  update(sample: ProgressSample, force = false): void {
    const now = this.clock();
    const newPhase = sample.phase !== this.phase;
    if (newPhase) {
      this.endBar();
      this.phase = sample.phase;
      this.history = [];
      this.lastDone = 0;
    }
    const done = Math.max(this.lastDone, sample.done);
    const total = Math.max(done, sample.total);
    this.lastDone = done;
    this.lastTotal = total;
    this.history.push({ at: now, done });
    while (this.history.length > 2 && now - this.history[0].at > RATE_WINDOW_MS) this.history.shift();
    if (this.mode === 'none') return;
    const interval = this.mode === 'bar' ? BAR_INTERVAL_MS : JSON_INTERVAL_MS;
    if (!newPhase && !force && now - this.lastEmit < interval) return;
    this.lastEmit = now;
    const rate = this.rate();
    const eta = rate > 0 ? (total - done) / rate : undefined;
    if (this.mode === 'json') {
      const percent = total > 0 ? Math.floor((done / total) * 1000) / 10 : 0;
      this.writeJson({ type: 'progress', phase: sample.phase, done, total, percent, rate: Math.round(rate), eta: eta === undefined ? null : Math.round(eta) });
    } else {
      this.drawBar(sample.phase, done, total, rate, eta);
    }
  }

  /** Bytes per second over the recent window (0 until there are two samples). */
  rate(): number {
    const first = this.history[0];
    const last = this.history[this.history.length - 1];
    if (!first || last.at - first.at <= 0) return 0;
    return ((last.done - first.done) * 1000) / (last.at - first.at);
  }

  /** The latest sample's bytes (done, total) of the current phase. */
  get latest(): { done: number; total: number } {
    return { done: this.lastDone, total: this.lastTotal };
  }

  /** A line of text for the user (a message object in json mode). */
  message(text: string): void {
    if (this.mode === 'json') this.writeJson({ type: 'message', text });
    else {
      this.endBar();
      this.out.write(`${text}\n`);
    }
  }

  /** The command's result: one `result` object in json mode, `text` (lines) otherwise. */
  result(result: Record<string, unknown>, text: string): void {
    if (this.mode === 'json') this.writeJson({ type: 'result', ...result });
    else {
      this.endBar();
      this.out.write(text.endsWith('\n') ? text : `${text}\n`);
    }
  }

  /** Finish the bar's line (before the command prints anything else, or exits). */
  endBar(): void {
    if (this.barShown) this.out.write('\n');
    this.barShown = false;
  }

  private writeJson(obj: Record<string, unknown>): void {
    this.out.write(`${JSON.stringify(obj)}\n`);
  }

  private drawBar(phase: string, done: number, total: number, rate: number, eta: number | undefined): void {
    const pct = total > 0 ? Math.floor((done / total) * 100) : 0;
    const tail = `${String(pct).padStart(3)}%  ${formatBytes(done)} / ${formatBytes(total)}  ${formatBytes(Math.round(rate))}/s  ETA ${eta === undefined ? '-:--' : formatDuration(eta)}`;
    const columns = this.out.columns ?? 80;
    const width = Math.max(10, Math.min(40, columns - tail.length - phase.length - 6));
    const filled = total > 0 ? Math.round((done / total) * width) : width;
    const bar = `${phase} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${tail}`;
    // Back to the line's start, the bar, then clear what a longer earlier line left.
    this.out.write(`\r${bar}\x1b[K`);
    this.barShown = true;
  }
}
