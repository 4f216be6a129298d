/**
 * Named trace points, off by default and cheap when off (one Set lookup). Names follow QEMU's where one
 * exists (mirror_*, hbitmap_*, qmp_job_*). Enabled by glob: `trace-event mirror* on`, `--trace PATTERN`.
 * Output goes to stderr in QEMU's log style: "name key=value …".
 */
export class Tracer {
  /** Every trace point the code declares, so that globs can be listed and checked. */
  private readonly known = new Set<string>();
  private readonly enabled = new Set<string>();
  private patterns: Array<{ re: RegExp; on: boolean }> = [];
  sink: (line: string) => void = (line) => process.stderr.write(line + '\n');

  /** Declare a trace point; returns a function that emits it when enabled. */
  point(name: string): (fields?: Record<string, unknown>) => void {
    this.known.add(name);
    if (this.patterns.some((p) => p.re.test(name))) this.applyPatterns(name);
    return (fields) => {
      if (!this.enabled.has(name)) return;
      const parts = fields ? Object.entries(fields).map(([k, v]) => `${k}=${String(v)}`) : [];
      this.sink(`${process.pid}@${(Date.now() / 1000).toFixed(6)}:${name} ${parts.join(' ')}`.trimEnd());
    };
  }

  private applyPatterns(name: string): void {
    let on = false;
    for (const p of this.patterns) if (p.re.test(name)) on = p.on;
    if (on) this.enabled.add(name);
    else this.enabled.delete(name);
  }

  /** Set the state of every trace point matching `pattern` (a glob with * and ?). Returns the matched names. */
  setState(pattern: string, on: boolean): string[] {
    const re = globToRegExp(pattern);
    this.patterns.push({ re, on });
    const matched = [...this.known].filter((n) => re.test(n));
    for (const n of matched) this.applyPatterns(n);
    return matched;
  }

  /** [{name, state}] for query / trace-event-get-state. */
  getState(pattern: string): Array<{ name: string; state: 'enabled' | 'disabled' }> {
    const re = globToRegExp(pattern);
    return [...this.known]
      .filter((n) => re.test(n))
      .sort()
      .map((name) => ({ name, state: this.enabled.has(name) ? 'enabled' : 'disabled' }));
  }
}

export function globToRegExp(glob: string): RegExp {
  const esc = glob.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp(`^${esc}$`);
}

/** The process-wide tracer: modules declare their points at load time with `tracer.point(name)`. */
export const tracer = new Tracer();
