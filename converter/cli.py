"""`nydusify`: convert OCI images to nydus-py images, and check a conversion."""

from __future__ import annotations

import argparse
import logging
import sys

from converter.builder import BuildOptions
from nydus_py import __version__
from nydus_py.errors import ConfigError, NydusError

log = logging.getLogger("nydusify")


def _size(text: str) -> int:
    from nydus_py.config import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusify", description="Convert OCI images to nydus-py lazy images.")
    p.add_argument("--version", action="version", version=f"nydusify (nydus-py) {__version__}")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="convert an image")
    c.add_argument("--source", required=True,
                   help="HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or docker-archive:FILE[:REF]")
    c.add_argument("--target", required=True, help="HOST/REPO[:TAG] or oci:DIR[:TAG]")
    c.add_argument("--platform", help="os/arch[/variant] to pick from a multi-platform index")
    c.add_argument("--chunk-size", type=_size, default=1 << 20, help="power of two, 0x1000..0x1000000 (default 1 MiB)")
    c.add_argument("--compressor", default="zstd", choices=["zstd", "lz4", "none"])
    c.add_argument("--compression-level", type=int, metavar="N",
                   help="zstd level 1..22 (default 3; 19 is ~10%% smaller and several times slower)")
    c.add_argument("--prefetch-patterns", metavar="FILE",
                   help="paths to prefetch, one a line ('-' for stdin)")
    c.add_argument("--max-layer-size", type=_size, default=64 << 30,
                   help="reject a layer that decompresses to more bytes than this")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--backend-type", choices=["registry", "s3"], default="registry",
                   help="where the data blobs go: with the image (default) or to S3")
    c.add_argument("--backend-config", help="the backend's JSON config (nydusd's backend.config)")
    c.add_argument("--backend-config-file", help="a file holding the backend's JSON config")
    c.add_argument("--chunk-dict", metavar="SRC",
                   help="an earlier nydus-py image whose chunks are referenced, not stored again: "
                        "oci:DIR[:TAG] or HOST/REPO:TAG (nydusify's bootstrap:registry:REF and "
                        "bootstrap:oci:DIR[:TAG] work too)")
    c.add_argument("--chunk-dict-insecure", action="store_true",
                   help="talk plain HTTP to the chunk dictionary's registry")
    c.add_argument("--merge-platform", action="store_true",
                   help="push an index holding the source and the converted manifest under the target tag")
    _registry_args(c)

    k = sub.add_parser("check", help="compare a converted image with its source, file by file")
    k.add_argument("--source", required=True, help="the original image (oci:DIR[:TAG] or docker-archive:FILE)")
    k.add_argument("--target", required=True, help="the converted image (oci:DIR[:TAG])")
    k.add_argument("--platform")
    k.add_argument("--work-dir", help="where to unpack and mount (default: a temp dir)")
    return p


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registries")
    p.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification")
    p.add_argument("--ca-file", help="PEM bundle of CAs to trust for registry TLS")
    p.add_argument("--work-dir", help="temp space for downloaded layers and built blobs")


def _registry_options(args):
    from converter.sources import RegistryOptions
    return RegistryOptions(plain_http=args.plain_http, skip_verify=args.insecure, ca_file=args.ca_file,
                           work_dir=args.work_dir)


def _read_patterns(path: str | None) -> tuple[str, ...]:
    if not path:
        return ()
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8", errors="surrogateescape").read()
    except OSError as e:
        raise ConfigError(f"--prefetch-patterns {path}: {e.strerror}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _blob_store(args):
    """nydusify's --backend-type/--backend-config: an external store for the data blobs."""
    if args.backend_type == "registry":
        if args.backend_config or args.backend_config_file:
            raise ConfigError("--backend-config goes with --backend-type s3")
        return None
    import json
    text = args.backend_config
    if args.backend_config_file:
        try:
            text = open(args.backend_config_file, encoding="utf-8").read()
        except OSError as e:
            raise ConfigError(f"--backend-config-file {args.backend_config_file}: {e.strerror}") from None
    if not text:
        raise ConfigError(f"--backend-type {args.backend_type} needs --backend-config or --backend-config-file")
    try:
        conf = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"backend config: malformed JSON ({e})") from None
    from converter.convert import BlobStore
    from nydus_py.config.schema import S3BackendConfig
    from nydus_py.storage.s3 import S3Backend
    return BlobStore("s3", S3Backend(S3BackendConfig.from_dict(conf, "backend-config")))


def cmd_convert(args) -> int:
    from converter.convert import convert
    from converter.progress import Progress
    from converter.sources import parse_platform, parse_source

    parse_platform(args.platform)  # a bad --platform is an error before any download
    options = BuildOptions(chunk_size=args.chunk_size, compressor=args.compressor,
                           compression_level=args.compression_level,
                           max_layer_size=args.max_layer_size,
                           prefetch_patterns=_read_patterns(args.prefetch_patterns))
    source, target = parse_source(args.source), parse_source(args.target)
    registry = _registry_options(args)
    blob_store = _blob_store(args)
    chunk_dict = None
    if args.chunk_dict:
        from converter.chunk_dict import open_chunk_dict
        chunk_dict = open_chunk_dict(args.chunk_dict, registry, insecure=args.chunk_dict_insecure)
    elif args.chunk_dict_insecure:
        raise ConfigError("--chunk-dict-insecure goes with --chunk-dict")
    with Progress(enabled=not args.quiet) as progress:
        res = convert(source, target, options, platform=args.platform, progress=progress.update,
                      on_image=progress.start, registry=registry,
                      merge_platform=args.merge_platform, blob_store=blob_store, chunk_dict=chunk_dict)
    s = res.build.stats
    stored = sum(b.size for b in res.build.blobs)
    print(f"converted {args.source} -> {args.target}: manifest {res.manifest.digest}", file=sys.stderr)
    print(f"  {s.layers} layers, {s.entries} entries, {s.files} files, {s.file_bytes} file bytes; "
          f"{s.chunks_stored}/{s.chunks_seen} chunks stored after dedup; blobs {stored} bytes "
          f"(source layers {res.source_compressed}); bootstrap {len(res.build.bootstrap)} bytes; "
          f"{res.seconds:.2f}s", file=sys.stderr)
    if chunk_dict is not None:
        kept = res.build.dict_blobs
        print(f"  chunk dict {args.chunk_dict}: {s.dict_chunks_used} chunks referenced from it, "
              f"{len(kept)}/{s.dict_blobs} of its blobs used ({sum(b.compressed_size for b in kept)} "
              f"bytes referenced)", file=sys.stderr)
    if res.pushed_digest:
        print(f"  pushed {args.target} ({res.pushed_digest})", file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    from converter.check import check
    diffs = check(args.source, args.target, platform=args.platform, work_dir=args.work_dir)
    for d in diffs:
        print(d)
    if diffs:
        print(f"nydusify check: {len(diffs)} difference(s)", file=sys.stderr)
        return 1
    print("nydusify check: trees are identical", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"convert": cmd_convert, "check": cmd_check}[args.cmd](args)
    except NydusError as e:
        print(f"nydusify: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nydusify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
