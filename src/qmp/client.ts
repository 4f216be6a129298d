/**
 * A QMP client: connect to a monitor socket (ours or QEMU's), negotiate, run commands, wait for
 * events. Used by the CLI workflows (demo, copy) and by the tests.
 */
import * as net from 'node:net';
import { QmpError, type QmpErrorClass } from '../errors.js';
import { JsonStreamParser } from './json.js';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

type Pending = { resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void };

export class QmpClient {
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private greetingResolve!: (g: Record<string, unknown>) => void;
  readonly greeting = new Promise<Record<string, unknown>>((r) => (this.greetingResolve = r));
  /** Every event received, in order; waitEvent consumes from here. */
  readonly events: QmpEvent[] = [];
  private eventWaiters: Array<() => void> = [];
  private eventListeners = new Set<(ev: QmpEvent) => void>();
  private closed = false;

  private constructor(private readonly sock: net.Socket) {
    const parser = new JsonStreamParser((m) => {
      if (!m.ok) return;
      const msg = m.value as Record<string, unknown>;
      if ('QMP' in msg) this.greetingResolve(msg);
      else if ('event' in msg) {
        this.events.push(msg as unknown as QmpEvent);
        for (const l of this.eventListeners) l(msg as unknown as QmpEvent);
        const w = this.eventWaiters;
        this.eventWaiters = [];
        for (const f of w) f();
      } else {
        const p = this.pending.get(msg.id as number);
        if (p) {
          this.pending.delete(msg.id as number);
          p.resolve(msg);
        }
      }
    });
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => parser.feed(d));
    sock.on('close', () => {
      this.closed = true;
      for (const p of this.pending.values()) p.reject(new Error('QMP connection closed'));
      this.pending.clear();
      const w = this.eventWaiters;
      this.eventWaiters = [];
      for (const f of w) f();
    });
    sock.on('error', () => undefined);
  }

  /** Connect to a unix socket path or host:port, and negotiate capabilities. */
  static async connect(target: string | { host: string; port: number }, negotiate = true): Promise<QmpClient> {
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = typeof target === 'string' ? net.createConnection(target) : net.createConnection(target.port, target.host);
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    const c = new QmpClient(sock);
    await c.greeting;
    if (negotiate) await c.execute('qmp_capabilities');
    return c;
  }

  /** Send a command; resolves with the full reply object ({return} or {error}). */
  request(command: string, args?: Record<string, unknown>): Promise<Record<string, unknown>> {
    const id = this.nextId++;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return this.sendRaw(JSON.stringify(msg), id);
  }

  /** Send raw text (tests of the protocol); `id` is the id the reply will carry, if any. */
  sendRaw(text: string, id?: number): Promise<Record<string, unknown>> {
    if (this.closed) return Promise.reject(new Error('QMP connection closed'));
    const p = new Promise<Record<string, unknown>>((resolve, reject) => {
      if (id !== undefined) this.pending.set(id, { resolve, reject });
      else resolve({});
    });
    this.sock.write(text);
    return p;
  }

  /** Run a command; resolves with its `return` value or throws a QmpError with the reply's class and desc. */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    const reply = await this.request(command, args);
    if ('error' in reply) {
      const e = reply.error as { class: QmpErrorClass; desc: string };
      throw new QmpError(e.class, e.desc);
    }
    return reply.return as T;
  }

  /** HMP through QMP: the monitor's reply ("" for a qemu-io command, as QEMU answers). */
  hmp(commandLine: string): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine });
  }

  /**
   * HMP through QMP with bitmirror's `__org.bitmirror_output`: qemu-io's text (what QEMU prints on its
   * standard output) comes back as the reply. Only bitmirror has it.
   */
  hmpOutput(commandLine: string): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine, '__org.bitmirror_output': true });
  }

  /**
   * Wait for the next event (after those already consumed) matching `name` and, optionally, `match`
   * on its data; events before it are consumed too. Rejects after `timeoutMs`.
   */
  async waitEvent(name: string, match: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<QmpEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      while (this.events.length > 0) {
        const ev = this.events.shift()!;
        if (ev.event === name && Object.entries(match).every(([k, v]) => ev.data?.[k] === v)) return ev;
      }
      if (this.closed) throw new Error(`QMP connection closed while waiting for ${name}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for event ${name}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.eventWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /**
   * Call `listener` with every event from now on (beside the `events` queue, which waitEvent
   * consumes: a listener sees events whoever waits for them). Returns the function that removes it.
   */
  onEvent(listener: (ev: QmpEvent) => void): () => void {
    this.eventListeners.add(listener);
    return () => void this.eventListeners.delete(listener);
  }

  /** Whether the connection has closed (the daemon went away). */
  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    this.sock.destroy();
  }
}
