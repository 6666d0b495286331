"""Chunk identity across layers (and, with a chunk dictionary, across images).

Maps sha256 → chunk id. A chunk seen in a lower layer or in the dictionary is referenced, not
stored again. Ids of the layer being written are provisional until its blob is finished
(the prefetch segment reorders chunks inside the blob); `renumber` makes them final.
"""

from __future__ import annotations

from typing import Iterable, MutableSequence


class ChunkIndex:
    def __init__(self) -> None:
        self._ids: dict[bytes, int] = {}
        self._layer_new: list[bytes] = []

    def get(self, digest: bytes) -> int | None:
        return self._ids.get(digest)

    def add_existing(self, digest: bytes, chunk_id: int) -> None:
        """A chunk that already lives in a blob (lower layer or dictionary)."""
        self._ids.setdefault(digest, chunk_id)

    def add_new(self, digest: bytes, provisional_id: int) -> None:
        self._ids[digest] = provisional_id
        self._layer_new.append(digest)

    def renumber(self, mapping: dict[int, int]) -> None:
        """Applies provisional → final ids for the chunks added since the last call."""
        for d in self._layer_new:
            cid = self._ids[d]
            self._ids[d] = mapping.get(cid, cid)
        self._layer_new.clear()

    def __len__(self) -> int:
        return len(self._ids)


def remap_ids(lists: Iterable[MutableSequence[int]], mapping: dict[int, int]) -> None:
    for ids in lists:
        for k, cid in enumerate(ids):
            new = mapping.get(cid)
            if new is not None:
                ids[k] = new
