"""Directories the daemon keeps files in (chunk cache, supervisor state), opened safely.

The daemon runs as root, and a cache or state directory may sit on a host shared with
unprivileged users. So:

  - every file in such a directory is opened relative to the directory's fd with O_NOFOLLOW
    (and O_CLOEXEC): a symlink planted under one of our names is an error, never followed, so
    root cannot be made to truncate or write some other file; renaming a component of the path
    after we opened it changes nothing either, since we never look the path up again;
  - directories and files are created with explicit modes (0700 / 0600 by default) whatever
    the umask: a directory we create is fchmod'ed after mkdir, files are created 0600 (which a
    umask can only narrow);
  - as root, a directory that a non-root user owns or can write to (other-writable, or
    group-writable by a group other than root) is refused with one line naming it, whether we
    created it (another user may have won the race to create it) or it was given to us.

The existing part of the given path is resolved once (the admin may point at a symlinked
location such as /var/run); then every component of the resolved path is walked with
O_NOFOLLOW, and as root each ancestor must be root's and not writable by other users unless it
is sticky (/tmp): otherwise a user could rename our directory away and put a link in its place.
"""

from __future__ import annotations

import errno
import os
import stat

from nydus_py.errors import ConfigError

DIR_MODE = 0o700
FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def unsafe_reason(st: os.stat_result) -> str | None:
    """Why a directory is not safe for a root daemon to keep its files in, or None."""
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH:
        return f"writable by every user (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_dir_fd(fd: int, path: str, what: str) -> None:
    """As root: ConfigError if the directory open as `fd` is not safe (see module docstring)."""
    if os.geteuid() != 0:
        return
    reason = unsafe_reason(os.fstat(fd))
    if reason:
        raise ConfigError(f"{path}: refusing {what}: {reason} (a non-root user could plant "
                          "files in it; use a directory only root can write to)")


def _check_ancestor(fd: int, where: str, what: str) -> None:
    if os.geteuid() != 0:
        return
    st = os.fstat(fd)
    reason = unsafe_reason(st)
    if reason and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
        raise ConfigError(f"{where}: refusing {what} below it: {reason}")


def _walk(real: str, what: str, *, below: bool) -> int:
    """Opens the resolved path `real` one component at a time with O_NOFOLLOW; as root, each
    ancestor must be root's and not writable by others unless sticky (like /tmp), so no
    other user can rename or replace what lies below it."""
    fd = os.open("/", _DIR_FLAGS)
    where = "/"
    try:
        for name in [c for c in real.split("/") if c]:
            _check_ancestor(fd, where, what)
            where = os.path.join(where, name)
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise ConfigError(f"{where}: cannot open {what} ({e.strerror})") from None
            os.close(fd)
            fd = sub
        if below:       # we create directories inside it
            _check_ancestor(fd, where, what)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_dir(path: str | os.PathLike, *, what: str = "cache directory", mode: int = DIR_MODE,
             create: bool = True) -> int:
    """Opens directory `path` (creating missing components with `mode`) and returns its fd.
    Raises ConfigError (one line naming the path) when it cannot be used; see module docstring."""
    path = os.path.abspath(os.fspath(path))
    existing = path
    missing: list[str] = []
    while not os.path.isdir(existing):
        if os.path.lexists(existing) and not os.path.isdir(existing):
            raise ConfigError(f"{existing}: not a directory (for {what} {path})")
        if not create:
            raise ConfigError(f"{path}: no such {what}")
        existing, name = os.path.split(existing)
        missing.insert(0, name)
    fd = _walk(os.path.realpath(existing), what, below=bool(missing))
    try:
        where = existing
        for name in missing:
            where = os.path.join(where, name)
            try:
                os.mkdir(name, mode, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                reason = "a symlink or not a directory" if e.errno in (errno.ELOOP, errno.ENOTDIR) \
                    else e.strerror
                raise ConfigError(f"{where}: cannot open {what} ({reason})") from None
            os.close(fd)
            fd = sub
            if created:
                os.fchmod(fd, mode)         # mkdir's mode went through the umask
            check_dir_fd(fd, where, what)
        if not missing:
            check_dir_fd(fd, path, what)
        return fd
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"{path}: cannot create {what} ({e.strerror})") from None
    except BaseException:
        os.close(fd)
        raise


def ensure_dir(path: str | os.PathLike, *, what: str = "cache directory",
               mode: int = DIR_MODE) -> str:
    """`open_dir` for callers that only need the directory to exist and be safe."""
    os.close(open_dir(path, what=what, mode=mode))
    return os.fspath(path)


def open_file(name: str, flags: int, dir_fd: int, mode: int = FILE_MODE) -> int:
    """os.open of `name` (one component) inside `dir_fd`, never following a symlink."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    return os.open(name, flags | FILE_FLAGS, mode, dir_fd=dir_fd)
