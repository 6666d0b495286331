#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine (run as root): apt packages, a venv, pip packages.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv umoci busybox-static skopeo docker-registry zstd
          golang-go golang-github-containerd-containerd-dev
          containerd runc stargz-snapshotter curl patch
          systemd)   # systemd: systemd-analyze verify checks misc/systemd units in the tests
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
  # compat: the repository's root on sys.path through a plain .pth line. The default
  # editable finder is a module imported at every interpreter start (with pathlib and its
  # imports): ~20 ms warm, ~35 ms with a cold page cache, of every `nydusd mount`.
  .venv/bin/pip install -q --config-settings editable_mode=compat -e '.[test]'
  touch "$stamp"
fi
# pyfuse3 built from its PyPI sdist with a small patch (scripts/pyfuse3-nydus.patch; why:
# docs/architecture.md, "pyfuse3 patch"): read()/readdir() get the inode when the kernel sends
# no OPEN/OPENDIR (no_open), which saves two round trips per opened file, and INIT asks for
# FUSE_CAP_CACHE_SYMLINKS, so path walks through symlinks stop costing a READLINK each, and
# its version is looked up when asked for (importlib.metadata cost ~25 ms of every start).
# Cython, setuptools and setuptools_scm come from PyPI (build isolation), libfuse3-dev/gcc/
# pkg-config from APT_PKGS. A venv with an older patch (NYDUS_PATCH below 3) is rebuilt.
PYFUSE3_VERSION=$(.venv/bin/python -c "from importlib.metadata import version; print(version('pyfuse3'))" | cut -d+ -f1)
if ! .venv/bin/python -c "import pyfuse3, sys; sys.exit(0 if getattr(pyfuse3, 'NYDUS_PATCH', 0) >= 3 else 1)"; then
  echo "setup: building pyfuse3 $PYFUSE3_VERSION with scripts/pyfuse3-nydus.patch" >&2
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  .venv/bin/pip download -q --no-binary pyfuse3 --no-deps "pyfuse3==$PYFUSE3_VERSION" -d "$src"
  tar -xzf "$src/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$src"
  patch -s -p1 -d "$src/pyfuse3-$PYFUSE3_VERSION" < scripts/pyfuse3-nydus.patch
  SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3_VERSION+nydus.3" \
    .venv/bin/pip install -q --no-deps --force-reinstall "$src/pyfuse3-$PYFUSE3_VERSION"
fi
# An editable install gets no .pyc files from pip, and with PYTHONDONTWRITEBYTECODE set every
# `nydusd mount` would compile nydus_py from source again: ~0.1 s of each mount's start-up
# (and every `nydusify convert` converter/, ~0.2 s).
.venv/bin/python -m compileall -q -j 0 nydus_py converter >/dev/null
