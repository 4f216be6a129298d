/**
 * A qemu-io command interpreter over a BlockNode, for HMP's `qemu-io NODE "CMD"`: the way tests and
 * users write "guest" data into a node. Syntax, number parsing (k/M/G suffixes, 0x…) and output text
 * follow qemu-io's ("wrote 65536/65536 bytes at offset 0", "Pattern verification failed at offset 0,
 * 65536 bytes"). A command's text is split as qemu-io's is: what qemu-io prints on standard output
 * and what it prints on standard error (an unknown command); human-monitor-command decides where each goes.
 */
import { errorCode, strerror } from '../errors.js';
import type { BlockNode } from '../block/node.js';

/** qemu-io's request limit: INT_MAX rounded down to 512 bytes. */
const MAX_REQUEST = 2147483136;

class UsageError extends Error {}

/** What one qemu-io command printed: on standard output, and on standard error. */
export interface QemuIoOutput {
  stdout: string;
  stderr: string;
}

interface ParsedArgs {
  flags: Map<string, string | true>;
  rest: string[];
}

/** getopt-style parsing: `spec` lists flags; a ':' after a flag means it takes a value. */
function getopt(args: string[], spec: string): ParsedArgs {
  const flags = new Map<string, string | true>();
  let i = 0;
  for (; i < args.length; i++) {
    const a = args[i];
    if (a === '--') {
      i++;
      break;
    }
    if (!a.startsWith('-') || a.length < 2 || /^-\d/.test(a)) break;
    for (let j = 1; j < a.length; j++) {
      const f = a[j];
      const pos = spec.indexOf(f);
      if (pos < 0) throw new UsageError();
      if (spec[pos + 1] === ':') {
        const val = a.slice(j + 1) || args[++i];
        if (val === undefined) throw new UsageError();
        flags.set(f, val);
        break;
      }
      flags.set(f, true);
    }
  }
  return { flags, rest: args.slice(i) };
}

/** qemu-io's cvtnum: decimal, 0x hex, with an optional k/M/G/T/P/E suffix (binary). */
export function parseNumber(s: string): number | undefined {
  const m = /^(0x[0-9a-fA-F]+|\d+)([kKmMgGtTpPeEbB]?)$/.exec(s);
  if (!m) return undefined;
  const base = m[1].startsWith('0x') ? parseInt(m[1], 16) : Number(m[1]);
  const mult: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };
  const v = base * mult[m[2].toLowerCase()];
  return Number.isSafeInteger(v) ? v : undefined;
}

function num(s: string): number {
  const v = parseNumber(s);
  if (v === undefined) throw new ParseFailure(`Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${s}`);
  return v;
}

class ParseFailure extends Error {}

function pattern(s: string): number {
  const v = parseNumber(s);
  if (v === undefined || v > 255) throw new ParseFailure(`${s} is not a valid pattern byte`);
  return v;
}

/** qemu-io's cvtstr: "64 KiB", "358.339 MiB", "32 bytes". */
function cvtstr(value: number): string {
  const units: Array<[number, string]> = [
    [2 ** 60, 'EiB'],
    [2 ** 50, 'PiB'],
    [2 ** 40, 'TiB'],
    [2 ** 30, 'GiB'],
    [2 ** 20, 'MiB'],
    [2 ** 10, 'KiB'],
  ];
  let suffix = 'bytes';
  for (const [size, name] of units) {
    if (value >= size) {
      value /= size;
      suffix = name;
      break;
    }
  }
  const s = value.toFixed(3).replace(/\.000$/, '');
  return `${s} ${suffix}`;
}

function report(verb: string, bytes: number, offset: number, seconds: number, count = 1): string {
  const t = seconds < 60 ? `${seconds.toFixed(2).padStart(5, '0')} sec` : `${Math.floor(seconds / 60)}:${(seconds % 60).toFixed(2).padStart(5, '0')}`;
  const rate = seconds > 0 ? bytes / seconds : bytes;
  const ops = seconds > 0 ? count / seconds : count;
  return `${verb} ${bytes}/${bytes} bytes at offset ${offset}\n${cvtstr(bytes)}, ${count} ops; ${t} (${cvtstr(rate)}/sec and ${ops.toFixed(4)} ops/sec)\n`;
}

