/**
 * The QMP monitor: unix and TCP socket servers, one session per client, the greeting, capability
 * negotiation, dispatch of commands through the command table and delivery of events. Commands of one
 * client run one at a time, in order (as QEMU's monitor does without OOB); clients are independent.
 * A client that goes away mid-command harms nothing: the command finishes and its reply is dropped
 * (requests it had queued behind it are dropped, as QEMU does). A client that half-closes (shuts down
 * its write side) gets a reply to every request it sent, then the socket is closed.
 * A monitor can also run on the daemon's standard input and output (`--chardev stdio`): one session
 * from the start, as QEMU's; the end of standard input ends nothing else (replies and events still
 * go out; the daemon runs on until quit).
 *
 * Fairness and memory: one client's input is parsed and executed in bounded steps, with a turn of the
 * event loop between them, so a client flooding requests (or garbage) cannot delay another's; its
 * socket is not read while its unparsed input or its unread output is large (back-pressure), so a
 * client that never reads its replies makes the daemon hold a bounded amount for it.
 */
import * as net from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { promises as fsp } from 'node:fs';
import { QmpError, errorMessage } from '../errors.js';
import { encodeQmp, JsonStreamParser, Utf8StreamDecoder, type JsonMessage } from './json.js';
import { visit } from '../qapi/schema.js';
import type { CommandDef } from '../commands/registry.js';
import type { Core } from '../core/core.js';
import { tracer } from '../trace/trace.js';
import { QEMU_COMPAT_VERSION } from '../base/version.js';


const traceDispatch = tracer.point('monitor_qmp_cmd_in_band');
const traceRespond = tracer.point('monitor_qmp_respond');

export type ListenAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number } | { kind: 'stdio' };

/** The two directions of one client's connection: a socket, or standard input and output. */
interface Transport {
  readonly input: Readable;
  readonly output: Writable;
  /** The client's input has ended and every request is answered. */
  inputDone(): void;
  /** Stop talking to the client. */
  close(): void;
}

export class QmpServer {
  private readonly servers: net.Server[] = [];
  private readonly sessions = new Set<QmpSession>();
  /** Open client connections per listening address (qom-get `connected` of a chardev). */
  private readonly clients = new Map<ListenAddress, number>();
  private stdioOpen = false;
  /** Connections accepted while start-up holds them (see holdConnections): not read, not greeted yet. */
  private held: net.Socket[] | undefined;
  readonly commands = new Map<string, CommandDef>();

  constructor(
    readonly core: Core,
    commands: CommandDef[],
  ) {
    for (const c of commands) this.commands.set(c.name, c);
    core.events.on((name, data, timestamp) => {
      for (const s of this.sessions) s.sendEvent(name, data, timestamp);
    });
  }

  async listen(addr: ListenAddress): Promise<void> {
    if (addr.kind === 'stdio') {
      this.stdioOpen = true;
      // Standard output stays open when standard input ends: events and late replies still go out.
      this.openSession({ input: process.stdin, output: process.stdout, inputDone: () => undefined, close: () => process.stdin.destroy() });
      return;
    }
    // allowHalfOpen: a client's end of input must not end our output before its replies are sent.
    const server = net.createServer({ allowHalfOpen: true }, (sock) => {
      this.clients.set(addr, (this.clients.get(addr) ?? 0) + 1);
      sock.once('close', () => this.clients.set(addr, (this.clients.get(addr) ?? 1) - 1));
      this.accept(sock);
    });
    server.on('error', () => undefined);
    if (addr.kind === 'unix') {
      // A stale socket file from a previous run would make listen fail with EADDRINUSE.
      await fsp.unlink(addr.path).catch(() => undefined);
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if (addr.kind === 'unix') server.listen(addr.path, () => resolve());
      else server.listen(addr.port, addr.host, () => resolve());
    });
    this.servers.push(server);
  }

  /**
   * Greet no socket client until releaseConnections(). qemu-storage-daemon writes its pidfile after its
   * sockets exist and before it accepts a connection (an order its documentation promises), so a client
   * that has been greeted can rely on the pidfile; Node accepts as soon as a socket listens, so the
   * daemon holds the connections instead.
   */
  /** A client is connected on `addr` (a listening address given to listen(); stdio: always). */
  connected(addr: ListenAddress): boolean {
    return addr.kind === 'stdio' ? this.stdioOpen : (this.clients.get(addr) ?? 0) > 0;
  }

  holdConnections(): void {
    this.held ??= [];
  }

  releaseConnections(): void {
    const held = this.held ?? [];
    this.held = undefined;
    for (const sock of held) {
      if (sock.destroyed) continue;
      this.accept(sock);
      // accept() paused it; a listener does not restart an explicitly paused stream, and the session
      // resumes its input only after a pump that input would start: what the client sent while held
      // (and all it sends later) would never be read, and its requests never answered.
      sock.resume();
    }
  }

  private accept(sock: net.Socket): void {
    if (this.held) {
      sock.pause();
      this.held.push(sock);
      return;
    }
    sock.setNoDelay(true);
    const session = this.openSession({ input: sock, output: sock, inputDone: () => sock.end(), close: () => sock.destroy() });
    sock.on('close', () => this.sessions.delete(session));
  }

  private openSession(transport: Transport): QmpSession {
    const session = new QmpSession(this, transport);
    this.sessions.add(session);
    return session;
  }

  async close(): Promise<void> {
    for (const s of this.sessions) s.destroy();
    for (const sock of this.held ?? []) sock.destroy();
    this.held = undefined;
    await Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    for (const s of this.servers) {
      const a = s.address();
      if (typeof a === 'string') await fsp.unlink(a).catch(() => undefined);
    }
  }
}

