/**
 * SocketAddress and SocketAddressLegacy (qapi/sockets.json): where an NBD server listens
 * (nbd-server-start, --nbd-server) and where the nbd block driver connects (its `server` member).
 */
import { bool, enumOf, object, str, uint16, type Members, type Schema } from './schema.js';

const INET_SOCKET_ADDRESS: Members = {
  host: str,
  port: str,
  '*numeric': bool,
  '*to': uint16,
  '*ipv4': bool,
  '*ipv6': bool,
  '*keep-alive': bool,
};
const UNIX_SOCKET_ADDRESS: Members = { path: str, '*abstract': bool, '*tight': bool };
const VSOCK_SOCKET_ADDRESS: Members = { cid: str, port: str };
const FD_SOCKET_ADDRESS: Members = { str: str };
const SOCKET_ADDRESS_TYPE = enumOf('SocketAddressType', ['inet', 'unix', 'vsock', 'fd']);

/** SocketAddressLegacy (QMP's nbd-server-start): each variant wrapped in `data`. */
export const SOCKET_ADDRESS_LEGACY: Schema = {
  kind: 'union',
  name: 'SocketAddressLegacy',
  base: { type: SOCKET_ADDRESS_TYPE },
  discriminator: 'type',
  variants: {
    inet: { data: object('InetSocketAddress', INET_SOCKET_ADDRESS) },
    unix: { data: object('UnixSocketAddress', UNIX_SOCKET_ADDRESS) },
    vsock: { data: object('VsockSocketAddress', VSOCK_SOCKET_ADDRESS) },
    fd: { data: object('String', FD_SOCKET_ADDRESS) },
  },
};

/** SocketAddress (flat: --nbd-server addr.type=unix,addr.path=…, blockdev nbd's server.type=…). */
export const SOCKET_ADDRESS: Schema = {
  kind: 'union',
  name: 'SocketAddress',
  base: { type: SOCKET_ADDRESS_TYPE },
  discriminator: 'type',
  variants: { inet: INET_SOCKET_ADDRESS, unix: UNIX_SOCKET_ADDRESS, vsock: VSOCK_SOCKET_ADDRESS, fd: FD_SOCKET_ADDRESS },
};
