#!/usr/bin/env bash
# Installs the baselines the transfer benchmark compares against: OpenSSH server (tar | ssh,
# rsync over ssh), OpenBSD netcat (tar | nc) and rsync.
set -euo pipefail
missing=()
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v nc >/dev/null || missing+=(netcat-openbsd)
command -v rsync >/dev/null || missing+=(rsync)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
echo "bench setup: ready"
