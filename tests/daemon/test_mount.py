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
