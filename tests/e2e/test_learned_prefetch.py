"""Learned prefetch across hosts, against the real docker-registry: run 1 records what it reads
and pushes the list as a referrer of the image; a daemon with a fresh cache ("another host")
finds it, prefetches it, and the same reads then need no on-demand fetch. Bad lists (tampered
in transit, oversized, garbage, another image's, chunk ids out of range) cost one log line and
nothing else. Every claim is checked through the daemon's own metrics."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from nydus_py.io import learned as ll
from nydus_py.oci import mediatypes as mt
from nydus_py.oci import referrers
from nydus_py.oci.layout import Descriptor
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from tests.fixtures.cli import nydusify
from tests.fixtures.daemon import Daemon, wait_for
from tests.fixtures.containerd import push_oci_layout
from tests.fixtures.imagegen import Image, Layer
from tests.fixtures.registry import Fault, FaultProxy, Gate, RegistryServer

pytestmark = pytest.mark.e2e

SMALL = {f"app/small-{i:02d}": random.Random(i).randbytes(8 << 10) for i in range(30)}
BIG = random.Random(99).randbytes(3 << 20)          # 3 chunks of 1 MiB
READ_SMALL = [f"app/small-{i:02d}" for i in range(3, 13)]


def workload(mnt: Path) -> None:
    """What "the container" reads: 10 small files, the first and last 64 KiB of the big one."""
    for p in READ_SMALL:
        assert (mnt / p).read_bytes() == SMALL[p]
    with open(mnt / "app/big", "rb") as f:
        assert f.read(64 << 10) == BIG[:64 << 10]
        f.seek(len(BIG) - (64 << 10))
        assert f.read() == BIG[-(64 << 10):]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learned")
    layer = Layer()
    layer.dir("app")
    for p, data in SMALL.items():
        layer.file(p, data)
    layer.file("app/big", BIG)
    Image([layer]).write_oci(tmp / "src", "v1")
    with RegistryServer(tmp / "registry") as reg:
        push_oci_layout(tmp / "src", "v1", reg.host, "learn/app")
        nydusify("convert", "--plain-http", "--source", f"{reg.host}/learn/app:v1",
                  "--target", f"{reg.host}/learn/app:v1-nydus")
        yield reg, tmp


def _mount_args(host: str, cache: Path, *extra: str) -> list[str]:
    return ["--image", f"{host}/learn/app:v1-nydus", "--plain-http", "--cache-dir", str(cache),
            *extra]


def _prefetch_done(d: Daemon) -> dict:
    return wait_for(lambda: (m := d.api("/api/v1/metrics/prefetch")).get("state") == 2 and m,
                    "prefetch done", log=d.log)


def _subject(reg: RegistryServer) -> tuple[RegistryClient, Descriptor]:
    c = RegistryClient(config=RegistryConfig(host=reg.host, scheme="http"))
    data, media_type, digest = c.get_manifest("learn/app", "v1-nydus")
    return c, Descriptor(media_type, digest, len(data))


def test_list_recorded_on_one_host_is_used_by_a_fresh_cache_on_another(image, tmp_path):
    reg, _ = image
    # host A: plain lazy mount, records, pushes on request
    with Daemon(tmp_path, *_mount_args(reg.host, tmp_path / "cache-a", "--push-prefetch"),
                name="a") as a:
        workload(a.mnt)
        cold = a.api("/api/v1/metrics")
        assert cold["chunk_misses"] > 0          # host A did fetch on demand
        res = a.api("/api/v1/prefetch/push", "PUT")
        # 10 small files + chunks 0 and 2 of big, and what the kernel's readahead asked for
        assert 12 <= res["chunks"] <= 14, res
        assert res["pushed"].startswith(f"{reg.host}/learn/app@sha256:"), res
        assert Path(res["saved"]).is_file()      # and kept in host A's cache dir
    # Debian's docker-registry 2.8 has no referrers API: we fell back to the tag schema
    client, subject = _subject(reg)
    with client:
        assert client.get_referrers("learn/app", subject.digest) is None
        raw, _, _ = client.get_manifest("learn/app", referrers.fallback_tag(subject.digest))
        entries = json.loads(raw)["manifests"]
        assert [e["artifactType"] for e in entries] == [mt.NYDUS_PY_PREFETCH_ARTIFACT]

    # host B: another cache dir, another daemon
    with Daemon(tmp_path, *_mount_args(reg.host, tmp_path / "cache-b"), name="b") as b:
        pf = _prefetch_done(b)
        assert pf["learned_chunks"] == res["chunks"] and pf["errors"] == 0, pf
        status = b.api("/api/v1/prefetch")
        assert status["found"]["source"].startswith(f"referrer {reg.host}/learn/app@"), status
        fs = b.api("/api/v1/metrics")
        ranges = fs["fetch_ranges"]
        # the small files in one merged range, each 1 MiB chunk of big in its own (merging_size)
        assert ranges <= 4 < res["chunks"], fs
        workload(b.mnt)
        fs = b.api("/api/v1/metrics")
        assert fs["chunk_misses"] == 0 and fs["fetch_ranges"] == ranges, fs   # zero on demand
        assert fs["chunk_hits"] > 0
        assert "ignored" not in b.log.read_text()

    # the control: the same fresh start without the learned list fetches on demand
    with Daemon(tmp_path, *_mount_args(reg.host, tmp_path / "cache-c", "--no-learned-prefetch"),
                name="c") as c:
        workload(c.mnt)
        assert c.api("/api/v1/metrics")["chunk_misses"] > 0


def test_a_bootstrap_mount_names_its_manifest_and_gets_the_lists_of_a_reference_mount(image, tmp_path):
    """nydus-snapshotter's form: a bootstrap file and a registry backend config. With
    `learned_prefetch.image_manifest` (which the snapshotter sets), the list it records is
    pushed as a referrer of that manifest (its size and media type read from the registry),
    and another host mounting the same way finds it; without it, nothing is looked up."""
    reg, _ = image
    client, subject = _subject(reg)
    with client:
        man = json.loads(client.get_manifest("learn/app", subject.digest)[0])
        boot = tmp_path / "bootstrap"
        with client.get_blob("learn/app", man["layers"][-1]["digest"]) as r:
            boot.write_bytes(r.read())

    def config(name: str, **learned) -> list[str]:
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({"device": {"backend": {"type": "registry", "config": {
            "host": reg.host, "repo": "learn/app", "scheme": "http"}}}, "learned_prefetch": learned}))
        return ["--bootstrap", str(boot), "--config", str(f), "--cache-dir", str(tmp_path / f"cache-{name}")]

    # (host A does not look: the list of the test above, the same reads, would make its push
    # "unchanged")
    with Daemon(tmp_path, *config("a", image_manifest=subject.digest, enable=False), name="ba") as a:
        workload(a.mnt)
        res = a.api("/api/v1/prefetch/push", "PUT")
        assert res["pushed"].startswith(f"{reg.host}/learn/app@sha256:"), res
    with client:
        raw, _, _ = client.get_manifest("learn/app", referrers.fallback_tag(subject.digest))
        newest = json.loads(raw)["manifests"][-1]
        pushed = json.loads(client.get_manifest("learn/app", newest["digest"])[0])
        assert pushed["subject"] == subject.to_json()       # the full descriptor, not a guess
    with Daemon(tmp_path, *config("b", image_manifest=subject.digest), name="bb") as b:
        pf = _prefetch_done(b)
        assert pf["learned_chunks"] == res["chunks"] and pf["errors"] == 0, pf
        workload(b.mnt)
        assert b.api("/api/v1/metrics")["chunk_misses"] == 0
    with Daemon(tmp_path, *config("c"), name="bc") as c:
        assert _prefetch_done(c)["learned_chunks"] == 0
        workload(c.mnt)
        assert c.api("/api/v1/metrics")["chunk_misses"] > 0


def test_list_tampered_in_transit_is_ignored_with_one_line(image, tmp_path):
    reg, _ = image
    client, subject = _subject(reg)
    with client:
        m = json.loads(client.get_manifest("learn/app", "v1-nydus")[0])
        boot = m["layers"][-1]["digest"]
        lst = ll.LearnedList(boot, (0, 1))
        referrers.registry_push(client, "learn/app", referrers.Artifact(
            subject=subject, artifact_type=mt.NYDUS_PY_PREFETCH_ARTIFACT, blob=lst.to_bytes(),
            blob_media_type=mt.NYDUS_PY_PREFETCH_LIST, annotations={}))
        raw, _, _ = client.get_manifest("learn/app", referrers.fallback_tag(subject.digest))
        blobs = [json.loads(client.get_manifest("learn/app", e["digest"])[0])["layers"][0]["digest"]
                 for e in json.loads(raw)["manifests"]]
    proxy = FaultProxy(reg.host)
    try:
        for b in blobs:          # every list the registry holds arrives with one byte flipped
            proxy.add(Fault.corrupt(), method="GET", path=rf"/blobs/{b}", times=None)
        with Daemon(tmp_path, "--image", f"{proxy.host}/learn/app:v1-nydus", "--plain-http",
                    "--cache-dir", str(tmp_path / "cache"), name="t") as d:
            pf = _prefetch_done(d)
            assert pf["learned_chunks"] == 0, pf
            workload(d.mnt)                      # the mount works, on demand
            assert d.api("/api/v1/metrics")["chunk_misses"] > 0
        lines = [ln for ln in d.log.read_text().splitlines() if " WARNING " in ln]
        assert len(lines) == len(blobs), d.log.read_text()     # one line per bad list
        assert all("skipped" in ln and "digest" in ln.lower() for ln in lines), lines
    finally:
        proxy.close()


def test_stop_does_not_wait_for_a_hung_list_lookup(image, tmp_path):
    """SIGTERM while the registry sits on the learned-list lookup (referrers API, tag schema):
    the daemon stops at once, exits 0 and still keeps the list this run recorded. Before, the
    prefetcher's wait for the lookup held the trio loop until the stop watchdog's forced exit
    (status 1 after 5 s, the recorded list lost)."""
    reg, _ = image
    gate = Gate(1 << 30, timeout=120)       # holds every lookup request until released below
    proxy = FaultProxy(reg.host)
    try:
        proxy.add(Fault("gate", gate=gate), method="GET", path=r"/referrers/|/manifests/sha256-",
                  times=None)
        cache = tmp_path / "cache"
        with Daemon(tmp_path, "--image", f"{proxy.host}/learn/app:v1-nydus", "--plain-http",
                    "--cache-dir", str(cache), name="h") as d:
            wait_for(lambda: gate.waiting > 0, "the list lookup to be held", log=d.log)
            workload(d.mnt)
            assert d.stop() == 0, d.log.read_text()
        text = d.log.read_text()
        assert "did not finish" not in text, text
        assert list((cache / "prefetch").glob("*.json")), text      # the recorded list, kept
    finally:
        with gate.cond:
            gate.open = True
            gate.cond.notify_all()
        proxy.close()


def _bad_lists(bootstrap_digest: str) -> dict[str, bytes]:
    good = json.loads(ll.LearnedList(bootstrap_digest, (0, 1)).to_bytes())
    other = dict(good, bootstrap="sha256:" + "ab" * 32)
    out_of_range = dict(good, chunks=[[0, 1], [1 << 30, 1]])
    return {"garbage": b"\x00\xffnot json at all",
            "oversized": b" " * (ll.MAX_LIST_BYTES + 1),
            "another-image": json.dumps(other).encode(),
            "out-of-range": json.dumps(out_of_range).encode(),
            "too-many": json.dumps(dict(good, chunks=[[0, 1]] * 3 + [[1, ll.MAX_CHUNKS]])).encode()}


@pytest.mark.parametrize("case", ["garbage", "oversized", "another-image", "out-of-range", "too-many"])
def test_bad_list_in_the_cache_dir_is_ignored_with_one_line(image, tmp_path, case):
    reg, _ = image
    client, _ = _subject(reg)
    with client:
        m = json.loads(client.get_manifest("learn/app", "v1-nydus")[0])
    boot = m["layers"][-1]["digest"]
    cache = tmp_path / "cache"
    (cache / "prefetch").mkdir(parents=True)
    (cache / "prefetch" / f"{boot.split(':')[1]}.json").write_bytes(_bad_lists(boot)[case])
    with Daemon(tmp_path, *_mount_args(reg.host, cache), name="z") as d:
        pf = _prefetch_done(d)
        workload(d.mnt)
        assert d.proc.poll() is None and pf["errors"] == 0, pf
    text = d.log.read_text()
    assert text.count("learned prefetch list ignored") == 1, text
    assert "Traceback" not in text


def test_oci_layout_referrer_written_at_unmount_and_found(tmp_path):
    layer = Layer()
    layer.dir("app")
    for p, data in SMALL.items():
        layer.file(p, data)
    layer.file("app/big", BIG)
    Image([layer]).write_oci(tmp_path / "src", "v1")
    nydusify("convert", "--source", f"oci:{tmp_path / 'src'}:v1", "--target", f"oci:{tmp_path / 'img'}:v1")
    ref = f"oci:{tmp_path / 'img'}:v1"
    with Daemon(tmp_path, "--image", ref, "--cache-dir", str(tmp_path / "c1"), "--push-prefetch",
                name="l1") as d:
        workload(d.mnt)
    d.proc.wait()
    index = json.loads((tmp_path / "img" / "index.json").read_text())
    arts = [e for e in index["manifests"] if e.get("artifactType") == mt.NYDUS_PY_PREFETCH_ARTIFACT]
    assert len(arts) == 1, index
    # the layout still names one image: oci:DIR without a tag resolves past the artifact
    with Daemon(tmp_path, "--image", f"oci:{tmp_path / 'img'}", "--cache-dir", str(tmp_path / "c2"),
                name="l2") as d:
        pf = _prefetch_done(d)
        assert pf["learned_chunks"] >= 12, pf
        workload(d.mnt)
        assert d.api("/api/v1/metrics")["chunk_misses"] == 0
    assert os.path.exists(tmp_path / "c1" / "prefetch")
