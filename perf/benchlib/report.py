"""Markdown table, target verdicts and matplotlib charts from a results dict."""

from __future__ import annotations

from pathlib import Path

from .readers import LATER_STARTS

MB = 1e6


def _f(x, nd=2, unit=""):
    if x is None:
        return "–"
    return f"{x:.{nd}f}{unit}"


def _ratio(a, b):
    return (a / b) if a and b else None


def tables(res: dict) -> tuple[str, list[tuple[str, str, bool | None]]]:
    md, targets = [], []
    sc = res["scenarios"]
    if "cold_start" in sc and "error" not in sc["cold_start"]:
        c = sc["cold_start"]
        md.append(f"### 1. Cold start: `{' '.join(c['command'])}` in `{c['image']}` "
                  f"(gzip image {c['image_gzip_bytes'] / MB:.1f} MB, converted {c['image_nydus_bytes'] / MB:.1f} MB)\n")
        md.append("| network | method | seconds | × nydus | speed-up vs skopeo+umoci | vs ctr pull+run | "
                  "fetched MB | % of gzip image | requests |")
        md.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for n in c["nets"]:
            med = n["median"]
            ny = med.get("nydus", {}).get("seconds")
            sk = med.get("skopeo_umoci", {}).get("seconds")
            ctr = med.get("containerd", {}).get("seconds")
            for k, name in (("nydus", "nydus-py, default conversion, no prefetch list"),
                            ("nydus_learned", "nydus-py, second host after one run anywhere (learned prefetch, no reconversion)"),
                            ("nydus_prefetch", "nydus-py, image reconverted with a recorded prefetch list"),
                            ("nydus_snapshotter", "nydus-py via containerd: our snapshotter (shared nydusd), "
                                                  "ctr-remote rpull + ctr run, default conversion"),
                            ("nydus_snapshotter_learned", "the same, learned prefetch (second host)"),
                            ("skopeo_umoci", "skopeo copy + umoci unpack"),
                            ("containerd", "ctr image pull + ctr run")):
                if k not in med:
                    continue
                m = med[k]
                md.append(f"| {n['net']} | {name} | {_f(m['seconds'])} | {_f(_ratio(m['seconds'], ny), 1, '×')} | "
                          f"{_f(_ratio(sk, m['seconds']), 1, '×')} | {_f(_ratio(ctr, m['seconds']), 1, '×')} | "
                          f"{_f(m['bytes'] / MB, 1)} | {_f(100 * m['bytes'] / c['image_gzip_bytes'], 1, '%')} | "
                          f"{m['requests']:.0f} |")
            if n.get("rate_mbit") == 100 and sk and ny:
                frac = med["nydus"]["bytes"] / c["image_gzip_bytes"]
                targets.append(("cold start ≥15× faster than skopeo+umoci (100 Mbit/s, 20 ms)", f"{sk / ny:.1f}×", sk / ny >= 15))
                if ctr:
                    targets.append(("cold start ≥15× faster than ctr pull+run (100 Mbit/s, 20 ms)", f"{ctr / ny:.1f}×",
                                    ctr / ny >= 15))
                targets.append(("cold start fetches ≤5% of the gzip image", f"{100 * frac:.1f}%", frac <= 0.05))
                sn = med.get("nydus_snapshotter", {}).get("seconds")
                if sn and ctr:
                    targets.append(("cold start through our containerd snapshotter ≥15× faster than ctr pull+run "
                                    "(100 Mbit/s, 20 ms)", f"{ctr / sn:.1f}×", ctr / sn >= 15))
                le = med.get("nydus_learned", {}).get("seconds")
                if le:
                    targets.append(("cold start on a second host, learned prefetch, ≥25× vs skopeo+umoci",
                                    f"{sk / le:.1f}×", sk / le >= 25))
        md.append("")
    if "conversion" in sc and "error" not in sc["conversion"]:
        md.append("### 2. Conversion (nydusify and eStargz: registry → registry on loopback; nydusify local: "
                  "OCI layout → OCI layout; mkfs.erofs: local rootfs dir → image file)\n")
        md.append("| image | gzip MB | nydusify s | out MB | nydusify local s | eStargz s (pull+convert+push) | "
                  "convert-only s | out MB | × nydusify | mkfs.erofs s | out MB | local / mkfs.erofs |")
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for im in sc["conversion"]["images"]:
            med = im["median"]
            ny, es, er = med.get("nydusify", {}), med.get("estargz", {}), med.get("mkfs_erofs", {})
            nl = med.get("nydusify_local", {})
            r = _ratio(es.get("seconds"), ny.get("seconds"))
            re_ = _ratio(nl.get("seconds"), er.get("seconds"))
            md.append(f"| {im['image']} | {im['gzip_bytes'] / MB:.1f} | {_f(ny.get('seconds'))} | "
                      f"{_f((ny.get('bytes') or 0) / MB, 1)} | {_f(nl.get('seconds'))} | {_f(es.get('seconds'))} | "
                      f"{_f(es.get('convert_s'))} | "
                      f"{_f((es.get('bytes') or 0) / MB, 1)} | {_f(r, 1, '×')} | {_f(er.get('seconds'))} | "
                      f"{_f((er.get('bytes') or 0) / MB, 1)} | {_f(re_, 2, '×')} |")
            if r is not None:
                targets.append((f"conversion of {im['image']} ≥12× faster than eStargz (registry → registry)",
                                f"{r:.1f}×", r >= 12))
            if re_ is not None:
                targets.append((f"conversion of {im['image']} ≤2× mkfs.erofs (both local)", f"{re_:.2f}×", re_ <= 2))
            if ny.get("bytes"):
                targets.append((f"converted {im['image']} ≤0.90× its gzip OCI image",
                                f"{ny['bytes'] / im['gzip_bytes']:.3f}×", ny["bytes"] <= 0.90 * im["gzip_bytes"]))
        md.append("")
    if "read_path" in sc and "error" not in sc["read_path"]:
        rp = sc["read_path"]
        med = rp["median"]
        md.append(f"### 3. Read path: `{rp['image']}`, {rp['files']} files, {rp['bytes'] / MB:.0f} MB "
                  f"(registry on loopback, unshaped)\n")
        md.append("| read every file once | nydus-py MB/s | native MB/s | nydus/native | ratarmount MB/s | nydus/ratarmount |")
        md.append("|---|---:|---:|---:|---:|---:|")
        for state, desc in (("cold", "cold (empty chunk cache)"), ("warm", "warm (chunk cache on disk, page cache dropped)"),
                            ("hot", "hot (page cache)")):
            ny = med.get("nydus", {}).get(state, {}).get("mb_s")
            na = med.get("native", {}).get(state, {}).get("mb_s")
            ra = med.get("ratarmount", {}).get(state, {}).get("mb_s")
            md.append(f"| {desc} | {_f(ny, 1)} | {_f(na, 1)} | {_f(_ratio(ny, na), 2, '×')} | {_f(ra, 1)} | "
                      f"{_f(_ratio(ny, ra), 2, '×')} |")
            if state in ("warm", "hot") and ny and na:
                want = 0.5 if state == "warm" else 0.9
                targets.append((f"{state} sequential ≥{want}× native", f"{ny / na:.2f}×", ny / na >= want))
            if state == "warm" and ny and ra:       # issue 10: ≥2× ratarmount warm
                targets.append(("warm sequential ≥2× ratarmount", f"{ny / ra:.2f}×", ny >= 2 * ra))
        md.append("")
        md.append(f"| random 4 KiB pread ({rp['samples']} samples) | nydus-py p50/p99 µs | native p50/p99 µs | "
                  f"ratarmount p50/p99 µs |")
        md.append("|---|---:|---:|---:|")
        for state in ("cold", "warm", "hot"):
            cells = []
            for k in ("nydus", "native", "ratarmount"):
                m = med.get(k, {}).get("rand_" + state)
                cells.append(f"{_f(m['p50_us'], 0)} / {_f(m['p99_us'], 0)}" if m else "–")
            md.append(f"| {state} | " + " | ".join(cells) + " |")
        md.append("")
        cn, cl = med.get("nydus", {}).get("conc_warm"), med.get("native", {}).get("conc_warm")
        if cn:
            md.append("| 32 concurrent readers, random 4 KiB pread, warm | p50 µs | p99 µs | "
                      "slowest reader's p99 µs | preads/s | slowest / fastest reader s |")
            md.append("|---|---:|---:|---:|---:|---:|")
            for name, m in (("nydus-py", cn), ("native", cl)):
                if m:
                    md.append(f"| {name} | {_f(m['p50_us'], 0)} | {_f(m['p99_us'], 0)} | "
                              f"{_f(m['worst_reader_p99_us'], 0)} | {_f(m['ops_s'], 0)} | "
                              f"{_f(m['slowest_reader_s'])} / {_f(m['fastest_reader_s'])} |")
            md.append("")
        sn, sl = med.get("nydus", {}).get("start"), med.get("native", {}).get("start")
        if sn and sl:
            cmd = " ".join(rp.get("cmd", []))
            md.append(f"| `{cmd}` in a chroot (warm chunk cache) | 1st start s | later starts s (median of {LATER_STARTS}) | later / native later |")
            md.append("|---|---:|---:|---:|")
            md.append(f"| nydus-py | {_f(sn['first_s'], 3)} | {_f(sn['second_s'], 3)} | "
                      f"{_f(_ratio(sn['second_s'], sl['second_s']), 2, '×')} |")
            md.append(f"| native | {_f(sl['first_s'], 3)} | {_f(sl['second_s'], 3)} | 1.00× |")
            md.append("")
            r = _ratio(sn["second_s"], sl["second_s"])
            if r:
                targets.append(("second start on the same mount ≤1.1× native", f"{r:.2f}×", r <= 1.1))
    if "metadata" in sc and "error" not in sc["metadata"]:
        md.append("### 4. Metadata (converted image in a local OCI layout; seconds)\n")
        md.append("| image | entries | mount-ready s | RSS ready MB | RSS after walks MB | find 1st | find 2nd | "
                  "native find 1st/2nd | ls -lR 1st | ls -lR 2nd | native ls -lR 1st/2nd |")
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for im in sc["metadata"]["images"]:
            ny, na = im["median"]["nydus"], im["median"]["native"]
            md.append(f"| {im['image']} | {im['entries']} | {_f(ny['mount_ready_s'])} | {_f(ny['rss_ready'] / 2**20, 0)} | "
                      f"{_f(ny['rss_after'] / 2**20, 0)} | {_f(ny['find_1'])} | {_f(ny['find_2'])} | "
                      f"{_f(na['find_1'])} / {_f(na['find_2'])} | {_f(ny['ls_lR_1'])} | {_f(ny['ls_lR_2'])} | "
                      f"{_f(na['ls_lR_1'])} / {_f(na['ls_lR_2'])} |")
            if im["entries"] >= 100_000:
                targets.append(("mount-ready ≤0.3 s (100k files)", f"{ny['mount_ready_s']:.2f} s", ny["mount_ready_s"] <= 0.3))
                rss = max(ny["rss_ready"], ny["rss_after"]) / 2**20
                targets.append(("daemon RSS ≤100 MB (100k files)", f"{rss:.0f} MB", rss <= 100))
        md.append("")
        served = [im for im in sc["metadata"]["images"] if "serve" in im]
        if served:
            md.append("| image | mount-ready standalone s (`nydusd mount`) | added to `nydusd serve` s "
                      "(fork server) | added to `nydusd serve` s (new interpreter) |")
            md.append("|---|---:|---:|---:|")
            for im in served:
                sv = im["serve"]
                md.append(f"| {im['image']} | {_f(im['median']['nydus']['mount_ready_s'])} | "
                          f"{_f(sv['forkserver']['mount_ready_s'])} | {_f(sv['exec']['mount_ready_s'])} |")
                if im["entries"] >= 100_000:
                    v = sv["forkserver"]["mount_ready_s"]
                    targets.append(("mount-ready added to serve ≤0.1 s (100k files)", f"{v:.2f} s", v <= 0.1))
            md.append("")
    if "storage" in sc and "error" not in sc["storage"]:
        st = sc["storage"]
        md.append("### 5. Storage (MB; \"stored\" counts each distinct blob once, as a registry does)\n")
        md.append("| format | " + " | ".join(st["images"]) + " | stored for all three |")
        md.append("|---|" + "---:|" * (len(st["images"]) + 1))
        for k, name in (("gzip_oci", "gzip OCI"), ("estargz", "eStargz"), ("nydus", "nydus-py"),
                        ("nydus_chunk_dict", "nydus-py, previous image as --chunk-dict")):
            v = st[k]
            if isinstance(v, dict):
                md.append(f"| {name} | " + " | ".join(_f(v.get(t, 0) / MB, 1) for t in st["images"]) +
                          f" | {_f(v['stored_total'] / MB, 1)} |")
            else:
                md.append(f"| {name} | {v} |")
        md.append("")
    ser = sc.get("storage", {}).get("series") if isinstance(sc.get("storage"), dict) else None
    if ser:
        from . import seriesrun
        md.append("### 5b. Realistic series (MB stored, each distinct blob once; perf/series.py)\n")
        md += seriesrun.table(ser)
        md.append("")
        g = ser["gzip_oci"]["stored"]
        if "nydus_prev_dict" in ser:
            r = ser["nydus_prev_dict"]["stored"] / g
            targets.append(("realistic series stored with --chunk-dict ≤0.6× the gzip OCI series", f"{r:.2f}×", r <= 0.6))
        if "cdc_prev_dict" in ser and "nydus_prev_dict" in ser:
            r = ser["cdc_prev_dict"]["stored"] / ser["nydus_prev_dict"]["stored"]
            targets.append(("--chunker cdc vs fixed chunks, series stored with --chunk-dict (report)", f"{r:.3f}×", None))
    errs = [f"- **{k}: failed** — {v['error']}" for k, v in sc.items() if isinstance(v, dict) and "error" in v]
    if errs:
        md += ["### Errors\n", *errs, ""]
    if targets:
        md.append("### Targets\n")
        md.append("| target | measured | |")
        md.append("|---|---:|---|")
        for name, val, ok in targets:
            md.append(f"| {name} | {val} | {'–' if ok is None else 'met' if ok else '**missed**'} |")
        md.append("")
    return "\n".join(md), targets


