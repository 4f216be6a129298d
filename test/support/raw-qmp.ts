/**
 * A raw QMP connection for protocol tests: writes any bytes, collects every reply line (the daemon
 * ends each with CRLF) parsed as JSON, and can wait for a number of replies or for the daemon to close
 * the connection. Unlike QmpClient it negotiates nothing by itself and never interprets replies.
 */
import * as net from 'node:net';

export class RawQmpClient {
  readonly replies: Array<Record<string, unknown>> = [];
  /** Resolves when the socket has closed; `endedByServer` says whether the daemon ended it cleanly. */
  readonly closed: Promise<void>;
  endedByServer = false;
  private buf = '';
  private waiters: Array<() => void> = [];

  constructor(readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (s: string) => {
      this.buf += s;
      let nl;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        this.replies.push(JSON.parse(this.buf.slice(0, nl)) as Record<string, unknown>);
        this.buf = this.buf.slice(nl + 1);
      }
      this.wake();
    });
    sock.on('end', () => (this.endedByServer = true));
    sock.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      sock.once('close', () => {
        this.wake();
        resolve();
      }),
    );
  }

  /** Connect to a monitor socket, read the greeting and (unless told not to) negotiate; both replies are consumed. */
  static async connect(socket: string, negotiate = true): Promise<RawQmpClient> {
    const sock = net.createConnection(socket);
    await new Promise((r) => sock.once('connect', r));
    const c = new RawQmpClient(sock);
    await c.waitFor(1);
    if (negotiate) {
      c.sock.write('{"execute":"qmp_capabilities"}');
      await c.waitFor(2);
      c.replies.splice(0, 2);
    }
    return c;
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Wait until `n` replies have arrived (fails if the connection closes first). */
  async waitFor(n: number): Promise<void> {
    while (this.replies.length < n) {
      if (this.sock.destroyed) throw new Error(`connection closed after ${this.replies.length} of ${n} replies`);
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }
}
