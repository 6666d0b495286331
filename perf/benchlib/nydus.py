"""Driving our own tools: convert, mount (daemonized, pid known), unmount."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import requests

from nydus_py import pidwait

from .util import VENV_BIN, rss_bytes, run, umount_all_under

NYDUSIFY = VENV_BIN / "nydusify"
NYDUSD = VENV_BIN / "nydusd"
_HELP: str | None = None


def _mount_help() -> str:
    global _HELP
    if _HELP is None:
        _HELP = run([NYDUSD, "mount", "--help"], capture=True).stdout.decode()
    return _HELP


def has_chunk_dict() -> bool:
    return "--chunk-dict" in run([NYDUSIFY, "convert", "--help"], capture=True).stdout.decode()


def has_registry_image() -> bool:
    """`nydusd mount --image HOST/REPO:TAG --plain-http` (landing while this was written)."""
    return "--plain-http" in _mount_help()


def convert(source: str, target: str, work: Path, extra: tuple = ()) -> float:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run([NYDUSIFY, "convert", "--quiet", "--plain-http", "--work-dir", work, "--source", source,
         "--target", target, *extra])
    return time.perf_counter() - t0


def registry_manifest(host: str, repo: str, tag: str) -> dict:
    r = requests.get(f"http://{host}/v2/{repo}/manifests/{tag}", timeout=60, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json"})
    r.raise_for_status()
    return r.json()


class Mount:
    """A daemonized nydusd mount; `ready_s` is the wall time from exec to mount-ready."""

    def __init__(self, mountpoint: Path, work: Path, *, image: str | None = None,
                 registry: tuple[str, str, str] | None = None, cache_dir: Path | None = None,
                 extra: tuple = ()):
        self.mp, self.work = Path(mountpoint), Path(work)
        self.image, self.registry = image, registry     # registry: (host, repo, tag)
        self.cache_dir = cache_dir
        self.extra = tuple(extra)
        self.pid: int | None = None
        self.ready_s = 0.0
        self.bootstrap_s = 0.0

    def __enter__(self) -> "Mount":
        self.mp.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        pidf = self.work / "nydusd.pid"
        pidf.unlink(missing_ok=True)
        argv = [NYDUSD, "mount", "--daemon", "--pid-file", pidf, "--log-file", self.work / "nydusd.log",
                "--log-level", "warn"]
        if self.cache_dir:
            argv += ["--cache-dir", self.cache_dir]
        argv += list(self.extra)
        t0 = time.perf_counter()
        if self.image:
            argv += ["--image", self.image]
        else:
            host, repo, tag = self.registry
            if has_registry_image():
                argv += ["--image", f"{host}/{repo}:{tag}", "--plain-http"]
            else:   # fetch the bootstrap ourselves (timed: it is part of "from nothing local")
                argv += self._fetch_bootstrap(host, repo, tag)
        self.bootstrap_s = time.perf_counter() - t0
        run([*argv, self.mp], timeout=300)
        self.ready_s = time.perf_counter() - t0
        for _ in range(50):
            if pidf.exists() and pidf.read_text().strip():
                self.pid = int(pidf.read_text().strip())
                break
            time.sleep(0.01)
        return self

    def _fetch_bootstrap(self, host: str, repo: str, tag: str) -> list:
        import zstandard  # noqa: F401  (bootstrap file is the layer blob as stored)
        m = registry_manifest(host, repo, tag)
        boot = m["layers"][-1]
        r = requests.get(f"http://{host}/v2/{repo}/blobs/{boot['digest']}", timeout=300)
        r.raise_for_status()
        bf = self.work / "bootstrap"
        bf.write_bytes(r.content)
        cfg = {"device": {"backend": {"type": "registry", "config": {"host": host, "repo": repo,
                                                                      "scheme": "http"}}}}
        cf = self.work / "nydusd.json"
        cf.write_text(json.dumps(cfg))
        return ["--bootstrap", bf, "--config", cf]

    def rss(self) -> int | None:
        return rss_bytes(self.pid) if self.pid else None

    def __exit__(self, *exc) -> None:
        # until the daemon has exited, not until init has reaped it (nydus_py/pidwait.py: this
        # VM's init takes 1.5 s more, which `unmount_s` counted until 2026-12)
        if self.pid and not pidwait.stop(self.pid, 5):
            pidwait.stop(self.pid, 0, signal.SIGKILL)
        if str(self.mp) in {line.split()[4] for line in open("/proc/self/mountinfo")}:
            subprocess.run(["umount", "-l", str(self.mp)], stderr=subprocess.DEVNULL)
        umount_all_under(self.mp)
