/**
 * Where bitmirror's QMP commands stand against QEMU 7.2, the release whose monitor it follows: the data
 * docs/qmp-reference.md is generated from (scripts/gen-qmp-reference.mjs, commands/reference.ts).
 *
 * QSD_7_2_COMMANDS is what qemu-storage-daemon 7.2 answers to query-qmp-schema: every command and the
 * names of its arguments (top-level members; for a union, its base). test/interop/qmp-reference.test.ts
 * checks it against the installed qemu-storage-daemon. A command or argument bitmirror has beyond it is
 * an extension when its name is QAPI's downstream `__org.bitmirror_…`; any other needs an entry in
 * COMMAND_NOTES / ARGUMENT_NOTES saying where it comes from (test/unit/qmp-reference.test.ts fails
 * without one, and on a note for something that no longer exists), so this table cannot drift.
 */

export const QSD_7_2_COMMANDS: Readonly<Record<string, readonly string[]>> = {
  'block-commit': ['job-id', 'device', 'base-node', 'base', 'top-node', 'top', 'backing-file', 'speed', 'on-error', 'filter-node-name', 'auto-finalize', 'auto-dismiss'],
  'block-dirty-bitmap-add': ['node', 'name', 'granularity', 'persistent', 'disabled'],
  'block-dirty-bitmap-clear': ['node', 'name'],
  'block-dirty-bitmap-disable': ['node', 'name'],
  'block-dirty-bitmap-enable': ['node', 'name'],
  'block-dirty-bitmap-merge': ['node', 'target', 'bitmaps'],
  'block-dirty-bitmap-remove': ['node', 'name'],
  'block-export-add': ['type', 'id', 'fixed-iothread', 'iothread', 'node-name', 'writable', 'writethrough'],
  'block-export-del': ['id', 'mode'],
  'block-job-cancel': ['device', 'force'],
  'block-job-complete': ['device'],
  'block-job-dismiss': ['id'],
  'block-job-finalize': ['id'],
  'block-job-pause': ['device'],
  'block-job-resume': ['device'],
  'block-job-set-speed': ['device', 'speed'],
  'block-set-write-threshold': ['node-name', 'write-threshold'],
  'block-stream': ['job-id', 'device', 'base', 'base-node', 'backing-file', 'bottom', 'speed', 'on-error', 'filter-node-name', 'auto-finalize', 'auto-dismiss'],
  'block_resize': ['device', 'node-name', 'size'],
  'blockdev-add': ['driver', 'node-name', 'discard', 'cache', 'read-only', 'auto-read-only', 'force-share', 'detect-zeroes'],
  'blockdev-backup': ['job-id', 'device', 'sync', 'speed', 'bitmap', 'bitmap-mode', 'compress', 'on-source-error', 'on-target-error', 'auto-finalize', 'auto-dismiss', 'filter-node-name', 'x-perf', 'target'],
  'blockdev-create': ['job-id', 'options'],
  'blockdev-del': ['node-name'],
  'blockdev-mirror': ['job-id', 'device', 'target', 'replaces', 'sync', 'speed', 'granularity', 'buf-size', 'on-source-error', 'on-target-error', 'filter-node-name', 'copy-mode', 'auto-finalize', 'auto-dismiss'],
  'blockdev-reopen': ['options'],
  'blockdev-snapshot': ['node', 'overlay'],
  'blockdev-snapshot-delete-internal-sync': ['device', 'id', 'name'],
  'blockdev-snapshot-internal-sync': ['device', 'name'],
  'blockdev-snapshot-sync': ['device', 'node-name', 'snapshot-file', 'snapshot-node-name', 'format', 'mode'],
  'change-backing-file': ['device', 'image-node-name', 'backing-file'],
  'chardev-add': ['id', 'backend'],
  'chardev-change': ['id', 'backend'],
  'chardev-remove': ['id'],
  'chardev-send-break': ['id'],
  'drive-backup': ['job-id', 'device', 'sync', 'speed', 'bitmap', 'bitmap-mode', 'compress', 'on-source-error', 'on-target-error', 'auto-finalize', 'auto-dismiss', 'filter-node-name', 'x-perf', 'target', 'format', 'mode'],
  'drive-mirror': ['job-id', 'device', 'target', 'format', 'node-name', 'replaces', 'sync', 'mode', 'speed', 'granularity', 'buf-size', 'on-source-error', 'on-target-error', 'unmap', 'copy-mode', 'auto-finalize', 'auto-dismiss'],
  'job-cancel': ['id'],
  'job-complete': ['id'],
  'job-dismiss': ['id'],
  'job-finalize': ['id'],
  'job-pause': ['id'],
  'job-resume': ['id'],
  'nbd-server-add': ['name', 'description', 'device', 'writable', 'bitmap'],
  'nbd-server-remove': ['name', 'mode'],
  'nbd-server-start': ['addr', 'tls-creds', 'tls-authz', 'max-connections'],
  'nbd-server-stop': [],
  'object-add': ['qom-type', 'id'],
  'object-del': ['id'],
  'qmp_capabilities': ['enable'],
  'qom-get': ['path', 'property'],
  'qom-list': ['path'],
  'qom-list-properties': ['typename'],
  'qom-list-types': ['implements', 'abstract'],
  'qom-set': ['path', 'property', 'value'],
  'query-block': [],
  'query-block-exports': [],
  'query-block-jobs': [],
  'query-blockstats': ['query-nodes'],
  'query-chardev': [],
  'query-chardev-backends': [],
  'query-commands': [],
  'query-jobs': [],
  'query-named-block-nodes': ['flat'],
  'query-qmp-schema': [],
  'query-version': [],
  'quit': [],
  'ringbuf-read': ['device', 'size', 'format'],
  'ringbuf-write': ['device', 'data', 'format'],
  'transaction': ['actions', 'properties'],
  'x-blockdev-amend': ['job-id', 'node-name', 'options', 'force'],
  'x-blockdev-change': ['parent', 'child', 'node'],
  'x-blockdev-set-iothread': ['node-name', 'iothread', 'force'],
  'x-debug-block-dirty-bitmap-sha256': ['node', 'name'],
  'x-debug-query-block-graph': [],
};

