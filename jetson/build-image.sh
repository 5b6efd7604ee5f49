#!/bin/bash
# Build a flashable Jetson image with Kestrel on it, around NVIDIA's L4T tools.
#
#   jetson/build-image.sh --l4t ~/Linux_for_Tegra --wheelhouse dist/wheels \
#       --trust keys/signing.pub --config my-edge.toml [--board jetson-orin-nano-devkit] [--sd-image out.img]
#
# Copies jetson/overlay into the L4T rootfs, adds the offline wheelhouse (build it with
# `pip wheel --wheel-dir dist/wheels '.[edge,tflite-runtime]'` for aarch64/py3.8), the fleet's
# trusted public keys and the device config, then runs apply_binaries.sh and either prints the
# flash command (flash.sh) or makes an SD card image (l4t_create_sdcard_image.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
L4T="" WHEELS="" TRUST="" CONFIG="" BOARD="jetson-orin-nano-devkit" SDIMG="" DRY=0
die() { echo "build-image: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --l4t) L4T=$2; shift 2;;
    --wheelhouse) WHEELS=$2; shift 2;;
    --trust) TRUST=$2; shift 2;;
    --config) CONFIG=$2; shift 2;;
    --board) BOARD=$2; shift 2;;
    --sd-image) SDIMG=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n '2,12p' "$0"; exit 0;;
    *) die "unknown option $1 (see --help)";;
  esac
done
[ -n "$L4T" ] || die "--l4t DIR (NVIDIA's Linux_for_Tegra) is required"
[ -d "$L4T/rootfs" ] || die "$L4T/rootfs not found: extract the L4T sample rootfs first"
[ -n "$WHEELS" ] && [ -d "$WHEELS" ] || die "--wheelhouse DIR with kestrel and its wheels is required"
[ -n "$TRUST" ] && [ -f "$TRUST" ] || die "--trust FILE (the fleet's signing.pub) is required"
[ -n "$CONFIG" ] && [ -f "$CONFIG" ] || die "--config FILE (edge.toml for the devices) is required"
root="$L4T/rootfs"
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
run cp -a "$here/overlay/." "$root/"
run install -d "$root/opt/kestrel/wheelhouse" "$root/etc/kestrel/trust"
run cp -a "$WHEELS/." "$root/opt/kestrel/wheelhouse/"
run install -m 0644 "$TRUST" "$root/etc/kestrel/trust/"
run install -m 0640 "$CONFIG" "$root/etc/kestrel/edge.toml"
run ln -sf /etc/systemd/system/kestrel-firstboot.service "$root/etc/systemd/system/multi-user.target.wants/kestrel-firstboot.service"
(cd "$L4T" && run sudo ./apply_binaries.sh)
if [ -n "$SDIMG" ]; then
  (cd "$L4T/tools" && run sudo ./jetson-disk-image-creator.sh -o "$SDIMG" -b "$BOARD")
else
  echo "rootfs ready; flash with: (cd $L4T && sudo ./flash.sh $BOARD internal)"
fi
