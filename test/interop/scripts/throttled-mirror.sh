#!/bin/bash
# A script written for qemu-storage-daemon: usage: throttled-mirror.sh DIR DAEMON [ARGS…]
# It starts the daemon with its QMP monitor on standard input/output (--chardev stdio, --monitor) and a
# throttle group (--object), then drives over the monitor: blockdev-add (a qcow2 source, a qcow2
# target under a throttle filter), a mirror slowed down by the throttle, pause and resume, complete
# and quit. It prints what the daemon says (event timestamps and the greeting's version masked) and
# what qemu-img says about the copy.
set -euo pipefail
dir=$1
shift

qemu-img create -q -f qcow2 "$dir/src.qcow2" 16M
qemu-io -f qcow2 -c 'write -P 0x5a 0 8M' -c 'write -P 0xa5 8M 8M' "$dir/src.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$dir/dst.qcow2" 16M

source "$(dirname "$0")/qmp-stdio.sh"
start_daemon "$@" --object throttle-group,id=tg0,limits.bps-total=8388608

expect '"QMP"'
send '{"execute": "qmp_capabilities"}'
expect '"return"'
send '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "src", "file": {"driver": "file", "filename": "'"$dir"'/src.qcow2"}}}'
expect '"return"'
send '{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "dst", "throttle-group": "tg0", "file": {"driver": "qcow2", "node-name": "dst-qcow2", "file": {"driver": "file", "filename": "'"$dir"'/dst.qcow2"}}}}'
expect '"return"'
send '{"execute": "object-del", "arguments": {"id": "tg0"}}'
expect '"error"'
send '{"execute": "blockdev-mirror", "arguments": {"job-id": "job0", "device": "src", "target": "dst", "sync": "full"}}'
expect '"return"'
send '{"execute": "block-job-pause", "arguments": {"device": "job0"}}'
expect '"status": "paused"'
send '{"execute": "block-job-complete", "arguments": {"device": "job0"}}'
expect '"error"'
send '{"execute": "block-job-resume", "arguments": {"device": "job0"}}'
expect 'BLOCK_JOB_READY'
send '{"execute": "block-job-complete", "arguments": {"device": "job0"}}'
expect '"status": "null"'
quit_daemon
qemu-img compare "$dir/src.qcow2" "$dir/dst.qcow2"
qemu-img check -q "$dir/dst.qcow2" && echo "dst.qcow2 checks clean"
