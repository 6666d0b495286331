#!/usr/bin/env bash
# Install the systemd units of nydus-py (misc/systemd/) with this install's binaries.
#
#   scripts/install-units.sh [--bin-dir DIR] [--conf-dir DIR] [--unit-dir DIR] [--no-reload]
#
# Defaults: --bin-dir = the directory of the `nydus-snapshotter` on PATH (e.g. the venv's bin),
# --conf-dir /etc/nydus-py (config.toml and nydusd-config.json: docs/containerd.md),
# --unit-dir /etc/systemd/system; then `systemctl daemon-reload` unless --no-reload (or no
# systemd is running). Enable with: systemctl enable --now nydus-snapshotter
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="" conf_dir=/etc/nydus-py unit_dir=/etc/systemd/system reload=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --conf-dir) conf_dir="$2"; shift 2 ;;
    --unit-dir) unit_dir="$2"; shift 2 ;;
    --no-reload) reload=0; shift ;;
    *) echo "install-units.sh: error: unknown option $1" >&2; exit 1 ;;
  esac
done
if [ -z "$bin_dir" ]; then
  snap="$(command -v nydus-snapshotter || true)"
  [ -n "$snap" ] || snap="$here/.venv/bin/nydus-snapshotter"
  bin_dir="$(dirname "$snap")"
fi
for b in nydus-snapshotter nydusd; do
  [ -x "$bin_dir/$b" ] || { echo "install-units.sh: error: $bin_dir/$b not found (use --bin-dir)" >&2; exit 1; }
done
mkdir -p "$unit_dir"
for u in nydus-snapshotter.service nydusd.service; do
  sed -e "s|@BINDIR@|$bin_dir|g" -e "s|@CONFDIR@|$conf_dir|g" -e "s|@DOCDIR@|$here/docs|g" "$here/misc/systemd/$u" > "$unit_dir/$u.tmp"
  chmod 0644 "$unit_dir/$u.tmp"
  mv "$unit_dir/$u.tmp" "$unit_dir/$u"
  echo "installed $unit_dir/$u"
done
if [ "$reload" = 1 ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
