/**
 * `bitmirror bitmap ACTION DISK …`: the dirty bitmaps of a disk, on an image file (an embedded daemon
 * opens it: persistent bitmaps, offline, as `qemu-img bitmap` does) or on a node of a running daemon
 * (`--qmp SOCKET`, DISK a node name). The actions are QMP's block-dirty-bitmap-* commands, so every
 * check and message is the daemon's (QEMU's); `list` reads query-named-block-nodes; `show` draws where
 * the disk is dirty (dirty-map.ts) from the extents the daemon's NBD server reports for a frozen copy
 * of the bitmap (nbd-access.ts), as any NBD client would read them.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { errorMessage, QmpError } from '../errors.js';
import { CliError, EXIT_OK, EXIT_USAGE, usageError } from './exit-codes.js';
import { Session, type BitmapSummary, type NodeSummary } from './session.js';
import { parseArgs, parseSize, type OptionSpec } from './args.js';
import { dirtyRanges, NbdAccess } from './nbd-access.js';
import { renderSvg, renderTerminal, type DirtyExtent } from './dirty-map.js';
import { formatBytes } from './progress.js';

export const BITMAP_USAGE = `Usage: bitmirror bitmap ACTION [options] DISK [NAME …]
The dirty bitmaps of DISK: an image file (persistent bitmaps, changed offline as qemu-img bitmap
does), or with --qmp a node of a running daemon.

  list DISK                     the bitmaps: name, granularity, dirty bytes, state
  add DISK NAME                 a new bitmap, recording (-g SIZE granularity, --disabled not recording;
                                persistent on a qcow2 image, --transient with --qmp to keep it in memory)
  remove DISK NAME              delete the bitmap
  clear DISK NAME               mark everything clean
  enable DISK NAME              start recording writes
  disable DISK NAME             stop recording writes
  merge DISK TARGET SOURCE…     OR the SOURCE bitmaps into TARGET (sources on another image or node:
                                -b IMAGE_OR_NODE)
  show DISK NAME                where DISK is dirty: a map, one cell per region shaded by how much of
                                it is dirty, with offsets and totals (--svg FILE: an SVG picture too;
                                --json: the dirty extents instead; --columns N cells a row)

  --qmp SOCKET    a running daemon's QMP socket (unix path or HOST:PORT); DISK is a node name
  -h, --help      this help

Exit codes: 0 done, 1 failed, 2 bad arguments or refused (nothing changed).
`;

const OPTIONS: Record<string, OptionSpec> = {
  help: { value: false, short: '-h' },
  qmp: { value: true },
  granularity: { value: true, short: '-g' },
  disabled: { value: false },
  transient: { value: false },
  source: { value: true, short: '-b' },
  svg: { value: true },
  json: { value: false },
  columns: { value: true },
};

/** Which options each action takes (besides --qmp and --help), and its positional arguments. */
const ACTIONS: Record<string, { options: string[]; args: [min: number, max: number]; readOnly: boolean }> = {
  list: { options: ['json'], args: [1, 1], readOnly: true },
  add: { options: ['granularity', 'disabled', 'transient'], args: [2, 2], readOnly: false },
  remove: { options: [], args: [2, 2], readOnly: false },
  clear: { options: [], args: [2, 2], readOnly: false },
  enable: { options: [], args: [2, 2], readOnly: false },
  disable: { options: [], args: [2, 2], readOnly: false },
  merge: { options: ['source'], args: [3, Infinity], readOnly: false },
  show: { options: ['svg', 'json', 'columns'], args: [2, 2], readOnly: true },
};

export async function bitmapMain(argv: string[]): Promise<number> {
  try {
    return await runBitmap(argv);
  } catch (err) {
    process.stderr.write(`bitmirror bitmap: ${errorMessage(err)}\n`);
    if (err instanceof CliError) return err.exitCode;
    // The daemon refused the operation (QEMU's message): nothing changed.
    if (err instanceof QmpError) return EXIT_USAGE;
    return 1;
  }
}

