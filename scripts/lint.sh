#!/usr/bin/env bash
# The lint/type step (run by scripts/test.sh before pytest): ruff, then mypy, as configured in
# pyproject.toml. Exits non-zero with one line saying which check failed and how to rerun it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
for tool in ruff mypy; do
  if [ ! -x "$PY/$tool" ]; then
    echo "lint: $PY/$tool is missing; run scripts/setup.sh (it installs the [test] extra)"
    exit 2
  fi
done
rc=0
if ! "$PY/ruff" check --quiet --output-format concise nydus_py converter tests perf; then
  echo "lint: FAILED: ruff found the problems above (rerun: .venv/bin/ruff check; many fix with --fix)"
  rc=1
fi
# mypy keeps its cache in .mypy_cache: a warm run takes a few seconds
if ! "$PY/mypy" --no-error-summary --hide-error-context; then
  echo "lint: FAILED: mypy found the type errors above (rerun: .venv/bin/mypy)"
  rc=1
fi
[ "$rc" -eq 0 ] && echo "lint: ruff and mypy clean"
exit "$rc"
