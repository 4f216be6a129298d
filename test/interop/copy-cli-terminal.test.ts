/**
 * `bitmirror copy` on a terminal, as a person sees it: run in a tmux pane (a real pty), the progress
 * bar is drawn and advances (bytes, rate, ETA), and Ctrl-C typed into the pane cancels the copy
 * cleanly: exit code 130, the message saying what is left, the source untouched, no job or copy node
 * left in the daemon, the copy's file removed. The test waits for rendered lines, never for a time:
 * the copy is throttled (--speed) so that it still runs while the test looks.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { mustRun, run, tempDir } from '../support/tools.js';
import { MiB, startDaemon } from '../support/daemon.js';
import { poll } from '../support/wait.js';
import { BITMIRROR_BIN } from '../../src/daemon/spawn.js';

const haveTmux = (await run('tmux', ['-V'])).code === 0;

/** A tmux server of this test alone, and what the test does with its one pane. */
function tmux(name: string): { cmd: (...args: string[]) => Promise<string>; screen: () => Promise<string> } {
  const env = { ...process.env };
  delete env.TMUX;
  const cmd = async (...args: string[]): Promise<string> => mustRun('tmux', ['-L', name, '-f', '/dev/null', ...args]);
  // -J joins lines the pane wrapped; the bar's line is shown as drawn last.
  const screen = (): Promise<string> => cmd('capture-pane', '-p', '-J', '-t', 'copy');
  return { cmd, screen };
}

const quote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

test('copy in a terminal: the progress bar advances, Ctrl-C cancels cleanly', { skip: haveTmux ? false : 'tmux is not installed' }, async () => {
  const { dir, cleanup } = await tempDir('bm-copy-tty-');
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(sock);
  const t = tmux(`bm-copy-${process.pid}`);
  try {
    const src = path.join(dir, 'src.qcow2');
    await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(32 * MiB)]);
    await mustRun('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${24 * MiB}`, src]);
    await mustRun('qemu-img', ['bitmap', '--add', src, 'bm0']);
    const orig = path.join(dir, 'src.orig.qcow2');
    await fsp.copyFile(src, orig);
    await d.qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: src } });
    const dst = path.join(dir, 'dst.qcow2');
    // 24 MiB at 2 MiB/s: about 12 seconds, if nobody stops it.
    const copy = [process.execPath, BITMIRROR_BIN, 'copy', '--qmp', sock, '--speed', '2M', 'disk0', dst].map(quote).join(' ');
    await t.cmd('new-session', '-d', '-s', 'copy', '-x', '200', '-y', '20', `${copy}; echo EXIT=$?; sleep 86400`);

    // The bar: phase, the bar itself, percent, bytes done / total, rate, ETA.
    const bar = /copy \[#*\.*\]\s+(\d+)%\s+[\d.]+ (?:B|KiB|MiB) \/ [\d.]+ (?:B|KiB|MiB)\s+[\d.]+ (?:B|KiB|MiB)\/s\s+ETA (?:\d+:\d\d|-:--)/;
    let first = -1;
    await poll('a progress bar past 0%', async () => {
      const m = bar.exec(await t.screen());
      if (m && Number(m[1]) > 0) first = Number(m[1]);
      return first > 0;
    });
    let later = first;
    await poll('the bar to advance', async () => {
      const m = bar.exec(await t.screen());
      if (m) later = Number(m[1]);
      return later > first;
    });
    assert.ok(later < 100, `the copy was meant to be still running (${later}%)`);
    assert.match(await t.screen(), /ETA \d+:\d\d/);

    await t.cmd('send-keys', '-t', 'copy', 'C-c');
    let screen = '';
    await poll('the command to exit', async () => /EXIT=\d+/.test((screen = await t.screen())));
    assert.match(screen, /EXIT=130\b/, screen);
    assert.match(screen, /bitmirror copy: cancelled: 'disk0' is untouched; the incomplete copy '.*dst\.qcow2' was removed/, screen);
    // Nothing is left in the daemon: no job, no node of the copy; the source is open and as it was.
    assert.deepEqual(await d.qmp.execute('query-jobs'), []);
    const nodes = (await d.qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true })).map((n) => n['node-name']).sort();
    assert.deepEqual(nodes.filter((n) => !n.startsWith('#')), ['disk0']);
    assert.ok(!existsSync(dst));
    assert.equal(await d.stop(), 0, d.stderr());
    const cmp = await run('qemu-img', ['compare', src, orig]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    const info = await mustRun('qemu-img', ['info', '--output=json', src]);
    assert.match(info, /"name": "bm0"/);
    assert.equal((await run('qemu-img', ['check', src])).code, 0);
  } finally {
    await t.cmd('kill-server').catch(() => undefined);
    await d.stop();
    await cleanup();
  }
});
