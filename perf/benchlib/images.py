"""Benchmark images, built offline from the machine's apt mirror and cached in perf/.cache/.

    base         debootstrap --variant=minbase bookworm (one layer)
    python       base + python3 perl gcc libc6-dev        (second layer: the diff, whiteouts)
    python-curl  python + curl                            (third layer; storage scenario only)
    files100k    100,000 small files in 1,000 dirs (tests/fixtures/imagegen Layer)
    busybox      tests/fixtures/imagegen busybox_image (--quick)

Layers are PAX tars written by tarfile in sorted order, numeric owners, mtimes clamped to
SOURCE_DATE_EPOCH, gzip header mtime 0: the same rootfs trees give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tarfile
from pathlib import Path

from .util import CACHE, ROOT, log, proc_mounts, run

EPOCH = 1747699200            # 2025-05-20, the apt snapshot date on the bench machine
SUITE = "bookworm"
PYTHON_PKGS = ["python3", "perl", "gcc", "libc6-dev"]
# the usual Dockerfile idiom after an install; gives the second layer its whiteouts
SLIM = "rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/*"
EXTRA_PKG = "curl"
OCI = CACHE / "oci"           # one OCI layout holding every benchmark image (tags)

sys.path.insert(0, str(ROOT))


def apt_mirror() -> str:
    """First http(s) Debian URI of the machine's apt sources (deb822 or one-line)."""
    srcs = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for p in srcs:
        try:
            text = p.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("URIs:"):
                for u in line.split()[1:]:
                    if "debian" in u and "security" not in u:
                        return u
            elif line.startswith("deb ") and "debian" in line and "security" not in line:
                for tok in line.split()[1:]:
                    if tok.startswith("http"):
                        return tok
    return "http://deb.debian.org/debian"


# ---------------------------------------------------------------------------- rootfs trees

def rootfs(name: str) -> Path:
    return CACHE / "rootfs" / name


def build_rootfs() -> None:
    base = rootfs("base")
    if not base.exists():
        tmp = rootfs("base.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log.info("debootstrap --variant=minbase %s from %s", SUITE, apt_mirror())
        run(["debootstrap", "--variant=minbase", SUITE, tmp, apt_mirror()], timeout=3600)
        _apt_clean(tmp)
        tmp.rename(base)
    derive("base", "python", PYTHON_PKGS, slim=True)
    derive("python", "python-curl", [EXTRA_PKG], slim=False)


def derive(lower: str, upper: str, pkgs: list[str], *, slim: bool, one_at_a_time: bool = False) -> None:
    """rootfs `upper` = `lower` + apt packages `pkgs` (all in one install, or one install per
    package in the given order: another install order for the series rebuild), then SLIM."""
    dst = rootfs(upper)
    if dst.exists():
        return
    tmp = rootfs(upper + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run(["cp", "-a", rootfs(lower), tmp])
    log.info("installing %s into %s", " ".join(pkgs), upper)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    with proc_mounts(tmp):
        run(["chroot", tmp, "apt-get", "update"], env=env)
        for batch in ([p] for p in pkgs) if one_at_a_time else [pkgs]:
            run(["chroot", tmp, "apt-get", "install", "-y", "--no-install-recommends", *batch], env=env)
        if slim:
            run(["chroot", tmp, "sh", "-c", SLIM])
    _apt_clean(tmp)
    tmp.rename(dst)


def _apt_clean(root: Path) -> None:
    run(["chroot", root, "apt-get", "clean"])
    lists = root / "var/lib/apt/lists"
    for p in lists.glob("*"):
        if p.is_file():
            p.unlink()


# ---------------------------------------------------------------------------- layer tars

def _tarinfo(tf: tarfile.TarFile, path: Path, arcname: str) -> tarfile.TarInfo:
    ti = tf.gettarinfo(str(path), arcname)
    ti.uname = ti.gname = ""
    ti.mtime = min(int(ti.mtime), EPOCH)
    return ti


def _add(tf: tarfile.TarFile, path: Path, arcname: str) -> None:
    ti = _tarinfo(tf, path, arcname)
    if ti.isreg():
        with open(path, "rb") as f:
            tf.addfile(ti, f)
    else:
        tf.addfile(ti)


def _same(a: os.stat_result, b: os.stat_result, pa: Path, pb: Path) -> bool:
    if (stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode) or a.st_mode != b.st_mode
            or a.st_uid != b.st_uid or a.st_gid != b.st_gid or a.st_mtime_ns != b.st_mtime_ns):
        return False
    if stat.S_ISREG(a.st_mode):
        return a.st_size == b.st_size
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(pa) == os.readlink(pb)
    if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
        return a.st_rdev == b.st_rdev
    return True


def write_layer(upper: Path, lower: Path | None, out_tar: io.RawIOBase) -> dict:
    """Write the tar of `upper` (whole tree when lower is None, else the overlay diff against
    `lower`: new/changed entries plus their parent dirs, `.wh.` files for deletions)."""
    items: list[tuple[str, Path | None, bool]] = []     # (arcname, path or None=whiteout, is_dir)
    for dirpath, dirnames, filenames in os.walk(upper):
        dirnames.sort()
        d = Path(dirpath)
        rel = d.relative_to(upper)
        arcdir = "" if str(rel) == "." else str(rel) + "/"
        names = sorted(dirnames + filenames)
        lower_dir = (lower / rel) if lower is not None else None
        if arcdir:
            items.append((arcdir.rstrip("/"), d, True))
        if lower_dir is not None and lower_dir.is_dir() and not lower_dir.is_symlink():
            for n in sorted(set(os.listdir(lower_dir)) - set(names)):
                items.append((arcdir + ".wh." + n, None, False))
        for n in names:
            p = d / n
            if n in dirnames and not p.is_symlink():
                continue                      # its own entry is added when walked
            items.append((arcdir + n, p, False))
    if lower is not None:
        keep: set[str] = set()
        for arc, p, is_dir in items:
            changed = True
            if p is not None:
                try:
                    lp = lower / arc
                    changed = not _same(os.lstat(p), os.lstat(lp), p, lp)
                except FileNotFoundError:
                    pass
            if changed:
                keep.add(arc)
                parts = arc.split("/")
                for i in range(1, len(parts)):
                    keep.add("/".join(parts[:i]))
        items = [it for it in items if it[0] in keep]
    counts = {"entries": 0, "whiteouts": 0}
    with tarfile.open(fileobj=out_tar, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for arc, p, _ in items:
            if p is None:
                ti = tarfile.TarInfo(arc)
                ti.mtime, ti.mode = EPOCH, 0o644
                tf.addfile(ti)
                counts["whiteouts"] += 1
            else:
                _add(tf, p, arc)
                counts["entries"] += 1
    return counts


class _HashWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)


def gzip_layer(name: str, upper: Path, lower: Path | None) -> dict:
    """CACHE/layers/NAME.tar.gz (+ .json with digest, diff_id, sizes); cached."""
    d = CACHE / "layers"
    d.mkdir(parents=True, exist_ok=True)
    meta_path = d / f"{name}.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    log.info("writing layer %s", name)
    tmp = d / f"{name}.tar.gz.tmp"
    with open(tmp, "wb") as f:
        outer = _HashWriter(f)
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=outer, compresslevel=6, mtime=0)
        inner = _HashWriter(gz)
        counts = write_layer(upper, lower, inner)
        gz.close()
    tmp.rename(d / f"{name}.tar.gz")
    meta = {"path": str(d / f"{name}.tar.gz"), "digest": "sha256:" + outer.h.hexdigest(),
            "size": outer.n, "diff_id": "sha256:" + inner.h.hexdigest(), "tar_size": inner.n, **counts}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def flat_tar(name: str) -> Path:
    """Uncompressed tar of the whole merged rootfs (ratarmount's input)."""
    out = CACHE / "layers" / f"{name}-flat.tar"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            write_layer(rootfs(name), None, f)
        tmp.rename(out)
    return out