type Reply = Record<string, unknown>;

/**
 * Units of work (one request executed, or one step of input parsed) a session does before it yields a
 * turn of the event loop to other clients and to I/O, and the time after which it yields sooner (a
 * few slow requests, like query-qmp-schema, take as long as many cheap ones).
 */
export const TURN_BUDGET = 32;
const TURN_MS = 5;
/** Bytes of input parsed per step: a step can yield at most this many messages. */
const PARSE_STEP = 4096;
/** Unparsed input past which the client's socket is not read (the kernel buffer then pushes back). */
const INPUT_HIGH = 256 << 10;
/** Unsent output past which no further request of the client runs until it has read some. */
const OUTPUT_HIGH = 1 << 20;

class QmpSession {
  private negotiated = false;
  private oob = false;
  private readonly parser: JsonStreamParser;
  private alive = true;
  private readonly decoder = new Utf8StreamDecoder();
  /** Received bytes not yet parsed, oldest first; `inputOffset` is how far the first one is parsed. */
  private readonly input: Buffer[] = [];
  private inputOffset = 0;
  private inputBytes = 0;
  /** The client shut down its write side: after the last reply, we close ours. */
  private inputEnded = false;
  /** Parsed requests waiting for their turn (at most one parse step's worth). */
  private readonly requests: JsonMessage[] = [];
  private pumping = false;
  private readonly oobRunning = new Set<Promise<void>>();

  constructor(
    private readonly server: QmpServer,
    private readonly transport: Transport,
  ) {
    this.parser = new JsonStreamParser((m) => this.requests.push(m), undefined, true);
    const { input, output } = transport;
    input.on('data', (chunk: Buffer) => {
      this.input.push(chunk);
      this.inputBytes += chunk.length;
      if (this.inputBytes > INPUT_HIGH) input.pause();
      void this.pump();
    });
    input.on('end', () => {
      this.inputEnded = true;
      void this.pump();
    });
    // Output backlog went away: run the requests that waited for it.
    output.on('drain', () => void this.pump());
    input.on('error', () => this.destroy());
    output.on('error', () => this.destroy());
    // The session ends with its output (a socket's close).
    output.on('close', () => (this.alive = false));
    this.send({ QMP: { version: QEMU_COMPAT_VERSION, capabilities: ['oob'] } });
  }

  destroy(): void {
    this.alive = false;
    this.transport.close();
  }

  sendEvent(name: string, data: Record<string, unknown> | undefined, timestamp: { seconds: number; microseconds: number }): void {
    if (!this.negotiated) return;
    const ev: Reply = { event: name };
    if (data !== undefined) ev.data = data;
    ev.timestamp = timestamp;
    this.send(ev);
  }

  private send(msg: Reply): void {
    const { output } = this.transport;
    if (!this.alive || output.destroyed) return;
    const text = encodeQmp(msg);
    traceRespond({ msg: text.length > 200 ? text.slice(0, 200) : text });
    output.write(text + '\r\n');
  }

