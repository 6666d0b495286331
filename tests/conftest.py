"""Top-level shared fixtures. Kept small: image generation lives in tests/fixtures/."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.fixtures import imagegen

# Fixtures shared by many modules, registered once here rather than imported into each test
# module (an imported fixture shadows nothing and ruff cannot tell it is used).
# (registry before containerd: containerd imports it, and a plugin must be imported by pytest first.)
pytest_plugins = ["tests.fixtures.registry", "tests.fixtures.s3", "tests.fixtures.umoci",
                  "tests.fixtures.daemon", "tests.fixtures.containerd"]


@pytest.fixture(scope="session", autouse=True)
def _private_tmpdir(tmp_path_factory):
    """Every temp file of the run — ours, and those of the daemons the tests start and kill -9
    (a killed nydusd cannot remove its private cache dir) — lands in one directory removed at
    the end: a test run leaves nothing behind in /tmp. Sticky and world-writable like /tmp,
    because some tests read their mounts as user nobody."""
    tmp_path_factory.getbasetemp()          # pytest's own dirs stay where they were (short paths)
    d = tempfile.mkdtemp(prefix="nydus-py-tests-")
    os.chmod(d, 0o1777)
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = d
    tempfile.tempdir = None                 # re-read TMPDIR
    yield d
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def feature_oci(tmp_path_factory):
    """(oci_dir, tag) of imagegen.feature_image(), written once per session. Read-only."""
    d = tmp_path_factory.mktemp("feature-oci")
    imagegen.feature_image().write_oci(d, "latest")
    return d, "latest"


@pytest.fixture(scope="session")
def feature_reference(umoci, feature_oci, tmp_path_factory):
    """umoci's unpack of the feature image: Reference(rootfs, volatile_mtimes). Read-only."""
    from tests.fixtures.umoci import umoci_reference      # a plugin module: imported by pytest first
    oci_dir, tag = feature_oci
    return umoci_reference(oci_dir, tag, tmp_path_factory.mktemp("feature-ref") / "bundle")
