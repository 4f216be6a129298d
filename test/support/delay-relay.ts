/**
 * A TCP relay that delays every chunk by a fixed time in each direction: a long link (a WAN between
 * hosts) on a machine whose kernel has no netem. Order is kept (the delay is the same for every chunk),
 * and each direction's bytes are passed on unchanged.
 *
 *   node delay-relay.js LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS
 *
 * Prints "listening PORT" on stdout once it accepts connections (LISTEN_PORT 0 picks a free port).
 */
import * as net from 'node:net';
import { fileURLToPath } from 'node:url';

/** Listen on `listenHost:listenPort` and relay each connection to `targetHost:targetPort`. */
export function startRelay(listenHost: string, listenPort: number, targetHost: string, targetPort: number, delay: number): net.Server {
  const server = net.createServer((client) => {
    client.setNoDelay(true);
    const upstream = net.connect({ host: targetHost, port: targetPort });
    upstream.setNoDelay(true);
    delayed(client, upstream, delay);
    delayed(upstream, client, delay);
  });
  server.listen(listenPort, listenHost, () => {
    const addr = server.address() as net.AddressInfo;
    process.stdout.write(`listening ${addr.port}\n`);
  });
  return server;
}

/** Pass `from`'s data to `to`, each chunk `delay` ms after it arrived; the end too. */
function delayed(from: net.Socket, to: net.Socket, delay: number): void {
  from.on('data', (chunk: Buffer) => setTimeout(() => to.write(chunk), delay));
  from.on('end', () => setTimeout(() => to.end(), delay));
  from.on('error', () => to.destroy());
  from.on('close', () => setTimeout(() => to.destroy(), delay));
}

// Run as a program (the test runner also loads this file, without arguments: then it does nothing).
const args = process.argv.slice(2);
if (process.argv[1] === fileURLToPath(import.meta.url) && args.length === 5) {
  startRelay(args[0], Number(args[1]), args[2], Number(args[3]), Number(args[4]));
}
