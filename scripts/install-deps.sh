#!/usr/bin/env bash
# Installs the peer tools bitmirror is checked against (Debian packages): qemu-img/qemu-io/qemu-nbd
# (qemu-utils), qemu-storage-daemon (qemu-system-common), nbdinfo/nbdcopy (libnbd-bin), nbdkit, python3-libnbd, tmux, and the
# toolchain node-gyp needs for the native addon; for the rbd driver and its tests a throwaway Ceph
# (ceph-mon, ceph-mgr, ceph-osd, ceph-common: test/support/ceph-fixture.sh), librbd-dev (the rbd addon
# builds only where it is installed) and qemu-block-extra (QEMU's rbd driver, the peer). The Ceph
# packages add about 30 s to a fresh install. Needs root (or sudo) and Debian's package lists.
set -euo pipefail
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
# nbdkit (its memory plugin and log filter): a third NBD server the nbd client driver is tested against.
command -v nbdkit >/dev/null || need+=(nbdkit)
# The libnbd Python bindings (tests drive the NBD server's handshake and commands with them).
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
# tmux: a real terminal for the test of bitmirror copy's progress bar and Ctrl-C.
command -v tmux >/dev/null || need+=(tmux)
# Ceph: a single-node cluster for the rbd tests, librbd's headers for the addon, QEMU's rbd driver.
for p in ceph-mon ceph-mgr ceph-osd; do command -v "$p" >/dev/null || need+=("$p"); done
command -v rbd >/dev/null || need+=(ceph-common)
[ -f /usr/include/rbd/librbd.h ] || need+=(librbd-dev)
ls /usr/lib/*/qemu/block-rbd.so >/dev/null 2>&1 || need+=(qemu-block-extra)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
command -v python3 >/dev/null || need+=(python3)
# rsvg-convert: the bitmap map test renders the SVG picture to a PNG with it.
command -v rsvg-convert >/dev/null || need+=(librsvg2-bin)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
