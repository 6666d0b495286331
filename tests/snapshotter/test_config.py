"""`nydus-snapshotter --config`: Nydus's keys, precedence over defaults, flags over the file,
unknown keys, unimplemented Nydus keys, and the nydusd template merge."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from nydus_py import __version__
from nydus_py.config.nydusd import parse as parse_nydusd
from nydus_py.errors import ConfigError
from nydus_py.snapshotter import cli
from nydus_py.snapshotter.config import cli_defaults, host_mirrors, load, load_template, merge_template

NYDUS_SAMPLE = """\
version = 1
root = "/var/lib/containerd/io.containerd.snapshotter.v1.nydus"
address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
daemon_mode = "multiple"
cleanup_on_close = false

[system]
enable = true
address = "/run/containerd-nydus/system.sock"

[daemon]
nydusd_config = "/etc/nydus/nydusd-config.fusedev.json"
nydusd_path = "/usr/local/bin/nydusd"
fs_driver = "fusedev"
recover_policy = "restart"
threads_number = 4

[log]
log_to_stdout = false
level = "info"
dir = "/var/log/nydus"
log_rotation_max_size = 100

[metrics]
address = ":9110"

[remote]
skip_ssl_verify = true
[remote.mirrors_config]
dir = "/etc/nydus/certs.d"
[remote.auth]
enable_cri_keychain = true
image_service_address = "/run/containerd/containerd.sock"
enable_kubeconfig_keychain = false
"""


def test_nydus_sample_config_maps_to_flags_and_warns_about_what_it_ignores(tmp_path):
    f = tmp_path / "config.toml"
    f.write_text(NYDUS_SAMPLE)
    warnings: list[str] = []
    cfg = load(f, warnings)
    assert cli_defaults(cfg) == {
        "root": "/var/lib/containerd/io.containerd.snapshotter.v1.nydus",
        "address": "/run/containerd-nydus/containerd-nydus-grpc.sock",
        "daemon_mode": "dedicated", "nydusd": "/usr/local/bin/nydusd",
        "nydusd_config": "/etc/nydus/nydusd-config.fusedev.json", "recover_policy": "restart",
        "log_level": "info", "log_file": "/var/log/nydus/nydus-snapshotter.log",
        "metrics_address": ":9110", "skip_verify": True, "mirrors_config_dir": "/etc/nydus/certs.d",
        "cri_keychain": True, "image_service_address": "/run/containerd/containerd.sock"}
    named = sorted(w.split(":")[0] for w in warnings)
    assert named == ["cleanup_on_close", "daemon.threads_number", "log.log_rotation_max_size",
                     "remote.auth.enable_kubeconfig_keychain", "system"]
    assert all("not supported by nydus-py" in w for w in warnings)


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path):
    f = tmp_path / "config.toml"
    f.write_text('root = "/r"\naddress = "/a.sock"\ndaemon_mode = "shared"\n[log]\nlevel = "debug"\n')
    args, warnings = cli.parse_args(["--config", str(f), "--address", "/flag.sock"])
    assert (args.root, args.address, args.daemon_mode, args.log_level) == ("/r", "/flag.sock", "shared", "debug")
    assert warnings == []
    args, _ = cli.parse_args([])
    assert args.root == cli.DEFAULT_ROOT and args.daemon_mode == "dedicated"


@pytest.mark.parametrize("policy", ["restart", "failover", "none"])
def test_recover_policy_key_feeds_the_recover_policy_flag(tmp_path, policy):
    f = tmp_path / "config.toml"
    f.write_text(f'[daemon]\nrecover_policy = "{policy}"\n')
    assert cli.parse_args(["--config", str(f)])[0].recover_policy == policy
    other = "none" if policy != "none" else "failover"
    assert cli.parse_args(["--config", str(f), "--recover-policy", other])[0].recover_policy == other


@pytest.mark.parametrize("text,message", [
    ('deamon_mode = "shared"\n', "deamon_mode: unknown field; did you mean 'daemon_mode'?"),
    ('[daemon]\nnydusd_cofnig = "x"\n', "daemon.nydusd_cofnig: unknown field; did you mean 'nydusd_config'?"),
    ('[metric]\naddress = ":1"\n', "metric: unknown field; did you mean 'metrics'?"),
    ('daemon_mode = "none"\n', "daemon_mode: must be one of"),
    ('[daemon]\nfs_driver = "fscache"\n', "daemon.fs_driver: must be one of 'fusedev', not 'fscache'"),
    ('[daemon]\nrecover_policy = "resend"\n', "daemon.recover_policy: must be one of"),
    ('root = 5\n', "root: expected a string, got a number"),
    ('version = 2\n', "version: only version 1"),
    ('root = \n', "malformed TOML"),
])
def test_bad_config_is_one_error_line(tmp_path, text, message):
    f = tmp_path / "config.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load(f, [])
    assert message in str(ei.value) and str(f) in str(ei.value)
    p = subprocess.run([sys.executable, "-m", "nydus_py.snapshotter.cli", "--config", str(f)],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("nydus-snapshotter: error: ") and message in p.stderr


def test_version():
    p = subprocess.run([sys.executable, "-m", "nydus_py.snapshotter.cli", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"nydus-snapshotter (nydus-py) {__version__}"


TEMPLATE = {
    "device": {"backend": {"type": "registry", "config": {
                   "timeout": 9, "auth": "dGVtcGxhdGU6c2VjcmV0", "scheme": "https",
                   "proxy": {"url": "http://127.0.0.1:65001", "fallback": True},
                   "mirrors": [{"host": "http://127.0.0.1:5001"}]}},
               "cache": {"type": "blobcache", "config": {"work_dir": "/template/cache", "max_size": 1024}}},
    "fs_prefetch": {"enable": True, "threads_count": 2},
    "amplify_io": 65536,
}


def test_template_merge_keeps_template_keys_and_fills_in_the_image(tmp_path):
    doc = merge_template(TEMPLATE, {"host": "reg:5000", "repo": "a/b", "scheme": "http"}, "/root/cache")
    b = doc["device"]["backend"]
    assert b["type"] == "registry"
    assert b["config"] == {"timeout": 9, "scheme": "http", "host": "reg:5000", "repo": "a/b",
                           "proxy": {"url": "http://127.0.0.1:65001", "fallback": True},
                           "mirrors": [{"host": "http://127.0.0.1:5001"}]}   # the template's auth is dropped
    assert doc["device"]["cache"]["config"] == {"work_dir": "/root/cache", "max_size": 1024}
    assert doc["fs_prefetch"] == {"enable": True, "threads_count": 2} and doc["amplify_io"] == 65536
    assert TEMPLATE["device"]["backend"]["config"]["auth"]            # the template itself untouched
    cfg = parse_nydusd(doc)
    assert cfg.backend.registry.proxy.url == "http://127.0.0.1:65001" and cfg.cache.max_size == 1024


def test_bad_template_fails_at_start_with_nydusd_path(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"device": {"backend": {"type": "registry", "config": {"proxi": {}}}}}))
    with pytest.raises(ConfigError, match=r"t.json: device.backend.config.proxi: unknown field"):
        load_template(f)
    f.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": "/x"}}}}))
    with pytest.raises(ConfigError, match="only \"registry\" can be templated"):
        load_template(f)
    f.write_text(json.dumps(TEMPLATE))
    assert load_template(f) == TEMPLATE


def test_mirrors_from_containerd_hosts_dir(tmp_path):
    (tmp_path / "reg.example").mkdir()
    (tmp_path / "reg.example" / "hosts.toml").write_text(
        'server = "https://reg.example"\n'
        '[host."http://mirror-a:5000"]\n  capabilities = ["pull", "resolve"]\n  ping_url = "http://mirror-a:5000/v2"\n'
        '  health_check_interval = 3\n  failure_limit = 2\n  [host."http://mirror-a:5000".header]\n    X-A = "1"\n'
        '[host."http://push-only:5000"]\n  capabilities = ["push"]\n'
        '[host."https://mirror-b"]\n')
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."http://any:1"]\n')
    assert host_mirrors(tmp_path, "reg.example") == [
        {"host": "http://mirror-a:5000", "headers": {"X-A": "1"}, "ping_url": "http://mirror-a:5000/v2",
         "health_check_interval": 3, "failure_limit": 2},
        {"host": "https://mirror-b"}]
    assert host_mirrors(tmp_path, "other:5000") == [{"host": "http://any:1"}]
    (tmp_path / "_default" / "hosts.toml").unlink()
    assert host_mirrors(tmp_path, "other:5000") == []


def test_bad_metrics_address_fails_before_anything_starts(tmp_path):
    p = subprocess.run([sys.executable, "-m", "nydus_py.snapshotter.cli", "--root", str(tmp_path / "r"),
                        "--address", str(tmp_path / "s.sock"), "--metrics-address", "9110"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "expected HOST:PORT" in p.stderr
    assert not (tmp_path / "r").exists()


def test_each_daemon_config_is_template_plus_image_plus_host_mirrors(tmp_path):
    """DaemonManager's nydusd config for one image: the template's keys, the image's registry
    and credentials (a CRI pull secret here), the host's mirrors from hosts.toml, its cache dir;
    and nydusd's parser accepts it."""
    from nydus_py.config.nydusd import parse as parse_nydusd
    from nydus_py.oci.auth import Credentials
    from nydus_py.snapshotter.daemons import DaemonManager
    from nydus_py.snapshotter.remote import RemoteConfig
    from nydus_py.snapshotter.resolver import Resolver
    from nydus_py.snapshotter.store import ImageRecord, Store

    (tmp_path / "certs.d" / "reg.example").mkdir(parents=True)
    (tmp_path / "certs.d" / "reg.example" / "hosts.toml").write_text('[host."http://m1:5000"]\n')
    cfg = RemoteConfig(root=tmp_path, nydusd_template=TEMPLATE, mirrors_config_dir=str(tmp_path / "certs.d"),
                       docker_config=str(tmp_path / "none.json"))
    store = Store(tmp_path / "metadata.db")
    resolver = Resolver(cfg)
    try:
        resolver.keychain.add("reg.example/team/app:v1", Credentials(username="k8s", password="secret"))
        dm = DaemonManager(cfg, store, resolver)
        rec = ImageRecord(id="ab" * 32, ref="reg.example/team/app:v1", manifest_digest="sha256:" + "ab" * 32,
                          bootstrap_digest="sha256:" + "cd" * 32, mountpoint=str(tmp_path / "mnt"), pid=0,
                          state={"mode": "dedicated", "registry": {"host": "reg.example", "api_host": "reg.example",
                                                                   "repo": "team/app", "scheme": "https"}})
        doc = dm._config_doc(rec)
        conf = doc["device"]["backend"]["config"]
        assert conf["mirrors"] == [{"host": "http://m1:5000"}] and conf["proxy"] == TEMPLATE["device"]["backend"]["config"]["proxy"]
        assert (conf["host"], conf["repo"], conf["timeout"]) == ("reg.example", "team/app", 9)
        assert base64.b64decode(conf["auth"]) == b"k8s:secret"
        assert doc["device"]["cache"]["config"] == {"work_dir": str(tmp_path / "images" / rec.id / "cache"),
                                                    "max_size": 1024}
        assert doc["fs_prefetch"] == TEMPLATE["fs_prefetch"]
        parse_nydusd(doc)
    finally:
        resolver.close()
        store.close()


@pytest.mark.parametrize("flag, level", [("warn", "warning"), ("trace", "debug"), ("warning", "warning"),
                                         ("error", "error")])
def test_log_level_flag_takes_nydus_snapshotters_names(flag, level):
    """`--log-level warn` (logrus's name, as nydus-snapshotter takes it) was refused while the
    config file's `[log] level = "warn"` was accepted."""
    assert cli.parse_args(["--log-level", flag])[0].log_level == level


def test_an_unknown_log_level_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--log-level", "loud"])
    assert "--log-level" in capsys.readouterr().err
