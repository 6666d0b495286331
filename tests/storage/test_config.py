from __future__ import annotations

import pytest

from nydus_py.errors import ConfigError
from nydus_py.metrics import Metrics
from nydus_py.config.schema import BackendConfig, LocalFsConfig
from nydus_py.storage.factory import make_backend
from nydus_py.storage.wrappers import RetryingBackend


def test_localfs_config_from_nydusd_json_shape(tmp_path):
    c = BackendConfig.from_dict({"type": "localfs",
                                 "config": {"dir": str(tmp_path), "alt_dirs": ["/mnt/nas"],
                                            "retry_limit": 4}})
    assert c == BackendConfig(type="localfs", localfs=LocalFsConfig(dir=str(tmp_path), alt_dirs=["/mnt/nas"]),
                              retry_limit=4)


@pytest.mark.parametrize("d,field", [
    ({"type": "localfs", "config": {"dir": "/x", "dirr": "/y"}}, "backend.config.dirr"),
    ({"type": "localfs", "config": {"dir": "/x"}, "extra": 1}, "backend.extra"),
    ({"type": "localfs", "config": {}}, "backend.config.dir"),
    ({"type": "localfs", "config": {"dir": 3}}, "backend.config.dir"),
    ({"type": "localfs", "config": {"dir": "/x", "alt_dirs": "/y"}}, "backend.config.alt_dirs"),
    ({"type": "localfs", "config": {"dir": "/x", "retry_limit": -1}}, "backend.config.retry_limit"),
    ({"type": "localfs", "config": {"dir": "/x", "retry_limit": True}}, "backend.config.retry_limit"),
    ({"type": "ftp", "config": {}}, "backend.type"),
    ({"config": {}}, "backend.type"),
    ({"type": "localfs"}, "backend.config"),
    ([], "backend"),
])
def test_bad_config_names_the_field(d, field):
    with pytest.raises(ConfigError) as ei:
        BackendConfig.from_dict(d)
    assert str(ei.value).startswith(field + ":") or str(ei.value).startswith(field + " ")


def test_where_prefix_is_used_in_messages():
    with pytest.raises(ConfigError, match=r"^device\.backend\.config\.nope:"):
        BackendConfig.from_dict({"type": "localfs", "config": {"dir": "/x", "nope": 1}},
                                where="device.backend")


def test_make_backend_localfs_is_retried_and_metered(tmp_path):
    (tmp_path / ("ab" * 32)).write_bytes(b"data")
    m = Metrics()
    b = make_backend(BackendConfig.from_dict({"type": "localfs", "config": {"dir": str(tmp_path)}}),
                     metrics=m)
    assert isinstance(b, RetryingBackend)
    assert b.read_range("sha256:" + "ab" * 32, 1, 2) == b"at"
    assert m.backend.value("read_count") == 1 and m.backend.value("read_amount_total") == 2
    b.close()


def test_make_backend_rejects_missing_dir(tmp_path):
    with pytest.raises(ConfigError, match="backend.config.dir"):
        make_backend(BackendConfig(type="localfs", localfs=LocalFsConfig(dir=str(tmp_path / "nope"))))


@pytest.mark.parametrize("t", ["oss", "localdisk", "http-proxy"])
def test_nydus_backends_we_lack_are_refused_when_parsed(t):
    # refused with the reason at parse time, not accepted and then failing at mount
    with pytest.raises(ConfigError, match=rf"^backend\.type: '{t}' is not supported by nydus-py \("):
        BackendConfig.from_dict({"type": t, "config": {"host": "example.com"}})


def test_unknown_backend_type_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'registry'"):
        BackendConfig.from_dict({"type": "registy", "config": {}})
