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
