#!/usr/bin/env bash
# Builds the base image the qemu provider boots: Debian bookworm with systemd, cloud-init and
# a kernel, made from Debian's packages without mounting anything.
#
#   deploy/qemu/build-image.sh [--agent PATH] [--out DIR] [--mirror URL] [--with-biopype]
#
# Writes DIR/base.qcow2 (ext4 root filesystem on /dev/vda, no partition table), DIR/vmlinuz
# and DIR/initrd.img for direct kernel boot (-kernel/-initrd), and DIR/image.json describing
# them. With --agent, the agent binary is preinstalled as /usr/local/bin/pype-agent;
# without it, instances download the agent at boot (provider config `agent_url` +
# `agent_sha256`). With --with-biopype, bio-pype 2.0.99rc9 and this repo's python/ package
# (pype_rs) are baked in under /opt/pype/site-packages, with /usr/local/bin/pype running them
# on the image's python3, so bio-pype jobs find `pype` on the worker (installed with pip from
# this host's Debian python3, whose version the image shares, and this host's pip config).
# Needs root (debootstrap, chroot), debootstrap, e2fsprogs and qemu-img.
# About 3 minutes on a 2-core machine; DIR defaults to /var/cache/pype/images/bookworm.
set -euo pipefail
out=/var/cache/pype/images/bookworm
agent=""
mirror=""
biopype=""
while [ $# -gt 0 ]; do
  case "$1" in
    --agent) agent=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --with-biopype) biopype=2.0.99rc9; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
# The machine's own Debian mirror unless --mirror names one.
[ -n "$mirror" ] || mirror=$("$(dirname "$0")/../apt-mirror.sh")
for tool in debootstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is missing (ci-setup installs it)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build-image: must run as root (debootstrap, chroot)" >&2; exit 1; }

mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

# python3-cffi-backend: cloud-init's dependencies need it and debootstrap does not resolve it.
debootstrap --variant=minbase \
  --include=systemd-sysv,udev,dbus,cloud-init,python3-cffi-backend,linux-image-amd64,curl,ca-certificates,iproute2,kmod,procps \
  bookworm "$root" "$mirror"

echo pype-vm > "$root/etc/hostname"
echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" > "$root/etc/fstab"
# Networking: DHCP on whatever NIC qemu gives (user networking answers DHCP).
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/80-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
NET
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
chroot "$root" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
# Only NoCloud (the seed ISO) is tried; no waiting on metadata services that are not there.
cat > "$root/etc/cloud/cloud.cfg.d/90-pype.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
CFG
if [ -n "$agent" ]; then
  install -m 0755 "$agent" "$root/usr/local/bin/pype-agent"
fi
if [ -n "$biopype" ]; then
  host_py=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  img_py=$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$host_py" = "$img_py" ] || { echo "build-image: host python $host_py, image python $img_py: build on a bookworm host" >&2; exit 1; }
  /usr/bin/python3 -m venv "$work/pip"
  "$work/pip/bin/pip" install -q --disable-pip-version-check --pre --target "$root/opt/pype/site-packages" \
    "bio-pype==$biopype" "$(cd "$(dirname "$0")/../.." && pwd)/python"
  cat > "$root/usr/local/bin/pype" <<'PYPE'
#!/bin/sh
# bio-pype baked into the image by build-image.sh --with-biopype.
PYTHONPATH=/opt/pype/site-packages${PYTHONPATH:+:$PYTHONPATH} exec python3 -m pype.commands "$@"
PYPE
  chmod 0755 "$root/usr/local/bin/pype"
  chroot "$root" /usr/local/bin/pype --help >/dev/null
fi
cp -L "$root/vmlinuz" "$work/vmlinuz"
cp -L "$root/initrd.img" "$work/initrd.img"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
mkfs.ext4 -q -F -L pype-root -d "$root" "$work/root.raw" 3G
qemu-img convert -O qcow2 "$work/root.raw" "$work/base.qcow2"
agent_field=null
[ -n "$agent" ] && agent_field="\"/usr/local/bin/pype-agent\""
biopype_field=null
[ -n "$biopype" ] && biopype_field="\"$biopype\""
cat > "$work/image.json" <<JSON
{"format": 1, "release": "bookworm", "root": "/dev/vda", "agent": $agent_field, "biopype": $biopype_field,
 "kernel": "vmlinuz", "initrd": "initrd.img", "disk": "base.qcow2",
 "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
mv -f "$work/base.qcow2" "$work/vmlinuz" "$work/initrd.img" "$work/image.json" "$out/"
echo "build-image: $out/base.qcow2 ($(du -h "$out/base.qcow2" | cut -f1)), kernel and initrd beside it"
