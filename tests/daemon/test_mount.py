"""Mount lifecycle pieces that need no mount, and the CLI's argument handling."""

import pytest

from nydus_py.daemon import cli
from nydus_py.daemon.mount import MountRequest, fuse_options, mount_fstype, prepare_mountpoint
from nydus_py.errors import ConfigError


def test_default_mount_options_are_read_only_nosuid_nodev_with_kernel_permission_checks():
    opts = fuse_options(MountRequest(mountpoint="/m"))
    assert {"ro", "nosuid", "nodev", "default_permissions", "fsname=nydus-py",
            "subtype=nydus-py"} <= opts
    assert "allow_other" not in opts and "suid" not in opts


def test_suid_and_allow_other_are_opt_in():
    opts = fuse_options(MountRequest(mountpoint="/m", suid=True, allow_other=True))
    assert {"suid", "allow_other"} <= opts and "nosuid" not in opts
    assert "nodev" in opts


def test_mountpoint_must_exist_and_be_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_mountpoint(str(tmp_path / "none"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_mountpoint(str(tmp_path / "file"))
    assert prepare_mountpoint(str(tmp_path)) == str(tmp_path)


def test_a_live_mount_is_refused():
    assert mount_fstype("/proc") == "proc"
    with pytest.raises(ConfigError, match="already mounted"):
        prepare_mountpoint("/proc")


def test_cli_rejects_conflicting_sources(capsys, tmp_path):
    assert cli.main(["mount", "--image", "oci:/x", "--bootstrap", "b", str(tmp_path)]) == 1
    assert "cannot be combined" in capsys.readouterr().err
    assert cli.main(["mount", "--blob-dir", "d", str(tmp_path)]) == 1
    assert "--blob-dir needs --bootstrap" in capsys.readouterr().err
    assert cli.main(["mount", str(tmp_path)]) == 1
    assert "name an image" in capsys.readouterr().err


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0 and "nydus-py" in capsys.readouterr().out


def test_readahead_is_set_only_after_the_init_reply_and_never_through_the_mount(monkeypatch):
    """The window is written once Operations.init has run (INIT's reply would cap it) and no
    stat of the mountpoint is made: one in flight makes an unmount right after mounting EBUSY."""
    import os

    import trio
    import trio.testing

    from nydus_py.daemon import mount as mount_mod

    calls: list[tuple] = []
    monkeypatch.setattr(mount_mod, "set_readahead", lambda mp, kb: calls.append(("set", mp, kb)))
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (
        calls.append(("stat", p)) if str(p) == "/m" else None) or real_stat(p, *a, **k))

    class Ops:
        def init(self):
            calls.append(("init",))

    async def main():
        ops = Ops()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mount_mod.tune_readahead_after_init, ops, "/m", 1024)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == []              # nothing before INIT
            ops.init()                      # what libfuse's do_init calls
            assert calls == [("init",)]     # the write waits for the worker to yield
    trio.run(main)
    assert calls == [("init",), ("set", "/m", 1024)]


@pytest.mark.parametrize("where", ["blob_dir", "image", "localfs"])
def test_image_manifest_that_cannot_apply_is_reported_not_ignored(where, tmp_path, caplog):
    """`learned_prefetch.image_manifest` names the image of a --bootstrap read from a registry
    backend; given to any other mount it is said to be ignored, in one log line."""
    from nydus_py.config import nydusd as nydusd_config
    from nydus_py.daemon.mount import _open_image
    from nydus_py.errors import NydusError
    from nydus_py.metrics import Metrics
    doc: dict = {"learned_prefetch": {"image_manifest": "sha256:" + "ab" * 32}}
    if where == "localfs":
        doc["device"] = {"backend": {"type": "localfs", "config": {"dir": str(tmp_path)}}}
    kw = {"image": f"oci:{tmp_path}/none"} if where == "image" else {"bootstrap": str(tmp_path / "none")}
    if where == "blob_dir":
        kw["blob_dir"] = str(tmp_path / "none")
    req = MountRequest(mountpoint=str(tmp_path / "mnt"), config=nydusd_config.parse(doc), **kw)
    with caplog.at_level("WARNING"), pytest.raises(NydusError):
        _open_image(req, Metrics())          # the files do not exist: it fails after the check
    lines = [r.getMessage() for r in caplog.records if "image_manifest" in r.getMessage()]
    assert len(lines) == 1 and "ignored" in lines[0], lines
