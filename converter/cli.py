"""`nydusify`: convert OCI images to nydus-py images, check, mount and copy them.

Flag names are nydusify's where the meaning carries over (docs/cli.md has the table); a
nydusify flag without a meaning here is refused with one line saying why, never ignored.
`SOURCE` and `TARGET` in the environment stand for --source/--target, as in nydusify.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from nydus_py import __version__
from nydus_py.errors import ConfigError, NydusError

log = logging.getLogger("nydusify")

EXIT_ERROR = 1
EXIT_UNSUPPORTED = 2
CHECK_DIFFERS, CHECK_ERROR = 1, 2       # as diff(1): 0 same, 1 different, 2 trouble

# nydusify flags nydus-py has no equivalent of, and why
UNSUPPORTED = {
    "--fs-version": "the image format is nydus-py's own bootstrap (docs/format.md), not RAFS v5/v6",
    "--oci-ref": "the converted image is always a full nydus-py image, never a zran reference "
                 "to the OCI layers",
    "--with-referrer": "the converted image is linked to its source by the manifest's `subject`",
    "--oci": "the target manifest is always an OCI manifest",
    "--docker-v2-format": "the target manifest is always an OCI manifest",
    "--reverse": "converting a nydus-py image back to OCI is not implemented",
    "--fs-align-chunk": "chunks are not 4K-aligned in blobs (FUSE reads do not need it)",
    "--backend-aligned-chunk": "chunks are not 4K-aligned in blobs (FUSE reads do not need it)",
    "--nydus-image": "there is no nydus-image binary: the builder is built in",
    "--build-cache": "there is no build cache; --chunk-dict with the previous image dedups instead",
    "--build-cache-tag": "see --build-cache",
    "--build-cache-version": "see --build-cache",
    "--build-cache-insecure": "see --build-cache",
    "--build-cache-max-records": "see --build-cache",
    "--source-archive": "use --source docker-archive:FILE",
    "--target-archive": "write an OCI layout with --target oci:DIR[:TAG] and tar it",
    "--source-backend-type": "sources are OCI images; converting a Nydus image again is not supported",
    "--source-backend-config": "see --source-backend-type",
    "--backend-force-push": "blobs already in the backend are always skipped by their digest",
    "--push-retry-count": "pushes retry with the registry client's policy",
    "--push-retry-delay": "pushes retry with the registry client's policy",
    "--push-chunk-size": "blobs are uploaded in the registry client's chunk size",
}


class _Unsupported(Exception):
    pass


def _size(text: str) -> int:
    from nydus_py.config import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _unsupported_flags(p: argparse.ArgumentParser, names) -> None:
    """Accept `names` (with or without a value) so that using one is refused with the reason."""
    for flag in names:
        assert flag in UNSUPPORTED or flag in _EXTRA_REASONS, flag
        p.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    p.set_defaults(unsupported_flags=tuple(names))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusify", description="Convert OCI images to nydus-py lazy images.")
    p.add_argument("--version", action="version", version=f"nydusify (nydus-py) {__version__}")
    _log_args(p)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="convert an image")
    _log_args(c, sub=True)
    c.add_argument("--source", default=os.environ.get("SOURCE"),
                   help="HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or docker-archive:FILE[:REF] ($SOURCE)")
    c.add_argument("--target", default=os.environ.get("TARGET"),
                   help="HOST/REPO[:TAG] or oci:DIR[:TAG] ($TARGET)")
    c.add_argument("--target-suffix", metavar="SUFFIX",
                   help="target = source + SUFFIX (e.g. -nydus), instead of --target")
    c.add_argument("--platform", help="os/arch[/variant] to pick from a multi-platform index; "
                                      "several, comma-separated, give an index of converted images")
    c.add_argument("--all-platforms", action="store_true",
                   help="convert every platform of the source index into one target index")
    c.add_argument("--fs-chunk-size", "--chunk-size", dest="chunk_size", type=_size, default=1 << 20,
                   metavar="SIZE", help="power of two, 0x1000..0x1000000 (default 0x100000)")
    c.add_argument("--chunker", choices=["fixed", "cdc"], default="fixed",
                   help="fixed-size chunks (default) or content-defined ones (FastCDC, format v3; "
                        "nydus-py only)")
    c.add_argument("--cdc-min-size", type=_size, default=0, metavar="SIZE",
                   help="--chunker cdc: smallest chunk (default avg/4, at most 0x100000)")
    c.add_argument("--cdc-avg-size", type=_size, default=0, metavar="SIZE",
                   help="--chunker cdc: average chunk, a power of two (default --chunk-size, at most 0x400000)")
    c.add_argument("--cdc-max-size", type=_size, default=0, metavar="SIZE",
                   help="--chunker cdc: largest chunk (default avg*4, at most 0x1000000)")
    c.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "lz4", "none"],
                   help="per-chunk compression (lz4 = lz4_block)")
    c.add_argument("--batch-size", type=_size, default=1 << 20, metavar="SIZE",
                   help="compress chunks smaller than this together, in batches of at most this "
                        "size; 0 = off (format v1). Default 0x100000 (nydusify: 0)")
    c.add_argument("--compression-level", type=int, metavar="N",
                   help="zstd level 1..22 (default 6; 3 is faster and ~5%% bigger)")
    c.add_argument("--prefetch-patterns", nargs="?", const="-", metavar="FILE",
                   help="paths to prefetch, one a line: from stdin (as nydusify) or from FILE")
    c.add_argument("--prefetch-dir", metavar="PATH", help="prefetch this directory of the image")
    c.add_argument("--max-layer-size", type=_size, default=64 << 30, metavar="SIZE",
                   help="reject a layer that decompresses to more than this (default 64G)")
    c.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    c.add_argument("--output-json", metavar="FILE",
                   help="write digests, sizes and timings (per layer) here as JSON")
    c.add_argument("--backend-type", choices=["registry", "s3"], default="registry",
                   help="where the data blobs go: with the image (default) or to S3")
    c.add_argument("--backend-config", help="the backend's JSON config (nydusd's backend.config)")
    c.add_argument("--backend-config-file", help="a file holding the backend's JSON config")
    c.add_argument("--chunk-dict", metavar="SRC", action="append",
                   help="an earlier nydus-py image whose chunks are referenced, not stored again "
                        "(repeat for several; nydusify takes one): "
                        "oci:DIR[:TAG] or HOST/REPO:TAG (nydusify's bootstrap:registry:REF and "
                        "bootstrap:oci:DIR[:TAG] work too)")
    c.add_argument("--chunk-dict-insecure", action="store_true",
                   help="talk plain HTTP to the chunk dictionary's registry")
    c.add_argument("--merge-platform", "--multi-platform", dest="merge_platform", action="store_true",
                   help="push an index holding the source and the converted manifest under the target tag")
    _registry_args(c)
    _unsupported_flags(c, UNSUPPORTED)

    k = sub.add_parser("check", help="compare a converted image with its source, file by file",
                       description="Exit 0: identical; 1: the trees differ; 2: the check failed.")
    _log_args(k, sub=True)
    k.add_argument("--source", default=os.environ.get("SOURCE"),
                   help="the original image (default: the target manifest's `subject`)")
    k.add_argument("--target", default=os.environ.get("TARGET"), help="the converted image")
    k.add_argument("--platform")
    _registry_args(k)
    _unsupported_flags(k, ("--multi-platform", "--source-backend-type", "--source-backend-config",
                           "--source-backend-config-file", "--target-backend-type",
                           "--target-backend-config", "--target-backend-config-file",
                           "--nydus-image", "--nydusd"))

    m = sub.add_parser("mount", help="mount a converted image (foreground, Ctrl-C unmounts)")
    _log_args(m, sub=True)
    m.add_argument("--target", default=os.environ.get("TARGET"), help="the converted image")
    m.add_argument("--target-insecure", action="store_true",
                   help="HTTPS without certificate verification, or plain HTTP")
    m.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registry")
    m.add_argument("--backend-type", choices=["registry", "s3"], default=None)
    m.add_argument("--backend-config")
    m.add_argument("--backend-config-file")
    m.add_argument("--prefetch", action="store_true", help="prefetch the whole image after mounting")
    m.add_argument("--mount-path", default="./image-fs", help="where to mount (default ./image-fs)")
    m.add_argument("--platform", help=argparse.SUPPRESS)
    m.add_argument("--work-dir", help="chunk cache directory (default: a private temp dir)")
    _unsupported_flags(m, ("--nydusd",))

    y = sub.add_parser("copy", help="copy a converted image with all its blobs")
    _log_args(y, sub=True)
    y.add_argument("--source", default=os.environ.get("SOURCE"), help="converted image (registry or oci:DIR[:TAG])")
    y.add_argument("--target", default=os.environ.get("TARGET"), help="registry reference or oci:DIR[:TAG]")
    _registry_args(y)
    _unsupported_flags(y, ("--source-backend-type", "--source-backend-config",
                           "--source-backend-config-file", "--all-platforms", "--platform",
                           "--push-chunk-size", "--nydus-image"))
    return p


def _log_args(p: argparse.ArgumentParser, *, sub: bool = False) -> None:
    # accepted before or after the command, as nydusify's global flags
    d = argparse.SUPPRESS if sub else None
    p.add_argument("--log-level", "-l", default=d if sub else os.environ.get("LOG_LEVEL", "warning"),
                   choices=["trace", "debug", "info", "warn", "warning", "error", "fatal", "panic"])
    p.add_argument("--log-file", default=d if sub else os.environ.get("LOG_FILE"), metavar="FILE",
                   help="write log messages here (appended)")
    p.add_argument("--debug", "-D", action="store_true", default=d if sub else False,
                   help="debug log level (overrides --log-level)")


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registries")
    p.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification")
    p.add_argument("--source-insecure", action="store_true",
                   help="source registry: skip certificate verification, or plain HTTP (nydusify)")
    p.add_argument("--target-insecure", action="store_true",
                   help="target registry: skip certificate verification, or plain HTTP (nydusify)")
    p.add_argument("--ca-file", help="PEM bundle of CAs to trust for registry TLS")
    p.add_argument("--work-dir", help="temp space for downloaded layers and built blobs")


def _insecure_plain_http(ref_text: str) -> bool:
    """nydusify's --*-insecure: no certificate checks, and plain HTTP when the registry does
    not speak TLS at all. One probe of /v2/ decides (TLS handshake failing on an HTTP answer)."""
    from converter.sources import parse_source
    ref = parse_source(ref_text)
    if ref.transport != "docker":
        return False
    import requests

    from nydus_py.oci.reference import parse as parse_reference
    host = parse_reference(ref.path).api_host
    try:
        requests.get(f"https://{host}/v2/", verify=False, timeout=10)
    except requests.exceptions.SSLError:
        return True                 # e.g. "wrong version number": an HTTP server
    except requests.RequestException:
        return False                # unreachable: let the real request report it
    return False


def _registry_options(args, side: str, ref_text: str | None):
    from converter.sources import RegistryOptions
    insecure = getattr(args, f"{side}_insecure", False)
    plain = args.plain_http or (insecure and ref_text is not None and _insecure_plain_http(ref_text))
    return RegistryOptions(plain_http=plain, skip_verify=args.insecure or insecure,
                           ca_file=args.ca_file, work_dir=args.work_dir)


def _read_patterns(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
    except OSError as e:
        raise ConfigError(f"--prefetch-patterns {path}: {e.strerror}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _backend_json(args) -> dict | None:
    text = args.backend_config
    if args.backend_config_file:
        try:
            with open(args.backend_config_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"--backend-config-file {args.backend_config_file}: {e.strerror}") from None
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"backend config: malformed JSON ({e})") from None


def _blob_store(args):
    """nydusify's --backend-type/--backend-config: an external store for the data blobs."""
    if args.backend_type == "registry":
        if args.backend_config or args.backend_config_file:
            raise ConfigError("--backend-config goes with --backend-type s3")
        return None
    conf = _backend_json(args)
    if conf is None:
        raise ConfigError(f"--backend-type {args.backend_type} needs --backend-config or --backend-config-file")
    from converter.convert import BlobStore
    from nydus_py.config.schema import S3BackendConfig
    from nydus_py.storage.s3 import S3Backend
    return BlobStore("s3", S3Backend(S3BackendConfig.from_dict(conf, "backend-config")))


