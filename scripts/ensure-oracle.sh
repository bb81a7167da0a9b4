#!/usr/bin/env bash
# Make sure qemu-storage-daemon (the oracle of the conformance tests) and qemu-img
# are installed. As root we install the Debian packages; otherwise we say what to
# install and fail: conformance tests never skip for a missing oracle.
set -euo pipefail
need=()
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu-system-common)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} (the conformance oracle)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${need[@]}" >/dev/null
  exit 0
fi
echo "qmpjobd tests need qemu-storage-daemon and qemu-img: install the Debian packages: ${need[*]}" >&2
exit 1