async function runBitmap(argv: string[]): Promise<number> {
  const [action, ...rest] = argv;
  if (action === undefined || action === '-h' || action === '--help') {
    process.stdout.write(BITMAP_USAGE);
    return action === undefined ? EXIT_USAGE : EXIT_OK;
  }
  const spec = ACTIONS[action];
  if (!spec) throw usageError(`unknown action '${action}' (list, add, remove, clear, enable, disable, merge, show)`);
  const { positional, options } = parseArgs(rest, OPTIONS);
  if (options.has('help')) {
    process.stdout.write(BITMAP_USAGE);
    return EXIT_OK;
  }
  for (const name of options.keys()) {
    if (name !== 'qmp' && !spec.options.includes(name)) throw usageError(`${action} takes no option --${name}`);
  }
  const [min, max] = spec.args;
  if (positional.length < min || positional.length > max) {
    const want = { list: 'DISK', add: 'DISK NAME', merge: 'DISK TARGET SOURCE…', show: 'DISK NAME' }[action] ?? 'DISK NAME';
    throw usageError(`${action} expects ${want}`);
  }
  const qmpSocket = options.get('qmp') as string | undefined;
  if (options.has('transient') && qmpSocket === undefined) throw usageError('--transient needs --qmp (a bitmap of an image file must be persistent to outlive the command)');
  const [disk, name, ...sources] = positional;
  const session = await Session.open({ qmp: qmpSocket });
  try {
    const node = qmpSocket !== undefined ? disk : (await openDisk(session, disk, 'disk', spec.readOnly)).node;
    const info = await session.nodeSummary(node);
    const qmp = session.qmp;
    switch (action) {
      case 'list':
        process.stdout.write(options.has('json') ? `${JSON.stringify(info.bitmaps)}\n` : listText(info));
        break;
      case 'add': {
        const g = options.get('granularity');
        await qmp.execute('block-dirty-bitmap-add', {
          node,
          name,
          ...(typeof g === 'string' ? { granularity: parseSize('-g', g) } : {}),
          persistent: !options.has('transient') && (qmpSocket === undefined || info.driver === 'qcow2'),
          disabled: options.has('disabled'),
        });
        break;
      }
      case 'remove':
      case 'clear':
      case 'enable':
      case 'disable':
        await qmp.execute(`block-dirty-bitmap-${action}`, { node, name });
        break;
      case 'merge': {
        const from = options.get('source') as string | undefined;
        let sourceNode = node;
        if (from !== undefined) sourceNode = qmpSocket !== undefined ? from : (await openDisk(session, from, 'source', true)).node;
        await qmp.execute('block-dirty-bitmap-merge', { node, target: name, bitmaps: sources.map((s) => ({ node: sourceNode, name: s })) });
        break;
      }
      case 'show':
        await show(session, node, info, name, disk, {
          json: options.has('json'),
          svg: options.get('svg') as string | undefined,
          columns: options.has('columns') ? parseSize('--columns', options.get('columns') as string) : undefined,
        });
        break;
    }
  } finally {
    // An image's bitmaps are written into it when its node closes (the embedded daemon stops here).
    const problems = await session.close();
    if (problems.length > 0) process.stderr.write(`bitmirror bitmap: ${problems.join('; ')}\n`);
  }
  return EXIT_OK;
}

/** Open an image file in the embedded daemon (read-only when nothing is changed). */
async function openDisk(session: Session, file: string, nodeName: string, readOnly: boolean): Promise<{ node: string }> {
  const abs = path.resolve(file);
  await fsp.access(abs).catch(() => {
    throw usageError(`cannot open '${file}': No such file or directory`);
  });
  return session.openImage(abs, nodeName, { readOnly });
}

/** State words of a bitmap, as qemu-img info's flags say them. */
function stateOf(b: BitmapSummary): string {
  const words = [b.recording ? 'recording' : 'disabled'];
  if (b.persistent) words.push('persistent');
  if (b.busy) words.push('busy');
  if (b.inconsistent) words.push('inconsistent');
  return words.join(',');
}

function listText(info: NodeSummary): string {
  if (info.bitmaps.length === 0) return `no bitmaps on ${info.nodeName}\n`;
  const rows = [['NAME', 'GRANULARITY', 'DIRTY', 'STATE'], ...info.bitmaps.map((b) => [b.name, formatBytes(b.granularity), formatBytes(b.count), stateOf(b)])];
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) => r.map((v, c) => (c === r.length - 1 ? v : v.padEnd(widths[c]))).join('  ')).join('\n') + '\n';
}

/** The dirty extents of bitmap `name` of `node`, through the daemon's NBD server. */
export async function readDirtyExtents(session: Session, node: string, bitmap: BitmapSummary, size: number): Promise<DirtyExtent[]> {
  const access = await NbdAccess.start(session.qmp, 'show');
  try {
    const conn = await access.open(node, { bitmap: { name: bitmap.name, granularity: bitmap.granularity } });
    return (await dirtyRanges(conn, size)).map(([s, e]) => ({ offset: s, length: e - s }));
  } finally {
    await access.close();
  }
}

async function show(
  session: Session,
  node: string,
  info: NodeSummary,
  name: string,
  disk: string,
  opts: { json: boolean; svg?: string; columns?: number },
): Promise<void> {
  const bitmap = info.bitmaps.find((b) => b.name === name);
  if (!bitmap) throw usageError(`Dirty bitmap '${name}' not found`);
  if (bitmap.inconsistent) throw usageError(`Bitmap '${name}' is inconsistent and cannot be used`);
  const extents = await readDirtyExtents(session, node, bitmap, info.virtualSize);
  const input = { size: info.virtualSize, extents, granularity: bitmap.granularity, title: `${disk}, bitmap ${name}` };
  if (opts.json) {
    const dirty = extents.reduce((n, e) => n + e.length, 0);
    process.stdout.write(`${JSON.stringify({ disk, bitmap: name, size: info.virtualSize, granularity: bitmap.granularity, dirty, extents })}\n`);
  } else {
    // One cell a column, within the terminal's width (the offset labels take about 12).
    const columns = opts.columns ?? Math.max(16, Math.min(64, (process.stdout.columns ?? 80) - 12));
    process.stdout.write(renderTerminal(input, { columns }));
  }
  if (opts.svg !== undefined) {
    await fsp.writeFile(opts.svg, renderSvg(input));
    if (!opts.json) process.stdout.write(`picture written to ${opts.svg}\n`);
  }
}