/** Where a command or an argument that QEMU 7.2's storage daemon lacks comes from. */
export type Origin =
  /** QEMU 7.2 has it, in the system emulator's monitor (qemu-system-*), not in qemu-storage-daemon's. */
  | 'qemu-system'
  /** Upstream QEMU added it after 7.2 (the note says when). */
  | 'upstream'
  /** bitmirror's own, or from a series upstream never merged (the note says which). */
  | 'extension';

export interface ParityNote {
  /** Required for a command/argument beyond qemu-storage-daemon 7.2 not named `__org.bitmirror_…`. */
  origin?: Origin;
  note: string;
}

export const COMMAND_NOTES: Readonly<Record<string, ParityNote>> = {
  'human-monitor-command': { origin: 'qemu-system', note: 'HMP commands `qemu-io`, `trace-event`, `block_resize` only.' },
  'trace-event-get-state': { origin: 'qemu-system', note: '`vcpu` is accepted and ignored (no vCPUs).' },
  'trace-event-set-state': { origin: 'qemu-system', note: '`vcpu` is accepted and ignored (no vCPUs).' },
  'block-job-change': { origin: 'upstream', note: 'Since QEMU 8.2: switch a mirror to `copy-mode: write-blocking`.' },
  'query-version': { note: 'Answers 7.2.0 (the behaviour followed); `package` names bitmirror\'s version.' },
  'blockdev-reopen': { note: 'A filter whose file moved reports its new length (QEMU 7.2 keeps the old one until it is resized).' },
  'blockdev-create': { note: 'Drivers `file` and `qcow2`.' },
  'blockdev-snapshot-internal-sync': { note: 'qcow2 images (directly, or below a raw node or a filter, as QEMU\'s snapshot fallback). Date and guest clock are the wall clock, as qemu-storage-daemon 7.2 writes them.' },
  'blockdev-snapshot-delete-internal-sync': { note: 'On a read-only node it fails with QEMU\'s message and keeps the snapshot listed (QEMU 7.2 drops it from its list in memory).' },
  'object-add': { note: 'Types `throttle-group` and `secret` only.' },
  'nbd-server-start': { note: '`tls-creds`/`tls-authz` are refused (no TLS objects).' },
  'qom-get': { note: 'The tree is /, /chardevs (the --chardev devices) and /objects (throttle groups, secrets). A secret\'s `data` is not readable (QEMU 7.2 returns it; bitmirror never puts a secret in a reply).' },
  'qom-list': { note: 'Children come in the order they were added (QEMU 7.2: its hash table\'s order); properties in QEMU\'s order.' },
  'qom-list-properties': { note: 'The types bitmirror has (see qom-list-types).' },
  'qom-list-types': { note: 'Only the types bitmirror has (object, interface, user-creatable, container, secret_common, secret, throttle-group, chardev, chardev-fd, chardev-socket, chardev-stdio), in QEMU 7.2\'s order; QEMU lists ~50 (machine-less qsd: iothreads, TLS credentials, authz, qio channels …) whose objects bitmirror cannot create, so a script that checks for a type gets the honest answer.' },
  'qom-set': { note: 'Throttle group `limits` (in force at once for its nodes) and secret properties (the loaded value stays, as QEMU 7.2); the x-… limits only at creation, as QEMU 7.2.' },
  'chardev-add': { note: 'Character devices are given on the command line (`--chardev`) only.' },
  'chardev-change': { note: 'Character devices are given on the command line (`--chardev`) only.' },
  'chardev-remove': { note: 'Character devices are given on the command line (`--chardev`) only.' },
  'chardev-send-break': { note: 'Character devices are given on the command line (`--chardev`) only.' },
};

