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

const [listenHost, listenPort, targetHost, targetPort, delayMs] = process.argv.slice(2);
const delay = Number(delayMs);

/** Pass `from`'s data to `to`, each chunk `delay` ms after it arrived; the end too. */
function delayed(from: net.Socket, to: net.Socket): void {
  from.on('data', (chunk: Buffer) => setTimeout(() => to.write(chunk), delay));
  from.on('end', () => setTimeout(() => to.end(), delay));
  from.on('error', () => to.destroy());
  from.on('close', () => setTimeout(() => to.destroy(), delay));
}

const server = net.createServer((client) => {
  client.setNoDelay(true);
  const upstream = net.connect({ host: targetHost, port: Number(targetPort) });
  upstream.setNoDelay(true);
  delayed(client, upstream);
  delayed(upstream, client);
});
server.listen(Number(listenPort), listenHost, () => {
  const addr = server.address() as net.AddressInfo;
  process.stdout.write(`listening ${addr.port}\n`);
});