  /**
   * Parse and execute the client's input, in order, in bounded steps (see TURN_BUDGET). Only one pump
   * runs per session; input that arrives meanwhile is picked up by the running one.
   */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      let budget = TURN_BUDGET;
      let turnStart = performance.now();
      while (this.alive) {
        // The client is not reading its replies: wait for 'drain' (which pumps again).
        if (this.transport.output.writableLength > OUTPUT_HIGH) return;
        const request = this.requests.shift();
        if (request) await this.handle(request);
        else if (this.inputBytes > 0) this.parseStep();
        // A character cut off by the end of input is a stray byte (QEMU's lexer refuses it at once).
        else if (this.inputEnded && this.decoder.pendingBytes > 0) this.parser.feed(this.decoder.end());
        else break;
        if (--budget === 0 || performance.now() - turnStart > TURN_MS) {
          await new Promise((resolve) => setImmediate(resolve));
          budget = TURN_BUDGET;
          turnStart = performance.now();
        }
      }
      if (!this.alive) return;
      if (this.inputEnded) {
        // Every request is answered (a scalar cut off by the end of input is not a request, as in QEMU).
        await Promise.all(this.oobRunning);
        this.transport.inputDone();
      } else if (this.transport.input.isPaused()) this.transport.input.resume();
    } finally {
      this.pumping = false;
    }
  }

  /** Feed the parser the next PARSE_STEP bytes of input. */
  private parseStep(): void {
    const first = this.input[0];
    const end = Math.min(first.length, this.inputOffset + PARSE_STEP);
    const bytes = first.subarray(this.inputOffset, end);
    this.inputBytes -= bytes.length;
    if (end === first.length) {
      this.input.shift();
      this.inputOffset = 0;
    } else this.inputOffset = end;
    this.parser.feed(this.decoder.decode(bytes));
  }

  private async handle(m: JsonMessage): Promise<void> {
    if (!m.ok) {
      // Parse errors are answered in order with the rest, without an id (it could not be read).
      this.send({ error: { class: 'GenericError', desc: m.limit ? m.error : `JSON parse error, ${m.error}` } });
      return;
    }
    const req = m.value;
    const id = isObject(req) ? req.id : undefined;
    const run = async () => {
      const reply = await this.dispatch(req);
      if (id !== undefined) reply.id = id;
      this.send(reply);
    };
    // exec-oob overtakes queued in-band commands, as in QEMU.
    if (isObject(req) && 'exec-oob' in req && this.oob) {
      const running = run().finally(() => this.oobRunning.delete(running));
      this.oobRunning.add(running);
    } else await run();
  }

  private async dispatch(req: unknown): Promise<Reply> {
    try {
      return { return: (await this.execute(req)) ?? {} };
    } catch (err) {
      if (err instanceof QmpError) return { error: { class: err.errorClass, desc: err.message } };
      return { error: { class: 'GenericError', desc: errorMessage(err) } };
    }
  }

  private async execute(req: unknown): Promise<unknown> {
    if (!isObject(req)) throw new QmpError('GenericError', 'QMP input must be a JSON object');
    let name: string | undefined;
    let oob = false;
    for (const [k, v] of Object.entries(req)) {
      if (k === 'execute' || (k === 'exec-oob' && this.oob)) {
        if (typeof v !== 'string') throw new QmpError('GenericError', `QMP input member '${k}' must be a string`);
        name = v;
        oob = k === 'exec-oob';
      } else if (k === 'arguments') {
        if (!isObject(v)) throw new QmpError('GenericError', "QMP input member 'arguments' must be an object");
      } else if (k !== 'id') {
        throw new QmpError('GenericError', `QMP input member '${k}' is unexpected`);
      }
    }
    if (name === undefined) throw new QmpError('GenericError', "QMP input lacks member 'execute'");
    const args = (req.arguments ?? {}) as Record<string, unknown>;

    if (!this.negotiated) {
      if (name !== 'qmp_capabilities') throw new QmpError('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
      return this.capabilities(args);
    }
    if (name === 'qmp_capabilities') {
      // QEMU checks the arguments before it finds negotiation already done.
      capabilitiesEnabled(args);
      throw new QmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    }
    const cmd = this.server.commands.get(name);
    if (!cmd) throw new QmpError('CommandNotFound', `The command ${name} has not been found`);
    if (oob && !cmd.allowOob) throw new QmpError('GenericError', `The command ${name} does not support OOB`);
    const checked = cmd.boxed ? args : (visit({ kind: 'object', name: cmd.name, members: cmd.args }, args, '') as Record<string, unknown>);
    traceDispatch({ id: encodeQmp(req.id ?? null), cmd: name });
    return cmd.handler(checked, this.server.core);
  }

  private capabilities(args: Record<string, unknown>): unknown {
    if (capabilitiesEnabled(args).includes('oob')) this.oob = true;
    this.negotiated = true;
    return {};
  }
}

/** qmp_capabilities' arguments, checked with QEMU's messages: the capabilities to enable. */
function capabilitiesEnabled(args: Record<string, unknown>): string[] {
  for (const k of Object.keys(args)) if (k !== 'enable') throw new QmpError('GenericError', `Parameter '${k}' is unexpected`);
  const enable = args.enable;
  if (enable === undefined) return [];
  if (!Array.isArray(enable)) throw new QmpError('GenericError', "Invalid parameter type for 'enable', expected: array");
  for (const [i, cap] of enable.entries()) {
    if (typeof cap !== 'string') throw new QmpError('GenericError', `Invalid parameter type for 'enable[${i}]', expected: string`);
    // QEMU 7.2 names list elements 'null' in this message (and by their index in the one above).
    if (cap !== 'oob') throw new QmpError('GenericError', `Parameter 'null' does not accept value '${cap}'`);
  }
  return enable as string[];
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
