"""The CRI keychain: AuthConfig → Credentials, kept per registry + repository."""

from __future__ import annotations

import base64

import pytest

from nydus_py.oci.reference import parse
from nydus_py.snapshotter.cri import Keychain, credentials_of
from nydus_py.snapshotter.proto import cri_image_pb2 as cri


def test_auth_config_forms():
    c = credentials_of(cri.AuthConfig(username="u", password="p"))
    assert (c.username, c.password) == ("u", "p")
    c = credentials_of(cri.AuthConfig(auth=base64.b64encode(b"alice:pw:with:colons").decode()))
    assert (c.username, c.password) == ("alice", "pw:with:colons")
    c = credentials_of(cri.AuthConfig(registry_token="tok"))
    assert c.registry_token == "tok" and not c.username
    assert credentials_of(cri.AuthConfig(server_address="reg")) is None
    with pytest.raises(ValueError, match="not base64"):
        credentials_of(cri.AuthConfig(auth="!!!"))


def test_keychain_is_per_registry_and_repository():
    kc = Keychain()
    kc.add("reg.example:5000/team/app:v1", credentials_of(cri.AuthConfig(username="a", password="1")))
    assert kc.get(parse("reg.example:5000/team/app@sha256:" + "0" * 64)).username == "a"
    assert kc.get(parse("reg.example:5000/team/other:v1")) is None
    assert kc.get(parse("other.example/team/app:v1")) is None
    kc.add("reg.example:5000/team/app:v2", credentials_of(cri.AuthConfig(username="b", password="2")))
    assert kc.get(parse("reg.example:5000/team/app:v1")).username == "b"      # the latest secret wins


def test_a_pull_secret_survives_a_snapshotter_restart_for_the_image_it_pulled(tmp_path, caplog,
                                                                              monkeypatch):
    """The keychain is memory only (as Nydus's); a daemon the snapshotter restarted after its
    own restart used to get no credentials (IMAGE_PULL_AUTH / docker config, none here) and
    failed with 401. The image now keeps the secret it was started with, 0600, never logged,
    and a newer PullImage still wins."""
    import json
    import logging
    import os
    import stat

    from nydus_py.snapshotter.core import prepare_root
    from nydus_py.snapshotter.daemons import DaemonManager
    from nydus_py.snapshotter.remote import RemoteConfig
    from nydus_py.snapshotter.resolver import Resolver
    from nydus_py.snapshotter.store import ImageRecord, Store

    caplog.set_level(logging.DEBUG)
    for k in ("IMAGE_PULL_AUTH", "DOCKER_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    cfg = RemoteConfig(root=prepare_root(tmp_path / "root"), nydusd=("/bin/false",), recover_interval=0,
                       docker_config=str(tmp_path / "no-docker-config.json"))
    store = Store(tmp_path / "metadata.db")
    image_id = "ab" * 32
    rec = ImageRecord(id=image_id, ref="reg.example:5000/team/app:v1", manifest_digest="sha256:" + image_id,
                      bootstrap_digest="sha256:" + "cd" * 32, mountpoint=str(tmp_path / "mnt"), pid=0,
                      state={"bootstrap": "/b", "config": str(tmp_path / "c.json"), "mode": "dedicated",
                             "registry": {"host": "reg.example:5000", "api_host": "reg.example:5000",
                                          "repo": "team/app", "scheme": "https"}})
    secret = base64.b64encode(b"alice:s3cret-pull").decode()
    try:
        before = DaemonManager(cfg, store, Resolver(cfg))
        before.image_dir(image_id).mkdir(mode=0o700)
        before.resolver.keychain.add(rec.ref, credentials_of(cri.AuthConfig(username="alice",
                                                                             password="s3cret-pull")))
        assert before._config_doc(rec)["device"]["backend"]["config"]["auth"] == secret
        kept = before.image_dir(image_id) / "cri-auth.json"
        assert stat.S_IMODE(os.lstat(kept).st_mode) == 0o600
        after = DaemonManager(cfg, store, Resolver(cfg))             # the snapshotter restarted
        assert after.resolver.keychain.get(parse(rec.ref)) is None
        assert after._config_doc(rec)["device"]["backend"]["config"]["auth"] == secret
        after.resolver.keychain.add(rec.ref, credentials_of(cri.AuthConfig(username="bob", password="new")))
        assert after._config_doc(rec)["device"]["backend"]["config"]["auth"] == \
            base64.b64encode(b"bob:new").decode()
        assert json.loads(kept.read_text())["username"] == "bob"
        assert "s3cret-pull" not in caplog.text and secret not in caplog.text
    finally:
        store.close()