# ---------------------------------------------------------------------------- OCI layout

def _write_image(tag: str, layers: list[dict], cmd: list[str]) -> None:
    from nydus_py.oci import mediatypes as mt
    from nydus_py.oci.layout import Descriptor, OCILayoutWriter
    w = OCILayoutWriter(OCI)
    descs = []
    for lay in layers:
        blob = OCI / "blobs" / "sha256" / lay["digest"].split(":", 1)[1]
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(lay["path"], blob)
        descs.append(Descriptor(mt.OCI_LAYER_GZIP, lay["digest"], lay["size"]))
    created = "2025-05-20T00:00:00Z"
    cfg = {"created": created, "architecture": "amd64", "os": "linux",
           "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                      "Cmd": cmd},
           "rootfs": {"type": "layers", "diff_ids": [lay["diff_id"] for lay in layers]},
           "history": [{"created": created, "created_by": f"perf layer {i}"} for i in range(len(layers))]}
    cdesc = w.put_json(cfg, mt.OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": cdesc.to_json(),
                "layers": [d.to_json() for d in descs]}
    m = w.put_json(manifest, mt.OCI_MANIFEST)
    w.tag(Descriptor(m.media_type, m.digest, m.size), tag)


def build_debian_images() -> dict:
    """Tags base, python, python-curl in OCI; returns layer metadata per tag."""
    build_rootfs()
    lb = gzip_layer("base", rootfs("base"), None)
    lp = gzip_layer("python", rootfs("python"), rootfs("base"))
    lc = gzip_layer("curl", rootfs("python-curl"), rootfs("python"))
    stamp = OCI / ".perf-debian"
    images = {"base": [lb], "python": [lb, lp], "python-curl": [lb, lp, lc]}
    if not stamp.exists():
        for tag, lays in images.items():
            _write_image(tag, lays, ["/bin/bash"])
        stamp.write_text("ok\n")
    return images


def build_generated(tag: str, kind: str, n_files: int = 100_000) -> None:
    """files100k (n_files small files in dirs of 100) or busybox, into OCI (cached by tag)."""
    stamp = OCI / f".perf-{tag}"
    if stamp.exists():
        return
    from tests.fixtures import imagegen
    if kind == "files":
        layer = imagegen.Layer(compression="gzip", level=1)
        per_dir = 100
        for d in range(n_files // per_dir):
            layer.dir(f"d{d:04d}")
            for i in range(per_dir):
                layer.file(f"d{d:04d}/f{i:03d}", f"file {d}/{i}\n".encode() * (1 + i % 8))
        img = imagegen.Image([layer])
    else:
        img = imagegen.busybox_image(extra_budget=8 << 20)
    img.write_oci(OCI, tag)
    stamp.write_text("ok\n")