/** The mirror's own arguments, the same for blockdev-mirror and drive-mirror (one job behind both). */
const MIRROR_ARGUMENT_NOTES: Readonly<Record<string, ParityNote>> = {
    '__org.bitmirror_carry-bitmaps': { note: 'Carry every bitmap of the source chain onto the target at the switch (or a soft cancel after READY).' },
    '__org.bitmirror_fill-partial-clusters': { note: 'Widen a write into an unallocated target cluster to the whole cluster (default on).' },
    '__org.bitmirror_allow-coarse-target': { note: 'Allow a bitmap finer than the target\'s clusters.' },
    '__org.bitmirror_copy-offload': { note: 'Let the kernel copy between host files (copy_file_range; default on).' },
    bitmap: { origin: 'extension', note: 'The unmerged upstream series "mirror: allow specifying working bitmap" (sync=full), and Proxmox VE\'s sync=bitmap.' },
    'bitmap-mode': { origin: 'extension', note: 'Proxmox VE\'s mirror with `sync=bitmap|incremental`.' },
};

/** The snapshot's own arguments, the same for blockdev-snapshot and blockdev-snapshot-sync. */
const SNAPSHOT_ARGUMENT_NOTES: Readonly<Record<string, ParityNote>> = {
    '__org.bitmirror_carry-bitmaps': { note: 'The node\'s recording bitmaps are created on the overlay at the switch (what libvirt does with block-dirty-bitmap-add).' },
};

/** Per command, notes on single arguments (the same rule as COMMAND_NOTES). */
export const ARGUMENT_NOTES: Readonly<Record<string, Readonly<Record<string, ParityNote>>>> = {
  'block-stream': {
    'backing-mask-protocol': { origin: 'upstream', note: 'Since QEMU 8.x: the base\'s format is recorded as "raw" when the base is a protocol node.' },
    '__org.bitmirror_carry-bitmaps': { note: 'The named bitmaps of the layers the stream removes are carried into the node when the chain is shortened.' },
  },
  'blockdev-snapshot': SNAPSHOT_ARGUMENT_NOTES,
  'blockdev-snapshot-sync': SNAPSHOT_ARGUMENT_NOTES,
  'human-monitor-command': {
    '__org.bitmirror_output': { note: 'qemu-io\'s text becomes the reply instead of being printed on the daemon\'s standard output.' },
  },
  'blockdev-backup': {
    'on-cbw-error': { origin: 'upstream', note: 'Since QEMU 10.1.' },
    'discard-source': { origin: 'upstream', note: 'Since QEMU 9.1: what the backup copied is discarded on the source (which must be writable).' },
  },
  'drive-backup': {
    'on-cbw-error': { origin: 'upstream', note: 'Since QEMU 10.1.' },
    'discard-source': { origin: 'upstream', note: 'Since QEMU 9.1: what the backup copied is discarded on the source (which must be writable).' },
  },
  'blockdev-mirror': { ...MIRROR_ARGUMENT_NOTES, 'target-is-zero': { origin: 'upstream', note: 'Since QEMU 10.1.' } },
  'block-commit': {
    'backing-mask-protocol': { origin: 'upstream', note: 'Since QEMU 9.0: record `raw` rather than a protocol driver as the backing format.' },
    '__org.bitmirror_carry-bitmaps': { note: 'Carry every dirty bitmap of the layers that leave the chain into the base, in the same step as the chain change.' },
  },
  'drive-mirror': MIRROR_ARGUMENT_NOTES,
};