def _source_target(args) -> tuple[str, str]:
    if not args.source:
        raise ConfigError("--source (or $SOURCE) is required")
    if args.target_suffix:
        if args.target and args.target != os.environ.get("TARGET"):
            raise ConfigError("--target and --target-suffix exclude each other")
        return args.source, _with_suffix(args.source, args.target_suffix)
    if not args.target:
        raise ConfigError("--target (or $TARGET, or --target-suffix) is required")
    return args.source, args.target


def _with_suffix(source: str, suffix: str) -> str:
    """nydusify's --target-suffix: `reg/app:1.0` + `-nydus` → `reg/app:1.0-nydus`."""
    from converter.sources import parse_source
    ref = parse_source(source)
    if ref.transport == "oci":
        return f"oci:{ref.path}:{ref.reference or 'latest'}{suffix}"
    if ref.transport != "docker":
        raise ConfigError(f"--target-suffix needs a registry or oci: source, not {source}")
    from nydus_py.oci.reference import parse as parse_reference
    r = parse_reference(ref.path)
    if r.digest and not r.tag:
        raise ConfigError(f"--target-suffix: source {source} has no tag to add {suffix!r} to")
    return f"{r.host}/{r.repository}:{r.tag or 'latest'}{suffix}"


def cmd_convert(args) -> int:
    from converter.builder import BuildOptions
    from converter.convert import convert
    from converter.progress import Progress
    from converter.sources import parse_platform, parse_source

    if args.all_platforms and args.platform:
        raise ConfigError("--all-platforms and --platform exclude each other (as in nydusify)")
    platforms = [p.strip() for p in args.platform.split(",")] if args.platform else []
    for p in platforms:
        parse_platform(p)  # a bad --platform is an error before any download
    source_text, target_text = _source_target(args)
    patterns = _read_patterns(args.prefetch_patterns)
    if args.prefetch_dir:
        patterns += (args.prefetch_dir,)
    options = BuildOptions(chunk_size=args.chunk_size,
                           compressor="lz4" if args.compressor == "lz4_block" else args.compressor,
                           compression_level=args.compression_level,
                           batch_size=args.batch_size, chunker=args.chunker,
                           cdc_min_size=args.cdc_min_size, cdc_avg_size=args.cdc_avg_size,
                           cdc_max_size=args.cdc_max_size,
                           max_layer_size=args.max_layer_size, prefetch_patterns=patterns)
    source, target = parse_source(source_text), parse_source(target_text)
    src_opts = _registry_options(args, "source", source_text)
    dst_opts = _registry_options(args, "target", target_text)
    blob_store = _blob_store(args)
    chunk_dict = None
    if args.chunk_dict:
        from converter.chunk_dict import open_chunk_dict
        chunk_dict = [open_chunk_dict(d, src_opts, insecure=args.chunk_dict_insecure,
                                      blob_backend=blob_store.type if blob_store is not None else None)
                      for d in args.chunk_dict]
    elif args.chunk_dict_insecure:
        raise ConfigError("--chunk-dict-insecure goes with --chunk-dict")
    if args.output_json:
        _check_writable(args.output_json)
    if args.all_platforms or len(platforms) > 1:
        return _convert_platforms(args, source, target, source_text, target_text, options, platforms,
                                  src_opts, dst_opts, blob_store, chunk_dict)
    with Progress(enabled=not args.quiet) as progress:
        res = convert(source, target, options, platform=args.platform, progress=progress.update,
                      on_image=progress.start, registry=src_opts, target_registry=dst_opts,
                      merge_platform=args.merge_platform, blob_store=blob_store, chunk_dict=chunk_dict,
                      on_layer=progress.layer_done)
    s = res.build.stats
    stored = sum(b.size for b in res.build.blobs)
    print(f"converted {source_text} -> {target_text}: manifest {res.manifest.digest}", file=sys.stderr)
    print(f"  {s.layers} layers, {s.entries} entries, {s.files} files, {s.file_bytes} file bytes; "
          f"{s.chunks_stored}/{s.chunks_seen} chunks stored after dedup; blobs {stored} bytes "
          f"(source layers {res.source_compressed}); bootstrap {len(res.build.bootstrap)} bytes; "
          f"{res.seconds:.2f}s", file=sys.stderr)
    if chunk_dict is not None:
        kept = res.build.dict_blobs
        print(f"  chunk dict {', '.join(args.chunk_dict)}: {s.dict_chunks_used} chunks referenced from it, "
              f"{len(kept)}/{s.dict_blobs} of its blobs used ({sum(b.compressed_size for b in kept)} "
              f"bytes referenced)", file=sys.stderr)
    if res.pushed_digest:
        print(f"  pushed {target_text} ({res.pushed_digest})", file=sys.stderr)
    if args.output_json:
        _write_json(args.output_json, _report(source_text, target_text, res, blob_store))
    return 0


