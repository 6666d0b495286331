#!/usr/bin/env bash
# The README's test command: sets up a fresh Debian machine (root) and runs the whole suite.
# Real FUSE mounts, umoci, docker-registry and friends are started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: no tests were collected" >&2
  exit 1
fi
exit "$rc"