function hexdump(buf: Buffer, offset: number): string {
  let out = '';
  for (let i = 0; i < buf.length; i += 16) {
    const row = buf.subarray(i, i + 16);
    let hex = '';
    let ascii = '';
    for (const b of row) {
      hex += b.toString(16).padStart(2, '0') + ' ';
      // qemu-io shows letters and digits only (isalnum); everything else is '.'.
      ascii += (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a) ? String.fromCharCode(b) : '.';
    }
    out += `${(offset + i).toString(16).padStart(8, '0')}:  ${hex} ${ascii}\n`;
  }
  return out;
}

const USAGE: Record<string, string> = {
  read: 'read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset',
  write: 'write [-bcCfnquz] [-P pattern] off len -- writes a number of bytes at a specified offset',
  discard: 'discard [-Cq] off len -- discards a number of bytes at a specified offset',
  aio_write: 'aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes',
  aio_flush: 'aio_flush -- completes all outstanding aio requests',
  flush: 'flush -- flush all in-core file state to disk',
};

/** The commands run() knows, with their short names. */
const KNOWN_COMMANDS = new Set(['read', 'r', 'write', 'w', 'aio_write', 'discard', 'd', 'flush', 'f', 'aio_flush']);

/** Splits a qemu-io command line into words (qemu-io splits on white space; quotes group words). */
function splitWords(line: string): string[] {
  const words: string[] = [];
  const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(line))) words.push(m[1] ?? m[2] ?? m[3]);
  return words;
}

/**
 * One qemu-io session per node: aio requests started by aio_write complete in the background and their
 * reports are returned by the next aio_flush.
 */
export class QemuIo {
  private readonly pending = new Set<Promise<void>>();
  private aioOutput = '';

  constructor(private readonly node: BlockNode) {}

  async run(line: string): Promise<QemuIoOutput> {
    const words = splitWords(line);
    if (words.length === 0) return { stdout: '', stderr: '' };
    const [cmd, ...args] = words;
    // qemu-io prints "command not found" on stderr (fprintf), everything else on stdout (printf).
    if (!KNOWN_COMMANDS.has(cmd)) return { stdout: '', stderr: `command "${cmd}" not found\n` };
    return { stdout: await this.runKnown(cmd, args), stderr: '' };
  }

  private async runKnown(cmd: string, args: string[]): Promise<string> {
    try {
      switch (cmd) {
        case 'read':
        case 'r':
          return await this.read(args);
        case 'write':
        case 'w':
          return await this.write(args, false);
        case 'aio_write':
          return await this.write(args, true);
        case 'discard':
        case 'd':
          return await this.discard(args);
        case 'flush':
        case 'f':
          await this.node.flush();
          return '';
        case 'aio_flush':
          return await this.aioFlush();
        default:
          throw new Error(`qemu-io: ${cmd} is listed but not handled`);
      }
    } catch (err) {
      if (err instanceof UsageError) return `${USAGE[cmd] ?? cmd}\n`;
      if (err instanceof ParseFailure) return `${err.message}\n`;
      throw err;
    }
  }

  private range(rest: string[], usage: boolean): { offset: number; bytes: number } {
    if (rest.length !== 2 && usage) throw new UsageError();
    const offset = num(rest[0]);
    const bytes = num(rest[1]);
    if (bytes > MAX_REQUEST) throw new ParseFailure(`length cannot exceed ${MAX_REQUEST}, given ${rest[1]}`);
    return { offset, bytes };
  }

