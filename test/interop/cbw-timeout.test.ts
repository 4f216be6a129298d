/**
 * The copy-before-write filter's cbw-timeout (QEMU 7.1's, iotests' tests/copy-before-write): a copy
 * before a write that takes longer than the timeout fails as ETIMEDOUT, and on-cbw-error decides what
 * breaks. The target is an NBD export whose server (qemu-nbd) is stopped with SIGSTOP, so every copy to
 * it is stuck until SIGCONT: nothing depends on timing but the timeout under test (a write that waited
 * for the copy would wait until the test's own timeout). break-snapshot: the guest write completes and
 * the point-in-time image is broken (snapshot-access reads fail EACCES). break-guest-write: the write
 * fails (Connection timed out), the source keeps its data; the stuck copy ends once the server runs
 * again, and the snapshot then reads the old data.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { MiB, setup, qcow2, addQcow2, io, poll } from '../support/daemon.js';
import { mustRun } from '../support/tools.js';

/** qemu-nbd serving a raw file on a unix socket, forked once it listens: its pid, and how to end it. */
async function qemuNbd(file: string, sock: string, pidFile: string): Promise<{ pid: number; stop: () => void }> {
  await mustRun('qemu-nbd', ['--fork', '--pid-file', pidFile, '-k', sock, '-f', 'raw', '-e', '4', file]);
  await poll("qemu-nbd's pid file", async () => /^\d+\s*$/.test(await fsp.readFile(pidFile, 'utf8').catch(() => '')));
  const pid = Number((await fsp.readFile(pidFile, 'utf8')).trim());
  const kill = (signal: NodeJS.Signals): void => {
    try {
      process.kill(pid, signal);
    } catch {
      // Already gone.
    }
  };
  // A test that hangs (the timeout not working) is ended by the runner: no stopped server stays behind.
  const onExit = (): void => kill('SIGKILL');
  process.once('exit', onExit);
  return {
    pid,
    stop: () => {
      process.off('exit', onExit);
      kill('SIGCONT');
      kill('SIGTERM');
    },
  };
}

for (const mode of ['break-snapshot', 'break-guest-write'] as const) {
  test(`cbw-timeout with on-cbw-error=${mode}: a copy stuck on its target times out`, async () => {
    const env = await setup(`cbw-timeout-${mode}`);
    let server: { pid: number; stop: () => void } | undefined;
    try {
      const src = await qcow2(env.f('src.qcow2'), 4 * MiB);
      await mustRun('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 4M', src]);
      await addQcow2(env, 'src', src);
      const temp = env.f('temp.raw');
      await fsp.writeFile(temp, Buffer.alloc(0));
      await fsp.truncate(temp, 4 * MiB);
      server = await qemuNbd(temp, env.f('nbd.sock'), env.f('nbd.pid'));
      const pid = server.pid;
      await env.d.qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'temp', server: { type: 'unix', path: env.f('nbd.sock') }, export: '' });
      await env.d.qmp.execute('blockdev-add', { driver: 'copy-before-write', 'node-name': 'cbw', file: 'src', target: 'temp', 'on-cbw-error': mode, 'cbw-timeout': 1 });
      await env.d.qmp.execute('blockdev-add', { driver: 'snapshot-access', 'node-name': 'access', file: 'cbw' });
      // The target's server stops: the copy before the next write cannot end.
      process.kill(pid, 'SIGSTOP');
      const out = await env.d.qmp.hmpOutput('qemu-io cbw "write -P 0x22 0 64k"');
      if (mode === 'break-snapshot') {
        assert.match(out, /^wrote 65536\/65536 bytes at offset 0/);
        assert.match(await io(env, 'src', 'read -P 0x22 0 64k'), /read 65536/);
        // The point-in-time image is broken: every read of it fails, also where nothing was written.
        assert.match(await env.d.qmp.hmpOutput('qemu-io access "read 1M 64k"'), /read failed: Permission denied/);
        process.kill(pid, 'SIGCONT');
        assert.match(await env.d.qmp.hmpOutput('qemu-io access "read 0 64k"'), /read failed: Permission denied/);
        // Later writes copy nothing (the snapshot is gone) and are not held up.
        assert.match(await io(env, 'cbw', 'write -P 0x33 2M 64k'), /wrote 65536/);
      } else {
        assert.match(out, /write failed: Connection timed out/);
        assert.match(await io(env, 'src', 'read -P 0x11 0 64k'), /read 65536/);
        process.kill(pid, 'SIGCONT');
        // The stuck copy ends (a snapshot read of its chunks waits for it): the old data is on the target.
        assert.match(await io(env, 'access', 'read -P 0x11 0 64k'), /read 65536/);
        assert.match(await io(env, 'cbw', 'write -P 0x22 0 64k'), /wrote 65536/);
        assert.match(await io(env, 'access', 'read -P 0x11 0 64k'), /read 65536/);
        assert.match(await io(env, 'src', 'read -P 0x22 0 64k'), /read 65536/);
        const onTarget = await mustRun('qemu-io', ['-r', '-U', '-f', 'raw', '-c', 'read -P 0x11 0 64k', temp]);
        assert.match(onTarget, /read 65536/);
      }
      for (const node of ['access', 'cbw', 'temp']) await env.d.qmp.execute('blockdev-del', { 'node-name': node });
    } finally {
      server?.stop();
      await env.done();
    }
  });
}