def _convert_platforms(args, source, target, source_text, target_text, options, platforms,
                       src_opts, dst_opts, blob_store, chunk_dict) -> int:
    from converter.multiplatform import convert_platforms, source_platforms
    from converter.progress import Progress
    if args.all_platforms:
        platforms = source_platforms(source, src_opts)
    with Progress(enabled=not args.quiet) as progress:
        res = convert_platforms(source, target, options, platforms, registry=src_opts,
                                target_registry=dst_opts, progress=progress.update,
                                on_image=progress.start, on_layer=progress.layer_done,
                                merge_platform=args.merge_platform, blob_store=blob_store,
                                chunk_dict=chunk_dict)
    print(f"converted {source_text} -> {target_text}: index {res.index.digest} "
          f"({', '.join(res.images)})", file=sys.stderr)
    for p, r in res.images.items():
        print(f"  {p}: manifest {r.manifest.digest}, {r.build.stats.layers} layers, "
              f"blobs {sum(b.size for b in r.build.blobs)} bytes, {r.seconds:.2f}s", file=sys.stderr)
    if res.pushed_digest:
        print(f"  pushed {target_text} ({res.pushed_digest})", file=sys.stderr)
    if args.output_json:
        _write_json(args.output_json, {
            "version": __version__, "source": source_text, "target": target_text,
            "index": {"digest": res.index.digest, "size": res.index.size},
            "pushed_digest": res.pushed_digest,
            "platforms": {p: _report(source_text, target_text, r, blob_store)
                          for p, r in res.images.items()}})
    return 0


