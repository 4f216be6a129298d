#!/usr/bin/env bash
# ceph-fixture.sh - bitmirror's test fixture (test/support/ceph.ts drives it): a throwaway single-node Ceph (pacific 16.2, Debian packages)
# living entirely inside one folder: 1 mon on 127.0.0.1, 1 mgr, 1 OSD
# (memstore by default), one RBD pool with size=1/min_size=1, cephx off (CEPH_FIXTURE_AUTH=cephx: on).
# No systemd, no root-owned system paths, no kernel modules.
#
# Usage:
#   ceph-fixture.sh start [DIR]   create DIR (default: mktemp under /tmp),
#                                 start the cluster, wait for the OSD to be up+in
#                                 and the pool to be usable, print CEPH_CONF=...
#   ceph-fixture.sh stop  DIR     kill the daemons this script started (PID files
#                                 in DIR/run), wait for them to exit
#   ceph-fixture.sh clean DIR     stop, then remove DIR
#   ceph-fixture.sh status DIR    ceph -s
#   ceph-fixture.sh env DIR       print "export CEPH_CONF=..." (for eval)
#
# Environment knobs (all optional):
#   CEPH_FIXTURE_STORE    memstore (default) | bluestore | filestore
#   CEPH_FIXTURE_AUTH     none (default) | cephx: every daemon and client authenticates; the
#                         keys (mon., client.admin, mgr.x, osd.0) are made before the monitor's
#                         mkfs, which imports them all, in DIR/keyring (the conf names it)
#   CEPH_FIXTURE_POOL     pool name (default: rbd)
#   CEPH_FIXTURE_PG       pg_num of the pool (default: 8)
#   CEPH_FIXTURE_MEM_MB   memstore capacity in MiB (default: 3072); for bluestore
#                         the sparse block file size (default: 10240)
#   CEPH_FIXTURE_PORT     mon msgr2 port (default: a free port in 20000-32000, below the usual ephemeral range)
#   CEPH_FIXTURE_TIMEOUT  seconds to wait for the cluster (default: 120)
#
# Needs (Debian 12; this script installs nothing):
#   ceph-mon ceph-mgr ceph-osd ceph-common; librbd-dev for bitmirror's rbd addon,
# qemu-block-extra for QEMU's rbd driver (scripts/install-deps.sh installs them).
#
# Notes:
# - memstore keeps all data in the OSD's RAM; its RSS grows by ~1-2.7x the bytes
#   written (4K writes are the worst case). Use bluestore for big data sets.
# - rbd-nbd cannot work without the nbd kernel module (/dev/nbdN); to serve an
#   image over NBD in user space use qemu-nbd / qemu-storage-daemon with
#   "rbd:POOL/IMG:conf=$CEPH_CONF" (needs qemu-block-extra).
# - Typical use:  eval "export $(ceph-fixture.sh start "$dir")"; ...; ceph-fixture.sh clean "$dir"
set -euo pipefail

APT_LINE='bash scripts/install-deps.sh (ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev qemu-block-extra)'

die() { echo "ceph-fixture: $*" >&2; exit 1; }
log() { echo "ceph-fixture: $*" >&2; }
T0=$(date +%s.%N)
tick() { [[ -z ${CEPH_FIXTURE_VERBOSE:-} ]] || awk -v a="$T0" -v b="$(date +%s.%N)" -v m="$*" 'BEGIN{printf "ceph-fixture: %6.2fs %s\n", b-a, m}' >&2; }

