#!/usr/bin/env python3
"""Storage on the realistic dedup series (perf/benchlib/series.py): bytes a registry stores for
series-1..4 as gzip OCI and as nydus-py without / with chunk dictionaries, plus the chunk-level
dedup of fixed-size vs content-defined chunking (offline: unique uncompressed bytes).

    sudo .venv/bin/python perf/series.py [--skip-cdc] [--only MODES] [--work DIR] [--json FILE]
                                                           → perf/results/series.json + a table

Modes: gzip (always), estargz, plain / prev / all (fixed-size chunks: no dictionary, the
previous image, every earlier image as --chunk-dict), cdc-plain / cdc-prev / cdc-all (the same
with `--chunker cdc`, real format-v3 conversions), cdc (the offline pyfastcdc file-by-file
analysis).

"Stored" counts each distinct blob once (layer digest), as a registry does; nydus-py counts its
bootstraps too. Conversions are OCI layout → OCI layout (no registry), one at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import images, series                      # noqa: E402
from benchlib.util import CACHE, ROOT, log                 # noqa: E402

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
    from benchlib.net import Registry
    from benchlib.nydus import registry_manifest
    from benchlib.scenarios import _ctr_env
    from benchlib.util import run
    per, lays, secs = {}, [], {}
    with Registry(work / "estargz-registry") as reg, _ctr_env() as env:
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-cdc", action="store_true")
    ap.add_argument("--only", default="gzip,estargz,plain,prev,all,cdc-plain,cdc-prev,cdc-all,cdc")
    ap.add_argument("--work", type=Path, default=CACHE / "series-out", help="scratch dir (emptied first)")
    ap.add_argument("--json", type=Path, default=ROOT / "perf/results/series.json",
                    help="raw numbers (a partial run keeps the other rows of this file)")
    a = ap.parse_args()
    only = a.only.split(",")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    layers = series.build_series()
    res: dict = {"images": series.TAGS}
    res["gzip_oci"] = {"per_image": {t: sum(l["size"] for l in layers[t]) for t in series.TAGS},
                       "stored": stored([[{"digest": l["digest"], "size": l["size"]} for l in layers[t]]
                                         for t in series.TAGS])}
    work = a.work
    subprocess.run(["rm", "-rf", str(work)], check=True)
    if "estargz" in only:
        res["estargz"] = estargz_mode(work)

    def prev(i, d):
        return [f"oci:{d / series.TAGS[i - 1]}:{series.TAGS[i - 1]}"] if i else []

    def every(i, d):
        return [f"oci:{d / t}:{t}" for t in reversed(series.TAGS[:i])]

    cdc = ("--chunker", "cdc")
    for mode, key, dict_of, extra in (
            ("plain", "nydus", lambda i, d: [], ()), ("prev", "nydus_prev_dict", prev, ()),
            ("all", "nydus_all_dicts", every, ()),
            ("cdc-plain", "cdc", lambda i, d: [], cdc), ("cdc-prev", "cdc_prev_dict", prev, cdc),
            ("cdc-all", "cdc_all_dicts", every, cdc)):
        if mode in only:
            res[key] = nydus_mode(mode, work, dict_of, extra)
    if "cdc" in only and not a.skip_cdc:
        res["chunking_unique_bytes"] = cdc_analysis(1 << 20)
    out = a.json
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():       # a partial run (--only) keeps the other rows of the last one
        res = {**json.loads(out.read_text()), **res}
    out.write_text(json.dumps(res, indent=1))
    g = res["gzip_oci"]["stored"]
    print("| format | " + " | ".join(series.TAGS) + " | stored for all four | × gzip |")
    print("|---|" + "---:|" * (len(series.TAGS) + 2))
    for key, label in [("gzip_oci", "gzip OCI (layers deduped by digest)"),
                       ("estargz", "eStargz (ctr-remote; layers deduped by digest)"), ("nydus", "nydus-py"),
                       ("nydus_prev_dict", "nydus-py, previous image as --chunk-dict"),
                       ("nydus_all_dicts", "nydus-py, every earlier image as --chunk-dict"),
                       ("cdc", "nydus-py --chunker cdc"),
                       ("cdc_prev_dict", "nydus-py --chunker cdc, previous image as --chunk-dict"),
                       ("cdc_all_dicts", "nydus-py --chunker cdc, every earlier image as --chunk-dict")]:
        if key in res:
            r = res[key]
            print(f"| {label} | " + " | ".join(f"{r['per_image'][t] / MB:.1f}" for t in series.TAGS)
                  + f" | {r['stored'] / MB:.1f} | {r['stored'] / g:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
