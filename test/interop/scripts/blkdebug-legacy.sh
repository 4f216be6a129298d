#!/bin/bash
# A script written for qemu-storage-daemon: usage: blkdebug-legacy.sh DIR DAEMON [ARGS…]
# Legacy blkdebug:CONFIG:IMAGE filenames with config files: as the backing file named in a qcow2
# header (a read error injected into the backing file fails a mirror) and as a drive-mirror
# mode=existing target (a write error injected into the target fails the mirror). The read error
# happens once: a second mirror copies the data through the blkdebug node, checked by qemu-img.
set -euo pipefail
dir=$1
shift
qemu-img create -q -f raw "$dir/base.raw" 4M
qemu-io -f raw -c 'write -P 0x11 0 4M' "$dir/base.raw" >/dev/null
cat >"$dir/read.conf" <<'CONF'
# the first read of the backing file at 1 MiB fails
[inject-error]
event = "read_aio"
errno = "5"
sector = "2048"
once = "on"
CONF
cat >"$dir/write.conf" <<'CONF'
[set-state]
event = "write_aio"
state = "1"
new_state = "2"

[inject-error]
event = "write_aio"
state = "2"
errno = "28"
CONF
qemu-img create -q -f qcow2 -u -b "blkdebug:$dir/read.conf:$dir/base.raw" -F raw "$dir/top.qcow2" 4M
qemu-img create -q -f qcow2 "$dir/dst.qcow2" 4M
qemu-img create -q -f raw "$dir/dst.raw" 4M
source "$(dirname "$0")/qmp-stdio.sh"
start_daemon "$@"
expect '"QMP"'
send '{"execute": "qmp_capabilities"}'
expect '"return"'
send '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": "'"$dir"'/top.qcow2"}}}'
expect '"return"'
send '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "dst", "file": {"driver": "file", "filename": "'"$dir"'/dst.qcow2"}}}'
expect '"return"'
send '{"execute": "blockdev-mirror", "arguments": {"job-id": "j1", "device": "top", "target": "dst", "sync": "full"}}'
expect '"status": "null"'
send '{"execute": "drive-mirror", "arguments": {"job-id": "j2", "device": "top", "target": "blkdebug:'"$dir"'/write.conf:'"$dir"'/dst.raw", "format": "raw", "mode": "existing", "sync": "full"}}'
expect '"status": "null"'
send '{"execute": "drive-mirror", "arguments": {"job-id": "j3", "device": "top", "target": "blkdebug:'"$dir"'/missing.conf:'"$dir"'/dst.raw", "format": "raw", "mode": "existing", "sync": "full"}}'
expect '"error"'
send '{"execute": "blockdev-mirror", "arguments": {"job-id": "j4", "device": "top", "target": "dst", "sync": "full"}}'
expect 'BLOCK_JOB_READY'
send '{"execute": "block-job-cancel", "arguments": {"device": "j4"}}'
expect '"status": "null"'
quit_daemon
qemu-img compare -f raw -F qcow2 "$dir/base.raw" "$dir/dst.qcow2"