need_tools() {
    local missing=()
    for t in ceph ceph-mon ceph-mgr ceph-osd monmaptool rbd; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    if ((${#missing[@]})); then
        echo "ceph-fixture: missing: ${missing[*]}" >&2
        echo "ceph-fixture: install with: $APT_LINE" >&2
        exit 2
    fi
}

new_uuid() { cat /proc/sys/kernel/random/uuid 2>/dev/null || uuidgen; }

port_free() { # true when nothing listens on 127.0.0.1:$1
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() {
    local p=${CEPH_FIXTURE_PORT:-}
    if [[ -n $p ]]; then echo "$p"; return; fi
    for ((p = 20000 + RANDOM % 8000; p < 32000; p += 2)); do
        if port_free "$p" && port_free $((p + 1)); then echo "$p"; return; fi
    done
    die "no free port"
}

# ---------------------------------------------------------------- start
start_daemon() { # name, cmd... ; runs in foreground mode under setsid, records PID
    local name=$1; shift
    setsid "$@" -f </dev/null >>"$D/log/$name.stdout" 2>&1 &
    echo $! >"$D/run/$name.pid"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

check_alive() {
    local f
    for f in "$D"/run/*.pid; do
        [[ -e $f ]] || continue
        alive "$f" || { log "daemon $(basename "$f" .pid) died; last log lines:";
                        tail -n 30 "$D/log/$(basename "$f" .pid).log" "$D/log/$(basename "$f" .pid).stdout" >&2 2>/dev/null || true
                        return 1; }
    done
}

wait_for() { # timeout-seconds description command...
    local t=$1 what=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        check_alive || die "while waiting for $what"
        ((SECONDS < end)) || die "timeout waiting for $what"
        sleep 0.5
    done
}

C() { ceph -c "$D/ceph.conf" --connect-timeout 10 "$@"; }

osd_up_in() {
    local s
    s=$(C osd dump 2>/dev/null) || return 1
    grep -Eq '^osd\.0 up +in ' <<<"$s"
}

health_ok_or_warn() {
    C health 2>/dev/null | grep -Eq '^HEALTH_(OK|WARN)'
}

cmd_start() {
    need_tools
    local t0=$SECONDS
    if [[ -z ${1:-} ]]; then
        D=$(mktemp -d /tmp/ceph-fixture.XXXXXX)
    else
        D=$1; mkdir -p "$D"
    fi
    D=$(cd "$D" && pwd)
    [[ -e $D/ceph.conf ]] && die "$D already holds a cluster (use stop/clean)"
    # unix socket paths are limited to 107 bytes
    ((${#D} < 60)) || die "folder path too long for admin sockets (<60 chars): $D"
    mkdir -p "$D"/{run,log,mon/a,mgr/x,osd/0,crash}
    # a failed start stops whatever it had started (logs stay in $D/log)
    trap 'rc=$?; if ((rc)); then log "start failed; stopping daemons, logs in $D/log"; cmd_stop "$D"; fi' EXIT

    local store=${CEPH_FIXTURE_STORE:-memstore}
    local pool=${CEPH_FIXTURE_POOL:-rbd}
    local pg=${CEPH_FIXTURE_PG:-8}
    local timeout=${CEPH_FIXTURE_TIMEOUT:-120}
    local port fsid
    port=$(pick_port)
    fsid=$(new_uuid)

    local auth=${CEPH_FIXTURE_AUTH:-none} authconf
    case $auth in
    none) authconf="auth cluster required = none
auth service required = none
auth client required = none
auth supported = none" ;;
    cephx) authconf="auth cluster required = cephx
auth service required = cephx
auth client required = cephx" ;;
    *) die "unknown CEPH_FIXTURE_AUTH=$auth" ;;
    esac

    local storeconf
    case $store in
    memstore)
        storeconf="osd objectstore = memstore
memstore device bytes = $(( ${CEPH_FIXTURE_MEM_MB:-3072} * 1024 * 1024 ))" ;;
    bluestore)
        storeconf="osd objectstore = bluestore
bluestore block path = $D/osd/0/block.file
bluestore block create = true
bluestore block size = $(( ${CEPH_FIXTURE_MEM_MB:-10240} * 1024 * 1024 ))
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mkfs = false
bluestore cache size = 268435456
bdev enable discard = false" ;;
    filestore)
        storeconf="osd objectstore = filestore
osd journal = $D/osd/0/journal
osd journal size = 128" ;;
    *) die "unknown CEPH_FIXTURE_STORE=$store" ;;
    esac

    cat >"$D/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
$authconf
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
crash dir = $D/crash
exporter sock dir = $D/run
keyring = $D/keyring
mon data = $D/mon/\$id
mgr data = $D/mgr/\$id
osd data = $D/osd/\$id
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = $pg
osd pool default pgp num = $pg
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon osd down out interval = 0
# 'osd client watch timeout' stays at its default (30 s): with a shorter one a live client that
# misses its watch pings for that long (a loaded machine) is taken for dead, and the next client
# that asks for its image's exclusive lock blocklists it (its writes then fail with ESHUTDOWN).
# A test that kills a lock holder breaks the lock as an admin does (CephCluster.breakLock).
# a map change every 50 ms instead of every second: pool create/init in
# ~0.3 s instead of ~1 s per step
paxos propose interval = 0.05
mon warn on osd down out interval zero = false
mon warn on insecure global id reclaim allowed = false
mon warn on insecure global id reclaim = false
mon data avail warn = 2
mon data avail crit = 1
# only the always-on mgr modules (no dashboard/restful/iostat/nfs)
mgr initial modules =
# filestore on ext4 refuses to start with the default 2048
osd max object name len = 460
osd max object namespace len = 64

[mon]
mon cluster log file = $D/log/cluster.log
mon pg warn min per osd = 0

[osd]
osd memory target = 939524096
osd op num shards = 2
osd op num threads per shard = 1
$storeconf

[client]
log file = $D/log/client.log
admin socket =
EOF
    : >"$D/keyring"
    if [[ $auth == cephx ]]; then
        local k="$D/keyring"
        ceph-authtool --create-keyring "$k" --gen-key -n mon. --cap mon 'allow *' >/dev/null
        ceph-authtool "$k" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
        ceph-authtool "$k" --gen-key -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
        ceph-authtool "$k" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
    fi

    # monitor
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$D/monmap" >/dev/null
    ceph-mon -c "$D/ceph.conf" -i a --mkfs --monmap "$D/monmap" --keyring "$D/keyring" >"$D/log/mon.a.mkfs" 2>&1 \
        || { cat "$D/log/mon.a.mkfs" >&2; die "ceph-mon --mkfs failed"; }
    tick "mon mkfs done"
    start_daemon mon.a ceph-mon -c "$D/ceph.conf" -i a
    wait_for "$timeout" "monitor quorum" C mon stat
    tick "mon answers"

    # manager
    start_daemon mgr.x ceph-mgr -c "$D/ceph.conf" -i x

    # OSD
    local osd_uuid id
    osd_uuid=$(new_uuid)
    id=$(C osd new "$osd_uuid")
    [[ $id == 0 ]] || die "unexpected osd id '$id'"
    ceph-osd -c "$D/ceph.conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$D/log/osd.0.mkfs" 2>&1 \
        || { cat "$D/log/osd.0.mkfs" >&2; die "ceph-osd --mkfs failed"; }
    tick "osd mkfs done"
    start_daemon osd.0 ceph-osd -c "$D/ceph.conf" -i 0
    wait_for "$timeout" "osd.0 up+in" osd_up_in
    tick "osd.0 up+in"

    # pool (size/min_size 1 come from "osd pool default size/min size");
    # "rbd pool init" enables the rbd application and writes to the pool, so it
    # returns only once the PGs are active
    C osd pool create "$pool" "$pg" "$pg" replicated >/dev/null
    tick "pool created"
    timeout "$timeout" rbd -c "$D/ceph.conf" pool init "$pool" \
        || { check_alive; die "rbd pool init $pool failed/timed out"; }
    tick "rbd pool init done (PGs active)"
    wait_for "$timeout" "HEALTH_OK/WARN" health_ok_or_warn
    tick "health ok/warn"
    local sz
    sz=$(C osd pool get "$pool" size); [[ $sz == "size: 1" ]] || die "pool size is '$sz'"
    trap - EXIT
    log "cluster up in $((SECONDS - t0))s (store=$store, auth=$auth, pool=$pool, mon=127.0.0.1:$port)"
    echo "CEPH_CONF=$D/ceph.conf"
    echo "CEPH_MON_PORT=$port"
}

# ---------------------------------------------------------------- stop
kill_and_wait() { # pidfile... : TERM, wait up to 15 s, then KILL
    local f pid pids=() p left end=$((SECONDS + 15))
    for f in "$@"; do
        [[ -e $f ]] || continue
        pid=$(cat "$f")
        [[ $pid =~ ^[0-9]+$ ]] || continue
        # only signal it if it still is the daemon we started from this folder
        if kill -0 "$pid" 2>/dev/null && grep -qF -- "$D/ceph.conf" "/proc/$pid/cmdline" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$f"
    done
    while ((${#pids[@]})); do
        left=()
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
        pids=("${left[@]+"${left[@]}"}")
        ((${#pids[@]})) || break
        if ((SECONDS >= end)); then
            kill -KILL "${pids[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
}

cmd_stop() {
    D=${1:?usage: $0 stop DIR}
    [[ -d $D/run ]] || { log "nothing to stop in $D"; return 0; }
    D=$(cd "$D" && pwd)
    # OSD first (it tells the mon it is going down and waits for the answer),
    # then mgr and mon
    kill_and_wait "$D"/run/osd.*.pid
    kill_and_wait "$D"/run/mgr.*.pid "$D"/run/mon.*.pid
}

cmd_clean() {
    D=${1:?usage: $0 clean DIR}
    cmd_stop "$D"
    [[ -f $D/ceph.conf ]] || die "$D does not look like a fixture folder; not removing"
    rm -rf "$D"
}

case ${1:-} in
start) shift; cmd_start "$@" ;;
stop) shift; cmd_stop "$@" ;;
clean) shift; cmd_clean "$@" ;;
status) D=${2:?usage: $0 status DIR}; C -s ;;
env) echo "export CEPH_CONF=$(cd "${2:?usage: $0 env DIR}" && pwd)/ceph.conf" ;;
*) sed -n '2,/^set -euo/p' "$0" | grep '^#' >&2; exit 64 ;;
esac
