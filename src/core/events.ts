/**
 * Events the core emits for QMP clients (JOB_STATUS_CHANGE, BLOCK_JOB_READY, …). The core calls
 * emit(); the QMP server adds the timestamp and sends the event to every client past negotiation.
 */
export type EventListener = (name: string, data: Record<string, unknown> | undefined, timestamp: { seconds: number; microseconds: number }) => void;

export class EventBus {
  private readonly listeners = new Set<EventListener>();

  on(l: EventListener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  emit(name: string, data?: Record<string, unknown>): void {
    const now = Date.now() * 1000 + Number(process.hrtime.bigint() % 1000n);
    const timestamp = { seconds: Math.floor(now / 1e6), microseconds: now % 1e6 };
    for (const l of this.listeners) l(name, data, timestamp);
  }
}
