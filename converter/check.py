"""`nydusify check`: unpack the source the OCI way (umoci), mount the target with nydusd, and
compare the two trees field by field (converter.compare)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from converter.compare import compare_trees
from converter.sources import parse_source
from nydus_py import mountinfo
from nydus_py.errors import ConfigError, InputError, NydusError

MOUNT_TIMEOUT = 60.0


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        raise InputError(f"{what} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")


def reference_unpack(source: str, dest: Path, platform: str | None = None, *,
                     tls_verify: bool = True) -> tuple[Path, frozenset[bytes]]:
    """skopeo normalizes any source (docker-archive, index, zstd) into a gzip OCI layout that
    umoci 0.4 can read; umoci unpacks it. Returns the rootfs and the directories whose mtime
    umoci set to "now" (implicit parents), which a comparison must not hold against us."""
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise ConfigError(f"nydusify check needs {tool} (apt-get install {tool})")
    ref = parse_source(source)
    layout = dest / "oci"
    cmd = ["skopeo", "--insecure-policy"]
    if platform:
        parts = platform.split("/")
        cmd += ["--override-os", parts[0], "--override-arch", parts[1]]
        if len(parts) > 2:
            cmd += ["--override-variant", parts[2]]
    src = f"oci:{ref.path}" + (f":{ref.reference}" if ref.reference else "") if ref.transport == "oci" else source
    if ref.transport == "docker":
        src = f"docker://{ref.path}"
    copy_opts = [] if tls_verify or ref.transport != "docker" else ["--src-tls-verify=false"]
    cmd += ["copy", "--quiet", *copy_opts, "--dest-compress-format", "gzip", "--dest-compress", src,
            f"oci:{layout}:src"]
    _run(cmd, "skopeo copy of the source")
    start = time.time_ns() - 1_000_000_000
    _run(["umoci", "--log", "error", "unpack", "--image", f"{layout}:src", str(dest / "bundle")],
         "umoci unpack of the source")
    rootfs = dest / "bundle" / "rootfs"
    return rootfs, volatile_mtimes(rootfs, start)


def volatile_mtimes(rootfs: Path, since_ns: int) -> frozenset[bytes]:
    """Directories (relative bytes paths, b"" = root) whose mtime umoci set to the unpack
    time: implicit parent dirs, and the declared ancestor whose mtime their creation bumped."""
    root = os.fsencode(rootfs)
    out = set()
    for dirpath, _, _ in os.walk(root):
        if os.lstat(dirpath).st_mtime_ns >= since_ns:
            rel = os.path.relpath(dirpath, root)
            out.add(b"" if rel == b"." else rel)
    return frozenset(out)


class Mounted:
    """`nydusd mount` of a converted image as a child process, for the duration of a check."""

    def __init__(self, target: str, mountpoint: Path, cache_dir: Path, *, plain_http: bool = False,
                 insecure: bool = False):
        self.cmd = [sys.executable, "-m", "nydus_py.daemon.cli", "mount", "--image", target,
                    "--cache-dir", str(cache_dir), *(["--plain-http"] if plain_http else []),
                    *(["--insecure"] if insecure else []), str(mountpoint)]
        self.mountpoint = mountpoint
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Path:
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True, errors="replace")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else "").strip().splitlines()
                raise InputError(f"nydusd could not mount the target: {err[-1] if err else self.proc.returncode}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise InputError(f"nydusd did not mount the target within {MOUNT_TIMEOUT:.0f}s")
            time.sleep(0.05)
        return self.mountpoint

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mountinfo.is_mounted(self.mountpoint):
            mountinfo.lazy_unmount(self.mountpoint)


def check(source: str | None, target: str, *, platform: str | None = None, work_dir: str | None = None,
          plain_http: bool = False, insecure: bool = False) -> list[str]:
    """The differences between `source` unpacked the OCI way and `target` mounted; `source`
    None: the image the target's manifest names as its `subject` (where the conversion put it)."""
    tref = parse_source(target)
    if tref.transport not in ("oci", "docker"):
        raise ConfigError(f"check target {target}: use oci:DIR[:TAG] or a registry reference")
    if source is None:
        source = subject_source(target, plain_http=plain_http, insecure=insecure)
    image = target if tref.transport == "oci" else tref.path
    tmp = Path(tempfile.mkdtemp(prefix="nydusify-check-", dir=work_dir))
    try:
        rootfs, volatile = reference_unpack(source, tmp, platform,
                                            tls_verify=not (plain_http or insecure))
        mnt = tmp / "mnt"
        mnt.mkdir()
        with Mounted(image, mnt, tmp / "cache", plain_http=plain_http, insecure=insecure) as mounted:
            return compare_trees(rootfs, mounted, ignore_mtime=volatile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def subject_source(target: str, *, plain_http: bool = False, insecure: bool = False) -> str:
    """The source of a converted image, from its manifest's `subject`: the same OCI layout (a
    tag naming that manifest) or the same repository (by digest)."""
    from nydus_py.oci.layout import OCILayout, json_object
    tref = parse_source(target)
    if tref.transport == "oci":
        from nydus_py.image_source import layout_manifest
        layout = OCILayout(Path(tref.path))
        manifest = layout_manifest(layout, layout.resolve(tref.reference), target)
        digest = _subject(manifest, target)
        for e in layout.index().get("manifests") or []:
            tag = (e.get("annotations") or {}).get("org.opencontainers.image.ref.name")
            if isinstance(e, dict) and e.get("digest") == digest and tag:
                return f"oci:{tref.path}:{tag}"
        raise ConfigError(f"{target}: its source {digest} has no tag in {tref.path}; give --source")
    from nydus_py.image_source import converted_entry
    from nydus_py.oci import mediatypes as mt
    from nydus_py.oci.reference import parse as parse_reference
    from nydus_py.oci.registry import RegistryClient, RegistryConfig
    r = parse_reference(tref.path)
    config = RegistryConfig.for_reference(r, scheme="http" if plain_http else "https", skip_verify=insecure)
    with RegistryClient(config=config) as client:
        data, media_type, _ = client.get_manifest(r.repository, r.ref or "latest")
        if media_type in mt.INDEX_TYPES:
            entry = converted_entry(json_object(data, target), target)
            data, _, _ = client.get_manifest(r.repository, entry.digest)
        digest = _subject(json_object(data, target), target)
        try:
            client.get_manifest(r.repository, digest)
        except NydusError:
            raise ConfigError(f"{target}: its source {digest} is not in {r.host}/{r.repository}; "
                              f"give --source") from None
    return f"{r.host}/{r.repository}@{digest}"


def _subject(manifest: dict, what: str) -> str:
    subject = manifest.get("subject")
    if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
        raise ConfigError(f"{what}: the manifest names no source (`subject`); give --source")
    return subject["digest"]
