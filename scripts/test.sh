#!/usr/bin/env bash
# The README's test command: sets up a fresh Debian machine (root) and runs the whole suite.
# Real FUSE mounts, umoci, docker-registry and friends are started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
set +e
# lint and types first (quick: ~10 s, a few with a warm cache); the tests run either way, so
# one CI run reports both. NYDUS_SKIP_LINT=1 skips it (e.g. while iterating on one test).
lint_rc=0
if [ -z "${NYDUS_SKIP_LINT:-}" ]; then
  bash scripts/lint.sh
  lint_rc=$?
fi
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: no tests were collected" >&2
  exit 1
fi
if [ "$lint_rc" -ne 0 ]; then
  echo "test.sh: FAILED: the lint/type step (scripts/lint.sh) failed; its errors are at the top of this output" >&2
  [ "$rc" -eq 0 ] && exit 1
fi
exit "$rc"
