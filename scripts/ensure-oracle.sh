#!/usr/bin/env bash
# Make every oracle of the tests runnable: qemu-storage-daemon and qemu-img of
# QEMU 7.2, 10.0 and 11.1, plus the NBD client tools the tests use.
#
# As root: installs the missing host packages with apt-get, then builds a minimal
# Debian root for each version the host's own package is not (see
# scripts/oracle_roots.py; cache: $QMPJOBD_ORACLE_CACHE, default
# /var/cache/qmpjobd/oracles). Not as root: says what is missing and fails.
# A complete cache makes this a no-op in well under a second.
#
#   scripts/ensure-oracle.sh            install/build what is missing
#   scripts/ensure-oracle.sh --refresh  rebuild every root (new stable releases)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
host_packages=(qemu-system-common qemu-utils debootstrap libnbd-bin python3-libnbd)

installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

need=()
if command -v dpkg-query >/dev/null 2>&1; then
  for package in "${host_packages[@]}"; do
    installed "$package" || need+=("$package")
  done
else
  echo "ensure-oracle: the oracles are Debian packages; this host has no dpkg" >&2
  exit 1
fi

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-oracle: qmpjobd's tests need these Debian packages: ${need[*]}" \
         "(run \`make oracle\` as root, or install them)" >&2
    exit 1
  fi
  echo "ensure-oracle: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${need[@]}" >/dev/null
fi

exec python3 "$here/oracle_roots.py" ensure "$@"
