/**
 * A throwaway Ceph cluster for the rbd tests: test/support/ceph-fixture.sh (one monitor on 127.0.0.1,
 * one manager, one OSD on memstore, a size-1 pool 'rbd', cephx off unless asked for; about 3 s to start) in a temp
 * directory. One cluster per test file: cephCluster() starts it on first use and the file's `after`
 * hook stops it, whether the tests passed or not; a process exit (an uncaught error, a signal the
 * runner forwards) stops it too, synchronously. The fixture only signals daemons whose command line
 * names its own folder, so nothing else is ever killed.
 */
import { after } from 'node:test';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { mustRun, run } from './tools.js';
import { rbdAddon } from '../../src/block/native.js';

const FIXTURE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../test/support/ceph-fixture.sh');

/** The Ceph daemons and tools are installed and bitmirror's librbd addon is built. */
export const haveCeph =
  (await run('sh', ['-c', 'command -v ceph-mon && command -v ceph-osd && command -v ceph-mgr && command -v rbd'])).code === 0 &&
  rbdAddon().addon !== undefined;

/** Why the rbd tests are skipped (for `skip:`), or false when they run. */
export const skipCeph: string | false = haveCeph ? false : `Ceph or the rbd addon is missing: ${rbdAddon().error ?? 'install ceph-mon ceph-osd ceph-mgr ceph-common'}`;

export interface CephCluster {
  /** The cluster's ceph.conf (give it as the rbd driver's `conf`). */
  readonly conf: string;
  /** The monitor's port on 127.0.0.1 (the rbd driver's `server`, without a conf file). */
  readonly monPort: string;
  /** A cephx cluster (cephCluster({ cephx: true })): every client needs a key. */
  readonly cephx: boolean;
  /** The base64 key of a cephx user (`admin`) from the cluster's keyring. */
  key(user: string): Promise<string>;
  readonly pool: string;
  readonly dir: string;
  /** QEMU's legacy filename of an image of the pool: `rbd:POOL/IMAGE:conf=…` (for qemu-img). */
  qemuName(image: string): string;
  /** BlockdevOptionsRbd of an image of the pool. */
  location(image: string): { pool: string; image: string; conf: string };
  /** Run the rbd tool against the cluster. */
  rbd(...args: string[]): Promise<string>;
  /**
   * Break the exclusive lock a killed client left on an image, as an admin does after a client died:
   * `rbd lock rm` blocklists the locker, which also drops its watch, so the next writer takes the lock
   * at once (instead of after the OSD's 30 s watch timeout). Nothing to do when no lock is held.
   */
  breakLock(image: string): Promise<void>;
}

let started: Promise<CephCluster> | undefined;
let dir: string | undefined;

function stopSync(): void {
  if (!dir) return;
  const d = dir;
  dir = undefined;
  try {
    execFileSync('bash', [FIXTURE, 'clean', d], { stdio: 'ignore' });
  } catch {
    rmSync(d, { recursive: true, force: true });
  }
}

// Registered when the test file imports this module (an `after` called inside a test would belong
// to that test): the file's last step stops the cluster, passed or failed.
after(async () => {
  if (!dir) return;
  const d = dir;
  dir = undefined;
  await mustRun('bash', [FIXTURE, 'clean', d]);
});

/**
 * The test file's cluster, started on first use; `cephx` (given on that first use) starts one where
 * every daemon and client authenticates (its keys in the folder's keyring, which its ceph.conf names).
 */
export function cephCluster(opts: { cephx?: boolean } = {}): Promise<CephCluster> {
  started ??= (async () => {
    // Admin socket paths must stay short: a short folder directly under /tmp.
    dir = mkdtempSync('/tmp/bm-ceph-');
    process.once('exit', stopSync);
    const out = await mustRun('env', [`CEPH_FIXTURE_AUTH=${opts.cephx ? 'cephx' : 'none'}`, 'bash', FIXTURE, 'start', dir]);
    const conf = /CEPH_CONF=(.*)/.exec(out)?.[1];
    const monPort = /CEPH_MON_PORT=(.*)/.exec(out)?.[1];
    if (!conf || !monPort) throw new Error(`ceph-fixture printed no CEPH_CONF/CEPH_MON_PORT: ${out}`);
    const keyring = path.join(dir, 'keyring');
    const pool = 'rbd';
    const cluster: CephCluster = {
      conf,
      monPort,
      cephx: opts.cephx === true,
      key: async (user) => (await mustRun('ceph-authtool', ['-p', '-n', `client.${user}`, keyring])).trim(),
      pool,
      dir,
      qemuName: (image) => `rbd:${pool}/${image}:conf=${conf}`,
      location: (image) => ({ pool, image, conf }),
      rbd: (...args) => mustRun('rbd', ['-c', conf, ...args]),
      breakLock: async (image) => {
        const spec = `${pool}/${image}`;
        const lockers = JSON.parse(await cluster.rbd('lock', 'ls', '--format', 'json', spec)) as Array<{ id: string; locker: string }>;
        for (const l of lockers) await cluster.rbd('lock', 'rm', spec, l.id, l.locker);
      },
    };
    return cluster;
  })();
  return started;
}