def _check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ConfigError(f"--output-json {path}: directory {d} does not exist")


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConfigError(f"--output-json {path}: {e.strerror}") from None


def _report(source: str, target: str, res, blob_store) -> dict:
    s = res.build.stats
    return {
        "version": __version__,
        "source": source,
        "target": target,
        "manifest": {"digest": res.manifest.digest, "size": res.manifest.size},
        "pushed_digest": res.pushed_digest,
        "blob_backend": blob_store.type if blob_store is not None else "registry",
        "source_image_size": res.source_compressed,
        "target_image_size": sum(b.size for b in res.build.blobs) + len(res.build.bootstrap),
        "bootstrap_size": len(res.build.bootstrap),
        "convert_elapsed": round(res.seconds - res.push_seconds, 6),
        "push_elapsed": round(res.push_seconds, 6),
        "total_elapsed": round(res.seconds, 6),
        "layers": [{
            "index": r.index, "source_digest": r.source_digest, "source_size": r.source_size,
            "blob_digest": r.blob_digest, "blob_size": r.blob_size,
            "blob_uncompressed_size": r.uncompressed_size, "chunks": r.chunks,
            "elapsed": round(r.seconds, 6)} for r in res.layers],
        "stats": {"entries": s.entries, "files": s.files, "file_bytes": s.file_bytes,
                  "chunks_seen": s.chunks_seen, "chunks_stored": s.chunks_stored,
                  "dict_chunks_used": s.dict_chunks_used},
    }


