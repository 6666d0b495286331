"""Chunk codecs. A chunk is compressed on its own so it can be fetched and decoded alone."""

from __future__ import annotations

import threading

import lz4.block
import zstandard

from nydus_py.errors import ConfigError, IntegrityError

CODECS = ("zstd", "lz4", "none")
_local = threading.local()  # zstd contexts are not thread-safe; one per thread is cheap


def _zc() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    return c


def _zd() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def check_codec(name: str) -> str:
    if name not in CODECS:
        raise ConfigError(f"unknown compressor {name!r} (choose from {', '.join(CODECS)})")
    return name


def compress(codec: str, data: bytes) -> bytes | None:
    """Compressed bytes, or None when compression does not make the chunk smaller."""
    if codec == "none":
        return None
    if codec == "zstd":
        out = _zc().compress(data)
    elif codec == "lz4":
        out = lz4.block.compress(data, store_size=False)
    else:
        raise ConfigError(f"unknown compressor {codec!r}")
    return out if len(out) < len(data) else None


def decompress(codec: str, data: bytes, size: int, what: str) -> bytes:
    """Decode exactly `size` bytes; any decoder error or wrong size is an IntegrityError."""
    try:
        if codec == "zstd":
            out = _zd().decompress(data, max_output_size=size)
        elif codec == "lz4":
            out = lz4.block.decompress(data, uncompressed_size=size)
        else:
            raise IntegrityError(f"{what}: unknown compressor {codec!r}")
    except (zstandard.ZstdError, lz4.block.LZ4BlockError, ValueError) as e:
        raise IntegrityError(f"{what}: cannot decompress ({e})") from None
    if len(out) != size:
        raise IntegrityError(f"{what}: decompressed to {len(out)} bytes, expected {size}")
    return out
