/**
 * human-monitor-command, for the HMP commands tooling and QEMU's iotests lean on:
 * `qemu-io [-d] NODE "CMD"`, `trace-event NAME on|off` and `block_resize DEVICE SIZE` (which, as in
 * QEMU 7.2, finds devices only: nodes are resized with QMP block_resize node-name=…). Replies are HMP text with CRLF line ends,
 * as QEMU's monitor returns them; other HMP commands answer "unknown command: 'x'".
 *
 * qemu-io's own text goes where QEMU's goes: printed on the daemon's standard output (its errors such
 * as an unknown command on standard error), and the reply is "" — what scripts written for QEMU
 * assert. Only what the monitor itself says (a node not found, a bad command line) is the reply.
 * Beyond QEMU (README): `__org.bitmirror_output: true` returns qemu-io's text as the reply instead,
 * for callers that want to see what happened (bitmirror's tests and demo).
 */
import { QmpError } from '../errors.js';
import { bool, int, str } from '../qapi/schema.js';
import { command, type CommandDef } from './registry.js';
import { blockdevCommands } from './blockdev.js';
import { QemuIo, type QemuIoOutput } from './qemu-io.js';
import type { Core } from '../core/core.js';
import type { BlockNode } from '../block/node.js';

const sessions = new WeakMap<BlockNode, QemuIo>();

function crlf(s: string): string {
  return s.replace(/\r?\n/g, '\r\n');
}

/** HMP's argument splitter: words separated by spaces, "double quotes" group (with \" escapes). */
function hmpWords(line: string): string[] | undefined {
  const words: string[] = [];
  let i = 0;
  while (i < line.length) {
    while (line[i] === ' ' || line[i] === '\t') i++;
    if (i >= line.length) break;
    let w = '';
    if (line[i] === '"') {
      i++;
      while (i < line.length && line[i] !== '"') {
        if (line[i] === '\\' && i + 1 < line.length) i++;
        w += line[i++];
      }
      if (line[i] !== '"') return undefined;
      i++;
    } else {
      while (i < line.length && line[i] !== ' ' && line[i] !== '\t') w += line[i++];
    }
    words.push(w);
  }
  return words;
}

/** What an HMP command produced: the monitor's own text (the reply) and what qemu-io printed. */
interface HmpOutput extends QemuIoOutput {
  monitor: string;
}

const OUTPUT = '__org.bitmirror_output';

function monitorText(monitor: string): HmpOutput {
  return { monitor, stdout: '', stderr: '' };
}

async function qemuIo(core: Core, args: string[]): Promise<HmpOutput> {
  let device = false;
  if (args[0] === '-d') {
    device = true;
    args = args.slice(1);
  }
  if (args.length === 0) return monitorText('qemu-io: block device name expected\nTry "help qemu-io" for more information\n');
  if (args.length === 1) return monitorText('qemu-io: command line expected\nTry "help qemu-io" for more information\n');
  if (args.length > 2) return monitorText('qemu-io: extraneous characters at the end of line\nTry "help qemu-io" for more information\n');
  const [name, cmdline] = args;
  // bitmirror has no guest devices (BlockBackends), so -d never finds one.
  if (device) return monitorText(`Error: Device '${name}' not found\n`);
  const node = core.graph.find(name);
  if (!node) return monitorText(`Error: Cannot find device='' nor node-name='${name}'\n`);
  let session = sessions.get(node);
  if (!session) {
    session = new QemuIo(node);
    sessions.set(node, session);
  }
  return { monitor: '', ...(await session.run(cmdline)) };
}

/** HMP's size argument ('o'): a number with an optional B/K/M/G/T/P/E suffix, MiB without one. */
function hmpSize(word: string | undefined): number | undefined {
  const m = word === undefined ? null : /^(\d+(?:\.\d*)?)([bBkKmMgGtTpPeE]?)$/.exec(word);
  if (!m) return undefined;
  const shift: Record<string, number> = { b: 0, k: 10, '': 20, m: 20, g: 30, t: 40, p: 50, e: 60 };
  const v = Number(m[1]) * 2 ** shift[m[2].toLowerCase()];
  return Number.isSafeInteger(Math.floor(v)) ? Math.floor(v) : undefined;
}

/** `block_resize DEVICE SIZE`: QMP block_resize by device name (hmp_block_resize), errors as HMP prints them. */
async function blockResize(core: Core, args: string[]): Promise<string> {
  if (args.length === 0) return 'block_resize: block device name expected\nTry "help block_resize" for more information\n';
  const size = hmpSize(args[1]);
  if (size === undefined) return 'invalid size\nTry "help block_resize" for more information\n';
  if (args.length > 2) return 'block_resize: extraneous characters at the end of line\nTry "help block_resize" for more information\n';
  const resize = blockdevCommands.find((c) => c.name === 'block_resize')!;
  try {
    await resize.handler({ device: args[0], size }, core);
    return '';
  } catch (err) {
    if (err instanceof QmpError) return `Error: ${err.message}\n`;
    throw err;
  }
}

function traceEvent(core: Core, args: string[]): string {
  if (args.length !== 2 || (args[1] !== 'on' && args[1] !== 'off')) return 'trace-event: invalid arguments\n';
  const matched = core.trace.setState(args[0], args[1] === 'on');
  if (matched.length === 0 && !/[*?]/.test(args[0])) return `unknown event "${args[0]}"\n`;
  return '';
}

export const hmpCommands: CommandDef[] = [
  command('human-monitor-command', { 'command-line': str, '*cpu-index': int, [`*${OUTPUT}`]: bool }, async (args, core) => {
    const words = hmpWords(args['command-line'] as string);
    if (!words) throw new QmpError('GenericError', 'unterminated string');
    if (words.length === 0) return '';
    const [cmd, ...rest] = words;
    let out: HmpOutput;
    switch (cmd) {
      case 'qemu-io':
        out = await qemuIo(core, rest);
        break;
      case 'trace-event':
        out = monitorText(traceEvent(core, rest));
        break;
      case 'block_resize':
        out = monitorText(await blockResize(core, rest));
        break;
      default:
        out = monitorText(`unknown command: '${cmd}'\n`);
    }
    if (args[OUTPUT] === true) return crlf(out.monitor + out.stdout + out.stderr);
    if (out.stdout) process.stdout.write(out.stdout);
    if (out.stderr) process.stderr.write(out.stderr);
    return crlf(out.monitor);
  }),
];
