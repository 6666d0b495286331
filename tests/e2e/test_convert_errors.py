"""Bad input through the real CLI: one clear line on stderr, exit 1, and no target left behind
(neither a new target dir, nor a change to an existing one, nor staging debris)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.imagegen import (
    Image,
    Layer,
    bomb_layer,
    hostile_layer,
    tamper_config,
    tamper_layer_blob,
    whiteout_image,
)

pytestmark = pytest.mark.e2e

NYDUSIFY = str(Path(sys.executable).parent / "nydusify")


def run_convert(src: str, dst: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([NYDUSIFY, "convert", "--source", src, "--target", dst, *extra],
                          capture_output=True, text=True, timeout=300)


def assert_clean_failure(r: subprocess.CompletedProcess, tmp_path: Path, *words: str) -> None:
    assert r.returncode == 1, r.stderr
    # without a terminal, layers converted before the bad one have their progress line
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("nydusify: layer ")]
    assert len(lines) == 1 and lines[0].startswith("nydusify: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


@pytest.mark.parametrize("kind,words", [
    ("dotdot", ("layer 2/2", "escape-dotdot", "escapes the image root")),
    ("hardlink_missing", ("layer 2/2", "hl")),
    ("hardlink_escape", ("layer 2/2", "hl")),
    ("bad_checksum", ("layer 2/2", "checksum")),
    ("truncated_tar", ("layer 2/2",)),
    ("truncated_gzip", ("layer 2/2",)),
    ("garbage", ("layer 2/2",)),
])
def test_hostile_layer_is_rejected_with_one_line_and_no_output(tmp_path, kind, words):
    base = Layer()
    base.file("etc/hostname", b"box\n")
    Image([base, hostile_layer(kind)]).write_oci(tmp_path / "src", "bad")
    r = run_convert(f"oci:{tmp_path}/src:bad", f"oci:{tmp_path}/dst:bad")
    assert_clean_failure(r, tmp_path, *words)


@pytest.mark.parametrize("kind", ["symlink_write", "symlink_dir_escape"])
def test_writes_through_escaping_symlinks_are_confined_to_the_root(tmp_path, kind):
    """`evil -> /tmp` then `evil/pwned`: resolved inside the image (ROOT/tmp/pwned), as umoci
    and containerd do (tests/e2e/test_differential.py compares the trees); never outside."""
    Image([hostile_layer(kind)]).write_oci(tmp_path / "src", "s")
    r = run_convert(f"oci:{tmp_path}/src:s", f"oci:{tmp_path}/dst:s")
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists("/tmp/pwned-through-symlink")
    assert not os.path.lexists("/tmp/pwned-through-relative-symlink")


def test_absolute_paths_are_sanitized_like_umoci(tmp_path):
    Image([hostile_layer("absolute")]).write_oci(tmp_path / "src", "abs")
    r = run_convert(f"oci:{tmp_path}/src:abs", f"oci:{tmp_path}/dst:abs")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compression_bomb_beyond_the_limit_is_rejected(tmp_path, compression):
    Image([bomb_layer(256 << 20, compression)]).write_oci(tmp_path / "src", "bomb")
    r = run_convert(f"oci:{tmp_path}/src:bomb", f"oci:{tmp_path}/dst:bomb", "--max-layer-size", str(64 << 20))
    assert_clean_failure(r, tmp_path, "layer 1/1")


def test_tampered_layer_blob_is_a_digest_mismatch(tmp_path):
    whiteout_image().write_oci(tmp_path / "src", "t")
    tamper_layer_blob(tmp_path / "src", "t", 1)
    r = run_convert(f"oci:{tmp_path}/src:t", f"oci:{tmp_path}/dst:t")
    assert_clean_failure(r, tmp_path, "layer 2/3", "digest")


def test_tampered_config_is_a_digest_mismatch(tmp_path):
    whiteout_image().write_oci(tmp_path / "src", "t")
    tamper_config(tmp_path / "src", "t")
    r = run_convert(f"oci:{tmp_path}/src:t", f"oci:{tmp_path}/dst:t")
    assert_clean_failure(r, tmp_path, "config", "digest")


def test_failure_leaves_an_existing_target_layout_untouched(tmp_path):
    whiteout_image().write_oci(tmp_path / "src", "good")
    assert run_convert(f"oci:{tmp_path}/src:good", f"oci:{tmp_path}/dst:good").returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file()}
    Image([hostile_layer("dotdot")]).write_oci(tmp_path / "src", "bad")
    r = run_convert(f"oci:{tmp_path}/src:bad", f"oci:{tmp_path}/dst:bad")
    assert r.returncode == 1
    after = {p: p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


@pytest.mark.parametrize("args,words", [
    (("--source", "oci:/nonexistent:x", "--target", "oci:/tmp/never"), ("/nonexistent",)),
    (("--source", "ftp:thing", "--target", "oci:/tmp/never"), ("ftp:thing",)),
    (("--source", "oci:/tmp:x", "--target", "oci:/tmp/never", "--chunk-size", "1000"), ("chunk-size",)),
    (("--source", "oci:/tmp:x", "--target", "oci:/tmp/never", "--platform", "linux"), ("--platform",)),
    (("--source", "oci:/tmp:x", "--target", "oci:/tmp/never", "--chunker", "cdc", "--cdc-min-size", "2M"),
     ("--chunker cdc", "min 0x200000", "avg 0x100000")),
    (("--source", "oci:/tmp:x", "--target", "oci:/tmp/never", "--cdc-avg-size", "64K"),
     ("need --chunker cdc",)),
    (("--source", "oci:/tmp:x", "--target", "oci:/tmp/never", "--chunker", "rabin"), ("--chunker",)),
])
def test_bad_arguments_are_one_line(tmp_path, args, words):
    r = subprocess.run([NYDUSIFY, "convert", *args], capture_output=True, text=True)
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert "error" in line
    for w in words:
        assert w in line
    assert not Path("/tmp/never").exists()


def test_progress_bar_on_a_terminal_only(tmp_path):
    whiteout_image().write_oci(tmp_path / "src", "p")
    quiet = run_convert(f"oci:{tmp_path}/src:p", f"oci:{tmp_path}/q:p")
    assert "converting layer" not in quiet.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen([NYDUSIFY, "convert", "--source", f"oci:{tmp_path}/src:p",
                             "--target", f"oci:{tmp_path}/t:p"], stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    os.close(master)
    assert b"converting layer" in out


def test_compression_level_only_for_zstd_and_in_range(tmp_path):
    whiteout_image().write_oci(tmp_path / "src", "l")
    for bad in (("--compression-level", "23"), ("--compressor", "lz4", "--compression-level", "5")):
        r = run_convert(f"oci:{tmp_path}/src:l", f"oci:{tmp_path}/dst:l", *bad)
        assert_clean_failure(r, tmp_path, "--compression-level")
    ok = run_convert(f"oci:{tmp_path}/src:l", f"oci:{tmp_path}/dst:l", "--compression-level", "19")
    assert ok.returncode == 0, ok.stderr


def _pushed_through_proxy(tmp_path: Path, registry) -> tuple[str, str]:
    """A 2-layer image in the registry whose second layer (4 MiB, incompressible) is the one to
    break; returns (repo, that layer's digest)."""
    from tests.fixtures.containerd import push_oci_layout
    base = Layer()
    base.file("etc/hostname", b"box\n")
    big = Layer()
    big.file("data/big", os.urandom(4 << 20))
    Image([base, big]).write_oci(tmp_path / "src", "v1")
    push_oci_layout(tmp_path / "src", "v1", registry.host, "bad/follow")
    from nydus_py.oci.layout import OCILayout
    layout = OCILayout(tmp_path / "src")
    manifest = layout.read_json(layout.resolve("v1"), "manifest")
    return "bad/follow", manifest["layers"][1]["digest"]


@pytest.mark.parametrize("fault,words", [
    # the first byte flipped: gunzip, reading while the layer downloads, sees it before the
    # digest check at the end of the body would (as from a local layout)
    ("corrupt", ("layer 2/2", "not gzip")),
    ("truncate", ("layer 2/2",)),                  # detected mid-layer, while converting it
])
def test_a_bad_layer_download_from_a_registry_fails_cleanly(tmp_path, registry, fault_proxy, fault, words):
    # the converter reads a registry layer while it downloads: the download's error must
    # still reach it, name the layer, and leave no output behind
    from tests.fixtures.registry import Fault
    repo, digest = _pushed_through_proxy(tmp_path, registry)
    fault_proxy.add(Fault.corrupt() if fault == "corrupt" else Fault.truncate(1 << 20),
                    method="GET", path=f"/v2/{repo}/blobs/{digest}", times=None)
    r = run_convert(f"{fault_proxy.host}/{repo}:v1", f"oci:{tmp_path}/dst:v1", "--plain-http")
    assert fault_proxy.count("GET", f"/blobs/{digest}", fault=fault) >= 1
    assert_clean_failure(r, tmp_path, *words)
