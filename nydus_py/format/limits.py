"""Every limit a bootstrap is checked against when it is loaded, in one place.

A bootstrap comes from the image author, who is untrusted: the daemon (root) checks each count,
size and offset against these limits and against the other columns before it allocates
anything proportional to it. docs/format.md ("Limits") lists the same values; change both.
"""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# The msgpack document (after zstd), and the zstd layer that carries it. Everything the loader
# keeps is a view of this buffer, so a loaded bootstrap costs about its own size in memory.
MAX_BOOTSTRAP_SIZE = 1 * GiB

# One chunk, uncompressed and as stored: a 1-byte read never decompresses more than this.
# `chunk_size` is a power of two no larger than this (the converter writes 4 KiB..16 MiB).
MAX_CHUNK_SIZE = 16 * MiB

# Blobs one bootstrap may name (each costs a cache file and an open fd at mount).
MAX_BLOBS = 4096
# One blob's compressed or uncompressed size (the cache file of a blob is this big at most).
MAX_BLOB_SIZE = 1 << 44                 # 16 TiB

# Names and strings.
MAX_NAME_LEN = 255                      # a directory entry (NAME_MAX)
MAX_SYMLINK_LEN = 4095                  # a symlink target (PATH_MAX - 1)
MAX_XATTR_NAME_LEN = 255                # XATTR_NAME_MAX
MAX_XATTR_VALUE_LEN = 64 * KiB          # XATTR_SIZE_MAX
MAX_XATTRS_PER_INODE = 1024             # every getxattr decodes all of an inode's xattrs

# Header fields that are not columns: `meta` (informational) and each `blobs` map.
MAX_META_ENTRIES = 64
MAX_HEADER_STR = 4 * KiB                # a str value in the header (blob id, compressor, meta)
MAX_HEADER_ITEMS = 1 << 16              # msgpack objects outside the bin columns, in total

# Largest st_mtime seconds whose nanoseconds still fit the kernel's signed 64-bit time.
MAX_MTIME_SEC = (1 << 63) // 1_000_000_000 - 1
