/**
 * The picture `bitmirror bitmap show` draws of where a disk is dirty: the disk cut into equal cells
 * (one cell per region), each shaded by the fraction of its bytes the bitmap marks dirty, drawn as a
 * terminal heat map (offsets on the left axis, totals below) or as an SVG file a browser opens.
 * Pure functions of the extents: no I/O, so the drawing is unit-tested against known patterns.
 */
import { formatBytes } from './progress.js';

/** A dirty range of the disk, in bytes. */
export interface DirtyExtent {
  offset: number;
  length: number;
}

/** What is drawn: the disk's size, the bitmap's dirty extents (sorted, not overlapping) and names. */
export interface DirtyMapInput {
  size: number;
  extents: readonly DirtyExtent[];
  /** The bitmap's granularity: cells are a power-of-two multiple of it. */
  granularity: number;
  /** Shown in the title ("node disk0, bitmap b0"). */
  title: string;
}

/** The disk cut into cells: cellSize bytes each (the last may be shorter), each with its dirty fraction. */
export interface DirtyGrid {
  cellSize: number;
  columns: number;
  rows: number;
  /** Per cell, the dirty fraction in [0, 1]; cells past the end of the disk are absent. */
  fractions: number[];
  dirtyBytes: number;
}

/**
 * Cut the disk into at most `maxCells` cells of `columns` per row. The cell size is the granularity
 * times the smallest power of two that fits, so cell boundaries (and the axis offsets) are round
 * numbers and a cell never splits a bitmap granule.
 */
export function dirtyGrid(input: DirtyMapInput, columns: number, maxCells: number): DirtyGrid {
  if (columns < 1 || maxCells < 1) throw new Error('a map needs at least one cell');
  let cellSize = Math.max(1, input.granularity);
  while (Math.ceil(input.size / cellSize) > maxCells) cellSize *= 2;
  const cells = Math.max(1, Math.ceil(input.size / cellSize));
  const dirty = new Array<number>(cells).fill(0);
  let dirtyBytes = 0;
  for (const e of input.extents) {
    const end = Math.min(e.offset + e.length, input.size);
    dirtyBytes += Math.max(0, end - e.offset);
    for (let pos = e.offset; pos < end; ) {
      const cell = Math.floor(pos / cellSize);
      const cellEnd = Math.min((cell + 1) * cellSize, end);
      dirty[cell] += cellEnd - pos;
      pos = cellEnd;
    }
  }
  const fractions = dirty.map((bytes, i) => bytes / (Math.min((i + 1) * cellSize, input.size) - i * cellSize || 1));
  const cols = Math.min(columns, cells);
  return { cellSize, columns: cols, rows: Math.ceil(cells / cols), fractions, dirtyBytes };
}

/**
 * The terminal's shades, clean to fully dirty. Any dirty byte shows (a cell with one dirty granule
 * is never drawn clean) and only a wholly dirty cell is solid.
 */
export const SHADES = ['·', '░', '▒', '▓', '█'] as const;

export function shadeOf(fraction: number): string {
  if (fraction <= 0) return SHADES[0];
  if (fraction >= 1) return SHADES[4];
  if (fraction <= 0.25) return SHADES[1];
  if (fraction <= 0.5) return SHADES[2];
  return SHADES[3];
}

/** Percent with enough digits that a little dirt does not read as 0%. */
function percent(part: number, whole: number): string {
  if (whole === 0 || part === 0) return '0%';
  const p = (100 * part) / whole;
  return `${p >= 10 ? p.toFixed(1) : p >= 0.1 ? p.toFixed(2) : p.toPrecision(2)}%`;
}

/** The totals line both pictures print. */
export function totalsLine(input: DirtyMapInput, grid: DirtyGrid): string {
  return (
    `dirty ${formatBytes(grid.dirtyBytes)} of ${formatBytes(input.size)} (${percent(grid.dirtyBytes, input.size)}) ` +
    `in ${input.extents.length} extent${input.extents.length === 1 ? '' : 's'}; granularity ${formatBytes(input.granularity)}`
  );
}

/**
 * The terminal heat map: a title, one row per `columns` cells with the row's start offset on the
 * axis, a legend and the totals. Plain text (no colours), so it reads the same in a pipe or a log.
 */
