/**
 * A TCP relay that behaves as a long link (a WAN between hosts) on a machine whose kernel has no netem:
 * every chunk reaches the other side DELAY_MS after it left, and each direction of a connection has at
 * most WINDOW bytes on the wire that the far side has not acknowledged yet — a chunk counts until one
 * more DELAY_MS after its delivery (the acknowledgement's way back), so one connection moves at most
 * WINDOW bytes per round trip, as one TCP connection over such a link does. Past the window the relay
 * stops reading the sender, whose writes then wait in its socket buffer, as they would behind TCP's
 * window. Order is kept and each direction's bytes are passed on unchanged.
 *
 *   node delay-relay.js LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS [WINDOW]
 *
 * WINDOW defaults to linkWindow(): what this kernel lets a TCP sender have in flight. Without the window
 * (unbounded buffering, as this relay had before) a link of any delay carries whatever one connection
 * sends at once, and multi-conn could never matter over it.
 *
 * Prints "listening PORT" on stdout once it accepts connections (LISTEN_PORT 0 picks a free port).
 */
import { readFileSync } from 'node:fs';
import * as net from 'node:net';
import { fileURLToPath } from 'node:url';

/**
 * The bytes one TCP connection of this kernel may have unacknowledged: the sender's socket buffer (it
 * holds every unacknowledged byte; auto-tuned up to tcp_wmem's maximum, 4 MiB by default), unless the
 * receiver's buffer (tcp_rmem's maximum) is smaller. The congestion window only lowers it further (slow
 * start, losses), which this relay leaves out: the estimate favours a single connection.
 */
export function linkWindow(): number {
  const max = (file: string): number => {
    try {
      return Number(readFileSync(file, 'utf8').trim().split(/\s+/)[2]) || Infinity;
    } catch {
      return Infinity;
    }
  };
  const w = Math.min(max('/proc/sys/net/ipv4/tcp_wmem'), max('/proc/sys/net/ipv4/tcp_rmem'));
  return Number.isFinite(w) ? w : 4 << 20;
}

/** Listen on `listenHost:listenPort` and relay each connection to `targetHost:targetPort`. */
export function startRelay(listenHost: string, listenPort: number, targetHost: string, targetPort: number, delay: number, window = linkWindow()): net.Server {
  const server = net.createServer((client) => {
    client.setNoDelay(true);
    const upstream = net.connect({ host: targetHost, port: targetPort });
    upstream.setNoDelay(true);
    delayed(client, upstream, delay, window);
    delayed(upstream, client, delay, window);
  });
  server.listen(listenPort, listenHost, () => {
    const addr = server.address() as net.AddressInfo;
    process.stdout.write(`listening ${addr.port}\n`);
  });
  return server;
}

/** Pass `from`'s data to `to`, each chunk `delay` ms after it arrived, at most `window` bytes unacknowledged; the end too. */
function delayed(from: net.Socket, to: net.Socket, delay: number, window: number): void {
  let onWire = 0;
  const acked = (n: number) => {
    onWire -= n;
    if (onWire < window && from.isPaused()) from.resume();
  };
  from.on('data', (chunk: Buffer) => {
    onWire += chunk.length;
    if (onWire >= window) from.pause();
    // Delivered after `delay`; acknowledged `delay` after the receiving side took it.
    setTimeout(() => to.write(chunk, () => setTimeout(() => acked(chunk.length), delay)), delay);
  });
  from.on('end', () => setTimeout(() => to.end(), delay));
  from.on('error', () => to.destroy());
  from.on('close', () => setTimeout(() => to.destroy(), delay));
}

// Run as a program (the test runner also loads this file, without arguments: then it does nothing).
const args = process.argv.slice(2);
if (process.argv[1] === fileURLToPath(import.meta.url) && (args.length === 5 || args.length === 6)) {
  startRelay(args[0], Number(args[1]), args[2], Number(args[3]), Number(args[4]), args[5] === undefined ? undefined : Number(args[5]));
}
