import json

import pytest

from nydus_py import config
from nydus_py.errors import ConfigError

NYDUSD_CONFIG = {
    "device": {
        "backend": {"type": "localfs", "config": {"dir": "/var/lib/blobs", "alt_dirs": ["/mnt/nas"]}},
        "cache": {"type": "blobcache", "config": {"work_dir": "/var/cache/nydus"}},
    },
    "mode": "direct",
    "digest_validate": True,
    "iostats_files": False,
    "enable_xattr": True,
    "amplify_io": 1048576,
    "fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 131072,
                    "bandwidth_rate": 0, "prefetch_all": False},
}


def test_a_nydusd_config_parses_into_typed_fields():
    cfg = config.parse(NYDUSD_CONFIG)
    assert cfg.backend.type == "localfs"
    assert cfg.backend.localfs.dir == "/var/lib/blobs"
    assert cfg.backend.localfs.alt_dirs == ["/mnt/nas"]
    assert cfg.cache.type == "blobcache" and cfg.cache.work_dir == "/var/cache/nydus"
    assert cfg.amplify_io == 1 << 20 and cfg.digest_validate is True
    assert cfg.fs_prefetch.enable and cfg.fs_prefetch.threads_count == 8


def test_empty_config_gives_defaults_and_no_backend():
    cfg = config.parse({})
    assert cfg.backend is None
    assert cfg.cache.type == "blobcache" and cfg.cache.work_dir == ""
    assert cfg.enable_xattr and not cfg.fs_prefetch.enable


@pytest.mark.parametrize("doc, field", [
    ({"digest_validat": True}, "digest_validat"),
    ({"fs_prefetch": {"enabled": True}}, "fs_prefetch.enabled"),
    ({"device": {"cache": {"type": "blobcache", "config": {"workdir": "/x"}}}}, "device.cache.config.workdir"),
    ({"device": {"backend": {"type": "localfs", "config": {"dri": "/x"}}}}, "device.backend.config.dri"),
    ({"device": {"backnd": {}}}, "device.backnd"),
])
def test_unknown_fields_are_named_in_the_error(doc, field):
    with pytest.raises(ConfigError, match=rf"{field}: unknown field"):
        config.parse(doc)


@pytest.mark.parametrize("doc, where", [
    ({"amplify_io": "lots"}, "amplify_io: not a size"),
    ({"amplify_io": 1.5}, "amplify_io: expected an integer or a size"),
    ({"digest_validate": 1}, "digest_validate: expected true or false"),
    ({"fs_prefetch": []}, "fs_prefetch: expected a JSON object"),
    ({"device": {"cache": {"type": "tmpfs"}}}, "device.cache.type"),
    ({"mode": "weird"}, "mode"),
    ([], "config: expected a JSON object"),
])
def test_wrong_types_and_values_are_named(doc, where):
    with pytest.raises(ConfigError, match=where):
        config.parse(doc)


def test_load_reports_the_file_for_bad_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=str(p)):
        config.load(p)
    p.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ConfigError, match=rf"{p}: bogus: unknown field"):
        config.load(p)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.json")


def test_dummy_cache_type_means_private_temp_dir():
    cfg = config.parse({"device": {"cache": {"type": ""}}})
    assert cfg.cache.type == "dummy"
