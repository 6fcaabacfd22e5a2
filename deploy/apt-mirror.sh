#!/usr/bin/env bash
# Prints the Debian archive this machine's apt is configured with (the first `URIs:` of a
# deb822 source, or the URL of a one-line `deb` source, that is not a security archive), so
# scripts use the machine's own mirror and name none. Exits 1 when there is none.
set -eu
found=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && [ -z "$found" ] || continue
  found=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] && [ -z "$found" ] || continue
  found=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($i !~ /security/) { print $i; exit } break } }' "$f")
done
[ -n "$found" ] || { echo "apt-mirror: no Debian archive in this machine's apt sources" >&2; exit 1; }
echo "$found"
