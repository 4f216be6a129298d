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

coproc DAEMON { exec "$@" --chardev stdio,id=mon0 --monitor chardev=mon0 \
    --object throttle-group,id=tg0,limits.bps-total=8388608; }
daemon_pid=$DAEMON_PID

mask() {
    sed -e 's/"timestamp": {"seconds": [0-9]*, "microseconds": [0-9]*}/"timestamp": T/' \
        -e 's/^{"QMP": {"version": .*, "capabilities"/{"QMP": {"version": V, "capabilities"/'
}

send() {
    echo "$1" >&"${DAEMON[1]}"
}

# Print what the daemon says until a line containing $1.
expect() {
    local line
    while IFS= read -r line <&"${DAEMON[0]}"; do
        line=${line%$'\r'}
        printf '%s\n' "$line" | mask
        [[ $line == *"$1"* ]] && return 0
    done
    echo "daemon ended before: $1"
    return 1
}

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
send '{"execute": "quit"}'
expect '"return"'
status=0
wait "$daemon_pid" || status=$?
echo "daemon exit status $status"
qemu-img compare "$dir/src.qcow2" "$dir/dst.qcow2"
qemu-img check -q "$dir/dst.qcow2" && echo "dst.qcow2 checks clean"
