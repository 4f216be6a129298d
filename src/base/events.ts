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
    // Wall-clock microseconds (QEMU's g_get_real_time), from a monotonic source so that events never
    // go back in time (Date.now() plus hrtime's nanoseconds mod 1000 could, within one millisecond).
    const now = Math.floor((performance.timeOrigin + performance.now()) * 1000);
    const timestamp = { seconds: Math.floor(now / 1e6), microseconds: now % 1e6 };
    for (const l of this.listeners) l(name, data, timestamp);
  }
}
