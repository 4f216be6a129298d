/**
 * Command-line parsing for the user-level commands: `--name VALUE`, `--name=VALUE`, short aliases,
 * flags, and positional arguments, with usage errors (exit code 2) in one wording.
 */
import { usageError } from './exit-codes.js';

/** An option: whether it takes a value, and its short alias ("-g"). */
export interface OptionSpec {
  value: boolean;
  short?: string;
}

export interface ParsedArgs {
  positional: string[];
  /** Options given, by long name without dashes: the value, or true for a flag. The last one wins. */
  options: Map<string, string | true>;
}

export function parseArgs(argv: readonly string[], spec: Readonly<Record<string, OptionSpec>>): ParsedArgs {
  const positional: string[] = [];
  const options = new Map<string, string | true>();
  const byShort = new Map(Object.entries(spec).flatMap(([name, s]) => (s.short ? [[s.short, name] as const] : [])));
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    let name: string | undefined;
    let inline: string | undefined;
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      name = eq > 0 ? arg.slice(2, eq) : arg.slice(2);
      inline = eq > 0 ? arg.slice(eq + 1) : undefined;
      if (!(name in spec)) throw usageError(`unrecognized option '${arg}'`);
    } else if (arg.startsWith('-') && arg !== '-') {
      name = byShort.get(arg);
      if (name === undefined) throw usageError(`unrecognized option '${arg}'`);
    } else {
      positional.push(arg);
      continue;
    }
    if (spec[name].value) {
      const v = inline ?? argv[++i];
      if (v === undefined) throw usageError(`option '${arg}' requires an argument`);
      options.set(name, v);
    } else {
      if (inline !== undefined) throw usageError(`option '--${name}' takes no argument`);
      options.set(name, true);
    }
  }
  return { positional, options };
}

/** A size with an optional binary suffix: "65536", "64K", "1M" (K, M, G, T: powers of 1024). */
export function parseSize(what: string, text: string): number {
  const m = /^(\d+)([kKmMgGtT]?)(i?[bB])?$/.exec(text);
  if (!m) throw usageError(`${what}: '${text}' is not a size (bytes, or with K, M, G, T)`);
  return Number(m[1]) * 2 ** { '': 0, k: 10, m: 20, g: 30, t: 40 }[m[2].toLowerCase()]!;
}
