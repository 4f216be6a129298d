/**
 * `npm run bench`: runs every benchmark and prints its table. Each benchmark compares bitmirror with the
 * peer tool on the same files in the same run and reports ratios, since absolute times on shared
 * machines are noise. A benchmark whose peer is not installed says so and reports bitmirror alone.
 * Pass names to run a subset: `npm run bench -- hbitmap`.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

type Row = Record<string, string | number>;

function printTable(title: string, rows: Row[]): void {
  process.stdout.write(`\n## ${title}\n`);
  if (rows.length === 0) return;
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const fmt = (v: unknown) => (typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v ?? ''));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => fmt(r[c]).length)));
  const line = (vals: string[]) => '| ' + vals.map((v, i) => v.padEnd(widths[i])).join(' | ') + ' |\n';
  process.stdout.write(line(cols));
  process.stdout.write(line(widths.map((w) => '-'.repeat(w))));
  for (const r of rows) process.stdout.write(line(cols.map((c) => fmt(r[c]))));
}

async function main(): Promise<void> {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const only = process.argv.slice(2);
  const files = (await fsp.readdir(here)).filter((f) => f.endsWith('.js') && f !== 'run.js').sort();
  for (const f of files) {
    const name = f.replace(/\.js$/, '');
    if (only.length > 0 && !only.includes(name)) continue;
    const mod = (await import(pathToFileURL(path.join(here, f)).href)) as { run?: () => Promise<Row[]>; title?: string };
    if (typeof mod.run !== 'function') continue;
    process.stdout.write(`running ${name}…\n`);
    const rows = await mod.run();
    printTable(mod.title ?? name, rows);
  }
}

main().catch((err) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
