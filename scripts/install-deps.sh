#!/usr/bin/env bash
# Installs the peer tools bitmirror is checked against (Debian packages): qemu-img/qemu-io/qemu-nbd
# (qemu-utils), qemu-storage-daemon (qemu-system-common), nbdinfo/nbdcopy (libnbd-bin), nbdkit, python3-libnbd, tmux, and the
# toolchain node-gyp needs for the native addon. Needs root (or sudo) and Debian's package lists.
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
