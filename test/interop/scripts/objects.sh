#!/bin/bash
# A script written for qemu-storage-daemon: usage: objects.sh DIR DAEMON [ARGS…]
# Throttle groups (object-add, object-del, --object) and throttle nodes, with the daemon's refusals;
# commands piped into the monitor on standard input, every reply printed as the daemon writes it.
set -euo pipefail
dir=$1
shift
qemu-img create -q -f raw "$dir/disk.raw" 1M
{
cat <<'QMP'
{"execute": "qmp_capabilities"}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg0", "limits": {"bps-total": 1048576}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg0", "limits": {"bps-total": 1048576}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg1", "limits": {"bps-total": -1}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg2", "limits": {"bps-total": 100, "bps-read": 10}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg3", "x-bps-total": 2048}}
{"execute": "object-add", "arguments": {"qom-type": "nope", "id": "tg4"}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "1bad"}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg5", "limits": {"bps-total-max": 100}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg6", "limits": {"iops-total": 100, "bps-total": 10, "iops-size": 4096, "bps-total-max": 20, "bps-total-max-length": 5}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg7", "limits": {"bogus": 1}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg8", "limits": {"iops-read": 10, "iops-read-max": 5}}}
{"execute": "object-add", "arguments": {"qom-type": "throttle-group", "id": "tg9", "limits": {"iops-write": 10, "iops-write-max-length": 3}}}
{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 1048576}}
{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "t0", "throttle-group": "tgX", "file": "n0"}}
{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "t0", "file": "n0"}}
{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "t0", "throttle-group": "tg0", "file": "n0"}}
{"execute": "object-del", "arguments": {"id": "tg0"}}
{"execute": "object-del", "arguments": {"id": "tgZ"}}
{"execute": "query-named-block-nodes", "arguments": {"flat": true}}
{"execute": "blockdev-del", "arguments": {"node-name": "t0"}}
{"execute": "object-del", "arguments": {"id": "tg0"}}
{"execute": "object-del", "arguments": {"id": "tg0"}}
{"execute": "object-del", "arguments": {"id": "tgcli"}}
QMP
echo '{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "t1", "throttle-group": "tg3", "file": {"driver": "raw", "file": {"driver": "file", "filename": "'"$dir"'/disk.raw"}}}}'
echo '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}'
echo '{"execute": "quit"}'
} | "$@" --chardev stdio,id=mon0 --monitor mon0 --object throttle-group,id=tgcli,x-iops-total=1000 \
    | sed -e 's/^{"QMP": {"version": .*, "capabilities"/{"QMP": {"version": V, "capabilities"/' \
          -e 's/"actual-size": [0-9]*/"actual-size": N/g' -e 's/#block[0-9]*/#block/g'