def cmd_check(args) -> int:
    from converter.check import check
    if not args.target:
        raise ConfigError("--target (or $TARGET) is required")
    plain = args.plain_http or (args.target_insecure and _insecure_plain_http(args.target))
    diffs = check(args.source, args.target, platform=args.platform, work_dir=args.work_dir,
                  plain_http=plain, insecure=args.insecure or args.source_insecure or args.target_insecure)
    for d in diffs:
        print(d)
    if diffs:
        print(f"nydusify check: {len(diffs)} difference(s)", file=sys.stderr)
        return CHECK_DIFFERS
    print("nydusify check: trees are identical", file=sys.stderr)
    return 0


def cmd_mount(args) -> int:
    from nydus_py.config.schema import BackendConfig, DaemonConfig, PrefetchConfig
    from nydus_py.daemon.mount import MountRequest, mount
    if not args.target:
        raise ConfigError("--target (or $TARGET) is required")
    backend = None
    conf = _backend_json(args)
    if args.backend_type not in (None, "registry") or conf is not None:
        if args.backend_type is None:
            raise ConfigError("--backend-config goes with --backend-type")
        backend = BackendConfig.of_type(args.backend_type, conf, "backend", "--backend-config")
    cfg = DaemonConfig(backend=backend,
                       fs_prefetch=PrefetchConfig(enable=args.prefetch, prefetch_all=args.prefetch))
    os.makedirs(args.mount_path, exist_ok=True)
    plain = args.plain_http or (args.target_insecure and _insecure_plain_http(args.target))
    req = MountRequest(mountpoint=os.path.abspath(args.mount_path), image=args.target,
                       plain_http=plain, skip_verify=args.target_insecure, config=cfg,
                       cache_dir=args.work_dir)
    print(f"nydusify: mounting {args.target} at {args.mount_path} (Ctrl-C unmounts)", file=sys.stderr,
          flush=True)
    mount(req)
    return 0


