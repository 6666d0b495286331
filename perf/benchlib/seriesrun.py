"""The realistic dedup series' storage measurements (see perf/series.py for the modes), shared by
perf/series.py and perf/run's storage scenario."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from . import images, series
from .util import ROOT, log

NYDUSIFY = [sys.executable, "-m", "converter.cli", "convert", "--quiet"]
MB = 1e6


def manifest_layers(layout: Path, tag: str) -> list[dict]:
    idx = json.loads((layout / "index.json").read_bytes())
    d = next(m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    m = json.loads((layout / "blobs/sha256" / d["digest"].split(":")[1]).read_bytes())
    return m["layers"]


def convert(tag: str, out: Path, dicts: list[str], extra: tuple[str, ...] = ()) -> float:
    args = [*NYDUSIFY, "--source", f"oci:{images.OCI}:{tag}", "--target", f"oci:{out}:{tag}", *extra]
    for d in dicts:
        args += ["--chunk-dict", d]
    t0 = time.monotonic()
    subprocess.run(args, check=True, cwd=ROOT)
    return time.monotonic() - t0


def stored(layers_per_image: list[list[dict]]) -> int:
    seen = {}
    for lays in layers_per_image:
        for l in lays:
            seen[l["digest"]] = l["size"]
    return sum(seen.values())


def nydus_mode(name: str, work: Path, dict_of, extra: tuple[str, ...] = ()) -> dict:
    per, lays, secs = {}, [], {}
    for i, tag in enumerate(series.TAGS):
        out = work / name / tag
        secs[tag] = round(convert(tag, out, dict_of(i, work / name), extra), 2)
        ls = manifest_layers(out, tag)
        lays.append(ls)
        per[tag] = sum(l["size"] for l in ls)
        log.info("%s %s: %.1f MB image, %.1f s", name, tag, per[tag] / MB, secs[tag])
    return {"per_image": per, "stored": stored(lays), "seconds": secs}


def estargz_mode(work: Path) -> dict:
    """eStargz, as perf/run's conversion scenario makes it: each series image pushed to a
    loopback registry, then `ctr-remote image convert --estargz --oci` through containerd and
    pushed back; stored = each distinct eStargz layer blob once (what the registry keeps)."""
    from .net import Registry
    from .nydus import registry_manifest
    from .util import ctr_env, run
    per, lays, secs = {}, [], {}
    with Registry(work / "estargz-registry") as reg, ctr_env() as env:
        env.start_containerd()
        for tag in series.TAGS:
            src, dst = f"{reg.host}/series/{tag}:oci", f"{reg.host}/series/{tag}:esgz"
            run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{images.OCI}:{tag}",
                 f"docker://{src}"])
            env.ctr("image", "pull", "--plain-http", src, timeout=1200)
            t0 = time.monotonic()
            env.ctr_remote("image", "convert", "--estargz", "--oci", src, dst, timeout=3600)
            secs[tag] = round(time.monotonic() - t0, 2)
            env.ctr("image", "push", "--plain-http", dst, timeout=1200)
            ls = registry_manifest(reg.host, f"series/{tag}", "esgz")["layers"]
            lays.append(ls)
            per[tag] = sum(int(l["size"]) for l in ls)
            log.info("estargz %s: %.1f MB image, convert %.1f s", tag, per[tag] / MB, secs[tag])
    return {"per_image": per, "stored": stored(lays), "convert_seconds": secs}


def file_datas(tag: str):
    """Regular-file contents of the image's layers (each layer's files; a file changed in an
    upper layer is in both, as in the blobs)."""
    for l in series.build_series()[tag]:
        with tarfile.open(l["path"], "r:gz") as tf:
            for m in tf:
                if m.isreg() and m.size:
                    yield tf.extractfile(m).read()


def cdc_analysis(chunk_size: int) -> dict:
    from pyfastcdc import FastCDC
    cdcs = {"cdc-avg1M": FastCDC(1 << 20, min_size=256 << 10, max_size=4 << 20),
            "cdc-avg64K": FastCDC(64 << 10, min_size=16 << 10, max_size=256 << 10)}
    seen: dict[str, set] = {"fixed": set(), **{k: set() for k in cdcs}}
    unique = {k: 0 for k in seen}
    total = 0
    out = {}
    for tag in series.TAGS:
        for data in file_datas(tag):
            total += len(data)
            pieces = {"fixed": [data[o:o + chunk_size] for o in range(0, len(data), chunk_size)]}
            for k, c in cdcs.items():
                pieces[k] = [bytes(ch.data) for ch in c.cut_buf(data)]
            for k, ps in pieces.items():
                for p in ps:
                    d = hashlib.sha256(p).digest()
                    if d not in seen[k]:
                        seen[k].add(d)
                        unique[k] += len(p)
        out[tag] = {"file_bytes_so_far": total, **{k: v for k, v in unique.items()}}
        log.info("cdc %s: %s", tag, out[tag])
    return out


def prev(i: int, d: Path) -> list[str]:
    return [f"oci:{d / series.TAGS[i - 1]}:{series.TAGS[i - 1]}"] if i else []


def every(i: int, d: Path) -> list[str]:
    return [f"oci:{d / t}:{t}" for t in reversed(series.TAGS[:i])]


_CDC = ("--chunker", "cdc")
# mode name -> (result key, dictionaries of image i, extra convert flags, table label)
NYDUS_MODES = {
    "plain": ("nydus", lambda i, d: [], (), "nydus-py"),
    "prev": ("nydus_prev_dict", prev, (), "nydus-py, previous image as --chunk-dict"),
    "all": ("nydus_all_dicts", every, (), "nydus-py, every earlier image as --chunk-dict"),
    "cdc-plain": ("cdc", lambda i, d: [], _CDC, "nydus-py --chunker cdc"),
    "cdc-prev": ("cdc_prev_dict", prev, _CDC, "nydus-py --chunker cdc, previous image as --chunk-dict"),
    "cdc-all": ("cdc_all_dicts", every, _CDC, "nydus-py --chunker cdc, every earlier image as --chunk-dict"),
}
LABELS = [("gzip_oci", "gzip OCI (layers deduped by digest)"),
          ("estargz", "eStargz (ctr-remote; layers deduped by digest)"),
          *[(key, label) for key, _, _, label in NYDUS_MODES.values()]]


def run(only: list[str], work: Path) -> dict:
    """Every mode in `only` (gzip always); `work` is emptied first."""
    layers = series.build_series()
    res: dict = {"images": series.TAGS}
    res["gzip_oci"] = {"per_image": {t: sum(l["size"] for l in layers[t]) for t in series.TAGS},
                       "stored": stored([[{"digest": l["digest"], "size": l["size"]} for l in layers[t]]
                                         for t in series.TAGS])}
    subprocess.run(["rm", "-rf", str(work)], check=True)
    if "estargz" in only:
        res["estargz"] = estargz_mode(work)
    for mode, (key, dict_of, extra, _) in NYDUS_MODES.items():
        if mode in only:
            res[key] = nydus_mode(mode, work, dict_of, extra)
    if "cdc" in only:
        res["chunking_unique_bytes"] = cdc_analysis(1 << 20)
    return res


def table(res: dict) -> list[str]:
    g = res["gzip_oci"]["stored"]
    md = ["| format | " + " | ".join(series.TAGS) + " | stored for all four | × gzip |",
          "|---|" + "---:|" * (len(series.TAGS) + 2)]
    for key, label in LABELS:
        r = res.get(key)
        if isinstance(r, dict) and "stored" in r:
            md.append(f"| {label} | " + " | ".join(f"{r['per_image'][t] / MB:.1f}" for t in series.TAGS)
                      + f" | {r['stored'] / MB:.1f} | {r['stored'] / g:.2f}× |")
    return md
