"""Nydus's own sample configs load; Nydus keys we lack are warnings naming them; keys nobody
knows are errors with a 'did you mean'; the v2 TOML maps onto the same fields as v1 JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nydus_py import config
from nydus_py.config.schema import BackendConfig
from nydus_py.errors import BackendError, ConfigError
from nydus_py.storage.backend import close_backend
from nydus_py.storage.factory import make_backend

SAMPLES = Path(__file__).parent / "nydus_samples"


def _warned(cfg, *paths):
    text = "\n".join(cfg.warnings)
    for p in paths:
        assert any(w.startswith(p + ":") for w in cfg.warnings), f"no warning for {p} in:\n{text}"


def test_all_six_nydus_samples_load():
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".json", ".toml"))
    assert len(files) == 6
    for f in files:
        cfg = config.load(f)
        assert cfg.backend is not None, f


def test_v1_sample_registry_without_host_with_ca_cert_files():
    cfg = config.load(SAMPLES / "nydusd-config.json")
    assert cfg.backend.type == "registry" and cfg.backend.retry_limit == 2
    assert cfg.backend.registry.ca_cert_files == ["/etc/ssl/certs/my-ca.pem"]
    assert cfg.backend.registry.host == ""          # the image reference supplies it
    assert cfg.cache.work_dir == "/var/lib/nydus/cache"
    assert cfg.fs_prefetch.enable and cfg.fs_prefetch.threads_count == 8 and cfg.fs_prefetch.prefetch_all
    assert not cfg.digest_validate                  # cache hits: xxh3 only (fetches: always sha256)


def test_v2_toml_sample_maps_onto_the_v1_fields():
    cfg = config.load(SAMPLES / "nydusd-config-v2.toml")
    assert cfg.id == "my_id"
    assert cfg.backend.type == "localfs" and cfg.backend.localfs.dir == "/tmp"
    assert cfg.backend.localfs.alt_dirs == ["/var/nydus/cache"] and cfg.backend.retry_limit == 2
    assert cfg.cache.type == "blobcache" and cfg.cache.work_dir == "."      # filecache = blobcache
    assert cfg.amplify_io == 1000000 and cfg.digest_validate and cfg.enable_xattr
    pf = cfg.fs_prefetch
    assert (pf.enable, pf.threads_count, pf.merging_size, pf.bandwidth_rate, pf.prefetch_all) == \
        (True, 8, 1000000, 10000000, True)
    _warned(cfg, "backend.localfs.blob_file", "backend.registy", "cache.compressed", "cache.validate",
            "cache.prefetch", "cache.enable_encryption")


def test_v2_and_v1_of_the_same_settings_are_equal():
    v1 = config.parse({"device": {"backend": {"type": "localfs", "config": {"dir": "/b", "retry_limit": 3}},
                                  "cache": {"type": "blobcache", "config": {"work_dir": "/c"}}},
                       "amplify_io": "512K", "fs_prefetch": {"enable": True, "threads_count": 2}})
    v2 = config.parse_text('version = 2\n[backend]\ntype = "localfs"\n[backend.localfs]\ndir = "/b"\n'
                           'retry_limit = 3\n[cache]\ntype = "blobcache"\n[cache.filecache]\n'
                           'work_dir = "/c"\n[rafs]\nbatch_size = "512K"\n[rafs.prefetch]\n'
                           'enable = true\nthreads = 2\n', "c.toml")
    assert v1 == v2 and v1.amplify_io == 512 << 10


def test_blob_cache_entries_give_backend_cache_and_bootstrap_path():
    cfg = config.load(SAMPLES / "nydusd-blob-cache-entry.toml")
    assert cfg.metadata_path == "/path/to/rafs/meta/data/blob" and cfg.backend.type == "localfs"
    cfg = config.load(SAMPLES / "nydusd-blob-cache-entry-configuration-v2.toml")
    assert cfg.metadata_path == "/path/to/rafs/meta/data/blob"
    _warned(cfg, "cache.filecache.enable_encryption")
    cfg = config.load(SAMPLES / "nydusd-boostrap-blob-cache-entry.json")
    assert cfg.backend.localfs.dir == "/tmp/nydus" and cfg.cache.work_dir == "/tmp/nydus"
    _warned(cfg, "config.cache.type", "config.metadata_file")      # fscache; the sample's misspelling


@pytest.mark.parametrize("doc, message", [
    ({"digest_validat": True}, r"^digest_validate?: unknown field; did you mean 'digest_validate'\?"),
    ({"fs_prefetch": {"threads": 2}}, r"^fs_prefetch\.threads: unknown field; did you mean 'threads_count'\?"),
    ({"device": {"backend": {"type": "registry", "config": {"hots": "h"}}}},
     r"^device\.backend\.config\.hots: unknown field; did you mean 'host'\?"),
    ({"device": {"cache": {"type": "blobcache", "config": {"work_dri": "/x"}}}},
     r"^device\.cache\.config\.work_dri: unknown field; did you mean 'work_dir'\?"),
    ({"device": {"backend": {"type": "s3", "config": {"bucket_name": "b", "regoin": "x"}}}},
     r"did you mean 'region'\?"),
    ({"totally_new_key": 1}, r"^totally_new_key: unknown field \(known: "),
])
def test_keys_nobody_knows_are_errors_with_did_you_mean(doc, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(doc)


def test_v2_unknown_keys_are_named_with_v2_paths():
    with pytest.raises(ConfigError, match=r"^rafs\.prefetch\.thread: unknown field; did you mean 'threads'"):
        config.parse_text("version = 2\n[rafs.prefetch]\nthread = 2\n", "c.toml")
    with pytest.raises(ConfigError, match=r"^rafs\.batch_size: not a size"):
        config.parse_text("version = 2\n[rafs]\nbatch_size = \"lots\"\n", "c.toml")
    with pytest.raises(ConfigError, match=r"^version: must be 2"):
        config.parse({"version": 3})
    with pytest.raises(ConfigError, match=r"^backend\.localfss: unknown field; did you mean 'localfs'"):
        config.parse_text("version = 2\n[backend]\ntype = \"localfs\"\n[backend.localfss]\ndir = \"/\"\n", "c.toml")


def test_nydus_keys_we_lack_warn_by_name_and_still_load():
    cfg = config.parse({"device": {"backend": {"type": "registry", "config": {
        "host": "r.example.com", "repo": "a/b", "blob_redirected_host": "x", "blob_url_scheme": "http",
        "proxy": {"url": "http://p:1", "check_pause_elapsed": 300}}},
        "cache": {"type": "blobcache", "compressed": True, "config": {"work_dir": "/c"}}},
        "latest_read_files": True, "mode": "cached",
        "fs_prefetch": {"enable": True, "stream_prefetch": True}})
    _warned(cfg, "device.backend.config.blob_redirected_host", "device.backend.config.blob_url_scheme",
            "device.backend.config.proxy.check_pause_elapsed", "device.cache.compressed",
            "fs_prefetch.stream_prefetch", "latest_read_files", "mode")
    assert all("not supported by nydus-py" in w or "ignored" in w for w in cfg.warnings)


def test_sizes_are_accepted_everywhere():
    cfg = config.parse({"device": {"cache": {"config": {"max_size": "10G"}}}, "amplify_io": "1M",
                        "fs_prefetch": {"merging_size": "128K", "bandwidth_rate": "10M"}})
    assert cfg.cache.max_size == 10 << 30 and cfg.amplify_io == 1 << 20
    assert cfg.fs_prefetch.merging_size == 128 << 10 and cfg.fs_prefetch.bandwidth_rate == 10 << 20
    for good, n in (("0x100000", 1 << 20), ("1.5GiB", 3 << 29), ("64KB", 64 << 10), ("4096", 4096)):
        assert config.parse_size(good) == n
    for bad in ("lots", "-1", "1X", "G", "1.5.2M"):
        with pytest.raises(ValueError):
            config.parse_size(bad)


def test_json_and_toml_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("version = \n")
    with pytest.raises(ConfigError, match=rf"^{bad}: malformed TOML"):
        config.load(bad)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"device": {"cache": {"type": "fscache2"}}}))
    with pytest.raises(ConfigError, match=rf"^{j}: device\.cache\.type: must be one of"):
        config.load(j)


# -- ca_cert_files against a real TLS registry ---------------------------------------------------
def test_ca_cert_files_trust_a_private_ca(tls_registry, tmp_path):
    from nydus_py.oci import digest as dg
    from nydus_py.oci.registry import RegistryClient, RegistryConfig
    data = b"served over TLS by a private CA" * 10
    d = dg.of_bytes(data)
    with RegistryClient(config=RegistryConfig(host=tls_registry.host, ca_file=str(tls_registry.ca_path))) as c:
        c.push_blob("t/ca", data, d, len(data))
    conf = {"host": tls_registry.host, "repo": "t/ca", "retry_limit": 0}
    trusted = make_backend(BackendConfig.from_dict(
        {"type": "registry", "config": {**conf, "ca_cert_files": [str(tls_registry.ca_path)]}}))
    try:
        assert trusted.read_range(d, 5, 10) == data[5:15]
    finally:
        close_backend(trusted)
    untrusted = make_backend(BackendConfig.from_dict({"type": "registry", "config": conf}))
    try:
        with pytest.raises(BackendError, match="TLS error"):
            untrusted.read_range(d, 5, 10)
    finally:
        close_backend(untrusted)
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match=rf"ca_cert_files: {not_pem}: no PEM certificate"):
        make_backend(BackendConfig.from_dict({"type": "registry", "config": {**conf, "ca_cert_files": [str(not_pem)]}}))