def cmd_copy(args) -> int:
    from converter.copy import copy_image
    if not args.source or not args.target:
        raise ConfigError("--source and --target (or $SOURCE/$TARGET) are required")
    res = copy_image(args.source, args.target,
                     source_registry=_registry_options(args, "source", args.source),
                     target_registry=_registry_options(args, "target", args.target))
    print(f"copied {args.source} -> {args.target}: manifest {res.manifest.digest}, {res.blobs} blobs, "
          f"{res.bytes} bytes", file=sys.stderr)
    return 0


def _setup_logging(args) -> None:
    level = "debug" if args.debug else args.log_level
    level = {"trace": "DEBUG", "warn": "WARNING", "fatal": "CRITICAL", "panic": "CRITICAL"}.get(
        level, level.upper())
    handler: logging.Handler = (logging.FileHandler(args.log_file) if args.log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"
                                           if args.log_file else "%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _rejected(args) -> str | None:
    for flag in getattr(args, "unsupported_flags", ()):
        if getattr(args, flag[2:].replace("-", "_"), None) is not None:
            return f"{flag}, because {UNSUPPORTED.get(flag) or _EXTRA_REASONS[flag]}"
    return None


_EXTRA_REASONS = {
    "--nydusd": "nydus-py's own nydusd is used (python -m nydus_py.daemon.cli)",
    "--source-backend-config-file": "see --source-backend-type",
    "--target-backend-type": "a converted image whose blobs are in S3 is checked by mounting it "
                             "with `nydusd mount --image REF --config C`",
    "--target-backend-config": "see --target-backend-type",
    "--target-backend-config-file": "see --target-backend-type",
    "--multi-platform": "check compares one converted manifest with its source",
    "--platform": "copy takes the image the reference names (from a merged index, the converted entry)",
    "--all-platforms": "see --platform",
}


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--target-suffix -nydus` (nydusify's usual spelling): argparse would read `-nydus` as
    a flag, so the value is attached (`--target-suffix=-nydus`)."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--target-suffix":
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_join_dash_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        _setup_logging(args)
    except OSError as e:
        print(f"nydusify: error: --log-file {args.log_file}: {e.strerror}", file=sys.stderr)
        return EXIT_ERROR
    error_code = CHECK_ERROR if args.cmd == "check" else EXIT_ERROR
    try:
        why = _rejected(args)
        if why:
            raise _Unsupported(why)
        return {"convert": cmd_convert, "check": cmd_check, "mount": cmd_mount,
                "copy": cmd_copy}[args.cmd](args)
    except _Unsupported as e:
        print(f"nydusify: not supported by nydus-py: {e}", file=sys.stderr)
        return EXIT_UNSUPPORTED if args.cmd != "check" else CHECK_ERROR
    except NydusError as e:
        print(f"nydusify: error: {e}", file=sys.stderr)
        return error_code
    except KeyboardInterrupt:
        print("nydusify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
