"""Chunk codecs. A chunk is compressed on its own so it can be fetched and decoded alone."""

from __future__ import annotations

import threading

import zstandard

from nydus_py.errors import ConfigError, IntegrityError

CODECS = ("zstd", "lz4", "none")
_local = threading.local()  # zstd contexts are not thread-safe; one per thread is cheap


DEFAULT_ZSTD_LEVEL = 6   # with batches: base 0.86x, python 0.90x gzip (level 3: 0.90x, 0.94x)
ZSTD_LEVELS = range(1, 23)


def _zc(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "zc", None)
    if cache is None:
        cache = _local.zc = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                     write_checksum=False)
    return c


def _lz4():
    # imported on first use: most images are zstd, and lz4's two extension modules (3.4 MB)
    # would be read from disk on every daemon start
    import lz4.block
    return lz4.block


def _zd() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def check_codec(name: str) -> str:
    if name not in CODECS:
        raise ConfigError(f"unknown compressor {name!r} (choose from {', '.join(CODECS)})")
    return name


def check_level(codec: str, level: int | None) -> int | None:
    if level is None:
        return None
    if codec != "zstd" or level not in ZSTD_LEVELS:
        raise ConfigError(f"--compression-level {level}: only zstd has levels (1..22)")
    return level


def compress(codec: str, data: bytes, level: int | None = None) -> bytes | None:
    """Compressed bytes, or None when compression does not make the chunk smaller."""
    if codec == "none":
        return None
    if codec == "zstd":
        out = _zc(level or DEFAULT_ZSTD_LEVEL).compress(data)
    elif codec == "lz4":
        out = _lz4().compress(data, store_size=False)
    else:
        raise ConfigError(f"unknown compressor {codec!r}")
    return out if len(out) < len(data) else None


def decompress(codec: str, data: bytes | memoryview, size: int, what: str) -> bytes:
    """Decode exactly `size` bytes; any decoder error or wrong size is an IntegrityError.

    Never produces more than `size` bytes (the size the bootstrap declares, itself bounded by
    MAX_CHUNK_SIZE): python-zstandard sizes its output by the frame's own content-size field
    and ignores max_output_size when that field is present, so a frame claiming more than
    `size` is refused before any decoding (a few stored bytes could otherwise expand to GiBs
    before the sha256 check)."""
    try:
        if codec == "zstd":
            declared = zstandard.frame_content_size(data)
            if declared >= 0 and declared != size:
                raise IntegrityError(f"{what}: zstd frame declares {declared} bytes, expected {size}")
            out = _zd().decompress(data, max_output_size=size)
        elif codec == "lz4":
            lz4 = _lz4()
            try:
                out = lz4.decompress(data, uncompressed_size=size)
            except lz4.LZ4BlockError as e:
                raise IntegrityError(f"{what}: cannot decompress ({e})") from None
        else:
            raise IntegrityError(f"{what}: unknown compressor {codec!r}")
    except (zstandard.ZstdError, ValueError) as e:
        raise IntegrityError(f"{what}: cannot decompress ({e})") from None
    if len(out) != size:
        raise IntegrityError(f"{what}: decompressed to {len(out)} bytes, expected {size}")
    return out
