import base64
import json
import os
import stat

import pytest

from nydus_py.errors import AuthError, ConfigError
from nydus_py.oci.auth import (Credentials, load_docker_credentials, parse_www_authenticate,
                               resolve_credentials)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


# ---------------------------------------------------------------------------- WWW-Authenticate

def test_parses_docker_hub_bearer_challenge():
    h = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:library/busybox:pull"')
    [c] = parse_www_authenticate(h)
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                        "scope": "repository:library/busybox:pull"}


def test_quoted_commas_and_spaces_stay_inside_values():
    h = 'Bearer realm="https://a/token", scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"'
    [c] = parse_www_authenticate(h)
    assert c.params["scope"] == "repository:a/b:pull,push repository:c:pull"
    assert c.params["error"] == "insufficient_scope"


def test_basic_challenge_and_case_insensitive_scheme_and_keys():
    [c] = parse_www_authenticate('BASIC Realm="my registry"')
    assert c.scheme == "basic" and c.realm == "my registry"


def test_multiple_challenges_in_one_header():
    cs = parse_www_authenticate('Basic realm="r1", Bearer realm="https://t/token",service=svc')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[1].params == {"realm": "https://t/token", "service": "svc"}


def test_escaped_quote_and_unquoted_token_values():
    [c] = parse_www_authenticate(r'Bearer realm="a\"b",service=svc.example')
    assert c.params == {"realm": 'a"b', "service": "svc.example"}


def test_garbage_header_gives_no_usable_challenge():
    assert all(not c.realm for c in parse_www_authenticate(",,, ="))
    assert parse_www_authenticate("") == []


# ---------------------------------------------------------------------------- credentials

def test_repr_masks_secrets():
    c = Credentials("alice", "hunter2", identity_token="idtok", registry_token="regtok")
    for text in (repr(c), str(c), f"{c}", repr([c])):
        assert "hunter2" not in text and "idtok" not in text and "regtok" not in text
        assert "alice" in text


def test_from_auth_string_rejects_non_base64_without_echoing_it():
    with pytest.raises(ConfigError) as e:
        Credentials.from_auth_string("not base64!!", "IMAGE_PULL_AUTH")
    assert "not base64!!" not in str(e.value) and "IMAGE_PULL_AUTH" in str(e.value)


def write_config(tmp_path, obj) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(obj))
    return {"DOCKER_CONFIG": str(tmp_path), "PATH": os.environ.get("PATH", "")}


def test_docker_config_auth_field(tmp_path):
    env = write_config(tmp_path, {"auths": {"localhost:5000": {"auth": b64("bob:pw:with:colons")}}})
    c = load_docker_credentials("localhost:5000", env=env)
    assert (c.username, c.password) == ("bob", "pw:with:colons")


def test_docker_config_matches_keys_with_scheme_and_path(tmp_path):
    env = write_config(tmp_path, {"auths": {"https://reg.example.com/v2/": {"username": "u", "password": "p"}}})
    assert load_docker_credentials("reg.example.com", env=env) == Credentials("u", "p")
    assert load_docker_credentials("other.example.com", env=env) is None


def test_docker_hub_uses_index_key_for_every_hub_alias(tmp_path):
    env = write_config(tmp_path, {"auths": {"https://index.docker.io/v1/": {"auth": b64("hub:pw")}}})
    for host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        assert load_docker_credentials(host, env=env).username == "hub"


def test_identity_token_is_kept(tmp_path):
    env = write_config(tmp_path, {"auths": {"r.io": {"auth": b64("u:"), "identitytoken": "refresh"}}})
    c = load_docker_credentials("r.io", env=env)
    assert c.identity_token == "refresh" and c.username == "u"


def test_missing_config_is_no_credentials(tmp_path):
    assert load_docker_credentials("r.io", env={"DOCKER_CONFIG": str(tmp_path / "nope")}) is None


def test_home_docker_config_is_used_without_docker_config_env(tmp_path):
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps({"auths": {"r.io": {"auth": b64("h:p")}}}))
    assert load_docker_credentials("r.io", env={"HOME": str(tmp_path)}).username == "h"


def make_helper(tmp_path, name: str, script: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / f"docker-credential-{name}"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(bindir)


HELPER = '''read url
if [ "$1" != get ]; then exit 3; fi
case "$url" in
  reg.example.com) echo '{"ServerURL":"reg.example.com","Username":"helper-user","Secret":"helper-pw"}';;
  https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"<token>","Secret":"hub-refresh"}';;
  *) echo "credentials not found in native keychain"; exit 1;;
esac
'''


def test_cred_helpers_run_with_server_url_on_stdin(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", make_helper(tmp_path, "fake", HELPER) + os.pathsep + os.environ["PATH"])
    write_config(tmp_path, {"credHelpers": {"reg.example.com": "fake"}, "credsStore": "fake",
                            "auths": {"other.io": {"auth": b64("file:pw")}}})
    env = {"DOCKER_CONFIG": str(tmp_path)}
    assert load_docker_credentials("reg.example.com", env=env) == Credentials("helper-user", "helper-pw")
    assert load_docker_credentials("docker.io", env=env) == Credentials(identity_token="hub-refresh")
    # the store knows nothing about other.io: fall back to the file's auths
    assert load_docker_credentials("other.io", env=env).username == "file"


def test_failing_helper_is_an_auth_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", make_helper(tmp_path, "broken", "echo 'keychain locked' >&2; exit 2\n")
                       + os.pathsep + os.environ["PATH"])
    write_config(tmp_path, {"credsStore": "broken"})
    with pytest.raises(AuthError, match="docker-credential-broken get r.io: exit 2: keychain locked"):
        load_docker_credentials("r.io", env={"DOCKER_CONFIG": str(tmp_path)})


def test_missing_helper_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    write_config(tmp_path, {"credsStore": "nonexistent"})
    with pytest.raises(ConfigError, match="docker-credential-nonexistent"):
        load_docker_credentials("r.io", env={"DOCKER_CONFIG": str(tmp_path)})


def test_precedence_explicit_then_image_pull_auth_then_docker_config(tmp_path):
    env = write_config(tmp_path, {"auths": {"r.io": {"auth": b64("file:pw")}}})
    assert resolve_credentials("r.io", env=env).username == "file"
    env["IMAGE_PULL_AUTH"] = b64("envuser:envpw")
    assert resolve_credentials("r.io", env=env) == Credentials("envuser", "envpw")
    assert resolve_credentials("r.io", explicit=b64("cfg:pw"), env=env).username == "cfg"
    assert resolve_credentials("r.io", explicit=Credentials("obj", "x"), env=env).username == "obj"