export function renderTerminal(input: DirtyMapInput, opts: { columns?: number; maxRows?: number } = {}): string {
  const columns = opts.columns ?? 64;
  const grid = dirtyGrid(input, columns, columns * (opts.maxRows ?? 16));
  const labels = Array.from({ length: grid.rows }, (_, r) => formatBytes(r * grid.columns * grid.cellSize));
  const width = Math.max(...labels.map((l) => l.length));
  const lines = [`${input.title}: ${formatBytes(input.size)}, one cell = ${formatBytes(grid.cellSize)}`];
  for (let r = 0; r < grid.rows; r++) {
    const cells = grid.fractions.slice(r * grid.columns, (r + 1) * grid.columns).map(shadeOf).join('');
    lines.push(`${labels[r].padStart(width)} │${cells}`);
  }
  lines.push(`${' '.repeat(width)}   ${SHADES[0]} clean  ${SHADES[1]} ≤25%  ${SHADES[2]} ≤50%  ${SHADES[3]} <100%  ${SHADES[4]} all dirty`);
  lines.push(totalsLine(input, grid));
  return lines.join('\n') + '\n';
}

/** Geometry of the SVG picture, in pixels (the test checks the PNG rsvg-convert makes of it). */
export const SVG_LAYOUT = { cell: 12, gap: 1, axis: 80, top: 40, bottom: 50, right: 16, minWidth: 720 } as const;

/** The SVG's size in pixels for a grid. */
export function svgSize(grid: DirtyGrid): { width: number; height: number } {
  const L = SVG_LAYOUT;
  return {
    // Wide enough for the totals line and the legend below a narrow grid.
    width: Math.max(L.axis + grid.columns * (L.cell + L.gap) + L.right, L.minWidth),
    height: L.top + grid.rows * (L.cell + L.gap) + L.bottom,
  };
}

function escapeXml(s: string): string {
  return s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);
}

/** Clean cells light grey, dirty ones from pale orange (a little) to deep red (all). */
export function svgColour(fraction: number): string {
  if (fraction <= 0) return '#eeeeee';
  const t = Math.min(1, fraction);
  const mix = (a: number, b: number) => Math.round(a + (b - a) * t);
  const hex = (v: number) => v.toString(16).padStart(2, '0');
  return `#${hex(mix(0xfd, 0xb1))}${hex(mix(0xd0, 0x00))}${hex(mix(0xa2, 0x26))}`;
}

/**
 * The SVG picture: the same grid (more cells by default), each cell a rectangle whose tooltip gives
 * its range and dirty fraction, offsets on the left axis, title on top, totals and a legend below.
 */
export function renderSvg(input: DirtyMapInput, opts: { columns?: number; maxRows?: number } = {}): string {
  const columns = opts.columns ?? 128;
  const grid = dirtyGrid(input, columns, columns * (opts.maxRows ?? 64));
  const L = SVG_LAYOUT;
  const { width, height } = svgSize(grid);
  const step = L.cell + L.gap;
  const out: string[] = [];
  out.push(`<?xml version="1.0" encoding="UTF-8"?>`);
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="monospace" font-size="11">`);
  out.push(`<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`);
  out.push(`<text x="${L.axis}" y="16" font-size="13" font-weight="bold">${escapeXml(input.title)}</text>`);
  out.push(`<text x="${L.axis}" y="32">${escapeXml(`${formatBytes(input.size)}, one cell = ${formatBytes(grid.cellSize)}`)}</text>`);
  // Label every row when they fit, else every few rows, so labels never overlap.
  const labelEvery = Math.ceil(14 / step);
  grid.fractions.forEach((f, i) => {
    const r = Math.floor(i / grid.columns);
    const c = i % grid.columns;
    const start = i * grid.cellSize;
    const end = Math.min(start + grid.cellSize, input.size);
    const tip = `${formatBytes(start)} – ${formatBytes(end)}: ${percent(f * (end - start), end - start)} dirty`;
    out.push(`<rect x="${L.axis + c * step}" y="${L.top + r * step}" width="${L.cell}" height="${L.cell}" fill="${svgColour(f)}"><title>${escapeXml(tip)}</title></rect>`);
  });
  for (let r = 0; r < grid.rows; r += labelEvery) {
    const y = L.top + r * step + L.cell - 2;
    out.push(`<text x="${L.axis - 6}" y="${y}" text-anchor="end">${escapeXml(formatBytes(r * grid.columns * grid.cellSize))}</text>`);
  }
  const below = L.top + grid.rows * step;
  out.push(`<text x="${L.axis}" y="${below + 18}">${escapeXml(totalsLine(input, grid))}</text>`);
  const legend = [0, 0.25, 0.5, 0.75, 1];
  legend.forEach((f, k) => {
    const x = L.axis + k * 70;
    out.push(`<rect x="${x}" y="${below + 28}" width="${L.cell}" height="${L.cell}" fill="${svgColour(f)}"/>`);
    out.push(`<text x="${x + L.cell + 4}" y="${below + 38}">${f === 0 ? 'clean' : `${f * 100}%`}</text>`);
  });
  out.push(`</svg>`);
  return out.join('\n') + '\n';
}
