"""Bootstrap fuzzing (issue 9 section 2): mutated real bootstraps and hostile shapes, each
case either refused with one line or loaded and fully exercised (every inode, prefetch plan,
file reads through the real FileReader) with correct bytes or EIO. See bootstrap_fuzz.py.

Each family runs in a worker process under RLIMIT_AS (3 GiB), with a per-case SIGALRM
deadline and a tracemalloc peak bound, so a blow-up or a hang fails the case, named, instead
of taking the machine or the test run down.

NYDUS_BOOTSTRAP_FUZZ_SEEDS=N (default 60) cases per family; NYDUS_BOOTSTRAP_FUZZ_START=S
shifts the seed range. CI runs the default (about 40 s on a busy 2-core machine, 15 s of CPU); a longer
run by hand:
    NYDUS_BOOTSTRAP_FUZZ_SEEDS=5000 .venv/bin/python -m pytest tests/format/test_bootstrap_fuzz.py
and one case alone:  .venv/bin/python -m tests.format.bootstrap_fuzz FAMILY SEED 1 WORKDIR
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.format.bootstrap_fuzz import DEADLINE_S, FAMILIES

SEEDS = int(os.environ.get("NYDUS_BOOTSTRAP_FUZZ_SEEDS", "60"))
START = int(os.environ.get("NYDUS_BOOTSTRAP_FUZZ_START", "0"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_family(family, tmp_path):
    try:
        r = subprocess.run([sys.executable, "-m", "tests.format.bootstrap_fuzz", family, str(START),
                            str(SEEDS), str(tmp_path)], check=False, cwd=ROOT, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60 + SEEDS * DEADLINE_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{family}: worker still running after {e.timeout} s")
    lines = r.stdout.splitlines()
    assert r.returncode == 0, "\n".join(lines[-3:] + r.stderr.splitlines()[-30:])
    outcomes = [ln.split()[3] for ln in lines if ln.startswith("OK ")]
    assert len(outcomes) == SEEDS
    # both outcomes occur: the mutations are neither all fatal nor all harmless
    assert "refused" in outcomes and "ok" in outcomes, outcomes