def charts(res: dict, outdir: Path, prefix: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sc = res["scenarios"]
    made = []

    def save(fig, name):
        p = outdir / f"{prefix}{name}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)

    c = sc.get("cold_start")
    if c and "error" not in c:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        methods = [("nydus", "nydus-py"), ("nydus_learned", "nydus-py, learned list"),
                   ("nydus_prefetch", "nydus-py + prefetch list"),
                   ("nydus_snapshotter", "nydus-py snapshotter"),
                   ("skopeo_umoci", "skopeo+umoci"), ("containerd", "containerd")]
        w = 0.8 / len(methods)
        for i, (k, name) in enumerate(methods):
            xs = [j + i * w for j in range(len(c["nets"]))]
            ys = [n["median"].get(k, {}).get("seconds") or 0 for n in c["nets"]]
            ax.bar(xs, ys, w, label=name)
        ax.set_xticks([j + w for j in range(len(c["nets"]))], [n["net"] for n in c["nets"]])
        ax.set_ylabel("seconds (median)")
        ax.set_title("Cold start to first command")
        ax.legend()
        save(fig, "cold_start")
    r = sc.get("read_path")
    if r and "error" not in r:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        states = ["cold", "warm", "hot"]
        kinds = [k for k in ("nydus", "native", "ratarmount") if k in r["median"]]
        w = 0.8 / max(1, len(kinds))
        for i, k in enumerate(kinds):
            ys = [r["median"][k].get(s, {}).get("mb_s") or 0 for s in states]
            ax.bar([j + i * w for j in range(3)], ys, w, label=k)
        ax.set_xticks([j + w for j in range(3)], states)
        ax.set_ylabel("MB/s, every file once (median)")
        ax.set_title(f"Read path: {r['image']}")
        ax.legend()
        save(fig, "read_path")
    cv = sc.get("conversion")
    if cv and "error" not in cv:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        kinds = [("nydusify", "nydusify"), ("nydusify_local", "nydusify (local)"), ("estargz", "ctr-remote --estargz"),
                 ("mkfs_erofs", "mkfs.erofs")]
        w = 0.8 / len(kinds)
        for i, (k, name) in enumerate(kinds):
            ys = [im["median"].get(k, {}).get("seconds") or 0 for im in cv["images"]]
            ax.bar([j + i * w for j in range(len(ys))], ys, w, label=name)
        ax.set_xticks([j + w for j in range(len(cv["images"]))], [im["image"] for im in cv["images"]])
        ax.set_ylabel("seconds (median)")
        ax.set_title("Conversion")
        ax.legend()
        save(fig, "conversion")
    md = sc.get("metadata")
    if md and "error" not in md:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels, ny, na = [], [], []
        for im in md["images"]:
            for m in ("find_1", "find_2", "ls_lR_1", "ls_lR_2"):
                labels.append(f"{im['image']}\n{m}")
                ny.append(im["median"]["nydus"][m])
                na.append(im["median"]["native"][m])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ny, 0.4, label="nydus-py")
        ax.bar([x + 0.2 for x in xs], na, 0.4, label="native")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("seconds (median)")
        ax.set_title("Metadata walks")
        ax.legend()
        save(fig, "metadata")
    return made
