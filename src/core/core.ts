/**
 * Core: the state one daemon holds — the block graph, events, and (as they land) the job registry,
 * the bitmap manager and the NBD server. Commands receive it; the daemon builds it. It holds no
 * protocol code: no JSON, no sockets.
 */
import { BlockGraph } from '../block/graph.js';
import { EventBus } from './events.js';
import { tracer } from '../trace/trace.js';

export class Core {
  readonly graph = new BlockGraph();
  readonly events = new EventBus();
  readonly trace = tracer;
  /** Called to stop the daemon (QMP quit). Set by the daemon. */
  requestShutdown: () => void = () => undefined;
  /** Actions to run at shutdown before nodes are closed (cancel jobs, stop exports), in registration order. */
  readonly shutdownHooks: Array<() => Promise<void>> = [];

  async shutdown(): Promise<void> {
    for (const hook of this.shutdownHooks) await hook().catch(() => undefined);
    await this.graph.closeAll();
  }
}
