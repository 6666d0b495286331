"""Pure helpers of the fetch path: merge missing chunks into backend ranges, and turn the
bytes of a range back into verified chunks. No I/O, no trio: unit-testable on their own.

Merging (per blob, by `comp_offset`): a chunk joins the current range when the gap before it
is at most `max_gap` bytes (a tiny gap costs less than another round trip) and the range stays
within `limit` bytes (`amplify_io`); a single chunk larger than `limit` is a range of its own.
`extend_forward` then grows a range over the chunks that follow it in the blob, while
`accept(chunk)` (not cached, not in flight) and the same bounds hold: nydusd's amplify_io
readahead, which turns a sequential read into a few large requests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from nydus_py.errors import IntegrityError
from nydus_py.format.bootstrap import BlobInfo, Chunk
from nydus_py.format.compression import decompress


@dataclass
class Range:
    blob: int                       # index into Bootstrap.blobs
    start: int                      # compressed offset in the blob
    end: int
    chunks: list[Chunk] = field(default_factory=list)
    readahead: int = 0              # how many of `chunks` (at the end) nobody asked for

    @property
    def length(self) -> int:
        return self.end - self.start

    def fits(self, c: Chunk, max_gap: int, limit: int) -> bool:
        return (c.comp_offset >= self.start and c.comp_offset - self.end <= max_gap
                and max(self.end, c.comp_offset + c.comp_size) - self.start <= limit)

    def add(self, c: Chunk) -> None:
        self.chunks.append(c)
        self.end = max(self.end, c.comp_offset + c.comp_size)


def plan_ranges(chunks: Sequence[Chunk], *, max_gap: int, limit: int) -> list[Range]:
    """Ranges covering `chunks` (deduplicated by the caller), grouped by blob, each sorted by
    compressed offset. Deterministic: same input, same ranges."""
    out: list[Range] = []
    for c in sorted(chunks, key=lambda c: (c.blob, c.comp_offset, c.index)):
        cur = out[-1] if out and out[-1].blob == c.blob else None
        if cur is not None and cur.fits(c, max_gap, limit):
            cur.add(c)
        else:
            out.append(Range(c.blob, c.comp_offset, c.comp_offset + c.comp_size, [c]))
    return out


def extend_forward(r: Range, following: Iterable[Chunk], *, max_gap: int, limit: int,
                   accept: Callable[[Chunk], bool]) -> int:
    """Appends chunks from `following` (the blob's chunks after the range's last one, in blob
    order) while they fit and are accepted; stops at the first that is not. Returns how many."""
    n = 0
    for c in following:
        if c.comp_offset < r.end or not r.fits(c, max_gap, limit) or not accept(c):
            break
        r.add(c)
        n += 1
    r.readahead += n
    return n


def decode_chunk(blob: BlobInfo, c: Chunk, stored: bytes | memoryview) -> bytes:
    """The chunk's uncompressed bytes from its stored form, verified against its sha256;
    IntegrityError (naming blob and chunk) on any mismatch. Never returns unverified bytes."""
    what = f"blob {blob.id} chunk {c.id} (index {c.index})"
    if len(stored) != c.comp_size:
        raise IntegrityError(f"{what}: got {len(stored)} stored bytes, expected {c.comp_size}")
    if c.compressed:
        data = decompress(blob.compressor, stored, c.size, what)
    else:
        if c.comp_size != c.size:
            raise IntegrityError(f"{what}: raw chunk of {c.comp_size} bytes, expected {c.size}")
        data = bytes(stored)
    actual = hashlib.sha256(data).digest()
    if actual != c.digest:
        raise IntegrityError(f"{what}: sha256 mismatch (expected {c.digest.hex()}, "
                             f"got {actual.hex()})")
    return data
