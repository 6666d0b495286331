#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine (run as root): apt packages, a venv, pip packages.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv umoci busybox-static skopeo docker-registry zstd
          containerd runc stargz-snapshotter curl)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "setup: installing apt packages: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# An editable install gets no .pyc files from pip, and with PYTHONDONTWRITEBYTECODE set every
# `nydusd mount` would compile nydus_py from source again: ~0.1 s of each mount's start-up.
.venv/bin/python -m compileall -q -j 0 nydus_py >/dev/null