  private async read(args: string[]): Promise<string> {
    const { flags, rest } = getopt(args, 'abCqvP:s:l:');
    const { offset, bytes } = this.range(rest, true);
    const pat = flags.has('P') ? pattern(flags.get('P') as string) : undefined;
    const start = process.hrtime.bigint();
    let data: Buffer;
    try {
      data = await this.node.read(offset, bytes);
    } catch (err) {
      return `read failed: ${strerror(errorCode(err))}\n`;
    }
    const secs = Number(process.hrtime.bigint() - start) / 1e9;
    let out = '';
    if (pat !== undefined) {
      const pOff = flags.has('s') ? num(flags.get('s') as string) : 0;
      const pLen = flags.has('l') ? num(flags.get('l') as string) : bytes - pOff;
      const region = data.subarray(pOff, pOff + pLen);
      if (region.some((b) => b !== pat)) out += `Pattern verification failed at offset ${offset + pOff}, ${pLen} bytes\n`;
    }
    if (flags.has('v')) out += hexdump(data, offset);
    if (!flags.has('q')) out += report('read', bytes, offset, secs);
    return out;
  }

  private async write(args: string[], aio: boolean): Promise<string> {
    const { flags, rest } = getopt(args, aio ? 'CfiquzP:' : 'bcCfnquzP:');
    const { offset, bytes } = this.range(rest, true);
    const zero = flags.has('z');
    // qemu-io 7.2's checks, in its order (-b, vmstate, is taken and ignored: a node has no VM state).
    if (flags.has('b') && zero) return '-b and -z cannot be specified at the same time\n';
    if (flags.has('f') && (flags.has('b') || flags.has('c'))) return '-f and -b or -c cannot be specified at the same time\n';
    if (flags.has('n') && !zero) return '-n requires -z to be specified\n';
    if (flags.has('u') && !zero) return '-u requires -z to be specified\n';
    // (aio_write takes -z with -P: it writes zeroes.)
    if (zero && flags.has('P') && !aio) return 'Only one of -z, -P, and -s can be specified at the same time\n';
    const pat = flags.has('P') ? pattern(flags.get('P') as string) : 0xcd; // qemu-io's default pattern
    const start = process.hrtime.bigint();
    // -z wins over -c (qemu-io writes zeroes then); -c is blk_pwrite_compressed.
    const op = zero
      ? this.node.writeZeroes(offset, bytes, { mayUnmap: flags.has('u'), fua: flags.has('f'), noFallback: flags.has('n') })
      : this.node.write(offset, Buffer.alloc(bytes, pat), flags.has('c') ? { compressed: true } : { fua: flags.has('f') });
    const quiet = flags.has('q');
    if (aio) {
      const p: Promise<void> = op.then(
        () => {
          if (!quiet) this.aioOutput += report('wrote', bytes, offset, Number(process.hrtime.bigint() - start) / 1e9);
        },
        (err) => {
          this.aioOutput += `aio_write failed: ${strerror(errorCode(err))}\n`;
        },
      );
      const tracked = p.finally(() => this.pending.delete(tracked));
      this.pending.add(tracked);
      return '';
    }
    try {
      await op;
    } catch (err) {
      return `write failed: ${strerror(errorCode(err))}\n`;
    }
    return quiet ? '' : report('wrote', bytes, offset, Number(process.hrtime.bigint() - start) / 1e9);
  }

  private async discard(args: string[]): Promise<string> {
    const { flags, rest } = getopt(args, 'Cq');
    const { offset, bytes } = this.range(rest, true);
    const start = process.hrtime.bigint();
    try {
      await this.node.discard(offset, bytes);
    } catch (err) {
      return `discard failed: ${strerror(errorCode(err))}\n`;
    }
    return flags.has('q') ? '' : report('discard', bytes, offset, Number(process.hrtime.bigint() - start) / 1e9);
  }

  private async aioFlush(): Promise<string> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
    const out = this.aioOutput;
    this.aioOutput = '';
    return out;
  }

  /** Wait for outstanding aio requests (before the node goes away). */
  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }
}
