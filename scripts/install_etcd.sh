#!/usr/bin/env bash
# The one system package the tests need that pip cannot give: etcd (Debian's etcd-server, 3.4), which the
# cluster tests start as a real 3-member cluster on loopback ports with their own data dirs. Installed with
# apt when `etcd` is missing (as root, or through sudo); does nothing when it is there.
set -euo pipefail
command -v etcd >/dev/null && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_etcd: etcd is missing and this is not a Debian-like system: install etcd 3.4+ (the cluster" \
       "tests run /usr/bin/etcd or the etcd on PATH)" >&2
  exit 1
fi
sudo=(); [[ $(id -u) == 0 ]] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server
# The package may start its own etcd on 2379/2380; nothing should listen that nobody asked for.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  "${sudo[@]}" systemctl disable --now etcd || true
elif command -v service >/dev/null && service etcd status >/dev/null 2>&1; then
  "${sudo[@]}" service etcd stop || true
fi
