import { test } from 'node:test';
import { strict as assert } from 'node:assert';
import { readFile, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { dirtyGrid, renderSvg, renderTerminal, shadeOf, svgColour, svgSize, SVG_LAYOUT, SHADES, type DirtyExtent } from '../../src/cli/dirty-map.js';
import { KiB, MiB } from '../../src/base/sizes.js';
import { mustRun, tempDir } from '../support/tools.js';
import { decodePng } from '../support/png.js';
import { rng } from '../support/random.js';

const GRAN = 64 * KiB;

/** Extents from a set of dirty granules (sorted, adjacent ones merged), as a bitmap reports them. */
function extentsOf(granules: Iterable<number>): DirtyExtent[] {
  const out: DirtyExtent[] = [];
  for (const g of [...new Set(granules)].sort((a, b) => a - b)) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === g * GRAN) last.length += GRAN;
    else out.push({ offset: g * GRAN, length: GRAN });
  }
  return out;
}

/** The shade characters of the map's rows, read back from the rendered text. */
function cellsOf(text: string): string[] {
  return text
    .split('\n')
    .filter((l) => l.includes('│'))
    .map((l) => l.slice(l.indexOf('│') + 1));
}

/**
 * A 64 MiB disk, 1 MiB cells (16 granules each), 16 cells a row: cell 0 all dirty, cell 5 half,
 * cell 10 one granule, cell 20 three quarters, cell 63 (the last) all dirty; the rest clean.
 */
function knownPattern(): { granules: number[]; expected: string[] } {
  const granules: number[] = [];
  const cellGranules = (cell: number, n: number) => {
    for (let k = 0; k < n; k++) granules.push(cell * 16 + k);
  };
  cellGranules(0, 16);
  cellGranules(5, 8);
  cellGranules(10, 1);
  cellGranules(20, 12);
  cellGranules(63, 16);
  const rows = ['█····▒····░·····', '····▓···········', '················', '···············█'];
  return { granules, expected: rows };
}

test('terminal map: a known pattern is drawn cell by cell, with offsets and totals', () => {
  const { granules, expected } = knownPattern();
  const text = renderTerminal({ size: 64 * MiB, extents: extentsOf(granules), granularity: GRAN, title: 'node disk0, bitmap b0' }, { columns: 16, maxRows: 4 });
  assert.deepEqual(cellsOf(text), expected);
  const lines = text.split('\n');
  assert.equal(lines[0], 'node disk0, bitmap b0: 64.0 MiB, one cell = 1.0 MiB');
  assert.deepEqual(
    lines.filter((l) => l.includes('│')).map((l) => l.slice(0, l.indexOf('│')).trim()),
    ['0 B', '16.0 MiB', '32.0 MiB', '48.0 MiB'],
  );
  // 16 + 8 + 1 + 12 + 16 granules of 64 KiB.
  assert.match(text, /dirty 3\.3 MiB of 64\.0 MiB \(5\.18%\) in 5 extents; granularity 64\.0 KiB/);
});

test('terminal map: every cell shows its dirty fraction (random patterns, odd sizes)', () => {
  const rand = rng(4242);
  for (let round = 0; round < 50; round++) {
    const granulesOnDisk = 1 + Math.floor(rand() * 5000);
    // A disk size that is not a multiple of the granularity: the last granule is short.
    const size = granulesOnDisk * GRAN - (rand() < 0.5 ? Math.floor(rand() * (GRAN - 1)) : 0);
    const dirty = new Set<number>();
    const n = Math.floor(rand() * granulesOnDisk);
    for (let k = 0; k < n; k++) dirty.add(Math.floor(rand() * granulesOnDisk));
    const columns = 1 + Math.floor(rand() * 80);
    const maxRows = 1 + Math.floor(rand() * 20);
    const extents = extentsOf(dirty).map((e) => ({ offset: e.offset, length: Math.min(e.length, size - e.offset) }));
    const input = { size, extents, granularity: GRAN, title: 't' };
    const grid = dirtyGrid(input, columns, columns * maxRows);
    assert.ok(grid.fractions.length <= columns * maxRows, 'the map fits');
    assert.equal(grid.cellSize % GRAN, 0, 'a cell never splits a granule');
    // The model: per cell, the dirty bytes counted granule by granule.
    const expected = grid.fractions.map((_, cell) => {
      const start = cell * grid.cellSize;
      const end = Math.min(start + grid.cellSize, size);
      let bytes = 0;
      for (let g = start / GRAN; g * GRAN < end; g++) if (dirty.has(g)) bytes += Math.min((g + 1) * GRAN, size) - g * GRAN;
      return bytes / (end - start);
    });
    assert.deepEqual(grid.fractions.map((f) => f.toFixed(9)), expected.map((f) => f.toFixed(9)));
    const rows = cellsOf(renderTerminal(input, { columns, maxRows }));
    assert.equal(rows.join(''), expected.map(shadeOf).join(''));
    // A cell with any dirty byte is never drawn clean; only a wholly dirty one is solid.
    expected.forEach((f, i) => {
      assert.equal(rows.join('')[i] === SHADES[0], f === 0);
      assert.equal(rows.join('')[i] === SHADES[4], f === 1);
    });
  }
});

test('SVG map: renders with rsvg-convert to a PNG of the expected size that shows the pattern', async () => {
  const { granules } = knownPattern();
  const input = { size: 64 * MiB, extents: extentsOf(granules), granularity: GRAN, title: 'node disk0, bitmap b0 <&>' };
  const svg = renderSvg(input, { columns: 16, maxRows: 4 });
  const grid = dirtyGrid(input, 16, 64);
  const { dir, cleanup } = await tempDir();
  try {
    await writeFile(path.join(dir, 'map.svg'), svg);
    await mustRun('rsvg-convert', ['-f', 'png', '-o', path.join(dir, 'map.png'), path.join(dir, 'map.svg')]);
    const png = decodePng(await readFile(path.join(dir, 'map.png')));
    const { width, height } = svgSize(grid);
    assert.deepEqual([png.width, png.height], [width, height]);
    // The centre pixel of every cell has the cell's colour.
    const step = SVG_LAYOUT.cell + SVG_LAYOUT.gap;
    grid.fractions.forEach((f, i) => {
      const x = SVG_LAYOUT.axis + (i % grid.columns) * step + SVG_LAYOUT.cell / 2;
      const y = SVG_LAYOUT.top + Math.floor(i / grid.columns) * step + SVG_LAYOUT.cell / 2;
      const want = svgColour(f);
      const got = png.pixel(x, y);
      const hex = `#${got
        .slice(0, 3)
        .map((v) => v.toString(16).padStart(2, '0'))
        .join('')}`;
      assert.equal(hex, want, `cell ${i} (${f * 100}% dirty)`);
    });
  } finally {
    await cleanup();
  }
});
